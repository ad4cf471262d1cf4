"""Router: the Ray Serve deployment holding the dense part of the model and running the engine.

It loads everything but the experts, connects to the expert shards' data plane (control calls
go through Serve handles; the per-layer tensors go over torch.distributed, see
moe.data_plane), and runs the continuous-batching engine on its own thread (moe.async_engine).
`generate` streams a request's outputs back to the ingress, one item per engine step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch

from cluster.config import RaymixSettings
from moe.async_engine import AsyncEngine
from moe.checkpoint import CheckpointReader
from moe.config import MixtralConfig
from moe.data_plane import RemoteExperts, Rendezvous, ShardLink, comm_device, open_store
from moe.engine import LLMEngine, pick_device, pick_dtype
from moe.errors import RequestError
from moe.model import MixtralDense
from moe.sampling import SamplingParams
from moe.tokenizer import load_tokenizer

log = logging.getLogger("ray.serve")


def output_dict(out) -> dict[str, Any]:
    d = dataclasses.asdict(out)
    d["new_logprobs"] = [dataclasses.asdict(lp) for lp in out.new_logprobs]
    return d


class Router:
    def __init__(
        self,
        settings: dict[str, Any],
        shards: list[Any],
        expert_groups: list[list[int]],
        num_threads: int | None,
    ):
        self.settings = s = RaymixSettings(**settings)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.shards = shards
        self.expert_groups = expert_groups
        self.model_dir = s.model_dir()
        self.cfg = MixtralConfig.from_pretrained(self.model_dir)
        self.device = pick_device("auto")
        self.backend = (
            s.data_plane if s.data_plane != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        )
        self.timeout = datetime.timedelta(seconds=s.data_plane_timeout_s)
        self.engine = AsyncEngine(self._build_engine, name="router-engine")

    def _build_engine(self) -> LLMEngine:
        s, cfg = self.settings, self.cfg
        start = time.perf_counter()
        dtype = pick_dtype(s.dtype, cfg, self.device)
        model = MixtralDense.from_checkpoint(CheckpointReader(self.model_dir), cfg, dtype, self.device)
        tokenizer = load_tokenizer(self.model_dir, s.tokenizer_mode)
        experts = self._connect_shards()
        log.info(
            "router ready in %.1fs: dense part on %s, %d shards over %s",
            time.perf_counter() - start,
            self.device,
            len(self.shards),
            self.backend,
        )
        return LLMEngine(cfg, model, experts, s.engine_config(), tokenizer)

    def _connect_shards(self) -> RemoteExperts:
        """Open the rendezvous store, ask every shard to join its pair group, join ours."""
        import ray

        infos = [h.info.remote().result() for h in self.shards]
        here = ray.get_runtime_context().get_node_id()
        same_node = all(i["node_id"] == here for i in infos)
        host = "127.0.0.1" if same_node else ray.util.get_node_ip_address()
        generation = uuid.uuid4().hex[:8]
        if same_node:  # nothing listens on the network: a FileStore in a fresh directory
            self._store_dir = tempfile.mkdtemp(prefix="raymix-store-")
            url = f"file://{os.path.join(self._store_dir, 'store')}"
        else:
            url = f"tcp://{host}:{_free_port()}"
        store = open_store(url, is_master=True, timeout=self.timeout)
        rdvs = [
            Rendezvous(
                url, f"shard{k}/{generation}/", self.backend, "127.0.0.1" if same_node else info["node_ip"]
            )
            for k, info in enumerate(infos)
        ]
        pending = [h.connect.remote(dataclasses.asdict(r)) for h, r in zip(self.shards, rdvs, strict=True)]
        links = [ShardLink(store, r, self.device, self.timeout, host) for r in rdvs]
        for p in pending:
            p.result()
        self._store = store
        expert_to_shard = torch.empty(self.cfg.num_local_experts, dtype=torch.long)
        for k, group in enumerate(self.expert_groups):
            expert_to_shard[group] = k
        log.info("data plane up: %d shards, %s via %s", len(links), self.backend, url.split("://")[0])
        return RemoteExperts(
            links, expert_to_shard, self.cfg.hidden_size, comm_device(self.backend, self.device)
        )

    # ---- called by the ingress ----

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream a request's outputs. A request the engine refuses yields one {"error": ...}."""
        params = SamplingParams(**request["params"])
        try:
            async for out in self.engine.generate(request["request_id"], request["prompt_token_ids"], params):
                yield output_dict(out)
        except RequestError as e:
            yield {"error": {"message": e.message, "param": e.param, "code": e.code}}

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def stats(self) -> dict[str, Any]:
        return {
            **self.engine.stats,
            "ready": self.engine.ready.is_set() and self.engine.error is None,
            "steps": self.engine.steps,
            "step_seconds": self.engine.step_seconds,
        }

    async def model_info(self) -> dict[str, Any]:
        self.engine.ready.wait(timeout=0)
        eng = self.engine.engine
        return {"max_model_len": eng.max_model_len if eng else None, "ready": eng is not None}

    def check_health(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"router engine failed to start: {self.engine.error}")
        if not self.engine.alive:
            raise RuntimeError("router engine loop stopped")

    def __del__(self):
        with contextlib.suppress(Exception):
            self.engine.stop(timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
