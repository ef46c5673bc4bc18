"""The Verifier actor: checks outputs, and verifies drafted tokens with a target model."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..actors import Actor, ConfigurationError
from ._checks import Check
from ._errors import StageInputError
from ._sampling import Mode
from ._torchutil import build_model, check_model_args, resolve_device, set_threads

if TYPE_CHECKING:
    from ._decoder import SessionCache


class Verifier(Actor):
    """Decides whether an output stands.

    - ``check``: a Check (ConfidenceCheck, AgreementCheck, PredicateCheck or your own object
      with ``check(x) -> Verdict``) behind the ``check`` handler, which answers the verdict's
      wire dict ``{"verdict", "value", "score", "reason"}``.
    - ``model`` / ``factory``: a target model following the decoder protocol, behind
      ``verify(prefix, drafted, q=None, mode="greedy", temperature=1.0, top_k=None,
      seed=None) -> {"accepted": n, "tokens": [...]}``: the drafted tokens are scored in one
      forward pass and accepted by rejection sampling (``mode="sample"``, q rows needed) or
      by argmax (``"greedy"``); ``tokens`` are the accepted ones plus the target's own next
      token. With ``session=`` (a string the driver picks per generation) the target's KV
      cache is kept across rounds of that session: a round runs only the positions the cache
      lacks (the previous round's last token and the drafted ones) and the cache is rolled
      back to the accepted length. At most ``max_sessions`` are kept (least recently used
      evicted first; an evicted session re-scores its prefix once); models that keep no
      cache re-score the whole prefix. ``end_session(session)`` drops one.

    Give a check, a model, or both. ``device`` and ``threads`` as for ``Expert``.
    """

    def __init__(self, model: Any = None, *, factory: Callable[[], Any] | None = None, check: Check | None = None,
                 device: str = "cpu", threads: int | None = None, max_sessions: int = 64) -> None:
        where = "Verifier"
        if check is not None and not callable(getattr(check, "check", None)):
            raise ConfigurationError(f"{where}: check must have a check(x) method returning a Verdict, got {check!r}")
        if model is None and factory is None:
            if check is None:
                raise ConfigurationError(f"{where}: give a check=, a model= (or factory=), or both")
            self.model: Any = None
            self._device_name = device
        else:
            check_model_args(model, factory, where)
            dev = resolve_device(device, where)
            set_threads(threads, where)
            self.model = build_model(model, factory, dev, where)
            self._device_name = str(dev)
        self._check = check
        self.sessions: SessionCache | None = None
        if self.model is not None:
            from ._decoder import SessionCache

            self.sessions = SessionCache(self.model, max_sessions, where=where)
        self.checked: dict[str, int] = {"accept": 0, "reject": 0, "abstain": 0}
        self.rounds = 0
        self.drafted = 0
        self.accepted = 0

    async def check(self, x: Any) -> dict[str, Any]:
        """The check's verdict on ``x``, as a wire dict."""
        if self._check is None:
            raise StageInputError("Verifier.check: this verifier has no check; spawn it with check=")
        verdict = self._check.check(x)
        self.checked[verdict.kind] += 1
        return verdict.to_wire()

    async def verify(self, prefix: Any, drafted: Any, q: Any = None, mode: Mode = "greedy",
                     temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                     session: str | None = None) -> dict[str, Any]:
        """One speculative round: how many drafted tokens stand, and the tokens emitted."""
        if self.model is None or self.sessions is None:
            raise StageInputError("Verifier.verify: this verifier has no target model; spawn it with model= or "
                                  "factory=")
        from ._speculative import verify_drafted

        kv = None if session is None else self.sessions.get(session)
        v = verify_drafted(self.model, prefix, drafted, q, mode=mode, temperature=temperature, top_k=top_k,
                           seed=seed, session=kv)
        self.rounds += 1
        self.drafted += len(drafted)
        self.accepted += v.accepted
        return v.as_dict()

    async def end_session(self, session: str) -> bool:
        """Drop the session's KV cache; True if it was held."""
        return self.sessions.end(session) if self.sessions is not None else False

    async def stats(self) -> dict[str, Any]:
        return {"checked": dict(self.checked), "rounds": self.rounds, "drafted": self.drafted,
                "accepted": self.accepted, "device": self._device_name,
                **(self.sessions.stats() if self.sessions is not None else {})}
