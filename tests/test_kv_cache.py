"""Paged KV cache: decode with the cache equals a full recompute; blocks come back on finish,
abort and preemption; the batched slot computation equals a plain per-position loop."""

from __future__ import annotations

import pytest
import torch

from moe.config import ModelConfig
from moe.engine.kv_cache import KVCache
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.layers.attention import AttentionMetadata
from moe.sampling import SamplingParams
from tests.conftest import all_position_logits

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def test_cached_decode_equals_full_recompute(tiny_dir):
    eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=128, block_size=4))
    prompt = eng.tokenizer.encode("Decoding with a cache must not change a thing")
    eng.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0))
    seq = eng.seqs["r"]
    cached = []
    while eng.has_unfinished():
        eng.step()
        cached.append(seq.logprobs[-1].logprob)
    full_tokens = seq.token_ids[:-1]
    # Recompute from scratch: the whole sequence as one prefill, logits at every position.
    fresh = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=128, block_size=4))
    logp = torch.log_softmax(all_position_logits(fresh, full_tokens), -1)
    outs = seq.output_token_ids
    recomputed = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(outs)]
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(recomputed), rtol=1e-4, atol=1e-4)
    assert [int(logp[len(prompt) - 1 + i].argmax()) for i in range(len(outs))] == outs


def test_abort_frees_blocks(tiny_dir):
    eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=128, block_size=4))
    tok = eng.tokenizer
    eng.add_request("a", tok.encode("one two three four five six seven"), GREEDY)
    eng.add_request("b", tok.encode("eight nine"), GREEDY)
    eng.add_request("c", tok.encode("still waiting"), GREEDY)
    eng.step()
    eng.step()
    used = eng.blocks.num_used_blocks
    assert used > 0
    a_blocks = len(eng.blocks.tables["a"])
    assert eng.abort_request("a")
    assert eng.blocks.num_used_blocks == used - a_blocks
    assert not eng.abort_request("a")  # already gone
    eng.abort_request("b")
    eng.abort_request("c")
    assert eng.blocks.num_used_blocks == 0
    assert eng.stats().num_requests_running == 0 and eng.stats().num_requests_waiting == 0
    assert not eng.has_unfinished()


def test_preemption_under_a_small_cache_keeps_outputs(tiny_dir):
    """With too few KV blocks for all sequences, some are preempted and recomputed later;
    the outputs are the same as with a cache large enough for everyone."""
    prompts_text = ["alpha beta gamma delta", "one two three", "red green blue yellow", "x y z"]
    big = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=64, block_size=4))
    prompts = [big.tokenizer.encode(p) for p in prompts_text]
    small = LLMEngine.from_pretrained(
        tiny_dir, EngineConfig(max_model_len=64, block_size=4, num_kv_blocks=16)
    )
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    a = [s.output_token_ids for s in big.generate(prompts, params)]
    b = [s.output_token_ids for s in small.generate(prompts, params)]
    assert small.scheduler.num_preemptions > 0
    assert a == b
    assert small.blocks.num_used_blocks == 0


def test_slot_mapping_equals_per_position_reference():
    tables = [[3, 7, 1], [0], [5, 2]]
    ctx, new, bs = [10, 3, 5], [1, 3, 2], 4
    meta = AttentionMetadata.build(tables, ctx, new, bs, None, "cpu")

    def slot(t, p):
        return t[p // bs] * bs + p % bs

    expect_slots, expect_pos = [], []
    for t, c, n in zip(tables, ctx, new, strict=True):
        expect_pos += list(range(c - n, c))
        expect_slots += [slot(t, p) for p in range(c - n, c)]
    assert meta.positions.tolist() == expect_pos
    assert meta.slot_mapping.tolist() == expect_slots
    for b, (t, c) in enumerate(zip(tables, ctx, strict=True)):
        assert meta.kv_slots[b, :c].tolist() == [slot(t, p) for p in range(c)]
    # the (sequence, query) grid [B, Lq] = [3, 3] keeps row 0's one query and all of 1's, 2 of 2's
    assert meta.q_rows.tolist() == [0, 3, 4, 5, 6, 7]


def test_kv_cache_is_sized_from_the_gpu(monkeypatch):
    """On a GPU the cache takes what gpu_memory_utilization leaves after the weights (already
    loaded: in the free memory), the activations and the graphs; none left is a clear error."""
    from moe.engine.kv_cache import GRAPH_RESERVE_BYTES, activation_bytes, kv_cache_budget

    cfg = ModelConfig()  # Mixtral 8x7B's shapes
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    act = activation_bytes(cfg, 2048, 64, torch.bfloat16)
    assert 0 < act < 4 * gib
    budget = kv_cache_budget(cfg, torch.device("cuda"), torch.bfloat16, None, 0.9, 2048, 64)
    assert budget == int(60 * gib - 0.1 * 80 * gib - act - GRAPH_RESERVE_BYTES)
    assert kv_cache_budget(cfg, torch.device("cuda"), torch.bfloat16, 123, 0.9, 2048, 64) == 123  # as given
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (9 * gib, 80 * gib))
    with pytest.raises(ValueError, match=r"no GPU memory left for the KV cache.*gpu-memory-utilization"):
        kv_cache_budget(cfg, torch.device("cuda"), torch.bfloat16, None, 0.9, 2048, 64)


def test_max_model_len_that_does_not_fit_is_an_error_and_the_automatic_one_is_lowered(tiny_dir, caplog):
    small = 256 * KVCache.bytes_per_block(ModelConfig.from_pretrained(tiny_dir), 16, torch.float32) // 16
    with pytest.raises(ValueError, match=r"max_model_len 4096 does not fit: the KV cache holds 256 tokens"):
        LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=4096, kv_cache_memory_bytes=small))
    with caplog.at_level("WARNING"):
        eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(kv_cache_memory_bytes=small))
    assert eng.max_model_len == 256
    assert "max_model_len lowered from the model's 4096 to 256" in caplog.text and "needs" in caplog.text


def test_plan_sizes_the_routers_kv_cache_for_8x22b_at_64k():
    from cluster.capacity import MIXTRAL_8X22B, router_kv_tokens

    assert MIXTRAL_8X22B.max_position_embeddings == 65536
    tokens = router_kv_tokens(MIXTRAL_8X22B, 80e9)
    assert tokens >= 3 * 65536  # three whole 64k contexts on one 80 GB router GPU
    assert router_kv_tokens(MIXTRAL_8X22B, 80e9, gpu_memory_utilization=0.5) < tokens
