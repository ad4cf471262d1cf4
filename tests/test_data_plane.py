"""The data plane without Ray: expert shards in spawned processes, reached over torch.distributed
pair groups, give the same results as the in-process experts."""

from __future__ import annotations

import pytest
import torch

from moe.checkpoint.reader import CheckpointReader
from moe.config import ModelConfig
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.expert_parallel.backend import InProcessExperts
from moe.expert_parallel.local_shards import LocalShards
from moe.models.transformer import DenseModel
from moe.sampling import SamplingParams
from moe.tokenizer import load_tokenizer


class SpawnedShards(LocalShards):
    """CPU shards for these tests: one thread each; closing checks they exited cleanly."""

    def close(self) -> list[int | None]:
        codes = super().close(timeout_s=30)
        assert codes == [0] * len(codes), codes
        return codes


@pytest.fixture(scope="module")
def remote(tiny_dir):
    shards = SpawnedShards(tiny_dir, 3)
    yield shards.experts
    shards.close()


@pytest.fixture(scope="module")
def remote_small_buffer(tiny_dir):
    """Shards whose standing receive holds 8 tokens: bigger batches send header and body apart."""
    shards = SpawnedShards(tiny_dir, 2, inline_tokens=8)
    yield shards.experts
    shards.close()


@pytest.fixture(scope="module")
def remote_exact(tiny_dir):
    """No standing receive (NCCL's discipline, here over gloo): every batch sends header and body
    apart, receives are exactly the message's size, and the shard posts its next receive only
    after its answer is sent."""
    shards = SpawnedShards(tiny_dir, 2, inline_tokens=0)
    yield shards.experts
    shards.close()


@pytest.fixture(scope="module")
def remote_whole(tiny_dir):
    """Every shard gets the whole layer batch (a GPU router's exchange, no host sync), with
    NCCL's exact sizes and order."""
    shards = SpawnedShards(tiny_dir, 3, inline_tokens=0, whole_batch=True)
    yield shards.experts
    shards.close()


def test_the_wire_carries_expert_ids_as_integers():
    """A layer batch encoded and decoded: ids int32 (the -1s too), weights float32, x in its dtype."""
    from moe.expert_parallel.placement import ShardBatch
    from moe.expert_parallel.wire import HEADER_BYTES, decode, encode

    x = torch.randn(5, 16, dtype=torch.bfloat16)
    b = ShardBatch(torch.tensor([4, 0, 2]), torch.tensor([[7, -1], [-1, 3], [1, 6]]), torch.rand(3, 2))
    msg = encode(9, x, b, inline=True, device=torch.device("cpu"))
    assert msg[:HEADER_BYTES].view(torch.long).tolist() == [1, 9, 3, 1]
    xs, ids, weights = decode(msg[HEADER_BYTES:], 3, 16, 2, torch.bfloat16)
    assert ids.dtype == torch.int32 and ids.tolist() == b.expert_ids.tolist()
    assert torch.equal(weights, b.weights) and torch.equal(xs, x[b.token_index])


@pytest.mark.parametrize(
    "transport",
    ["one message", "header and body apart", "exact sizes, in order", "whole batch to every shard"],
)
@pytest.mark.parametrize("tokens", [1, 17, 64])
def test_remote_layer_equals_in_process(
    tiny_dir, remote, remote_small_buffer, remote_exact, remote_whole, tokens, transport
):
    cfg = ModelConfig.from_pretrained(tiny_dir)
    local = InProcessExperts.from_checkpoint(CheckpointReader(tiny_dir), cfg, torch.float32)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    weights, ids = (
        torch.softmax(torch.randn(tokens, 2, generator=g), -1),
        torch.randint(0, 8, (tokens, 2), generator=g),
    )
    experts = {
        "one message": remote,
        "header and body apart": remote_small_buffer,
        "exact sizes, in order": remote_exact,
        "whole batch to every shard": remote_whole,
    }[transport]
    for layer in range(cfg.num_hidden_layers):
        torch.testing.assert_close(
            experts.forward(layer, x, ids, weights), local.forward(layer, x, ids, weights)
        )
        # a 1-token batch right after: the shard's standing receive is posted again after a big one
        torch.testing.assert_close(
            experts.forward(layer, x[:1], ids[:1], weights[:1]),
            local.forward(layer, x[:1], ids[:1], weights[:1]),
        )


@pytest.mark.parametrize(
    "exchange", ["standing receive", "exact sizes, in order", "whole batch to every shard"]
)
@pytest.mark.parametrize("overlap", [False, True])
def test_engine_over_remote_shards_is_token_identical(
    tiny_dir, remote, remote_exact, remote_whole, overlap, exchange
):
    """Also with two-micro-batch overlap: both micro-batches' layers are in flight at once (with
    NCCL's discipline too: the second micro-batch's batch waits in order behind the first)."""
    remote = {"standing receive": remote, "exact sizes, in order": remote_exact}.get(exchange, remote_whole)
    cfg = ModelConfig.from_pretrained(tiny_dir)
    dense = DenseModel.from_checkpoint(CheckpointReader(tiny_dir), cfg, torch.float32)
    tok = load_tokenizer(tiny_dir)
    eng = LLMEngine(cfg, dense, remote, EngineConfig(max_model_len=256, overlap=overlap), tok)
    ref = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=256))
    prompts = [tok.encode(t) for t in ["expert parallel", "over gloo pair groups", "a"]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    got = [s.output_token_ids for s in eng.generate(prompts, params, arrival_steps=[0, 1, 4])]
    assert got == [s.output_token_ids for s in ref.generate(prompts, params, arrival_steps=[0, 1, 4])]


def test_expert_load_recent_window_per_layer_and_shard():
    """What the expert view reads: over the recent window, tokens per (layer, expert) and the
    mean round trip per (shard, layer); the window forgets old batches (the totals do not) and
    starts over on reset."""
    from moe.expert_parallel.load import ExpertLoad

    load = ExpertLoad(2, torch.tensor([0, 0, 1, 1]), window=3)
    load.count(0, torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0, 0], [0, 1]]), 2)  # layer 0: two tokens
    load.count(1, torch.tensor([[3, 2]]), torch.tensor([[1, 1]]), 2)
    load.latency(0, 0, 0.002)
    load.latency(0, 0, 0.004)
    load.latency(1, 1, 0.010)
    snap = load.snapshot()
    assert snap.recent_expert_tokens == {0: [2, 1, 1, 0], 1: [0, 0, 1, 1]}
    assert snap.recent_dispatch_seconds == [{0: pytest.approx(0.003)}, {1: pytest.approx(0.010)}]
    for _ in range(3):  # three more layer-1 batches push layer 0's out of the window
        load.count(1, torch.tensor([[3, 3]]), torch.tensor([[1, 1]]), 2)
    snap = load.snapshot()
    assert snap.recent_expert_tokens == {1: [0, 0, 0, 6]}
    assert snap.expert_tokens == {0: [2, 1, 1, 0], 1: [0, 0, 1, 7]}
    load.reset_window()
    snap = load.snapshot()
    assert snap.recent_expert_tokens == {} and snap.recent_dispatch_seconds == [{}, {}]
    assert snap.balancedness == 1.0
    load.count(0, torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0, 0], [0, 1]]), 2)
    assert load.snapshot().balancedness == pytest.approx(2 / 3)  # shards got 3 and 1: mean 2, max 3


def test_a_shard_checks_the_header_it_reads_before_sizing_anything():
    """Layer, token count and inline flag come off the wire: a header out of range (a stray or
    hostile peer on the data plane's port) is refused before a buffer is sized from it."""
    from moe.expert_parallel.wire import FORWARD, MAX_TOKENS, SHUTDOWN, check_header

    check_header(FORWARD, 3, 100, 1, num_layers=4, standing=512)
    check_header(FORWARD, 0, 5000, 0, num_layers=4, standing=512)  # a big batch, its body apart
    check_header(SHUTDOWN, 0, 0, 0, num_layers=4, standing=512)
    for header in (
        (7, 0, 1, 1),  # unknown op
        (FORWARD, 4, 1, 1),  # no such MoE layer
        (FORWARD, -1, 1, 1),
        (FORWARD, 0, -5, 1),
        (FORWARD, 0, MAX_TOKENS + 1, 0),  # a body of terabytes
        (FORWARD, 0, 600, 1),  # inline, but larger than the standing receive
        (FORWARD, 0, 1, 2),
    ):
        with pytest.raises(ValueError, match="malformed layer batch"):
            check_header(*header, num_layers=4, standing=512)


def test_an_idle_router_keeps_its_links_and_a_silent_one_is_taken_for_gone(tiny_dir):
    """A shard waits idle_timeout_s (here 3 s) for its router's next message. A live router
    that is idle pings its links (RemoteExperts.keepalive, from the engine thread): past that
    time the shards still serve, with no reconnection. A router that goes silent (a half-open
    link: its process gone without a goodbye) is taken for gone: the shards stop waiting."""
    import time

    cfg = ModelConfig.from_pretrained(tiny_dir)
    dense = DenseModel.from_checkpoint(CheckpointReader(tiny_dir), cfg, torch.float32)
    tok = load_tokenizer(tiny_dir)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    shards = LocalShards(tiny_dir, 2, idle_timeout_s=3.0)
    try:
        eng = LLMEngine(cfg, dense, shards.experts, EngineConfig(max_model_len=128), tok)
        first = eng.generate([tok.encode("before the pause")], params)[0].output_token_ids
        end = time.monotonic() + 5.0  # idle past the shards' timeout, pinging
        while time.monotonic() < end:
            shards.experts.keepalive(0.5)
            time.sleep(0.25)
        again = eng.generate([tok.encode("before the pause")], params)[0].output_token_ids
        assert again == first and shards.experts.recoveries == 0
        assert all(p.is_alive() for p in shards.procs)
        for p in shards.procs:  # silent now: each shard stops waiting after its timeout
            p.join(timeout=30)
        assert [p.exitcode for p in shards.procs] == [0, 0]
    finally:
        for p in shards.procs:
            if p.is_alive():
                p.kill()


def test_the_rendezvous_store_listens_on_the_routers_interface_only():
    """Across nodes the router's TCPStore is the one listening socket of the rendezvous: it is
    bound to the interface it names (torch's own server would bind every interface, `::`), on a
    free port read back from the store, and a shard's client reaches it there."""
    import datetime

    import psutil

    from moe.expert_parallel.rendezvous import open_store

    timeout = datetime.timedelta(seconds=10)
    master = open_store("tcp://127.0.0.1:0", is_master=True, timeout=timeout)
    port = master.port
    listening = [
        c.laddr.ip
        for c in psutil.Process().net_connections("tcp")
        if c.status == "LISTEN" and c.laddr.port == port
    ]
    assert listening == ["127.0.0.1"]
    client = open_store(f"tcp://127.0.0.1:{port}", is_master=False, timeout=timeout)
    master.set("shard0/addr", "here")
    assert client.get("shard0/addr") == b"here"
