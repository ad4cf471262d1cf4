"""The engine against transformers' MixtralForCausalLM on the same checkpoint: token-identical
greedy generation under continuous batching, matching logits, and the expert-parallel invariant."""

from __future__ import annotations

import pytest
import torch

from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.sampling import SamplingParams
from tests.conftest import all_position_logits

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
    "a",
    "Mixture of experts models route each token to two of eight experts.",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]
ARRIVALS = [0, 0, 2, 5, 9]  # requests join the running batch at different steps
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def hf_greedy(hf, prompt, n):
    """transformers' greedy `generate` of exactly n tokens, eos ones included (as ignore_eos: its
    min_new_tokens would forbid the eos ids instead)."""
    eos, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
    try:
        out = hf.generate(torch.tensor([prompt], device=hf.device), max_new_tokens=n, do_sample=False)
    finally:
        hf.generation_config.eos_token_id = eos
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt) :].tolist()


def engine(path, num_shards=1, **kw):
    return LLMEngine.from_pretrained(path, EngineConfig(max_model_len=256, **kw), num_shards=num_shards)


def test_greedy_token_identical_with_continuous_batching(model_dir, hf_models):
    eng = engine(model_dir, block_size=8)
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    seqs = eng.generate(prompts, GREEDY, arrival_steps=ARRIVALS)
    hf = hf_models(model_dir)
    for prompt, seq in zip(prompts, seqs, strict=True):
        assert seq.output_token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
        assert seq.finish_reason == "length"
    assert eng.stats().num_used_kv_blocks == 0


def test_last_position_logits_match(model_dir, hf_models):
    eng = engine(model_dir)
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(max_tokens=1))
    scheduled = eng.scheduler.schedule()
    logits, _ = eng.runner.execute(scheduled)  # all prompts in one flat batch
    hf = hf_models(model_dir)
    for row, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([p], device=hf.device)).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_expert_parallel_split_gives_identical_outputs(tiny_dir, num_shards):
    prompts = None
    outs = {}
    for n in (1, num_shards):
        eng = engine(tiny_dir, num_shards=n)
        prompts = prompts or [eng.tokenizer.encode(p) for p in PROMPTS]
        outs[n] = [s.output_token_ids for s in eng.generate(prompts, GREEDY, arrival_steps=ARRIVALS)]
    assert outs[1] == outs[num_shards]


def test_two_micro_batch_overlap_matches(tiny_dir):
    """Splitting each step into two micro-batches changes nothing in the outputs."""
    base, overlapped = engine(tiny_dir), engine(tiny_dir, overlap=True)
    prompts = [base.tokenizer.encode(p) for p in PROMPTS]
    a = [s.output_token_ids for s in base.generate(prompts, GREEDY, arrival_steps=ARRIVALS)]
    b = [s.output_token_ids for s in overlapped.generate(prompts, GREEDY, arrival_steps=ARRIVALS)]
    assert a == b


def test_chunked_prefill_matches(tiny_dir):
    """A token budget smaller than a prompt splits its prefill over steps; outputs do not change."""
    base, chunked = engine(tiny_dir), engine(tiny_dir, max_num_batched_tokens=7)
    prompts = [base.tokenizer.encode(p) for p in PROMPTS]
    a = [s.output_token_ids for s in base.generate(prompts, GREEDY)]
    b = [s.output_token_ids for s in chunked.generate(prompts, GREEDY)]
    assert a == b


def test_bf16_is_as_faithful_to_fp32_as_transformers_bf16(model_dir, device):
    """Along the float32 greedy path of 12 prompts, raymix's bf16 logits stay as close to the
    float32 ones as transformers' bf16 logits do (float32 norms, router softmax and RoPE as
    transformers has them; the residual stream and the experts' weighted sum in float32 too),
    and pick the same greedy token at least as often."""
    from tests.conftest import hf_model

    fp32 = engine(model_dir, enable_prefix_caching=False)
    bf16 = engine(model_dir, dtype="bfloat16", enable_prefix_caching=False)
    hf = hf_model(model_dir, device, torch.bfloat16)
    prompts = [fp32.tokenizer.encode(p) for p in PROMPTS + [p.upper() for p in PROMPTS] + PROMPTS[:2]]
    paths = fp32.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    err = {"raymix": 0.0, "transformers": 0.0}
    agree = {"raymix": 0, "transformers": 0}
    for seq in paths:
        ids = seq.prompt_token_ids + seq.output_token_ids
        ref = all_position_logits(fp32, ids)
        with torch.no_grad():
            theirs = hf(torch.tensor([ids], device=device)).logits[0].float()
        for name, logits in (("raymix", all_position_logits(bf16, ids)), ("transformers", theirs)):
            err[name] += (logits - ref).abs().mean().item()
            agree[name] += int((logits.argmax(-1) == ref.argmax(-1)).sum())
    print(f"bf16 vs fp32 along the greedy path: mean |logit error| {err}, same argmax {agree}")
    assert err["raymix"] <= 1.05 * err["transformers"]
    assert agree["raymix"] >= agree["transformers"] - 2


@pytest.mark.parametrize("chunk", [None, 7])
def test_prompt_logprobs_match_transformers_log_softmax(model_dir, hf_models, chunk):
    """Prompt logprobs (echo; what lm-eval's log-likelihoods read) are transformers' log-softmax
    at every prompt position, also when the prefill is chunked over steps and when a prefix of
    the prompt is already in the prefix cache (a scored prompt is recomputed whole), with
    max_tokens 0 (the prompt only) and 1."""
    kw = {"max_num_batched_tokens": chunk} if chunk else {}
    eng = engine(model_dir, enable_prefix_caching=True, block_size=4, **kw)
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    eng.generate(prompts, SamplingParams(max_tokens=1))  # fills the prefix cache
    hf = hf_models(model_dir)
    params = [
        SamplingParams(max_tokens=i % 2, temperature=0.0, logprobs=2, prompt_logprobs=2) for i in range(5)
    ]
    for prompt, seq in zip(prompts, eng.generate(prompts, params), strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt], device=hf.device)).logits[0].float(), -1)
        lps = seq.prompt_logprobs
        assert lps is not None and len(lps) == len(prompt) and lps[0] is None
        got = torch.tensor([lp.logprob for lp in lps[1:]])  # type: ignore[union-attr]
        want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].cpu()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        for pos, lp in enumerate(lps[1:]):
            assert [t for t, _ in lp.top] == ref[pos].topk(2).indices.tolist()  # type: ignore[union-attr]
        assert len(seq.output_token_ids) == seq.params.max_tokens
