"""What the runnable workloads (``run_f1``, ``run_f2``, ``run_f3``) share: a progress bar on
stderr, a pool of senders that keeps N requests in flight, percentiles, process figures,
the summary table and the JSON file.

Imports neither torch nor numpy.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ..actors import ActorRef, ActorSystem

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Progress", "actor_figures", "percentile", "push", "render_rows", "table", "write_json"]


class Progress:
    """A progress bar on stderr: one line rewritten in place on a terminal, a plain line per
    quarter otherwise (logs, CI), nothing at all when ``enabled`` is false."""

    WIDTH = 28

    def __init__(self, label: str, total: int, *, enabled: bool = True) -> None:
        self.label = label
        self.total = max(1, total)
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.done = 0
        self._shown = -1
        self._t0 = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        pct = 100 * min(self.done, self.total) // self.total
        if self.tty:
            filled = self.WIDTH * min(self.done, self.total) // self.total
            bar = "#" * filled + "." * (self.WIDTH - filled)
            rate = self.done / max(1e-9, time.perf_counter() - self._t0)
            sys.stderr.write(f"\r  {self.label:<12} [{bar}] {pct:3d}%  {self.done}/{self.total}  {rate:7.0f}/s")
            if self.done >= self.total:
                sys.stderr.write("\n")
        elif pct // 25 > self._shown:
            self._shown = pct // 25
            sys.stderr.write(f"  {self.label:<12} {pct:3d}%  ({self.done}/{self.total})\n")
        sys.stderr.flush()


async def push(items: Sequence[T], call: Callable[[T], Awaitable[R]], in_flight: int,
               progress: Progress | None = None) -> tuple[list[R], list[float]]:
    """Call ``call(item)`` for every item, ``in_flight`` at once; the results and latencies
    (seconds), both in item order. A fixed pool of senders, not a task per item."""
    results: list[Any] = [None] * len(items)
    latencies = [0.0] * len(items)
    todo = iter(range(len(items)))

    async def sender() -> None:
        for i in todo:  # one shared iterator: each item goes to exactly one sender
            t = time.perf_counter()
            results[i] = await call(items[i])
            latencies[i] = time.perf_counter() - t
            if progress is not None:
                progress.advance()

    await asyncio.gather(*(sender() for _ in range(max(1, min(in_flight, len(items))))))
    return results, latencies


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; 0.0 when empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def latency_ms(values: Sequence[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.50) * 1e3, 3), "p95": round(percentile(values, 0.95) * 1e3, 3)}


async def actor_figures(system: ActorSystem, refs: Sequence[ActorRef], roles: dict[str, str]) -> list[dict[str, Any]]:
    """Per actor: name, role, pid and the requests its process counted for it."""
    out = []
    for ref in refs:
        stats = await system.stats(ref)
        handled = sum(a["handled"] for a in stats["actors"] if a["name"] == ref.name)
        out.append({"name": ref.name, "role": roles.get(ref.name, ""), "pid": int(stats["pid"]),
                    "handled": int(handled)})
    return out


def render_rows(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, indent: str = "  ") -> list[str]:
    """A left/right aligned plain-text table: text columns left, numbers right."""
    cells = [[_cell(c) for c in r] for r in ([header] if header else []) + list(rows)]
    if not cells:
        return []
    n = max(len(r) for r in cells)
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(n)]
    numeric = [all(_is_num(r[i]) for r in rows if i < len(r)) for i in range(n)]
    lines = []
    for r in cells:
        parts = [c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append(indent + "  ".join(parts).rstrip())
    return lines


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _cell(x: Any) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    return str(x)


def table(title: str, pairs: Sequence[tuple[str, Any]]) -> list[str]:
    """A titled two-column block: ``label  value``."""
    width = max((len(k) for k, _ in pairs), default=0)
    return [title] + [f"  {k:<{width}}  {v}" for k, v in pairs]


def write_json(path: str, figures: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(figures, fh, indent=2, default=_jsonable)
        fh.write("\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)
