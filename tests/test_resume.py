"""A request resumed on another engine (its router died mid-stream; deployments.router_client
hands it on with the tokens already sent): the new engine takes those tokens as its own first
outputs and continues where the lost one was, without Ray. The tokens and text that follow are
the undisturbed run's: greedy, seeded sampling (the generator moved past the sent tokens'
draws), stop strings, logprobs, and structured output (the grammar advanced past them)."""

from __future__ import annotations

import json

import pytest

from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.errors import RequestError
from moe.guided import json_grammar
from moe.sampling import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["city", "n"],
}
CASES = {
    "greedy": SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
    "logprobs": SamplingParams(max_tokens=16, temperature=0.8, seed=3, logprobs=2, ignore_eos=True),
    "json": SamplingParams(max_tokens=40, temperature=1.0, seed=5, grammar=json_grammar(SCHEMA)),
    # text that might begin a stop string is held back: what was sent is less than the tokens' text
    "stop": SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=["never said at all"]),
}


@pytest.fixture(scope="module")
def engines(tiny_dir):
    cfg = EngineConfig(max_model_len=256)
    return LLMEngine.from_pretrained(tiny_dir, cfg), LLMEngine.from_pretrained(tiny_dir, cfg)


def outputs(
    eng: LLMEngine, rid: str, prompt: list[int], params: SamplingParams, resumed=None, text_len=None
) -> list:
    eng.add_request(rid, prompt, params, resumed=resumed, resumed_text_len=text_len)
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.request_id == rid]
    return outs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cut", [1, 5])
def test_a_resumed_request_continues_exactly_where_the_lost_one_was(engines, case, cut):
    first, second = engines
    params = CASES[case]
    prompt = first.tokenizer.encode("The weather in Paris, as JSON:")
    whole = outputs(first, f"{case}-{cut}", prompt, params)
    tokens = [t for o in whole for t in o.new_token_ids]
    text = "".join(o.new_text for o in whole)
    assert len(tokens) > cut
    delivered = []  # the outputs the client got before the router died: `cut` tokens
    while sum(len(o.new_token_ids) for o in delivered) < cut:
        delivered.append(whole[len(delivered)])
    assert sum(len(o.new_token_ids) for o in delivered) == cut
    sent = "".join(o.new_text for o in delivered)
    rest = outputs(second, f"{case}-{cut}", prompt, params, resumed=tokens[:cut], text_len=len(sent))
    assert [t for o in rest for t in o.new_token_ids] == tokens[cut:]
    assert sent + "".join(o.new_text for o in rest) == text  # no character repeated or missing
    if case == "stop":
        assert len(sent) < len(first.tokenizer.decode(tokens[:cut]))  # some was held back
    assert rest[-1].finished and rest[-1].finish_reason == whole[-1].finish_reason
    assert rest[-1].num_output_tokens == len(tokens) and rest[-1].num_prompt_tokens == len(prompt)
    if params.logprobs is not None:
        got = [lp for o in rest for lp in o.new_logprobs]
        want = [lp for o in whole for lp in o.new_logprobs][cut:]
        assert [g.token_id for g in got] == [w.token_id for w in want]
    if params.grammar is not None:
        assert set(json.loads(text)) == {"city", "n"}


def test_a_resumed_request_with_no_room_left_is_refused_and_prompt_scoring_is_not(engines):
    first, _ = engines
    with pytest.raises(RequestError):
        first.add_request("full", [1, 2, 3], SamplingParams(max_tokens=3), resumed=[5, 6, 7])
    # max_tokens 0 with prompt logprobs (lm-eval's scoring) is no resumed request
    (scored,) = first.generate([[1, 2, 3]], SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert scored.prompt_logprobs is not None and scored.num_output_tokens == 0
