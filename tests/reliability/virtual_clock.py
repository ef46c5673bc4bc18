"""A virtual clock for asyncio tests: an event loop whose time only moves when it has
nothing else to do, and a matching ``time.time``/``time.monotonic`` for the runtime.

The "time-travel loop" (the trick of asynctest's ``ClockedTestCase`` and of ``looptime``):

- ``VirtualTimeLoop`` is a plain ``asyncio.SelectorEventLoop`` (never uvloop: uvloop keeps
  its timers in libuv, whose clock a subclass cannot move) whose ``time()`` returns the
  clock's virtual monotonic seconds. Every timer (``call_later``, ``asyncio.sleep``,
  ``wait_for``, ``asyncio.timeout``) is scheduled and fired on that clock.
- Its selector never sleeps. The loop asks it to wait ``timeout`` seconds only when no
  callback is ready (``timeout`` is then the time until the earliest timer); the selector
  polls the real file descriptors without blocking and, if none is ready, moves the clock
  forward by ``timeout`` and returns. The loop then runs the timers now due. So a program
  that waits 30 s of loop time runs in microseconds, and everything that happens at the
  same virtual instant happens in the same order on every run (the loop is deterministic
  given the same callbacks).
- With nothing scheduled at all (``timeout is None``) it does block for real: only another
  thread (``call_soon_threadsafe``) or a real fd can wake the loop then.
- ``VirtualClock.patch_time()`` replaces ``time.time``, ``time.monotonic`` (and their
  ``_ns`` twins) in the ``time`` module while it is in force. cascada reads the wall clock
  through the module (``time.time()``: deadlines are absolute wall-clock values carried in
  the message and compared by the receiver) and the monotonic one for its supervisor's
  restart window; both then read ``WALL_EPOCH + (virtual - start)`` and the virtual
  seconds, so wall-clock deadlines and loop timers move together. Code that bound the
  functions at import (``from time import monotonic``, as ``threading`` does) keeps the real
  clock. Patch only while the loop runs: between steps the test's own machinery (pytest,
  hypothesis) keeps real time.

Limits: time does not pass while a callback computes, so CPU-bound work takes no virtual
time; real I/O or another thread's work races the clock (the clock jumps past timers while
a thread is busy). Use it for single-threaded, in-loop code (colocated actors).
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import time
from collections.abc import Iterator, Mapping
from typing import Any

#: time.time() at virtual second ``start``: 2023-11-14T22:13:20Z, a plausible wall clock.
WALL_EPOCH = 1_700_000_000.0
#: The virtual monotonic clock's first value (not 0: code may treat 0 as "unset").
MONOTONIC_START = 1_000.0


class VirtualClock:
    """Virtual seconds that move only when told to (by the selector, or ``advance``)."""

    def __init__(self, start: float = MONOTONIC_START, wall_epoch: float = WALL_EPOCH) -> None:
        self._start = float(start)
        self._now = float(start)
        self._wall_epoch = float(wall_epoch)
        self.jumps = 0  # how many times the selector moved the clock
        self._real: tuple[Any, Any, Any, Any] | None = None

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        """The wall clock: WALL_EPOCH at the start, moving with the virtual seconds."""
        return self.wall(self._now)

    def wall(self, t: float) -> float:
        """The time.time() value at virtual monotonic time t."""
        return self._wall_epoch + (t - self._start)

    def monotonic_ns(self) -> int:
        return int(round(self._now * 1e9))

    def time_ns(self) -> int:
        return int(round(self.time() * 1e9))

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the clock started."""
        return self._now - self._start

    def advance(self, dt: float) -> None:
        """Move the clock forward by dt seconds. The loop's selector does this; a test should
        rather ``await asyncio.sleep(dt)`` on the loop, which fires every timer due on the way
        at its own instant."""
        if not dt >= 0:
            raise ValueError(f"a clock only moves forward, not by {dt!r}")
        self._now += dt

    @contextlib.contextmanager
    def patch_time(self) -> Iterator[VirtualClock]:
        """time.time, time.monotonic (and the _ns forms) read this clock inside the block."""
        if self._real is not None:  # nested: already in force
            yield self
            return
        self._real = (time.time, time.monotonic, time.time_ns, time.monotonic_ns)
        setattr(time, "time", self.time)
        setattr(time, "monotonic", self.monotonic)
        setattr(time, "time_ns", self.time_ns)
        setattr(time, "monotonic_ns", self.monotonic_ns)
        try:
            yield self
        finally:
            real, self._real = self._real, None
            setattr(time, "time", real[0])
            setattr(time, "monotonic", real[1])
            setattr(time, "time_ns", real[2])
            setattr(time, "monotonic_ns", real[3])


class TimeTravelSelector(selectors.BaseSelector):
    """Wraps a real selector: ``select(timeout)`` polls without blocking and, when nothing is
    ready, advances the clock by ``timeout`` instead of sleeping."""

    def __init__(self, clock: VirtualClock, real: selectors.BaseSelector | None = None) -> None:
        self.clock = clock
        self._real = real if real is not None else selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            return self._real.select(None)  # nothing scheduled: only a real event can come
        ready = self._real.select(0)
        if ready or timeout <= 0:
            return ready
        self.clock.advance(timeout)
        self.clock.jumps += 1
        return []

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop on a VirtualClock (see the module docstring)."""

    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock if clock is not None else VirtualClock()
        super().__init__(TimeTravelSelector(self.clock))

    def time(self) -> float:
        return self.clock.monotonic()

    def run_virtual(self, coro: Any) -> Any:
        """run_until_complete with time.time/time.monotonic on the virtual clock."""
        with self.clock.patch_time():
            return self.run_until_complete(coro)


def run_virtual(coro: Any, clock: VirtualClock | None = None) -> Any:
    """asyncio.run for a virtual-time test: a fresh VirtualTimeLoop, closed afterwards."""
    loop = VirtualTimeLoop(clock)
    try:
        return loop.run_virtual(coro)
    finally:
        try:
            loop.run_virtual(loop.shutdown_asyncgens())
        finally:
            loop.close()
