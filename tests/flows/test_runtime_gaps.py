"""Runtime behaviour the flows ran into (once strict xfails; each is fixed now and stays as a
regression test)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import cascada
from cascada.actors._flow import Sequential, StageFailed, Step
from flows.flowkit import Leaf


async def test_cascadas_own_actor_classes_run_from_their_source_files_in_actor_processes() -> None:
    async with cascada.ActorSystem() as system:
        a = await system.spawn(Leaf, name="a", placement="process")
        flow = await system.spawn(Sequential, Step(a, "add"), name="flow", placement="process")
        with pytest.raises(cascada.RemoteError) as info:
            await flow.ask("run", 1, unknown_option=True)  # raised inside Sequential._run
        assert info.value.remote_traceback is not None
        assert "_flow_kinds.py" in info.value.remote_traceback, info.value.remote_traceback


async def test_a_flow_error_reaches_a_plain_ask_as_its_own_type() -> None:
    async with cascada.ActorSystem() as system:
        a = await system.spawn(Leaf, name="a", placement="process")
        flow = await system.spawn(Sequential, Step(a, "fail"), name="flow", placement="process")
        with pytest.raises(StageFailed) as info:
            await flow.ask("run", 1)
        assert info.value.path == ("flow[a]", "a.fail")


class _Feed(cascada.Actor):
    """Yields one item, then calls ``after_first`` (it runs once the item was handed to the
    consumer and before the consumer's task resumed), then waits."""

    async def items(self, after_first: Any) -> AsyncIterator[int]:
        yield 1
        after_first()
        await asyncio.sleep(30)
        yield 2


async def test_cancelling_a_stream_consumer_as_an_item_arrives_cancels_it() -> None:
    async with cascada.ActorSystem() as system:
        feed = await system.spawn(_Feed, placement="local")  # local: the callable arrives as itself
        consumer: asyncio.Task[list[int]] | None = None

        def cancel_consumer() -> None:
            assert consumer is not None
            consumer.cancel()

        async def consume() -> list[int]:
            return [x async for x in feed.stream("items", cancel_consumer, timeout=60)]

        consumer = asyncio.ensure_future(consume())
        done, _ = await asyncio.wait({consumer}, timeout=1.0)
        if not done:  # the cancellation was lost: end the consumer for the leak check, then fail
            while not consumer.done():
                consumer.cancel()
                await asyncio.wait({consumer}, timeout=0.1)
        assert done and consumer.cancelled(), "the cancellation of the stream's consumer was lost"
