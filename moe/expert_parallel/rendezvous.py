"""Rendezvous: how a shard and a router find each other and open their pair group.

Each router-shard pair shares a two-rank torch.distributed process group of its own (gloo on
CPU, NCCL on GPU), rendezvoused through a store the router opens (a FileStore when every shard
shares the router's node, so nothing listens on the network; a TCPStore across nodes, listening
on the router's own interface only), under a key prefix of its own. One pair group per shard (rather than one world) keeps shards
independent: a restarted shard reconnects under a new prefix without touching the others.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe.expert_parallel.wire import INLINE_TOKENS

ROUTER, SHARD = 0, 1  # ranks in each pair group
# a shard waits this long for its router's next message; an idle router pings every
# KEEPALIVE_S, so silence this long means the router is gone (a half-open link): the shard
# drops the link (over NCCL its watchdog ends the process, which Serve restarts)
IDLE_TIMEOUT_S = 300.0
KEEPALIVE_S = 60.0


@dataclass(frozen=True)
class Rendezvous:
    """Where a shard finds the router: the store, this pair's key prefix, the transport."""

    store: str  # "file:///path" (same node) or "tcp://host:port"
    prefix: str
    backend: str  # "gloo" | "nccl"
    interface_host: str = "127.0.0.1"  # address gloo binds to on the shard's side
    inline_tokens: int = INLINE_TOKENS  # the shard's standing receive, in tokens (gloo; 0: none)
    router: int = 0  # which router (a shard serves every router over a pair group each)
    idle_timeout_s: float = IDLE_TIMEOUT_S  # the shard's wait for the next message

    @property
    def inline(self) -> int:
        """Tokens a batch may have to travel with its header: 0 over NCCL (exact sizes only)."""
        return self.inline_tokens if self.backend == "gloo" else 0


def open_store(url: str, is_master: bool, timeout: datetime.timedelta) -> dist.Store:
    """The store at `url`. The master of a "tcp://host:port" store listens on `host` only (port 0:
    any free one, read back from the store's `.port`), not on every interface as TCPStore's own
    server would: the socket is bound here and handed over."""
    if url.startswith("file://"):
        return dist.FileStore(url.removeprefix("file://"), -1)
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    host = host.strip("[]")
    if not is_master:
        return dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, int(port)), family=family)
    return dist.TCPStore(
        host,
        sock.getsockname()[1],
        is_master=True,
        wait_for_workers=False,
        timeout=timeout,
        master_listen_fd=sock.detach(),  # the store owns the bound socket from here
    )


def pair_group(
    store: dist.Store, prefix: str, rank: int, backend: str, timeout: datetime.timedelta, host: str
) -> Any:
    """A two-rank process group on its own key prefix (independent of any default group).
    gloo listens on `host` only (127.0.0.1 on one node)."""
    prefixed = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, nccl_opts)
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefixed, rank, 2, opts)


def comm_device(backend: str, device: torch.device) -> torch.device:
    return device if backend == "nccl" else torch.device("cpu")
