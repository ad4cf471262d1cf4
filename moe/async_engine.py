"""AsyncEngine: the engine on its own thread, driven from asyncio.

The engine is single-threaded and its step blocks (attention, then the experts' round trips),
so it runs in a dedicated thread; callers on an event loop submit requests and receive their
outputs through per-request asyncio queues (what vLLM's AsyncLLMEngine does). A caller that
stops listening — a client gone, a cancelled task — aborts its request at the next step, which
frees its KV blocks. A caller that reads slower than the engine steps gets the outputs that
piled up merged into one (fewer, larger messages under load; no added latency when idle).
If a step fails, every request in it gets the error and is aborted, and
the loop goes on serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from moe.engine import LLMEngine
from moe.errors import RequestError
from moe.sampling import SamplingParams
from moe.sequence import RequestOutput

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, build: Callable[[], LLMEngine], name: str = "engine-loop"):
        self._build = build
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.engine: LLMEngine | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.stats: dict[str, Any] = {}
        self.steps = 0
        self.step_seconds = 0.0  # time spent inside engine.step (the rest is idle or overhead)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the caller's side (any event loop) ----

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self.error})")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", request_id, prompt_token_ids, params))
        finished = False
        try:
            while True:
                item = await q.get()
                while not isinstance(item, BaseException) and not item.finished and not q.empty():
                    later = q.get_nowait()
                    item = later if isinstance(later, BaseException) else item.merge(later)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    # ---- the engine thread ----

    def _emit(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

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
        while True:
            cmds = self._drain(block=not engine.has_unfinished())
            for cmd in cmds:
                if cmd[0] == "stop":
                    self._shutdown(engine)
                    return
                if cmd[0] == "add":
                    _, rid, prompt, params = cmd
                    try:
                        engine.add_request(rid, prompt, params)
                    except RequestError as e:
                        self._emit(rid, e)
                elif cmd[0] == "abort":
                    engine.abort_request(cmd[1])
            if engine.has_unfinished():
                self._step(engine)
            self.stats = engine.stats()

    def _drain(self, block: bool) -> list[tuple[Any, ...]]:
        """Everything in the inbox; when idle, first wait for something to arrive."""
        cmds = [self._inbox.get()] if block else []
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _step(self, engine: LLMEngine) -> None:
        start = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as e:
            log.exception("engine step failed; aborting its requests")
            for rid in list(engine.seqs):
                engine.abort_request(rid)
                self._emit(rid, EngineDeadError(f"the engine step failed: {e}"))
            return
        self.steps += 1
        self.step_seconds += time.perf_counter() - start
        for out in outputs:
            self._emit(out.request_id, out)

    def _shutdown(self, engine: LLMEngine) -> None:
        for rid in list(engine.seqs):
            engine.abort_request(rid)
            self._emit(rid, EngineDeadError("the engine is shutting down"))
        close = getattr(engine.experts, "shutdown", None)
        if close is not None:
            close()
