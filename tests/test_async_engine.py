"""AsyncEngine: the engine thread driven from asyncio — streaming, coalescing, abort on cancel."""

from __future__ import annotations

import asyncio

import pytest

from moe.async_engine import AsyncEngine
from moe.engine import EngineConfig, LLMEngine
from moe.errors import RequestError
from moe.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = AsyncEngine(lambda: LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=256)))
    assert eng.ready.wait(60) and eng.error is None
    yield eng
    eng.stop()


def collect(engine, rid, prompt, params, slow=0.0):
    async def run():
        text, tokens, items = "", [], 0
        async for out in engine.generate(rid, prompt, params):
            text += out.new_text
            tokens += out.new_token_ids
            items += 1
            await asyncio.sleep(slow)
        return text, tokens, items, out

    return asyncio.run(run())


def test_streamed_deltas_add_up_to_the_sync_result(engine, tiny_dir):
    ref = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=256))
    prompt = ref.tokenizer.encode("streaming through a thread")
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    (seq,) = ref.generate([prompt], params)
    fast = collect(engine, "fast", prompt, params)
    slow = collect(engine, "slow", prompt, params, slow=0.05)  # a slow reader gets merged deltas
    for text, tokens, _, last in (fast, slow):
        assert tokens == seq.output_token_ids and text == seq.text
        assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 20
    assert slow[2] < fast[2] == 20


def test_refused_request_raises_and_cancel_aborts(engine):
    with pytest.raises(RequestError):
        collect(engine, "bad", [1, 2, 3], SamplingParams(max_tokens=10_000))

    async def cancel_midway():
        gen = engine.generate("c", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()  # the caller goes away
        for _ in range(100):
            await asyncio.sleep(0.05)
            if engine.stats["num_used_kv_blocks"] == 0 and engine.stats["num_requests_running"] == 0:
                return True
        return False

    assert asyncio.run(cancel_midway())
