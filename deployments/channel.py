"""RouterChannel: the ingress replica's one connection to the router.

Ray Serve moves each streamed item as its own message, and a message costs far more CPU than a
token's worth of text. So an ingress replica does not open a stream per request: it keeps one
streaming call to `Router.stream` that carries, per engine step, the outputs of all its requests,
and submits new requests in batches (whatever arrived while the previous submit was in flight
goes in the next). Outputs are fanned out here to per-request asyncio queues.

If the stream breaks (the router restarted), every request waiting on it gets an error and the
next request opens a new stream.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

log = logging.getLogger("ray.serve")


class RouterGone(RuntimeError):
    pass


class RouterChannel:
    def __init__(self, router: Any):
        self.router = router
        self.subscriber = ""
        self.queues: dict[str, asyncio.Queue] = {}
        self.pending: list[dict[str, Any]] = []
        self.reader: asyncio.Task | None = None
        self.flusher: asyncio.Task | None = None

    def _ensure_reader(self) -> None:
        if self.reader is None or self.reader.done():
            self.subscriber = f"ingress-{uuid.uuid4().hex[:12]}"
            self.reader = asyncio.get_running_loop().create_task(self._read(self.subscriber))

    async def _read(self, subscriber: str) -> None:
        error: BaseException = RouterGone("the router closed the stream")
        stream = self.router.options(stream=True).stream.remote(subscriber)
        try:
            async for batch in stream:
                for item in batch:
                    q = self.queues.get(item["request_id"])
                    if q is not None:
                        q.put_nowait(item)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as e:
            error = RouterGone(f"lost the router: {e}")
            log.warning("router stream %s ended: %s", subscriber, e)
        for q in self.queues.values():
            q.put_nowait(error)

    async def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                await self.router.submit.remote(self.subscriber, batch)
            except Exception as e:
                for r in batch:
                    q = self.queues.get(r["request_id"])
                    if q is not None:
                        q.put_nowait(RouterGone(f"could not submit to the router: {e}"))

    def close(self) -> None:
        """End the stream (the router then aborts whatever of ours still runs)."""
        if self.reader is not None:
            self.reader.cancel()

    def submit(self, request: dict[str, Any]) -> asyncio.Queue:
        """Queue a request for the router; → the queue its outputs will arrive on."""
        self._ensure_reader()
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request["request_id"]] = q
        self.pending.append(request)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())
        return q

    async def outputs(self, request_id: str, q: asyncio.Queue) -> AsyncGenerator[dict[str, Any], None]:
        """A request's outputs until it finishes; leaving early aborts it in the router."""
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = "error" in item or item["finished"]
                yield item
        finally:
            self.queues.pop(request_id, None)
            if not finished:
                self.router.abort.remote([request_id])  # fire and forget: we may be cancelled
