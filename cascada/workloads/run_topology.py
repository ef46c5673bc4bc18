"""``cascada run FILE.toml``: build a topology file and push items through its top flow.

The file is a topology as ``cascada.build_topology`` reads it (``top``, ``[actors.*]``,
``[flows.*]``) plus one table of its own, ``[run]``, saying what to feed it::

    [run]
    source = "cascada.workloads.run_f1:test_items"   # import path of a callable returning an iterable
    args = []                                        # optional: its arguments
    kwargs = {}                                      # optional
    method = "run"                                   # optional: the top flow's method (default "run")
    requests = 200                                   # optional: at most this many items (--requests wins)
    in_flight = 32                                   # optional: requests at once (default 32)
    timeout = 60.0                                   # optional: seconds per request
    preload = ["torch"]                              # optional: modules the forkserver imports once

Every item is sent as ``top.ask(method, item)``. The summary gives the items answered and
failed, throughput, latency p50/p95, every actor's pid and request count, and the top flow's
metrics when it is a flow (a cascade's answers per tier, ...). Any mistake in the file is a
:class:`TopologyRunError` (one line) raised before anything is spawned.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from ..actors import ActorSystem, CascadaError, ConfigurationError
from . import run_common as rc

_RUN_KEYS = frozenset(("source", "args", "kwargs", "method", "requests", "in_flight", "timeout", "preload"))
QUICK_REQUESTS = 100


class TopologyRunError(Exception):
    """The file cannot be run: unreadable, not a topology, or a bad ``[run]`` table."""


def read(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The topology part and the ``[run]`` table of a TOML file, both checked (nothing spawned)."""
    if not os.path.isfile(path):
        raise TopologyRunError(f"no such file: {path}")
    if sys.version_info < (3, 11):
        raise TopologyRunError("reading a topology file needs Python 3.11+ (tomllib)")
    import tomllib

    from .._topology import load_topology

    try:
        with open(path, "rb") as fh:
            spec = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TopologyRunError(f"{path}: not a readable TOML file: {exc}") from None
    run = spec.pop("run", None)
    if not isinstance(run, Mapping):
        raise TopologyRunError(f"{path}: needs a [run] table with source = 'package.module:callable' (what to feed "
                               "the top flow)")
    unknown = sorted(set(run) - _RUN_KEYS)
    if unknown:
        raise TopologyRunError(f"{path}: run.{unknown[0]}: unknown key (known: {', '.join(sorted(_RUN_KEYS))})")
    if not isinstance(run.get("source"), str):
        raise TopologyRunError(f"{path}: run.source must be an import path 'package.module:callable'")
    if not isinstance(run.get("method", "run"), str):
        raise TopologyRunError(f"{path}: run.method must be a string")
    for key in ("requests", "in_flight"):
        v = run.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise TopologyRunError(f"{path}: run.{key} must be an integer >= 1, got {v!r}")
    try:
        load_topology(spec)
    except ConfigurationError as exc:
        raise TopologyRunError(f"{path}: {exc}") from None
    return spec, dict(run)


def _items(path: str, run: Mapping[str, Any], limit: int | None) -> list[Any]:
    from .._topology import _import

    try:
        source = _import(run["source"], "run.source")
    except ConfigurationError as exc:
        raise TopologyRunError(f"{path}: {exc}") from None
    if not callable(source):
        raise TopologyRunError(f"{path}: run.source {run['source']!r} is not callable")
    try:
        it = source(*run.get("args", []), **run.get("kwargs", {}))
        return list(itertools.islice(it, limit) if limit is not None else it)
    except Exception as exc:
        raise TopologyRunError(f"{path}: run.source {run['source']!r} raised {type(exc).__name__}: {exc}") from None


async def run_async(path: str, *, requests: int | None = None, quick: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Build the topology in ``path``, push its items, return the figures."""
    from .._topology import build_topology

    spec, run = read(path)
    limit = requests if requests is not None else (QUICK_REQUESTS if quick else run.get("requests"))
    items = _items(path, run, limit)
    if not items:
        raise TopologyRunError(f"{path}: run.source gave no items")
    method = str(run.get("method", "run"))
    in_flight = int(run.get("in_flight", 32))
    timeout = float(run.get("timeout", 60.0))
    t_start = time.perf_counter()
    async with ActorSystem(preload=list(run.get("preload", []))) as system:
        built = await build_topology(system, spec)
        startup = time.perf_counter() - t_start
        errors: Counter[str] = Counter()

        async def call(item: Any) -> Any:
            try:
                return await built.top.ask(method, item, timeout=timeout)
            except CascadaError as exc:
                errors[type(exc).__name__] += 1
                return exc

        bar = rc.Progress(os.path.basename(path)[:12], len(items), enabled=progress)
        t0 = time.perf_counter()
        results, lat = await rc.push(items, call, in_flight, bar)
        elapsed = time.perf_counter() - t0
        refs = [built.refs[name] for name in built.order]
        kinds = {name: ("flow " + str(spec.get("flows", {})[name].get("kind")) if name in spec.get("flows", {})
                        else str(spec.get("actors", {})[name].get("class"))) for name in built.order}
        actors = await rc.actor_figures(system, refs, {built.refs[k].name: v for k, v in kinds.items()})
        metrics: dict[str, Any] | None = None
        if built.order and any(built.top.name == built.refs[n].name for n in spec.get("flows", {})):
            try:
                metrics = await built.top.ask("metrics")
            except CascadaError:
                metrics = None
    ok = [r for r in results if not isinstance(r, BaseException)]
    figures: dict[str, Any] = {
        "topology": os.path.abspath(path), "top": built.top.name, "method": method, "requests": len(items),
        "ok": len(ok), "errors": dict(errors), "in_flight": in_flight,
        "throughput_items_per_s": round(len(items) / elapsed, 1) if elapsed > 0 else 0.0,
        "elapsed_s": round(elapsed, 3), "latency_ms": rc.latency_ms(lat), "startup_s": round(startup, 3),
        "actors": actors, "driver_pid": os.getpid(),
        "distinct_processes": len({a["pid"] for a in actors} | {os.getpid()}),
    }
    if ok and all(isinstance(r, Mapping) and "tier" in r for r in ok):
        tiers = Counter(int(r["tier"]) for r in ok)
        figures["answered_per_tier"] = {str(t): tiers[t] for t in sorted(tiers)}
        costs = [float(r.get("cost") or 0.0) for r in ok]
        figures["mean_cost"] = round(sum(costs) / len(costs), 3)
    if metrics is not None:
        figures["top_metrics"] = {k: metrics[k] for k in ("requests", "cascade", "route", "fanout", "loop")
                                  if k in metrics}
    return figures


def render(f: dict[str, Any]) -> str:
    lines = ["", f"cascada run {os.path.basename(f['topology'])}: {f['requests']} items through "
                 f"{f['top']}.{f['method']}, {f['in_flight']} in flight", ""]
    lines += rc.render_rows([[a["name"], a["role"], a["pid"], a["handled"]] for a in f["actors"]],
                            header=["actor", "kind", "pid", "handled"])
    lines.append(f"  driver pid {f['driver_pid']}; {f['distinct_processes']} distinct processes")
    lines.append("")
    pairs: list[tuple[str, Any]] = [("answered", f"{f['ok']} of {f['requests']}"),
                                    ("errors", ", ".join(f"{k} {v}" for k, v in f["errors"].items()) or "none")]
    if "answered_per_tier" in f:
        pairs.append(("answered per tier", ", ".join(f"tier{t}: {n}" for t, n in f["answered_per_tier"].items())))
        pairs.append(("mean cost", f["mean_cost"]))
    pairs += [("throughput", f"{f['throughput_items_per_s']:.0f} items/s ({f['elapsed_s']:.2f} s)"),
              ("latency p50 / p95", f"{f['latency_ms']['p50']:.2f} / {f['latency_ms']['p95']:.2f} ms"),
              ("startup", f"{f['startup_s']:.2f} s")]
    lines += rc.table("", pairs)[1:]
    lines.append("")
    return "\n".join(lines)


def main(path: str, *, requests: int | None = None, quick: bool = False, json_path: str | None = None,
         progress: bool = True) -> int:
    """Run a topology file; raises TopologyRunError for a bad file (the CLI's exit 2)."""
    from ..actors import run

    read(path)  # every mistake in the file before the event loop starts
    try:
        figures = run(run_async(path, requests=requests, quick=quick, progress=progress))
    except CascadaError as exc:
        print(f"cascada run {path} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(render(figures))
    if json_path:
        rc.write_json(json_path, figures)
    return 0 if figures["ok"] == figures["requests"] else 1
