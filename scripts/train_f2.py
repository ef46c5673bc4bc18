#!/usr/bin/env python3
"""Train the F2 spec-decode character LMs (draft and target) and write the committed weights.

Both models train on the training split of the standard library's ``pydoc_data.topics`` text
(``cascada.workloads.f2``): the target (4 layers, d=128) and the draft (1 layer, d=64),
next-character cross-entropy on random 256-character windows. The script saves fp16
``cascada/workloads/weights/f2_target.pt`` and ``f2_draft.pt``, reloads them, and records in
``weights/f2.json``: validation loss and bits per char, parameters, MACs per token, measured
forward costs on this machine, the draft/target cost ratio c, the draft's greedy agreement
with the target on validation text, and the speculative-decoding speedup predicted from them,
(1 - a^(g+1)) / ((1 - a)(g c + 1)) for gamma g (outside the seed papers: standard
speculative-sampling maths).

Deterministic: seeded, one thread. About four and a half minutes on one idle core.

    .venv/bin/python scripts/train_f2.py [--target-steps N] [--draft-steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from cascada.workloads import f2

SEED = 0
BATCH = 8


def agreement(draft: f2.CharLM, target: f2.CharLM, tokens: torch.Tensor, windows: int = 32) -> float:
    """Fraction of validation positions where the draft's argmax equals the target's (an
    estimate of the greedy acceptance rate alpha)."""
    t = target.context_len
    x = tokens[: windows * t].view(windows, t)
    with torch.no_grad():
        a = draft(x)[0].argmax(-1)
        b = target(x)[0].argmax(-1)
    return float((a == b).double().mean())


def sampled_acceptance(draft: f2.CharLM, target: f2.CharLM, tokens: torch.Tensor, windows: int = 32) -> float:
    """Mean of sum_x min(p(x), q(x)) over validation positions: the expected acceptance rate
    alpha of speculative sampling at temperature 1."""
    t = target.context_len
    x = tokens[: windows * t].view(windows, t)
    with torch.no_grad():
        q = torch.softmax(draft(x)[0], -1)
        p = torch.softmax(target(x)[0], -1)
    return float(torch.minimum(p, q).sum(-1).double().mean())


def predicted_speedup(alpha: float, gamma: int, c: float) -> float:
    """Expected speedup of speculative decoding over target-only decoding (Leviathan et al.)."""
    if alpha >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the F2 draft and target character LMs.")
    ap.add_argument("--target-steps", type=int, default=1400)
    ap.add_argument("--draft-steps", type=int, default=1500)
    ap.add_argument("--out", default=None, help="directory for weights and JSON (default: the package's weights/)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, val = f2.corpus_tokens("train"), f2.corpus_tokens("val")
    print(f"F2 corpus: pydoc_data.topics, {train.numel():,} training and {val.numel():,} validation characters, "
          f"vocabulary {f2.VOCAB_SIZE} (ASCII)")
    runs: dict[str, Any] = {}
    for name, config, steps, lr in (("draft", f2.DRAFT_CONFIG, args.draft_steps, 3e-3),
                                    ("target", f2.TARGET_CONFIG, args.target_steps, 3e-3)):
        t0 = time.perf_counter()

        def log(step: int, loss: float, name: str = name) -> None:
            print(f"  {name} step {step:>5}  train loss {loss:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

        model = f2.train_lm(config, train, steps=steps, batch_size=BATCH, lr=lr, warmup=100, seed=SEED, log=log)
        f2.save_model(model, f"f2_{name}", args.out)
        runs[name] = {"config": f2.config_dict(config), "steps": steps, "batch": BATCH, "lr": lr, "warmup": 100,
                      "train_seconds": round(time.perf_counter() - t0, 1)}
    draft, target, _ = f2.load_models(args.out)  # measured as committed (fp16 round trip)
    gammas = (2, 3, 4, 5)
    for name, model in (("draft", draft), ("target", target)):
        ev = f2.evaluate(model, val)
        cost = f2.measure_cost(model)
        runs[name].update(val_loss=round(ev["loss"], 4), val_bpc=round(ev["bpc"], 4), val_chars=int(ev["chars"]),
                          params=f2.param_count(model), macs_per_token=f2.macs_per_token(model.config),
                          step_ms=round(cost["step_ms"], 4), block_ms=round(cost["block_ms"], 4),
                          full_tokens_per_s=round(cost["full_tokens_per_s"], 1),
                          step_tokens_per_s=round(1000 / cost["step_ms"], 1))
    c_measured = runs["draft"]["step_ms"] / runs["target"]["step_ms"]
    c_macs = runs["draft"]["macs_per_token"] / runs["target"]["macs_per_token"]
    alpha_greedy = agreement(draft, target, val)
    alpha_sampled = sampled_acceptance(draft, target, val)
    meta: dict[str, Any] = {
        "seed": SEED, "corpus": "pydoc_data.topics (sorted keys, NUL-joined; last 10% = validation)",
        "tokenizer": "ASCII code points, vocabulary 128, EOS = 0 (NUL), non-ASCII -> SUB (26)",
        "draft": runs["draft"], "target": runs["target"],
        "cost_ratio_measured": round(c_measured, 4), "cost_ratio_macs": round(c_macs, 4),
        "alpha_greedy": round(alpha_greedy, 4), "alpha_sampled": round(alpha_sampled, 4),
        "predicted_speedup": {
            f"gamma{g}": {"greedy_measured_c": round(predicted_speedup(alpha_greedy, g, c_measured), 3),
                          "sampled_measured_c": round(predicted_speedup(alpha_sampled, g, c_measured), 3),
                          "greedy_macs_c": round(predicted_speedup(alpha_greedy, g, c_macs), 3)}
            for g in gammas},
        "torch": torch.__version__, "threads": args.threads,
    }
    f2.write_meta(meta, args.out)
    print()
    for name in ("draft", "target"):
        r = runs[name]
        print(f"  {name:<6} {r['config']['n_layers']} layer(s) d={r['config']['d_model']}: params {r['params']:,}, "
              f"MACs/token {r['macs_per_token']:,}, val loss {r['val_loss']:.3f} nats = {r['val_bpc']:.3f} bits/char, "
              f"step {r['step_ms']:.3f} ms ({r['step_tokens_per_s']:,.0f} tokens/s), block of 5 {r['block_ms']:.3f} ms, "
              f"full-sequence {r['full_tokens_per_s']:,.0f} tokens/s, trained in {r['train_seconds']} s")
    print(f"  cost ratio c = draft/target: measured {c_measured:.3f}, by MACs {c_macs:.3f}")
    print(f"  acceptance: greedy agreement {alpha_greedy:.3f}, sampled E[min(p, q)] {alpha_sampled:.3f}")
    for g in gammas:
        p = meta["predicted_speedup"][f"gamma{g}"]
        print(f"  predicted speedup gamma={g}: greedy {p['greedy_measured_c']:.2f}x, sampled {p['sampled_measured_c']:.2f}x "
              f"(measured c); greedy with MAC-ratio c {p['greedy_macs_c']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
