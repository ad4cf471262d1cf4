"""ShardServer: the shard's end of the data plane, answering layer batches until told to stop."""

from __future__ import annotations

import datetime
import logging
import threading
import time

import torch

from moe.engine.allocator import keep_freed_memory
from moe.expert_parallel.rendezvous import (
    ROUTER,
    SHARD,
    Rendezvous,
    comm_device,
    open_store,
    pair_group,
)
from moe.expert_parallel.wire import (
    BODY_TAG,
    HEAD_TAG,
    HEADER_BYTES,
    PING,
    SHUTDOWN,
    body_bytes,
    check_header,
    decode,
)
from moe.layers.experts import LocalExperts

log = logging.getLogger(__name__)


class ShardServer:
    """The shard's end: connects to the router, then answers layer batches until told to stop."""

    def __init__(
        self,
        experts: LocalExperts,
        rendezvous: Rendezvous,
        connect_timeout: datetime.timedelta,
        num_threads: int | None = None,
        compute: threading.Lock | None = None,  # shared by a shard's servers: one batch at a time
    ):
        self.compute = compute or threading.Lock()
        keep_freed_memory()  # this process's malloc keeps the layer batches' buffers (moe.engine.allocator)
        self.experts = experts
        self.num_threads = num_threads
        self.rendezvous = rendezvous
        self.connect_timeout = connect_timeout
        self.device = experts.device
        self.comm = comm_device(rendezvous.backend, self.device)
        self.batches_served = 0
        self.compute_seconds = 0.0  # expert compute, for the shard's own figures
        self.error: BaseException | None = None
        self.router_gone = False  # the link broke (the router died, restarted or left): it will connect anew
        self.computing = False
        self.thread: threading.Thread | None = None

    def connect(self) -> None:
        """Blocks until the router's end of the pair group is up."""
        r = self.rendezvous
        self.store = open_store(r.store, is_master=False, timeout=self.connect_timeout)
        idle = datetime.timedelta(seconds=r.idle_timeout_s)
        self.pg = pair_group(self.store, r.prefix, SHARD, r.backend, idle, r.interface_host)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, name="expert-shard-data-plane", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _serve(self) -> None:
        if self.num_threads:  # OpenMP's thread count is per calling thread: set it in this one
            torch.set_num_threads(self.num_threads)
        hidden, k = self.experts.cfg.hidden_size, self.experts.cfg.num_experts_per_tok
        num_layers = self.experts.cfg.num_moe_layers
        dtype = self.experts.dtype
        size = HEADER_BYTES + body_bytes(self.rendezvous.inline, hidden, k, dtype)
        pin = self.device.type == "cuda" and self.comm.type == "cpu"
        # two standing receive buffers: one is read while the next batch arrives in the other.
        # NCCL runs a communicator's operations in order on one stream, so there the next
        # receive is posted only after the answer is sent (else the answer would wait on it).
        # inline 0 (NCCL, or gloo told to keep no standing receive) keeps that discipline.
        prepost = self.rendezvous.inline > 0
        bufs = [torch.empty(size, dtype=torch.uint8, device=self.comm, pin_memory=pin) for _ in range(2)]
        work, cur = self.pg.recv([bufs[0]], ROUTER, HEAD_TAG), 0
        try:
            while True:
                work.wait()
                buf = bufs[cur]
                op, layer, n, inline = buf[:HEADER_BYTES].view(torch.long).tolist()
                check_header(op, layer, n, inline, num_layers, self.rendezvous.inline)  # before sizing
                if op == SHUTDOWN:  # the router said goodbye; a new one may connect later
                    self.router_gone = True
                    return
                if op == PING:  # the router is idle, not gone: wait for its next message
                    cur = 1 - cur
                    work = self.pg.recv([bufs[cur]], ROUTER, HEAD_TAG)
                    continue
                if inline:
                    body = buf[HEADER_BYTES:]
                else:  # too big for the standing buffer: the body follows on its own
                    body = torch.empty(body_bytes(n, hidden, k, dtype), dtype=torch.uint8, device=self.comm)
                    self.pg.recv([body], ROUTER, BODY_TAG).wait()
                cur = 1 - cur
                if prepost:  # before computing this batch, so the next one finds it posted
                    work = self.pg.recv([bufs[cur]], ROUTER, HEAD_TAG)
                x, ids, weights = decode(body, n, hidden, k, dtype)
                start = time.perf_counter()
                x, ids, weights = x.to(self.device), ids.to(self.device), weights.to(self.device)
                self.computing = True  # an error from here on is this shard's own
                with self.compute, torch.inference_mode():
                    y = self.experts.partial(layer, x, ids.long(), weights)  # [n, H] float32
                self.computing = False
                self.compute_seconds += time.perf_counter() - start
                self.pg.send([y.to(self.comm)], ROUTER, 0).wait()
                if not prepost:
                    work = self.pg.recv([bufs[cur]], ROUTER, HEAD_TAG)
                self.batches_served += 1
        except BaseException as e:
            self.error = e
            # a transport error (the peer closed or reset the connection, a timeout) is the link's:
            # the experts are still good and the router connects anew; a compute error is ours
            self.router_gone = not self.computing
            (log.info if self.router_gone else log.error)("expert shard data plane stopped: %s", e)
