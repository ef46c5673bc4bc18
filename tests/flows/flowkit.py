"""Actors and helpers shared by the flow tests (imported as ``flows.flowkit``, so actor
processes can import what is named here)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import cascada

__all__ = ["Broken", "Leaf", "close", "countdown", "eventually", "halve", "is_big", "minus_one", "halves", "split_words", "until"]


class Leaf(cascada.Actor):
    """A stage that counts, per method, how many calls started, finished and were cancelled.

    Every handler is concurrent, so ``counts`` answers while others wait, and parallel
    branches of a flow can share one Leaf."""

    def __init__(self, k: float = 1.0) -> None:
        self.k = k
        self._counts: dict[str, list[int]] = {}

    def _count(self, method: str, what: int) -> None:
        self._counts.setdefault(method, [0, 0, 0])[what] += 1

    async def _run(self, method: str, body: Callable[[], Awaitable[Any]]) -> Any:
        self._count(method, 0)
        try:
            out = await body()
        except asyncio.CancelledError:
            self._count(method, 2)
            raise
        self._count(method, 1)
        return out

    @cascada.concurrent
    async def add(self, x: Any) -> Any:
        async def body() -> Any:
            return x + self.k
        return await self._run("add", body)

    @cascada.concurrent
    async def scale(self, x: Any) -> Any:
        async def body() -> Any:
            return [v * self.k for v in x] if isinstance(x, list) else x * self.k
        return await self._run("scale", body)

    @cascada.concurrent
    async def priced(self, x: float) -> dict[str, Any]:
        """An answer with a cost: ``{"value": x * k, "cost": k, "macs": 100 * k}``."""
        async def body() -> Any:
            return {"value": x * self.k, "cost": self.k, "macs": 100 * self.k}
        return await self._run("priced", body)

    @cascada.concurrent
    async def sleep(self, x: Any, seconds: float = 0.2) -> Any:
        async def body() -> Any:
            await asyncio.sleep(seconds)
            return x
        return await self._run("sleep", body)

    @cascada.concurrent
    async def hang(self, x: Any) -> Any:
        async def body() -> Any:
            await asyncio.Event().wait()
        return await self._run("hang", body)

    @cascada.concurrent
    async def maybe_hang(self, x: Any) -> Any:
        """Hangs when x is negative, else answers x * k."""
        async def body() -> Any:
            if x < 0:
                await asyncio.Event().wait()
            return x * self.k
        return await self._run("maybe_hang", body)

    @cascada.concurrent
    async def fail(self, x: Any) -> Any:
        async def body() -> Any:
            raise ValueError(f"{self.name} cannot take {x!r}")
        return await self._run("fail", body)

    @cascada.concurrent
    async def where(self, x: Any) -> dict[str, Any]:
        ctx = cascada.current_context()
        return {"path": list(ctx.path), "depth": ctx.depth, "budget": ctx.budget, "trace": ctx.trace_id}

    @cascada.concurrent
    async def count_up(self, n: int) -> AsyncIterator[int]:
        """Streams 0..n-1."""
        self._count("count_up", 0)
        for i in range(n):
            yield i
        self._count("count_up", 1)

    @cascada.concurrent
    async def ticks(self, x: Any) -> AsyncIterator[int]:
        """Streams forever, one item a millisecond."""
        self._count("ticks", 0)
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.001)
        except (asyncio.CancelledError, GeneratorExit):
            self._count("ticks", 2)
            raise

    async def counts(self) -> dict[str, list[int]]:
        """{method: [started, finished, cancelled]}."""
        return {m: list(c) for m, c in self._counts.items()}


# Plain functions used as local steps (importable by name in actor processes).

def until(v: Any) -> bool:
    return bool(v >= 3)


def halve(x: float) -> float:
    return x / 2


def is_big(v: Any) -> bool:
    value = v["value"] if isinstance(v, dict) else v
    return bool(value >= 10)


def split_words(text: str) -> list[str]:
    return text.split()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``check`` until it holds, failing after ``timeout`` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        await asyncio.sleep(0.01)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def countdown(x: float) -> list[list[Any]]:
    """A router: recurse while x > 0."""
    return [["again", 1.0]] if x > 0 else [["done", 1.0]]


def minus_one(x: float) -> float:
    return x - 1


class Broken(cascada.Actor):
    """An actor that cannot start."""

    async def on_start(self) -> None:
        raise RuntimeError("this stage is broken on purpose")

    async def run(self, x: Any) -> Any:
        return x


def halves(xs: list[float]) -> list[float]:
    return [x / 2 for x in xs]
