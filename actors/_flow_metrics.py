"""Counters a flow keeps about its requests and each of its steps, read by ``metrics()``.

Latencies are kept as the last ``WINDOW`` samples (a ring), so the percentiles describe the
recent past and memory stays bounded however long the flow serves. Compute is accounted
from what a step answers: a dict result with ``"macs"`` or ``"cost"`` adds them up;
wall-clock seconds are always counted.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any

from ..transport._errors import DeadlineExceeded

WINDOW = 2048


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (an observed sample); 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def compute_of(result: Any) -> tuple[float | None, float | None]:
    """The ``(macs, cost)`` a step's result reports (None where it reports nothing)."""
    if not isinstance(result, dict):
        return None, None
    return _number(result.get("macs")), _number(result.get("cost"))


class Latency:
    """A count and a ring of the last WINDOW durations (seconds)."""

    __slots__ = ("count", "samples")

    def __init__(self) -> None:
        self.count = 0
        self.samples: deque[float] = deque(maxlen=WINDOW)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.samples.append(seconds)

    def snapshot(self) -> dict[str, float]:
        values = list(self.samples)
        return {"p50_ms": percentile(values, 0.50) * 1e3, "p95_ms": percentile(values, 0.95) * 1e3,
                "max_ms": max(values, default=0.0) * 1e3}


class StepStats:
    """One step of a flow: calls, outcomes, latency and compute."""

    __slots__ = ("calls", "ok", "errors", "cancelled", "deadline", "latency", "seconds", "macs", "cost")

    def __init__(self) -> None:
        self.calls = 0
        self.ok = 0
        self.errors = 0
        self.cancelled = 0
        self.deadline = 0
        self.latency = Latency()
        self.seconds = 0.0
        self.macs = 0.0
        self.cost = 0.0

    def record(self, seconds: float, result: Any) -> None:
        self.ok += 1
        self.latency.add(seconds)
        self.seconds += seconds
        if type(result) is dict:
            macs, cost = compute_of(result)
            if macs is not None:
                self.macs += macs
            if cost is not None:
                self.cost += cost

    def snapshot(self) -> dict[str, Any]:
        return {"calls": self.calls, "ok": self.ok, "errors": self.errors, "cancelled": self.cancelled,
                "deadline_exceeded": self.deadline, **self.latency.snapshot(), "seconds": self.seconds,
                "macs": self.macs, "cost": self.cost}


class FlowStats:
    """The flow's own requests (what its callers see)."""

    __slots__ = ("requests", "ok", "errors", "cancelled", "deadline", "in_flight", "latency")

    def __init__(self) -> None:
        self.requests = 0
        self.ok = 0
        self.errors = 0
        self.cancelled = 0
        self.deadline = 0
        self.in_flight = 0
        self.latency = Latency()

    def failed(self, exc: BaseException) -> None:
        """Count a request that ended with exc: cancelled (or left early by its consumer),
        past its deadline, or an error."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.cancelled += 1
        elif isinstance(exc, DeadlineExceeded):
            self.deadline += 1
        else:
            self.errors += 1

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "ok": self.ok, "errors": self.errors, "cancelled": self.cancelled,
                "deadline_exceeded": self.deadline, "in_flight": self.in_flight, **self.latency.snapshot()}


def rate(part: int, whole: int) -> float | None:
    """part / whole, None when whole is 0 (no data rather than a made-up 0)."""
    return part / whole if whole else None
