"""F3 moe-dispatch: a single-process reference MoE layer, split into the pure pieces that the
distributed version (router, expert actors, combiner) reuses.

The layer, for tokens ``x [N, d]``:

1. gate: ``logits = x @ gate [d, E]``;
2. :func:`route`: ``softmax`` over experts, top-``k``, weights renormalised to sum to 1 per token;
3. :func:`dispatch`: group the ``N * k`` assignments by expert, in token order; in capacity mode
   each expert keeps only its first ``capacity = ceil(capacity_factor * N * k / E)`` assignments
   (first come in token order) and the rest are dropped for that expert;
4. experts (:func:`expert_forward`): ``FFN_e(x) = GELU(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``, d -> 4d -> d;
5. :func:`combine`: ``y[t] = sum over slots s of weights[t, s] * FFN_{idx[t, s]}(x[t])``, added in
   slot order 0..k-1 (a fixed order, so a distributed combiner can match bit for bit); a dropped
   assignment adds nothing (weights are not renormalised after drops, as in GShard/Switch).

:func:`moe_layer` composes those pieces; :func:`moe_reference` computes the same layer by an
independent route (per-expert masks and a cumulative-count capacity rule), for tests.
:class:`MoEStats` reports loads, drops, drop rate and load imbalance (max load / mean load);
:func:`bytes_moved` gives the activation bytes a dispatch sends to experts and back.

All functions are pure (no global state) and deterministic; parameters come from
:func:`init_params` (seeded random initialisation: no training is needed for dispatch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn import functional as F

__all__ = [
    "Dispatch",
    "ExpertBatch",
    "MoEParams",
    "MoEStack",
    "MoEStats",
    "bytes_moved",
    "capacity_for",
    "combine",
    "dispatch",
    "domain_tokens",
    "expert_forward",
    "expert_macs",
    "gate_logits",
    "init_params",
    "init_stack",
    "load_balancing_loss",
    "moe_layer",
    "moe_reference",
    "route",
    "stack_forward",
    "stats_of",
]


@dataclass(frozen=True)
class MoEParams:
    """The weights of one MoE layer: ``gate [d, E]``, ``w1 [E, d, h]``, ``b1 [E, h]``,
    ``w2 [E, h, d]``, ``b2 [E, d]`` (``h = ffn_mult * d``)."""

    gate: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @property
    def d(self) -> int:
        """Model width."""
        return int(self.gate.shape[0])

    @property
    def n_experts(self) -> int:
        """Number of experts."""
        return int(self.gate.shape[1])

    @property
    def d_ff(self) -> int:
        """Hidden width of each expert FFN."""
        return int(self.w1.shape[2])

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return expert ``e``'s ``(w1, b1, w2, b2)`` (views), to ship to an expert actor."""
        return self.w1[e], self.b1[e], self.w2[e], self.b2[e]


def init_params(d: int = 64, n_experts: int = 8, *, ffn_mult: int = 4, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MoEParams:
    """Return seeded random MoE parameters (gate ~ N(0, 4/d) for confident routing, experts
    with fan-in scaled normal weights and small random biases), drawn on the CPU in float64
    (the same numbers on every machine) and then cast to ``dtype`` on ``device``."""
    if d < 1 or n_experts < 1 or ffn_mult < 1:
        raise ValueError("d, n_experts and ffn_mult must be positive")
    g = torch.Generator().manual_seed(seed)
    h = ffn_mult * d

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    return MoEParams(gate=normal(d, n_experts, std=2.0 / math.sqrt(d)),
                     w1=normal(n_experts, d, h, std=1.0 / math.sqrt(d)), b1=normal(n_experts, h, std=0.02),
                     w2=normal(n_experts, h, d, std=1.0 / math.sqrt(h)), b2=normal(n_experts, d, std=0.02))


def gate_logits(x: torch.Tensor, params: MoEParams) -> torch.Tensor:
    """Return the gate logits ``[N, E] = x @ params.gate``."""
    return x @ params.gate


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(expert_idx [N, k] int64, weights [N, k])``: softmax over experts, the top-``k``
    experts per token (highest first; ties to the lower expert index) and their probabilities
    renormalised to sum to 1."""
    if logits.dim() != 2:
        raise ValueError(f"gate logits must be [N, E], got {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k={k} must be in 1..{logits.shape[1]}")
    probs = F.softmax(logits, dim=-1)
    # Sort by (-prob, expert index) so that ties break the same way everywhere.
    order = torch.argsort(-probs, dim=-1, stable=True)[:, :k]
    top = probs.gather(1, order)
    return order, top / top.sum(-1, keepdim=True)


def capacity_for(n_tokens: int, k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    """Return the per-expert capacity ``ceil(capacity_factor * n_tokens * k / n_experts)``,
    or None (dropless) when ``capacity_factor`` is None."""
    if capacity_factor is None:
        return None
    if capacity_factor <= 0:
        raise ValueError("capacity_factor must be positive")
    # Round the product first so that e.g. 1.25 * 8 * 2 / 4 is exactly 5, not 5.000000001.
    return math.ceil(round(capacity_factor * n_tokens * k / n_experts, 9))


@dataclass(frozen=True)
class ExpertBatch:
    """The assignments one expert keeps: ``token_idx [n]`` (ascending), ``slot [n]`` (which of
    the token's k choices) and the gathered inputs ``x [n, d]``."""

    expert: int
    token_idx: torch.Tensor
    slot: torch.Tensor
    x: torch.Tensor


@dataclass(frozen=True)
class Dispatch:
    """A dispatch plan: one :class:`ExpertBatch` per expert (empty ones included),
    ``kept [N, k]`` (False where the assignment was dropped), the capacity (None: dropless)
    and each expert's requested load before drops."""

    batches: list[ExpertBatch]
    kept: torch.Tensor
    capacity: int | None
    requested: list[int]


def dispatch(x: torch.Tensor, expert_idx: torch.Tensor, n_experts: int, capacity: int | None = None) -> Dispatch:
    """Return the :class:`Dispatch` of tokens ``x [N, d]`` routed to ``expert_idx [N, k]``:
    per expert, its assignments in token order, keeping the first ``capacity`` (all when None)."""
    n, k = expert_idx.shape
    if x.shape[0] != n:
        raise ValueError(f"x has {x.shape[0]} rows, expert_idx {n}")
    if capacity is not None and capacity < 0:
        raise ValueError("capacity must be >= 0")
    if n * k and (int(expert_idx.min()) < 0 or int(expert_idx.max()) >= n_experts):
        raise ValueError(f"expert indices must be in 0..{n_experts - 1}")
    flat = expert_idx.reshape(-1)  # token-major: (t0, s0), (t0, s1), (t1, s0), ...
    order = torch.argsort(flat, stable=True)  # grouped by expert, token order kept within
    counts = torch.bincount(flat, minlength=n_experts)
    kept = torch.zeros(n * k, dtype=torch.bool, device=expert_idx.device)
    batches = []
    start = 0
    for e in range(n_experts):
        c = int(counts[e])
        take = order[start:start + (c if capacity is None else min(c, capacity))]
        start += c
        kept[take] = True
        tok, slot = take // k, take % k
        batches.append(ExpertBatch(e, tok, slot, x[tok]))
    return Dispatch(batches, kept.view(n, k), capacity, [int(c) for c in counts])


def expert_forward(params: MoEParams, e: int, x: torch.Tensor) -> torch.Tensor:
    """Return expert ``e``'s FFN output ``GELU(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` for ``x [n, d]``."""
    w1, b1, w2, b2 = params.expert(e)
    return F.gelu(x @ w1 + b1) @ w2 + b2


def combine(outputs: Sequence[torch.Tensor], plan: Dispatch, weights: torch.Tensor) -> torch.Tensor:
    """Return ``y [N, d]``: the expert outputs (``outputs[e]`` row-aligned with
    ``plan.batches[e]``) weighted by ``weights [N, k]`` and summed per token in slot order
    0..k-1; dropped assignments add nothing."""
    n, k = weights.shape
    if len(outputs) != len(plan.batches):
        raise ValueError(f"{len(outputs)} outputs for {len(plan.batches)} experts")
    d = next((o.shape[1] for o in outputs if o.dim() == 2), None)
    if d is None:
        raise ValueError("no expert output to infer the width from")
    parts = torch.zeros(n, k, d, dtype=weights.dtype, device=weights.device)
    for out, b in zip(outputs, plan.batches):
        if out.shape[0] != b.token_idx.numel():
            raise ValueError(f"expert {b.expert}: {out.shape[0]} output rows for {b.token_idx.numel()} tokens")
        parts[b.token_idx, b.slot] = out.to(weights.dtype)
    y = weights[:, 0:1] * parts[:, 0]
    for s in range(1, k):
        y = y + weights[:, s:s + 1] * parts[:, s]
    return y


@dataclass(frozen=True)
class MoEStats:
    """Routing statistics of one MoE call.

    ``requested``/``kept``: per-expert assignments before/after capacity drops; ``dropped``:
    dropped assignments; ``drop_rate = dropped / (N * k)``; ``tokens_fully_dropped``: tokens
    that lost every assignment; ``imbalance``: max / mean requested load (1.0 is perfect);
    ``kept_imbalance``: the same after drops."""

    n_tokens: int
    k: int
    n_experts: int
    capacity: int | None
    requested: list[int]
    kept: list[int]
    dropped: int
    drop_rate: float
    tokens_fully_dropped: int
    imbalance: float
    kept_imbalance: float

    def as_dict(self) -> dict[str, Any]:
        """Return the statistics as a JSON-ready dict."""
        return dict(self.__dict__)


def _imbalance(loads: Sequence[int]) -> float:
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def stats_of(plan: Dispatch) -> MoEStats:
    """Return the :class:`MoEStats` of a dispatch plan."""
    n, k = plan.kept.shape
    kept = [int(b.token_idx.numel()) for b in plan.batches]
    dropped = n * k - sum(kept)
    return MoEStats(n_tokens=n, k=k, n_experts=len(plan.batches), capacity=plan.capacity,
                    requested=list(plan.requested), kept=kept, dropped=dropped,
                    drop_rate=dropped / (n * k) if n * k else 0.0,
                    tokens_fully_dropped=int((~plan.kept).all(1).sum()) if k else 0,
                    imbalance=_imbalance(plan.requested), kept_imbalance=_imbalance(kept))


def moe_layer(x: torch.Tensor, params: MoEParams, k: int = 2, capacity_factor: float | None = None
              ) -> tuple[torch.Tensor, MoEStats]:
    """Return ``(y [N, d], stats)``: the MoE layer composed of the pieces the distributed
    version uses (:func:`route`, :func:`dispatch`, :func:`expert_forward`, :func:`combine`)."""
    idx, w = route(gate_logits(x, params), k)
    plan = dispatch(x, idx, params.n_experts, capacity_for(x.shape[0], k, params.n_experts, capacity_factor))
    outs = [expert_forward(params, b.expert, b.x) for b in plan.batches]
    return combine(outs, plan, w), stats_of(plan)


def moe_reference(x: torch.Tensor, params: MoEParams, k: int = 2, capacity_factor: float | None = None
                  ) -> tuple[torch.Tensor, MoEStats]:
    """Return ``(y [N, d], stats)`` for the MoE layer computed independently of
    :func:`dispatch`/:func:`combine`: capacity by cumulative counts over the token-major
    assignment order, experts run on boolean-masked rows, contributions summed in slot order."""
    if x.dim() != 2 or x.shape[1] != params.d:
        raise ValueError(f"x must be [N, {params.d}], got {tuple(x.shape)}")
    n, e_count = x.shape[0], params.n_experts
    idx, w = route(gate_logits(x, params), k)
    onehot = F.one_hot(idx.reshape(-1), e_count)  # [N*k, E], token-major order
    position = (onehot.cumsum(0) - 1).gather(1, idx.reshape(-1, 1)).view(n, k)  # rank within its expert
    cap = capacity_for(n, k, e_count, capacity_factor)
    keep = torch.ones(n, k, dtype=torch.bool, device=x.device) if cap is None else position < cap
    contrib = torch.zeros(n, k, params.d, dtype=x.dtype, device=x.device)
    for e in range(e_count):
        mask = (idx == e) & keep  # [N, k]; a token picks an expert at most once
        rows = mask.any(1)
        if bool(rows.any()):
            out = expert_forward(params, e, x[rows])
            slots = mask[rows].long().argmax(1)
            contrib[torch.nonzero(rows).flatten(), slots] = out
    y = w[:, 0:1] * contrib[:, 0]
    for s in range(1, k):
        y = y + w[:, s:s + 1] * contrib[:, s]
    requested = [int(c) for c in onehot.sum(0)]
    kept_loads = [int(((idx == e) & keep).sum()) for e in range(e_count)]
    dropped = int((~keep).sum())
    stats = MoEStats(n_tokens=n, k=k, n_experts=e_count, capacity=cap, requested=requested, kept=kept_loads,
                     dropped=dropped, drop_rate=dropped / (n * k) if n else 0.0,
                     tokens_fully_dropped=int((~keep).all(1).sum()),
                     imbalance=_imbalance(requested), kept_imbalance=_imbalance(kept_loads))
    return y, stats


def load_balancing_loss(logits: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """Return the Switch-style auxiliary loss ``E * sum_i f_i * P_i``: ``f_i`` the fraction of
    the ``N * k`` assignments sent to expert ``i``, ``P_i`` its mean gate probability (1.0 when
    perfectly balanced)."""
    e_count = logits.shape[1]
    f = torch.bincount(expert_idx.reshape(-1), minlength=e_count).to(logits.dtype) / expert_idx.numel()
    p = F.softmax(logits, dim=-1).mean(0)
    return e_count * (f * p).sum()


def bytes_moved(stats: MoEStats, d: int, *, dtype_bytes: int = 4, index_bytes: int = 8,
                remote_experts: Sequence[bool] | None = None) -> dict[str, float]:
    """Return the bytes a dispatch moves: ``to_experts`` (each kept assignment's activation row,
    ``d * dtype_bytes``, plus its token index and slot, ``index_bytes``), ``from_experts`` (each
    output row, ``d * dtype_bytes``, plus the index again), ``total`` and ``per_token`` (total /
    N). With ``remote_experts`` (one bool per expert) only assignments to remote experts count;
    the routing weights stay with the combiner and are not counted."""
    loads = stats.kept
    if remote_experts is not None:
        if len(remote_experts) != len(loads):
            raise ValueError(f"{len(remote_experts)} placement flags for {len(loads)} experts")
        loads = [c if r else 0 for c, r in zip(loads, remote_experts)]
    rows = sum(loads)
    per_row = d * dtype_bytes + index_bytes
    total = 2 * rows * per_row
    return {"to_experts": float(rows * per_row), "from_experts": float(rows * per_row), "total": float(total),
            "per_token": total / stats.n_tokens if stats.n_tokens else 0.0, "rows": float(rows)}


def expert_macs(d: int, d_ff: int) -> int:
    """Return the multiply-accumulates of one expert FFN on one token (``2 * d * d_ff``)."""
    return 2 * d * d_ff


# --- A small stack (Embed -> MoE layers -> LM head) and token sources, for the F3 flow -----


@dataclass(frozen=True)
class MoEStack:
    """``embed [V, d]``, MoE ``layers`` (each with a residual connection and a parameter-free
    layer norm in front), ``head [d, V]``."""

    embed: torch.Tensor
    layers: list[MoEParams]
    head: torch.Tensor


def init_stack(n_layers: int = 2, d: int = 64, n_experts: int = 8, vocab: int = 128, *, seed: int = 0) -> MoEStack:
    """Return a seeded random :class:`MoEStack` (the F3 CPU configuration by default:
    L=2, d=64, E=8, ASCII vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(vocab, d, generator=g)
    head = torch.randn(d, vocab, generator=g) / math.sqrt(d)
    layers = [init_params(d, n_experts, seed=seed * 1000 + i + 1) for i in range(n_layers)]
    return MoEStack(embed, layers, head)


def stack_forward(tokens: torch.Tensor, stack: MoEStack, k: int = 2, capacity_factor: float | None = None
                  ) -> tuple[torch.Tensor, list[MoEStats]]:
    """Return ``(logits [N, V], per-layer stats)`` for token ids ``tokens [N]`` through the
    stack, each layer computed by :func:`moe_layer`: ``x = x + moe(layer_norm(x))``."""
    x = stack.embed[tokens]
    stats = []
    for p in stack.layers:
        y, st = moe_layer(F.layer_norm(x, (x.shape[1],)), p, k, capacity_factor)
        x = x + y
        stats.append(st)
    return x @ stack.head, stats


def domain_tokens(domain: Literal["prose", "code", "random"], n: int, *, seed: int = 0) -> torch.Tensor:
    """Return ``n`` character token ids (ASCII, as :class:`cascada.workloads.f2.Tokenizer`) from
    ``"prose"`` (``pydoc_data.topics``), ``"code"`` (the standard library's ``.py`` sources) or
    ``"random"`` (uniform 32..126), starting at a seeded offset."""
    g = torch.Generator().manual_seed(seed)
    if domain == "random":
        return torch.randint(32, 127, (n,), generator=g)
    if domain == "prose":
        from pydoc_data.topics import topics

        text = "\0".join(topics[key] for key in sorted(topics))
    elif domain == "code":
        text = _stdlib_code(max(4 * n, 1 << 16))
    else:
        raise ValueError(f"unknown domain {domain!r}")
    ids = torch.tensor([ord(c) if ord(c) < 128 else 0x1A for c in text], dtype=torch.int64)
    if ids.numel() < n:
        ids = ids.repeat(n // max(ids.numel(), 1) + 1)
    start = int(torch.randint(0, ids.numel() - n + 1, (1,), generator=g))
    return ids[start:start + n]


def _stdlib_code(min_chars: int) -> str:
    """At least ``min_chars`` characters of standard-library Python source (sorted file order)."""
    import pathlib
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    if not parts:
        raise FileNotFoundError(f"no standard-library sources under {root}")
    return "\n".join(parts)
