"""A dead expert shard whose experts all have other holders costs no wait (RemoteExperts,
without Ray or processes: links faked over in-process experts). Its part of the layer goes to
the other holders at once, the following layers route around it, and its replacement is
connected on a thread of its own while the steps go on, then routed to again. A shard holding
an expert nobody else holds is still waited for, as before. Outputs equal one holder of every
expert's, throughout."""

from __future__ import annotations

import threading

import pytest
import torch

from moe.checkpoint.reader import CheckpointReader
from moe.config import ModelConfig
from moe.expert_parallel.backend import InProcessExperts
from moe.expert_parallel.placement import Placement
from moe.expert_parallel.remote import RemoteExperts
from moe.layers.experts import LocalExperts


class Work:
    def __init__(self, fill=None, dead: bool = False):
        self.fill, self.dead = fill, dead

    def wait(self, timeout=None) -> None:
        if self.dead:
            raise RuntimeError("Connection closed by peer")
        if self.fill is not None:
            self.fill()


class FakeLink:
    """A shard's link computing in this process; `dead`: its process is gone (waits fail)."""

    def __init__(self, experts: LocalExperts):
        self.experts, self.dead, self.sends = experts, False, 0
        self.device = torch.device("cpu")
        self.last_sent = 0.0
        self.answers: list[torch.Tensor] = []
        self.recvs = 0

    def send(self, layer, x, b):
        self.sends += 1
        if not self.dead:
            self.answers.append(self.experts.partial(layer, x[b.token_index], b.expert_ids, b.weights))
        return [Work(dead=self.dead)]

    def recv(self, y):
        """As gloo matches them: the n-th receive posted gets the n-th answer, whatever the
        order they are waited in."""
        n = self.recvs
        self.recvs += 1
        return Work(lambda: y.copy_(self.answers[n]), dead=self.dead)

    def wait(self, work) -> None:
        work.wait()


@pytest.fixture(scope="module")
def model(tiny_dir):
    cfg = ModelConfig.from_pretrained(tiny_dir)
    reader = CheckpointReader(tiny_dir)
    return cfg, reader, InProcessExperts.from_checkpoint(reader, cfg, torch.float32)


def setup(model, groups):
    cfg, reader, _ = model
    links = [FakeLink(LocalExperts.from_checkpoint(reader, cfg, g, torch.float32)) for g in groups]
    replaced = threading.Event()  # the replacement is up only when the test says so
    calls: list[str] = []

    def reconnect(k: int) -> FakeLink:
        calls.append(threading.current_thread().name)
        assert replaced.wait(30)
        return FakeLink(LocalExperts.from_checkpoint(reader, cfg, groups[k], torch.float32))

    placement = Placement.from_groups(groups, cfg.num_local_experts)
    remote = RemoteExperts(
        links, placement, cfg.hidden_size, torch.device("cpu"), reconnect, whole_batch=False
    )
    return links, remote, replaced, calls


def batch(cfg, seed: int, tokens: int = 24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    return (
        x,
        torch.randint(0, 8, (tokens, 2), generator=g),
        torch.softmax(torch.randn(tokens, 2, generator=g), -1),
    )


def test_a_dead_shard_with_every_expert_replicated_costs_no_wait(model):
    cfg, _, whole = model
    groups = [[e for e in range(8) if s in (e % 3, (e + 1) % 3)] for s in range(3)]  # each expert on 2
    links, remote, replaced, calls = setup(model, groups)
    x, ids, w = batch(cfg, 0)
    torch.testing.assert_close(remote.forward(0, x, ids, w), whole.forward(0, x, ids, w))
    links[1].dead = True  # SIGKILLed: the next exchange with it fails
    sent = links[1].sends
    for layer in range(cfg.num_moe_layers):  # no wait: the replacement is not up during these
        torch.testing.assert_close(remote.forward(layer, x, ids, w), whole.forward(layer, x, ids, w))
    assert remote.failovers == 1 and remote.down == {1} and links[1].sends == sent + 1  # routed around after
    assert calls and calls[0].startswith("replace-shard-1")  # connected on its own thread
    replaced.set()
    for _ in range(200):
        if remote.replaced:
            break
        threading.Event().wait(0.01)
    x, ids, w = batch(cfg, 1)
    torch.testing.assert_close(remote.forward(1, x, ids, w), whole.forward(1, x, ids, w))
    assert remote.down == set() and remote.links[1] is not links[1] and remote.links[1].sends > 0
    assert remote.recoveries == remote.failovers == 1 and remote.waits == 0  # replaced, nothing waited


def test_a_dead_shard_holding_an_expert_alone_is_waited_for(model):
    cfg, _, whole = model
    groups = [[0, 1, 2], [3, 4, 5], [6, 7]]  # no replicas
    links, remote, replaced, calls = setup(model, groups)
    replaced.set()
    links[1].dead = True
    x, ids, w = batch(cfg, 2)
    torch.testing.assert_close(remote.forward(0, x, ids, w), whole.forward(0, x, ids, w))
    assert remote.failovers == 0 and remote.recoveries == remote.waits == 1
    assert calls == [threading.current_thread().name]  # the step itself waited for it
