"""F2 spec-decode, run across real processes: ``cascada run f2``.

::

    driver ──draft(seq, k)──▶ draft Decoder   (1 layer, d=64, its own process)
       │   ◀──k tokens, q────┘
       └──verify(seq, drafted)──▶ target Verifier (4 layers, d=128, its own process)
           ◀──accepted + the target's next token

The committed CharLM weights (``f2.load_models()``). Prompts are cut from the validation
split of the corpus (``pydoc_data.topics``). Measured in the same run, one prompt at a time:

- speculative decoding (``cascada.stages.speculative_generate``), greedy and seeded sampling,
  with a generation session on both actors: each keeps its KV cache across rounds, so a
  round runs the draft on the new positions only and the target on its last emitted token
  plus the k drafted ones, in one pass; both roll back to the accepted length;
- the baseline, target-only decoding with the KV cache: a target ``Decoder`` actor
  (``complete``, one ask per prompt), the fair reference for a cached speculative run.

Reported: tokens/s of each and the speedup, acceptance per drafted position, the speedup
predicted from the acceptance rate alpha and the cost ratio c of one cached draft step to
one cached target step, both measured through the actors' own processes,
(1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)), and a check that greedy speculative output is
token for token the target-only greedy output (a mismatch fails the run:
:class:`GreedyMismatch`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from ..actors import ActorRef, ActorSystem
from . import run_common as rc

K = 4
MAX_NEW = 64
PROMPTS = 4
PROMPT_LEN = 48
QUICK_PROMPTS = 2
QUICK_MAX_NEW = 32
TEMPERATURE = 1.0


class GreedyMismatch(AssertionError):
    """Greedy speculative decoding did not reproduce target-only greedy decoding."""


def lm_model(which: str) -> Any:
    """The committed F2 draft or target model (``which``), one torch thread: the factory the
    Decoder and Verifier actors call in their own processes."""
    import torch

    from . import f2

    torch.set_num_threads(1)
    draft, target, _ = f2.load_models()
    return draft if which == "draft" else target


def prompts(n: int, length: int = PROMPT_LEN, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens from the validation split, at seeded offsets,
    each starting after a space and holding no end-of-text token."""
    import random

    from . import f2

    text = f2.corpus_text("val")
    tok = f2.Tokenizer()
    rng = random.Random(f"cascada-f2-prompts-{seed}")
    out: list[list[int]] = []
    while len(out) < n:
        start = rng.randrange(0, len(text) - length - 1)
        start = text.find(" ", start) + 1
        piece = text[start:start + length]
        if len(piece) == length and chr(f2.EOS) not in piece:
            out.append(tok.encode(piece))
    return out


async def _median_s(fn: Any, repeats: int) -> float:
    await fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


async def step_ms(decoder: ActorRef, prompt: list[int], steps: int = 32, repeats: int = 7) -> float:
    """One cached decoding step of ``decoder`` (a Decoder actor), in ms: the time of
    ``complete(prompt, steps + 1)`` less that of ``complete(prompt, 1)``, over ``steps``
    (the prompt's prefill and the actor hop cancel), medians of ``repeats``."""
    long = await _median_s(lambda: decoder.ask("complete", prompt, steps + 1), repeats)
    short = await _median_s(lambda: decoder.ask("complete", prompt, 1), repeats)
    return max(long - short, 1e-9) / steps * 1e3


def predicted_speedup(alpha: float, k: int, c: float) -> float:
    """(1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)): expected tokens per round over the cost of
    a round in target calls (Leviathan et al. 2023)."""
    per_round = float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return per_round / (k * c + 1.0)


async def run_async(n_prompts: int | None = None, *, max_new: int = MAX_NEW, k: int = K,
                    progress: bool = True) -> dict[str, Any]:
    """Run F2 through real actor processes; return the figures. Raises GreedyMismatch when
    greedy speculative output differs from target-only greedy output."""
    from ..stages import Decoder, SpeculativeStats, Verifier, speculative_generate
    from . import f2

    n = PROMPTS if n_prompts is None else int(n_prompts)
    if n < 1:
        raise ValueError("need at least one prompt")
    ps = prompts(n)
    tok = f2.Tokenizer()
    t_start = time.perf_counter()
    async with ActorSystem(preload=["torch", "cascada.workloads.f2", __name__]) as system:
        draft = await system.spawn(Decoder, factory=functools.partial(lm_model, "draft"), threads=1, name="draft",
                                   placement="process")
        target = await system.spawn(Verifier, factory=functools.partial(lm_model, "target"), threads=1,
                                    name="target", placement="process")
        kv = await system.spawn(Decoder, factory=functools.partial(lm_model, "target"), threads=1,
                                name="target-kv", placement="process")
        startup = time.perf_counter() - t_start

        # The cost ratio c: one cached draft step over one cached target step, each measured
        # in its own actor process on a typical prefix.
        probe = ps[0] + ps[0][: max_new // 2]
        t_draft = await step_ms(draft, probe)
        t_target = await step_ms(kv, probe)
        c = t_draft / t_target

        runs: dict[str, dict[str, Any]] = {}
        greedy_outputs: dict[str, list[list[int]]] = {"spec": [], "target": []}
        bar = rc.Progress("decoding", 2 * n * 2, enabled=progress)
        for mode in ("greedy", "sample"):
            stats = SpeculativeStats(k)
            spec_tokens = kv_tokens = 0
            spec_s = kv_s = 0.0
            for i, p in enumerate(ps):
                seed = 1000 + i
                t0 = time.perf_counter()
                res = await speculative_generate(draft, target, p, max_new, k, mode=mode,
                                                 temperature=TEMPERATURE, seed=seed, timeout=120.0)
                spec_s += time.perf_counter() - t0
                spec_tokens += len(res.tokens)
                for j in range(k):
                    stats.offered_at[j] += res.stats.offered_at[j]
                    stats.accepted_at[j] += res.stats.accepted_at[j]
                stats.rounds += res.stats.rounds
                stats.drafted += res.stats.drafted
                stats.accepted += res.stats.accepted
                stats.emitted += res.stats.emitted
                bar.advance()
                t0 = time.perf_counter()
                ref = list(await kv.ask("complete", p, max_new, mode, TEMPERATURE, None, seed))
                kv_s += time.perf_counter() - t0
                kv_tokens += len(ref)
                bar.advance()
                if mode == "greedy":
                    greedy_outputs["spec"].append(res.tokens)
                    greedy_outputs["target"].append(ref)
            # alpha as in the formula: the chance a drafted token is accepted given that every
            # earlier one was (accepted / offered), not accepted / drafted.
            offered = sum(stats.offered_at)
            alpha = sum(stats.accepted_at) / offered if offered else 0.0
            spec_rate, kv_rate = spec_tokens / spec_s, kv_tokens / kv_s
            runs[mode] = {
                "tokens": spec_tokens, "rounds": stats.rounds, "alpha": round(alpha, 4),
                "accepted_per_drafted": round(stats.acceptance_rate, 4),
                "position_rates": [None if r is None else round(r, 4) for r in stats.position_rates],
                "offered_at": list(stats.offered_at), "accepted_at": list(stats.accepted_at),
                "tokens_per_round": round(stats.tokens_per_round, 3),
                "spec_tokens_per_s": round(spec_rate, 1),
                "target_only_tokens_per_s": round(kv_rate, 1),
                "speedup": round(spec_rate / kv_rate, 3),
                "predicted_speedup": round(predicted_speedup(alpha, k, c), 3),
                "spec_ms_per_round": round(spec_s / max(stats.rounds, 1) * 1e3, 3),
            }
        target_stats = await target.ask("stats")
        refs = [draft, target, kv]
        roles = {"draft": "Decoder: 1 layer, d=64 (drafts k tokens, KV session)",
                 "target": "Verifier: 4 layers, d=128 (verifies, KV session)",
                 "target-kv": "Decoder: the target with its KV cache (target-only baseline)"}
        actors = await rc.actor_figures(system, refs, roles)

    mismatches = [i for i, (a, b) in enumerate(zip(greedy_outputs["spec"], greedy_outputs["target"])) if a != b]
    figures_all: dict[str, Any] = {
        "workload": "f2 spec-decode", "prompts": n, "prompt_len": len(ps[0]), "max_new": max_new, "k": k,
        "temperature": TEMPERATURE, "baseline": "target Decoder with KV cache",
        "cost_ratio_c": round(c, 4), "draft_ms_per_step": round(t_draft, 4),
        "target_ms_per_step": round(t_target, 4), "greedy": runs["greedy"], "sample": runs["sample"],
        "target_sessions": {key: target_stats.get(key) for key in ("sessions", "opened", "evicted")},
        "greedy_identical": not mismatches, "greedy_mismatched_prompts": mismatches,
        "example": {"prompt": tok.decode(ps[0]), "greedy": tok.decode(greedy_outputs["spec"][0])},
        "actors": actors, "driver_pid": os.getpid(),
        "distinct_processes": len({a["pid"] for a in actors} | {os.getpid()}),
        "startup_s": round(startup, 3), "total_s": round(time.perf_counter() - t_start, 3),
    }
    if mismatches:
        raise GreedyMismatch(f"greedy speculative output differs from target-only greedy on prompts {mismatches}")
    return figures_all


def render(f: dict[str, Any]) -> str:
    lines = ["", f"cascada run f2: speculative decoding, {f['prompts']} prompts of {f['prompt_len']} chars, "
                 f"{f['max_new']} new tokens each, k={f['k']} drafted per round", ""]
    lines += rc.render_rows([[a["name"], a["role"], a["pid"], a["handled"]] for a in f["actors"]],
                            header=["actor", "role", "pid", "handled"])
    lines.append(f"  driver pid {f['driver_pid']}; {f['distinct_processes']} distinct processes")
    lines.append("")
    rows = []
    for mode in ("greedy", "sample"):
        r = f[mode]
        rows.append([mode, r["spec_tokens_per_s"], r["target_only_tokens_per_s"], f"{r['speedup']:.2f}x",
                     f"{r['predicted_speedup']:.2f}x", r["alpha"], r["tokens_per_round"],
                     " ".join("-" if x is None else f"{x:.2f}" for x in r["position_rates"])])
    lines += rc.render_rows(rows, header=["mode", "spec tok/s", "target-only tok/s", "speedup", "predicted",
                                          "alpha", "tok/round", "alpha per position"])
    lines += ["",
              f"  target-only: a target Decoder with its KV cache (one ask per prompt); speculative: both actors "
              f"keep\n  their KV caches across rounds (a session each), the target scores 1 + k positions a round",
              f"  cost ratio c = cached draft step / cached target step = {f['draft_ms_per_step']:.3f} / "
              f"{f['target_ms_per_step']:.3f} ms = {f['cost_ratio_c']:.3f} (in the actors' processes)",
              "  predicted = (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)); alpha = accepted / offered drafted tokens "
              "(actor hops not counted)",
              f"  greedy speculative output identical to target-only greedy: "
              f"{'yes' if f['greedy_identical'] else 'NO'} ({f['prompts']} prompts)",
              f"  example: {f['example']['prompt']!r} -> {f['example']['greedy']!r}",
              "", f"  startup {f['startup_s']:.2f} s, total {f['total_s']:.2f} s", ""]
    return "\n".join(lines)


def main(requests: int | None = None, *, quick: bool = False, json_path: str | None = None,
         progress: bool = True) -> int:
    """Run F2 (``requests`` = prompts), print the summary; exit 1 when greedy outputs differ."""
    import sys

    from ..actors import run

    max_new = QUICK_MAX_NEW if quick else MAX_NEW
    if requests is None and quick:
        requests = QUICK_PROMPTS
    try:
        figures = run(run_async(requests, max_new=max_new, progress=progress))
    except GreedyMismatch as exc:
        print(f"cascada run f2: FAILED: {exc}", file=sys.stderr)
        return 1
    print(render(figures))
    if json_path:
        rc.write_json(json_path, figures)
    return 0
