"""Core benchmark of cascada (issue #2): the runtime against raw-pyzmq floors, same run.

Run it from the repository root:

    .venv/bin/python scripts/bench_core.py            # full run, ~3-5 minutes
    .venv/bin/python scripts/bench_core.py --quick    # smoke check, under ~60 s
    .venv/bin/python scripts/bench_core.py --json out.json   # also write every record

Every cascada figure is printed next to a floor measured by scripts/_floors.py IN THIS RUN,
and the ratio of the two, so a noisy machine moves both sides together. Where noise is the
worst (the round trip), cascada and its floors are measured in alternating rounds (the
order rotates each round), and the ratio is the ratio of the medians over all rounds.

The figures:

``ask_rtt_us`` (placements unpinned, same-core, cross-core)
    One sequential ``await ref.ask("add", 2)`` to a process actor whose ``add`` returns 3:
    a small msgpack request and reply over ipc between two processes. Median and p99 in
    microseconds, against ``_floors.lean_echo_rtt`` (a lean asyncio DEALER/ROUTER echo doing
    the same msgpack work; target <= 1.3x it, goal 1.1x) and ``_floors.reqrep_rtt``
    (blocking REQ/REP, no asyncio; for information). For same-core and cross-core, every
    thread of both processes (this driver and the actor) is pinned with sched_setaffinity
    on each tid in /proc/<pid>/task after the actor is spawned and before warm-up:
    same-core = both on the first CPU, cross-core = driver on the first CPU, actor on the
    second. The driver's threads are put back on all its CPUs after each cascada round, so
    the floors (which pin themselves) run from an unpinned driver.

``ask_rtt_concurrent_us`` (the same placements and rounds; information)
    The same call to a ``@cascada.concurrent`` handler, against the plain handler of the
    same rounds: a concurrent handler that answers without awaiting should cost what a plain
    one does (both start straight from the socket's read callback).

``pipelined_calls_per_s`` (unpinned only)
    ``asyncio.gather`` of 1000 asks, repeated to ~20k calls; calls per second. Floor:
    ``_floors.lean_pipelined(in_flight=1000)``. Target >= 40k calls/s.

``tell_msgs_per_s`` (unpinned only)
    N ``await ref.tell("add", 2)`` then one ask to the same actor (per-sender FIFO means
    every tell was handled when the ask returns); messages per second. Floor:
    ``_floors.pushpull_msgpack`` (blocking PUSH, PULL+unpack). Target >= 250k msgs/s.

``spawn_8_torch_cold_s`` and ``spawn_8_torch_warm_s``
    Wall time to spawn 8 process actors whose ``on_start`` does ``import torch``, all at
    once (``asyncio.gather``), with ``ActorSystem(preload=("torch",))``. Cold: from entering
    the ``async with`` (so including the forkserver's start and its one torch import) to
    the 8th ready ref. Warm: 8 more in the same system, once the forkserver is up. Floor:
    ``_floors.plain_spawn_import("torch", 8)`` (8 spawn-started interpreters each importing
    torch). Target <= 0.15x the floor.

``idle_cpu_percent``
    CPU used by 10 idle process actors over 5 s (each asked once first, so every
    connection exists), in percent of one core, summed over the 10
    (``_floors.idle_cpu_percent``). Target < 1%.

``ray_*`` (only when ``ray`` is importable; it is not installed by this script)
    A Ray actor's sync-call round trip (``ray.get(a.add.remote(2))``) and 1000-in-flight
    calls/s, measured after the cascada figures, against the same-run unpinned floors.

Output: a table (figure, placement, cascada, floor, ratio, target, result) and one line per
record prefixed with ``JSON `` (``grep '^JSON '``), each a JSON object with figure, value,
unit, floor_name, floor_value, ratio, target, placement, pass (null for figures that are
information only) and some extra detail. Exit status is 0 whatever the figures; the table
says what passed.

Nothing is left behind: every ActorSystem stops its actors and forkserver on exit, _floors
stops its own children, and all temp dirs (cascada's ipc dirs, the floors' dirs) are made
inside one private directory that is checked and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _floors  # noqa: E402
import _report  # noqa: E402

import cascada  # noqa: E402

# Kept light on purpose: the floors start children with the "spawn" method, and each of
# them re-imports this file as __mp_main__. Nothing heavy (torch, ray) is imported here.


# --------------------------------------------------------------------------- actors


class Echo(cascada.Actor):
    """The small-message actor of every call figure."""

    async def add(self, k: int) -> int:
        return 3

    @cascada.concurrent
    async def add_concurrent(self, k: int) -> int:
        return 3


class TorchActor(cascada.Actor):
    """An actor that needs torch, imported in on_start (preloaded by the forkserver)."""

    async def on_start(self) -> None:
        import torch

        self.torch_version = torch.__version__

    async def version(self) -> str:
        return self.torch_version


# --------------------------------------------------------------------------- sizes


class Sizes:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.rtt_rounds = 2 if quick else 5
        self.rtt_n = 500 if quick else 2000
        self.pipe_rounds = 2 if quick else 5
        self.pipe_total = 5000 if quick else 20_000
        self.in_flight = 1000
        self.tell_rounds = 2 if quick else 5
        self.tell_n = 20_000 if quick else 100_000
        self.spawn_rounds = 1 if quick else 2
        self.spawn_k = 8
        self.idle_actors = 10
        self.idle_seconds = 2.0 if quick else 5.0


WARMUP = _floors.WARMUP_ROUNDS  # same sequential warm-up as the floors


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (an observed sample), the same rule as _floors."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking floor in a fresh thread, from an unpinned driver.

    The thread is made after the driver's threads are put back on every CPU, so it (and
    any child a floor spawns from it) starts unpinned; the floor pins what it needs itself.
    The event loop stays responsive meanwhile."""
    _floors.unpin_driver()
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor") as pool:
        return await loop.run_in_executor(pool, fn, *args)


def rotated(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


# --------------------------------------------------------------------------- records


RECORDS: list[dict[str, Any]] = []
ROWS: list[list[str]] = []


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "us":
        return f"{value:.1f} us"
    if unit in ("calls/s", "msgs/s"):
        return f"{value / 1000:.1f}k/s"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "%":
        return f"{value:.3f} %"
    return f"{value:.3g} {unit}"


def record(figure: str, value: float, unit: str, *, floor_name: str | None, floor_value: float | None,
           target: str, passed: bool | None, placement: str, shown: str | None = None,
           floor_shown: str | None = None, **extra: Any) -> dict[str, Any]:
    ratio = value / floor_value if floor_value else None
    rec = {
        "figure": figure, "value": value, "unit": unit, "floor_name": floor_name,
        "floor_value": floor_value, "ratio": ratio, "target": target, "placement": placement,
        "pass": passed, **extra,
    }
    RECORDS.append(rec)
    result = "info" if passed is None else ("PASS" if passed else "FAIL")
    ROWS.append([
        figure, placement, shown or fmt(value, unit),
        f"{floor_name}: {floor_shown or fmt(floor_value, unit)}" if floor_name else "-",
        f"{ratio:.2f}x" if ratio is not None else "-", target, result,
    ])
    return rec


def print_table() -> None:
    _report.print_table(["figure", "placement", "cascada", "floor", "ratio", "target", "result"], ROWS)


# --------------------------------------------------------------------------- 1. ask RTT


async def cascada_rtt(ref: cascada.ActorRef, n: int, method: str = "add") -> list[float]:
    ask = ref.ask
    for _ in range(WARMUP):
        await ask(method, 2)
    samples = [0.0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        await ask(method, 2)
        samples[i] = (clock() - t0) / 1000.0
    return samples


async def bench_rtt(system: cascada.ActorSystem, sz: Sizes) -> dict[str, dict[str, float]]:
    """All three placements; returns {placement: {"cascada": median, "lean": median}}."""
    summary: dict[str, dict[str, float]] = {}
    for placement in _floors.PLACEMENTS:
        effective, note = _floors.resolve_placement(placement)
        if note:
            log(f"{placement}: {note}")
        ref = await system.spawn(Echo, name=f"echo-{placement}", placement="process")
        assert await ref.ask("add", 2) == 3
        cpus, pinned = _floors.pin_driver_and(ref.pid, effective)
        if pinned:
            log(f"{placement}: {pinned} (the actor)")
        samples: dict[str, list[float]] = {"cascada": [], "lean": [], "reqrep": [], "concurrent": []}
        per_round: dict[str, list[float]] = {"cascada": [], "lean": [], "reqrep": [], "concurrent": []}

        async def run_cascada(method: str = "add") -> list[float]:
            if cpus is not None:
                _floors.set_all_threads(os.getpid(), cpus[0])  # back on its CPU after a floor
            try:
                return await cascada_rtt(ref, sz.rtt_n, method)
            finally:
                _floors.unpin_driver()

        async def run_concurrent() -> list[float]:
            return await run_cascada("add_concurrent")

        async def run_lean() -> list[float]:
            res = await in_thread(_floors.lean_echo_rtt, sz.rtt_n, effective)
            return list(res["samples_us"])

        async def run_reqrep() -> list[float]:
            res = await in_thread(_floors.reqrep_rtt, sz.rtt_n, effective)
            return list(res["samples_us"])

        steps: list[tuple[str, Callable[[], Awaitable[list[float]]]]] = [
            ("cascada", run_cascada), ("lean", run_lean), ("reqrep", run_reqrep), ("concurrent", run_concurrent)]
        for rnd in range(sz.rtt_rounds):
            for key, fn in rotated(steps, rnd):
                got = await fn()
                samples[key].extend(got)
                per_round[key].append(statistics.median(got))
            log(f"{placement} round {rnd + 1}/{sz.rtt_rounds}: " + ", ".join(
                f"{k} {per_round[k][-1]:.1f} us" for k in samples))
        _floors.unpin_driver()
        await system.stop(ref)

        med = {k: statistics.median(v) for k, v in samples.items()}
        p99 = {k: percentile(v, 0.99) for k, v in samples.items()}
        round_ratios = [c / f for c, f in zip(per_round["cascada"], per_round["lean"])]
        common = {"n": len(samples["cascada"]), "rounds": sz.rtt_rounds, "p99": p99["cascada"]}
        if effective != placement:
            common["requested_placement"] = placement
        ratio = med["cascada"] / med["lean"]
        record("ask_rtt_us", med["cascada"], "us", floor_name="lean_echo_rtt", floor_value=med["lean"],
               target="<=1.3x lean (goal 1.1x)", passed=ratio <= 1.3, placement=effective,
               shown=f"{med['cascada']:.1f} us (p99 {p99['cascada']:.0f})",
               floor_shown=f"{med['lean']:.1f} us (p99 {p99['lean']:.0f})",
               floor_p99=p99["lean"], round_medians=per_round["cascada"],
               floor_round_medians=per_round["lean"], round_ratios=round_ratios, **common)
        record("ask_rtt_us_vs_reqrep", med["cascada"], "us", floor_name="reqrep_rtt", floor_value=med["reqrep"],
               target="info", passed=None, placement=effective,
               shown=f"{med['cascada']:.1f} us (p99 {p99['cascada']:.0f})",
               floor_shown=f"{med['reqrep']:.1f} us (p99 {p99['reqrep']:.0f})",
               floor_p99=p99["reqrep"], floor_round_medians=per_round["reqrep"], **common)
        record("ask_rtt_concurrent_us", med["concurrent"], "us", floor_name="ask_rtt_us", floor_value=med["cascada"],
               target="info", passed=None, placement=effective,
               shown=f"{med['concurrent']:.1f} us (p99 {p99['concurrent']:.0f})",
               floor_shown=f"{med['cascada']:.1f} us (plain handler)",
               floor_round_medians=per_round["cascada"], round_medians=per_round["concurrent"], **common)
        summary[effective] = {"cascada": med["cascada"], "lean": med["lean"], "reqrep": med["reqrep"],
                              "cascada_p99": p99["cascada"], "lean_p99": p99["lean"]}
    return summary


# --------------------------------------------------------------------------- 2. pipelined


async def cascada_pipelined(ref: cascada.ActorRef, total: int, in_flight: int) -> float:
    ask = ref.ask
    for _ in range(WARMUP):
        await ask("add", 2)
    for _ in range(2):
        await asyncio.gather(*(ask("add", 2) for _ in range(in_flight)))
    batches = max(1, total // in_flight)
    t0 = time.perf_counter()
    for _ in range(batches):
        results = await asyncio.gather(*(ask("add", 2) for _ in range(in_flight)))
    seconds = time.perf_counter() - t0
    assert results[-1] == 3
    return batches * in_flight / seconds


async def interleave(label: str, rounds: int,
                     steps: list[tuple[str, Callable[[], Awaitable[float]]]]) -> dict[str, list[float]]:
    """Run each measurement once per round, rotating their order, so that drift in the
    machine's load hits cascada and its floor alike; returns every rate by name."""
    rates: dict[str, list[float]] = {key: [] for key, _ in steps}
    for rnd in range(rounds):
        for key, fn in rotated(steps, rnd):
            rates[key].append(await fn())
        log(f"{label} round {rnd + 1}/{rounds}: "
            + ", ".join(f"{key} {rates[key][-1]:.0f}/s" for key, _ in steps))
    return rates


async def bench_pipelined(system: cascada.ActorSystem, sz: Sizes) -> dict[str, float]:
    ref = await system.spawn(Echo, name="echo-pipelined", placement="process")

    async def run_cascada() -> float:
        return await cascada_pipelined(ref, sz.pipe_total, sz.in_flight)

    async def run_lean() -> float:
        res = await in_thread(_floors.lean_pipelined, sz.pipe_total, sz.in_flight, "unpinned", 1)
        return float(res["calls_per_s"])

    rates = await interleave("pipelined", sz.pipe_rounds, [("cascada", run_cascada), ("lean", run_lean)])
    await system.stop(ref)
    value = statistics.median(rates["cascada"])
    floor = statistics.median(rates["lean"])
    record("pipelined_calls_per_s", value, "calls/s", floor_name="lean_pipelined", floor_value=floor,
           target=">=40k/s", passed=value >= 40_000, placement="unpinned",
           in_flight=sz.in_flight, total=sz.pipe_total, rounds=sz.pipe_rounds,
           runs=rates["cascada"], floor_runs=rates["lean"])
    return {"cascada": value, "lean": floor}


# --------------------------------------------------------------------------- 3. tell


async def cascada_tell(ref: cascada.ActorRef, n: int) -> float:
    tell, ask = ref.tell, ref.ask
    for _ in range(2000):
        await tell("add", 2)
    await ask("add", 2)
    t0 = time.perf_counter()
    for _ in range(n):
        await tell("add", 2)
    assert await ask("add", 2) == 3  # FIFO: every tell before it has been handled
    return n / (time.perf_counter() - t0)


async def bench_tell(system: cascada.ActorSystem, sz: Sizes) -> None:
    ref = await system.spawn(Echo, name="echo-tell", placement="process")

    async def run_cascada() -> float:
        return await cascada_tell(ref, sz.tell_n)

    async def run_floor() -> float:
        res = await in_thread(_floors.pushpull_msgpack, sz.tell_n, "unpinned", 1)
        return float(res["msgs_per_s"])

    rates = await interleave("tell", sz.tell_rounds, [("cascada", run_cascada), ("pushpull", run_floor)])
    await system.stop(ref)
    value = statistics.median(rates["cascada"])
    floor = statistics.median(rates["pushpull"])
    record("tell_msgs_per_s", value, "msgs/s", floor_name="pushpull_msgpack", floor_value=floor,
           target=">=250k/s", passed=value >= 250_000, placement="unpinned",
           n=sz.tell_n, rounds=sz.tell_rounds, runs=rates["cascada"], floor_runs=rates["pushpull"])


# --------------------------------------------------------------------------- 4. spawn


async def cascada_spawn(k: int, pids: list[int]) -> tuple[float, float]:
    """(cold seconds, warm seconds) for k torch actors spawned at once."""
    t0 = time.perf_counter()
    async with cascada.ActorSystem(preload=("torch",)) as system:
        refs = await asyncio.gather(*(system.spawn(TorchActor, name=f"torch-cold-{i}") for i in range(k)))
        cold = time.perf_counter() - t0
        pids.extend(r.pid for r in refs)
        versions = await asyncio.gather(*(r.ask("version") for r in refs))
        assert len(set(versions)) == 1, versions
        for r in refs:
            await system.stop(r)
        t0 = time.perf_counter()
        refs = await asyncio.gather(*(system.spawn(TorchActor, name=f"torch-warm-{i}") for i in range(k)))
        warm = time.perf_counter() - t0
        pids.extend(r.pid for r in refs)
        versions = await asyncio.gather(*(r.ask("version") for r in refs))
        assert len(set(versions)) == 1, versions
    return cold, warm


async def bench_spawn(sz: Sizes, pids: list[int]) -> None:
    cold: list[float] = []
    warm: list[float] = []
    floor: list[float] = []

    async def run_cascada() -> None:
        c, w = await cascada_spawn(sz.spawn_k, pids)
        cold.append(c)
        warm.append(w)

    async def run_floor() -> None:
        res = await in_thread(_floors.plain_spawn_import, "torch", sz.spawn_k)
        floor.append(float(res["seconds"]))

    steps = [("cascada", run_cascada), ("floor", run_floor)]
    for rnd in range(sz.spawn_rounds):
        for _, fn in rotated(steps, rnd):
            await fn()
        log(f"spawn round {rnd + 1}/{sz.spawn_rounds}: cascada cold {cold[-1]:.3f} s, warm {warm[-1]:.3f} s, "
            f"plain spawn+import floor {floor[-1]:.3f} s")
    f = statistics.median(floor)
    for name, runs, what in (("spawn_8_torch_cold_s", cold, "system start + forkserver preload + 8 forks"),
                             ("spawn_8_torch_warm_s", warm, "8 forks from a running forkserver")):
        value = statistics.median(runs)
        record(name, value, "s", floor_name="plain_spawn_import", floor_value=f, target="<=0.15x",
               passed=value / f <= 0.15, placement="unpinned", k=sz.spawn_k, rounds=sz.spawn_rounds,
               runs=runs, floor_runs=floor, measures=what)


# --------------------------------------------------------------------------- 5. idle CPU


async def bench_idle(sz: Sizes, pids: list[int]) -> None:
    async with cascada.ActorSystem() as system:
        refs = await asyncio.gather(*(system.spawn(Echo, name=f"idle-{i}") for i in range(sz.idle_actors)))
        pids.extend(r.pid for r in refs)
        for r in refs:
            assert await r.ask("add", 2) == 3
        await asyncio.sleep(1.0)  # let start-up work settle
        actor_pids = [r.pid for r in refs]
        res = await in_thread(_floors.idle_cpu_percent, [*actor_pids, os.getpid()], sz.idle_seconds)
    per = res["per_pid"]
    actors = [per[p] for p in actor_pids]
    if any(v is None for v in actors):
        raise RuntimeError(f"an idle actor vanished during the window: {per}")
    value = sum(actors)
    log(f"idle: {sz.idle_actors} actors {value:.3f}% of a core over {res['elapsed_s']:.2f} s "
        f"(driver {per[os.getpid()]:.3f}%)")
    record("idle_cpu_percent", value, "%", floor_name=None, floor_value=None, target="<1% of a core",
           passed=value < 1.0, placement="unpinned", actors=sz.idle_actors, seconds=res["elapsed_s"],
           per_actor=actors, driver_percent=per[os.getpid()])


# --------------------------------------------------------------------------- 6. ray


def bench_ray(sz: Sizes, floors: dict[str, Any]) -> None:
    try:
        import ray
    except ImportError:
        print("ray: not installed, skipped", flush=True)
        return
    log("ray: measuring a Ray actor (sync calls and 1000 in flight)")
    ray.init(num_cpus=max(2, len(_floors.ALL_CPUS)), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        class RayEcho:
            def add(self, k: int) -> int:
                return 3

        actor = ray.remote(RayEcho).remote()
        ray.get(actor.add.remote(2))
        for _ in range(WARMUP):
            ray.get(actor.add.remote(2))
        samples: list[float] = []
        clock = time.perf_counter_ns
        for _ in range(sz.rtt_n * sz.rtt_rounds):
            t0 = clock()
            ray.get(actor.add.remote(2))
            samples.append((clock() - t0) / 1000.0)
        for _ in range(2):
            ray.get([actor.add.remote(2) for _ in range(sz.in_flight)])
        batches = max(1, sz.pipe_total // sz.in_flight)
        t0s = time.perf_counter()
        for _ in range(batches):
            ray.get([actor.add.remote(2) for _ in range(sz.in_flight)])
        rate = batches * sz.in_flight / (time.perf_counter() - t0s)
        ray.kill(actor)
    finally:
        ray.shutdown()
    med, p99 = statistics.median(samples), percentile(samples, 0.99)
    rtt = floors["rtt"].get("unpinned", {})
    record("ray_sync_call_rtt_us", med, "us", floor_name="lean_echo_rtt", floor_value=rtt.get("lean"),
           target="info", passed=None, placement="unpinned", shown=f"{med:.1f} us (p99 {p99:.0f})",
           p99=p99, n=len(samples), cascada_value=rtt.get("cascada"))
    pipe = floors["pipelined"]
    record("ray_pipelined_calls_per_s", rate, "calls/s", floor_name="lean_pipelined",
           floor_value=pipe.get("lean"), target="info", passed=None, placement="unpinned",
           in_flight=sz.in_flight, total=batches * sz.in_flight, cascada_value=pipe.get("cascada"))


# --------------------------------------------------------------------------- leftovers


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] != b"Z"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def leftover_processes(actor_pids: list[int]) -> list[str]:
    """Descendants of this process (except multiprocessing's resource tracker, which lives
    until we exit) and any actor pid still running."""
    me = os.getpid()
    parents = {int(p): _ppid(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found: list[str] = []
    frontier = {me}
    seen: set[int] = set()
    while frontier:
        kids = {p for p, pp in parents.items() if pp in frontier and p not in seen}
        seen |= kids
        frontier = kids
    for pid in sorted(seen):
        cmd = _cmdline(pid)
        if "resource_tracker" in cmd or not _alive(pid):
            continue
        found.append(f"{pid}: {cmd[:100]}")
    for pid in actor_pids:
        if pid not in seen and _alive(pid):
            found.append(f"{pid}: actor process still alive: {_cmdline(pid)[:100]}")
    return found


# --------------------------------------------------------------------------- main


FIGURES = ("rtt", "pipelined", "tell", "spawn", "idle", "ray")


async def run_all(sz: Sizes, actor_pids: list[int], only: frozenset[str] = frozenset(FIGURES)) -> dict[str, Any]:
    floors: dict[str, Any] = {}
    async with cascada.ActorSystem() as system:
        if "rtt" in only:
            log("ask round trip: cascada vs lean and REQ/REP floors, interleaved rounds")
            floors["rtt"] = await bench_rtt(system, sz)
        if "pipelined" in only:
            log("pipelined: 1000 asks in flight (unpinned only)")
            floors["pipelined"] = await bench_pipelined(system, sz)
        if "tell" in only:
            log("tell throughput (unpinned only)")
            await bench_tell(system, sz)
    _floors.unpin_driver()
    if "spawn" in only:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            print("spawn: torch is not installed, skipped (.venv/bin/pip install -e '.[torch]'; "
                  "on the project's machines .venv/bin/pip install torch==2.13.0 takes the local CPU build)")
        else:
            log("spawn: 8 torch actors vs 8 plain spawn+import torch")
            await bench_spawn(sz, actor_pids)
    if "idle" in only:
        log(f"idle CPU: {sz.idle_actors} process actors over {sz.idle_seconds:.0f} s")
        await bench_idle(sz, actor_pids)
    return floors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check under ~60 s")
    _report.add_common_args(parser, FIGURES)
    args = parser.parse_args()
    only = _report.selected(parser, args.only, FIGURES)
    sz = Sizes(args.quick)
    # torch warns "Failed to initialize NumPy" on import when numpy is absent; keep that out
    # of the output of the forkserver and the floors' children (a user setting wins).
    os.environ.setdefault("PYTHONWARNINGS", "ignore:Failed to initialize NumPy")

    import msgpack
    import uvloop
    import zmq

    print(f"cascada {cascada.__version__}  python {sys.version.split()[0]}  pyzmq {zmq.__version__}  "
          f"libzmq {zmq.zmq_version()}  msgpack {msgpack.version}  uvloop {uvloop.__version__}")
    print(f"cpus {sorted(_floors.ALL_CPUS)}  loadavg {open('/proc/loadavg').read().split()[:3]}  "
          f"mode {'quick' if sz.quick else 'full'}", flush=True)

    # Every temp dir of this run (cascada's ipc dirs, the floors' dirs) goes in here, so
    # anything left behind is seen and reported below.
    base = tempfile.mkdtemp(prefix="bench-core-")
    previous_tempdir = tempfile.tempdir
    tempfile.tempdir = base
    actor_pids: list[int] = []
    t_start = time.perf_counter()
    try:
        floors = cascada.run(run_all(sz, actor_pids, only))
    finally:
        _floors.unpin_driver()
        tempfile.tempdir = previous_tempdir
        leftovers = os.listdir(base)
        shutil.rmtree(base, ignore_errors=True)
    if "ray" in only:
        bench_ray(sz, floors)
    elapsed = time.perf_counter() - t_start

    print_table()
    for rec in RECORDS:
        print("JSON " + json.dumps(rec, separators=(",", ":")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RECORDS, f, indent=1)
    print(f"# pipelined and tell are unpinned only; RTT ratios are ratios of medians over "
          f"{sz.rtt_rounds} interleaved rounds of {sz.rtt_n} calls per placement")
    print(f"# loadavg at end {open('/proc/loadavg').read().split()[:3]}; took {elapsed:.0f} s")
    procs = leftover_processes(actor_pids)
    if leftovers:
        print(f"# WARNING: temp entries left behind (now removed): {leftovers}")
    if procs:
        print("# WARNING: processes left behind:\n#   " + "\n#   ".join(procs))
    if not leftovers and not procs:
        print("# cleanup: no processes and no temp dirs left behind")
    passed = [r["pass"] for r in RECORDS if r["pass"] is not None]
    print(f"# {sum(passed)}/{len(passed)} targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
