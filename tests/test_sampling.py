"""Sampling per request: seeds, the filters, penalties, stops, limits and logprobs."""

from __future__ import annotations

import pytest
import torch

from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.errors import RequestError
from moe.sampling import SamplingParams, draw, filter_probs, process_logits


@pytest.fixture(scope="module")
def eng(tiny_dir):
    return LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=256))


@pytest.fixture(scope="module")
def prompt(eng):
    return eng.tokenizer.encode("Tell me a story about a dragon")


def run(eng, prompt, **kw):
    (seq,) = eng.generate([prompt], SamplingParams(**kw))
    return seq


def test_same_seed_same_tokens_different_seeds_differ(eng, prompt):
    a = run(eng, prompt, max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    b = run(eng, prompt, max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    c = run(eng, prompt, max_tokens=16, temperature=1.0, seed=124, ignore_eos=True)
    assert a.output_token_ids == b.output_token_ids
    assert a.output_token_ids != c.output_token_ids


def test_seed_is_independent_of_batch_neighbours(eng, prompt):
    alone = run(eng, prompt, max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    others = [eng.tokenizer.encode(t) for t in ["noise one", "noise two three"]]
    seqs = eng.generate(
        [*others, prompt],
        [
            SamplingParams(max_tokens=12, temperature=1.0),
            SamplingParams(max_tokens=5, temperature=1.0),
            SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True),
        ],
    )
    assert seqs[-1].output_token_ids == alone.output_token_ids


def test_top_k_1_is_greedy(eng, prompt):
    greedy = run(eng, prompt, max_tokens=10, temperature=0.0, ignore_eos=True)
    topk1 = run(eng, prompt, max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True)
    tiny_top_p = run(eng, prompt, max_tokens=10, temperature=1.5, top_p=1e-6, ignore_eos=True)
    assert topk1.output_token_ids == greedy.output_token_ids == tiny_top_p.output_token_ids


def sample_one(logits: torch.Tensor, p: SamplingParams, g: torch.Generator) -> int:
    """The obvious one-row sampler: softmax at the temperature, the filters, one draw."""
    return draw(filter_probs(torch.softmax(logits / p.temperature, -1), p)[None], [g])[0]


def test_filters_keep_only_allowed_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, generator=g) * 3
    top5 = set(torch.topk(logits, 5).indices.tolist())
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    nucleus = set(order[: int((torch.cumsum(probs[order], 0) < 0.5).sum()) + 1].tolist())
    above = set((probs >= 0.2 * probs.max()).nonzero().squeeze(-1).tolist())
    for _ in range(200):
        assert sample_one(logits, SamplingParams(top_k=5), g) in top5
        assert sample_one(logits, SamplingParams(top_p=0.5), g) in nucleus
        assert sample_one(logits, SamplingParams(min_p=0.2), g) in above


def test_fast_draw_follows_the_distribution():
    """The fast draw against its definition: frequencies over 40000 draws match the
    probabilities (and torch.multinomial's), and a zero-probability token never comes up."""
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 40000
    fast = torch.bincount(torch.tensor(draw(probs.expand(n, -1).clone(), [None] * n)), minlength=5) / n
    slow = torch.bincount(torch.multinomial(probs, n, replacement=True), minlength=5) / n
    torch.testing.assert_close(fast, probs, atol=0.01, rtol=0)
    torch.testing.assert_close(fast, slow, atol=0.015, rtol=0)
    assert fast[4] == 0


def test_penalties_match_their_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    prompt, output = [0], [3, 3, 1]
    p = SamplingParams(repetition_penalty=2.0)
    assert process_logits(logits, p, prompt, output, []).tolist() == [1.0, -2.0, 0.5, 1.5, -2.0]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # token 3 seen twice: 3 - 0.5 - 0.5; token 1 once: -1 - 0.5 - 0.25; the prompt does not count
    assert process_logits(logits, p, prompt, output, []).tolist() == [2.0, -1.75, 0.5, 2.0, -2.0]
    p = SamplingParams(logit_bias={4: 100.0})
    assert int(process_logits(logits, p, prompt, output, []).argmax()) == 4


def test_logit_bias_forces_a_token(eng, prompt):
    seq = run(eng, prompt, max_tokens=5, temperature=0.0, logit_bias={1234: 100.0})
    assert seq.output_token_ids == [1234] * 5


def test_min_tokens_and_eos(eng, prompt):
    eos = eng.tokenizer.eos_token_id
    # EOS is strongly favoured, yet cannot end the request before min_tokens
    seq = run(eng, prompt, max_tokens=10, temperature=0.0, logit_bias={eos: 100.0}, min_tokens=4)
    assert seq.output_token_ids[:4] != [eos] * 4 and eos not in seq.output_token_ids[:4]
    assert seq.output_token_ids[-1] == eos and seq.num_output_tokens == 5
    assert seq.finish_reason == "stop"
    ignored = run(eng, prompt, max_tokens=6, temperature=0.0, logit_bias={eos: 100.0}, ignore_eos=True)
    assert ignored.output_token_ids == [eos] * 6 and ignored.finish_reason == "length"


def test_stop_token_ids_and_max_tokens(eng, prompt):
    greedy = run(eng, prompt, max_tokens=10, temperature=0.0, ignore_eos=True)
    target = greedy.output_token_ids[3]
    first = greedy.output_token_ids.index(target)
    seq = run(eng, prompt, max_tokens=10, temperature=0.0, stop_token_ids=[target], ignore_eos=True)
    assert seq.output_token_ids == greedy.output_token_ids[: first + 1]
    assert (seq.finish_reason, seq.stop_reason) == ("stop", target)
    assert greedy.finish_reason == "length" and greedy.num_output_tokens == 10


def test_stop_strings_cut_the_text_and_streaming_never_leaks_them(eng, prompt):
    greedy = run(eng, prompt, max_tokens=16, temperature=0.0, ignore_eos=True)
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    eng.add_request("s", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop]))
    streamed = ""
    while eng.has_unfinished():
        for out in eng.step():
            streamed += out.new_text
            assert stop not in streamed
            final = out
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert streamed == text[: text.index(stop)] == final.text


def test_logprobs(eng, prompt):
    seq = run(eng, prompt, max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    assert len(seq.logprobs) == 4
    for lp, tok in zip(seq.logprobs, seq.output_token_ids, strict=True):
        assert lp.token_id == tok
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy: the chosen one is the most likely
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.logprob <= 0 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {10**7: 1.0}}, "logit_bias"),
        ({"logprobs": 50}, "top_logprobs"),
    ],
)
def test_bad_params_name_the_parameter(eng, prompt, kw, param):
    with pytest.raises(RequestError) as e:
        eng.add_request("bad", prompt, SamplingParams(**kw))
    assert e.value.param == param
    assert not eng.has_unfinished()


def test_context_length_is_enforced(eng, prompt):
    with pytest.raises(RequestError, match="maximum context length is 256 tokens"):
        eng.add_request("long", prompt, SamplingParams(max_tokens=300))
