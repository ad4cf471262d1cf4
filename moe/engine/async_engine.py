"""AsyncEngine: the engine on its own thread, driven from asyncio.

The engine is single-threaded and its step blocks (attention, then the experts' round trips),
so it runs in a dedicated thread (as vLLM's AsyncLLMEngine runs its loop). Callers on an event
loop add requests with a `Sink`: an asyncio queue that receives, once per engine step, the list
of `(request_id, output or error)` of all its requests that produced something. A sink can
serve one request (`generate`, the per-request stream) or many (the router gives each ingress
replica one sink, so a step costs one message per ingress, not one per request).

A request that is aborted — a client gone, a cancelled task — is dropped at the next step,
which frees its KV blocks. If a step fails, every request in it gets the error and is aborted,
and the loop goes on serving new requests.

Everything reaches the engine thread through one inbox of typed commands (`AddRequest`,
`AbortRequest`, `BetweenSteps`, `Stop`), applied between steps, as vLLM's engine core takes its
typed requests. `between_steps(fn)` is how the rest of the process changes what the engine
uses, its expert placement above all: fn runs on the engine thread when no step is in flight,
so no step ever sees two placements, and the caller awaits its result. A request with a grammar
is compiled first on a compiler thread beside the engine's, then added: a costly grammar delays
its own request, never a step. An exception from one request fails that request alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from moe.engine.llm_engine import EngineStats, LLMEngine
from moe.engine.sequence import RequestOutput
from moe.errors import RequestError
from moe.expert_parallel.rendezvous import KEEPALIVE_S
from moe.guided import GrammarMatcher
from moe.sampling import SamplingParams

log = logging.getLogger(__name__)
KEEPALIVE_CHECK_S = 1.0  # how often the engine thread looks for idle data-plane links

Item = RequestOutput | BaseException


class EngineDeadError(RuntimeError):
    pass


class Sink:
    """Where a group of requests' outputs go: a queue of per-step batches on the caller's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[tuple[str, Item]]] = asyncio.Queue()

    def put(self, batch: list[tuple[str, Item]]) -> None:  # from the engine thread
        self.deliver(self.queue.put_nowait, batch)

    def deliver(self, callback: Callable[[Any], None], value: Any) -> None:
        """Run `callback(value)` on the caller's loop; a loop that is gone takes nothing."""
        with contextlib.suppress(RuntimeError):  # the loop was closed: its reader left
            self.loop.call_soon_threadsafe(callback, value)

    def take_all(self, first: list[tuple[str, Item]]) -> list[tuple[str, Item]]:
        """`first` plus every batch already waiting, outputs of one request merged into one."""
        items = list(first)
        while not self.queue.empty():
            items += self.queue.get_nowait()
        merged: dict[str, Item] = {}
        for rid, item in items:
            prev = merged.get(rid)
            if isinstance(prev, RequestOutput) and isinstance(item, RequestOutput):
                item = prev.merge(item)
            elif isinstance(prev, BaseException):
                item = prev
            merged[rid] = item
        return list(merged.items())


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: Sink
    matcher: GrammarMatcher | None = None  # its grammar, compiled beside the engine thread
    resumed: list[int] | None = None  # output tokens another engine already sent (LLMEngine.add_request)
    resumed_text_len: int | None = None  # the characters of their text sent


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class BetweenSteps:
    """Run fn(engine) on the engine thread between two steps; its result (or error) goes to done."""

    fn: Callable[[LLMEngine], Any]
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class Stop:
    pass


Command = AddRequest | AbortRequest | BetweenSteps | Stop


class AsyncEngine:
    def __init__(self, build: Callable[[], LLMEngine], name: str = "engine-loop"):
        self._build = build
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # owned by the engine thread
        self.engine: LLMEngine | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.stats = EngineStats()
        self.steps = 0
        self.step_seconds = 0.0  # time spent inside engine.step (the rest is idle or overhead)
        # grammars are compiled here, beside the engine thread (as vLLM's structured-output
        # manager does): a costly one delays its own request, never a step
        self._compiler = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=f"{name}-grammar")
        self._compiling: dict[str, bool] = {}  # request id → aborted while compiling
        self._compiling_lock = threading.Lock()
        self.keepalive_s = KEEPALIVE_S  # remote experts' links idle this long are pinged
        self._last_keepalive = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the caller's side (any event loop) ----

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        resumed: list[int] | None = None,
        resumed_text_len: int | None = None,
    ) -> None:
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self.error})")
        cmd = AddRequest(request_id, prompt_token_ids, params, sink, None, resumed, resumed_text_len)
        if params.grammar is None:
            self._inbox.put(cmd)
            return
        with self._compiling_lock:
            self._compiling[request_id] = False
        self._compiler.submit(self._compile_and_add, cmd)

    def _compile_and_add(self, cmd: AddRequest) -> None:
        """On a compiler thread: the request's grammar, then the request to the engine (or its
        refusal to its sink)."""
        error: BaseException | None = None
        try:
            if not self.ready.wait(timeout=600) or self.engine is None:
                raise EngineDeadError(f"the engine is not running ({self.error})")
            assert cmd.params.grammar is not None
            cmd.matcher = self.engine.compile_grammar(cmd.params.grammar, cmd.params.max_tokens)
        except RequestError as e:
            error = e
        except Exception as e:  # one request's grammar fails that request alone
            log.exception("compiling request %s's grammar failed", cmd.request_id)
            error = e
        with self._compiling_lock:
            aborted = self._compiling.pop(cmd.request_id, False)
        if aborted:
            return
        if error is not None:
            cmd.sink.put([(cmd.request_id, error)])
        else:
            self._inbox.put(cmd)

    def abort(self, request_id: str) -> None:
        with self._compiling_lock:
            if request_id in self._compiling:
                self._compiling[request_id] = True  # dropped when its compile ends
                return
        self._inbox.put(AbortRequest(request_id))

    async def between_steps(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine) run on the engine thread when no step is in flight → its result."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self.error})")
        cmd = BetweenSteps(fn)
        self._inbox.put(cmd)
        return await asyncio.wrap_future(cmd.done)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """One request's outputs; what piled up while the caller was busy comes merged."""
        sink = Sink()
        self.add(request_id, prompt_token_ids, params, sink)
        finished = False
        try:
            while not finished:
                ((_, item),) = sink.take_all(await sink.queue.get())
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(Stop())
        self._thread.join(timeout)
        self._compiler.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _build_grammar_vocabulary(engine: LLMEngine) -> None:
        """On a compiler thread at start: the first structured-output request would otherwise
        build it, its ~1.5 s of CPU pausing the streams beside it (benchmarks/hostile_bench.py)."""
        try:
            engine.grammar_tokenizer()
        except Exception as e:  # a request needing it gets the error then
            log.info("no grammar vocabulary for structured output: %s", e)

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            self.engine = engine = self._build()
        except BaseException as e:
            self.error = e
            log.exception("engine failed to start")
            self.ready.set()
            return
        self.stats = engine.stats()
        self.ready.set()
        if engine.model_dir is not None:  # the grammar vocabulary, before a request waits on it
            self._compiler.submit(self._build_grammar_vocabulary, engine)
        while True:
            cmds = self._drain(block=not engine.has_unfinished())
            for i, cmd in enumerate(cmds):
                if isinstance(cmd, Stop):
                    gone = EngineDeadError("the engine is shutting down")
                    self._fail_all(engine, gone)
                    # what came after Stop, in this batch or since: answered, nobody waits forever
                    for left in cmds[i + 1 :] + self._drain(block=False):
                        if isinstance(left, BetweenSteps):
                            left.done.set_exception(gone)
                        elif isinstance(left, AddRequest):
                            left.sink.put([(left.request_id, gone)])
                    close = getattr(engine.experts, "shutdown", None)
                    if close is not None:
                        close()
                    return
                if isinstance(cmd, AddRequest):
                    try:
                        engine.add_request(
                            cmd.request_id,
                            cmd.prompt_token_ids,
                            cmd.params,
                            cmd.matcher,
                            cmd.resumed,
                            cmd.resumed_text_len,
                        )
                        self._sinks[cmd.request_id] = cmd.sink
                    except RequestError as e:
                        cmd.sink.put([(cmd.request_id, e)])
                    except Exception as e:  # one request's failure is that request's alone
                        log.exception("adding request %s failed", cmd.request_id)
                        engine.abort_request(cmd.request_id)
                        cmd.sink.put([(cmd.request_id, e)])
                elif isinstance(cmd, AbortRequest):
                    engine.abort_request(cmd.request_id)
                    self._sinks.pop(cmd.request_id, None)
                else:
                    try:
                        cmd.done.set_result(cmd.fn(engine))
                    except Exception as e:
                        cmd.done.set_exception(e)
            if engine.has_unfinished():
                self._step(engine)
            self._keepalive(engine)
            self.stats = engine.stats()

    def _drain(self, block: bool) -> list[Command]:
        """Everything in the inbox; when idle, first wait for something to arrive (or for the
        next keepalive's time)."""
        cmds: list[Command] = []
        if block:
            try:
                cmds.append(self._inbox.get(timeout=KEEPALIVE_CHECK_S))
            except queue.Empty:
                return []
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _keepalive(self, engine: LLMEngine) -> None:
        """Remote experts' idle links pinged (moe.expert_parallel.remote), checked once a
        KEEPALIVE_CHECK_S at most: a shard tells a live, idle router from a gone one."""
        now = time.monotonic()
        keepalive = getattr(engine.experts, "keepalive", None)
        if keepalive is None or now - self._last_keepalive < KEEPALIVE_CHECK_S:
            return
        self._last_keepalive = now
        try:
            keepalive(self.keepalive_s)
        except Exception:
            log.exception("keepalive failed")

    def _step(self, engine: LLMEngine) -> None:
        start = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as e:
            log.exception("engine step failed; aborting its requests")
            self._fail_all(engine, EngineDeadError(f"the engine step failed: {e}"))
            return
        self.steps += 1
        self.step_seconds += time.perf_counter() - start
        self._emit([(out.request_id, out) for out in outputs] + list(engine.take_failures()))

    def _emit(self, items: list[tuple[str, Item]]) -> None:
        """One put per sink per step."""
        by_sink: dict[int, tuple[Sink, list[tuple[str, Item]]]] = {}
        for rid, item in items:
            sink = self._sinks.get(rid)
            if sink is None:
                continue
            by_sink.setdefault(id(sink), (sink, []))[1].append((rid, item))
            if isinstance(item, BaseException) or item.finished:
                del self._sinks[rid]
        for sink, batch in by_sink.values():
            sink.put(batch)

    def _fail_all(self, engine: LLMEngine, error: BaseException) -> None:
        rids = list(engine.seqs)
        for rid in rids:
            engine.abort_request(rid)
        self._emit([(rid, error) for rid in rids])


__all__ = ["AsyncEngine", "EngineDeadError", "Sink"]
