"""TinyCausalLM: a small reference causal transformer that speaks the decoder protocol.

The protocol (see ``cascada.stages.Decoder``)::

    model(tokens: LongTensor[B, T], past=None) -> (logits: FloatTensor[B, T, V], new_past)

With ``past`` from an earlier call, ``tokens`` are only the new positions. Here ``past`` is a
list with one ``(keys, values)`` pair per layer, each ``[B, heads, T_past, d / heads]``.
Random initialisation is enough for tests and throughput; ``seed`` makes it reproducible.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..actors import ConfigurationError
from ._errors import StageInputError

Past = list[tuple[torch.Tensor, torch.Tensor]]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.view(b, t, h, d // h).transpose(1, 2)
        k = k.view(b, t, h, d // h).transpose(1, 2)
        v = v.view(b, t, h, d // h).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        p = k.shape[2] - t  # positions already cached
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        allowed = torch.arange(p + t, device=x.device)[None, :] <= (p + torch.arange(t, device=x.device))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.ln2(x))
        return x, (k, v)


class TinyCausalLM(nn.Module):
    """A pre-LayerNorm causal transformer with a KV cache.

    ``TinyCausalLM(vocab, d, layers, heads, max_len, seed=None)``: token and learned position
    embeddings, ``layers`` blocks of multi-head attention and a 4x MLP, a final LayerNorm and
    a linear head. ``forward(tokens, past=None) -> (logits, past)`` as in the decoder
    protocol. Use ``.double()`` for float64 (exact comparisons in tests)."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int, *, seed: int | None = None) -> None:
        for name, value in (("vocab", vocab), ("d", d), ("layers", layers), ("heads", heads), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"TinyCausalLM: {name} must be a positive integer, got {value!r}")
        if d % heads:
            raise ConfigurationError(f"TinyCausalLM: d ({d}) must be a multiple of heads ({heads})")
        super().__init__()
        self.vocab = vocab
        self.d = d
        self.max_len = max_len
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Embedding(max_len, d)
            self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor, past: Past | None = None) -> tuple[torch.Tensor, Past]:
        if tokens.dim() != 2:
            raise StageInputError(f"TinyCausalLM: tokens must be [B, T], got shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        start = 0 if past is None else past[0][0].shape[2]
        if start + t > self.max_len:
            raise StageInputError(f"TinyCausalLM: {start + t} positions exceed max_len {self.max_len}")
        positions = torch.arange(start, start + t, device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)[None]
        new_past: Past = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            new_past.append(kv)
        return self.head(self.ln(x)), new_past

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, d={self.d}, layers={len(self.blocks)}, max_len={self.max_len}"


def tiny_lm(vocab: int, d: int, layers: int, heads: int, max_len: int, seed: int | None = None,
            dtype: Any = None) -> TinyCausalLM:
    """A factory-friendly constructor: ``functools.partial(tiny_lm, 32, 32, 1, 2, 64, seed=1)``
    builds the same weights in any process. ``dtype`` ("float64" or a torch dtype) converts
    the parameters."""
    model = TinyCausalLM(vocab, d, layers, heads, max_len, seed=seed)
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model
