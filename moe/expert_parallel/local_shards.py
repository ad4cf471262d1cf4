"""Expert shards as processes this one spawns, without Ray: the data plane's shard end
(`ShardServer`) in each, the router's end (`RemoteExperts`) here. For the tests and benchmarks
of the data plane alone; in serving, Ray Serve starts the shards (deployments/shard.py).

On CUDA shard k uses GPU k mod the GPU count; a shard on the router's own GPU is reached over
gloo through pinned host memory (NCCL refuses two ranks on one device), the others over NCCL.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
from pathlib import Path

import torch

from moe.checkpoint.reader import CheckpointReader
from moe.config import ModelConfig
from moe.expert_parallel.placement import Placement, partition_experts
from moe.expert_parallel.remote import RemoteExperts, ShardLink
from moe.expert_parallel.rendezvous import IDLE_TIMEOUT_S, Rendezvous, open_store
from moe.expert_parallel.server import ShardServer
from moe.expert_parallel.wire import INLINE_TOKENS
from moe.layers.experts import LocalExperts


def serve_shard(
    model_dir: str,
    expert_ids: list[int],
    rendezvous: Rendezvous,
    device: str,
    dtype: str,
    threads: int,
    timeout: datetime.timedelta,
) -> None:
    """One shard's process: load its experts, connect, answer layer batches until told to stop."""
    torch.set_num_threads(threads)
    cfg = ModelConfig.from_pretrained(model_dir)
    experts = LocalExperts.from_checkpoint(
        CheckpointReader(model_dir), cfg, expert_ids, getattr(torch, dtype), torch.device(device)
    )
    server = ShardServer(experts, rendezvous, timeout, threads)
    server.connect()
    server.start()
    assert server.thread is not None
    server.thread.join()


class LocalShards:
    """N shard processes holding the experts split evenly, and `experts`, the RemoteExperts
    that reaches them from this process (on `device`)."""

    def __init__(
        self,
        model_dir: str | Path,
        num_shards: int,
        device: torch.device = torch.device("cpu"),
        dtype: str = "float32",
        threads: int = 1,  # torch threads per shard
        inline_tokens: int = INLINE_TOKENS,  # the shards' standing receive (0: NCCL's discipline)
        whole_batch: bool | None = None,  # RemoteExperts' dispatch (None: its default for the device)
        timeout: datetime.timedelta = datetime.timedelta(seconds=60),
        idle_timeout_s: float = IDLE_TIMEOUT_S,  # a shard's wait for this router's next message
    ):
        cfg = ModelConfig.from_pretrained(model_dir)
        groups = partition_experts(cfg.num_local_experts, num_shards)
        url = f"file://{os.path.join(tempfile.mkdtemp(prefix='raymix-shards-'), 'store')}"
        self.store = open_store(url, is_master=True, timeout=timeout)  # the shards read it until they connect
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        devices = [f"cuda:{k % gpus}" if gpus else "cpu" for k in range(num_shards)]
        here = f"cuda:{device.index or 0}"
        self.backends = ["nccl" if d.startswith("cuda") and d != here else "gloo" for d in devices]
        rdvs = [
            Rendezvous(
                url,
                f"shard{k}/",
                self.backends[k],
                inline_tokens=inline_tokens,
                idle_timeout_s=idle_timeout_s,
            )
            for k in range(num_shards)
        ]
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=serve_shard, args=(str(model_dir), g, r, d, dtype, threads, timeout))
            for g, r, d in zip(groups, rdvs, devices, strict=True)
        ]
        for p in self.procs:
            p.start()
        links = [ShardLink(self.store, r, device, timeout) for r in rdvs]
        self.experts = RemoteExperts(
            links, Placement.from_groups(groups), cfg.hidden_size, device, whole_batch=whole_batch
        )

    def close(self, timeout_s: float = 60) -> list[int | None]:
        """Say goodbye to the shards and wait for them → their exit codes."""
        self.experts.shutdown()
        for p in self.procs:
            p.join(timeout=timeout_s)
        return [p.exitcode for p in self.procs]
