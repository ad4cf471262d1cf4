"""Decode steps through moe.engine.decode_path: the padded, static-buffer step equals the eager one.

On CPU the padded step runs without capture (the same code the graph records); on a GPU the
graphs are captured and replayed. Either way the outputs must not change."""

from __future__ import annotations

import pytest
import torch

from moe.engine.decode_path import batch_buckets, context_buckets, graphs_runnable
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.layers.attention import AttentionMetadata
from moe.sampling import SamplingParams
from tests.test_reference import PROMPTS

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(3) == [1, 2, 4]
    assert batch_buckets(100)[-1] == 112
    assert context_buckets(256) == [128, 256]
    assert context_buckets(300) == [128, 256, 512]


# each model and each attention once on the CPU (FlexAttention runs uncompiled there, slowly);
# every pair on a GPU
PAIRS = [("tiny_dir", "sdpa"), ("other_dir", "flex")]
PAIRS += [("tiny_dir", "flex"), ("other_dir", "sdpa")] if torch.cuda.is_available() else []


@pytest.mark.parametrize(("model", "attention"), PAIRS)
def test_greedy_outputs_identical_with_decode_graphs(request, model, attention):
    """Continuous batching (requests join mid-way, so decode steps of 1..5 sequences, padded to
    2, 4, 8) and contexts past a 128 bucket; the second model has a sliding window of 7. With
    either decode attention: the dense gather, or FlexAttention over the pages in place."""
    model_dir = request.getfixturevalue(model)
    kw = dict(max_model_len=256, block_size=16 if torch.cuda.is_available() else 8)  # flex on CUDA: 16s
    # the reference: eager steps over the dense gather (on CUDA auto would pick FlexAttention)
    eager = LLMEngine.from_pretrained(
        model_dir, EngineConfig(cuda_graphs=False, attention_backend="sdpa", **kw)
    )
    graphs = LLMEngine.from_pretrained(
        model_dir, EngineConfig(cuda_graphs=True, attention_backend=attention, **kw)
    )
    prompts = [eager.tokenizer.encode(p * 4) for p in PROMPTS]  # up to ~120 tokens + 40
    arrivals = [0, 0, 2, 5, 9]
    a = [s.output_token_ids for s in eager.generate(prompts, GREEDY, arrival_steps=arrivals)]
    b = [s.output_token_ids for s in graphs.generate(prompts, GREEDY, arrival_steps=arrivals)]
    assert a == b
    decode = graphs.decode
    assert decode is not None and decode.graphs and decode.steps >= GREEDY.max_tokens - 1
    assert decode.attention_backend == attention and not decode.gather  # no bucket fell back
    assert eager.decode is None
    assert graphs.blocks.num_used_blocks == 0


def decode_logits_both_ways(eng: LLMEngine) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill three prompts, then the next decode step's logits eagerly and through the
    graph runner twice (on a GPU: captured, then replayed)."""
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(str(i), eng.tokenizer.encode(p), SamplingParams(max_tokens=8, temperature=0.0))
    eng.step()  # prefill; each sequence now has a token not yet in the cache
    seqs = list(eng.seqs.values())
    tables = [eng.blocks.tables[s.request_id] for s in seqs]
    lens = [len(s) for s in seqs]
    meta = AttentionMetadata.build(
        tables, lens, [1] * 3, eng.blocks.block_size, eng.cfg.sliding_window, eng.device
    )
    ids = torch.tensor([s.token_ids[-1] for s in seqs], device=eng.device)
    eager = eng.model.compute_logits(eng.model([(ids, meta)], eng.kv_cache, eng.experts)[0])
    graphs = eng.decode
    assert graphs is not None and graphs.graphs
    first = graphs.run([s.token_ids[-1] for s in seqs], tables, lens)
    again = graphs.run([s.token_ids[-1] for s in seqs], tables, lens)
    return eager, first.clone(), again


@pytest.mark.parametrize("model", ["tiny", "deepseek_v3"])
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_padded_decode_step_logits_equal_eager(tiny_dir, family_dirs, attention, model):
    """Also for multi-head latent attention (DeepSeek-V3): the decode step reads the latent
    cache, keys of kv_lora_rank + qk_rope_head_dim and values its first kv_lora_rank."""
    config = EngineConfig(max_model_len=256, cuda_graphs=True, device="cpu", attention_backend=attention)
    eng = LLMEngine.from_pretrained(tiny_dir if model == "tiny" else family_dirs(model), config)
    eager, first, again = decode_logits_both_ways(eng)
    torch.testing.assert_close(first, eager)
    torch.testing.assert_close(again, eager)


@pytest.mark.skipif(
    not torch.cuda.is_available() or graphs_runnable(torch.device("cuda"), torch.bfloat16) is not None,
    reason="CUDA graphs need a GPU where the step captures: bf16 on SM90/SM100 (the CPU test runs the same step)",
)
def test_captured_decode_graph_replays_the_eager_step(tiny_dir):
    eng = LLMEngine.from_pretrained(
        tiny_dir, EngineConfig(max_model_len=256, dtype="bfloat16", device="cuda")
    )
    graphs = eng.decode
    assert graphs is not None and graphs.capture  # on by default for a bf16 model on SM90/SM100
    eager, first, again = decode_logits_both_ways(eng)
    assert graphs.cuda_graphs and not graphs.eager  # captured, not fallen back
    tol = dict(rtol=2e-2, atol=2e-2 * eager.abs().max().item())
    torch.testing.assert_close(first, eager, **tol)
    torch.testing.assert_close(again, first)  # a replay is the same computation
