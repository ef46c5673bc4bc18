"""Dynamic batching: many single requests in, one batched call out, results back to each.

Pure asyncio, no actors and no torch: ``DynamicBatcher(fn, max_batch, max_wait)`` runs in any
event loop, and the Expert actor feeds it from a ``@cascada.concurrent`` handler.

When a batch is flushed (the first rule that fires):

1. it holds ``max_batch`` items;
2. ``max_wait`` seconds passed since the oldest item it holds arrived;
3. the earliest deadline among the items it holds would otherwise be missed: at
   ``deadline - estimate - deadline_slack``, where the estimate is an EWMA of measured
   batch times and the slack covers the reply's trip and timer lateness;
4. the batcher is closing with ``drain=True``.

An item whose deadline has already passed when its batch is formed (or when it is submitted)
fails with ``DeadlineExceeded`` and is not computed; a caller that stopped waiting (its task
was cancelled) is skipped. Items are taken first in, first out, one batch at a time: a batch
is computed only when the previous one finished, so items that arrive meanwhile form the
next batch.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..actors import ConfigurationError, DeadlineExceeded
from ._errors import BatcherClosed

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[list[T]], Awaitable[Sequence[R]] | Sequence[R]]


@dataclass
class BatchStats:
    """Counters of a DynamicBatcher. ``sizes`` maps a batch size to how many batches had it;
    ``seconds`` is the summed time of the batched calls; ``ewma_seconds`` the current
    estimate of one batch's time."""

    batches: int = 0
    items: int = 0
    expired: int = 0
    failed: int = 0
    cancelled: int = 0
    seconds: float = 0.0
    ewma_seconds: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "expired": self.expired, "failed": self.failed,
                "cancelled": self.cancelled, "seconds": self.seconds, "ewma_seconds": self.ewma_seconds,
                "mean_batch_size": self.mean_batch_size,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class _Item(Generic[T, R]):
    __slots__ = ("value", "fut", "deadline", "arrived")

    def __init__(self, value: T, fut: asyncio.Future[R], deadline: float | None, arrived: float) -> None:
        self.value = value
        self.fut = fut
        self.deadline = deadline  # absolute time.time(), or None
        self.arrived = arrived  # loop.time()


class DynamicBatcher(Generic[T, R]):
    """Collects items submitted one at a time and calls ``fn(list_of_items)`` on batches.

    - ``fn``: takes a list of items and returns one result per item, in order; sync or async
      (an async ``fn`` lets the loop keep accepting items while a batch computes, e.g. by
      running the model in a thread).
    - ``max_batch``: the most items per call (1 switches batching off).
    - ``max_wait``: the longest an item waits for others, in seconds, counted from the oldest
      held item's arrival.
    - ``ewma``: weight of the newest measurement in the batch-time estimate;
      ``initial_estimate``: the estimate before any batch was measured.
    - ``deadline_slack``: seconds kept in hand before a deadline, on top of the estimate,
      for the result's way back to the caller and late timers (default 5 ms).

    ``await submit(item, deadline=None)`` returns that item's result or raises what ``fn``
    raised for its batch (``DeadlineExceeded`` if it expired first, ``BatcherClosed`` if the
    batcher closed). ``await aclose()`` stops it.
    """

    def __init__(self, fn: BatchFn[T, R], max_batch: int, max_wait: float, *, ewma: float = 0.2,
                 initial_estimate: float = 0.001, deadline_slack: float = 0.005, name: str = "batcher") -> None:
        where = f"DynamicBatcher({name})"
        if not callable(fn):
            raise ConfigurationError(f"{where}: fn must be callable, got {fn!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigurationError(f"{where}: max_batch must be an integer >= 1, got {max_batch!r}")
        if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or not 0.0 <= max_wait < math.inf:
            raise ConfigurationError(f"{where}: max_wait must be a finite number of seconds >= 0, got {max_wait!r}")
        if not (isinstance(ewma, (int, float)) and 0.0 < ewma <= 1.0):
            raise ConfigurationError(f"{where}: ewma must be in (0, 1], got {ewma!r}")
        if not (isinstance(initial_estimate, (int, float)) and 0.0 <= initial_estimate < math.inf):
            raise ConfigurationError(f"{where}: initial_estimate must be a finite number >= 0, "
                                     f"got {initial_estimate!r}")
        if not (isinstance(deadline_slack, (int, float)) and 0.0 <= deadline_slack < math.inf):
            raise ConfigurationError(f"{where}: deadline_slack must be a finite number >= 0, got {deadline_slack!r}")
        self.fn = fn
        self.deadline_slack = float(deadline_slack)
        self.max_batch = max_batch
        self.max_wait = float(max_wait)
        self.name = name
        self._alpha = float(ewma)
        self._stats = BatchStats(ewma_seconds=float(initial_estimate))
        self._measured = False
        self._queue: deque[_Item[T, R]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._wake_at: float | None = None
        self._computing = False
        self._closed = False
        self._draining = False
        self._idle: asyncio.Future[None] | None = None

    # -- the caller's side --------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Items waiting to be batched (not counting a batch being computed)."""
        return len(self._queue)

    @property
    def computing(self) -> bool:
        """Whether a batch is being computed now."""
        return self._computing

    def stats(self) -> BatchStats:
        return self._stats

    def estimate(self) -> float:
        """Seconds one batch is expected to take (EWMA of measured batch times)."""
        return self._stats.ewma_seconds

    async def submit(self, item: T, deadline: float | None = None) -> R:
        """Queue ``item`` and wait for its result. ``deadline`` is an absolute ``time.time()``."""
        if self._closed:
            raise BatcherClosed(f"{self.name}: closed; the item was not computed")
        if deadline is not None and deadline <= time.time():
            self._stats.expired += 1
            raise DeadlineExceeded(f"{self.name}: the deadline passed before the item was queued; not computed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append(_Item(item, fut, deadline, loop.time()))
        if self._task is None:
            self._task = loop.create_task(self._run(), name=f"{self.name} worker")
        wake_at = self._wake_at
        if wake_at is None or len(self._queue) >= self.max_batch or (
                deadline is not None and self._deadline_at(loop.time(), deadline) < wake_at):
            self._poke()  # else the worker already sleeps until an earlier flush
        return await fut

    async def aclose(self, *, drain: bool = True) -> None:
        """Stop taking items. With ``drain``, compute every item already queued first (at once,
        without waiting for more); without, fail them with BatcherClosed."""
        self._closed = True
        task = self._task
        if task is None:
            return
        if drain and not task.done():
            self._draining = True
            while (self._queue or self._computing) and not task.done():
                self._idle = asyncio.get_running_loop().create_future()
                self._poke()
                await asyncio.shield(self._idle)
        task.cancel()
        await asyncio.wait([task])  # a cancellation of aclose itself still propagates
        self._fail_all(BatcherClosed(f"{self.name}: closed while the item waited; it was not computed"))
        if not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"{self.name}: the batcher's worker failed") from task.exception()

    # -- the worker --------------------------------------------------------------------------------

    def _poke(self) -> None:
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    async def _sleep(self, until: float | None) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._wake, self._wake_at = fut, until
        handle = None if until is None else loop.call_at(until, _wake_up, fut)
        try:
            await fut
        finally:
            self._wake = self._wake_at = None
            if handle is not None:
                handle.cancel()

    def _fail_all(self, exc: BaseException) -> None:
        while self._queue:
            it = self._queue.popleft()
            if not it.fut.done():
                it.fut.set_exception(exc)

    def _prune(self) -> None:
        """Drop items whose caller left, fail those whose deadline passed."""
        q = self._queue
        if not q:
            return
        now = time.time()
        if not any(it.fut.done() or (it.deadline is not None and it.deadline <= now) for it in q):
            return
        keep: deque[_Item[T, R]] = deque()
        for it in q:
            if it.fut.done():
                self._stats.cancelled += 1
            elif it.deadline is not None and it.deadline <= now:
                self._stats.expired += 1
                it.fut.set_exception(DeadlineExceeded(
                    f"{self.name}: the deadline passed while the item waited for a batch; it was not computed"))
            else:
                keep.append(it)
        self._queue = keep

    def _deadline_at(self, now: float, deadline: float) -> float:
        """Loop time by which an item with this deadline must be flushed."""
        return now + (deadline - time.time()) - self._stats.ewma_seconds - self.deadline_slack

    def _flush_at(self, now: float) -> float:
        """Loop time at which the held items must be flushed."""
        q = self._queue
        if self._draining or len(q) >= self.max_batch:
            return now
        at = q[0].arrived + self.max_wait
        earliest = min((it.deadline for it in q if it.deadline is not None), default=None)
        if earliest is not None:
            at = min(at, self._deadline_at(now, earliest))
        return at

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                idle = self._idle
                if not self._queue and idle is not None and not idle.done():
                    idle.set_result(None)
                if not self._queue:
                    await self._sleep(None)
                    continue
                self._prune()
                if not self._queue:
                    continue
                now = loop.time()
                at = self._flush_at(now)
                if at > now:
                    await self._sleep(at)
                    continue
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                await self._compute(batch)
        except BaseException as exc:
            # Whatever stopped the worker (aclose cancelling it, or a bug), no caller is left waiting.
            self._fail_all(BatcherClosed(f"{self.name}: the batcher stopped ({type(exc).__name__}); "
                                         "the item was not computed"))
            raise
        finally:
            idle = self._idle
            if idle is not None and not idle.done():
                idle.set_result(None)

    async def _compute(self, batch: list[_Item[T, R]]) -> None:
        stats = self._stats
        self._computing = True
        t0 = time.perf_counter()
        try:
            out = self.fn([it.value for it in batch])
            if inspect.isawaitable(out):
                out = await out
            results = list(out)
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: the batch function returned {len(results)} results for "
                                   f"{len(batch)} items; it must return one per item, in order")
        except asyncio.CancelledError:
            for it in batch:
                if not it.fut.done():
                    it.fut.set_exception(BatcherClosed(f"{self.name}: closed while the item's batch computed"))
            raise
        except Exception as exc:
            stats.failed += len(batch)
            for it in batch:
                if not it.fut.done():
                    it.fut.set_exception(exc)
        else:
            for it, r in zip(batch, results):
                if not it.fut.done():
                    it.fut.set_result(r)
        finally:
            self._computing = False
        dt = time.perf_counter() - t0
        stats.batches += 1
        stats.items += len(batch)
        stats.seconds += dt
        stats.sizes[len(batch)] = stats.sizes.get(len(batch), 0) + 1
        if self._measured:
            stats.ewma_seconds += self._alpha * (dt - stats.ewma_seconds)
        else:
            stats.ewma_seconds, self._measured = dt, True


def _wake_up(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
