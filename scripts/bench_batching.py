"""Dynamic batching benchmark: an Expert actor with batching against the same actor without.

Run it from the repository root:

    .venv/bin/python scripts/bench_batching.py            # full run, about a minute
    .venv/bin/python scripts/bench_batching.py --quick    # smoke check, a few seconds
    .venv/bin/python scripts/bench_batching.py --json out.json --callers 64

The model is an MLP 256 -> 1024 -> 10 (``--hidden`` changes the 1024; float32, one torch
thread everywhere), wrapped in a ``cascada.stages.Expert`` in its own process.
``--callers`` concurrent callers in the driver each send one sample (a [256] tensor) at a
time and wait for its answer, until the round's items are done. Two Experts and an echo
actor run in the same system and are measured in alternating rounds (the order rotates),
so a noisy machine's drift hits all of them:

``batched_items_per_s``
    max_batch 32, max_wait 2 ms: items answered per second (median over rounds). The floor
    column is the unbatched figure of the same rounds and the ratio is batched / unbatched:
    what dynamic batching buys. The mean batch size formed comes from the actor's stats.

``unbatched_items_per_s``
    max_batch 1 (each request computed alone, at once), the same callers. Floor: eager torch
    in this process at batch 1 (model(x[None]) in a loop): the ratio is the fraction of the
    bare compute rate left after messaging.

``echo_items_per_s``
    The messaging ceiling: the same callers and the same [256] tensor sent to an actor in
    its own process that answers a [10] tensor without computing anything. ``batched`` is
    also shown as a fraction of it: with batching, what is left is mostly messaging.

``eager_b32_items_per_s`` / ``eager_b1_items_per_s``
    The compute ceilings, measured in this process between rounds: the model on batches of
    32 and of 1, no actors. ``batched`` is also shown as a fraction of the batch-32 ceiling.

Target (a proposal; the seed's papers give no figure for this): batched >= 1.5x unbatched
with 64 callers. The ceiling is the echo figure: at this model size one item's compute
(~40 us at batch 1) is about as long as one call's messaging, so batching, which removes
most of the compute, can give at most about 2x here; ``--hidden 4096`` makes compute
dominate and the ratio grows (2.3-2.9x in runs here).

Output: a table, one ``JSON {...}`` line per record (``grep '^JSON '``), and ``--json PATH``
writes the records as one list. Exit status 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _report  # noqa: E402

import cascada  # noqa: E402

FIGURES = ("batched", "unbatched", "echo", "eager")
D_IN, D_HID, D_OUT = 256, 1024, 10
RECORDS: list[dict[str, Any]] = []
ROWS: list[list[str]] = []


class EchoTensor(cascada.Actor):
    """Takes a sample, answers a [10] tensor: the messaging floor, no compute."""

    async def on_start(self) -> None:
        import torch

        self.out = torch.zeros(D_OUT)

    async def infer(self, x: Any) -> Any:
        return self.out


def make_mlp(hidden: int = D_HID) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, D_OUT))


def record(figure: str, value: float, unit: str, *, floor_name: str | None, floor_value: float | None,
           target: str | None = None, passed: bool | None = None, detail: str = "") -> None:
    ratio = value / floor_value if floor_value else None
    rec = {"figure": figure, "value": value, "unit": unit, "floor_name": floor_name, "floor_value": floor_value,
           "ratio": ratio, "target": target, "pass": passed, "detail": detail}
    RECORDS.append(rec)
    ROWS.append([figure, f"{value:,.0f} {unit}", "-" if floor_value is None else f"{floor_value:,.0f} ({floor_name})",
                 "-" if ratio is None else f"{ratio:.2f}x", target or "info",
                 "-" if passed is None else ("PASS" if passed else "miss"), detail])


def eager_rate(model: Any, batch: int, seconds: float) -> float:
    """Items per second of the bare model at this batch size, in this process."""
    import torch

    x = torch.randn(batch, D_IN)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += 1
    return n * batch / (time.perf_counter() - t0)


async def callers_rate(ref: cascada.ActorRef, x: Any, callers: int, per_caller: int) -> float:
    """Items per second answered to ``callers`` concurrent callers, each one at a time."""

    async def one() -> None:
        for _ in range(per_caller):
            await ref.ask("infer", x)

    t0 = time.perf_counter()
    await asyncio.gather(*[one() for _ in range(callers)])
    return callers * per_caller / (time.perf_counter() - t0)


async def run(args: argparse.Namespace, only: frozenset[str]) -> None:
    import torch

    from cascada.stages import Expert

    torch.set_num_threads(1)
    model = make_mlp(args.hidden)
    rounds = 3 if args.quick else 7
    per_caller = max(1, (1000 if args.quick else 6000) // args.callers)
    eager_s = 0.2 if args.quick else 0.5
    x = torch.randn(D_IN)
    async with cascada.ActorSystem(preload=("torch",)) as system:
        experts = {
            "batched": await system.spawn(Expert, model, max_batch=32, max_wait=0.002, threads=1, name="batched"),
            "unbatched": await system.spawn(Expert, model, max_batch=1, max_wait=0.0, threads=1, name="unbatched"),
        }
        echo = await system.spawn(EchoTensor, name="echo")
        await callers_rate(echo, x, args.callers, 2)
        with torch.no_grad():
            want = model(x[None])[0]
        for name, ref in experts.items():  # correctness once, and warm-up (MAC counting, first batch)
            torch.testing.assert_close(await ref.ask("infer", x), want)
            await callers_rate(ref, x, args.callers, 2)
        rates: dict[str, list[float]] = {"batched": [], "unbatched": [], "echo": [], "eager_b32": [], "eager_b1": []}
        for r in range(rounds):
            order = ["batched", "unbatched", "echo", "eager"]
            order = order[r % 4:] + order[: r % 4]
            for what in order:
                if what == "eager":
                    if "eager" in only or "unbatched" in only or "batched" in only:
                        rates["eager_b32"].append(eager_rate(model, 32, eager_s))
                        rates["eager_b1"].append(eager_rate(model, 1, eager_s))
                elif what == "echo":
                    if "echo" in only or "batched" in only:
                        rates["echo"].append(await callers_rate(echo, x, args.callers, per_caller))
                elif what in only or (what == "unbatched" and "batched" in only):
                    rates[what].append(await callers_rate(experts[what], x, args.callers, per_caller))
            print(f"round {r + 1}/{rounds}: " + "  ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items() if v),
                  flush=True)
        stats = {name: await ref.ask("stats") for name, ref in experts.items()}

    med = {k: statistics.median(v) for k, v in rates.items() if v}
    spread = {k: f"{min(v):,.0f}-{max(v):,.0f}" for k, v in rates.items() if v}
    b32, b1 = med.get("eager_b32"), med.get("eager_b1")
    if "batched" in med:
        detail = f"range {spread['batched']}; mean batch {stats['batched']['mean_batch_size']:.1f}"
        if "echo" in med:
            detail += f"; {med['batched'] / med['echo']:.2f}x of the echo ceiling"
        if b32:
            detail += f"; {med['batched'] / b32:.2f}x of the batch-32 compute ceiling"
        record("batched_items_per_s", med["batched"], "items/s", floor_name="unbatched",
               floor_value=med.get("unbatched"), target=">= 1.5x unbatched",
               passed=None if "unbatched" not in med else med["batched"] >= 1.5 * med["unbatched"], detail=detail)
    if "unbatched" in med:
        record("unbatched_items_per_s", med["unbatched"], "items/s", floor_name="eager b1", floor_value=b1,
               detail=f"range {spread['unbatched']}; mean batch {stats['unbatched']['mean_batch_size']:.1f}")
    if "echo" in med:
        record("echo_items_per_s", med["echo"], "items/s", floor_name=None, floor_value=None,
               detail=f"range {spread['echo']}; an actor answering without compute")
    if b32 is not None and b1 is not None:
        record("eager_b32_items_per_s", b32, "items/s", floor_name=None, floor_value=None,
               detail=f"range {spread['eager_b32']}; the model alone on batches of 32")
        record("eager_b1_items_per_s", b1, "items/s", floor_name=None, floor_value=None,
               detail=f"range {spread['eager_b1']}; the model alone on batches of 1")
    print(f"# MLP {D_IN}->{args.hidden}->{D_OUT}; {args.callers} callers, {per_caller} items each per round, "
          f"{rounds} rounds; MACs per item {stats['batched']['macs_per_item']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check of a few seconds")
    parser.add_argument("--callers", type=int, default=64, help="concurrent callers (default 64)")
    parser.add_argument("--hidden", type=int, default=D_HID,
                        help=f"hidden width of the MLP (default {D_HID}; larger makes compute dominate messaging)")
    _report.add_common_args(parser, FIGURES)
    args = parser.parse_args()
    only = _report.selected(parser, args.only, FIGURES)
    if args.callers < 1 or args.hidden < 1:
        parser.error("--callers and --hidden must be at least 1")
    print(f"cascada {cascada.__version__}  python {sys.version.split()[0]}  "
          f"loadavg {open('/proc/loadavg').read().split()[:3]}  mode {'quick' if args.quick else 'full'}", flush=True)
    t0 = time.perf_counter()
    cascada.run(run(args, only))
    _report.print_table(["figure", "cascada", "floor", "ratio", "target", "result", "detail"], ROWS)
    for rec in RECORDS:
        print("JSON " + json.dumps(rec, separators=(",", ":")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RECORDS, f, indent=1)
    print(f"# loadavg at end {open('/proc/loadavg').read().split()[:3]}; took {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
