"""F3 moe-dispatch, run across real processes: ``cascada run f3``.

::

    driver ──forward(x [N, d], capacity)──▶ MoE layer actor (gate, top-k route, dispatch, combine)
                                               ├──forward(rows)──▶ expert0 actor  (own process)
                                               ├──forward(rows)──▶ expert1 actor  (own process)
                                               ├── ...            (all experts at once)
                                               └── combine in slot order ──▶ y [N, d]

Each expert is an actor in its own process holding its FFN (d -> 4d -> d, GELU), built from
the seeded parameters (``f3.init_params``) there, so no weights travel. The layer actor
routes with :func:`f3.route`, splits with :func:`f3.dispatch` (capacity per batch), sends
every expert its rows at once and combines with :func:`f3.combine`. Inputs are character
tokens of the standard library's prose (``pydoc_data.topics``) through a seeded embedding
and layer norm, in batches of ``BATCH`` tokens.

Measured in the same run: exactness against :func:`f3.moe_reference` in dropless mode (max
abs difference, must be < 1e-5), tokens/s of the actor version against the single-process
reference, drop rate and load imbalance at capacity factors 1.0 and 1.25 (checked equal to
the reference's), and the bytes the dispatch moves per token.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ..actors import Actor, ActorRef, ActorSystem, concurrent
from . import run_common as rc

D = 64
N_EXPERTS = 4
TOP_K = 2
SEED = 0
BATCH = 256
TOKENS = 8192
QUICK_TOKENS = 1024
CAPACITY_FACTORS: tuple[float | None, ...] = (None, 1.0, 1.25)
TOLERANCE = 1e-5


def _params(d: int, n_experts: int, seed: int) -> Any:
    from . import f3

    return f3.init_params(d, n_experts, seed=seed)


class MoEExpert(Actor):
    """One expert FFN, rebuilt from the seed in its own process."""

    def __init__(self, d: int, n_experts: int, seed: int, expert: int) -> None:
        import torch

        torch.set_num_threads(1)
        p = _params(d, n_experts, seed)
        self.expert = expert
        self.w1, self.b1, self.w2, self.b2 = (t.clone() for t in p.expert(expert))
        self.rows = 0

    @concurrent
    async def forward(self, x: Any) -> Any:
        """``GELU(x @ w1 + b1) @ w2 + b2`` for ``x [n, d]``."""
        import torch
        from torch.nn import functional as F

        self.rows += int(x.shape[0])
        with torch.no_grad():
            return F.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2


class MoELayer(Actor):
    """The router and combiner: gate, top-k, dispatch to the expert actors, combine."""

    def __init__(self, experts: list[ActorRef], d: int, n_experts: int, seed: int, k: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.params = _params(d, n_experts, seed)
        self.experts = experts
        self.k = k

    @concurrent
    async def forward(self, x: Any, capacity_factor: float | None = None) -> dict[str, Any]:
        """``{"y": [N, d], "stats": MoEStats as a dict}`` for tokens ``x [N, d]``."""
        import torch

        from . import f3

        with torch.no_grad():
            idx, w = f3.route(f3.gate_logits(x, self.params), self.k)
            plan = f3.dispatch(x, idx, self.params.n_experts,
                               f3.capacity_for(x.shape[0], self.k, self.params.n_experts, capacity_factor))
        empty = x.new_zeros((0, x.shape[1]))

        async def one(b: Any) -> Any:
            if b.token_idx.numel() == 0:
                return empty
            return await self.experts[b.expert].ask("forward", b.x.contiguous())

        outs = await asyncio.gather(*(one(b) for b in plan.batches))
        with torch.no_grad():
            y = f3.combine(list(outs), plan, w)
        return {"y": y, "stats": f3.stats_of(plan).as_dict()}


def inputs(n_tokens: int, d: int = D, seed: int = SEED) -> Any:
    """``[n_tokens, d]`` float32 activations: prose characters through a seeded embedding and
    a parameter-free layer norm."""
    import torch
    from torch.nn import functional as F

    from . import f3

    tokens = f3.domain_tokens("prose", n_tokens, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    embed = torch.randn(128, d, generator=g)
    return F.layer_norm(embed[tokens], (d,))


async def run_async(n_tokens: int | None = None, *, batch: int = BATCH, progress: bool = True) -> dict[str, Any]:
    """Run F3 through real actor processes; return the figures. Raises AssertionError when
    the dropless output is not within TOLERANCE of the reference."""
    import torch

    from . import f3

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs in this process: one thread, like each actor
    try:
        return await _run(n_tokens, batch, progress)
    finally:
        torch.set_num_threads(threads)


async def _run(n_tokens: int | None, batch: int, progress: bool) -> dict[str, Any]:
    import torch

    from . import f3

    n = TOKENS if n_tokens is None else int(n_tokens)
    if n < 1:
        raise ValueError("need at least one token")
    x = inputs(n)
    batches = [x[i:i + batch].contiguous() for i in range(0, n, batch)]
    params = _params(D, N_EXPERTS, SEED)
    t_start = time.perf_counter()
    async with ActorSystem(preload=["torch", "cascada.workloads.f3", __name__]) as system:
        experts = [await system.spawn(MoEExpert, D, N_EXPERTS, SEED, e, name=f"expert{e}", placement="process")
                   for e in range(N_EXPERTS)]
        layer = await system.spawn(MoELayer, experts, D, N_EXPERTS, SEED, TOP_K, name="moe", placement="process")
        startup = time.perf_counter() - t_start
        await layer.ask("forward", batches[0])  # warm-up: connections, first calls
        f3.moe_reference(batches[0], params, TOP_K)  # and the reference's first call

        results: dict[str, dict[str, Any]] = {}
        for cf in CAPACITY_FACTORS:
            label = "dropless" if cf is None else f"capacity {cf}"
            bar = rc.Progress(label, len(batches), enabled=progress)
            t0 = time.perf_counter()
            outs, lat = await rc.push(batches, lambda b: layer.ask("forward", b, cf, timeout=60.0), 4, bar)
            actor_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            refs = [f3.moe_reference(b, params, TOP_K, cf) for b in batches]
            ref_s = time.perf_counter() - t0
            diff = max(float((o["y"] - r[0]).abs().max()) for o, r in zip(outs, refs))
            requested = [sum(o["stats"]["requested"][e] for o in outs) for e in range(N_EXPERTS)]
            kept = [sum(o["stats"]["kept"][e] for o in outs) for e in range(N_EXPERTS)]
            dropped = sum(o["stats"]["dropped"] for o in outs)
            ref_dropped = sum(r[1].dropped for r in refs)
            imb = [o["stats"]["imbalance"] for o in outs]
            stats_total = f3.MoEStats(n_tokens=n, k=TOP_K, n_experts=N_EXPERTS, capacity=None, requested=requested,
                                      kept=kept, dropped=dropped, drop_rate=dropped / (n * TOP_K),
                                      tokens_fully_dropped=sum(o["stats"]["tokens_fully_dropped"] for o in outs),
                                      imbalance=max(requested) / (sum(requested) / N_EXPERTS),
                                      kept_imbalance=max(kept) / (sum(kept) / N_EXPERTS))
            moved = f3.bytes_moved(stats_total, D)
            results[label] = {
                "capacity_factor": cf, "capacity_per_batch": f3.capacity_for(batch, TOP_K, N_EXPERTS, cf),
                "max_abs_diff": diff, "dropped": dropped, "reference_dropped": ref_dropped,
                "drop_rate": round(dropped / (n * TOP_K), 6), "tokens_fully_dropped": stats_total.tokens_fully_dropped,
                "imbalance_mean_per_batch": round(sum(imb) / len(imb), 4),
                "imbalance_max_per_batch": round(max(imb), 4),
                "kept_imbalance": round(stats_total.kept_imbalance, 4),
                "requested": requested, "kept": kept,
                "actor_tokens_per_s": round(n / actor_s, 1), "reference_tokens_per_s": round(n / ref_s, 1),
                "ratio_to_reference": round((n / actor_s) / (n / ref_s), 4),
                "batch_latency_ms": rc.latency_ms(lat),
                "dispatch_bytes_per_token": round(moved["per_token"], 1),
                "layer_io_bytes_per_token": 2 * D * 4,
            }
        roles = {f"expert{e}": f"MoEExpert {e}: FFN {D}->{4 * D}->{D}" for e in range(N_EXPERTS)}
        roles["moe"] = f"MoELayer: gate, top-{TOP_K} route, dispatch, combine"
        actors = await rc.actor_figures(system, [layer, *experts], roles)

    dropless = results["dropless"]
    exact = dropless["max_abs_diff"] < TOLERANCE
    figures: dict[str, Any] = {
        "workload": "f3 moe-dispatch", "tokens": n, "batch": batch, "d": D, "n_experts": N_EXPERTS, "k": TOP_K,
        "tolerance": TOLERANCE, "exact": exact, "runs": results,
        "drops_match_reference": all(r["dropped"] == r["reference_dropped"] for r in results.values()),
        "actors": actors, "driver_pid": os.getpid(),
        "distinct_processes": len({a["pid"] for a in actors} | {os.getpid()}),
        "startup_s": round(startup, 3), "total_s": round(time.perf_counter() - t_start, 3),
    }
    if not exact:
        raise AssertionError(f"F3: dropless output differs from moe_reference by {dropless['max_abs_diff']:.3g} "
                             f"(tolerance {TOLERANCE})")
    return figures


def render(f: dict[str, Any]) -> str:
    lines = ["", f"cascada run f3: MoE dispatch, {f['tokens']} tokens in batches of {f['batch']}, d={f['d']}, "
                 f"{f['n_experts']} experts, top-{f['k']}", ""]
    lines += rc.render_rows([[a["name"], a["role"], a["pid"], a["handled"]] for a in f["actors"]],
                            header=["actor", "role", "pid", "handled"])
    lines.append(f"  driver pid {f['driver_pid']}; {f['distinct_processes']} distinct processes")
    lines.append("")
    rows = []
    for label, r in f["runs"].items():
        rows.append([label, "-" if r["capacity_per_batch"] is None else r["capacity_per_batch"],
                     f"{r['max_abs_diff']:.2e}", f"{100 * r['drop_rate']:.2f}%",
                     f"{r['dropped']} / {r['reference_dropped']}", r["imbalance_mean_per_batch"],
                     r["kept_imbalance"], r["actor_tokens_per_s"], r["reference_tokens_per_s"],
                     f"{r['ratio_to_reference']:.2f}x", r["dispatch_bytes_per_token"]])
    lines += rc.render_rows(rows, header=["mode", "capacity", "max |diff|", "drop rate", "dropped (ref)",
                                          "imbalance", "kept imb.", "actor tok/s", "ref tok/s", "ratio",
                                          "bytes/token"])
    lines += ["",
              f"  exact against moe_reference in dropless mode (max abs diff < {f['tolerance']:g}): "
              f"{'yes' if f['exact'] else 'NO'}; drop counts equal the reference's: "
              f"{'yes' if f['drops_match_reference'] else 'NO'}",
              "  imbalance: max / mean requested load per batch (1.0 is perfect); kept imb.: the same after drops",
              "  bytes/token: activation rows to the experts and back (d floats + token index each way), "
              "per input token;",
              f"  the layer's own input and output add {2 * f['d'] * 4} bytes per token",
              "", f"  startup {f['startup_s']:.2f} s, total {f['total_s']:.2f} s", ""]
    return "\n".join(lines)


def main(requests: int | None = None, *, quick: bool = False, json_path: str | None = None,
         progress: bool = True) -> int:
    """Run F3 (``requests`` = tokens), print the summary; exit 1 when it is not exact."""
    import sys

    from ..actors import run

    if requests is None and quick:
        requests = QUICK_TOKENS
    try:
        figures = run(run_async(requests, progress=progress))
    except AssertionError as exc:
        print(f"cascada run f3: FAILED: {exc}", file=sys.stderr)
        return 1
    print(render(figures))
    if json_path:
        rc.write_json(json_path, figures)
    return 0
