"""ExpertShard: a Ray Serve deployment holding a subset of the experts of every layer.

It loads only its experts from the checkpoint (on its own GPU when the cluster has GPUs), then
waits for the routers to call `connect`: each router gets a pair group of its own
(moe.expert_parallel) and a data-plane thread that answers its layer batches. The threads take
turns computing (one lock): batches from several routers are computed one at a time, in the
order they come, on every core the shard has. Serve's health check fails if a thread has died
on the shard's side, so Serve restarts the replica.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time

import torch

from cluster.config import RaymixSettings
from cluster.messages import ShardInfo
from deployments.ray_metrics import RayGpuMemory
from moe.checkpoint.reader import open_checkpoint
from moe.engine.llm_engine import gpu_memory, pick_device, pick_dtype
from moe.expert_parallel.rendezvous import Rendezvous
from moe.expert_parallel.server import ShardServer
from moe.layers.cpu_gemm import kernel_for
from moe.layers.experts import LocalExperts

log = logging.getLogger("ray.serve")


class ExpertShard:
    def __init__(self, s: RaymixSettings, shard_id: int, expert_ids: list[int], num_threads: int | None):
        self.num_threads = num_threads
        if num_threads:
            torch.set_num_threads(num_threads)
        self.shard_id = shard_id
        self.expert_ids = expert_ids
        cfg, self.quant, self.reader = open_checkpoint(s.model_dir(), s.quantization)
        self.device = pick_device("auto")
        dtype = pick_dtype(s.dtype, cfg, self.device)
        start = time.perf_counter()
        gemm = kernel_for(s.cpu_gemm, self.device, dtype)
        self.experts = LocalExperts.from_checkpoint(
            self.reader, cfg, expert_ids, dtype, self.device, self.quant, gemm
        )
        log.info(
            "expert shard %d: experts %s of %d MoE layers loaded on %s in %.1fs (%s, %.2f GB)",
            shard_id,
            expert_ids,
            cfg.num_moe_layers,
            self.device,
            time.perf_counter() - start,
            self.quant.describe() if self.quant else dtype,
            self.experts.nbytes() / 1e9,
        )
        self.servers: dict[int, ShardServer] = {}  # router -> its data plane
        self.compute = threading.Lock()  # one layer batch at a time, whichever router sent it
        self.changing = threading.Lock()  # a new router link and a new expert set, one at a time
        self.connect_timeout = datetime.timedelta(seconds=s.data_plane_timeout_s)
        self.drain_timeout_s = s.drain_timeout_s
        self.gpu_memory: RayGpuMemory | None = None

    def connect(self, rendezvous: Rendezvous) -> None:
        """Join a router's pair group (blocks until both ends are up), then serve its batches;
        a router that connects again (its replacement) replaces its old link."""
        with self.changing:  # registered before it connects: set_experts cannot miss it
            server = ShardServer(
                self.experts, rendezvous, self.connect_timeout, self.num_threads, self.compute
            )
            self.servers[rendezvous.router] = server
        server.connect()
        server.start()

    def set_experts(self, expert_ids: list[int]) -> list[int]:
        """Hold exactly these experts from now on (hot-expert replication adds and drops
        replicas while serving): experts already held are kept, others read from the
        checkpoint; the data-plane thread picks the new set up at its next layer batch."""
        start = time.perf_counter()
        with self.changing:
            experts = self.experts.regroup(self.reader, sorted(expert_ids), self.quant)
            self.experts = experts
            for server in self.servers.values():
                server.experts = experts
        self.expert_ids = experts.expert_ids
        log.info(
            "expert shard %d now holds %s (%.2fs)",
            self.shard_id,
            self.expert_ids,
            time.perf_counter() - start,
        )
        return self.expert_ids

    def info(self) -> ShardInfo:
        import ray

        ctx = ray.get_runtime_context()
        servers = list(self.servers.values())  # a copy: a router may connect meanwhile
        return ShardInfo(
            shard_id=self.shard_id,
            expert_ids=self.expert_ids,
            num_parameters=self.experts.num_parameters(),
            nbytes=self.experts.nbytes(),
            tensors_read=len(self.reader.tensors_read),
            experts_read=sorted(
                {int(n.split(".experts.")[1].split(".")[0]) for n in self.reader.tensors_read}
            ),
            device=str(self.device),
            gpu_ids=[str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            node_id=ctx.get_node_id(),
            node_ip=ray.util.get_node_ip_address(),
            pid=os.getpid(),
            batches_served=sum(s.batches_served for s in servers),
            routers=sum(s.alive for s in servers),
        )

    def __del__(self) -> None:
        """Shutting down: serve layer batches until the router has drained its requests and said
        goodbye (or the drain timeout passes), so in-flight generations keep their experts."""
        deadline = time.monotonic() + self.drain_timeout_s + 10
        for server in list(self.servers.values()):
            if server.thread is not None:
                server.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def check_health(self) -> None:
        """Unhealthy only if the data plane broke on this side; a router that went away will
        connect again (its replacement calls `connect`), and the experts are still good. Serve
        calls it every few seconds: the shard's GPU memory is exported then."""
        if self.gpu_memory is None:
            self.gpu_memory = RayGpuMemory(f"expert_shard_{self.shard_id}")
        self.gpu_memory.set(gpu_memory(self.device))
        for router, s in list(self.servers.items()):
            if s.thread is not None and not s.alive and not s.router_gone:  # (None: still connecting)
                raise RuntimeError(
                    f"expert shard {self.shard_id}: data plane to router {router} stopped ({s.error})"
                )
