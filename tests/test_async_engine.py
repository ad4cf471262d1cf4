"""AsyncEngine: the engine thread driven from asyncio — streaming, coalescing, abort on cancel."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from moe.engine.async_engine import AsyncEngine, Sink
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.errors import RequestError
from moe.expert_parallel.backend import InProcessExperts
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
    assert slow[2] < 20 and fast[2] <= 20  # a reader slower than the steps gets merged deltas


def test_refused_request_raises_and_cancel_aborts(engine):
    with pytest.raises(RequestError):
        collect(engine, "bad", [1, 2, 3], SamplingParams(max_tokens=10_000))

    async def cancel_midway():
        gen = engine.generate("c", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()  # the caller goes away
        for _ in range(100):
            await asyncio.sleep(0.05)
            if engine.stats.num_used_kv_blocks == 0 and engine.stats.num_requests_running == 0:
                return True
        return False

    assert asyncio.run(cancel_midway())


class VersionedExperts(InProcessExperts):
    """Experts whose "placement" is a version number: every layer records the step it runs in
    and the version it routed by. When a change is coming (`armed`), the next step says at its
    layer 1 that it is under way (`in_step`) and waits up to `hold_s` for a change made from
    another thread (`switched`): the interleaving is forced, not left to timing."""

    def __init__(self, inner: InProcessExperts, hold_s: float):
        super().__init__(inner.shards, len(inner.placement.count))
        self.hold_s = hold_s
        self.version, self.step, self.seen = 0, 0, []
        self.armed, self.in_step, self.switched = threading.Event(), threading.Event(), threading.Event()

    def set_placement(self, version: int) -> None:
        self.version = version

    def submit(self, layer, x, expert_ids, weights):
        self.seen.append((self.step, self.version))
        if layer == 1 and self.armed.is_set():
            self.armed.clear()
            self.in_step.set()
            self.switched.wait(self.hold_s)
            self.switched.clear()
        return super().submit(layer, x, expert_ids, weights)


def steps_mixing_placements(tiny_dir, switch, hold_s: float) -> int:
    """Decode while the placement is changed 10 times, each while a step is at its layer 1, with
    `switch(engine, experts, v)`; → how many steps routed their layers by more than one."""

    def build() -> LLMEngine:
        eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=512))
        eng.experts = eng.runner.experts = VersionedExperts(eng.experts, hold_s)
        step = eng.step

        def counted():
            eng.experts.step += 1
            return step()

        eng.step = counted
        return eng

    engine = AsyncEngine(build)
    assert engine.ready.wait(60) and engine.error is None
    experts = engine.engine.experts
    try:

        async def changes() -> None:
            for v in range(1, 11):
                experts.armed.set()
                assert await asyncio.to_thread(experts.in_step.wait, 30)
                experts.in_step.clear()
                await switch(engine, experts, v)

        async def run() -> None:
            params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
            streams = [collect_async(engine, f"r{i}", [1, 2, 3 + i], params) for i in range(4)]
            await asyncio.gather(changes(), *streams)

        asyncio.run(run())
        by_step: dict[int, set[int]] = {}
        for step, version in experts.seen:
            by_step.setdefault(step, set()).add(version)
        assert experts.version == 10  # every change was made
        return sum(len(versions) > 1 for versions in by_step.values())
    finally:
        engine.stop()


async def collect_async(engine, rid, prompt, params) -> None:
    async for _ in engine.generate(rid, prompt, params):
        pass


def test_placement_changes_apply_between_steps(tiny_dir):
    """Through the engine's inbox (what the placement controller does), a change of placement
    made while a step is under way waits for its end; made from another thread directly (as it
    was), it lands inside the step, whose later layers route by the new placement."""

    async def between_steps(engine, experts, v):
        await engine.between_steps(lambda eng: eng.experts.set_placement(v))

    async def cross_thread(engine, experts, v):
        experts.set_placement(v)
        experts.switched.set()

    # a change through the inbox never comes while the step waits: a short hold is enough to see
    # it does not; a direct one ends the hold as soon as it is made, however slow the machine
    assert steps_mixing_placements(tiny_dir, between_steps, hold_s=0.05) == 0
    assert (
        steps_mixing_placements(tiny_dir, cross_thread, hold_s=30) == 10
    )  # the control: each change mid-step


def test_what_comes_after_stop_is_answered_not_left_waiting(tiny_dir):
    """A command queued behind Stop in the same inbox batch gets an error, not silence: the
    engine is held inside a between-steps call while Stop and two more commands queue up."""
    from moe.engine.async_engine import EngineDeadError, Sink, Stop

    eng = AsyncEngine(lambda: LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=256)))
    assert eng.ready.wait(60) and eng.error is None
    held, release = threading.Event(), threading.Event()

    async def run() -> tuple[BaseException | None, object]:
        first = asyncio.ensure_future(eng.between_steps(lambda _: (held.set(), release.wait(10))))
        await asyncio.to_thread(held.wait, 10)
        eng._inbox.put(Stop())  # queued, not yet read
        after = asyncio.ensure_future(eng.between_steps(lambda _: None))
        sink = Sink()
        eng.add("late", [1, 2, 3], SamplingParams(max_tokens=2), sink)
        release.set()
        await first
        try:
            await asyncio.wait_for(after, 10)
            error = None
        except EngineDeadError as e:
            error = e
        ((_, item),) = sink.take_all(await asyncio.wait_for(sink.queue.get(), 10))
        return error, item

    error, item = asyncio.run(run())
    eng._thread.join(10)
    assert isinstance(error, EngineDeadError) and isinstance(item, EngineDeadError)


def test_grammars_compile_beside_the_engine_thread_and_a_costly_one_is_refused(tiny_dir):
    """Where the work runs, not how long it takes: every grammar is compiled on a compiler
    thread, never the engine's; a schema whose shortest answer has thousands of tokens (whose
    closing path once cost 0.4-0.66 s per token per sequence on the engine thread) is refused as
    response_format; an abort while compiling drops the request; and a request whose adding
    fails for any other reason fails alone while a stream beside it goes on. The grammar
    vocabulary is built at start on a compiler thread, before any request waits on it."""
    from moe.guided import json_grammar

    threads: list[str] = []
    vocabulary: list[str] = []  # the threads that built the grammar vocabulary
    compiling = threading.Event()  # cleared: a compile waits for it (the abort comes first)
    compiling.set()

    def build() -> LLMEngine:
        eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=256))
        compile_grammar = eng.compile_grammar

        def recorded(*args, **kwargs):
            threads.append(threading.current_thread().name)
            assert compiling.wait(30)
            return compile_grammar(*args, **kwargs)

        eng.compile_grammar = recorded  # type: ignore[method-assign]
        grammar_tokenizer = eng.grammar_tokenizer

        def built_where():
            if eng._grammar_tokenizer is None:
                vocabulary.append(threading.current_thread().name)
            return grammar_tokenizer()

        eng.grammar_tokenizer = built_where  # type: ignore[method-assign]
        return eng

    engine = AsyncEngine(build, name="engine-loop")
    assert engine.ready.wait(60) and engine.error is None
    try:
        for _ in range(600):  # no request yet: the vocabulary is built from the start
            if engine.engine is not None and engine.engine._grammar_tokenizer is not None:
                break
            time.sleep(0.1)
        assert vocabulary and vocabulary[0].startswith("engine-loop-grammar"), vocabulary
        small = json_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
        text, _, _, last = collect(engine, "ok", [1, 2, 3], SamplingParams(max_tokens=40, grammar=small))
        assert last.finished and text.startswith("{")
        costly = json_grammar({"type": "string", "pattern": "^[~!]{3000}$"})
        with pytest.raises(RequestError) as refused:
            collect(engine, "costly", [1, 2, 3], SamplingParams(max_tokens=3100, grammar=costly))
        assert refused.value.param == "response_format"
        assert threads and all(t.startswith("engine-loop-grammar") for t in threads), threads

        async def abort_while_compiling() -> int:
            sink = Sink()
            compiling.clear()
            engine.add("gone", [1, 2, 3], SamplingParams(max_tokens=5, grammar=small), sink)
            engine.abort("gone")
            compiling.set()
            for _ in range(3000):  # the compile has ended (it takes itself off the list)
                if "gone" not in engine._compiling:
                    break
                await asyncio.sleep(0.01)
            # a request through the inbox after it: whatever the compile sent was handled before
            await collect_async(engine, "after", [1, 2, 3], SamplingParams(max_tokens=2))
            return sink.queue.qsize()

        assert asyncio.run(abort_while_compiling()) == 0 and "gone" not in engine.engine.seqs

        broken = SamplingParams(max_tokens=5)
        broken.validate = None  # type: ignore[method-assign,assignment]  # add_request calls it: a TypeError

        async def one_fails_alone():
            params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
            beside = asyncio.ensure_future(collect_async_tokens(engine, "beside", [1, 2, 3], params))
            with pytest.raises(TypeError):
                async for _ in engine.generate("broken", [1, 2, 3], broken):
                    pass
            return await beside

        assert len(asyncio.run(one_fails_alone())) == 30 and engine.alive
    finally:
        engine.stop()


async def collect_async_tokens(engine, rid, prompt, params) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(rid, prompt, params):
        tokens += out.new_token_ids
    return tokens


def test_a_request_failing_mid_stream_fails_alone(tiny_dir):
    """An exception while processing one request's token (its detokenizer, here made to fail on
    its fifth token) ends that request with the error; the stream beside it and the engine go
    on, and its KV blocks go back."""

    class Failing:
        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def add(self, token):
            self.n += 1
            if self.n == 5:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken tokenizer")
            return self.inner.add(token)

        def flush(self):
            return self.inner.flush()

    def build() -> LLMEngine:
        eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=256))
        add = eng.add_request

        def add_request(rid, prompt, params, matcher=None, *resumed):
            add(rid, prompt, params, matcher, *resumed)
            if rid == "bad":
                seq = eng.seqs[rid]
                seq.detokenizer = Failing(seq.detokenizer)

        eng.add_request = add_request  # type: ignore[method-assign]
        return eng

    engine = AsyncEngine(build)
    assert engine.ready.wait(60) and engine.error is None
    try:

        async def run():
            params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
            beside = asyncio.ensure_future(collect_async_tokens(engine, "good", [1, 2, 3], params))
            with pytest.raises(UnicodeDecodeError):
                await collect_async_tokens(engine, "bad", [1, 2, 4], params)
            return await beside

        assert len(asyncio.run(run())) == 30 and engine.alive
        assert engine.stats.num_used_kv_blocks == 0 or engine.engine.blocks.num_used_blocks == 0
    finally:
        engine.stop()
