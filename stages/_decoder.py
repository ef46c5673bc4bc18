"""Autoregressive decoding over a causal LM: pure functions and the Decoder actor.

The model protocol (what a decoder or verifier model implements)::

    model(tokens: LongTensor[B, T], past: Any | None = None) -> (logits: FloatTensor[B, T, V], new_past)

- ``logits[b, t]`` scores the token that follows ``tokens[b, :t + 1]``.
- With ``past`` (what an earlier call returned), ``tokens`` are only the new positions and
  the model continues from the cached state (a KV cache). The decoder never looks inside
  ``past``.
- A model that keeps no cache returns ``None`` as ``new_past``; the decoder then runs it on
  the whole prefix at every step. Called with ``past=None`` every model scores the whole
  sequence it is given, which is what one-pass verification uses.

The decoders here work on one sequence (B = 1). Tokens are Python ints, prompts lists of
ints (or 1-D integer tensors).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import torch

from ..actors import Actor, ConfigurationError
from ._errors import StageInputError
from ._sampling import Mode, Sampler, TorchSampler, check_sampling, one_hot, sampling_probs
from ._torchutil import build_model, check_model_args, resolve_device, set_threads


def model_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def as_tokens(tokens: Any, where: str, *, vocab: int | None = None, allow_empty: bool = False) -> list[int]:
    """A list of token ids from a list of ints or a 1-D (or [1, T]) integer tensor."""
    if isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dim() > 2 or (
                tokens.dim() == 2 and tokens.shape[0] != 1):
            raise StageInputError(f"{where}: tokens must be a 1-D integer tensor, got {tokens.dtype} "
                                  f"{tuple(tokens.shape)}")
        tokens = tokens.reshape(-1).tolist()
    if not isinstance(tokens, (list, tuple)):
        raise StageInputError(f"{where}: tokens must be a list of ints or a 1-D integer tensor, "
                              f"got {type(tokens).__name__}")
    out: list[int] = []
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab is not None and t >= vocab):
            bound = f"[0, {vocab})" if vocab is not None else ">= 0"
            raise StageInputError(f"{where}: token {i} is {t!r}; token ids are ints {bound}")
        out.append(t)
    if not out and not allow_empty:
        raise StageInputError(f"{where}: the prompt is empty; decoding needs at least one token to condition on "
                              "(e.g. a beginning-of-sequence id)")
    return out


def _check_count(name: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{where}: {name} must be an integer >= 0, got {value!r}")
    return value


class Stepper:
    """Feeds a model one token at a time, with its KV cache when it keeps one.

    ``logits()`` is the next-token logits row ``[V]`` after the tokens so far; ``push(t)``
    appends a token (computed lazily, on the next ``logits()``)."""

    def __init__(self, model: Callable[..., Any], prefix: Sequence[int], *, use_cache: bool = True) -> None:
        self.model = model
        self.device = model_device(model)
        self.tokens = list(prefix)
        self.use_cache = use_cache
        self._past: Any = None
        self._pending: list[int] = []
        self._logits: torch.Tensor | None = None
        self._run(self.tokens, None)

    def _run(self, tokens: list[int], past: Any) -> None:
        x = torch.tensor([tokens], dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits, new_past = self.model(x, past)
        self._logits = logits[0, -1]
        self._past = new_past if self.use_cache else None

    def push(self, token: int) -> None:
        self.tokens.append(token)
        self._pending.append(token)
        self._logits = None

    def logits(self) -> torch.Tensor:
        if self._logits is None:
            if self._past is not None:
                self._run(self._pending, self._past)
            else:
                self._run(self.tokens, None)
            self._pending = []
        assert self._logits is not None
        return self._logits


def truncate_cache(model: Any, past: Any, length: int) -> Any:
    """``past`` keeping only its first ``length`` positions, or None when that cannot be done.

    A model's own ``truncate_past(past, length)`` method is used when it has one; otherwise a
    past shaped like TinyCausalLM's and CharLM's (a sequence of per-layer ``(keys, values)``
    tensors, positions on dim -2) is sliced. Anything else gives None (the caller then
    re-scores from scratch). Slices are views; the models here never modify a past in place."""
    if past is None:
        return None
    if length == 0:
        return None
    own = getattr(model, "truncate_past", None)
    if callable(own):
        return own(past, length)
    if not isinstance(past, (list, tuple)) or not past:
        return None
    out: list[tuple[torch.Tensor, ...]] = []
    for layer in past:
        if not isinstance(layer, (list, tuple)) or not layer:
            return None
        parts: list[torch.Tensor] = []
        for t in layer:
            if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-2] < length:
                return None
            parts.append(t[..., :length, :])
        out.append(tuple(parts))
    return type(past)(out) if isinstance(past, tuple) else out


class KVSession:
    """One sequence's KV cache, kept across calls (speculative rounds) and rolled back on
    demand.

    ``tokens`` are the positions ``past`` covers (all of them, or none when the model keeps
    no cache). ``score(seq, new)`` returns the logits rows ``[len(new), V]`` of ``new``
    following ``seq``: the cache is first rolled back to the longest common prefix of
    ``seq`` and ``tokens`` (``truncate_cache``), then only the positions it lacks are run,
    in one forward pass. A model whose forward returns None as its past (or
    ``use_cache=False``) is run on the whole sequence every time, as without a session."""

    def __init__(self, model: Callable[..., Any], *, use_cache: bool = True) -> None:
        self.model = model
        self.device = model_device(model)
        self.use_cache = use_cache
        self.tokens: list[int] = []
        self.past: Any = None
        self.positions_run = 0  # positions fed to the model (a cost measure)
        self.calls = 0

    @property
    def cached(self) -> int:
        return len(self.tokens) if self.past is not None else 0

    def rollback(self, length: int) -> None:
        """Keep the cache's first ``length`` positions (no-op when it holds no more)."""
        if length >= len(self.tokens):
            return
        self.past = truncate_cache(self.model, self.past, length) if length > 0 else None
        self.tokens = self.tokens[:length] if self.past is not None else []

    def sync(self, seq: Sequence[int], keep_at_most: int | None = None) -> int:
        """Roll back to the longest common prefix of ``seq`` and the cached tokens (and at
        most ``keep_at_most``); return how many positions stay cached."""
        n = 0
        limit = min(len(seq), len(self.tokens))
        if keep_at_most is not None:
            limit = min(limit, keep_at_most)
        toks = self.tokens
        while n < limit and toks[n] == seq[n]:
            n += 1
        self.rollback(n)
        return self.cached

    def score(self, seq: Sequence[int], new: Sequence[int]) -> torch.Tensor:
        """Logits rows ``[len(new), V]``: row i scores the token after ``seq + new[:i + 1]``.
        ``new`` must not be empty."""
        if not new:
            raise StageInputError("KVSession.score: nothing to score")
        m = self.sync(seq)
        feed = list(seq[m:]) + list(new)
        past = self.past if m else None
        if past is None:
            feed = list(seq) + list(new)
        x = torch.tensor([feed], dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits, new_past = self.model(x, past)
        self.calls += 1
        self.positions_run += len(feed)
        if self.use_cache and new_past is not None:
            self.past = new_past
            self.tokens = list(seq) + list(new)
        else:
            self.past, self.tokens = None, []
        rows: torch.Tensor = logits[0, -len(new):]
        return rows


class SessionCache:
    """Per generation session KV caches, keyed by a session id, at most ``max_sessions``
    (least recently used evicted first)."""

    def __init__(self, model: Callable[..., Any], max_sessions: int, *, use_cache: bool = True,
                 where: str = "SessionCache") -> None:
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ConfigurationError(f"{where}: max_sessions must be an integer >= 1, got {max_sessions!r}")
        self.model = model
        self.max_sessions = max_sessions
        self.use_cache = use_cache
        self._sessions: OrderedDict[str, KVSession] = OrderedDict()
        self.evicted = 0
        self.opened = 0

    def get(self, key: Any) -> KVSession:
        if not isinstance(key, str) or not key:
            raise StageInputError(f"session ids are non-empty strings, got {key!r}")
        s = self._sessions.get(key)
        if s is None:
            s = KVSession(self.model, use_cache=self.use_cache)
            self._sessions[key] = s
            self.opened += 1
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
                self.evicted += 1
        else:
            self._sessions.move_to_end(key)
        return s

    def end(self, key: Any) -> bool:
        return self._sessions.pop(key, None) is not None if isinstance(key, str) else False

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, key: object) -> bool:
        return key in self._sessions

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self._sessions), "max_sessions": self.max_sessions, "opened": self.opened,
                "evicted": self.evicted}


def _pick(logits: torch.Tensor, mode: Mode, temperature: float, top_k: int | None,
          sampler: Sampler | None) -> tuple[int, torch.Tensor]:
    """The next token and the distribution it was drawn from (one-hot for greedy)."""
    if mode == "greedy":
        tok = int(torch.argmax(logits).item())
        return tok, one_hot(tok, logits.shape[-1])
    probs = sampling_probs(logits, temperature, top_k)
    assert sampler is not None
    return sampler.categorical(probs), probs


def generate_tokens(model: Callable[..., Any], prompt: Any, max_new: int, *, mode: Mode = "greedy",
                    temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                    sampler: Sampler | None = None, eos: int | None = None,
                    use_cache: bool = True) -> Iterator[int]:
    """Yield up to ``max_new`` tokens after ``prompt``, one at a time (stops after ``eos``).

    Greedy takes the argmax; sampling draws from ``sampling_probs(logits, temperature,
    top_k)`` with ``sampler`` (default: a TorchSampler seeded with ``seed``, so one seed
    always gives the same tokens)."""
    where = "generate"
    check_sampling(mode, temperature, top_k, seed, where)
    _check_count("max_new", max_new, where)
    prefix = as_tokens(prompt, where, vocab=getattr(model, "vocab", None))
    if mode == "sample" and sampler is None:
        sampler = TorchSampler(seed)
    return _generate(model, prefix, max_new, mode, temperature, top_k, sampler, eos, use_cache)


def _generate(model: Callable[..., Any], prefix: list[int], max_new: int, mode: Mode, temperature: float,
              top_k: int | None, sampler: Sampler | None, eos: int | None, use_cache: bool) -> Iterator[int]:
    if max_new == 0:
        return
    stepper = Stepper(model, prefix, use_cache=use_cache)
    for i in range(max_new):
        tok, _ = _pick(stepper.logits(), mode, temperature, top_k, sampler)
        yield tok
        if tok == eos or i == max_new - 1:
            return
        stepper.push(tok)


def draft_tokens(model: Callable[..., Any], prefix: Any, k: int, *, mode: Mode = "greedy", temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None, sampler: Sampler | None = None,
                 eos: int | None = None, use_cache: bool = True,
                 session: KVSession | None = None) -> tuple[list[int], torch.Tensor]:
    """Propose up to ``k`` tokens after ``prefix`` and the rows ``q`` (``[n, V]``, float64)
    they were drawn from: the sampling distribution when sampling, a one-hot row at the
    argmax when greedy (so a greedy draft still verifies exactly under rejection sampling).
    Fewer than ``k`` come back when ``eos`` is drafted (it is the last).

    With ``session`` (a KVSession over ``model``) the KV cache is carried across calls: only
    the positions of ``prefix`` the session has not seen (after rolling back to the common
    prefix) are run, then one position per drafted token."""
    where = "draft"
    check_sampling(mode, temperature, top_k, seed, where)
    _check_count("k", k, where)
    prefix_ids = as_tokens(prefix, where, vocab=getattr(model, "vocab", None))
    if mode == "sample" and sampler is None:
        sampler = TorchSampler(seed)
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    if k == 0:
        return tokens, torch.zeros((0, 0), dtype=torch.float64)
    if session is not None:
        seq = list(prefix_ids)
        logits = session.score(seq[:-1], seq[-1:])[-1]
        for i in range(k):
            tok, row = _pick(logits, mode, temperature, top_k, sampler)
            tokens.append(tok)
            rows.append(row.to("cpu"))
            if tok == eos or i == k - 1:
                break
            logits = session.score(seq, [tok])[-1]
            seq.append(tok)
        return tokens, torch.stack(rows)
    stepper = Stepper(model, prefix_ids, use_cache=use_cache)
    for i in range(k):
        tok, row = _pick(stepper.logits(), mode, temperature, top_k, sampler)
        tokens.append(tok)
        rows.append(row.to("cpu"))
        if tok == eos or i == k - 1:
            break
        stepper.push(tok)
    return tokens, torch.stack(rows)


class Decoder(Actor):
    """An autoregressive decoder over a model that follows the decoder protocol (module
    docstring of ``cascada.stages._decoder``; ``TinyCausalLM`` is a reference).

    Give ``model`` (sent to the actor's process) or ``factory`` (called there). ``device``,
    ``threads`` as for ``Expert``; ``use_cache=False`` ignores the model's KV cache. For tiny
    models set ``threads=1``: torch's intra-op threads cost more than they save on small
    tensors (a [5]-wide softmax took ~1.5 ms with 2 threads on a busy 2-core machine, ~µs
    with one).

    Handlers:

    - ``generate(prompt_tokens, max_new, mode="greedy", temperature=1.0, top_k=None,
      seed=None, eos=None)``: a stream of tokens, one at a time.
    - ``complete(...)``: the same, as one list.
    - ``draft(prefix_tokens, k, mode=..., seed=..., with_q=True, session=None)``:
      ``{"tokens": [k ints], "q": FloatTensor[k, V] (float64) or None}``, the proposal for
      speculative decoding. With ``session`` (a string the driver picks per generation) the
      draft's KV cache is kept between calls of that session and rolled back to the common
      prefix of the next call's ``prefix_tokens`` (rejected drafts), so a round runs only the
      new positions. At most ``max_sessions`` are kept, the least recently used evicted
      first (an evicted session just re-scores its prefix once).
    - ``end_session(session)``: drop a session's cache (True if it was held).
    - ``stats()``: requests, tokens generated and drafted, sessions.

    Sampling with the same seed gives the same tokens; without a seed each request draws a
    fresh one.
    """

    def __init__(self, model: Any = None, *, factory: Callable[[], Any] | None = None, device: str = "cpu",
                 threads: int | None = None, use_cache: bool = True, max_sessions: int = 64) -> None:
        where = "Decoder"
        check_model_args(model, factory, where)
        self._device = resolve_device(device, where)
        set_threads(threads, where)
        self.model = build_model(model, factory, self._device, where)
        self.use_cache = bool(use_cache)
        self.sessions = SessionCache(self.model, max_sessions, use_cache=self.use_cache, where=where)
        self.requests = 0
        self.generated = 0
        self.drafted = 0

    async def generate(self, prompt_tokens: Any, max_new: int, mode: Mode = "greedy", temperature: float = 1.0,
                       top_k: int | None = None, seed: int | None = None,
                       eos: int | None = None) -> AsyncIterator[int]:
        """Stream up to ``max_new`` tokens after the prompt (stops after ``eos``)."""
        self.requests += 1
        for tok in generate_tokens(self.model, prompt_tokens, max_new, mode=mode, temperature=temperature,
                                   top_k=top_k, seed=seed, eos=eos, use_cache=self.use_cache):
            self.generated += 1
            yield tok

    async def complete(self, prompt_tokens: Any, max_new: int, mode: Mode = "greedy", temperature: float = 1.0,
                       top_k: int | None = None, seed: int | None = None, eos: int | None = None) -> list[int]:
        """``generate`` as one list."""
        self.requests += 1
        out = list(generate_tokens(self.model, prompt_tokens, max_new, mode=mode, temperature=temperature,
                                   top_k=top_k, seed=seed, eos=eos, use_cache=self.use_cache))
        self.generated += len(out)
        return out

    async def draft(self, prefix_tokens: Any, k: int, mode: Mode = "greedy", temperature: float = 1.0,
                    top_k: int | None = None, seed: int | None = None, eos: int | None = None,
                    with_q: bool = True, session: str | None = None) -> dict[str, Any]:
        """Propose ``k`` tokens after the prefix, with the rows they were drawn from (with the
        session's KV cache when ``session`` is given)."""
        self.requests += 1
        kv = None if session is None else self.sessions.get(session)
        tokens, q = draft_tokens(self.model, prefix_tokens, k, mode=mode, temperature=temperature, top_k=top_k,
                                 seed=seed, eos=eos, use_cache=self.use_cache, session=kv)
        self.drafted += len(tokens)
        return {"tokens": tokens, "q": q if with_q else None}

    async def end_session(self, session: str) -> bool:
        """Drop the session's KV cache; True if it was held."""
        return self.sessions.end(session)

    async def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "generated": self.generated, "drafted": self.drafted,
                "device": str(self._device), "use_cache": self.use_cache, **self.sessions.stats()}
