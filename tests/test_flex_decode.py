"""Decode attention over the KV pages in place (moe.layers.flex_decode) against the dense gather it
replaces on GPUs (moe.layers.attention.DenseDecode, the reference): the same outputs for shuffled and
shared blocks, partial last blocks, padded rows and a sliding window, through FlexAttention's
reference path and through the kernel torch.compile makes of it (on CPU here, Triton on CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

from moe.config import ModelConfig
from moe.engine.kv_cache import KVCache
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.layers.attention import DenseDecode
from moe.layers.flex_decode import FlexDecode
from moe.sampling import SamplingParams
from tests.test_reference import PROMPTS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = ModelConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=1)
BLOCK = 16 if DEVICE == "cuda" else 4  # Triton's kernel takes pages of 16s; the CPU's any size


def step(generator: torch.Generator) -> tuple[list[list[int]], list[int]]:
    """Block tables and context lengths of five sequences over a 40-block cache: blocks shuffled,
    the last two sequences sharing their first two blocks (a cached prefix), last blocks partial."""
    free = torch.randperm(40, generator=generator).tolist()
    lens = [1, 4, 5, 17, 30]
    tables = []
    for n in lens:
        need = -(-n // BLOCK)
        tables.append([free.pop() for _ in range(need)])
    tables[4][:2] = tables[3][:2]
    return tables, lens


@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("compile", [False, True], ids=["reference", "compiled"])
def test_paged_decode_attention_equals_dense_gather(sliding_window, compile):
    g = torch.Generator().manual_seed(0)
    tables, lens = step(g)
    n, bsz, ctx = len(lens), 8, 32  # three padded rows; contexts bucketed to 32 for the gather
    hq, hkv, d = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.attn_head_dim
    cache = KVCache(CFG, 40, BLOCK, torch.float32, DEVICE)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    q = torch.randn(bsz, hq, d, generator=g).to(DEVICE)  # [B, Hq, D]
    k, v = (torch.randn(bsz, hkv, d, generator=g).to(DEVICE) for _ in range(2))  # [B, Hkv, D]
    positions = torch.tensor([c - 1 for c in lens] + [0] * (bsz - n), device=DEVICE)
    slots = [t[(c - 1) // BLOCK] * BLOCK + (c - 1) % BLOCK for t, c in zip(tables, lens, strict=True)]
    slot_mapping = torch.tensor(slots + [cache.scratch_slot] * (bsz - n), device=DEVICE)

    outs, caches = [], []
    for attention in (
        DenseDecode(cache, bsz, ctx, sliding_window),
        FlexDecode(cache, bsz, sliding_window, compile=compile),
    ):
        k_cache, v_cache = cache.k[0].clone(), cache.v[0].clone()
        attention.fill(tables, lens, bsz, ctx)
        meta = attention.metadata(positions, slot_mapping, bsz, ctx)
        outs.append(meta.attend(q, k, v, k_cache, v_cache)[:n])  # [n, Hq, D]
        caches.append((k_cache, v_cache))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(*caches, strict=True):  # the new K/V written to the same slots
        torch.testing.assert_close(a[: cache.scratch_slot], b[: cache.scratch_slot], rtol=0, atol=0)
    # the first sequence's one key is its own new one: its output is that token's value
    torch.testing.assert_close(outs[1][0], v[0].repeat_interleave(hq // hkv, 0))


def test_the_next_step_sees_the_new_tables():
    """The block mask is made once per batch bucket over static buffers: a later step with
    other tables and lengths gets its own answer (as a replayed graph would)."""
    g = torch.Generator().manual_seed(1)
    cache = KVCache(CFG, 40, BLOCK, torch.float32, DEVICE)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    flex, dense = FlexDecode(cache, 8, None, compile=False), DenseDecode(cache, 8, 32, None)
    q = torch.randn(8, CFG.num_attention_heads, CFG.attn_head_dim, generator=g).to(DEVICE)
    scratch = torch.full((8,), cache.scratch_slot, device=DEVICE)  # new K/V go to the scratch slot
    k_new = cache.k[0, scratch]  # [8, Hkv, D]: what the scratch slot holds already
    v_new = cache.v[0, scratch]
    answers = []
    for seed in (2, 3):
        tables, lens = step(torch.Generator().manual_seed(seed))
        outs = []
        for attention in (dense, flex):
            attention.fill(tables, lens, 8, 32)
            meta = attention.metadata(scratch, scratch, 8, 32)
            outs.append(meta.attend(q, k_new, v_new, cache.k[0].clone(), cache.v[0].clone())[:5])
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        answers.append(outs[1])
    assert not torch.allclose(answers[0], answers[1])
    assert len(flex.masks) == 1


def test_attention_backend_is_checked(tiny_dir):
    with pytest.raises(ValueError, match="attention_backend"):
        LLMEngine.from_pretrained(tiny_dir, EngineConfig(attention_backend="flash", cuda_graphs=True))
    eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(cuda_graphs=True, device="cpu"))
    assert eng.decode is not None
    assert eng.decode.attention_backend == "sdpa"  # auto: flex on CUDA only


# each model and each lane count once on the CPU (FlexAttention runs uncompiled there, slowly);
# every pair on a GPU
LANES = [("tiny_dir", True), ("other_dir", False)]
LANES += [("tiny_dir", False), ("other_dir", True)] if torch.cuda.is_available() else []


@pytest.mark.parametrize(
    ("model", "overlap"), LANES, ids=lambda v: {True: "two-micro-batches", False: "one-batch"}.get(v, v)
)
def test_eager_decode_steps_read_the_pages_in_place(request, model, overlap):
    """Without decode graphs (the router with remote shards; float32 on CUDA) decode-only steps
    take FlexAttention too, each micro-batch its own buffers: outputs token-identical to the
    gather, through continuous batching and (second model) a sliding window."""
    model_dir = request.getfixturevalue(model)
    kw = dict(max_model_len=256, block_size=8, cuda_graphs=False, overlap=overlap, device="cpu")
    gather = LLMEngine.from_pretrained(model_dir, EngineConfig(attention_backend="sdpa", **kw), num_shards=2)
    flex = LLMEngine.from_pretrained(model_dir, EngineConfig(attention_backend="flex", **kw), num_shards=2)
    assert flex.decode is not None and not flex.decode.graphs
    assert len(flex.decode.lanes) == (2 if overlap else 1)
    assert gather.decode is None  # no graphs, no FlexAttention: decode steps take the general path
    prompts = [gather.tokenizer.encode(p * 3) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    arrivals = [0, 0, 1, 4, 7]
    a = [s.output_token_ids for s in gather.generate(prompts, greedy, arrival_steps=arrivals)]
    b = [s.output_token_ids for s in flex.generate(prompts, greedy, arrival_steps=arrivals)]
    assert a == b
    assert all(lane.flex is not None and lane.flex.warm for lane in flex.decode.lanes)
    assert flex.decode.steps > 0 and not flex.decode.gather


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("no kernel for this GPU"),
        FailOnRecompileLimitHit("no kernel for this GPU"),
    ],
    ids=["inductor", "recompile-limit"],
)
def test_a_kernel_that_does_not_build_falls_back_to_the_gather(tiny_dir, caplog, error):
    config = EngineConfig(max_model_len=256, cuda_graphs=False, attention_backend="flex", device="cpu")
    eng = LLMEngine.from_pretrained(tiny_dir, config)
    ref = LLMEngine.from_pretrained(
        tiny_dir, EngineConfig(max_model_len=256, cuda_graphs=False, device="cpu")
    )

    def does_not_build(*args, **kwargs):
        raise error

    assert eng.decode is not None
    lane = eng.decode.lanes[0]
    assert lane.flex is not None
    lane.flex.attention = does_not_build
    lane.flex.warm.clear()  # as if start-up had not compiled them yet
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS[:3]]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with caplog.at_level("WARNING"):
        out = [s.output_token_ids for s in eng.generate(prompts, greedy)]
    assert out == [s.output_token_ids for s in ref.generate(prompts, greedy)]
    assert eng.decode.gather  # the buckets used fell back to the gather, for them only
    assert "FlexAttention failed (no kernel for this GPU)" in caplog.text
