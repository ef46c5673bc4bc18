"""Tensor benchmark of cascada: process-to-process delivery against a memcpy floor, same run.

Run it from the repository root:

    .venv/bin/python scripts/bench_tensors.py             # full run, about a minute or two
    .venv/bin/python scripts/bench_tensors.py --quick     # smoke check, under ~60 s
    .venv/bin/python scripts/bench_tensors.py --crossover # only the inline/shm crossover
    .venv/bin/python scripts/bench_tensors.py --full      # also the 1 GiB hand-off
    .venv/bin/python scripts/bench_tensors.py --json out.json --only delivery,handoff --no-ray

Every figure is a median over repeated runs, printed next to a floor measured IN THIS RUN
and the ratio of the two. The measurements and their floors are taken in alternating rounds
(the order rotates each round), so drift in a noisy machine's load hits both sides. Each
timed block starts with two untimed repetitions, floor and cascada alike (BLOCK_WARMUP):
steady state is what is measured, not the first send after something else ran.

Clocks. The driver (the system's own process) and the actor are two processes on one host.
``time.perf_counter`` is not comparable across processes, but CLOCK_MONOTONIC is one
system-wide clock on Linux: the driver reads ``time.monotonic_ns()`` just before
``await ref.ask("stamp", t)``, the actor's ``stamp`` handler returns ``time.monotonic_ns()``
at entry, and **delivery = stamp - t0**: from the moment the sender starts the send
(encoding, the memcpy into the pool, the zmq send) until the receiver's handler holds a
usable torch tensor (decoded, mapped, wrapped). The reply is one int; the tensor is never
echoed back. The round trip (until the ask returns) is reported beside it.

The figures (sizes are binary: 1 MiB = 2**20 bytes; GB/s are 10**9 bytes per second):

``memcpy_gbps`` (1, 16, 256 MiB)
    The floor: ``ctypes.memmove`` (one thread) from a pre-faulted source into a pre-faulted,
    reused destination. Information, and the floor of every GB/s figure, as the issue
    defines it. ``memcpy_into_shm_gbps`` (information) is the same copy into a pre-faulted
    MAP_SHARED mapping of a /dev/shm file, what a pool segment is.

``memcpy_parallel_gbps`` (1, 16, 256 MiB; information)
    The same copy as the runtime makes it: from ``parallel_copy_min`` (4 MiB) with
    ``tensor_copy_threads`` threads (2 by default; see transport/_memcpy.py), measured in
    the same rotation. A delivery ratio above 1.0x memcpy comes from these threads: each
    shm delivery record also carries ``ratio_to_parallel_memcpy``, its ratio to this copy.

``shm_delivery_gbps`` (1, 16, 256 MiB)
    A CPU float32 torch tensor sent to a process actor on the ``auto`` path, which at these
    sizes (>= ``tensor_inline_max``, 64 KiB by default) is the shared-memory pool: the sender
    copies into a pre-faulted, reused segment (with its copy threads from 4 MiB) and sends a
    descriptor. bytes / delivery, and
    the ratio to memcpy. Target (the issue): >= 0.8x memcpy at 16 MiB and 256 MiB. The log
    shows the sender's own CPU time per send (a ``tell`` of the same tensor: encode, memcpy,
    send), the rest being wake-ups, transit and the receiver's decode and dispatch.

``inline_delivery_gbps`` (1, 16, 256 MiB)
    The same tensors forced through zmq frames with ``cascada.via(t, "inline")``. Information.

``crossover_us`` (16 KiB ... 4 MiB: the issue's 64 KiB ... 4 MiB and two sizes below)
    One-way delivery of ``via(t, "inline")`` against ``via(t, "shm")``, in blocks of one path
    whose order rotates each round; the figure is shm, the floor column is inline, the result
    says which won. Beside each: the ask's round trip and how long ``tell`` holds its sender.
    The smallest size from which shm wins at every larger size measured is printed as the
    recommended ``DEFAULT_INLINE_MAX`` (transport/_tensors.py); a tensor of that size or more
    goes through the pool.

``handoff_us`` (1, 16, 256 MiB; 1 GiB with --full)
    A tensor made by ``cascada.empty((n,), "float32")`` in the driver, filled once, then sent
    again and again: the segment itself is handed over, no copy. One-way delivery in us,
    against the one-way delivery of an ask with no payload (the ``ask_empty`` floor) measured
    in alternating samples; the ratio is hand-off / empty ask, and the excess over the empty ask
    is shown. Target: <= 100 us at every size. Measured in three placements, as bench_core's
    round trip is: ``unpinned``, ``same-core`` (every thread of the driver and of the receiving
    process pinned to one CPU) and ``cross-core`` (the two on different CPUs). On a VM a wake-up
    that crosses cores is dear, so the placements tell the transport's cost from the tensor
    path's.

``ray_delivery_gbps`` (only when ``ray`` is importable and without --no-ray)
    ``ray.put(a)`` of a float32 numpy array (Ray's zero-copy path for reading it back) and a call to a Ray actor that takes it as its argument; delivery is from
    before ``ray.put`` to the actor method's entry (the array resolved from the object
    store), same clock. Against a memcpy floor re-measured in alternating rounds while Ray
    runs. Ray is started after cascada's system closed, with 2 CPUs and a 1.5 GiB object
    store, quiet, and shut down at the end.

Every path is checked once per size before it is timed: the receiver reports shape and
values, and the sender's ``tensor_stats`` counters must show the path expected (inline, shm
or shm_handoff). The driver's pool counters (segments created / reused / evicted) are
printed, so a figure paid for by creating segments instead of reusing them shows.

Output: a table (figure, size, cascada, floor, ratio, target, result), the crossover
recommendation, and one line per record prefixed with ``JSON `` (``grep '^JSON '``), each a
JSON object with figure, size_bytes, value, unit, floor_name, floor_value, ratio, target,
pass (null for information) and detail; ``--json PATH`` also writes them as one list.
Exit status is 0 whatever the figures; the table says what passed.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import math
import mmap
import os
import platform
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
from cascada.transport._memcpy import ParallelCopy  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
clock = time.monotonic_ns  # CLOCK_MONOTONIC: one clock for every process on the host

FIGURES = ("delivery", "crossover", "handoff", "ray")


# --------------------------------------------------------------------------- the actor


class Sink(cascada.Actor):
    """Receives tensors; returns only the monotonic clock at entry (or a small check)."""

    def stamp(self, t: Any) -> int:
        return clock()

    def nothing(self) -> int:
        return clock()

    def check(self, t: Any) -> list[Any]:
        n = t.numel()
        return [type(t).__name__, str(t.dtype), list(t.shape), float(t[0]), float(t[n // 2]), float(t[-1])]


# --------------------------------------------------------------------------- sizes


DELIVERY_SIZES = (1 * MiB, 16 * MiB, 256 * MiB)
CROSSOVER_SIZES = (16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB)


class Sizes:
    def __init__(self, quick: bool, full: bool) -> None:
        self.quick = quick
        self.full = full
        self.rounds = 2 if quick else 7
        # samples per round, per size: large transfers are slow, so fewer of them
        if quick:
            self.delivery_reps = {1 * MiB: 10, 16 * MiB: 8, 256 * MiB: 3}
            self.memcpy_reps = {1 * MiB: 20, 16 * MiB: 8, 256 * MiB: 3}
        else:
            self.delivery_reps = {1 * MiB: 30, 16 * MiB: 15, 256 * MiB: 4}
            self.memcpy_reps = {1 * MiB: 50, 16 * MiB: 20, 256 * MiB: 4}
        self.crossover_reps = 15 if quick else 50  # per path, per size, per round
        self.handoff_reps = 20 if quick else 60  # per size, per round (and as many empty asks)
        self.handoff_sizes = DELIVERY_SIZES + ((1 * GiB,) if full else ())
        self.warmup = 4  # back-to-back sends before a size is timed (see BLOCK_WARMUP)


# Untimed repetitions at the start of every timed block, floor and cascada alike. The
# machine's L3 is large (260 MiB on the project's VM), so a 16 MiB copy runs from cache once
# warm and from DRAM right after something else went through; and back-to-back sends of one
# size alternate between two pool segments (a segment's release comes back just after the
# reply), so a block needs two sends to warm both. Steady state is what is measured.
BLOCK_WARMUP = 2


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


def human(nbytes: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size} {unit}"
    return f"{nbytes} B"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (an observed sample), the rule of _floors and bench_core."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def rotated(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


def gbps(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} us"


# --------------------------------------------------------------------------- records


RECORDS: list[dict[str, Any]] = []
ROWS: list[list[str]] = []


def record(figure: str, size: int | None, value: float, unit: str, *, floor_name: str | None,
           floor_value: float | None, target: str, passed: bool | None, shown: str,
           floor_shown: str | None = None, result: str | None = None, **extra: Any) -> dict[str, Any]:
    ratio = value / floor_value if floor_value else None
    rec = {"figure": figure, "size_bytes": size, "value": value, "unit": unit, "floor_name": floor_name,
           "floor_value": floor_value, "ratio": ratio, "target": target, "pass": passed, **extra}
    RECORDS.append(rec)
    if result is None:
        result = "info" if passed is None else ("PASS" if passed else "FAIL")
    ROWS.append([f"{figure} {extra['placement']}" if "placement" in extra else figure, human(size) if size else "-", shown,
                 f"{floor_name}: {floor_shown}" if floor_name else "-",
                 f"{ratio:.2f}x" if ratio is not None else "-", target, result])
    return rec


def print_table() -> None:
    _report.print_table(["figure", "size", "cascada", "floor", "ratio", "target", "result"], ROWS)


# --------------------------------------------------------------------------- the memcpy floor


class MemcpyFloor:
    """Pre-faulted source and destination buffers per size, kept for the whole run, and
    single-threaded ``ctypes.memmove`` between them (what the runtime's shm path calls)."""

    def __init__(self) -> None:
        self._bufs: dict[int, tuple[Any, Any]] = {}

    def _buffers(self, nbytes: int) -> tuple[Any, Any]:
        bufs = self._bufs.get(nbytes)
        if bufs is None:
            src = (ctypes.c_char * nbytes)()
            dst = (ctypes.c_char * nbytes)()
            ctypes.memset(src, 1, nbytes)  # fault every page in, both sides
            ctypes.memset(dst, 2, nbytes)
            bufs = self._bufs[nbytes] = (src, dst)
        return bufs

    def run(self, nbytes: int, reps: int, move: Callable[[int, int, int], Any] = ctypes.memmove) -> list[float]:
        """Microseconds per copy, ``reps`` samples after BLOCK_WARMUP untimed copies."""
        src, dst = self._buffers(nbytes)
        s, d = ctypes.addressof(src), ctypes.addressof(dst)
        for _ in range(BLOCK_WARMUP):
            move(d, s, nbytes)
        out = []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            move(d, s, nbytes)
            out.append((time.perf_counter_ns() - t0) / 1000.0)
        return out

    def drop(self) -> None:
        self._bufs.clear()


def memcpy_into_shm(nbytes: int, reps: int) -> list[float]:
    """Information: the same memmove into a pre-faulted MAP_SHARED mapping of a /dev/shm
    file (what the pool's segments are)."""
    path = os.path.join("/dev/shm", f"bench-tensors-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        try:
            dst = (ctypes.c_char * nbytes).from_buffer(mm)
            src = (ctypes.c_char * nbytes)()
            ctypes.memset(src, 1, nbytes)
            ctypes.memset(ctypes.addressof(dst), 2, nbytes)
            d, s = ctypes.addressof(dst), ctypes.addressof(src)
            out = []
            for _ in range(reps + BLOCK_WARMUP):
                t0 = time.perf_counter_ns()
                ctypes.memmove(d, s, nbytes)
                out.append((time.perf_counter_ns() - t0) / 1000.0)
            del dst
        finally:
            mm.close()
    finally:
        os.close(fd)
    return out[BLOCK_WARMUP:]


# --------------------------------------------------------------------------- measuring sends


async def one_way(ref: cascada.ActorRef, arg: Any, reps: int) -> tuple[list[float], list[float]]:
    """(delivery us, round trip us) of ``reps`` sequential ``ask("stamp", arg)``."""
    ask = ref.ask
    deliveries, rtts = [], []
    for _ in range(reps):
        t0 = clock()
        stamp = await ask("stamp", arg)
        t1 = clock()
        deliveries.append((stamp - t0) / 1000.0)
        rtts.append((t1 - t0) / 1000.0)
    return deliveries, rtts


async def empty_one_way(ref: cascada.ActorRef, reps: int) -> tuple[list[float], list[float]]:
    ask = ref.ask
    deliveries, rtts = [], []
    for _ in range(reps):
        t0 = clock()
        stamp = await ask("nothing")
        t1 = clock()
        deliveries.append((stamp - t0) / 1000.0)
        rtts.append((t1 - t0) / 1000.0)
    return deliveries, rtts


def make_tensor(nbytes: int, value: float) -> Any:
    import torch

    t = torch.empty(nbytes // 4, dtype=torch.float32)
    t.fill_(value)  # faults every page in
    return t


async def verify(system: cascada.ActorSystem, ref: cascada.ActorRef, arg: Any, tensor: Any,
                 counter: str) -> None:
    """Send ``arg`` once: the receiver must see the right tensor, and the sender's counter
    for the path we mean to measure must move by one (and no other path's)."""
    before = await system.tensor_stats()
    got = await ref.ask("check", arg)
    after = await system.tensor_stats()
    n = tensor.numel()
    want = ["Tensor", "torch.float32", [n], float(tensor[0]), float(tensor[n // 2]), float(tensor[-1])]
    if got != want:
        raise RuntimeError(f"receiver saw {got}, expected {want}")
    moved = {k: after[k] - before[k] for k in ("inline", "shm", "shm_handoff") if after[k] != before[k]}
    if moved != {counter: 1}:
        raise RuntimeError(f"a {human(tensor.numel() * 4)} tensor was meant to go by {counter}, "
                           f"but the sender's counters moved by {moved}")


def pool_line(stats: dict[str, Any]) -> str:
    p = stats.get("pool")
    if not p:
        return "no pool"
    return (f"pool: {p['segments']} segments ({p['bytes'] / MiB:.0f} MiB of {p['max_bytes'] / MiB:.0f}), "
            f"created {p['created']}, reused {p['reused']}, evicted {p['evicted']}, exhausted {p['exhausted']}; "
            f"leases issued {stats['leases']['issued']}, outstanding {stats['leases']['outstanding']}")


def pool_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    b, a = before.get("pool") or {}, after.get("pool") or {}
    return {k: a.get(k, 0) - b.get(k, 0) for k in ("created", "reused", "evicted", "exhausted")}


# --------------------------------------------------------------------------- 1-3. delivery


async def bench_delivery(system: cascada.ActorSystem, ref: cascada.ActorRef, sz: Sizes,
                         floor: MemcpyFloor) -> dict[int, float]:
    """memcpy floor, shm (auto) and inline delivery at 1, 16, 256 MiB. Returns the memcpy
    medians (us) by size."""
    memcpy_meds: dict[int, float] = {}
    opts = system.config.tensors
    copier = ParallelCopy(opts.copy_threads, opts.parallel_copy_min)
    for nbytes in DELIVERY_SIZES:
        tensor = make_tensor(nbytes, 1.5)
        tensor[nbytes // 8] = 7.0
        tensor[-1] = -3.0
        inline = cascada.via(tensor, "inline")
        await verify(system, ref, tensor, tensor, "shm")
        await verify(system, ref, inline, tensor, "inline")
        for arg in (tensor, inline):
            await one_way(ref, arg, sz.warmup)
        reps, mreps = sz.delivery_reps[nbytes], sz.memcpy_reps[nbytes]
        samples: dict[str, list[float]] = {"memcpy": [], "memcpy_mt": [], "shm": [], "inline": []}
        rtts: dict[str, list[float]] = {"shm": [], "inline": []}
        holds: dict[str, list[float]] = {"shm": [], "inline": []}
        sender_cpu: dict[str, list[float]] = {"shm": [], "inline": []}
        per_round: dict[str, list[float]] = {k: [] for k in samples}
        pool_before = await system.tensor_stats()

        async def run_memcpy() -> None:
            got = floor.run(nbytes, mreps)
            samples["memcpy"].extend(got)
            per_round["memcpy"].append(statistics.median(got))

        async def run_memcpy_mt() -> None:
            # Information: the copy as the runtime makes it (with its copy threads).
            got = floor.run(nbytes, mreps, copier.copy)
            samples["memcpy_mt"].extend(got)
            per_round["memcpy_mt"].append(statistics.median(got))

        def sender(key: str, arg: Any) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                await one_way(ref, arg, BLOCK_WARMUP)
                d, r = await one_way(ref, arg, reps)
                samples[key].extend(d)
                rtts[key].extend(r)
                per_round[key].append(statistics.median(d))
                # The sender's own part (see tell_hold).
                w, c = await tell_hold(ref, arg, max(1, reps // 3))
                holds[key] += w
                sender_cpu[key] += c
            return run

        steps = [("memcpy", run_memcpy), ("memcpy_mt", run_memcpy_mt), ("shm", sender("shm", tensor)),
                 ("inline", sender("inline", inline))]
        for rnd in range(sz.rounds):
            for _, fn in rotated(steps, rnd):
                await fn()
            log(f"delivery {human(nbytes)} round {rnd + 1}/{sz.rounds}: " + ", ".join(
                f"{k} {fmt_us(per_round[k][-1])} ({gbps(nbytes, per_round[k][-1]):.2f} GB/s)" for k in samples))
        pool_after = await system.tensor_stats()
        delta = pool_delta(pool_before, pool_after)
        log(f"delivery {human(nbytes)}: pool during the timed sends: {delta}; {pool_line(pool_after)}")
        del tensor, inline

        m = statistics.median(samples["memcpy"])
        memcpy_meds[nbytes] = m
        record("memcpy_gbps", nbytes, gbps(nbytes, m), "GB/s", floor_name=None, floor_value=None,
               target="floor", passed=None, shown=f"{gbps(nbytes, m):.2f} GB/s ({fmt_us(m)})",
               median_us=m, n=len(samples["memcpy"]), round_medians_us=per_round["memcpy"])
        mt = statistics.median(samples["memcpy_mt"])
        record("memcpy_parallel_gbps", nbytes, gbps(nbytes, mt), "GB/s", floor_name="memcpy",
               floor_value=gbps(nbytes, m), target="info", passed=None,
               shown=f"{gbps(nbytes, mt):.2f} GB/s ({fmt_us(mt)}, {copier.threads} threads from "
                     f"{human(copier.min_bytes)})",
               floor_shown=f"{gbps(nbytes, m):.2f} GB/s", median_us=mt, threads=copier.threads,
               min_bytes=copier.min_bytes, n=len(samples["memcpy_mt"]))
        for key, figure in (("shm", "shm_delivery_gbps"), ("inline", "inline_delivery_gbps")):
            d = statistics.median(samples[key])
            r = statistics.median(rtts[key])
            h = statistics.median(holds[key])
            c = statistics.median(sender_cpu[key])
            log(f"delivery {human(nbytes)} {key}: one-way {fmt_us(d)}, of which the sender's CPU (encode, "
                f"copy, send) {fmt_us(c)}; memcpy alone {fmt_us(m)}; tell holds the sender {fmt_us(h)}")
            value = gbps(nbytes, d)
            targeted = key == "shm" and nbytes >= 16 * MiB
            ratio = value / gbps(nbytes, m)
            record(figure, nbytes, value, "GB/s", floor_name="memcpy", floor_value=gbps(nbytes, m),
                   target=">=0.8x memcpy" if targeted else "info",
                   passed=(ratio >= 0.8) if targeted else None,
                   shown=f"{value:.2f} GB/s ({fmt_us(d)}, rtt {fmt_us(r)})",
                   floor_shown=f"{gbps(nbytes, m):.2f} GB/s", delivery_us=d, delivery_p90_us=percentile(samples[key], 0.9),
                   ratio_to_parallel_memcpy=value / gbps(nbytes, mt),
                   rtt_us=r, tell_hold_us=h, sender_cpu_us=c, memcpy_us=m, n=len(samples[key]), rounds=sz.rounds,
                   round_medians_us=per_round[key],
                   pool_delta=delta if key == "shm" else None)
    # Information: the same memmove into a /dev/shm mapping (what a pool segment is).
    for nbytes in DELIVERY_SIZES:
        got = memcpy_into_shm(nbytes, sz.memcpy_reps[nbytes])
        m = statistics.median(got)
        record("memcpy_into_shm_gbps", nbytes, gbps(nbytes, m), "GB/s", floor_name="memcpy",
               floor_value=gbps(nbytes, memcpy_meds[nbytes]), target="info", passed=None,
               shown=f"{gbps(nbytes, m):.2f} GB/s ({fmt_us(m)})",
               floor_shown=f"{gbps(nbytes, memcpy_meds[nbytes]):.2f} GB/s", median_us=m, n=len(got))
    return memcpy_meds


# --------------------------------------------------------------------------- 3b. crossover


async def tell_hold(ref: cascada.ActorRef, arg: Any, reps: int) -> tuple[list[float], list[float]]:
    """(wall us, CPU us of this thread) per ``await ref.tell("stamp", arg)``. The wall time is
    how long tell holds its sender (an inline tensor of 64 KiB or more holds it until zmq is
    done with the tensor's memory); on 2 cores it also counts the time the sender waits for
    a CPU while its zmq I/O thread and the receiver run. The thread's CPU time is the
    sender's own work: encode, the memcpy into the pool, the send (and, while zmq holds an
    inline tensor, the event loop's turns as it waits). An ask after each tell
    keeps the actor from falling behind."""
    walls, cpus = [], []
    for _ in range(reps):
        c0 = time.thread_time_ns()
        t0 = clock()
        await ref.tell("stamp", arg)
        t1 = clock()
        c1 = time.thread_time_ns()
        walls.append((t1 - t0) / 1000.0)
        cpus.append((c1 - c0) / 1000.0)
        await ref.ask("nothing")
    return walls, cpus


async def bench_crossover(system: cascada.ActorSystem, ref: cascada.ActorRef, sz: Sizes) -> None:
    meds: dict[int, dict[str, float]] = {}
    for nbytes in CROSSOVER_SIZES:
        tensor = make_tensor(nbytes, 0.25)
        tensor[-1] = 9.0
        args = {"inline": cascada.via(tensor, "inline"), "shm": cascada.via(tensor, "shm")}
        await verify(system, ref, args["inline"], tensor, "inline")
        await verify(system, ref, args["shm"], tensor, "shm")
        for arg in args.values():
            await one_way(ref, arg, sz.warmup)
        samples: dict[str, list[float]] = {"inline": [], "shm": []}
        rtts: dict[str, list[float]] = {"inline": [], "shm": []}
        holds: dict[str, list[float]] = {"inline": [], "shm": []}
        cpus: dict[str, list[float]] = {"inline": [], "shm": []}
        # Blocks of one path (a stream of same-size tensors), the order rotating each round.
        # Not sample-by-sample alternation: an inline ask holds its sender ~1 ms longer than
        # a shm one (see tell_hold), and the idle that follows would make the next sample,
        # of the other path, start from a colder machine.
        for rnd in range(sz.rounds):
            for key in rotated(["inline", "shm"], rnd):
                await one_way(ref, args[key], BLOCK_WARMUP)
                d, r = await one_way(ref, args[key], sz.crossover_reps)
                samples[key] += d
                rtts[key] += r
                w, c = await tell_hold(ref, args[key], max(3, sz.crossover_reps // 3))
                holds[key] += w
                cpus[key] += c
        med = {k: statistics.median(v) for k, v in samples.items()}
        rtt = {k: statistics.median(v) for k, v in rtts.items()}
        hold = {k: statistics.median(v) for k, v in holds.items()}
        inl, shm = med["inline"], med["shm"]
        meds[nbytes] = {"inline": inl, "shm": shm}
        log(f"crossover {human(nbytes)}: one-way inline {fmt_us(inl)}, shm {fmt_us(shm)}; "
            f"ask rtt inline {fmt_us(rtt['inline'])}, shm {fmt_us(rtt['shm'])}; "
            f"tell holds sender inline {fmt_us(hold['inline'])}, shm {fmt_us(hold['shm'])}")
        record("crossover_us", nbytes, shm, "us", floor_name="inline", floor_value=inl, target="info",
               passed=None, shown=f"shm {fmt_us(shm)} (rtt {fmt_us(rtt['shm'])}, tell {fmt_us(hold['shm'])})",
               floor_shown=f"{fmt_us(inl)} (rtt {fmt_us(rtt['inline'])}, tell {fmt_us(hold['inline'])})",
               result="shm wins" if shm < inl else "inline wins", shm_us=shm, inline_us=inl,
               shm_rtt_us=rtt["shm"], inline_rtt_us=rtt["inline"],
               shm_tell_hold_us=hold["shm"], inline_tell_hold_us=hold["inline"],
               shm_sender_cpu_us=statistics.median(cpus["shm"]),
               inline_sender_cpu_us=statistics.median(cpus["inline"]),
               shm_p90_us=percentile(samples["shm"], 0.9), inline_p90_us=percentile(samples["inline"], 0.9),
               n=len(samples["shm"]))
        del tensor, args
    # The smallest size from which shm wins at every larger size measured.
    sizes = list(CROSSOVER_SIZES)
    start = None
    for i, nbytes in enumerate(sizes):
        if all(meds[s]["shm"] < meds[s]["inline"] for s in sizes[i:]):
            start = nbytes
            break
    from cascada.transport._tensors import DEFAULT_INLINE_MAX

    now = human(DEFAULT_INLINE_MAX)
    if start is None:
        rec = (f"shm never wins at every size up to {human(sizes[-1])}: DEFAULT_INLINE_MAX should be above "
               f"{human(sizes[-1])} (now {now})")
        recommended = None
    elif start == sizes[0]:
        rec = (f"shm wins at every size measured, from {human(start)}: DEFAULT_INLINE_MAX <= {human(start)} "
               f"(now {now}); measure smaller sizes to place it")
        recommended = start
    else:
        below = sizes[sizes.index(start) - 1]
        rec = (f"shm wins from {human(start)} up (inline still wins or ties at {human(below)}): "
               f"recommend DEFAULT_INLINE_MAX = {human(start)} = 1 << {start.bit_length() - 1} (now {now})")
        recommended = start
    RECOMMENDATION.append(rec)
    RECORDS.append({"figure": "crossover_recommendation", "size_bytes": recommended, "value": recommended,
                    "unit": "bytes", "floor_name": None, "floor_value": None, "ratio": None, "target": "info",
                    "pass": None, "current_default": DEFAULT_INLINE_MAX, "text": rec,
                    "medians_us": {str(k): v for k, v in meds.items()}})


RECOMMENDATION: list[str] = []


# --------------------------------------------------------------------------- 4. hand-off


async def bench_handoff(system: cascada.ActorSystem, ref: cascada.ActorRef, sz: Sizes) -> None:
    tensors = {}
    for nbytes in sz.handoff_sizes:
        t = cascada.empty((nbytes // 4,), "float32")
        t.fill_(0.5)  # filled once
        t[-1] = 4.0
        await verify(system, ref, t, t, "shm_handoff")
        tensors[nbytes] = t
    try:
        for placement in _floors.PLACEMENTS:
            effective, note = _floors.resolve_placement(placement)
            if note:
                log(f"hand-off {placement}: {note}")
            _, pinned = _floors.pin_driver_and(ref.pid, effective)
            if pinned:
                log(f"hand-off {placement}: {pinned} (the receiver)")
            try:
                for nbytes, t in tensors.items():
                    await handoff_at(system, ref, t, nbytes, placement, sz)
            finally:
                _floors.unpin_driver()
                _floors.set_all_threads(ref.pid, _floors.ALL_CPUS)
    finally:
        tensors.clear()
    await asyncio.sleep(0.05)  # let the last releases come back before the pool is read


async def handoff_at(system: cascada.ActorSystem, ref: cascada.ActorRef, t: Any, nbytes: int, placement: str,
                     sz: Sizes) -> None:
    await one_way(ref, t, sz.warmup + 3)
    await empty_one_way(ref, sz.warmup + 3)
    samples: dict[str, list[float]] = {"handoff": [], "empty": []}
    rtts: dict[str, list[float]] = {"handoff": [], "empty": []}
    before = await system.tensor_stats()
    for rnd in range(sz.rounds):
        for i in range(sz.handoff_reps):
            for key in rotated(["handoff", "empty"], rnd + i):
                if key == "handoff":
                    d, r = await one_way(ref, t, 1)
                else:
                    d, r = await empty_one_way(ref, 1)
                samples[key] += d
                rtts[key] += r
    after = await system.tensor_stats()
    handed = after["shm_handoff"] - before["shm_handoff"]
    copied = after["shm"] - before["shm"] + after["inline"] - before["inline"]
    if handed != sz.rounds * sz.handoff_reps or copied:
        raise RuntimeError(f"hand-off {human(nbytes)}: {handed} hand-offs and {copied} copies counted")
    h, e = statistics.median(samples["handoff"]), statistics.median(samples["empty"])
    hr, er = statistics.median(rtts["handoff"]), statistics.median(rtts["empty"])
    log(f"hand-off {human(nbytes)} {placement}: one-way {h:.1f} us (p90 {percentile(samples['handoff'], 0.9):.1f}), "
        f"empty ask one-way {e:.1f} us; rtt {hr:.1f} vs {er:.1f} us")
    record("handoff_us", nbytes, h, "us", floor_name="ask_empty", floor_value=e, target="<=100 us",
           passed=h <= 100.0, shown=f"{h:.1f} us (+{h - e:.1f} over empty ask)", floor_shown=f"{e:.1f} us",
           placement=placement, over_floor_us=h - e, p90_us=percentile(samples["handoff"], 0.9), rtt_us=hr,
           floor_rtt_us=er, floor_p90_us=percentile(samples["empty"], 0.9), n=len(samples["handoff"]))


# --------------------------------------------------------------------------- 5. ray


def bench_ray(sz: Sizes, floor: MemcpyFloor, cascada_gbps: dict[int, float]) -> None:
    try:
        import ray
    except ImportError:
        print("ray: not installed, skipped", flush=True)
        return
    import numpy as np

    log(f"ray {ray.__version__}: ray.put + a Ray actor taking the array, against memcpy in alternating rounds")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own notices (token auth, usage stats, its start-up banner) are warnings and
    # infos of the "ray" logger: keep only errors. Its workers' output is not forwarded.
    logging.getLogger("ray").setLevel(logging.ERROR)
    t_init = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             logging_level=logging.ERROR, object_store_memory=1536 * MiB)
    try:
        log(f"ray: started in {time.perf_counter() - t_init:.1f} s")

        class RaySink:
            def stamp(self, a: Any) -> int:
                return time.monotonic_ns()

            def check(self, a: Any) -> list[Any]:
                return [list(a.shape), str(a.dtype), float(a[0]), float(a[-1])]

        actor: Any = ray.remote(RaySink).remote()
        for nbytes in DELIVERY_SIZES:
            a = np.full(nbytes // 4, 1.5, dtype=np.float32)
            a[-1] = 2.5
            got = ray.get(actor.check.remote(ray.put(a)))
            if got != [[nbytes // 4], "float32", 1.5, 2.5]:
                raise RuntimeError(f"ray actor saw {got}")
            samples: dict[str, list[float]] = {"memcpy": [], "ray": []}
            puts: list[float] = []
            rtts: list[float] = []

            def run_ray(reps: int, keep: bool = True) -> None:
                for _ in range(reps):
                    t0 = clock()
                    oref = ray.put(a)
                    tp = clock()
                    stamp: int = ray.get(actor.stamp.remote(oref))
                    t1 = clock()
                    del oref
                    if keep:
                        samples["ray"].append((stamp - t0) / 1000.0)
                        puts.append((tp - t0) / 1000.0)
                        rtts.append((t1 - t0) / 1000.0)

            run_ray(sz.warmup, keep=False)
            steps = ["memcpy", "ray"]
            for rnd in range(sz.rounds):
                for key in rotated(steps, rnd):
                    if key == "memcpy":
                        samples["memcpy"] += floor.run(nbytes, sz.memcpy_reps[nbytes])
                    else:
                        run_ray(sz.delivery_reps[nbytes])
            m, d = statistics.median(samples["memcpy"]), statistics.median(samples["ray"])
            value = gbps(nbytes, d)
            log(f"ray {human(nbytes)}: delivery {fmt_us(d)} ({value:.2f} GB/s; put {fmt_us(statistics.median(puts))}), "
                f"memcpy {fmt_us(m)}")
            cv = cascada_gbps.get(nbytes)
            record("ray_delivery_gbps", nbytes, value, "GB/s", floor_name="memcpy", floor_value=gbps(nbytes, m),
                   target="info", passed=None,
                   shown=f"{value:.2f} GB/s ({fmt_us(d)}, rtt {fmt_us(statistics.median(rtts))})"
                         + (f", cascada shm {cv / value:.1f}x" if cv else ""),
                   floor_shown=f"{gbps(nbytes, m):.2f} GB/s", delivery_us=d, put_us=statistics.median(puts),
                   rtt_us=statistics.median(rtts), memcpy_us=m, n=len(samples["ray"]),
                   cascada_shm_gbps=cv, ray_version=ray.__version__)
            del a
        ray.kill(actor)
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- leftovers


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(p))
    return out


def leftover_processes(wait_s: float) -> list[str]:
    """Live descendants of this process, waiting up to ``wait_s`` for them to go."""
    deadline = time.monotonic() + wait_s
    while True:
        seen: list[int] = []
        frontier = [os.getpid()]
        while frontier:
            kids = [k for p in frontier for k in _children(p)]
            seen += kids
            frontier = kids
        if not seen or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    found = []
    for pid in seen:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(f"{pid}: {cmd[:100]}")
    return found


def leftover_segments(pids: set[int]) -> list[str]:
    out = []
    for name in os.listdir("/dev/shm"):
        parts = name.split("-")
        if len(parts) >= 2 and parts[0] == "cascada" and parts[1].isdigit() and int(parts[1]) in pids:
            out.append(name)
    return out


# --------------------------------------------------------------------------- main


async def run_all(sz: Sizes, only: frozenset[str], pool_bytes: int, pids: set[int],
                  floor: MemcpyFloor) -> dict[int, float]:
    import torch

    torch.set_num_threads(1)  # fills and the like stay single-threaded; the floor is memmove
    shm_gbps: dict[int, float] = {}
    async with cascada.ActorSystem(preload=("torch",), shm_pool_bytes=pool_bytes) as system:
        pids.add(os.getpid())
        ref = await system.spawn(Sink, name="sink", placement="process")
        pids.add(ref.pid)
        await ref.ask("nothing")
        if "delivery" in only:
            log("delivery: memcpy floor, shm (auto) and inline (via) at 1, 16, 256 MiB, alternating rounds")
            await bench_delivery(system, ref, sz, floor)
            shm_gbps = {r["size_bytes"]: r["value"] for r in RECORDS if r["figure"] == "shm_delivery_gbps"}
        if "crossover" in only:
            log("crossover: inline vs shm one-way delivery, 16 KiB to 4 MiB, blocks in rotating order")
            await bench_crossover(system, ref, sz)
        if "handoff" in only:
            log("hand-off: cascada.empty tensors sent without a copy, against an ask with no payload")
            await bench_handoff(system, ref, sz)
        stats = await system.tensor_stats()
        log(f"driver {pool_line(stats)}")
        log(f"sink tensor stats: {await system.tensor_stats(ref)}")
        await system.stop(ref)
    return shm_gbps


def environment() -> None:
    import msgpack
    import numpy
    import torch
    import zmq

    try:
        from importlib.metadata import version

        ray_version = version("ray")
    except Exception:
        ray_version = "not installed"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    st = os.statvfs("/dev/shm")
    print(f"cascada {cascada.__version__}  python {sys.version.split()[0]}  torch {torch.__version__}  "
          f"numpy {numpy.__version__}  pyzmq {zmq.__version__}  libzmq {zmq.zmq_version()}  "
          f"msgpack {msgpack.version}  ray {ray_version}")
    print(f"cpus {sorted(os.sched_getaffinity(0))} of {os.cpu_count()} ({cpu})  memory {mem}  "
          f"/dev/shm {st.f_blocks * st.f_frsize / GiB:.1f} GiB ({st.f_bavail * st.f_frsize / GiB:.1f} free)  "
          f"{platform.platform()}")
    print(f"loadavg {open('/proc/loadavg').read().split()[:3]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples: a smoke check under ~60 s")
    parser.add_argument("--full", action="store_true", help="also hand off a 1 GiB pool tensor")
    parser.add_argument("--crossover", action="store_true", help="only the inline/shm crossover")
    parser.add_argument("--no-ray", action="store_true", help="skip Ray even when it is installed")
    _report.add_common_args(parser, FIGURES)
    args = parser.parse_args()
    only = _report.selected(parser, args.only, FIGURES)
    if args.crossover:
        only = frozenset({"crossover"})
    if args.no_ray:
        only -= {"ray"}
    sz = Sizes(args.quick, args.full)
    # Room for every segment of the run at once: the delivery segments of each size (a
    # second one may be made while the first one's release is on its way back) and the
    # hand-off tensors; 1 GiB more for the 1 GiB hand-off.
    pool_bytes = (2 * GiB) + (2 * GiB if args.full else 0)
    os.environ.setdefault("PYTHONWARNINGS", "ignore:Failed to initialize NumPy")

    environment()
    print(f"mode {'quick' if sz.quick else 'full'}{' +1GiB' if sz.full else ''}  figures {','.join(sorted(only))}  "
          f"rounds {sz.rounds}  shm_pool_bytes {human(pool_bytes)}", flush=True)

    base = tempfile.mkdtemp(prefix="bench-tensors-")
    previous_tempdir = tempfile.tempdir
    tempfile.tempdir = base
    pids: set[int] = set()
    floor = MemcpyFloor()
    t_start = time.perf_counter()
    try:
        shm_gbps = cascada.run(run_all(sz, only, pool_bytes, pids, floor)) if only - {"ray"} else {}
    finally:
        tempfile.tempdir = previous_tempdir
        leftovers = os.listdir(base)
        shutil.rmtree(base, ignore_errors=True)
    segments = leftover_segments(pids)
    if "ray" in only:
        bench_ray(sz, floor, shm_gbps)
    floor.drop()
    elapsed = time.perf_counter() - t_start

    print_table()
    for line in RECOMMENDATION:
        print(f"# crossover: {line}")
    for rec in RECORDS:
        print("JSON " + json.dumps(rec, separators=(",", ":")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RECORDS, f, indent=1)
    print("# delivery = actor's CLOCK_MONOTONIC at handler entry - driver's just before the ask; "
          f"medians over {sz.rounds} alternating rounds; GB/s = 10^9 B/s")
    print(f"# loadavg at end {open('/proc/loadavg').read().split()[:3]}; took {elapsed:.0f} s")
    procs = leftover_processes(5.0)
    if leftovers:
        print(f"# WARNING: temp entries left behind (now removed): {leftovers}")
    if segments:
        print(f"# WARNING: shm segments left behind in /dev/shm: {segments}")
    if procs:
        print("# WARNING: processes left behind:\n#   " + "\n#   ".join(procs))
    if not leftovers and not procs and not segments:
        print("# cleanup: no processes, shm segments or temp dirs left behind")
    passed = [r["pass"] for r in RECORDS if r["pass"] is not None]
    print(f"# {sum(passed)}/{len(passed)} targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
