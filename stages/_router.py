"""The Router actor: a policy (and an optional scorer) behind ``route``, with recording."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..actors import Actor, ConfigurationError
from ._errors import RoutingError, StageInputError
from ._policies import Decision, Policy
from ._recorder import Recorder, to_jsonable


class Router(Actor):
    """Routes items with a policy: ``route(item) -> [[edge, weight], ...]``.

    - ``policy``: a ``Policy`` (ConfidenceThreshold, Window, TopK, ContentKey, LeastLoaded or
      your own object with ``edges`` and ``decide``).
    - ``scorer``: optional callable (sync or async) turning an item into what the policy
      decides on (class probabilities, gate logits, a key). Without it the item is the input.
    - ``edges``: the downstream edges the router is wired to. Every edge the policy can
      choose must be among them (else ConfigurationError), and overrides are checked against
      them. Defaults to the policy's edges.
    - ``record``: keep every decision (input, chosen edges, time, sequence number) in memory
      (the last ``keep``); ``record_path`` also appends them to a JSONL file.

    Handlers: ``route``, ``gate`` (top-k policies: choices and gate probabilities),
    ``release`` (least-loaded policies: a routed request finished), ``records``,
    ``annotate`` (add a label or correctness to a record for tuning), ``stats``.
    """

    def __init__(self, policy: Policy, scorer: Callable[[Any], Any] | None = None, *,
                 edges: Sequence[str] | None = None, record: bool = False,
                 record_path: str | os.PathLike[str] | None = None, keep: int | None = 100_000) -> None:
        if not (callable(getattr(policy, "decide", None)) and hasattr(policy, "edges")):
            raise ConfigurationError(f"Router: policy must have edges and decide(x), got {policy!r}")
        if scorer is not None and not callable(scorer):
            raise ConfigurationError(f"Router: scorer must be callable, got {scorer!r}")
        policy_edges = tuple(policy.edges)
        if edges is None:
            known = policy_edges
        else:
            if isinstance(edges, str):
                raise ConfigurationError(f"Router: edges must be a sequence of names, not one string {edges!r}")
            known = tuple(edges)
            unknown = [e for e in policy_edges if e not in known]
            if unknown:
                raise ConfigurationError(f"Router: the policy {policy!r} can choose {unknown}, which are not among "
                                         f"the router's edges {list(known)}: add them to edges= or fix the policy")
        self.policy = policy
        self.scorer = scorer
        self.edges = known
        self._known = frozenset(known)
        self.recorder = Recorder(record_path, keep=keep) if (record or record_path is not None) else None
        self.decisions = 0
        self.overrides = 0
        self.chosen: dict[str, int] = dict.fromkeys(known, 0)
        self.weight: dict[str, float] = dict.fromkeys(known, 0.0)
        self._seq = 0

    async def on_stop(self) -> None:
        if self.recorder is not None:
            self.recorder.close()

    async def _score(self, item: Any) -> Any:
        if self.scorer is None:
            return item
        out = self.scorer(item)
        if inspect.isawaitable(out):
            out = await out
        return out

    def _check(self, decision: Any, what: str) -> Decision:
        out: Decision = []
        if not isinstance(decision, (list, tuple)):
            raise RoutingError(f"Router: {what} must be a list of [edge, weight] pairs, got {decision!r}")
        for pair in decision:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise RoutingError(f"Router: {what} must be a list of [edge, weight] pairs, got {pair!r}")
            edge, weight = pair
            if edge not in self._known:
                raise RoutingError(f"Router: {what} names edge {edge!r}, which the router does not have; its edges "
                                   f"are {list(self.edges)}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise RoutingError(f"Router: {what} gives edge {edge!r} the weight {weight!r}, not a number")
            out.append((str(edge), float(weight)))
        return out

    def _note(self, scores: Any, decision: Decision, override: bool, note: dict[str, Any] | None,
              extra: dict[str, Any] | None = None) -> int:
        seq = self._seq
        self._seq += 1
        self.decisions += 1
        self.overrides += override
        for edge, w in decision:
            self.chosen[edge] += 1
            self.weight[edge] += w
        if self.recorder is not None:
            rec: dict[str, Any] = {"seq": seq, "time": time.time(), "input": to_jsonable(scores),
                                   "decision": [[e, w] for e, w in decision], "override": override}
            if extra:
                rec.update(extra)
            if note:
                rec.update(to_jsonable(note))
            self.recorder.append(rec)
        return seq

    async def route(self, item: Any, override: Sequence[Sequence[Any]] | None = None,
                    note: dict[str, Any] | None = None) -> list[list[Any]]:
        """Decide where ``item`` goes: ``[[edge, weight], ...]`` (possibly empty).

        ``override`` replaces the policy's decision (replays, tests, manual routing); it is
        checked against the router's edges and recorded as an override. ``note`` adds fields
        to the record (e.g. ``{"label": 3}``)."""
        _check_note(note, "Router.route")
        scores = await self._score(item)
        if override is not None:
            decision = self._check(override, "the override")
        else:
            decision = self._check(self.policy.decide(scores), f"the decision of {self.policy!r}")
        self._note(scores, decision, override is not None, note)
        return [[e, w] for e, w in decision]

    async def gate(self, item: Any, note: dict[str, Any] | None = None) -> dict[str, Any]:
        """For a top-k policy: ``{"choices": [[expert, weight], ...], "probs": [...]}``."""
        gate_fn = getattr(self.policy, "gate", None)
        if not callable(gate_fn):
            raise StageInputError(f"Router.gate: the policy {self.policy!r} has no gate(); use route")
        _check_note(note, "Router.gate")
        scores = await self._score(item)
        g = gate_fn(scores)
        decision = self._check(g.choices, f"the decision of {self.policy!r}")
        self._note(scores, decision, False, note, {"probs": list(g.probs)})
        return {"choices": [[e, w] for e, w in decision], "probs": list(g.probs)}

    async def release(self, edge: str) -> None:
        """Tell a least-loaded policy that a request routed to ``edge`` finished."""
        release = getattr(self.policy, "release", None)
        if not callable(release):
            raise StageInputError(f"Router.release: the policy {self.policy!r} does not track load")
        release(edge)

    async def records(self, last: int | None = None) -> list[dict[str, Any]]:
        """The recorded decisions held in memory (the last ``last`` of them)."""
        if self.recorder is None:
            raise StageInputError("Router.records: this router does not record; spawn it with record=True")
        recs = self.recorder.records
        return recs if last is None else recs[-last:] if last > 0 else []

    async def annotate(self, seq: int, fields: dict[str, Any]) -> bool:
        """Add fields (``label``, ``correct``) to record ``seq``; False when no longer held."""
        if self.recorder is None:
            raise StageInputError("Router.annotate: this router does not record; spawn it with record=True")
        if not isinstance(fields, dict):
            raise StageInputError(f"Router.annotate: fields must be a dict, got {fields!r}")
        return self.recorder.update(seq, to_jsonable(fields))

    async def stats(self) -> dict[str, Any]:
        """Decisions made, overrides, and per edge: times chosen and summed weight."""
        out: dict[str, Any] = {"decisions": self.decisions, "overrides": self.overrides,
                               "chosen": dict(self.chosen), "weight": dict(self.weight),
                               "recorded": 0 if self.recorder is None else self.recorder.count}
        load = getattr(self.policy, "load", None)
        if callable(load):
            out["in_flight"] = load()
        return out


def _check_note(note: Any, where: str) -> None:
    if note is not None and not isinstance(note, dict):
        raise StageInputError(f"{where}: note must be a dict of fields to record, got {note!r}")
