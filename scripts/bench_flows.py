"""Flow benchmark of cascada (issue #5): what a level of flow nesting adds to a call, against
one hop (the core ask round trip) measured in the same run.

Run it from the repository root:

    .venv/bin/python scripts/bench_flows.py            # full run, three placements, about 3 minutes
    .venv/bin/python scripts/bench_flows.py --quick    # smoke check, about 25 s
    .venv/bin/python scripts/bench_flows.py --placement unpinned   # one placement
    .venv/bin/python scripts/bench_flows.py --json out.json   # also write every record
    .venv/bin/python scripts/bench_flows.py --only tensor      # flows carrying a 16 MiB shared tensor

The figures:

``nested`` (flows in their own processes)
    An ``Echo`` stage in its own process answers ``echo(x) -> x``. The floor is one hop:
    ``await echo.ask("echo", 1)`` from the driver. Flow ``f1`` is ``Sequential(Step(echo,
    "echo"))``, ``f2`` is ``Sequential(f1)``, ``f3`` is ``Sequential(f2)``, each in its own
    process, so ``f3.ask("run", 1)`` crosses four process boundaries and back. For each depth
    k the table shows the round trip, what the k levels add over the hop, that divided by k
    (added per level), and its ratio to the hop. Target: each level adds at most one hop
    (ratio <= 1.0x): a level *is* one more hop, so this says the flow machinery itself (the
    depth guard, timing, error translation, a concurrent handler's task) costs little
    beside the transport.

``relay`` (hand-written relays in their own processes)
    The floor for a level done by hand: a plain actor whose ``@concurrent run(x)`` is
    ``return await next.ask(...)``, nested the same way (relay1 -> echo, relay2 -> relay1
    -> echo, ...). The ``nested`` rows also give their ratio to the relay at the same depth:
    what the flow costs beyond making the nested call at all.

``inline`` (flows in the driver's process, placement="local")
    The same three nested flows, but placed in the driver's process: a level adds no hop,
    only the flow machinery and a local hand-off. Information only.

``tensor`` (flows in their own processes, carrying a 16 MiB shared tensor)
    The ``nested`` flows again, each call carrying a 16 MiB tensor made by ``cascada.empty``
    to a stage that answers its shape (``Echo.shape``); the floor is the same call straight
    to the stage. Every level passes the same segment on, no copy, so the target is the
    ``nested`` one: each level adds at most one hop (of the hop that carries the tensor).

``cpu`` (after the rounds; information only)
    CPU time per call of every process a call goes through (user + system, all threads,
    from /proc/<pid>/stat), for one hop, a depth-1 flow and a depth-1 relay, with the
    context switches per call. It shows where a level's cost goes: the process in the
    middle does the work of both ends of a hop, and on a machine with fewer idle cores than
    busy processes every process gets slower when a third one joins.

Placements (``--placement``, default all three, as in bench_core and bench_tensors):
``unpinned`` leaves every process to the scheduler; ``same-core`` pins every thread of the
driver and of every actor process to one CPU; ``cross-core`` pins the driver to one CPU and
every actor process (the echo, the flows, the relays) to another, through ``spawn(...,
cpus=)``. A placement changes both the hop and the levels, and not alike: in cross-core the
hop crosses cores while a level's own hop (flow to echo) stays on one core.

Method: every target is measured in every round, in an order that rotates each round (so a
noisy machine moves all of them together); each round makes ``n`` sequential calls per
target after a warm-up; the figure is the median over all calls of all rounds. Output: a
table and one line per record prefixed with ``JSON `` (``grep '^JSON '``): figure, depth,
placement, value (µs), unit, floor_name, floor_value (the hop), ratio, target, pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _floors  # noqa: E402
import _report  # noqa: E402

import cascada  # noqa: E402
from cascada.actors._flow import Sequential, Step  # noqa: E402

FIGURES = ("nested", "relay", "inline", "tensor", "cpu")
TENSOR_BYTES = 16 << 20
TARGETED = ("nested", "tensor")  # the figures with a target: each level adds at most one hop
RECORDS: list[dict[str, Any]] = []
ROWS: list[list[str]] = []


class Echo(cascada.Actor):
    """The trivial stage every flow wraps."""

    async def echo(self, x: Any) -> Any:
        return x

    async def shape(self, x: Any) -> list[int]:
        return list(x.shape)


class Relay(cascada.Actor):
    """A level of nesting done by hand: pass the call on, answer what comes back."""

    def __init__(self, nxt: cascada.ActorRef, method: str) -> None:
        self.nxt = nxt
        self.method = method

    @cascada.concurrent
    async def run(self, x: Any) -> Any:
        return await self.nxt.ask(self.method, x)


class Sizes:
    def __init__(self, quick: bool) -> None:
        self.rounds = 3 if quick else 7
        self.n = 300 if quick else 1500
        self.warmup = 50 if quick else 200


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


async def rtt_samples(ref: cascada.ActorRef, method: str, n: int, warmup: int, arg: Any = 1) -> list[float]:
    for _ in range(warmup):
        await ref.ask(method, arg)
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        await ref.ask(method, arg)
        out.append((clock() - t0) / 1e3)
    return out


async def measure(targets: dict[str, tuple[cascada.ActorRef, str]], sz: Sizes,
                  args: dict[str, Any]) -> dict[str, list[float]]:
    names = list(targets)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(sz.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            ref, method = targets[name]
            samples[name].extend(await rtt_samples(ref, method, sz.n, sz.warmup, args.get(name, 1)))
        log(f"round {r + 1}/{sz.rounds}: " + "  ".join(
            f"{n} {statistics.median(samples[n][-sz.n:]):.0f}us" for n in names))
    return samples


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_and_switches(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                switches += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except FileNotFoundError:
            pass  # the thread ended meanwhile
    return (int(fields[11]) + int(fields[12])) / _TICK, switches


async def cpu_split(system: cascada.ActorSystem, targets: dict[str, tuple[cascada.ActorRef, str]],
                    echo: cascada.ActorRef, n: int, placement: str, spawn_kw: dict[str, Any]) -> None:
    """CPU and switches per call of each process on the path, for a hop and one level."""
    if "nested1" not in targets:  # --only cpu: the depth-1 level of each kind, made here
        targets = {**targets,
                   "nested1": (await system.spawn(Sequential, Step(echo, "echo"), name="cpu-flow", **spawn_kw), "run"),
                   "relay1": (await system.spawn(Relay, echo, "echo", name="cpu-relay", **spawn_kw), "run")}
    elif "relay1" not in targets:
        targets = {**targets, "relay1": (await system.spawn(Relay, echo, "echo", name="cpu-relay", **spawn_kw), "run")}
    for name in ("hop", "nested1", "relay1"):
        ref, method = targets[name]
        pids = {"driver": os.getpid(), "echo": echo.pid}
        if name != "hop":
            pids["middle"] = ref.pid
        for _ in range(100):
            await ref.ask(method, 1)
        before = {k: cpu_and_switches(p) for k, p in pids.items()}
        t0 = time.perf_counter()
        for _ in range(n):
            await ref.ask(method, 1)
        rtt = (time.perf_counter() - t0) / n * 1e6
        after = {k: cpu_and_switches(p) for k, p in pids.items()}
        cpu = {k: (after[k][0] - before[k][0]) / n * 1e6 for k in pids}
        switches = {k: (after[k][1] - before[k][1]) / n for k in pids}
        total = sum(cpu.values())
        log(f"cpu {placement} {name}: mean round trip {rtt:.0f} us; CPU per call " + ", ".join(
            f"{k} {v:.0f} us ({switches[k]:.1f} switches)" for k, v in cpu.items()) + f"; all {total:.0f} us")
        RECORDS.append({"figure": "cpu_per_call", "target_name": name, "placement": placement, "value": total, "unit": "us",
                        "mean_rtt_us": rtt, "cpu_us": cpu, "switches": switches, "n": n, "target": "info",
                        "pass": None, "floor_name": None, "floor_value": None, "ratio": None})


def record(figure: str, depth: int, rtt: float, hop: float, *, placement: str, flow_placement: str,
           relay: float | None) -> None:
    added = rtt - hop
    per_level = added / depth
    ratio = per_level / hop
    passed = ratio <= 1.0 if figure in TARGETED else None
    vs_relay = None if relay is None else rtt / relay
    RECORDS.append({"figure": figure, "depth": depth, "value": per_level, "unit": "us", "rtt_us": rtt,
                    "added_us": added, "floor_name": "one hop (ask round trip to the stage)", "floor_value": hop,
                    "ratio": ratio, "target": "<= 1.0x" if figure in TARGETED else "info", "placement": placement,
                    "flow_placement": flow_placement,
                    "pass": passed, "relay_rtt_us": relay, "ratio_to_relay": vs_relay})
    ROWS.append([figure, placement, str(depth), f"{rtt:.0f} us", f"{added:.0f} us", f"{per_level:.0f} us", f"{hop:.0f} us",
                 f"{ratio:.2f}x", "-" if vs_relay is None else f"{vs_relay:.2f}x",
                 "<= 1.0x" if passed is not None else "info",
                 "info" if passed is None else ("PASS" if passed else "FAIL")])


async def run_all(sz: Sizes, only: frozenset[str], placements: list[str]) -> None:
    for requested in placements:
        placement, note = _floors.resolve_placement(requested)
        if note:
            log(f"{requested}: {note}")
        cpus = _floors.placement_cpus(placement)
        # Actor processes are pinned by the runtime itself (spawn's cpus=), before their
        # constructors run, so every thread they ever start has the mask.
        spawn_kw: dict[str, Any] = {} if cpus is None else {"cpus": cpus[1]}
        try:
            async with cascada.ActorSystem() as system:
                await run_placement(system, sz, only, placement, cpus, spawn_kw)
        finally:
            _floors.unpin_driver()


async def run_placement(system: cascada.ActorSystem, sz: Sizes, only: frozenset[str], placement: str,
                        cpus: tuple[set[int], set[int]] | None, spawn_kw: dict[str, Any]) -> None:
    echo = await system.spawn(Echo, name="echo", placement="process", **spawn_kw)
    targets: dict[str, tuple[cascada.ActorRef, str]] = {"hop": (echo, "echo")}
    args: dict[str, Any] = {}
    if "tensor" in only:
        shared = cascada.empty((TENSOR_BYTES // 4,), "float32")
        shared.fill_(1.0)
        targets["hop_tensor"] = (echo, "shape")
        args["hop_tensor"] = shared
    for figure in FIGURES:
        if figure not in only or figure == "cpu":
            continue
        flow_placement: cascada.Placement = "local" if figure == "inline" else "process"
        kw = spawn_kw if flow_placement == "process" else {}
        inner: Any = Step(echo, "shape" if figure == "tensor" else "echo")
        below, method = echo, "echo"
        for depth in (1, 2, 3):
            if figure == "relay":
                below = await system.spawn(Relay, below, method, name=f"relay{depth}", placement=flow_placement, **kw)
                method = "run"
                targets[f"relay{depth}"] = (below, "run")
                continue
            flow = await system.spawn(Sequential, inner, name=f"{figure}{depth}", placement=flow_placement, **kw)
            targets[f"{figure}{depth}"] = (flow, "run")
            if figure == "tensor":
                args[f"{figure}{depth}"] = args["hop_tensor"]
            inner = flow
    if cpus is not None:  # after the spawns: the driver's own threads, zmq's I/O thread included
        pinned = _floors.set_all_threads(os.getpid(), cpus[0])
        log(f"{placement}: pinned {pinned} driver threads to {sorted(cpus[0])}, every actor process to "
            f"{sorted(cpus[1])}")
    log(f"placement {placement}")
    samples = await measure(targets, sz, args)
    for figure in FIGURES:
        if figure in only:
            if figure == "cpu":
                continue
            hop = statistics.median(samples["hop_tensor" if figure == "tensor" else "hop"])
            for depth in (1, 2, 3):
                relay = samples.get(f"relay{depth}") if figure == "nested" else None
                record(figure, depth, statistics.median(samples[f"{figure}{depth}"]), hop, placement=placement,
                       flow_placement="local" if figure == "inline" else "process",
                       relay=statistics.median(relay) if relay else None)
    if "tensor" in only:
        copies = {name: (await system.tensor_stats(ref))["shm"] for name, (ref, _) in targets.items()
                  if name.startswith("tensor")}
        if any(copies.values()):
            raise RuntimeError(f"a flow copied the shared tensor it should have passed on: {copies}")
        del args["hop_tensor"], shared
        args.clear()
    if "cpu" in only:
        await cpu_split(system, targets, echo, max(sz.n, 2000), placement, spawn_kw)
    for name, (ref, _) in targets.items():
        if not name.startswith(("hop", "relay")):
            m = await ref.ask("metrics")
            assert m["errors"] == 0 and m["ok"] == m["requests"], m


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check of about 25 s")
    parser.add_argument("--placement", metavar="LIST", default=",".join(_floors.PLACEMENTS),
                        help=f"comma-separated CPU placements, of {', '.join(_floors.PLACEMENTS)} (default: all)")
    _report.add_common_args(parser, FIGURES)
    args = parser.parse_args()
    only = _report.selected(parser, args.only, FIGURES)
    placements = [x.strip() for x in args.placement.split(",") if x.strip()]
    if not placements or not set(placements) <= set(_floors.PLACEMENTS):
        parser.error(f"--placement takes placements from {', '.join(_floors.PLACEMENTS)}")
    sz = Sizes(args.quick)
    print(f"cascada {cascada.__version__}  python {sys.version.split()[0]}  cpus {sorted(os.sched_getaffinity(0))}  "
          f"loadavg {open('/proc/loadavg').read().split()[:3]}  mode {'quick' if args.quick else 'full'}", flush=True)
    base = tempfile.mkdtemp(prefix="bench-flows-")
    previous_tempdir = tempfile.tempdir
    tempfile.tempdir = base
    t0 = time.perf_counter()
    try:
        cascada.run(run_all(sz, only, placements))
    finally:
        tempfile.tempdir = previous_tempdir
        leftovers = os.listdir(base)
        shutil.rmtree(base, ignore_errors=True)
    if ROWS:
        _report.print_table(["figure", "placement", "depth", "round trip", "added", "added/level", "one hop", "ratio",
                             "vs relay", "target", "result"], ROWS)
    for rec in RECORDS:
        print("JSON " + json.dumps(rec, separators=(",", ":")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RECORDS, f, indent=1)
    print(f"# medians over {sz.rounds} rotating rounds of {sz.n} sequential calls per target; "
          f"loadavg at end {open('/proc/loadavg').read().split()[:3]}; took {time.perf_counter() - t0:.0f} s")
    if leftovers:
        print(f"# WARNING: left behind in the temp dir: {leftovers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
