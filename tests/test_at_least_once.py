"""Opt-in at-least-once delivery: retries with an idempotency key, and a receiver-side reply
cache so that a retried call takes effect once (Ray's max_task_retries, plus dedupe)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from typing import Any

import pytest

import cascada


class Sink(cascada.Actor):
    def __init__(self) -> None:
        self.runs: dict[int, int] = {}

    @cascada.idempotent
    async def add(self, seq: int) -> int:
        self.runs[seq] = self.runs.get(seq, 0) + 1
        return seq * 10

    @cascada.idempotent
    async def refuse(self, seq: int) -> int:
        self.runs[seq] = self.runs.get(seq, 0) + 1
        raise ValueError(f"no {seq}")

    @cascada.concurrent
    @cascada.idempotent
    async def slow(self, seq: int) -> int:
        self.runs[seq] = self.runs.get(seq, 0) + 1
        await asyncio.sleep(0.3)
        return seq

    async def plain(self, seq: int) -> int:
        self.runs[seq] = self.runs.get(seq, 0) + 1
        return seq

    async def counts(self) -> dict[int, int]:
        return self.runs


class Relay(cascada.Actor):
    """Forwards each request to the sink; the key of the request carries on downstream."""

    def __init__(self, sink: cascada.ActorRef) -> None:
        self.sink = sink

    @cascada.idempotent
    async def forward(self, seq: int) -> int:
        return int(await self.sink.ask("add", seq, retries=-1, idempotency_key=f"req-{seq}", timeout=30))


@pytest.mark.parametrize("placement", ["local", "process"])
async def test_a_key_takes_effect_once_and_repeats_get_the_recorded_answer(placement: str) -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        sink = await system.spawn(Sink, placement=placement)  # type: ignore[arg-type]
        assert await sink.ask("add", 1, idempotency_key="k1") == 10
        assert await sink.ask("add", 1, idempotency_key="k1") == 10
        assert await sink.ask("add", 1, idempotency_key="k2") == 10  # another key runs again
        for _ in range(2):
            with pytest.raises(cascada.RemoteError, match="no 7"):
                await sink.ask("refuse", 7, idempotency_key="k3")  # the error is the recorded answer too
        # Without @idempotent a key changes nothing: the handler runs every time.
        await sink.ask("plain", 5, idempotency_key="k4")
        await sink.ask("plain", 5, idempotency_key="k4")
        assert await sink.ask("counts") == {1: 2, 7: 1, 5: 2}
        stats = (await system.stats(sink))["actors"][0]
        assert stats["deduped"] == 2


@pytest.mark.parametrize("placement", ["local", "process"])
async def test_a_repeat_that_arrives_while_the_first_runs_waits_for_it(placement: str) -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        sink = await system.spawn(Sink, placement=placement)  # type: ignore[arg-type]
        both = await asyncio.gather(sink.ask("slow", 3, idempotency_key="same"),
                                    sink.ask("slow", 3, idempotency_key="same"))
        assert both == [3, 3]
        assert await sink.ask("counts") == {3: 1}


async def test_bad_retry_arguments_are_refused() -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        sink = await system.spawn(Sink, placement="local")
        with pytest.raises(cascada.ConfigurationError, match="retries"):
            await sink.ask("add", 1, retries=-2)
        with pytest.raises(cascada.ConfigurationError, match="idempotency_key"):
            await sink.ask("add", 1, idempotency_key="")


async def test_repeated_kills_lose_nothing_and_nothing_takes_effect_twice() -> None:
    """R02 in small: a client sends numbered requests through a relay that is SIGKILLed again
    and again (restarted each time); with retries and keys, every request is acknowledged and
    the sink holds each number exactly once."""
    rng = random.Random(7)
    n, kills = 300, 5
    async with cascada.ActorSystem(heartbeat_interval=None, restart_intensity=50, restart_period=30) as system:
        sink = await system.spawn(Sink, name="verifier")
        relay = await system.spawn(Relay, sink, name="expert", restart="permanent")
        acked: list[int] = []

        async def client() -> None:
            for seq in range(n):
                out = await relay.ask("forward", seq, retries=-1, idempotency_key=f"c-{seq}", timeout=30)
                assert out == seq * 10
                acked.append(seq)

        async def nemesis() -> None:
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(0.05, 0.2))
                try:
                    os.kill(system.lookup("expert").pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        t0 = time.monotonic()
        await asyncio.gather(client(), nemesis())
        assert time.monotonic() - t0 < 30
        assert acked == list(range(n))  # lost = 0
        counts = await sink.ask("counts")
        assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}  # duplicated in effect = 0
        # After the last kill the relay is a fresh incarnation with an empty reply cache: a late
        # repeat runs again there, and the sink's own cache keeps it from taking effect twice.
        assert await relay.ask("forward", 0, retries=-1, idempotency_key="c-0", timeout=30) == 0
        assert (await sink.ask("counts"))[0] == 1
        assert system.node.stats.retries >= 1  # the kills did force retries
