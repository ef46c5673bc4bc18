"""Verdicts and the checks that give them: confidence, agreement, any predicate.

A check returns one of three verdicts:

- ``Accept``: the output stands (a cascade stops here);
- ``Reject``: it does not (a cascade escalates, a loop retries);
- ``Abstain``: the check cannot tell (too uncertain, outputs split); what to do is the
  flow's choice (answer "don't know", escalate, ask a human).

Each verdict carries the ``value`` it is about (the predicted class, the agreed answer), a
``score`` (confidence, agreement fraction) and a ``reason``. On the wire a verdict is the
dict ``{"verdict": "accept" | "reject" | "abstain", "value": ..., "score": ..., "reason": ...}``
(``Verdict.to_wire`` / ``verdict_from_wire``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from ..actors import ConfigurationError
from ._errors import StageInputError
from ._policies import as_probs, as_scores

VerdictKind = Literal["accept", "reject", "abstain"]


@dataclass(frozen=True)
class Verdict:
    """Base of Accept, Reject and Abstain."""

    value: Any = None
    score: float | None = None
    reason: str = ""
    kind: ClassVar[VerdictKind]

    @property
    def accepted(self) -> bool:
        return self.kind == "accept"

    def to_wire(self) -> dict[str, Any]:
        return {"verdict": self.kind, "value": self.value, "score": self.score, "reason": self.reason}


@dataclass(frozen=True)
class Accept(Verdict):
    kind: ClassVar[VerdictKind] = "accept"


@dataclass(frozen=True)
class Reject(Verdict):
    kind: ClassVar[VerdictKind] = "reject"


@dataclass(frozen=True)
class Abstain(Verdict):
    kind: ClassVar[VerdictKind] = "abstain"


_KINDS: dict[str, type[Verdict]] = {"accept": Accept, "reject": Reject, "abstain": Abstain}


def verdict_from_wire(d: Any) -> Verdict:
    """The Verdict a ``to_wire`` dict stands for."""
    if not isinstance(d, dict) or d.get("verdict") not in _KINDS:
        raise StageInputError(f"verdict_from_wire: expected a dict with 'verdict' of accept/reject/abstain, got {d!r}")
    score = d.get("score")
    return _KINDS[d["verdict"]](d.get("value"), None if score is None else float(score), str(d.get("reason", "")))


class Check(Protocol):
    """What a Verifier needs from a check."""

    def check(self, x: Any) -> Verdict: ...


def _argmax(probs: list[float]) -> int:
    return max(range(len(probs)), key=lambda i: (probs[i], -i))


class ConfidenceCheck:
    """Accept when the largest class probability reaches ``threshold``.

    Below it: Reject, or Abstain when ``abstain_below`` is given and the confidence is under
    that too. ``value`` is the predicted class index, ``score`` the confidence. A scalar
    input is a confidence itself."""

    def __init__(self, threshold: float, *, abstain_below: float | None = None) -> None:
        for name, v in (("threshold", threshold), ("abstain_below", abstain_below)):
            if v is None and name == "abstain_below":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ConfigurationError(f"ConfidenceCheck: {name} must be a number in [0, 1], got {v!r}")
        if abstain_below is not None and abstain_below > threshold:
            raise ConfigurationError(f"ConfidenceCheck: abstain_below ({abstain_below}) must not exceed threshold "
                                     f"({threshold})")
        self.threshold = float(threshold)
        self.abstain_below = None if abstain_below is None else float(abstain_below)

    def check(self, x: Any) -> Verdict:
        s = as_scores(x, "ConfidenceCheck.check")
        if isinstance(s, float):
            if not 0.0 <= s <= 1.0:
                raise StageInputError(f"ConfidenceCheck.check: a scalar confidence must be in [0, 1], got {s}")
            value, conf = None, s
        else:
            probs = as_probs(s, "ConfidenceCheck.check")
            value = _argmax(probs)
            conf = probs[value]
        if conf >= self.threshold:
            return Accept(value, conf, f"confidence {conf:.4g} >= {self.threshold:.4g}")
        if self.abstain_below is not None and conf < self.abstain_below:
            return Abstain(value, conf, f"confidence {conf:.4g} < {self.abstain_below:.4g}")
        return Reject(value, conf, f"confidence {conf:.4g} < {self.threshold:.4g}")

    def __repr__(self) -> str:
        return f"ConfidenceCheck({self.threshold!r}, abstain_below={self.abstain_below!r})"


def _freeze(x: Any) -> Any:
    if hasattr(x, "tolist") and callable(x.tolist):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in x.items()))
    return x


class AgreementCheck:
    """Accept when at least ``quorum`` of the outputs agree (default: all of them).

    ``compare="exact"`` compares outputs as values (tensors and arrays by their elements,
    tuples like lists); ``"argmax"`` compares probability vectors by their predicted class.
    ``key`` maps each output to what is compared instead. ``value`` is the most common answer
    and ``score`` the fraction that gave it. Without a quorum: Abstain (default) or Reject
    (``on_disagree="reject"``)."""

    def __init__(self, quorum: int | None = None, *, compare: Literal["exact", "argmax"] = "exact",
                 key: Callable[[Any], Any] | None = None,
                 on_disagree: Literal["abstain", "reject"] = "abstain") -> None:
        if quorum is not None and (isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 2):
            raise ConfigurationError(f"AgreementCheck: quorum must be an integer >= 2 or None (all), got {quorum!r}")
        if compare not in ("exact", "argmax"):
            raise ConfigurationError(f"AgreementCheck: compare must be 'exact' or 'argmax', got {compare!r}")
        if on_disagree not in ("abstain", "reject"):
            raise ConfigurationError(f"AgreementCheck: on_disagree must be 'abstain' or 'reject', got {on_disagree!r}")
        if key is not None and not callable(key):
            raise ConfigurationError(f"AgreementCheck: key must be callable, got {key!r}")
        self.quorum = quorum
        self.compare = compare
        self.key = key
        self.on_disagree = on_disagree

    def _answer(self, x: Any, i: int) -> Any:
        if self.key is not None:
            x = self.key(x)
        if self.compare == "argmax":
            return _argmax(as_probs(x, f"AgreementCheck.check (output {i})"))
        return _freeze(x)

    def check(self, outputs: Any) -> Verdict:
        if not isinstance(outputs, (list, tuple)) or len(outputs) < 2:
            raise StageInputError("AgreementCheck.check: give a list of at least two outputs to compare")
        need = len(outputs) if self.quorum is None else self.quorum
        if need > len(outputs):
            raise StageInputError(f"AgreementCheck.check: quorum {need} but only {len(outputs)} outputs")
        answers = [self._answer(x, i) for i, x in enumerate(outputs)]
        counts: dict[Any, int] = {}
        for a in answers:
            counts[a] = counts.get(a, 0) + 1
        best = max(counts, key=lambda a: counts[a])
        agree = counts[best]
        first = outputs[answers.index(best)]
        value = best if self.compare == "argmax" else (self.key(first) if self.key is not None else first)
        score = agree / len(outputs)
        if agree >= need:
            return Accept(value, score, f"{agree} of {len(outputs)} outputs agree")
        kind = Abstain if self.on_disagree == "abstain" else Reject
        return kind(value, score, f"only {agree} of {len(outputs)} outputs agree; {need} needed")

    def __repr__(self) -> str:
        return f"AgreementCheck({self.quorum!r}, compare={self.compare!r})"


class PredicateCheck:
    """Any test as a check: ``fn(x)`` returns True (Accept), False (Reject), None (Abstain)
    or a Verdict (used as is). The verdict's value is ``x``."""

    def __init__(self, fn: Callable[[Any], Any], *, name: str | None = None) -> None:
        if not callable(fn):
            raise ConfigurationError(f"PredicateCheck: fn must be callable, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "predicate")

    def check(self, x: Any) -> Verdict:
        out = self.fn(x)
        if isinstance(out, Verdict):
            return out
        if out is None:
            return Abstain(x, None, f"{self.name} abstained")
        if isinstance(out, bool) or (hasattr(out, "__bool__") and type(out).__name__ in ("bool_", "Tensor")):
            return (Accept if bool(out) else Reject)(x, None, f"{self.name} returned {bool(out)}")
        raise StageInputError(f"PredicateCheck: {self.name} returned {type(out).__name__}; it must return a bool, "
                              "None (abstain) or a Verdict")

    def __repr__(self) -> str:
        return f"PredicateCheck({self.name})"
