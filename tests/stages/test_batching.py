"""DynamicBatcher in one event loop: batches form, lone items wait at most max_wait, deadlines
flush early or drop items uncomputed, results reach the right callers, errors and closing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import cascada
from cascada.stages import BatcherClosed, DynamicBatcher


class Model:
    """A batch function that records every batch it computed; ``gate`` holds it mid-batch."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return [x * 10 for x in items]

    @property
    def computed(self) -> list[Any]:
        return [x for b in self.batches for x in b]


async def wait_until(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.002)


async def test_batches_form_under_load_and_results_reach_their_callers() -> None:
    model = Model()
    b: DynamicBatcher[int, int] = DynamicBatcher(model, max_batch=8, max_wait=0.05)
    results = await asyncio.gather(*[b.submit(i) for i in range(20)])
    assert results == [i * 10 for i in range(20)]
    assert [len(x) for x in model.batches] == [8, 8, 4]
    s = b.stats()
    assert (s.batches, s.items, s.sizes) == (3, 20, {8: 2, 4: 1})
    assert s.mean_batch_size == pytest.approx(20 / 3)
    await b.aclose()


async def test_interleaved_callers_each_get_their_own_result() -> None:
    model = Model()
    b: DynamicBatcher[int, int] = DynamicBatcher(model, max_batch=5, max_wait=0.01)

    async def caller(i: int) -> tuple[int, int]:
        for _ in range(i % 7):  # stagger the arrivals across loop iterations
            await asyncio.sleep(0)
        return i, await b.submit(i)

    out = await asyncio.gather(*[caller(i) for i in range(60)])
    assert all(r == i * 10 for i, r in out)
    assert sorted(model.computed) == list(range(60))
    assert max(len(x) for x in model.batches) > 1
    await b.aclose()


async def test_a_lone_item_waits_about_max_wait_and_no_longer() -> None:
    max_wait = 0.05
    b: DynamicBatcher[int, int] = DynamicBatcher(Model(), max_batch=32, max_wait=max_wait)
    t0 = time.perf_counter()
    assert await b.submit(1) == 10
    waited = time.perf_counter() - t0
    assert max_wait * 0.8 <= waited < max_wait + 0.25  # generous: two noisy cores
    await b.aclose()


async def test_a_full_batch_goes_at_once() -> None:
    b: DynamicBatcher[int, int] = DynamicBatcher(Model(), max_batch=4, max_wait=30.0)
    t0 = time.perf_counter()
    assert await asyncio.gather(*[b.submit(i) for i in range(4)]) == [0, 10, 20, 30]
    assert time.perf_counter() - t0 < 2.0
    await b.aclose()


async def test_max_batch_one_computes_each_item_alone_at_once() -> None:
    model = Model()
    b: DynamicBatcher[int, int] = DynamicBatcher(model, max_batch=1, max_wait=30.0)
    assert await asyncio.gather(*[b.submit(i) for i in range(5)]) == [0, 10, 20, 30, 40]
    assert [len(x) for x in model.batches] == [1] * 5
    await b.aclose()


async def test_an_item_near_its_deadline_is_flushed_early() -> None:
    # max_wait would hold it 30 s; its deadline (0.4 s away) minus the batch-time estimate
    # (0.1 s) flushes it at about 0.3 s.
    b: DynamicBatcher[int, int] = DynamicBatcher(Model(), max_batch=8, max_wait=30.0, initial_estimate=0.1)
    t0 = time.perf_counter()
    assert await b.submit(7, deadline=time.time() + 0.4) == 70
    waited = time.perf_counter() - t0
    assert 0.2 <= waited < 0.4
    await b.aclose()


async def test_expired_items_fail_and_are_not_computed() -> None:
    model = Model()
    model.gate = asyncio.Event()
    b: DynamicBatcher[int, int] = DynamicBatcher(model, max_batch=2, max_wait=0.0)
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.wait_for(model.entered.wait(), 5)  # batch [1] is computing, held by the gate
    deadline = time.time() + 0.05
    late = asyncio.ensure_future(b.submit(2, deadline=deadline))
    fine = asyncio.ensure_future(b.submit(3))
    await wait_until(lambda: time.time() > deadline)
    model.gate.set()
    assert await first == 10
    with pytest.raises(cascada.DeadlineExceeded, match="not computed"):
        await late
    assert await fine == 30
    assert model.computed == [1, 3]
    assert b.stats().expired == 1
    with pytest.raises(cascada.DeadlineExceeded):
        await b.submit(4, deadline=time.time() - 1)
    assert 4 not in model.computed and b.stats().expired == 2
    await b.aclose()


async def test_a_cancelled_caller_is_skipped() -> None:
    model = Model()
    model.gate = asyncio.Event()
    b: DynamicBatcher[int, int] = DynamicBatcher(model, max_batch=4, max_wait=0.0)
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.wait_for(model.entered.wait(), 5)
    gone = asyncio.ensure_future(b.submit(2))
    kept = asyncio.ensure_future(b.submit(3))
    await wait_until(lambda: b.pending == 2)
    gone.cancel()
    model.gate.set()
    assert (await first, await kept) == (10, 30)
    assert model.computed == [1, 3]
    assert b.stats().cancelled == 1
    await b.aclose()


async def test_the_estimate_follows_measured_batch_times() -> None:
    async def slow(items: list[int]) -> list[int]:
        await asyncio.sleep(0.02)
        return items

    b: DynamicBatcher[int, int] = DynamicBatcher(slow, max_batch=2, max_wait=0.0, initial_estimate=5.0)
    assert b.estimate() == 5.0
    await b.submit(1)
    assert 0.015 < b.estimate() < 1.0  # the first measurement replaces the initial guess
    await b.aclose()


async def test_a_failing_batch_fails_its_callers_and_the_next_batch_runs() -> None:
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:  # a sync batch function works too
        calls.append(items)
        if 13 in items:
            raise ValueError("unlucky batch")
        return [-x for x in items]

    b: DynamicBatcher[int, int] = DynamicBatcher(fn, max_batch=2, max_wait=0.01)
    bad = await asyncio.gather(b.submit(13), b.submit(14), return_exceptions=True)
    assert all(isinstance(e, ValueError) for e in bad)
    assert await b.submit(5) == -5
    assert b.stats().failed == 2
    await b.aclose()


async def test_a_batch_function_returning_the_wrong_count_is_an_error() -> None:
    b: DynamicBatcher[int, int] = DynamicBatcher(lambda items: items[:1], max_batch=3, max_wait=0.0)
    with pytest.raises(RuntimeError, match="1 results for 3 items"):
        await asyncio.gather(b.submit(1), b.submit(2), b.submit(3))
    await b.aclose()


async def test_close_drains_or_fails_what_waits() -> None:
    model = Model()
    b: DynamicBatcher[int, int] = DynamicBatcher(model, max_batch=8, max_wait=30.0)
    waiting = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
    await wait_until(lambda: b.pending == 3)
    await b.aclose(drain=True)  # computed at once, without waiting 30 s
    assert [await w for w in waiting] == [0, 10, 20]
    with pytest.raises(BatcherClosed):
        await b.submit(9)

    b2: DynamicBatcher[int, int] = DynamicBatcher(Model(), max_batch=8, max_wait=30.0)
    left = asyncio.ensure_future(b2.submit(1))
    await wait_until(lambda: b2.pending == 1)
    await b2.aclose(drain=False)
    with pytest.raises(BatcherClosed):
        await left


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch": 0, "max_wait": 0.0}, "max_batch"),
    ({"max_batch": 2.5, "max_wait": 0.0}, "max_batch"),
    ({"max_batch": 2, "max_wait": -1.0}, "max_wait"),
    ({"max_batch": 2, "max_wait": float("inf")}, "max_wait"),
    ({"max_batch": 2, "max_wait": 0.0, "ewma": 0.0}, "ewma"),
])
async def test_bad_batcher_config_is_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(cascada.ConfigurationError, match=match):
        DynamicBatcher(Model(), **kwargs)
    with pytest.raises(cascada.ConfigurationError, match="callable"):
        DynamicBatcher(42, max_batch=1, max_wait=0.0)  # type: ignore[arg-type]
