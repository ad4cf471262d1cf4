"""What the ingress does when a router dies (deployments.routers, deployments.router_client),
without Ray: fake router handles whose stream can be broken. Every unfinished request of the
lost router is handed on with the output tokens it had delivered and one more router lost; with
another router up it goes there at once, with none it waits until one is back; a request that
has lost two routers is failed, naming it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from api.errors import EngineUnavailable
from cluster.messages import GenerateRequest, ModelInfo
from deployments.routers import Routers
from moe.engine.sequence import RequestOutput
from moe.sampling import SamplingParams


class Call:
    def __init__(self, fn: Any):
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class FakeRouter:
    """A Router deployment's handle: records submits; its stream yields what `deliver` puts
    and raises when `die` is called, as a stream from a killed router does."""

    def __init__(self) -> None:
        self.submitted: list[GenerateRequest] = []
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.ready = True
        self.submit = Call(self._submit)
        self.stream = Call(self._stream)
        self.abort = Call(lambda ids: None)
        self.model_info = Call(self._info)

    def options(self, **kw: Any) -> FakeRouter:
        return self

    async def _submit(self, subscriber: str, batch: list[GenerateRequest]) -> None:
        self.submitted += batch

    async def _info(self) -> ModelInfo:
        return ModelInfo(self.ready, 256, 1)

    def _stream(self, subscriber: str) -> Stream:
        return Stream(self.queue)

    def deliver(self, rid: str, tokens: list[int], finished: bool = False) -> None:
        out = RequestOutput(
            rid, tokens, "x" * len(tokens), [], finished, "length" if finished else None, None, 3, 0
        )
        self.queue.put_nowait([out])

    def die(self) -> None:
        self.ready = False
        self.queue.put_nowait(RuntimeError("ActorDiedError: the router's process was killed"))


class Stream:
    """What a streaming handle call returns: async iteration, and cancel()."""

    def __init__(self, queue: asyncio.Queue[Any]):
        self.queue = queue

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        pass


def request(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, [1, 2, 3], SamplingParams(max_tokens=50))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


def test_a_lost_routers_streams_resume_on_the_other_from_the_tokens_they_sent():
    async def run() -> None:
        a, b = FakeRouter(), FakeRouter()
        routers = Routers([a, b], block_size=16)
        outputs = routers.submit([request("r-0"), request("r-1")])
        await settle()
        first = a if a.submitted else b
        other = b if first is a else a
        first.deliver("r-0", [7, 8, 9])
        first.deliver("r-1", [4])
        first.deliver("r-1", [5], finished=True)  # r-1 is done: it does not move
        await settle()
        got = [(await outputs.next()).new_token_ids for _ in range(3)]
        first.die()
        await settle()
        (moved,) = other.submitted
        assert moved.request_id == "r-0" and moved.resumed_token_ids == [7, 8, 9] and moved.attempt == 1
        other.deliver("r-0", [10], finished=True)
        last = await outputs.next()
        assert got == [[7, 8, 9], [4], [5]] and last.new_token_ids == [10] and last.finished
        routers.close()
        await settle()

    asyncio.run(run())


def test_with_no_router_up_the_lost_requests_wait_for_one():
    async def run() -> None:
        a = FakeRouter()
        routers = Routers([a], block_size=16)
        routers.submit([request("r-0")])
        await settle()
        a.deliver("r-0", [7])
        await settle()
        a.submitted.clear()
        a.die()
        await asyncio.sleep(0.3)
        assert a.submitted == [] and not routers.up[0]  # waiting: no router to send to
        a.ready = True  # Serve's replacement answers
        for _ in range(100):
            if a.submitted:
                break
            await asyncio.sleep(0.05)
        (moved,) = a.submitted
        assert moved.resumed_token_ids == [7] and moved.attempt == 1
        routers.close()
        await settle()

    asyncio.run(run())


def test_a_request_that_lost_two_routers_is_failed_naming_it():
    async def run() -> None:
        a, b = FakeRouter(), FakeRouter()
        routers = Routers([a, b], block_size=16)
        outputs = routers.submit([request("poison")])
        await settle()
        first = a if a.submitted else b
        second = b if first is a else a
        first.die()
        await settle()
        assert second.submitted[-1].attempt == 1
        second.die()
        await settle()
        with pytest.raises(EngineUnavailable, match="request poison was running on 2 routers that died"):
            await outputs.next()
        routers.close()
        await settle()

    asyncio.run(run())
