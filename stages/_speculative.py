"""Speculative decoding: a draft proposes k tokens, the target scores them in one pass.

Sampling (Leviathan et al. 2023, Chen et al. 2023; outside the seed's papers): drafted token
``x_i`` (drawn from ``q_i``) is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``;
at the first rejection the round ends with a token drawn from ``norm(max(0, p_i - q_i))``;
when all k are accepted a bonus token is drawn from ``p_{k+1}``. Every round therefore emits
between 1 and k + 1 tokens, and the output is distributed exactly as the target's own
sampling (tests prove it by enumerating every branch). Greedy: drafted tokens are accepted
while they equal the target's argmax, and the round ends with the target's argmax, so the
output is token for token the target's greedy decoding.

Randomness: round ``r`` of a run with seed ``s`` draws the draft's choices from
``derive_seed(s, "draft", r)`` and the verifier's from ``derive_seed(s, "target", r)``, in
the single-process version and across actors alike, so both give the same tokens.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..actors import ConfigurationError, DeadlineExceeded
from ._decoder import KVSession, as_tokens, draft_tokens, model_device
from ._errors import StageInputError
from ._sampling import Mode, Sampler, TorchSampler, check_sampling, derive_seed, sampling_probs

if TYPE_CHECKING:
    from ..actors import ActorRef

# -- one round's verification -------------------------------------------------------------------------


def score_drafted(model: Callable[..., Any], prefix: Sequence[int], drafted: Sequence[int]) -> torch.Tensor:
    """The target's logits for the k + 1 positions after ``prefix``: row i scores the token
    that follows ``prefix + drafted[:i]``. ONE forward pass over ``prefix + drafted``."""
    tokens = torch.tensor([list(prefix) + list(drafted)], dtype=torch.long, device=model_device(model))
    with torch.no_grad():
        logits, _ = model(tokens, None)
    rows: torch.Tensor = logits[0, len(prefix) - 1:]
    return rows


def accept_reject(p_rows: torch.Tensor, q_rows: torch.Tensor, drafted: Sequence[int],
                  sampler: Sampler) -> tuple[int, int]:
    """Rejection sampling over one round: ``(number of drafted tokens accepted, the token
    that ends the round)``. ``p_rows`` is ``[k + 1, V]`` (the target's distributions),
    ``q_rows`` ``[k, V]`` (the distributions the drafted tokens were drawn from)."""
    k = len(drafted)
    if p_rows.dim() != 2 or p_rows.shape[0] != k + 1:
        raise StageInputError(f"accept_reject: p_rows must be [{k + 1}, V] for {k} drafted tokens, "
                              f"got {tuple(p_rows.shape)}")
    if k and (q_rows.dim() != 2 or tuple(q_rows.shape) != (k, p_rows.shape[1])):
        raise StageInputError(f"accept_reject: q_rows must be [{k}, {p_rows.shape[1]}] (one row per drafted token, "
                              f"the target's vocabulary), got {tuple(q_rows.shape)}")
    p_rows = p_rows.to(torch.float64)
    q_rows = q_rows.to(torch.float64)
    for i, x in enumerate(drafted):
        p, q = float(p_rows[i, x]), float(q_rows[i, x])
        if not q > 0.0:
            raise StageInputError(f"accept_reject: q row {i} gives the drafted token {x} probability {q}; q must "
                                  "be the distribution the token was drawn from")
        ratio = p / q
        if ratio >= 1.0 or (ratio > 0.0 and sampler.bernoulli(ratio)):
            continue
        residual = torch.clamp(p_rows[i] - q_rows[i], min=0.0)
        total = float(residual.sum())
        if not total > 0.0:  # p == q up to rounding: rejection had probability ~0
            residual, total = p_rows[i], float(p_rows[i].sum())
        return i, sampler.categorical(residual / total)
    return k, sampler.categorical(p_rows[k])


def greedy_accept(rows: torch.Tensor, drafted: Sequence[int]) -> tuple[int, int]:
    """Greedy verification: accept drafted tokens while each equals the argmax of its row;
    the round ends with the argmax at the first mismatch (or after the last drafted token)."""
    best = torch.argmax(rows, dim=-1).tolist()
    for i, x in enumerate(drafted):
        if x != best[i]:
            return i, int(best[i])
    return len(drafted), int(best[len(drafted)])


@dataclass(frozen=True)
class Verification:
    """One round's outcome: how many drafted tokens were accepted, and the tokens the round
    emits (those accepted, then the target's own token)."""

    accepted: int
    tokens: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "tokens": list(self.tokens)}


def verify_drafted(model: Callable[..., Any], prefix: Any, drafted: Any, q_rows: Any = None, *,
                   mode: Mode = "greedy", temperature: float = 1.0, top_k: int | None = None,
                   seed: int | None = None, sampler: Sampler | None = None,
                   session: KVSession | None = None) -> Verification:
    """Score ``drafted`` after ``prefix`` with the target ``model`` in one pass and accept by
    rejection sampling (``mode="sample"``, needs ``q_rows``) or by argmax (``"greedy"``).

    With ``session`` (a KVSession over ``model``, kept across rounds) the pass runs only the
    positions the session's cache lacks: after the previous round, the last token of
    ``prefix`` (the one the target itself emitted) and the drafted tokens. The cache is then
    rolled back to ``prefix`` plus the accepted drafted tokens."""
    where = "verify"
    check_sampling(mode, temperature, top_k, seed, where)
    vocab = getattr(model, "vocab", None)
    prefix_ids = as_tokens(prefix, where, vocab=vocab)
    drafted_ids = as_tokens(drafted, where, vocab=vocab, allow_empty=True)
    if session is not None:
        logits = session.score(prefix_ids[:-1], prefix_ids[-1:] + drafted_ids)
    else:
        logits = score_drafted(model, prefix_ids, drafted_ids)
    if mode == "greedy":
        n, nxt = greedy_accept(logits, drafted_ids)
    else:
        if drafted_ids and q_rows is None:
            raise StageInputError("verify: sampling verification needs q_rows, the distributions the drafted "
                                  "tokens were drawn from")
        q = torch.zeros((0, logits.shape[-1]), dtype=torch.float64) if not drafted_ids else q_rows
        if not isinstance(q, torch.Tensor):
            q = torch.as_tensor(q, dtype=torch.float64)
        p = sampling_probs(logits, temperature, top_k)
        n, nxt = accept_reject(p, q, drafted_ids, sampler if sampler is not None else TorchSampler(seed))
    if session is not None:
        session.rollback(len(prefix_ids) + n)
    return Verification(n, drafted_ids[:n] + [nxt])


# -- statistics ------------------------------------------------------------------------------------------


@dataclass
class SpeculativeStats:
    """Acceptance counts of a speculative run. Position i (1..k) was *offered* in a round when
    the draft proposed it and every earlier position was accepted; ``position_rates[i-1]``
    is accepted / offered there (None if never offered)."""

    k: int
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    offered_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.offered_at:
            self.offered_at = [0] * self.k
            self.accepted_at = [0] * self.k

    def add_round(self, drafted: int, accepted: int, emitted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += emitted
        for i in range(min(accepted + 1, drafted)):
            self.offered_at[i] += 1
        for i in range(accepted):
            self.accepted_at[i] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted over the whole run (alpha)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def position_rates(self) -> list[float | None]:
        return [a / o if o else None for a, o in zip(self.accepted_at, self.offered_at)]

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "emitted": self.emitted, "acceptance_rate": self.acceptance_rate,
                "offered_at": list(self.offered_at), "accepted_at": list(self.accepted_at),
                "position_rates": self.position_rates, "tokens_per_round": self.tokens_per_round}


@dataclass(frozen=True)
class SpeculativeResult:
    """The tokens generated after the prompt, and the run's acceptance statistics."""

    tokens: list[int]
    stats: SpeculativeStats


def _check_run(max_new: Any, k: Any, mode: Any, temperature: Any, top_k: Any, seed: Any, max_rounds: Any,
               where: str) -> None:
    check_sampling(mode, temperature, top_k, seed, where)
    if max_rounds is not None and (isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1):
        raise ConfigurationError(f"{where}: max_rounds must be None or an integer >= 1, got {max_rounds!r}")
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ConfigurationError(f"{where}: max_new must be an integer >= 0, got {max_new!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(f"{where}: k (tokens drafted per round) must be an integer >= 1, got {k!r}")


def _emit(out: list[int], new: list[int], eos: int | None, max_new: int) -> bool:
    """Append a round's tokens; True when the run is done (eos, or max_new reached)."""
    for tok in new:
        out.append(tok)
        if tok == eos or len(out) >= max_new:
            return True
    return False


# -- single process -----------------------------------------------------------------------------------------


def speculative_decode(draft_model: Callable[..., Any], target_model: Callable[..., Any], prompt: Any,
                       max_new: int, k: int, *, mode: Mode = "greedy", temperature: float = 1.0,
                       top_k: int | None = None, seed: int | None = None, eos: int | None = None,
                       use_cache: bool = True, max_rounds: int | None = None,
                       samplers: Callable[[int], tuple[Sampler, Sampler]] | None = None) -> SpeculativeResult:
    """Speculative decoding in this process: the same rounds, seeds and statistics as
    ``speculative_generate`` over actors. ``max_rounds`` stops after that many rounds
    (fewer than ``max_new`` tokens may come back). ``samplers(round) -> (draft_sampler,
    target_sampler)`` replaces the seeded ones (tests use it to enumerate every branch).
    ``use_cache`` carries both models' KV caches across rounds (KVSession), as the actors
    do with a session; False re-scores the whole prefix on both sides every round."""
    where = "speculative_decode"
    _check_run(max_new, k, mode, temperature, top_k, seed, max_rounds, where)
    seq = as_tokens(prompt, where, vocab=getattr(target_model, "vocab", None))
    draft_kv = KVSession(draft_model) if use_cache else None
    target_kv = KVSession(target_model) if use_cache else None
    base = secrets.randbits(63) if seed is None else seed
    stats = SpeculativeStats(k)
    out: list[int] = []
    r = 0
    while len(out) < max_new:
        k_eff = min(k, max_new - len(out) - 1)
        if samplers is not None:
            ds, ts = samplers(r)
        else:
            ds, ts = TorchSampler(derive_seed(base, "draft", r)), TorchSampler(derive_seed(base, "target", r))
        drafted, q = draft_tokens(draft_model, seq, k_eff, mode=mode, temperature=temperature, top_k=top_k,
                                  sampler=ds, eos=eos, use_cache=use_cache, session=draft_kv) if k_eff else ([], None)
        v = verify_drafted(target_model, seq, drafted, q, mode=mode, temperature=temperature, top_k=top_k,
                           sampler=ts, session=target_kv)
        stats.add_round(len(drafted), v.accepted, len(v.tokens))
        done = _emit(out, v.tokens, eos, max_new)
        seq = seq + v.tokens
        r += 1
        if done or r == max_rounds:
            break
    return SpeculativeResult(out, stats)


# -- across actors ---------------------------------------------------------------------------------------------


async def speculative_generate(draft_ref: ActorRef, target_ref: ActorRef, prompt: Any, max_new: int, k: int, *,
                               mode: Mode = "greedy", temperature: float = 1.0, top_k: int | None = None,
                               seed: int | None = None, eos: int | None = None, max_rounds: int | None = None,
                               timeout: float | None = None, cache: bool = True) -> SpeculativeResult:
    """Speculative decoding over two actors: ``draft_ref`` a ``Decoder`` (its ``draft``
    handler) and ``target_ref`` a ``Verifier`` with the target model (its ``verify``
    handler). Each round is one ask to each (the draft is skipped when no token is left to
    draft). ``max_rounds`` as in ``speculative_decode``. ``timeout`` bounds the whole run
    (DeadlineExceeded); without it each ask has the system's default timeout. Greedy rounds
    send no q rows.

    ``cache=True`` opens a generation session on both actors (a fresh id per run, passed as
    ``session=``): each keeps its KV cache across rounds, so the target scores only its last
    emitted token and the k drafted ones per round, and both roll back to the accepted
    length on rejection. The sessions are ended (``end_session``) when the run ends, however
    it ends. ``cache=False`` re-scores the whole prefix on both sides every round. Both
    give the same tokens for the same seed (up to floating-point ties)."""
    where = "speculative_generate"
    _check_run(max_new, k, mode, temperature, top_k, seed, max_rounds, where)
    seq = as_tokens(prompt, where)
    deadline = None if timeout is None else time.time() + timeout
    base = secrets.randbits(63) if seed is None else seed
    stats = SpeculativeStats(k)
    out: list[int] = []
    r = 0
    sid = f"spec-{secrets.token_hex(8)}" if cache else None
    opts: dict[str, Any] = {} if sid is None else {"session": sid}

    def left() -> float | None:
        if deadline is None:
            return None
        remaining = deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded(f"{where}: the run's timeout of {timeout} s passed after {len(out)} tokens")
        return remaining

    try:
        while len(out) < max_new:
            k_eff = min(k, max_new - len(out) - 1)
            drafted: list[int] = []
            q: Any = None
            if k_eff:
                proposal = await draft_ref.ask("draft", seq, k_eff, mode, temperature, top_k,
                                               derive_seed(base, "draft", r), eos, mode == "sample", timeout=left(),
                                               **opts)
                drafted, q = list(proposal["tokens"]), proposal["q"]
            v = await target_ref.ask("verify", seq, drafted, q, mode, temperature, top_k,
                                     derive_seed(base, "target", r), timeout=left(), **opts)
            n, tokens = int(v["accepted"]), [int(t) for t in v["tokens"]]
            stats.add_round(len(drafted), n, len(tokens))
            done = _emit(out, tokens, eos, max_new)
            seq = seq + tokens
            r += 1
            if done or r == max_rounds:
                break
    finally:
        if sid is not None:
            await _end_sessions((draft_ref, target_ref), sid)
    return SpeculativeResult(out, stats)


async def _end_sessions(refs: Sequence[ActorRef], sid: str) -> None:
    """Tell each actor to drop the session (one way; a failure only leaves it to LRU eviction)."""
    for ref in refs:
        try:
            await ref.tell("end_session", sid, timeout=1.0)
        except Exception:  # noqa: BLE001 - best effort: the actor's LRU bound still holds
            pass


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): tokens per round when each drafted token is accepted
    independently with probability alpha (Leviathan et al. 2023)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - math.pow(alpha, k + 1)) / (1.0 - alpha)
