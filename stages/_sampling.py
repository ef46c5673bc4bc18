"""Turning logits into distributions and drawing from them, reproducibly.

Every random choice a decoder or a verifier makes goes through a ``Sampler``: a Bernoulli
draw (accept a drafted token) or a categorical draw (pick a token). ``TorchSampler`` draws
with a seeded ``torch.Generator``; tests substitute a sampler that enumerates every branch
with its exact probability. Probabilities are float64 throughout.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Any, Literal, Protocol

import torch

from ..actors import ConfigurationError

Mode = Literal["greedy", "sample"]
MODES = ("greedy", "sample")


class Sampler(Protocol):
    """The source of every random choice in decoding and verification."""

    def bernoulli(self, p: float) -> bool:
        """True with probability ``p`` (0 < p < 1)."""
        ...

    def categorical(self, probs: torch.Tensor) -> int:
        """An index drawn with the given probabilities (a 1-D float64 tensor summing to 1)."""
        ...


class TorchSampler:
    """A Sampler over a ``torch.Generator`` seeded with ``seed`` (a random seed when None)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def bernoulli(self, p: float) -> bool:
        u = torch.rand((), generator=self.generator, dtype=torch.float64).item()
        return u < p

    def categorical(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.detach().to("cpu", torch.float64), 1, generator=self.generator).item())


def derive_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed derived from ``seed`` and tags (e.g. ``"draft", round``): independent
    streams for each actor and round, the same in every process."""
    text = repr((int(seed), *tags)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def check_sampling(mode: Any, temperature: Any, top_k: Any, seed: Any, where: str) -> None:
    """ConfigurationError for a bad mode, temperature, top_k or seed."""
    if mode not in MODES:
        raise ConfigurationError(f"{where}: mode must be 'greedy' or 'sample', got {mode!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0.0 < temperature < math.inf):
        raise ConfigurationError(f"{where}: temperature must be a positive finite number, got {temperature!r} "
                                 "(for argmax decoding use mode='greedy')")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigurationError(f"{where}: top_k must be None or an integer >= 1, got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigurationError(f"{where}: seed must be an integer or None, got {seed!r}")


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The distribution sampling draws from: ``softmax(logits / temperature)`` over the last
    dimension in float64, restricted to the ``top_k`` largest logits (renormalised) when given."""
    x = logits.detach().to(torch.float64) / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return torch.softmax(x, dim=-1)


def one_hot(index: int, size: int) -> torch.Tensor:
    row = torch.zeros(size, dtype=torch.float64)
    row[index] = 1.0
    return row
