#!/usr/bin/env python3
"""Train the F1 digits-cascade tiers and write the committed weights and figures.

For each data source (``glyphs`` always; ``sklearn`` digits and ``cancer`` when scikit-learn
is installed) this cross-fits the tiers and ensemble members of ``cascada.workloads.f1`` (4 folds
of the training split give out-of-fold probabilities and softmax temperatures), commits fold
0's models as fp16 ``cascada/workloads/weights/f1_<source>_{tier,member}<i>.pt``, reloads them, and runs the offline
cascade analysis (thresholds chosen on the out-of-fold probabilities, figures on the fixed
test split, plus out-of-distribution copies of the test split). It prints the
accuracy-versus-MACs figures and the seed paper's shape check ("match the big model's
accuracy with <30% of its MACs") and writes them to ``weights/f1_<source>.json``.

Deterministic: seeded, one thread. About two minutes on one idle core.

    .venv/bin/python scripts/train_f1.py [--sources glyphs,sklearn,cancer] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from typing import Any

import torch

from cascada.workloads import f1, f1_cascade, f1_data

SEED = 0
FOLDS = 4
OOD = (("noise", 0.5), ("shift", 0.5))  # perturb(kind, strength): sigma-2 noise; shifts of up to 1 pixel
# Per model: epochs, learning rate, augment (random one-pixel shifts, images only).
Recipe = dict[str, Any]
RECIPE: dict[str, list[Recipe]] = {
    "image": [dict(epochs=60, lr=3e-3, augment=False), dict(epochs=60, lr=3e-3, augment=False),
              dict(epochs=30, lr=3e-3, augment=True), dict(epochs=40, lr=3e-3, augment=True)],
    "tabular": [dict(epochs=100, lr=1e-2, augment=False), dict(epochs=100, lr=3e-3, augment=False),
                dict(epochs=60, lr=1e-3, augment=False)],
}
MEMBER_RECIPE: dict[str, Recipe] = {"image": dict(epochs=30, lr=3e-3, augment=True),
                                    "tabular": dict(epochs=100, lr=3e-3, augment=False)}


def folds(n: int, k: int, seed: int) -> list[torch.Tensor]:
    """k disjoint index sets covering range(n), from a seeded shuffle."""
    idx = list(range(n))
    random.Random(f"cascada-f1-folds-{seed}").shuffle(idx)
    return [torch.tensor(sorted(idx[j::k])) for j in range(k)]


def train(source: str, spec: f1.TierSpec, recipe: Recipe, X: torch.Tensor, y: torch.Tensor, seed: int) -> f1.TierNet:
    return f1.train_tier(spec, X, y, n_classes=f1_data.class_count(source), seed=seed,
                         epochs=int(recipe["epochs"]), lr=float(recipe["lr"]), augment=bool(recipe["augment"]),
                         image_norm=source != "cancer")


def acc(p: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((p.argmax(-1) == y).double().mean()), 6)


def describe(m: f1.TierNet) -> str:
    s = m.spec
    return s.kind + (f" ch{list(s.channels)}" if s.channels else "") + (f" h{list(s.hidden)}" if s.hidden else "")


def train_source(source: str, out_dir: str | None) -> dict[str, Any]:
    """Cross-fit with FOLDS folds of the training split: for each fold, every tier and member
    is trained on the other folds (seeded by fold and model), its temperature fitted on the
    held-out fold, and its probabilities there kept: out-of-fold (OOF) probabilities for the
    whole training split, on which the cascade thresholds are chosen. The committed models are
    fold 0's (trained on 75% of the training split), so the thresholds transfer to them."""
    t0 = time.perf_counter()
    Xtr, ytr, Xte, yte = f1_data.load(source, seed=SEED)
    family = "tabular" if source == "cancer" else "image"
    plan = [(spec, RECIPE[family][i], 10 + i) for i, spec in enumerate(f1.specs_for(source))]
    plan += [(f1.member_spec_for(source), MEMBER_RECIPE[family], 100 + j) for j in range(f1.N_MEMBERS)]
    n_classes = f1_data.class_count(source)
    oof = [torch.zeros(len(ytr), n_classes) for _ in plan]
    committed: list[f1.TierNet] = []
    for k, held in enumerate(folds(len(ytr), FOLDS, SEED)):
        keep = torch.ones(len(ytr), dtype=torch.bool)
        keep[held] = False
        for i, (spec, recipe, model_seed) in enumerate(plan):
            m = train(source, spec, recipe, Xtr[keep], ytr[keep], SEED + 1000 * k + model_seed)
            f1.fit_temperature(m, Xtr[held], ytr[held])
            oof[i][held] = f1.predict_proba(m, Xtr[held])
            if k == 0:
                committed.append(m)
    n_tiers = len(f1.specs_for(source))
    f1.save_models(committed[:n_tiers], source, "tier", out_dir)
    f1.save_models(committed[n_tiers:], source, "member", out_dir)
    # Everything below is measured on the weights as committed (fp16 round trip).
    tiers, members = f1.load_tiers(source, out_dir), f1.load_members(source, out_dir)
    t_macs, m_macs = [f1.macs(m) for m in tiers], f1.macs(members[0])
    t_test = [f1.predict_proba(m, Xte) for m in tiers]
    m_test = [f1.predict_proba(m, Xte) for m in members]
    models_meta = []
    for role, group, probs, oofs in (("tier", tiers, t_test, oof[:n_tiers]), ("member", members, m_test, oof[n_tiers:])):
        for i, (m, p, o) in enumerate(zip(group, probs, oofs)):
            models_meta.append({"name": f"{role}{i}", "spec": describe(m), "macs": f1.macs(m),
                                "params": f1.param_count(m), "temperature": round(float(m.temperature), 4),
                                "oof_accuracy": acc(o, ytr), "test_accuracy": acc(p, yte)})
    meta: dict[str, Any] = {
        "source": source, "seed": SEED, "folds": FOLDS, "n_train": len(ytr), "n_train_committed": int(len(ytr) - len(folds(len(ytr), FOLDS, SEED)[0])),
        "n_test": int(yte.numel()), "models": models_meta,
        "selection": f"thresholds chosen on {FOLDS}-fold out-of-fold probabilities of the training split; figures on the test split",
    }
    meta["tiers"] = f1_cascade.analyse_tiers(oof[:n_tiers], ytr, t_test, yte, t_macs)
    meta["ensemble"] = f1_cascade.analyse_ensemble(oof[n_tiers:], m_test, m_macs, oof[n_tiers - 1], t_test[-1],
                                                   t_macs[-1], ytr, yte)
    meta["shape_check"] = {"accuracy": meta["tiers"]["shape"], "coverage": meta["ensemble"]["shape"]}
    for r, sh in meta["tiers"]["coverage_shapes"].items():
        meta["shape_check"][f"tiers_coverage@{r}"] = sh
    for r, sh in meta["ensemble"]["shape_by_risk"].items():
        meta["shape_check"][f"ensemble_coverage@{r}"] = sh
    sel = meta["tiers"]["selected"]
    if source != "cancer" and sel is not None:
        ood: dict[str, Any] = {}
        for kind, strength in OOD:
            Xo = f1_data.perturb(Xte, kind, strength, seed=SEED)
            probs = [f1.predict_proba(m, Xo) for m in tiers]
            res = f1_cascade.confidence_cascade(probs, t_macs, sel["thresholds"])
            ood[f"{kind}{strength}"] = {"tier_accuracy": [acc(p, yte) for p in probs],
                                        "cascade": f1_cascade.summarise(res, yte, t_macs[-1])}
        meta["ood"] = ood
    meta["train_seconds"] = round(time.perf_counter() - t0, 1)
    f1.save_meta(meta, source, out_dir)
    return meta


def _fr(p: dict[str, Any]) -> str:
    return "/".join(f"{f:.2f}" for f in p["fraction_per_tier"])


def show(meta: dict[str, Any]) -> None:
    src, tr, en = meta["source"], meta["tiers"], meta["ensemble"]
    print(f"\n== F1 {src}: train {meta['n_train']} (committed models on {meta['n_train_committed']}; "
          f"thresholds on {meta['folds']}-fold out-of-fold outputs), test {meta['n_test']} ({meta['train_seconds']} s)")
    for m in meta["models"]:
        print(f"  {m['name']:<8} {m['spec']:<24} MACs {m['macs']:>8,}  params {m['params']:>7,}  "
              f"OOF acc {m['oof_accuracy']:.4f}  test acc {m['test_accuracy']:.4f}")
    big = tr["big"]
    covs = "  ".join(f"cov@{float(r):.0%} {v:.3f}" for r, v in big["coverage_at_risk"].items())
    print(f"  big model (last tier): acc {big['accuracy']:.4f}, {covs}, MACs {big['macs']:,}")
    print("  confidence cascade over tiers, one shared threshold (Pareto points on test):")
    for p in tr["curve"]:
        print(f"    tau {p['threshold']:.4f}  acc {p['accuracy']:.4f}  MACs/item {p['macs_per_item']:>9,.0f} "
              f"({p['macs_ratio']:.3f} of big)  answered per tier {_fr(p)}  cov@5% {p['coverage_at_risk']['0.05']:.3f}")
    for name in ("selected", "oracle"):
        p = tr[name]
        print(f"  per-tier thresholds, {name}: " + ("none matched the big model" if p is None else
              f"{p['thresholds']} acc {p['accuracy']:.4f} MACs/item {p['macs_per_item']:,.0f} "
              f"({p['macs_ratio']:.3f} of big), answered per tier {_fr(p)}"))
    for r, p in tr["coverage"].items():
        print(f"  tiers, cheapest thresholds matching the big model's coverage at {float(r):.0%} risk: " +
              ("none" if p is None else f"cov {p['coverage_at_risk'][r]:.3f} (big {big['coverage_at_risk'][r]:.3f}) "
               f"at {p['macs_ratio']:.3f} of big MACs"))
    print(f"  ensemble of members ({en['member_macs']:,} MACs each = {en['member_macs'] / big['macs']:.3f} of big):")
    for e in en["ensembles"]:
        covs = "  ".join(f"cov@{float(r):.0%} {v:.3f}" for r, v in e["coverage_at_risk"].items())
        print(f"    {e['members']} member(s): acc {e['accuracy']:.4f}  {covs}")
    for r, d in en["per_risk"].items():
        for kind in ("window_selected", "confidence_selected"):
            p = d[kind]
            print(f"  {kind.split('_')[0]} ensemble cascade at {float(r):.0%} risk: " + (
                "none matched the big model" if p is None else
                f"cov {p['coverage_at_risk'][r]:.3f} (big {d['big_coverage']:.3f}) acc {p['accuracy']:.4f} "
                f"MACs/item {p['macs_per_item']:,.0f} ({p['macs_ratio']:.3f} of big), answered per stage {_fr(p)}"))
    for kind, o in meta.get("ood", {}).items():
        c = o["cascade"]
        print(f"  OOD {kind}: tier acc {o['tier_accuracy']}, selected cascade acc {c['accuracy']:.4f} "
              f"at {c['macs_ratio']:.3f} of big MACs, answered per tier {_fr(c)}")
    for name, sh in meta["shape_check"].items():
        if name in ("coverage",):
            continue  # the same as ensemble_coverage@0.05
        vac = " [vacuous: the big model's error is under that risk]" if sh["vacuous"] else ""
        print(f"  SHAPE [{name}]{vac} {sh['claim']}: holds={sh['holds']} (strict {sh['holds_strict']}; "
              f"cascade {sh['cascade']}, big {sh['big']}, MACs ratio {sh['macs_ratio']}); "
              f"read off the test curve: holds={sh['oracle_holds']} ({sh['oracle_cascade']} at {sh['oracle_macs_ratio']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    ap.add_argument("--sources", default=None, help="comma-separated sources (default: all available)")
    ap.add_argument("--out", default=None, help="directory for weights and JSON (default: the package's weights/)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    sources = args.sources.split(",") if args.sources else (
        ["glyphs", "sklearn", "cancer"] if f1_data.have_sklearn() else ["glyphs"])
    if not f1_data.have_sklearn():
        print("scikit-learn not installed: training on generated glyphs only", file=sys.stderr)
    for src in sources:
        show(train_source(src, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
