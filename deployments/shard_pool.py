"""ShardPool: the router's expert shards as processes: their handles and their data-plane links.

It opens the rendezvous store (a FileStore when every shard shares the router's node, so
nothing listens on the network; a TCPStore on this node's interface only across nodes), has each shard join a pair group of
its own with the router, and joins again when a shard's replica was replaced, retrying while
Serve restarts it. Each pair group uses the router's transport (NCCL between GPUs) except where
the shard shares the router's GPU (a cluster with fewer GPUs than processes): NCCL refuses two
ranks on one device, so that pair goes over gloo through pinned host buffers. What each shard should hold is the placement controller's to say
(`holding`): a replacement is given that back before its first layer batch.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from moe.expert_parallel.remote import ShardLink
from moe.expert_parallel.rendezvous import Rendezvous, open_store

log = logging.getLogger("ray.serve")
# no call to a shard waits forever (a hung replica fails the join, which is retried or reported)
CALL_TIMEOUT_S = 60.0  # a question (info)
LOAD_TIMEOUT_S = 900.0  # loading experts from the checkpoint


class ShardPool:
    def __init__(
        self,
        handles: list[Any],
        transport: str,  # "gloo" | "nccl"
        device: torch.device,
        timeout: datetime.timedelta,
        recovery_timeout_s: float,
        holding: Callable[[int], list[int]],
        router: int = 0,  # which router this pool belongs to (each router has its own links)
        shared: bool = False,  # other routers use the shards too
    ):
        self.router = router
        self.shared = shared
        self.handles = handles  # ExpertShard deployment handles, shard k at k
        self.base = len(handles)  # this app's own; more come from `raymix scale` (resize)
        self.transport = transport
        self.device = device
        self.timeout = timeout
        self.recovery_timeout_s = recovery_timeout_s
        self.holding = holding
        self.same_node = True
        self.host = "127.0.0.1"
        self.url = ""
        self.store: Any = None
        self.gpu: tuple[str, tuple[str, ...]] = ("", ())  # (node, GPU ids) of the router
        self.backends: dict[int, str] = {}  # the transport of each shard's pair group
        self._joining = threading.Lock()

    def __len__(self) -> int:
        return len(self.handles)

    def open(self) -> list[ShardLink]:
        """Open the rendezvous store, then have every shard join its pair group with us."""
        import ray

        infos = [h.info.remote().result(timeout_s=CALL_TIMEOUT_S) for h in self.handles]
        ctx = ray.get_runtime_context()
        here = ctx.get_node_id()
        self.gpu = (here, tuple(str(g) for g in ctx.get_accelerator_ids().get("GPU", [])))
        self.same_node = all(i.node_id == here for i in infos)
        self.host = "127.0.0.1" if self.same_node else ray.util.get_node_ip_address()
        if self.same_node:  # nothing listens on the network: a FileStore in a fresh directory
            self.url = f"file://{os.path.join(tempfile.mkdtemp(prefix='raymix-store-'), 'store')}"
        else:
            self.url = f"tcp://{self.host}:0"  # listening on this node's interface only
        self.store = open_store(self.url, is_master=True, timeout=self.timeout)
        if not self.same_node:
            self.url = f"tcp://{self.host}:{self.store.port}"
        links = [self.rejoin(k) for k in range(len(self.handles))]  # retried: shards may still be starting
        log.info(
            "data plane up: %d shards, %s via %s",
            len(links),
            [self.backends[k] for k in range(len(links))],
            self.url.split("://")[0],
        )
        return links

    def add(self, extra_apps: list[str], shard_deployment: str) -> None:
        """Shards beyond the app's own (`raymix scale`): one Serve application each."""
        from ray import serve

        for k, app in enumerate(extra_apps, start=self.base):
            if k >= len(self.handles):
                self.handles.append(serve.get_deployment_handle(shard_deployment, app_name=app))

    def truncate(self, num_shards: int) -> None:
        """Forget the extra shards past `num_shards` (never the app's own)."""
        del self.handles[max(num_shards, self.base) :]

    def rejoin(self, k: int) -> ShardLink:
        """Connect to shard k, retrying while its replica is (re)starting: at start-up, and after
        a shard failed (Serve replaces the replica; the new one is connected here)."""
        start = time.monotonic()
        deadline = start + self.recovery_timeout_s
        while True:
            try:
                with self._joining:  # the engine thread (a shard failed) and a resize both join
                    link = self._join(k)
                log.info("expert shard %d connected after %.1fs", k, time.monotonic() - start)
                return link
            except Exception as e:  # the old replica is still being replaced
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"expert shard {k} did not come back within the recovery timeout"
                    ) from e
                log.info("expert shard %d not back yet: %s", k, e)
                time.sleep(0.5)

    def _join(self, k: int) -> ShardLink:
        """Ask shard k (the replica Serve routes to) to join a fresh pair group, and join it."""
        handle = self.handles[k]
        info = handle.info.remote().result(timeout_s=CALL_TIMEOUT_S)
        held = self.holding(k)
        if self.shared:  # never drop what another router may route to: only add what is missing
            if set(held) - set(info.expert_ids):
                handle.set_experts.remote(sorted(set(held) | set(info.expert_ids))).result(
                    timeout_s=LOAD_TIMEOUT_S
                )
        elif sorted(info.expert_ids) != sorted(held):  # a replacement: give back what it held
            handle.set_experts.remote(held).result(timeout_s=LOAD_TIMEOUT_S)
        interface = "127.0.0.1" if self.same_node else info.node_ip
        backend = link_transport(self.transport, self.gpu, (info.node_id, tuple(info.gpu_ids)))
        self.backends[k] = backend
        rdv = Rendezvous(
            self.url, f"shard{k}/{uuid.uuid4().hex[:8]}/", backend, interface, router=self.router
        )
        pending = handle.connect.remote(rdv)
        link = ShardLink(self.store, rdv, self.device, self.timeout, self.host)
        pending.result(timeout_s=self.timeout.total_seconds())  # the join: the data plane's own timeout
        return link


def link_transport(
    preferred: str, router_gpu: tuple[str, tuple[str, ...]], shard_gpu: tuple[str, tuple[str, ...]]
) -> str:
    """The transport of one router-shard pair: `preferred`, except NCCL between two processes
    on the same GPU (same node, same device ids), which NCCL refuses: gloo there."""
    same_device = bool(router_gpu[1]) and router_gpu == shard_gpu
    return "gloo" if preferred == "nccl" and same_device else preferred
