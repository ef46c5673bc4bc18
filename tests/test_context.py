"""The request context (trace id, deadline, budget, depth, path) travels with every call made
inside a handler, through every level; cancelling a call at the top reaches every level."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import pytest

import cascada
from cascada.actors._context import outgoing


class Hop(cascada.Actor):
    """Calls the next hop (if any) and returns what every hop saw, top first."""

    def __init__(self, next_hop: cascada.ActorRef | None = None) -> None:
        self.next = next_hop
        self.started = 0
        self.cancelled = 0

    async def where(self, spend: float = 0.0) -> list[dict[str, Any]]:
        ctx = cascada.current_context()
        seen = {"trace": ctx.trace_id, "depth": ctx.depth, "path": list(ctx.path), "budget": ctx.budget,
                "deadline": ctx.deadline}
        if self.next is None:
            return [seen]
        if spend and ctx.budget is not None:
            with cascada.context(budget=ctx.budget - spend):
                return [seen, *await self.next.ask("where", spend)]
        return [seen, *await self.next.ask("where", spend)]

    async def hang(self) -> None:
        """Waits on the next hop, or forever at the last; counts the cancellations it gets."""
        await self._hang("hang")

    @cascada.concurrent
    async def hang_c(self) -> None:
        """hang, but the actor answers ``counts`` meanwhile."""
        await self._hang("hang_c")

    async def _hang(self, method: str) -> None:
        self.started += 1
        try:
            if self.next is not None:
                await self.next.ask(method, timeout=math.inf)
            else:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def ticks(self) -> Any:
        """Streams forever; between items it waits on the next hop's hang when there is one."""
        self.started += 1
        try:
            i = 0
            while True:
                yield i
                i += 1
                if self.next is not None and i == 2:
                    await self.next.ask("hang", timeout=math.inf)
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def counts(self) -> list[int]:
        return [self.started, self.cancelled]

    async def sleep_then(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    async def ask_next_no_timeout(self, seconds: float) -> str:
        assert self.next is not None
        return str(await self.next.ask("sleep_then", seconds, timeout=math.inf))

    async def leave_behind(self, seconds: float) -> None:
        """Starts a background call that outlives this handler and this request's deadline."""
        assert self.next is not None
        self._bg = asyncio.ensure_future(self.next.ask("sleep_then", seconds, timeout=5))

    async def background_result(self) -> str:
        return str(await self._bg)


async def _chain(system: cascada.ActorSystem, placement: cascada.Placement, n: int = 3) -> list[cascada.ActorRef]:
    refs: list[cascada.ActorRef] = []
    nxt = None
    for i in reversed(range(n)):
        nxt = await system.spawn(Hop, nxt, name=f"hop{i}", placement=placement)
        refs.insert(0, nxt)
    return refs


async def _until(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_the_context_api_outside_handlers() -> None:
    a, b = cascada.current_context(), cascada.current_context()
    assert a.trace_id != b.trace_id and a.depth == 0 and a.path == () and a.deadline is None
    assert outgoing("x", None) == (None, None)  # plain code carries nothing
    with cascada.context(trace_id="t-1", timeout=10, budget=5.0) as ctx:
        assert cascada.current_context() is ctx
        assert 9 < (ctx.remaining() or 0) <= 10 and not ctx.expired
        deadline, wire = outgoing("x", time.time() + 100)
        assert deadline == ctx.deadline and wire == ["t-1", 5.0, 1, ["x"]]
    assert cascada.current_context().trace_id != "t-1"
    for bad in ({"trace_id": ""}, {"timeout": -1}, {"budget": "lots"}, {"deadline": float("nan")},
                {"deadline": 1.0, "timeout": 1.0}):
        with pytest.raises(cascada.ConfigurationError):
            with cascada.context(**bad):
                pass


@pytest.mark.parametrize("placement", ["local", "process"])
async def test_the_context_travels_through_every_level(placement: cascada.Placement) -> None:
    async with cascada.ActorSystem() as system:
        top = (await _chain(system, placement))[0]
        seen = await top.ask("where", timeout=30)
        assert [s["path"] for s in seen] == [["hop0"], ["hop0", "hop1"], ["hop0", "hop1", "hop2"]]
        assert [s["depth"] for s in seen] == [1, 2, 3]
        assert len({s["trace"] for s in seen}) == 1  # a trace starts where the request entered
        assert seen[0]["deadline"] == pytest.approx(time.time() + 30, abs=5)
        assert seen[1]["deadline"] == seen[0]["deadline"] == seen[2]["deadline"]  # inherited, not reset to 300 s

        with cascada.context(trace_id="req-7", budget=10.0, timeout=20):
            seen = await top.ask("where", 3.0)
        assert {s["trace"] for s in seen} == {"req-7"}
        assert [s["budget"] for s in seen] == [10.0, 7.0, 4.0]  # each hop handed down less
        assert [s["depth"] for s in seen] == [1, 2, 3]
        assert seen[0]["deadline"] == pytest.approx(time.time() + 20, abs=5)


@pytest.mark.parametrize("placement", ["local", "process"])
async def test_a_nested_call_inherits_the_callers_deadline(placement: cascada.Placement) -> None:
    async with cascada.ActorSystem() as system:
        top, mid = (await _chain(system, placement, 2))
        t0 = time.monotonic()
        with pytest.raises(cascada.DeadlineExceeded):
            await top.ask("ask_next_no_timeout", 3.0, timeout=0.3)
        assert time.monotonic() - t0 < 5.0  # not the 300 s default: the caller's 0.3 s
        # The inner call got the same deadline, and was cancelled: the callee's handler stopped.
        assert await top.ask("ask_next_no_timeout", 0.0) == "done"
        # A call a handler left running is not bound by that request's deadline once it returned.
        await top.ask("leave_behind", 2.0, timeout=1.5)
        assert await top.ask("background_result") == "done"


@pytest.mark.parametrize("placement", ["local", "process"])
async def test_cancelling_at_the_top_reaches_every_level(placement: cascada.Placement) -> None:
    async with cascada.ActorSystem() as system:
        refs = await _chain(system, placement)
        call = asyncio.ensure_future(refs[0].ask("hang_c", timeout=30))

        async def all_started() -> bool:
            return [(await r.ask("counts"))[0] for r in refs] == [1, 1, 1]

        await _until(all_started)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

        async def all_cancelled() -> bool:
            return [await r.ask("counts") for r in refs] == [[1, 1]] * 3

        await _until(all_cancelled, timeout=10.0)
        # The actors live on and serve new work.
        assert len(await refs[0].ask("where")) == 3
        stats = await system.stats(refs[2])
        assert stats["actors"][0]["cancelled"] == 1


@pytest.mark.parametrize("placement", ["local", "process"])
async def test_a_deadline_at_the_top_cancels_the_work_below(placement: cascada.Placement) -> None:
    async with cascada.ActorSystem() as system:
        refs = await _chain(system, placement)
        with pytest.raises(cascada.DeadlineExceeded):
            await refs[0].ask("hang", timeout=1.0)

        # Every level shares the deadline: the levels above see DeadlineExceeded from their
        # own nested call and end (their sequential handlers let `counts` through again), and
        # the last one, which waits on nothing that could time out, is cancelled.
        # (On a very loaded machine the deadline may pass before the leaf's message is even
        # taken: then it is dropped unrun, which is as good.)
        async def leaf_cancelled() -> bool:
            return bool(await refs[2].ask("counts", timeout=5) in ([1, 1], [0, 0]))

        await _until(leaf_cancelled, timeout=10.0)
        assert [(await r.ask("counts", timeout=5))[0] for r in refs[:1]] == [1]


@pytest.mark.parametrize("placement", ["local", "process"])
async def test_leaving_a_live_stream_cancels_the_calls_it_waits_on(placement: cascada.Placement) -> None:
    async with cascada.ActorSystem() as system:
        refs = await _chain(system, placement, 2)
        got = []
        # aclosing: leaving the loop closes the stream now, not whenever the garbage collector
        # finalizes the generator (PEP 525).
        async with contextlib.aclosing(refs[0].stream("ticks", timeout=30)) as items:
            async for item in items:
                got.append(item)
                if item == 1:
                    # The producer is now blocked in a nested ask; leaving must reach it.
                    break
        assert got == [0, 1]

        # The nested call is cancelled where it is: running on hop1, or (a fresh connection is
        # checked before anything goes on it) not sent at all.
        async def cancelled() -> bool:
            return (await refs[0].ask("counts")) == [1, 1] and (await refs[1].ask("counts")) in ([1, 1], [0, 0])

        await _until(cancelled, timeout=10.0)


@pytest.mark.parametrize("placement", ["local", "process"])
async def test_a_cancelled_call_still_queued_never_runs(placement: cascada.Placement) -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Hop, None, placement=placement)
        busy = asyncio.ensure_future(ref.ask("sleep_then", 0.5))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(ref.ask("hang", timeout=30))
        await asyncio.sleep(0.05)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert await busy == "done"
        assert await ref.ask("counts") == [0, 0]  # hang never started
        stats = (await system.stats(ref))["actors"][0]
        assert stats["cancelled"] == 1 and stats["failed"] == 0
