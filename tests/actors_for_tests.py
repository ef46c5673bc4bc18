"""Actor classes shared by the tests (defined in a test-only module on purpose: they travel
to actor processes by value, as a user's __main__ or notebook classes do)."""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import time
from typing import Any

import cascada


class Counter(cascada.Actor):
    async def on_start(self) -> None:
        self.n = 0

    async def add(self, k: int) -> int:
        self.n += k
        return self.n

    async def count_to(self, n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i


class Recorder(cascada.Actor):
    """Records what it was sent, in order; sleeps on request; reports its environment."""

    def __init__(self, label: str = "rec") -> None:
        self.label = label
        self.seen: list[Any] = []
        self.active = 0
        self.max_active = 0
        self.closed_streams = 0
        self.produced = 0

    async def record(self, x: Any) -> None:
        self.seen.append(x)

    async def history(self) -> list[Any]:
        return self.seen

    async def echo(self, *args: Any, **kwargs: Any) -> Any:
        return [args, kwargs]

    async def echo_value(self, value: Any) -> Any:
        return value

    def sync_add(self, a: int, b: int) -> int:
        return a + b

    async def nap(self, seconds: float, tag: Any = None) -> Any:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.active -= 1
        if tag is not None:
            self.seen.append(tag)
        return tag

    def block(self, seconds: float) -> None:
        time.sleep(seconds)

    async def max_concurrency(self) -> int:
        return self.max_active

    async def fail(self, message: str) -> None:
        raise ValueError(message)

    async def _secret(self) -> str:
        return "never reachable"

    async def ticks(self, n: int, fail_at: int = -1):  # type: ignore[no-untyped-def]
        try:
            for i in range(n):
                if i == fail_at:
                    raise RuntimeError(f"tick {i} broke")
                self.produced += 1
                yield i
        finally:
            self.closed_streams += 1

    async def stream_state(self) -> dict[str, int]:
        return {"produced": self.produced, "closed": self.closed_streams}

    async def env(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "loop": type(asyncio.get_running_loop()).__module__,
            "torch": "torch" in sys.modules,
            "modules": sorted(m for m in ("xml.dom.minidom", "json") if m in sys.modules),
        }

    async def call_other(self, other: cascada.ActorRef, method: str, *args: Any) -> Any:
        return await other.ask(method, *args)

    async def whoami(self) -> cascada.ActorRef:
        return self.ref


class Gate(cascada.Actor):
    """Two handlers that only finish together: proves @concurrent really overlaps."""

    async def on_start(self) -> None:
        self.event = asyncio.Event()

    @cascada.concurrent
    async def wait(self) -> str:
        await asyncio.wait_for(self.event.wait(), 5)
        return "released"

    @cascada.concurrent
    async def release(self) -> str:
        self.event.set()
        return "done"


_TAG: contextvars.ContextVar[Any] = contextvars.ContextVar("cascada_test_tag")


class Isolated(cascada.Actor):
    """Concurrent handlers, which start eagerly on delivery: each keeps a context of its own,
    can be cancelled at its first await, and fails in either step with a typed error."""

    async def on_start(self) -> None:
        self.cancelled = 0
        self.started = 0

    @cascada.concurrent
    async def tagged(self, tag: Any, delay: float) -> list[Any]:
        _TAG.set(tag)
        self.started += 1
        await asyncio.sleep(delay)
        return [tag, _TAG.get(None)]

    async def peek(self) -> Any:
        return _TAG.get(None)

    @cascada.concurrent
    async def nap(self, delay: float) -> str:
        self.started += 1
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "slept"

    @cascada.concurrent
    async def fail_in(self, step: str) -> None:
        if step == "first":
            raise ValueError("failed before its first await")
        await asyncio.sleep(0)
        raise ValueError("failed after its first await")

    @cascada.concurrent
    async def at_once(self, x: Any) -> Any:
        return x

    @cascada.concurrent
    async def maybe_wait(self, i: int, wait: bool) -> list[Any]:
        _TAG.set(i)
        if wait:
            await asyncio.sleep(0)
        return [i, _TAG.get(None)]

    async def counts(self) -> dict[str, int]:
        return {"cancelled": self.cancelled, "started": self.started}


class BadInit(cascada.Actor):
    def __init__(self, why: str) -> None:
        raise RuntimeError(f"constructor refused: {why}")


class BadStart(cascada.Actor):
    async def on_start(self) -> None:
        raise LookupError("on_start could not find its model")


class Holder(cascada.Actor):
    """Keeps a ref it got at construction and calls through it."""

    def __init__(self, target: cascada.ActorRef) -> None:
        self.target = target

    async def forward(self, method: str, *args: Any) -> Any:
        return await self.target.ask(method, *args)


class Drainer(cascada.Actor):
    """Writes what it handled to a file in on_stop, to prove graceful stop drains."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.count = 0

    async def work(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.count += 1

    async def on_stop(self) -> None:
        with open(self.path, "w") as f:
            f.write(str(self.count))
