"""F2 spec-decode, run across real processes: ``cascada run f2``.

::

    driver ──draft(seq, k)──▶ draft Decoder   (1 layer, d=64, its own process)
       │   ◀──k tokens, q────┘
       └──verify(seq, drafted)──▶ target Verifier (4 layers, d=128, its own process)
           ◀──accepted + the target's next token

The committed CharLM weights (``f2.load_models()``). Prompts are cut from the validation
split of the corpus (``pydoc_data.topics``). Measured in the same run, one prompt at a time:

- speculative decoding (``cascada.stages.speculative_generate``), greedy and seeded sampling;
- target-only decoding through the target actor alone: one ``verify(seq, [])`` per token
  (the same actor, the same one-pass scoring of the whole prefix, no draft);
- for reference, target-only decoding with the KV cache, by a target ``Decoder`` actor.

Reported: tokens/s of each and the speedup, acceptance per drafted position, the speedup
predicted from the acceptance rate alpha and the draft/target cost ratio c measured through
the same actors, (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)), and a check that greedy
speculative output is token for token the target-only greedy output (a mismatch fails the
run: :class:`GreedyMismatch`).
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


async def _target_only(target: ActorRef, prompt: list[int], max_new: int, mode: str, seed: int) -> list[int]:
    """Target-only decoding through the target Verifier actor: one verify(seq, []) per token."""
    from ..stages import derive_seed

    seq, out = list(prompt), []
    for r in range(max_new):
        v = await target.ask("verify", seq, [], None, mode, TEMPERATURE, None, derive_seed(seed, "target", r))
        tok = int(v["tokens"][0])
        out.append(tok)
        seq.append(tok)
    return out


async def _mean_s(fn: Any, repeats: int) -> float:
    await fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        await fn()
    return (time.perf_counter() - t0) / repeats


def predicted_speedup(alpha: float, k: int, c: float) -> float:
    """(1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)): expected tokens per round over the cost of
    a round in target calls (Leviathan et al. 2023)."""
    per_round = float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return per_round / (k * c + 1.0)


async def run_async(n_prompts: int | None = None, *, max_new: int = MAX_NEW, k: int = K,
                    progress: bool = True, kv_baseline: bool = True) -> dict[str, Any]:
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
        kv: ActorRef | None = None
        if kv_baseline:
            kv = await system.spawn(Decoder, factory=functools.partial(lm_model, "target"), threads=1,
                                    name="target-kv", placement="process")
        startup = time.perf_counter() - t_start

        # The draft/target cost ratio c, measured through the same actors on a typical prefix.
        probe = ps[0] + ps[0][: max_new // 2]
        t_draft = await _mean_s(lambda: draft.ask("draft", probe, k), 10) / k
        t_target = await _mean_s(lambda: target.ask("verify", probe, []), 10)
        c = t_draft / t_target

        runs: dict[str, dict[str, Any]] = {}
        greedy_outputs: dict[str, list[list[int]]] = {"spec": [], "target": []}
        bar = rc.Progress("decoding", 2 * n * (3 if kv_baseline else 2), enabled=progress)
        for mode in ("greedy", "sample"):
            stats = SpeculativeStats(k)
            spec_tokens = target_tokens = kv_tokens = 0
            spec_s = target_s = kv_s = 0.0
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
                ref = await _target_only(target, p, max_new, mode, seed)
                target_s += time.perf_counter() - t0
                target_tokens += len(ref)
                bar.advance()
                if kv is not None:
                    t0 = time.perf_counter()
                    kv_out = await kv.ask("complete", p, max_new, mode, TEMPERATURE, None, seed)
                    kv_s += time.perf_counter() - t0
                    kv_tokens += len(kv_out)
                    bar.advance()
                    if mode == "greedy" and list(kv_out) != ref:
                        raise GreedyMismatch(f"prompt {i}: target-only greedy differs between the Verifier and "
                                             "the KV-cache Decoder")
                if mode == "greedy":
                    greedy_outputs["spec"].append(res.tokens)
                    greedy_outputs["target"].append(ref)
            # alpha as in the formula: the chance a drafted token is accepted given that every
            # earlier one was (accepted / offered), not accepted / drafted.
            offered = sum(stats.offered_at)
            alpha = sum(stats.accepted_at) / offered if offered else 0.0
            figures = {
                "tokens": spec_tokens, "rounds": stats.rounds, "alpha": round(alpha, 4),
                "accepted_per_drafted": round(stats.acceptance_rate, 4),
                "position_rates": [None if r is None else round(r, 4) for r in stats.position_rates],
                "offered_at": list(stats.offered_at), "accepted_at": list(stats.accepted_at),
                "tokens_per_round": round(stats.tokens_per_round, 3),
                "spec_tokens_per_s": round(spec_tokens / spec_s, 1),
                "target_only_tokens_per_s": round(target_tokens / target_s, 1),
                "speedup": round((spec_tokens / spec_s) / (target_tokens / target_s), 3),
                "predicted_speedup": round(predicted_speedup(alpha, k, c), 3),
            }
            if kv is not None:
                figures["target_kv_tokens_per_s"] = round(kv_tokens / kv_s, 1)
                figures["speedup_vs_kv"] = round((spec_tokens / spec_s) / (kv_tokens / kv_s), 3)
            runs[mode] = figures
        refs = [draft, target] + ([kv] if kv is not None else [])
        roles = {"draft": "Decoder: 1 layer, d=64 (drafts k tokens)",
                 "target": "Verifier: 4 layers, d=128 (verifies; target-only)",
                 "target-kv": "Decoder: the target with its KV cache (reference)"}
        actors = await rc.actor_figures(system, refs, roles)

    mismatches = [i for i, (a, b) in enumerate(zip(greedy_outputs["spec"], greedy_outputs["target"])) if a != b]
    figures_all: dict[str, Any] = {
        "workload": "f2 spec-decode", "prompts": n, "prompt_len": len(ps[0]), "max_new": max_new, "k": k,
        "temperature": TEMPERATURE, "cost_ratio_c": round(c, 4), "draft_ms_per_token": round(t_draft * 1e3, 3),
        "target_ms_per_call": round(t_target * 1e3, 3), "greedy": runs["greedy"], "sample": runs["sample"],
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
                     " ".join("-" if x is None else f"{x:.2f}" for x in r["position_rates"]),
                     r.get("target_kv_tokens_per_s", "-"),
                     "-" if "speedup_vs_kv" not in r else f"{r['speedup_vs_kv']:.2f}x"])
    lines += rc.render_rows(rows, header=["mode", "spec tok/s", "target tok/s", "speedup", "predicted", "alpha",
                                          "tok/round", "alpha per position", "KV tok/s", "vs KV"])
    lines += ["",
              f"  cost ratio c = draft ms per token / target ms per call = {f['draft_ms_per_token']:.2f} / "
              f"{f['target_ms_per_call']:.2f} = {f['cost_ratio_c']:.3f} (through the actors, hops included)",
              "  predicted = (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)); alpha = accepted / offered drafted tokens",
              "  target tok/s: one verify(seq, []) per token on the target actor; KV tok/s: a target Decoder "
              "with its KV cache (reference:\n  the Verifier re-scores the whole prefix every round, so a KV-cached target can beat it)",
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
