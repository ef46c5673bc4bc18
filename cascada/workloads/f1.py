"""F1 digits-cascade: tiered classifiers (small to big) and ensemble members, with exact MACs.

Tiers (``TIER_SPECS``) for the 8x8 image sources (``sklearn`` digits, ``glyphs``), used by
the confidence cascade (the last tier is "the big model"):

====  ==========================================================  =============
tier  model                                                       MACs per item
====  ==========================================================  =============
0     linear (logistic) 64 -> 10                                  640
1     MLP 64 -> 64 -> 10                                          4,736
2     CNN conv3x3(1->8), pool, conv3x3(8->16), fc 32              31,552
3     CNN conv3x3(1->32), pool, conv3x3(32->64), fc 128           445,696
====  ==========================================================  =============

Ensemble members (``MEMBER_SPECS``, ``N_MEMBERS`` = 4 seeds of one architecture), used by
the window cascade that echoes the seed paper: CNN conv3x3(1->16), pool, conv3x3(16->32),
fc 64, 116,352 MACs (26% of the big tier, as EfficientNet-B2 is to B4).

For ``cancer`` (30 features, binary) the tiers are linear 30 -> 2, MLP 30 -> 16 -> 2 and MLP
30 -> 256 -> 256 -> 2, and the members MLP 30 -> 64 -> 2. Every model takes raw features
(0..16 pixels, or the original cancer units): the normalisation is part of the model (buffers
``shift``, ``scale``), and so is a softmax temperature fitted on held-out data (buffer
``temperature``).

``scripts/train_f1.py`` trains them for each source and commits
``weights/f1_<source>_tier<i>.pt`` and ``weights/f1_<source>_member<j>.pt`` (fp16) and
``weights/f1_<source>.json`` (accuracies, MACs, seed, the analyses of
:mod:`cascada.workloads.f1_cascade`). :func:`load_tiers` and :func:`load_members` load them
back in fp32.

MACs count the multiply-accumulates of the Linear and Conv2d layers for one item
(biases, activations, pooling, normalisation and softmax are not counted).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from . import f1_data
from ._weights import load_json, load_state, save_json, save_state, weights_path

__all__ = [
    "MEMBER_SPECS",
    "N_MEMBERS",
    "TIER_SPECS",
    "TierNet",
    "TierSpec",
    "build_tier",
    "fit_temperature",
    "load_members",
    "load_meta",
    "load_tiers",
    "macs",
    "member_spec_for",
    "param_count",
    "predict_proba",
    "save_meta",
    "save_models",
    "selected_thresholds",
    "specs_for",
    "train_tier",
]


@dataclass(frozen=True)
class TierSpec:
    """The architecture of one tier. ``kind`` is ``"linear"``, ``"mlp"`` (``hidden`` widths)
    or ``"cnn"`` (8x8 images only: ``channels`` of two 3x3 convolutions with a 2x2 max-pool
    between them, then ``hidden`` fully connected widths)."""

    kind: Literal["linear", "mlp", "cnn"]
    hidden: tuple[int, ...] = ()
    channels: tuple[int, ...] = field(default=())


TIER_SPECS: dict[str, tuple[TierSpec, ...]] = {
    "image": (TierSpec("linear"), TierSpec("mlp", (64,)), TierSpec("cnn", (32,), (8, 16)),
              TierSpec("cnn", (128,), (32, 64))),
    "tabular": (TierSpec("linear"), TierSpec("mlp", (16,)), TierSpec("mlp", (256, 256))),
}
# Ensemble members: same architecture, different seeds (about a quarter of the big tier's MACs
# for images, as EfficientNet-B2 is to B4 in the seed paper).
MEMBER_SPECS: dict[str, TierSpec] = {
    "image": TierSpec("cnn", (64,), (16, 32)),
    "tabular": TierSpec("mlp", (64,)),
}
N_MEMBERS = 4


def _family(source: str) -> str:
    return "tabular" if f1_data.resolve_source_name(source) == "cancer" else "image"


def specs_for(source: str) -> tuple[TierSpec, ...]:
    """Return the tier specs (small to big) used for ``source`` (``"cancer"`` gets the tabular
    family, the 8x8 image sources the image family)."""
    return TIER_SPECS[_family(source)]


def member_spec_for(source: str) -> TierSpec:
    """Return the architecture shared by the ``N_MEMBERS`` ensemble members of ``source``."""
    return MEMBER_SPECS[_family(source)]


class TierNet(nn.Module):
    """One tier: normalise raw features, then a linear model, an MLP or a small CNN.

    ``forward(x [B, F]) -> logits [B, C]`` (already divided by the fitted temperature)."""

    shift: torch.Tensor
    scale: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, spec: TierSpec, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.n_features = n_features
        self.n_classes = n_classes
        self.register_buffer("shift", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.register_buffer("temperature", torch.ones(()))
        layers: list[nn.Module] = []
        if spec.kind == "cnn":
            if n_features != 64 or len(spec.channels) != 2:
                raise ValueError("the cnn tier takes 8x8 images (64 features) and two conv channel counts")
            c1, c2 = spec.channels
            self.features: nn.Module | None = nn.Sequential(
                nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Flatten())
            width = c2 * 4 * 4
        elif spec.kind in ("linear", "mlp"):
            if spec.kind == "linear" and spec.hidden:
                raise ValueError("a linear tier has no hidden layers")
            self.features = None
            width = n_features
        else:
            raise ValueError(f"unknown tier kind {spec.kind!r}")
        for h in spec.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return temperature-scaled logits ``[B, C]`` for raw features ``x [B, F]``."""
        z = (x - self.shift) / self.scale
        if self.features is not None:
            z = self.features(z.reshape(-1, 1, 8, 8))
        out: torch.Tensor = self.head(z) / self.temperature
        return out


def build_tier(spec: TierSpec, n_features: int, n_classes: int, seed: int = 0) -> TierNet:
    """Return a freshly initialised :class:`TierNet` (initialisation seeded by ``seed``)."""
    torch.manual_seed(seed)
    return TierNet(spec, n_features, n_classes)


def macs(model: nn.Module, n_features: int | None = None) -> int:
    """Return the exact multiply-accumulate count for one item through ``model``: the sum
    over every Linear (in x out) and Conv2d (output elements x in_channels/groups x kernel
    area) it runs. ``n_features`` defaults to ``model.n_features``."""
    nf = int(n_features if n_features is not None else getattr(model, "n_features"))
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features
        elif isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += int(out[0].numel()) * (mod.in_channels // mod.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros(1, nf, device=device))
    finally:
        for h in handles:
            h.remove()
    return total


def param_count(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def predict_proba(model: nn.Module, X: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Return the softmax probabilities ``[N, C]`` of ``model`` on raw features ``X [N, F]``
    (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = [F.softmax(model(X[i:i + batch_size]), dim=-1) for i in range(0, X.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0, int(getattr(model, "n_classes")))


def _shift_images(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Randomly translate 8x8 images ``[B, 64]`` by -1, 0 or +1 pixel per axis (zero fill)."""
    b = x.shape[0]
    imgs = F.pad(x.reshape(b, 1, 8, 8), (1, 1, 1, 1))
    off = torch.randint(0, 3, (b, 2), generator=g)
    rows = (torch.arange(8).view(1, 8) + off[:, :1]).view(b, 1, 8, 1).expand(b, 1, 8, 10)
    imgs = imgs.gather(2, rows)
    cols = (torch.arange(8).view(1, 8) + off[:, 1:]).view(b, 1, 1, 8).expand(b, 1, 8, 8)
    return imgs.gather(3, cols).reshape(b, 64)


def train_tier(spec: TierSpec, X: torch.Tensor, y: torch.Tensor, *, n_classes: int, seed: int = 0,
               epochs: int = 60, lr: float = 3e-3, weight_decay: float = 1e-4, batch_size: int = 64,
               augment: bool = False, image_norm: bool = True) -> TierNet:
    """Return a :class:`TierNet` trained on ``(X, y)`` with AdamW, a one-cycle learning-rate
    schedule peaking at ``lr``, and cross-entropy.

    Deterministic for a given ``seed`` on one thread. The normalisation buffers are set from
    ``X``: one scalar mean/std for images (``image_norm``), per-feature mean/std otherwise.
    ``augment`` adds random one-pixel shifts (8x8 images only). The temperature stays 1
    (see :func:`fit_temperature`)."""
    model = build_tier(spec, X.shape[1], n_classes, seed)
    with torch.no_grad():
        if image_norm:
            model.shift.fill_(float(X.mean()))
            model.scale.fill_(float(X.std()))
        else:
            model.shift.copy_(X.mean(0))
            model.scale.copy_(X.std(0).clamp_min(1e-6))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(X.shape[0] / batch_size)
    # One-cycle schedule (10% warm-up, cosine down); runs under 20 steps keep a constant rate.
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
             if steps >= 20 else None)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            xb = X[idx]
            if augment:
                xb = _shift_images(xb, g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()
    return model


def fit_temperature(model: TierNet, X: torch.Tensor, y: torch.Tensor) -> float:
    """Set ``model.temperature`` to the value on a log grid (0.25..8) that minimises the
    negative log-likelihood on ``(X, y)``; return it. Accuracy does not change."""
    with torch.no_grad():
        model.temperature.fill_(1.0)
        logits = model(X)
        best_t, best_nll = 1.0, math.inf
        for i in range(-40, 61):
            t = 2.0 ** (i / 20)
            nll = float(F.cross_entropy(logits / t, y))
            if nll < best_nll:
                best_t, best_nll = t, nll
        model.temperature.fill_(best_t)
    return best_t


Role = Literal["tier", "member"]


def _weights_name(source: str, role: Role, i: int) -> str:
    return f"f1_{source}_{role}{i}.pt"


def _base(directory: str | None) -> pathlib.Path:
    return pathlib.Path(directory) if directory else weights_path("")


def save_models(models: Sequence[TierNet], source: str, role: Role = "tier", directory: str | None = None) -> None:
    """Write each model as ``f1_<source>_<role><i>.pt`` (fp16) into ``directory`` (default:
    the package's ``weights/``)."""
    for i, m in enumerate(models):
        save_state(m.state_dict(), _base(directory) / _weights_name(source, role, i))


def save_meta(meta: dict[str, Any], source: str, directory: str | None = None) -> None:
    """Write ``meta`` as ``f1_<source>.json`` into ``directory`` (default: the package's ``weights/``)."""
    save_json(meta, _base(directory) / f"f1_{source}.json")


def _load(source: str, role: Role, directory: str | None) -> list[TierNet]:
    src = f1_data.resolve_source_name(source)
    nf, nc = f1_data.feature_count(src), f1_data.class_count(src)
    specs = specs_for(src) if role == "tier" else (member_spec_for(src),) * N_MEMBERS
    models = []
    for i, spec in enumerate(specs):
        m = TierNet(spec, nf, nc)
        m.load_state_dict(load_state(_base(directory) / _weights_name(src, role, i)))
        m.eval()
        models.append(m)
    return models


def load_tiers(source: str = "auto", directory: str | None = None) -> list[TierNet]:
    """Return the committed tiers for ``source`` (small to big; the last is "the big model"),
    fp32, in eval mode.

    ``"auto"`` resolves as in :func:`cascada.workloads.f1_data.resolve_source` (``sklearn``
    digits when scikit-learn imports, else ``glyphs``). Loading needs only torch, even for the
    scikit-learn sources. Raises FileNotFoundError when the weights were never trained."""
    return _load(source, "tier", directory)


def load_members(source: str = "auto", directory: str | None = None) -> list[TierNet]:
    """Return the ``N_MEMBERS`` committed ensemble members for ``source`` (same architecture,
    different seeds; an ensemble cascade averages the probabilities of members ``0..k``)."""
    return _load(source, "member", directory)


def load_meta(source: str = "auto", directory: str | None = None) -> dict[str, Any]:
    """Return the JSON record written by ``scripts/train_f1.py`` for ``source``: seed, per-model
    accuracy / MACs / params, and the cascade analyses (``tiers``, ``ensemble``, ``ood``)."""
    src = f1_data.resolve_source_name(source)
    meta: dict[str, Any] = load_json(_base(directory) / f"f1_{src}.json")
    return meta


def selected_thresholds(source: str = "auto", directory: str | None = None) -> list[float]:
    """Return the per-tier exit thresholds the training script chose for ``source`` (from its
    JSON record): in the confidence cascade over the tiers, an item exits at tier ``i`` when
    its maximum softmax probability is ``>= thresholds[i]`` (the last tier answers the rest),
    as :func:`cascada.workloads.f1_cascade.confidence_cascade` computes. Raises LookupError
    when no configuration matched the big model on the selection data."""
    sel = load_meta(source, directory)["tiers"]["selected"]
    if sel is None:
        raise LookupError(f"no selected thresholds recorded for {source!r}")
    return [float(t) for t in sel["thresholds"]]
