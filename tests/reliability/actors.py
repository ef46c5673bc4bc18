"""Actor classes for the reliability scenarios. They reach actor processes by name when the
child can import ``reliability.actors`` (tests/ is on its sys.path), else by value."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import cascada


class Napper(cascada.Actor):
    """Holds many calls in flight at once: ``nap`` is concurrent and sleeps."""

    def __init__(self) -> None:
        self.started = 0

    @cascada.concurrent
    async def nap(self, seconds: float, tag: Any = None) -> Any:
        self.started += 1
        await asyncio.sleep(seconds)
        return tag

    @cascada.concurrent
    async def in_flight(self) -> int:
        return self.started

    async def ping(self, x: Any = None) -> Any:
        return x


class Bystander(cascada.Actor):
    async def pid(self) -> int:
        return os.getpid()

    async def ping(self, x: Any = None) -> Any:
        return x


class ImportFails(cascada.Actor):
    def __init__(self) -> None:
        import cascada_reliability_no_such_module  # noqa: F401


class CtorFails(cascada.Actor):
    def __init__(self) -> None:
        raise RuntimeError("constructor refused to build the model")


class StartFails(cascada.Actor):
    async def on_start(self) -> None:
        raise LookupError("on_start could not find its weights")


class Stubborn(cascada.Actor):
    """Ignores SIGTERM and blocks its event loop in a handler (R06)."""

    async def pid(self) -> int:
        return os.getpid()

    def stall(self, seconds: float) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)


class Sink(cascada.Actor):
    """Counts executions per key and keeps the order keys arrived in."""

    def __init__(self) -> None:
        self.order: list[Any] = []
        self.counts: dict[Any, int] = {}

    async def record(self, key: Any) -> None:
        self.order.append(key)
        self.counts[key] = self.counts.get(key, 0) + 1

    async def seen(self) -> list[Any]:
        return self.order

    async def executed(self) -> list[Any]:
        return [[k, n] for k, n in self.counts.items()]


class LastWords(cascada.Actor):
    """Sends to a sink and then is stopped at once (R16 a): in a handler, and in on_stop."""

    def __init__(self, sink: cascada.ActorRef, tag: str) -> None:
        self.sink = sink
        self.tag = tag

    async def burst(self, n: int) -> int:
        for i in range(n):
            await self.sink.tell("record", (self.tag, i))
        return n

    async def on_stop(self) -> None:
        await self.sink.tell("record", (self.tag, "on_stop"))


class Consumer(cascada.Actor):
    """A slow consumer (R14): sleeps per message, records sequence numbers in arrival order."""

    def __init__(self, per_message: float) -> None:
        self.per_message = per_message
        self.seqs: list[int] = []
        self.bytes = 0

    async def eat(self, seq: int, payload: bytes) -> None:
        self.seqs.append(seq)
        self.bytes += len(payload)
        await asyncio.sleep(self.per_message)

    async def progress(self) -> dict[str, Any]:
        return {"handled": len(self.seqs), "bytes": self.bytes, "pid": os.getpid()}

    async def received(self) -> list[int]:
        return self.seqs


class Producer(cascada.Actor):
    """Tells as fast as tell lets it (R14) and reports how long tell held it back."""

    async def pid(self) -> int:
        return os.getpid()

    async def flood(self, consumer: cascada.ActorRef, seconds: float, size: int, timeout: float = 30.0,
                    array: bool = False, count: int | None = None) -> dict[str, Any]:
        """Tell ``eat`` for ``seconds`` (or ``count`` messages) with ``size``-byte payloads:
        bytes in the header, or (``array``) a numpy array, which travels out of band."""
        if array:
            import numpy as np

            payload: Any = np.ones(size, dtype=np.uint8)
        else:
            payload = b"x" * size
        sent = 0
        errors: dict[str, int] = {}
        failed: list[int] = []
        max_block = 0.0
        blocked = 0.0
        waited = 0
        t0 = time.monotonic()
        end = t0 + seconds
        while (sent < count) if count is not None else (time.monotonic() < end):
            t = time.monotonic()
            try:
                await consumer.tell("eat", sent, payload, timeout=timeout)
            except cascada.CascadaError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                failed.append(sent)
            dt = time.monotonic() - t
            if dt > 0.001:
                waited += 1
                blocked += dt
            max_block = max(max_block, dt)
            sent += 1
        return {"sent": sent, "seconds": time.monotonic() - t0, "max_block_s": max_block,
                "blocked_s": blocked, "tells_that_waited": waited, "errors": errors, "failed": failed}
