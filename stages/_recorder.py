"""Recording router decisions, replaying them under another policy, and tuning thresholds.

A record is a JSON-able dict::

    {"seq": 7, "time": 1700000000.1, "input": [0.1, 0.9], "decision": [["accept", 1.0]],
     "override": false, ...}

``input`` is what the policy saw (the scorer's output when the router has one). Fields added
later, by ``Router.route(..., note={...})`` or ``Router.annotate(seq, {...})``, sit beside
them: ``label`` (the true class) or ``correct`` (whether this tier's answer was right) is what
``tune_threshold`` needs.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from ..actors import ConfigurationError
from ._errors import StageInputError
from ._policies import ConfidenceThreshold, Decision, Policy, as_scores


def to_jsonable(x: Any) -> Any:
    """A JSON-able form of a policy input: tensors and arrays as lists, bytes as
    ``{"$bytes": hex}``, tuples as lists; anything else as its repr under ``{"$repr": ...}``."""
    if hasattr(x, "tolist") and callable(x.tolist):
        return x.tolist()
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"$repr": repr(x)}
    if isinstance(x, (bytes, bytearray, memoryview)):
        return {"$bytes": bytes(x).hex()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    return {"$repr": repr(x)}


def from_jsonable(x: Any) -> Any:
    """Undo ``to_jsonable`` for bytes (reprs stay dicts: they cannot be rebuilt)."""
    if isinstance(x, dict):
        if set(x) == {"$bytes"}:
            return bytes.fromhex(x["$bytes"])
        return {k: from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_jsonable(v) for v in x]
    return x


class Recorder:
    """Keeps router records in memory (the last ``keep``; None keeps all) and, with
    ``path``, appends each as one JSON line to that file (flushed per record, so a crash
    loses at most the line being written)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, keep: int | None = 100_000) -> None:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ConfigurationError(f"Recorder: keep must be a count >= 0 or None, got {keep!r}")
        self.path = None if path is None else os.fspath(path)
        self._records: deque[dict[str, Any]] = deque(maxlen=keep)
        self._file: IO[str] | None = None
        self.count = 0
        if self.path is not None:
            try:
                self._file = open(self.path, "a", encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(f"Recorder: cannot open {self.path!r} for appending: {exc}") from exc

    def append(self, record: dict[str, Any]) -> None:
        self._records.append(record)
        self.count += 1
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
            self._file.flush()

    def update(self, seq: int, fields: dict[str, Any]) -> bool:
        """Add fields to the record ``seq`` still held in memory (and append the update to
        the file as ``{"seq": .., "update": {..}}``). False when it is no longer held."""
        for rec in reversed(self._records):
            if rec.get("seq") == seq:
                rec.update(fields)
                if self._file is not None:
                    self._file.write(json.dumps({"seq": seq, "update": fields}, separators=(",", ":"),
                                                allow_nan=False) + "\n")
                    self._file.flush()
                return True
        return False

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def load(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """Read a JSONL file written by a Recorder, applying updates to their records."""
        out: list[dict[str, Any]] = []
        by_seq: dict[Any, dict[str, Any]] = {}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise StageInputError(f"Recorder.load: {os.fspath(path)!r} line {n} is not JSON: {exc}") from exc
                if "update" in rec and set(rec) == {"seq", "update"}:
                    target = by_seq.get(rec["seq"])
                    if target is not None:
                        target.update(rec["update"])
                    continue
                rec["input"] = from_jsonable(rec.get("input"))
                by_seq[rec.get("seq")] = rec
                out.append(rec)
        return out


# -- replay --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """What a policy decides on recorded inputs: one decision per record, how often each edge
    was chosen, and how many decisions differ (as sets of edges) from the recorded ones."""

    decisions: list[Decision]
    counts: dict[str, int]
    changed: int


def replay(records: Iterable[dict[str, Any]], policy: Policy) -> Replay:
    """Run ``policy`` over the inputs of recorded decisions (offline; nothing is routed)."""
    decisions: list[Decision] = []
    counts: dict[str, int] = {}
    changed = 0
    for i, rec in enumerate(records):
        if "input" not in rec:
            raise StageInputError(f"replay: record {i} has no 'input'")
        decision = policy.decide(rec["input"])
        decisions.append(decision)
        for edge, _ in decision:
            counts[edge] = counts.get(edge, 0) + 1
        before = {str(e[0]) for e in rec.get("decision", [])}
        if before != {edge for edge, _ in decision}:
            changed += 1
    return Replay(decisions, counts, changed)


# -- threshold tuning ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold with the largest coverage whose risk meets the target.

    ``threshold`` is None when no threshold does (then nothing should be accepted);
    ``coverage`` is the fraction of records accepted, ``risk`` the error rate among them."""

    threshold: float | None
    coverage: float
    risk: float
    accepted: int
    total: int


def _correct(rec: dict[str, Any], scores: list[float] | float, i: int) -> bool:
    if "correct" in rec:
        return bool(rec["correct"])
    if "label" in rec:
        if isinstance(scores, float):
            raise StageInputError(f"tune_threshold: record {i} has a scalar input, so a 'label' cannot be "
                                  "checked against it: record 'correct' instead")
        best = max(range(len(scores)), key=lambda j: (scores[j], -j))
        return bool(best == rec["label"])
    raise StageInputError(f"tune_threshold: record {i} has neither 'correct' nor 'label': annotate records "
                          "(Router.annotate or note=) before tuning")


def tune_threshold(records: Sequence[dict[str, Any]], target_risk: float, *,
                   score: Callable[[Any], float] | None = None) -> ThresholdChoice:
    """Pick the confidence threshold that meets ``target_risk`` (error rate among accepted
    records) with the largest coverage. Accepting means ``score(input) >= threshold``.

    ``score`` defaults to the confidence ``ConfidenceThreshold`` uses (the largest
    probability, or a scalar confidence as is). For a ``Window`` policy pass
    ``score=Window(0).distance`` and use the result as the window's width. Each record needs
    ``correct`` (bool) or ``label`` (the true class index, compared with the argmax)."""
    if isinstance(target_risk, bool) or not isinstance(target_risk, (int, float)) or not 0.0 <= target_risk <= 1.0:
        raise ConfigurationError(f"tune_threshold: target_risk must be in [0, 1], got {target_risk!r}")
    if not records:
        raise StageInputError("tune_threshold: no records")
    conf_of = score if score is not None else ConfidenceThreshold(0.0).confidence
    rows: list[tuple[float, bool]] = []
    for i, rec in enumerate(records):
        if "input" not in rec:
            raise StageInputError(f"tune_threshold: record {i} has no 'input'")
        scores = as_scores(rec["input"], f"tune_threshold (record {i})")
        rows.append((float(conf_of(rec["input"])), _correct(rec, scores, i)))
    rows.sort(key=lambda r: -r[0])
    total = len(rows)
    best = ThresholdChoice(None, 0.0, 0.0, 0, total)
    accepted = errors = 0
    i = 0
    while i < total:
        t = rows[i][0]
        while i < total and rows[i][0] == t:  # equal scores are accepted together
            accepted += 1
            errors += not rows[i][1]
            i += 1
        risk = errors / accepted
        if risk <= target_risk:
            best = ThresholdChoice(t, accepted / total, risk, accepted, total)
    return best
