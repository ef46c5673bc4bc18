"""F1 digits-cascade, run across real processes: ``cascada run f1`` (and ``cascada demo``).

::

    driver ──ask──▶ Cascade flow ──▶ tier0 Expert (linear, 640 MACs)      ─▶ verifier0 (maxprob >= τ0)
       (N in flight)     │        └▶ tier1 Expert (MLP, 4,736 MACs)       ─▶ verifier1 (maxprob >= τ1)
                         │        └▶ tier2 Expert (small CNN, 31,552 MACs) ─▶ verifier2 (maxprob >= τ2)
                         └────────▶ tier3 Expert (big CNN, 445,696 MACs): answers the rest

Every tier is an ``Expert`` actor in its own process (dynamic batching, MACs per item), every
verifier a ``Verifier`` with a ``ConfidenceCheck`` at the threshold the training script chose
on held-out data (``f1.selected_thresholds``), and the ``Cascade`` flow is an actor of its
own. The test split goes through the cascade with many requests in flight, then through the
big model alone (the baseline, through its actor too), then through tiers 0-2 alone to record
every tier's output; the accuracy-versus-compute curve and coverage at a risk are computed
from those recorded outputs with :mod:`cascada.workloads.f1_cascade` (and the live cascade's
decisions are checked against the offline cascade on the same outputs).

Data: ``source="auto"``: scikit-learn's bundled digits when scikit-learn imports, else the
generated glyphs (no dependency). Nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections import Counter
from typing import Any

from ..actors import ActorSystem, Cascade, Step
from . import run_common as rc

NAME = "f1"
IN_FLIGHT = 64
MAX_BATCH = 32
MAX_WAIT = 0.002
QUICK_REQUESTS = 200
SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
RISKS = (0.05, 0.01)


def tier_model(source: str, i: int) -> Any:
    """Tier ``i`` of the committed F1 models with a softmax on top (probabilities out); the
    factory an Expert calls in its own process."""
    import torch

    from . import f1

    torch.set_num_threads(1)
    return torch.nn.Sequential(f1.load_tiers(source)[i], torch.nn.Softmax(dim=-1)).eval()


def test_items(source: str = "auto") -> list[Any]:
    """The F1 test split as a list of items (float32 ``[64]`` tensors): a ``[run] source``
    for topology files."""
    from . import f1_data

    _, _, X_test, _ = f1_data.load(source)
    return [X_test[i].clone() for i in range(X_test.shape[0])]


async def run_async(requests: int | None = None, *, source: str = "auto", in_flight: int = IN_FLIGHT,
                    progress: bool = True) -> dict[str, Any]:
    """Run F1 through real actor processes and return its figures (a JSON-ready dict).

    ``requests``: items to push (default: the whole test split; more cycles through it)."""
    import torch

    from . import f1, f1_cascade, f1_data

    src = f1_data.resolve_source(source)
    _, _, X_test, y_test = f1_data.load(src)
    n = len(y_test) if requests is None else int(requests)
    if n < 1:
        raise ValueError("requests must be at least 1")
    idx = [i % len(y_test) for i in range(n)]
    X = X_test[idx]
    y = y_test[idx]
    items = [X[i].clone() for i in range(n)]
    thresholds = f1.selected_thresholds(src)
    tiers_local = f1.load_tiers(src)
    macs = [f1.macs(m) for m in tiers_local]
    n_tiers = len(macs)
    specs = f1.specs_for(src)

    t_start = time.perf_counter()
    async with ActorSystem(preload=["torch", "cascada.workloads.f1", __name__]) as system:
        experts = [await system.spawn(_Expert(), factory=functools.partial(tier_model, src, i), max_batch=MAX_BATCH,
                                      max_wait=MAX_WAIT, threads=1, name=f"tier{i}", placement="process")
                   for i in range(n_tiers)]
        verifiers = [await system.spawn(_Verifier(), check=_check(t), name=f"verifier{i}", placement="process")
                     for i, t in enumerate(thresholds)]
        cascade = await system.spawn(
            Cascade, [Step(e, "infer", kwargs={"with_cost": True}, take="out", name=e.name) for e in experts],
            [Step(v, "check") for v in verifiers] + [None], max_escalations=n_tiers - 1, name="cascade",
            placement="process")
        startup_s = time.perf_counter() - t_start
        # Warm-up: every tier counts its MACs on its first item, and the first calls set up connections.
        await cascade.ask("run", items[0])
        await asyncio.gather(*(e.ask("infer", items[0]) for e in experts))

        bar = rc.Progress("cascade", n, enabled=progress)
        t0 = time.perf_counter()
        answers, lat = await rc.push(items, lambda x: cascade.ask("run", x, timeout=60.0), in_flight, bar)
        cascade_s = time.perf_counter() - t0

        bar = rc.Progress("always-big", n, enabled=progress)
        t0 = time.perf_counter()
        big, big_lat = await rc.push(items, lambda x: experts[-1].ask("infer", x, with_cost=True, timeout=60.0),
                                     in_flight, bar)
        big_s = time.perf_counter() - t0

        # Record every cheaper tier's output on every item, for the offline curve.
        bar = rc.Progress("record tiers", n, enabled=progress)

        async def record(x: Any) -> list[Any]:
            return list(await asyncio.gather(*(e.ask("infer", x, timeout=60.0) for e in experts[:-1])))

        recorded, _ = await rc.push(items, record, in_flight, bar)

        roles = {f"tier{i}": f"Expert: {_describe(specs[i])}, {macs[i]:,} MACs" for i in range(n_tiers)}
        roles.update({f"verifier{i}": f"Verifier: maxprob >= {t:.4g}" for i, t in enumerate(thresholds)})
        roles["cascade"] = "Cascade flow over the tiers"
        actors = await rc.actor_figures(system, [cascade, *experts, *verifiers], roles)
        batching = []
        for e in experts:
            s = await e.ask("stats")
            batching.append({"name": e.name, "batches": s["batches"], "items": s["items"],
                             "mean_batch": round(s["mean_batch_size"], 2), "total_macs": s["total_macs"]})
        flow_metrics = await cascade.ask("metrics")

    # -- figures ----------------------------------------------------------------------------
    live_tier = torch.tensor([int(a["tier"]) for a in answers])
    live_probs = torch.stack([torch.as_tensor(a["value"]).float() for a in answers])
    live_pred = live_probs.argmax(-1)
    live_conf = live_probs.max(-1).values.double()
    live_cost = [float(a["cost"]) for a in answers]
    big_probs = torch.stack([torch.as_tensor(b["out"]).float() for b in big])
    big_pred = big_probs.argmax(-1)
    per_tier = [torch.stack([torch.as_tensor(r[i]).float() for r in recorded]) for i in range(n_tiers - 1)]
    per_tier.append(big_probs)

    acc = float((live_pred == y).double().mean())
    big_acc = float((big_pred == y).double().mean())
    mean_macs = sum(live_cost) / n
    big_macs = macs[-1]
    ratio = mean_macs / big_macs
    fractions = [float((live_tier == i).double().mean()) for i in range(n_tiers)]
    correct = live_pred == y
    offline = f1_cascade.confidence_cascade(per_tier, macs, thresholds)
    agree = int(((offline.exit_tier == live_tier) & (offline.pred == live_pred)).sum())

    def cov(conf: Any, ok: Any) -> dict[str, float]:
        return {str(r): round(f1_cascade.coverage_at_risk(conf, ok, r)[0], 6) for r in RISKS}

    curve = []
    for tau in SWEEP:
        res = f1_cascade.confidence_cascade(per_tier, macs, tau)
        curve.append({"threshold": tau, "accuracy": round(res.accuracy(y), 6),
                      "macs_per_item": round(res.macs_per_item, 1),
                      "macs_ratio": round(res.macs_per_item / big_macs, 6),
                      "fraction_per_tier": [round(f, 4) for f in res.fraction_per_tier],
                      "coverage_at_risk": {str(r): round(res.coverage_at_risk(y, r), 6) for r in RISKS}})
    tier_alone = [{"tier": i, "macs": macs[i], "accuracy": round(float((p.argmax(-1) == y).double().mean()), 6),
                   "coverage_at_risk": cov(p.max(-1).values.double(), p.argmax(-1) == y)}
                  for i, p in enumerate(per_tier)]
    holds_strict = ratio < f1_cascade.SHAPE_MACS_RATIO and acc >= big_acc - 1e-9
    holds = ratio < f1_cascade.SHAPE_MACS_RATIO and acc >= big_acc - 1.0 / n - 1e-9
    pids = {a["pid"] for a in actors}
    return {
        "workload": "f1 digits-cascade", "source": src, "requests": n, "distinct_items": len(set(idx)),
        "in_flight": in_flight, "max_batch": MAX_BATCH, "max_wait_s": MAX_WAIT,
        "thresholds": [round(t, 6) for t in thresholds], "tier_macs": macs,
        "cascade": {"accuracy": round(acc, 6), "macs_per_item": round(mean_macs, 1), "macs_ratio": round(ratio, 6),
                    "fraction_per_tier": [round(f, 6) for f in fractions],
                    "accuracy_per_tier": [round(float(correct[live_tier == i].double().mean()), 6)
                                          if bool((live_tier == i).any()) else None for i in range(n_tiers)],
                    "coverage_at_risk": cov(live_conf, correct),
                    "throughput_items_per_s": round(n / cascade_s, 1), "elapsed_s": round(cascade_s, 3),
                    "latency_ms": rc.latency_ms(lat)},
        "big": {"accuracy": round(big_acc, 6), "macs_per_item": big_macs,
                "coverage_at_risk": cov(big_probs.max(-1).values.double(), big_pred == y),
                "throughput_items_per_s": round(n / big_s, 1), "elapsed_s": round(big_s, 3),
                "latency_ms": rc.latency_ms(big_lat)},
        "shape": {"claim": "match the big model with < 30% of its MACs", "max_macs_ratio": f1_cascade.SHAPE_MACS_RATIO,
                  "macs_ratio": round(ratio, 6), "accuracy_gap": round(acc - big_acc, 6),
                  "holds_strict": bool(holds_strict), "holds_within_one_item": bool(holds)},
        "offline_agreement": {"items": n, "agree": agree},
        "curve": curve, "tier_alone": tier_alone,
        "actors": actors, "driver_pid": os.getpid(), "distinct_processes": len(pids | {os.getpid()}),
        "batching": batching,
        "cascade_metrics": {k: flow_metrics.get("cascade", {}).get(k) for k in ("answered_by", "escalation_rate")},
        "startup_s": round(startup_s, 3), "total_s": round(time.perf_counter() - t_start, 3),
    }


def _Expert() -> Any:
    from ..stages import Expert

    return Expert


def _Verifier() -> Any:
    from ..stages import Verifier

    return Verifier


def _check(threshold: float) -> Any:
    from ..stages import ConfidenceCheck

    return ConfidenceCheck(threshold)


def _describe(spec: Any) -> str:
    if spec.kind == "cnn":
        return f"CNN {spec.channels[0]}/{spec.channels[1]}ch"
    if spec.kind == "mlp":
        return "MLP " + "-".join(str(h) for h in spec.hidden)
    return "linear"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(f: dict[str, Any]) -> str:
    c, b, s = f["cascade"], f["big"], f["shape"]
    n = f["requests"]
    lines = ["", f"cascada run f1: digits cascade ({f['source']}), {n} test items "
                 f"({f['distinct_items']} distinct), {f['in_flight']} in flight", ""]
    lines += rc.render_rows([[a["name"], a["role"], a["pid"], a["handled"]] for a in f["actors"]],
                            header=["actor", "role", "pid", "handled"])
    lines.append(f"  driver pid {f['driver_pid']}; {f['distinct_processes']} distinct processes")
    lines.append("")
    rows = []
    for i, frac in enumerate(c["fraction_per_tier"]):
        cum = sum(f["tier_macs"][: i + 1])
        rows.append([f"tier{i}", _pct(frac), _pct(c["accuracy_per_tier"][i]), cum,
                     f["batching"][i]["mean_batch"]])
    lines += rc.render_rows(rows, header=["answered by", "share", "correct", "MACs (cum.)", "mean batch"])
    lines.append("")
    lines += rc.render_rows([
        ["cascade", _pct(c["accuracy"]), round(c["macs_per_item"]), f"{100 * c['macs_ratio']:.1f}%",
         _pct(c["coverage_at_risk"]["0.05"]), _pct(c["coverage_at_risk"]["0.01"]), c["throughput_items_per_s"],
         c["latency_ms"]["p50"], c["latency_ms"]["p95"]],
        ["always big", _pct(b["accuracy"]), b["macs_per_item"], "100.0%", _pct(b["coverage_at_risk"]["0.05"]),
         _pct(b["coverage_at_risk"]["0.01"]), b["throughput_items_per_s"], b["latency_ms"]["p50"],
         b["latency_ms"]["p95"]],
    ], header=["", "accuracy", "MACs/item", "of big", "cov@5%", "cov@1%", "items/s", "p50 ms", "p95 ms"])
    verdict = "HOLDS" if s["holds_strict"] else ("holds within one item" if s["holds_within_one_item"]
                                                 else "does NOT hold")
    lines += ["", f"  seed shape: match the big model with < 30% of its MACs -> cascade uses "
                  f"{100 * s['macs_ratio']:.1f}% of the big model's MACs, accuracy "
                  f"{100 * s['accuracy_gap']:+.2f} points: {verdict}",
              f"  live decisions equal the offline cascade on the recorded outputs: "
              f"{f['offline_agreement']['agree']}/{f['offline_agreement']['items']}", "",
              "  accuracy vs compute (one threshold on every tier, offline on the recorded tier outputs):"]
    lines += rc.render_rows([[p["threshold"], _pct(p["accuracy"]), round(p["macs_per_item"]),
                              f"{100 * p['macs_ratio']:.1f}%", _pct(p["coverage_at_risk"]["0.05"]),
                              _pct(p["coverage_at_risk"]["0.01"]),
                              " ".join(f"{100 * x:.0f}" for x in p["fraction_per_tier"])] for p in f["curve"]],
                            header=["tau", "accuracy", "MACs/item", "of big", "cov@5%", "cov@1%", "% per tier"],
                            indent="    ")
    lines.append("    each tier alone: " + ", ".join(
        f"tier{t['tier']} {_pct(t['accuracy'])} ({t['macs']:,} MACs)" for t in f["tier_alone"]))
    lines += ["", f"  startup {f['startup_s']:.2f} s, total {f['total_s']:.2f} s", ""]
    return "\n".join(lines)


def main(requests: int | None = None, *, quick: bool = False, json_path: str | None = None, source: str = "auto",
         progress: bool = True) -> int:
    """Run F1, print the summary, optionally write the figures as JSON. Returns the exit code."""
    from ..actors import run

    if requests is None and quick:
        requests = QUICK_REQUESTS
    figures = run(run_async(requests, source=source, progress=progress))
    print(render(figures))
    if json_path:
        rc.write_json(json_path, figures)
    return 0
