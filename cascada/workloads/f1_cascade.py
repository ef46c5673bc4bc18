"""F1 offline cascade analysis: pure functions over per-tier softmax outputs.

Inputs are the tiers' softmax probabilities on one data set, ``probs[i]: [N, C]`` for tier
``i`` (small to big), the labels ``[N]`` and the tiers' MACs per item. Nothing here runs a
model, so the same functions serve the offline analysis, the tests and the live cascade's
figures (the live cascade must reproduce :func:`confidence_cascade` decision for decision).

Cost model: an item that exits at tier ``i`` has run tiers ``0..i`` and costs
``sum(macs[:i + 1])``; ``macs_per_item`` is the mean over items.

Two cascades:

- **Confidence cascade** (:func:`confidence_cascade`): at tier ``i < last`` an item exits when
  its score is ``>= thresholds[i]``, otherwise it escalates; the last tier answers the rest.
- **Window cascade** (:func:`window_cascade`), after *Window-Based Early-Exit Cascades*:
  escalate only items whose score lies strictly inside a window ``(centre - width, centre +
  width)`` around the selective-classification boundary ``centre``; items clearly above (sure
  accepts) and clearly below (sure rejects) exit early.

The score is the maximum softmax probability (``"maxprob"``, default), the top-1 minus top-2
margin (``"margin"``) or the negative entropy (``"negentropy"``); with ``combine="mean"`` tier
``i`` scores the mean of the probabilities of tiers ``0..i`` (an ensemble cascade) instead of
its own.

Selective classification: :func:`risk_coverage` and :func:`coverage_at_risk` (the largest
fraction of items that can be accepted, most confident first, with error among the accepted
``<= max_risk``).

Reports for the training script's JSON record (thresholds chosen on selection data, figures
on test data):

- :func:`analyse_tiers`: the confidence cascade over tiers of rising size, the
  accuracy-versus-MACs curve over the threshold, the fraction answered at each tier, coverage
  at 5% (and 1%) risk against MACs, next to always running the biggest tier, and the brief's
  shape check, "match the big model's accuracy with <30% of its MACs".
- :func:`analyse_ensemble`: the seed paper's own setting: window (and confidence) cascades
  over same-sized ensemble members, against one big model, on coverage at 5% risk.

Scores are compared with thresholds in float64, so a threshold means the same in every
function here, vectorised or not. The functions work on CPU copies of their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "CascadeResult",
    "Combine",
    "Score",
    "analyse_ensemble",
    "analyse_tiers",
    "confidence_cascade",
    "coverage_at_risk",
    "effective_probs",
    "SHAPE_MACS_RATIO",
    "pareto_front",
    "risk_coverage",
    "score",
    "summarise",
    "window_cascade",
]

Score = Literal["maxprob", "margin", "negentropy"]
Combine = Literal["last", "mean"]
SHAPE_MACS_RATIO = 0.30  # the seed paper: the big model's accuracy "with <30% the number of MACs"


def score(probs: torch.Tensor, kind: Score = "maxprob") -> torch.Tensor:
    """Return a confidence score ``[N]`` (higher is surer) from probabilities ``[N, C]``."""
    if kind == "maxprob":
        return probs.max(dim=-1).values
    if kind == "margin":
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if kind == "negentropy":
        return (probs * probs.clamp_min(1e-30).log()).sum(-1)
    raise ValueError(f"unknown score {kind!r}")


def effective_probs(probs: Sequence[torch.Tensor], combine: Combine = "last") -> list[torch.Tensor]:
    """Return, per tier, the probabilities that tier decides on: its own (``"last"``) or the
    running mean of tiers ``0..i`` (``"mean"``)."""
    if not probs:
        raise ValueError("need at least one tier")
    if combine == "last":
        return list(probs)
    if combine == "mean":
        out, acc = [], torch.zeros_like(probs[0])
        for i, p in enumerate(probs):
            acc = acc + p
            out.append(acc / (i + 1))
        return out
    raise ValueError(f"unknown combine {combine!r}")


@dataclass(frozen=True)
class CascadeResult:
    """The outcome of a cascade on N items: ``pred [N]``, ``confidence [N]`` (the answering
    tier's score), ``exit_tier [N]``, the mean MACs per item and the fraction answered at
    each tier."""

    pred: torch.Tensor
    confidence: torch.Tensor
    exit_tier: torch.Tensor
    macs_per_item: float
    fraction_per_tier: list[float]

    def accuracy(self, labels: torch.Tensor) -> float:
        """Return the fraction of items whose prediction equals ``labels``."""
        return float((self.pred == labels.cpu()).double().mean()) if labels.numel() else math.nan

    def coverage_at_risk(self, labels: torch.Tensor, max_risk: float = 0.05) -> float:
        """Return the cascade's coverage at ``max_risk`` (see :func:`coverage_at_risk`)."""
        return coverage_at_risk(self.confidence, self.pred == labels.cpu(), max_risk)[0]


def _cpu(probs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().cpu() for p in probs]


def _check(probs: Sequence[torch.Tensor], macs: Sequence[int]) -> None:
    if not probs:
        raise ValueError("need at least one tier")
    if len(macs) != len(probs):
        raise ValueError(f"{len(probs)} tiers but {len(macs)} MAC counts")
    shape = probs[0].shape
    if len(shape) != 2 or any(p.shape != shape for p in probs):
        raise ValueError("every tier's probabilities must be [N, C] with the same N and C")


def _run(eff: Sequence[torch.Tensor], escalate: Sequence[torch.Tensor], macs: Sequence[int],
         kind: Score) -> CascadeResult:
    n_tiers, n = len(eff), eff[0].shape[0]
    exit_tier = torch.full((n,), n_tiers - 1, dtype=torch.int64)
    pending = torch.ones(n, dtype=torch.bool)
    for i, esc in enumerate(escalate):
        exit_tier[pending & ~esc] = i
        pending = pending & esc
    rows = torch.arange(n)
    pred = torch.stack([p.argmax(-1) for p in eff])[exit_tier, rows]
    conf = torch.stack([score(p, kind) for p in eff]).double()[exit_tier, rows]
    cum = torch.tensor(list(macs), dtype=torch.float64).cumsum(0)
    counts = torch.bincount(exit_tier, minlength=n_tiers).double()
    macs_per_item = float((counts * cum).sum() / n) if n else 0.0
    fractions = [float(c / n) if n else 0.0 for c in counts]
    return CascadeResult(pred, conf, exit_tier, macs_per_item, fractions)


def _per_tier(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    vals = [float(v) for v in value]
    if len(vals) != n:
        raise ValueError(f"{name}: need {n} values (one per non-final tier), got {len(vals)}")
    return vals


def confidence_cascade(probs: Sequence[torch.Tensor], macs: Sequence[int], thresholds: float | Sequence[float],
                       *, combine: Combine = "last", kind: Score = "maxprob") -> CascadeResult:
    """Return the confidence cascade's outcome: at each non-final tier ``i`` an item exits
    when its score is ``>= thresholds[i]`` (one float applies to every tier), else escalates."""
    probs = _cpu(probs)
    _check(probs, macs)
    eff = effective_probs(probs, combine)
    taus = _per_tier(thresholds, len(eff) - 1, "thresholds")
    esc = [score(p, kind).double() < t for p, t in zip(eff, taus)]
    return _run(eff, esc, macs, kind)


def window_cascade(probs: Sequence[torch.Tensor], macs: Sequence[int], centre: float | Sequence[float],
                   width: float | Sequence[float], *, combine: Combine = "last",
                   kind: Score = "maxprob") -> CascadeResult:
    """Return the window cascade's outcome: at each non-final tier ``i`` an item escalates only
    when ``centre[i] - width[i] < score < centre[i] + width[i]``; otherwise it exits there
    (width 0: nobody escalates; a huge width: everybody does)."""
    probs = _cpu(probs)
    _check(probs, macs)
    eff = effective_probs(probs, combine)
    cs = _per_tier(centre, len(eff) - 1, "centre")
    ws = _per_tier(width, len(eff) - 1, "width")
    esc = [(score(p, kind).double() - c).abs() < w for p, c, w in zip(eff, cs, ws)]
    return _run(eff, esc, macs, kind)


def risk_coverage(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(coverage, risk, threshold)``, one entry per distinct confidence value from
    the highest down: accepting every item with confidence ``>= threshold[j]`` covers
    ``coverage[j]`` of the items with error rate ``risk[j]`` among them."""
    confidence, correct = confidence.detach().cpu(), correct.detach().cpu()
    n = confidence.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty, empty
    order = torch.argsort(confidence.double(), descending=True, stable=True)
    conf = confidence.double()[order]
    wrong = (~correct.bool())[order].double().cumsum(0)
    # The last index of each run of equal confidences: ties are accepted or rejected together.
    last = torch.ones(n, dtype=torch.bool)
    last[:-1] = conf[1:] != conf[:-1]
    idx = torch.nonzero(last).flatten()
    accepted = (idx + 1).double()
    return accepted / n, wrong[idx] / accepted, conf[idx]


def coverage_at_risk(confidence: torch.Tensor, correct: torch.Tensor, max_risk: float = 0.05) -> tuple[float, float]:
    """Return ``(coverage, threshold)``: the largest fraction of items that can be accepted by
    a confidence threshold (accept ``confidence >= threshold``) while the error among the
    accepted stays ``<= max_risk``, and that threshold (``inf`` and coverage 0 when even the
    most confident group is too risky)."""
    cov, risk, thr = risk_coverage(confidence, correct)
    ok = torch.nonzero(risk <= max_risk + 1e-12).flatten()
    if ok.numel() == 0:
        return 0.0, math.inf
    j = int(ok[-1])
    return float(cov[j]), float(thr[j])


def pareto_front(points: Sequence[dict[str, Any]], cost: str, gain: str) -> list[dict[str, Any]]:
    """Return the points not dominated in (lower ``cost``, higher ``gain``), by cost."""
    front: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda q: (q[cost], -q[gain])):
        if not front or p[gain] > front[-1][gain]:
            front.append(p)
    return front


def _grid(s: torch.Tensor) -> list[float]:
    """Candidate thresholds for one tier: the scores below which 0%, 5%, ..., 100% of items
    fall, 0% to 100% in steps of 10% with a finer upper tail, plus 0 (nobody goes on) and 2
    (everybody does), so a threshold sends a known share of items onwards."""
    qs = [j / 10 for j in range(11)] + [0.85, 0.925, 0.95, 0.975, 0.99]
    vals = torch.quantile(s.double(), torch.tensor(sorted(qs), dtype=torch.float64)).tolist()
    return sorted({float(v) + 1e-12 for v in vals} | {0.0, 2.0})


def _r(x: float) -> float:
    return round(x, 6) if math.isfinite(x) else x


def summarise(res: CascadeResult, labels: torch.Tensor, big_macs: int,
              risks: Sequence[float] = (0.05, 0.01)) -> dict[str, Any]:
    """Return a JSON-ready summary of ``res``: accuracy, MACs per item, MACs as a fraction of
    ``big_macs``, fraction answered per tier, coverage at each risk in ``risks``."""
    return {
        "accuracy": _r(res.accuracy(labels)),
        "macs_per_item": _r(res.macs_per_item),
        "macs_ratio": _r(res.macs_per_item / big_macs),
        "fraction_per_tier": [_r(f) for f in res.fraction_per_tier],
        "coverage_at_risk": {str(r): _r(res.coverage_at_risk(labels, r)) for r in risks},
    }


def _alone(probs: torch.Tensor, labels: torch.Tensor, macs: int, risks: Sequence[float],
           kind: Score) -> dict[str, Any]:
    ok = probs.argmax(-1) == labels
    s = score(probs, kind)
    return {"macs": int(macs), "accuracy": _r(float(ok.double().mean())),
            "coverage_at_risk": {str(r): _r(coverage_at_risk(s, ok, r)[0]) for r in risks}}


def _verdict(value: float, macs_ratio: float, big_value: float, n_test: int) -> tuple[bool, bool]:
    cheap = macs_ratio < SHAPE_MACS_RATIO
    return (bool(cheap and value >= big_value - 1e-6),
            bool(cheap and value >= big_value - 1.0 / max(n_test, 1) - 1e-6))


def _shape(claim: str, metric: str, selected: dict[str, Any] | None, oracle: dict[str, Any] | None,
           big_value: float, n_test: int) -> dict[str, Any]:
    """The seed-shape verdict. ``holds_strict``: the configuration chosen on the selection data
    is at least as good as the big model on test with under 30% of its MACs; ``holds`` allows
    it to be one test item worse (the test sets have a few hundred items, so one item is the
    resolution); ``oracle_*``: the same for the cheapest configuration chosen on test itself,
    which is how accuracy-versus-compute curves are usually read off in papers."""

    def value(d: dict[str, Any]) -> float:
        return float(d["accuracy"] if metric == "accuracy" else d["coverage_at_risk"][metric.split("@")[1]])

    out: dict[str, Any] = {"claim": claim, "metric": metric, "big": _r(big_value),
                           "max_macs_ratio": SHAPE_MACS_RATIO, "n_test": n_test,
                           # Coverage 1.0 for the big model means its error is under the risk
                           # level: every cheap model then "matches" and the check says nothing.
                           "vacuous": bool(metric != "accuracy" and big_value >= 1.0 - 1e-9)}
    if selected is None:
        out.update(cascade=None, macs_ratio=None, holds_strict=False, holds=False)
    else:
        strict, loose = _verdict(value(selected), selected["macs_ratio"], big_value, n_test)
        out.update(cascade=_r(value(selected)), macs_ratio=selected["macs_ratio"], holds_strict=strict, holds=loose)
    if oracle is None:
        out.update(oracle_cascade=None, oracle_macs_ratio=None, oracle_holds=False)
    else:
        _, loose = _verdict(value(oracle), oracle["macs_ratio"], big_value, n_test)
        out.update(oracle_cascade=_r(value(oracle)), oracle_macs_ratio=oracle["macs_ratio"], oracle_holds=loose)
    return out


def _configs(val_eff: Sequence[torch.Tensor], kind: Score) -> torch.Tensor:
    """Every combination of per-tier candidate thresholds, ``[K, tiers - 1]``."""
    grids = [torch.tensor(_grid(score(p, kind)), dtype=torch.float64) for p in val_eff[:-1]]
    if not grids:
        return torch.zeros(1, 0, dtype=torch.float64)
    return torch.cartesian_prod(*grids).reshape(-1, len(grids))


def _evaluate_many(eff: Sequence[torch.Tensor], labels: torch.Tensor, macs: Sequence[int], configs: torch.Tensor,
                   risks: Sequence[float], kind: Score, chunk: int = 1024
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence cascades for many threshold configurations at once, decision for decision
    the same as :func:`confidence_cascade`. Returns ``(accuracy [K], macs_per_item [K],
    coverage [K, len(risks)])``."""
    s = torch.stack([score(p, kind) for p in eff]).double()  # [T, N]
    ok = torch.stack([p.argmax(-1) == labels for p in eff])  # [T, N]
    n_tiers, n = s.shape
    cum = torch.tensor(list(macs), dtype=torch.float64).cumsum(0)
    accs, costs, covs = [], [], []
    for start in range(0, configs.shape[0], chunk):
        thr = configs[start:start + chunk].double()  # [K, T-1]
        k = thr.shape[0]
        passes = s[None, :-1, :] >= thr[:, :, None]  # [K, T-1, N]
        # exit tier = number of leading non-passing tiers
        exit_tier = (~passes).long().cumprod(1).sum(1)  # [K, N]
        right = ok.T[torch.arange(n)[None, :], exit_tier]  # [K, N]
        conf = s.T[torch.arange(n)[None, :], exit_tier]  # [K, N]
        accs.append(right.double().mean(1) if n else torch.full((k,), math.nan, dtype=torch.float64))
        costs.append(cum[exit_tier].mean(1) if n else torch.zeros(k, dtype=torch.float64))
        order = torch.argsort(conf, dim=1, descending=True, stable=True)
        conf_sorted = conf.gather(1, order)
        wrong = (~right).gather(1, order).double().cumsum(1)
        accepted = torch.arange(1, n + 1, dtype=torch.float64)[None, :]
        last = torch.ones(k, n, dtype=torch.bool)
        last[:, :-1] = conf_sorted[:, 1:] != conf_sorted[:, :-1]
        cov = torch.zeros(k, len(risks), dtype=torch.float64)
        for j, r in enumerate(risks):
            good = last & (wrong / accepted <= r + 1e-12)
            cov[:, j] = torch.where(good, accepted, torch.zeros_like(accepted)).amax(1) / max(n, 1)
        covs.append(cov)
    return torch.cat(accs), torch.cat(costs), torch.cat(covs)


def _cheapest(configs: torch.Tensor, passes: torch.Tensor, cost: torch.Tensor) -> list[float] | None:
    """The configuration with the fewest MACs per item among those where ``passes``."""
    if not bool(passes.any()):
        return None
    masked = torch.where(passes, cost, torch.full_like(cost, math.inf))
    return [float(t) for t in configs[int(torch.argmin(masked))]]


def analyse_tiers(val_probs: Sequence[torch.Tensor], val_labels: torch.Tensor,
                  test_probs: Sequence[torch.Tensor], test_labels: torch.Tensor, macs: Sequence[int], *,
                  risks: Sequence[float] = (0.05, 0.01), kind: Score = "maxprob") -> dict[str, Any]:
    """Return the confidence-cascade report over tiers (small to big; the last is "the big
    model") as a JSON-ready dict.

    Per-tier thresholds are chosen on the selection outputs ``val_*`` and reported on
    ``test_*``. Keys: ``tiers`` (each alone: MACs, accuracy, coverage at each risk), ``big``,
    ``curve`` (one threshold shared by every tier, swept: the Pareto points of accuracy against
    MACs per item, with MACs ratio to the big model, fraction answered per tier and coverage),
    ``selected`` (the cheapest per-tier thresholds whose selection accuracy is at least the
    big model's), ``oracle`` (the same chosen on test: an optimistic bound), ``coverage``
    (per risk: the cheapest thresholds whose selection coverage matches the big model's),
    ``shape`` (the brief's claim, "match the big model's accuracy with <30% of its MACs") and
    ``coverage_shapes`` (per risk: the same claim for coverage at that risk)."""
    val_probs, test_probs = _cpu(val_probs), _cpu(test_probs)
    val_labels, test_labels = val_labels.cpu(), test_labels.cpu()
    _check(val_probs, macs)
    _check(test_probs, macs)
    big_macs, n_test = int(macs[-1]), int(test_labels.numel())
    tiers = [dict(_alone(p, test_labels, m, risks, kind), tier=i) for i, (p, m) in enumerate(zip(test_probs, macs))]
    out: dict[str, Any] = {"kind": "confidence cascade over tiers", "score": kind, "risks": list(risks),
                           "n_select": int(val_labels.numel()), "n_test": n_test, "tiers": tiers, "big": tiers[-1]}

    def run_test(c: Sequence[float]) -> CascadeResult:
        return confidence_cascade(test_probs, macs, c, kind=kind)

    curve = []
    for t in _grid(score(test_probs[0], kind)):
        p = summarise(run_test([t] * (len(macs) - 1)), test_labels, big_macs, risks)
        p["threshold"] = _r(t)
        curve.append(p)
    out["curve"] = pareto_front(curve, "macs_per_item", "accuracy")
    configs = _configs(val_probs, kind)
    v_acc, v_cost, v_cov = _evaluate_many(val_probs, val_labels, macs, configs, risks, kind)
    t_acc, t_cost, t_cov = _evaluate_many(test_probs, test_labels, macs, configs, risks, kind)
    big_val_ok = val_probs[-1].argmax(-1) == val_labels
    big_val_acc = float(big_val_ok.double().mean())
    big_test_ok = test_probs[-1].argmax(-1) == test_labels
    big_test_acc = float(big_test_ok.double().mean())

    def describe(c: list[float] | None) -> dict[str, Any] | None:
        if c is None:
            return None
        d = summarise(run_test(c), test_labels, big_macs, risks)
        d["thresholds"] = [_r(t) for t in c]
        return d

    sel = describe(_cheapest(configs, v_acc >= big_val_acc - 1e-12, v_cost))
    out["selected"] = sel
    out["oracle"] = describe(_cheapest(configs, t_acc >= big_test_acc - 1e-12, t_cost))
    cov: dict[str, Any] = {}
    cov_shapes: dict[str, Any] = {}
    for j, r in enumerate(risks):
        target = coverage_at_risk(score(val_probs[-1], kind), big_val_ok, r)[0]
        big_test_cov = coverage_at_risk(score(test_probs[-1], kind), big_test_ok, r)[0]
        cov[str(r)] = describe(_cheapest(configs, v_cov[:, j] >= target - 1e-12, v_cost))
        orc = describe(_cheapest(configs, t_cov[:, j] >= big_test_cov - 1e-12, t_cost))
        cov_shapes[str(r)] = _shape(f"match the big model's coverage at {r:.0%} risk with <30% of its MACs",
                                    f"coverage@{r}", cov[str(r)], orc, big_test_cov, n_test)
    out["coverage"] = cov
    out["shape"] = _shape("match the big model's accuracy with <30% of its MACs", "accuracy", sel, out["oracle"],
                          big_test_acc, n_test)
    out["coverage_shapes"] = cov_shapes
    return out


def analyse_ensemble(member_val: Sequence[torch.Tensor], member_test: Sequence[torch.Tensor], member_macs: int,
                     big_val: torch.Tensor, big_test: torch.Tensor, big_macs: int, val_labels: torch.Tensor,
                     test_labels: torch.Tensor, *, risks: Sequence[float] = (0.05, 0.01),
                     kind: Score = "maxprob") -> dict[str, Any]:
    """Return the ensemble-cascade report (JSON-ready) in the seed paper's own terms: a cascade
    of same-sized ensemble members (stage ``k`` scores the mean of members ``0..k``) against one
    big model, on coverage at ``risks`` (selective classification) against MACs.

    For each risk: the window cascade (windows centred on each stage's threshold for that risk
    on the selection data; widths swept) and the confidence cascade, each as a curve on test and
    as the cheapest configuration whose selection coverage matches the big model's (``selected``);
    ``window_oracle`` is the cheapest width that matches on test itself; also every full
    ensemble's figures. ``shape`` checks the seed's claim at the first risk, "similar
    coverage at 5% risk as the single big model with <30% of its MACs", and
    ``shape_by_risk`` at each risk (the window cascade's verdicts)."""
    if len(member_val) != len(member_test) or not member_val:
        raise ValueError("need the same (non-zero) number of members for selection and test")
    member_val, member_test = _cpu(member_val), _cpu(member_test)
    big_val, big_test = big_val.detach().cpu(), big_test.detach().cpu()
    val_labels, test_labels = val_labels.cpu(), test_labels.cpu()
    macs = [int(member_macs)] * len(member_val)
    val_eff, test_eff = effective_probs(member_val, "mean"), effective_probs(member_test, "mean")
    n_test = int(test_labels.numel())
    big = _alone(big_test, test_labels, big_macs, risks, kind)
    ensembles = [dict(_alone(p, test_labels, member_macs * (k + 1), risks, kind), members=k + 1)
                 for k, p in enumerate(test_eff)]
    out: dict[str, Any] = {"kind": "ensemble cascade (mean of members) against one big model", "score": kind,
                           "risks": list(risks), "n_select": int(val_labels.numel()), "n_test": n_test,
                           "member_macs": int(member_macs), "big": big, "ensembles": ensembles}
    big_val_ok = big_val.argmax(-1) == val_labels
    widths = [0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0]
    configs = _configs(val_eff, kind)
    _, v_cost, v_cov = _evaluate_many(val_eff, val_labels, macs, configs, risks, kind)
    per_risk: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for j, r in enumerate(risks):
        target = coverage_at_risk(score(big_val, kind), big_val_ok, r)[0]
        centres = []
        for pv in val_eff[:-1]:
            thr = coverage_at_risk(score(pv, kind), pv.argmax(-1) == val_labels, r)[1]
            centres.append(thr if math.isfinite(thr) else 1.0)
        wcurve, wsel, worc = [], None, None
        big_test_cov = big["coverage_at_risk"][str(r)]
        for w in widths:
            vres = window_cascade(member_val, macs, centres, w, combine="mean", kind=kind)
            p = summarise(window_cascade(member_test, macs, centres, w, combine="mean", kind=kind),
                          test_labels, big_macs, risks)
            p["width"] = w
            wcurve.append(p)
            if wsel is None and vres.coverage_at_risk(val_labels, r) >= target - 1e-12:
                wsel = p
            if worc is None and p["coverage_at_risk"][str(r)] >= big_test_cov - 1e-12:
                worc = p
        c = _cheapest(configs, v_cov[:, j] >= target - 1e-12, v_cost)
        csel = None
        if c is not None:
            csel = summarise(confidence_cascade(member_test, macs, c, combine="mean", kind=kind),
                             test_labels, big_macs, risks)
            csel["thresholds"] = [_r(t) for t in c]
        per_risk[str(r)] = {"big_coverage": big["coverage_at_risk"][str(r)], "centres": [_r(x) for x in centres],
                            "window_curve": wcurve, "window_selected": wsel, "window_oracle": worc,
                            "confidence_selected": csel}
        shapes[str(r)] = _shape(f"similar coverage at {r:.0%} risk as the single big model with <30% of its MACs",
                                f"coverage@{r}", wsel, worc, big_test_cov, n_test)
    out["per_risk"] = per_risk
    out["shape"] = shapes[str(risks[0])]
    out["shape_by_risk"] = shapes
    return out
