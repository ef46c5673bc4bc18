"""F2 spec-decode: character-level causal transformer LMs (draft and target) on pydoc text.

Data: the standard library's ``pydoc_data.topics`` (about 465 KB of prose about Python),
topics in sorted key order, joined with the end-of-text token; the first 90% of the
characters are the training split, the last 10% the validation split.

Tokenizer (:class:`Tokenizer`): the 7-bit ASCII code, vocabulary 128, token id = code point.
A few typographic characters are folded to ASCII (curly quotes, dashes, ellipsis); any
other non-ASCII character becomes SUB (``0x1A``). NUL (id 0) is the end-of-text token
``EOS`` that separates topics. ``decode(encode(s)) == s`` for ASCII text without NUL.

Models (:class:`CharLM`) implement the protocol the Decoder and Verifier stages call::

    model(tokens: LongTensor[B, T], past: Past | None = None) -> (logits FloatTensor[B, T, V], new_past)

With ``past`` (the KV cache returned by an earlier call), ``tokens`` holds only the new
positions, continuing after the cached ones. A ``Past`` is a tuple with one ``(k, v)`` pair per
layer, each ``[B, heads, S, head_dim]``. Calls never modify a past in place, so an older past
stays valid: rolling back after rejected draft tokens is keeping the older past or calling
:func:`truncate_past`. Positions are learned up to ``context_len`` (256); a call that would run
past it raises ValueError.

``TARGET_CONFIG``: 4 layers, d=128, 4 heads; ``DRAFT_CONFIG``: 1 layer, d=64, 2 heads.
``scripts/train_f2.py`` trains both and commits ``weights/f2_target.pt``, ``weights/f2_draft.pt``
(fp16) and ``weights/f2.json`` (validation loss and bits per char, parameters, MACs per token,
measured forward costs and the draft/target cost ratio). :func:`load_models` loads them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from ._weights import load_json, load_state, save_json, save_state, weights_path

__all__ = [
    "DRAFT_CONFIG",
    "EOS",
    "SUB",
    "TARGET_CONFIG",
    "VAL_FRACTION",
    "VOCAB_SIZE",
    "CharLM",
    "LMConfig",
    "Past",
    "Tokenizer",
    "corpus_text",
    "corpus_tokens",
    "evaluate",
    "generate",
    "load_meta",
    "load_models",
    "macs_per_token",
    "measure_cost",
    "past_length",
    "save_model",
    "train_lm",
    "config_dict",
    "param_count",
    "truncate_past",
    "write_meta",
]

VOCAB_SIZE = 128
EOS = 0  # NUL: end of text, between topics
SUB = 0x1A  # ASCII "substitute": any character outside the vocabulary

Past = tuple[tuple[torch.Tensor, torch.Tensor], ...]

_FOLD = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "--",
         "\u2026": "...", "\u00a0": " "}


class Tokenizer:
    """The F2 character tokenizer: ASCII code points, vocabulary 128, ``EOS`` = 0 (NUL)."""

    vocab_size: int = VOCAB_SIZE
    eos_id: int = EOS

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text``: ASCII code points, typographic quotes, dashes and
        ellipses folded to ASCII, any other non-ASCII character as SUB (26)."""
        out: list[int] = []
        for ch in text:
            o = ord(ch)
            if o < VOCAB_SIZE:
                out.append(o)
            elif ch in _FOLD:
                out.extend(ord(c) for c in _FOLD[ch])
            else:
                out.append(SUB)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of token ids ``ids`` (each ``0 <= id < 128``; ValueError otherwise)."""
        chars = []
        for i in ids:
            i = int(i)
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} outside the vocabulary 0..{VOCAB_SIZE - 1}")
            chars.append(chr(i))
        return "".join(chars)


VAL_FRACTION = 0.1  # the last 10% of the joined corpus is the validation split


def corpus_text(split: Literal["train", "val", "all"] = "train") -> str:
    """Return the pydoc topics text of ``split``: all topics in sorted key order joined by
    NUL (``EOS``); ``train`` is the first 90% of those characters, ``val`` the last 10%."""
    from pydoc_data.topics import topics

    text = chr(EOS).join(topics[k] for k in sorted(topics))
    cut = int(len(text) * (1 - VAL_FRACTION))
    if split == "all":
        return text
    if split == "train":
        return text[:cut]
    if split == "val":
        return text[cut:]
    raise ValueError(f"unknown split {split!r}")


def corpus_tokens(split: Literal["train", "val", "all"] = "train") -> torch.Tensor:
    """Return the token ids of :func:`corpus_text` ``(split)`` as a 1-D LongTensor."""
    return torch.tensor(Tokenizer().encode(corpus_text(split)), dtype=torch.int64)


@dataclass(frozen=True)
class LMConfig:
    """The shape of a :class:`CharLM`."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    context_len: int = 256
    vocab_size: int = VOCAB_SIZE


TARGET_CONFIG = LMConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512)
DRAFT_CONFIG = LMConfig(d_model=64, n_layers=1, n_heads=2, d_ff=256)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.n_heads = c.n_heads
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.fc = nn.Linear(c.d_model, c.d_ff)
        self.out = nn.Linear(c.d_ff, c.d_model)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.view(b, t, h, d // h).transpose(1, 2)
        k = k.view(b, t, h, d // h).transpose(1, 2)
        v = v.view(b, t, h, d // h).transpose(1, 2)
        s = 0
        if past is not None:
            s = past[0].shape[2]
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        # Query i (absolute position s + i) may attend keys 0..s + i.
        mask = torch.arange(s + t, device=x.device).view(1, s + t) <= (torch.arange(t, device=x.device).view(t, 1) + s)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return x, (k, v)


class CharLM(nn.Module):
    """A causal character-level transformer LM (learned positions, pre-LN blocks, tied
    input/output embedding).

    ``forward(tokens [B, T], past=None) -> (logits [B, T, V], new_past)``; see the module
    docstring for the cache protocol."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")
        self.config = config
        self.context_len = config.context_len
        self.vocab_size = config.vocab_size
        self.tok = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.context_len, config.d_model)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, past: Past | None = None) -> tuple[torch.Tensor, Past]:
        """Return ``(logits [B, T, V], new_past)`` for ``tokens [B, T]`` following ``past``."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got {tuple(tokens.shape)}")
        if past is not None and len(past) != len(self.blocks):
            raise ValueError(f"past has {len(past)} layers, the model {len(self.blocks)}")
        s = past_length(past)
        t = tokens.shape[1]
        if s + t > self.context_len:
            raise ValueError(f"{s} cached + {t} new positions exceed the context length {self.context_len}")
        x = self.tok(tokens) + self.pos(torch.arange(s, s + t, device=tokens.device))
        new: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            new.append(kv)
        logits = F.linear(self.ln_f(x), self.tok.weight)
        return logits, tuple(new)


def past_length(past: Past | None) -> int:
    """Return the number of positions held in ``past`` (0 for None)."""
    return 0 if past is None or not past else int(past[0][0].shape[2])


def truncate_past(past: Past, length: int) -> Past:
    """Return ``past`` keeping only its first ``length`` positions (views; ``past`` itself is
    unchanged). Use it to roll the cache back after rejected draft tokens."""
    if not 0 <= length <= past_length(past):
        raise ValueError(f"cannot truncate a past of {past_length(past)} positions to {length}")
    return tuple((k[:, :, :length], v[:, :, :length]) for k, v in past)


def param_count(model: nn.Module) -> int:
    """Return the number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def macs_per_token(config: LMConfig, context: int | None = None) -> int:
    """Return the multiply-accumulates to produce one token's logits at a position with
    ``context`` earlier positions in the cache (default: half the context length): the
    weight matmuls (QKV, output projection, MLP, tied output head) plus attention scores and
    the weighted sum over ``context + 1`` keys. Embeddings, norms and softmax are not counted."""
    c = config
    ctx = c.context_len // 2 if context is None else context
    per_layer = 4 * c.d_model * c.d_model + 2 * c.d_model * c.d_ff + 2 * c.d_model * (ctx + 1)
    return c.n_layers * per_layer + c.d_model * c.vocab_size


def train_lm(config: LMConfig, tokens: torch.Tensor, *, steps: int, batch_size: int = 8, lr: float = 2e-3,
             warmup: int = 50, weight_decay: float = 0.01, seed: int = 0,
             log: Any = None) -> CharLM:
    """Return a :class:`CharLM` trained on random windows of ``tokens`` (next-token
    cross-entropy, AdamW, linear warm-up then cosine decay to 10%). Deterministic for a
    given ``seed`` on one thread. ``log(step, loss)`` is called every 50 steps if given."""
    torch.manual_seed(seed)
    model = CharLM(config)
    g = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    t = config.context_len
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, tokens.numel() - t - 1, (batch_size,), generator=g)
        idx = starts.view(-1, 1) + torch.arange(t + 1).view(1, -1)
        chunk = tokens[idx]
        logits, _ = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(step, float(loss.detach()))
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: CharLM, tokens: torch.Tensor, max_windows: int | None = None) -> dict[str, float]:
    """Return ``{"loss": nats per char, "bpc": bits per char, "chars": n}``: next-token
    cross-entropy of ``model`` over ``tokens`` cut into consecutive windows of the context
    length (each window starts with an empty context); at most ``max_windows`` windows."""
    t = model.context_len
    n_windows = (tokens.numel() - 1) // t
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError("need more than one context length of tokens")
    x = tokens[: n_windows * t].view(n_windows, t)
    y = tokens[1: n_windows * t + 1].view(n_windows, t)
    total = 0.0
    for i in range(0, n_windows, 16):
        logits, _ = model(x[i:i + 16])
        total += float(F.cross_entropy(logits.reshape(-1, model.vocab_size), y[i:i + 16].reshape(-1), reduction="sum"))
    loss = total / (n_windows * t)
    return {"loss": loss, "bpc": loss / math.log(2), "chars": float(n_windows * t)}


@torch.no_grad()
def generate(model: CharLM, prompt: Sequence[int], max_new: int, *, greedy: bool = True, temperature: float = 1.0,
             seed: int = 0, stop_at_eos: bool = True) -> list[int]:
    """Return up to ``max_new`` new token ids after ``prompt`` (target-only decoding with
    the KV cache, batch 1): argmax when ``greedy``, else sampled from softmax(logits /
    temperature) with a ``torch.Generator`` seeded by ``seed``. Stops after EOS when
    ``stop_at_eos``, and at the context length."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    g = torch.Generator().manual_seed(seed)
    device = model.tok.weight.device
    logits, past = model(torch.tensor([list(prompt)], dtype=torch.int64, device=device))
    out: list[int] = []
    while len(out) < max_new:
        last = logits[0, -1]
        if greedy:
            nxt = int(torch.argmax(last))
        else:
            nxt = int(torch.multinomial(F.softmax(last.float().cpu() / temperature, dim=-1), 1, generator=g))
        out.append(nxt)
        if (stop_at_eos and nxt == EOS) or len(out) >= max_new or past_length(past) + 1 > model.context_len:
            break
        logits, past = model(torch.tensor([[nxt]], dtype=torch.int64, device=device), past)
    return out


def measure_cost(model: CharLM, *, context: int = 128, block: int = 5, repeats: int = 30) -> dict[str, float]:
    """Return measured forward costs of ``model`` on this machine (batch 1, no gradients,
    median of ``repeats``): ``step_ms`` (one new token after ``context`` cached ones, the
    draft's inner loop), ``block_ms`` (``block`` new tokens after ``context`` cached, the
    verifier's call for gamma = block - 1), ``full_tokens_per_s`` (a whole context-length
    sequence in one call)."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(1, VOCAB_SIZE, (1, context), generator=g)
    one = torch.randint(1, VOCAB_SIZE, (1, 1), generator=g)
    blk = torch.randint(1, VOCAB_SIZE, (1, block), generator=g)
    full = torch.randint(1, VOCAB_SIZE, (1, model.context_len), generator=g)

    def median_ms(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        times.sort()
        return 1000 * times[len(times) // 2]

    with torch.no_grad():
        _, past = model(ctx)
        step = median_ms(lambda: model(one, past))
        blockm = median_ms(lambda: model(blk, past))
        fullm = median_ms(lambda: model(full))
    return {"step_ms": step, "block_ms": blockm, "full_tokens_per_s": model.context_len / (fullm / 1000)}


def save_model(model: CharLM, name: str, directory: str | None = None) -> None:
    """Write ``model``'s weights (fp16) as ``<name>.pt`` into ``directory`` (default: the
    package's ``weights/``)."""
    import pathlib

    base = pathlib.Path(directory) if directory else weights_path("")
    save_state(model.state_dict(), base / f"{name}.pt")


def _load_one(config: LMConfig, name: str, directory: str | None) -> CharLM:
    import pathlib

    base = pathlib.Path(directory) if directory else weights_path("")
    m = CharLM(config)
    m.load_state_dict(load_state(base / f"{name}.pt"))
    m.eval()
    return m


def load_models(directory: str | None = None) -> tuple[CharLM, CharLM, Tokenizer]:
    """Return ``(draft, target, tokenizer)``: the committed F2 models (fp32, eval mode) and
    the tokenizer. Raises FileNotFoundError when ``scripts/train_f2.py`` was never run."""
    return (_load_one(DRAFT_CONFIG, "f2_draft", directory), _load_one(TARGET_CONFIG, "f2_target", directory),
            Tokenizer())


def load_meta(directory: str | None = None) -> dict[str, Any]:
    """Return the JSON record written by ``scripts/train_f2.py`` (losses, bits per char,
    parameters, MACs per token, measured costs, cost ratio)."""
    import pathlib

    base = pathlib.Path(directory) if directory else weights_path("")
    meta: dict[str, Any] = load_json(base / "f2.json")
    return meta


def config_dict(config: LMConfig) -> dict[str, int]:
    """Return ``config`` as a plain dict (for JSON records)."""
    return {k: int(v) for k, v in asdict(config).items()}


def write_meta(meta: dict[str, Any], directory: str | None = None) -> None:
    """Write ``meta`` as ``f2.json`` into ``directory`` (default: the package's ``weights/``)."""
    import pathlib

    base = pathlib.Path(directory) if directory else weights_path("")
    save_json(meta, base / "f2.json")
