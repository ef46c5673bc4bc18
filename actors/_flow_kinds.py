"""The flow kinds: Sequential, Route, FanOut, LoopUntil, Cascade. Each is a Flow (an actor);
see FLOWS.md beside this file for the picture and the topology format."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from ._context import context, current_context
from ._errors import ConfigurationError
from ._flow_base import Flow
from ._flow_errors import BudgetExhausted, InvalidDecision, RoundLimitExceeded
from ._flow_metrics import compute_of, rate
from ._flow_step import (
    NO_NEXT,
    Branches,
    StepLike,
    as_step,
    check_label,
    check_weight,
    closing,
    read_verdict,
    weighted_sum,
)

__all__ = ["Cascade", "FanOut", "LoopUntil", "Route", "Sequential"]

OnEmpty = Literal["none", "item", "error"]
OnLimit = Literal["result", "error"]
OnExhausted = Literal["answer", "error"]
OnPartError = Literal["raise", "missing"]


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 200 else text[:197] + "..."


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> Any:
    if value not in allowed:
        raise ConfigurationError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _positive_int(value: Any, where: str, *, none: bool = True) -> int | None:
    if value is None and none:
        return None
    if type(value) is not int or value < 1:
        raise ConfigurationError(f"{where} must be a positive int{' or None' if none else ''}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- sequence


class Sequential(Flow):
    """Steps one after the other: each step's result is the next one's input; ``run``
    answers the last one's.

    ``stream(item)``: when the last step is a ``stream=True`` actor step, its items are passed
    on live as they come (the steps before it run first); otherwise the one result."""

    kind = "sequence"

    def __init__(self, *steps: StepLike, max_depth: int = 16, max_in_flight: int | None = None) -> None:
        super().__init__(max_depth=max_depth, max_in_flight=max_in_flight)
        if not steps:
            raise ConfigurationError("Sequential needs at least one step")
        self._order = [self._add(as_step(s, f"Sequential step {i}").name, s, f"Sequential step {i}")
                       for i, s in enumerate(steps)]

    async def _run(self, item: Any, **options: Any) -> Any:
        if options:
            raise TypeError(f"Sequential.run takes no options, got {sorted(options)}")
        x = item
        for label in self._order:
            x = await self._call(label, x)
        return x

    async def _stream(self, item: Any, **options: Any) -> AsyncIterator[Any]:
        if options:
            raise TypeError(f"Sequential.stream takes no options, got {sorted(options)}")
        x = item
        for label in self._order[:-1]:
            x = await self._call(label, x)
        last = self._order[-1]
        step = self._steps[last]
        if step.stream and step.chain is None:
            async with closing(self._stream_step(last, x)) as items:
                async for y in items:
                    yield y
        else:
            yield await self._call(last, x)


# --------------------------------------------------------------------------- route


class Route(Flow):
    """A router step picks the edges to take; the flow calls them (several at once) and
    combines their results.

    - ``router``: a step answering ``[[edge, weight], ...]`` (zero, one or several pairs); a
      list of edge names (weight 1.0 each), one edge name, or ``{edge: weight}`` work too.
    - ``edges``: ``{name: step}``, the edges the router may pick.
    - ``combine``: ``"weighted_sum"`` (default: ``sum(weight * result)`` over numbers,
      tensors, arrays, and lists or dicts of them; one edge of weight 1.0 passes its result
      through unchanged), ``"list"`` (``[[edge, weight, result], ...]`` in the router's
      order), ``"dict"`` (``{edge: result}``), ``"first"`` (speculative: the first edge to
      answer wins and the others are cancelled at once; an edge that fails loses, and the
      request fails only when every edge failed), or a step (a callable or actor) called
      with the list.
    - ``on_empty``: when the router picks no edge: ``"none"`` (answer None), ``"item"``
      (answer the item unchanged: a skip) or ``"error"`` (InvalidDecision).
    - ``normalize``: divide the weights by their sum first.

    ``run(item, route=None)``: ``route`` overrides the router (replaying a recorded
    decision). ``stream(item, route=None)`` yields ``{"edge", "weight", "result"}`` per
    edge as each finishes (with ``"first"``: the winner's only). When one edge fails, the
    others are cancelled (with ``"first"``: when all failed).
    """

    kind = "route"

    def __init__(self, router: StepLike, edges: Mapping[str, StepLike], *, combine: Any = "weighted_sum",
                 on_empty: OnEmpty = "none", normalize: bool = False, max_depth: int = 16,
                 max_in_flight: int | None = None) -> None:
        super().__init__(max_depth=max_depth, max_in_flight=max_in_flight)
        if not isinstance(edges, Mapping) or not edges:
            raise ConfigurationError(f"Route: edges must be a non-empty {{name: step}} mapping, got {edges!r:.100}")
        self._router = self._add("router", router, "Route router")
        self._edges: dict[str, str] = {}
        for edge, step in edges.items():
            check_label(edge, "Route edges")
            self._edges[edge] = self._add(edge, step, f"Route edge {edge!r}")
        self._combine_mode: str | None = None
        self._combine_label: str | None = None
        if isinstance(combine, str):
            self._combine_mode = _choice(combine, ("weighted_sum", "list", "dict", "first"), "Route: combine")
        else:
            self._combine_label = self._add("combine", combine, "Route combine")
        self.on_empty: OnEmpty = _choice(on_empty, ("none", "item", "error"), "Route: on_empty")
        self.normalize = bool(normalize)
        self._reset_kind_metrics()

    def _reset_kind_metrics(self) -> None:
        self._decisions = 0
        self._overrides = 0
        self._empty = 0
        self._chosen = dict.fromkeys(self._edges, 0)
        self._weight = dict.fromkeys(self._edges, 0.0)
        self._wins = dict.fromkeys(self._edges, 0)
        self._edges_taken = 0

    def _kind_metrics(self) -> dict[str, Any]:
        return {"route": {"decisions": self._decisions, "overrides": self._overrides, "empty": self._empty,
                          "chosen": dict(self._chosen), "weight_sum": dict(self._weight),
                          **({"wins": dict(self._wins)} if self._combine_mode == "first" else {}),
                          "mean_edges": self._edges_taken / self._decisions if self._decisions else None}}

    def _read(self, decision: Any) -> list[tuple[str, float]]:
        def bad(why: str) -> InvalidDecision:
            return InvalidDecision(f"the router answered {_short(decision)}: {why}; a router answers "
                                   f"[[edge, weight], ...] over the edges {sorted(self._edges)}",
                                   path=(self._hop(self._router),), answer=_short(decision))

        if decision is None:
            items: list[Any] = []
        elif isinstance(decision, str):
            items = [decision]
        elif isinstance(decision, Mapping):
            items = [[k, v] for k, v in decision.items()]
        elif isinstance(decision, (list, tuple)):
            items = list(decision)
        else:
            raise bad(f"a {type(decision).__name__} is not a list of edges")
        out: list[tuple[str, float]] = []
        seen: set[str] = set()
        for entry in items:
            if isinstance(entry, str):
                edge, weight = entry, 1.0
            elif isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str):
                edge, w = entry
                checked = check_weight(w)
                if checked is None:
                    raise bad(f"the weight of edge {edge!r} is {w!r}, not a finite number")
                weight = checked
            else:
                raise bad(f"{_short(entry)} is not [edge, weight]")
            if edge not in self._edges:
                raise bad(f"there is no edge {edge!r}")
            if edge in seen:
                raise bad(f"edge {edge!r} is chosen twice")
            seen.add(edge)
            out.append((edge, weight))
        if self.normalize and out:
            total = sum(w for _, w in out)
            if total == 0 or not math.isfinite(total):
                raise bad(f"its weights sum to {total}, which cannot be normalized")
            out = [(e, w / total) for e, w in out]
        return out

    @staticmethod
    def _route_option(options: dict[str, Any]) -> Any:
        route = options.pop("route", None)
        if options:
            raise TypeError(f"Route takes the option route= only, got {sorted(options)}")
        return route

    async def _decide(self, item: Any, route: Any) -> list[tuple[str, float]]:
        if route is None:
            decision = await self._call(self._router, item)
        else:
            self._overrides += 1
            decision = route
        pairs = self._read(decision)
        self._decisions += 1
        self._edges_taken += len(pairs)
        for edge, w in pairs:
            self._chosen[edge] += 1
            self._weight[edge] += w
        return pairs

    async def _run(self, item: Any, **options: Any) -> Any:
        pairs = await self._decide(item, self._route_option(options))
        if not pairs:
            return self._when_empty(item)
        if self._combine_mode == "first":
            return await self._race(pairs, item)
        if len(pairs) == 1:
            results = [await self._call(self._edges[pairs[0][0]], item)]
        else:
            async with Branches[Any]() as branches:
                tasks = [branches.start(self._call(self._edges[edge], item)) for edge, _ in pairs]
                await branches.wait(fail_fast=True)
                for t in tasks:  # the first failure in the router's order wins
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                results = [t.result() for t in tasks]
        return await self._combine(pairs, results)

    async def _race(self, pairs: list[tuple[str, float]], item: Any) -> Any:
        async with Branches[Any]() as branches:
            which = {branches.start(self._call(self._edges[edge], item)): edge for edge, _ in pairs}
            order = list(which)
            while branches.pending:
                done = await branches.wait(first=True)
                for t in sorted(done, key=order.index):
                    if t.exception() is None:
                        self._wins[which[t]] += 1
                        return t.result()  # leaving the block cancels the other edges
            failure = order[0].exception()  # every edge failed: the first one's error, in the router's order
            assert failure is not None
            raise failure

    def _when_empty(self, item: Any) -> Any:
        self._empty += 1
        if self.on_empty == "item":
            return item
        if self.on_empty == "error":
            raise InvalidDecision(f"the router picked no edge and on_empty='error' (edges: {sorted(self._edges)})",
                                  path=(self._hop(self._router),), answer="[]")
        return None

    async def _combine(self, pairs: list[tuple[str, float]], results: list[Any]) -> Any:
        rows = [[edge, w, r] for (edge, w), r in zip(pairs, results)]
        if self._combine_label is not None:
            return await self._call(self._combine_label, rows)
        if self._combine_mode == "list":
            return rows
        if self._combine_mode == "dict":
            return {edge: r for edge, _, r in rows}
        if len(rows) == 1 and rows[0][1] == 1.0:
            return rows[0][2]
        try:
            return weighted_sum([(w, r) for _, w, r in rows])
        except (TypeError, ValueError) as exc:
            raise self._fail_here("combine", exc, "weighted_sum()") from exc

    async def _stream(self, item: Any, **options: Any) -> AsyncIterator[Any]:
        pairs = await self._decide(item, self._route_option(options))
        if not pairs:
            yield self._when_empty(item)
            return
        race = self._combine_mode == "first"
        async with Branches[Any]() as branches:
            which = {branches.start(self._call(self._edges[edge], item)): (edge, w) for edge, w in pairs}
            order = list(which)
            while branches.pending:
                for t in sorted(await branches.wait(first=True), key=order.index):
                    edge, w = which[t]
                    if race:
                        if t.exception() is not None:
                            continue  # a failing edge loses the race
                        self._wins[edge] += 1
                    yield {"edge": edge, "weight": w, "result": t.result()}
                    if race:
                        return  # the winner: leaving the block cancels the others
            if race:
                failure = order[0].exception()
                assert failure is not None
                raise failure


# --------------------------------------------------------------------------- fan-out


class _Part:
    __slots__ = ("no", "index", "data", "worker", "weight", "status", "result", "error")

    def __init__(self, no: int, index: int, data: Any, worker: str, weight: float | None) -> None:
        self.no = no
        self.index = index
        self.data = data
        self.worker = worker
        self.weight = weight
        self.status = "pending"  # -> ok, late, dropped, error
        self.result: Any = None
        self.error: str | None = None


class FanOut(Flow):
    """Split an item into a variable number of parts, send each to a worker (all at once),
    gather the results by index.

    - ``worker``: the step each part goes to, or ``{name: step}`` for several workers (a
      part then names its worker: mixture-of-experts dispatch).
    - ``split``: a step turning the item into parts (None: the item is already the list of
      parts). It answers either a list (part ``i`` has index ``i``), or
      ``{"parts": [{"index": i, "data": x, "worker": name, "weight": w}, ...], "size": n}``
      where several parts may share an index (they are gathered together: a weighted sum
      when they carry weights, else a list) and ``size`` is the number of indices (default:
      the largest index + 1; an index no part names gathers None). ``worker`` and ``weight``
      are optional.
    - ``gather_timeout``: seconds to wait for the parts (None: until they all answer, within
      the request's deadline). A part not back by then is **late**: its call is cancelled
      and its index is marked missing.
    - ``on_error``: ``"raise"`` (a failing part fails the request, the others are cancelled)
      or ``"missing"`` (it is marked missing like a late one).
    - ``capacity``: at most this many parts per worker per request; the parts beyond it are
      **dropped** (never sent) and marked missing. None: dropless.
    - ``max_parallel``: parts in flight at once (None: all).
    - ``combine``: ``"gather"`` (default: the gather record below), ``"results"`` (only its
      ``results`` list), or a step called with the gather record.

    The gather record: ``{"results": [...by index; None where nothing arrived], "missing":
    [indices with a part missing], "expected": [parts per index], "received": [parts per
    index], "complete": bool, "lost": [{"index", "part", "reason": "late" | "dropped" |
    "error", "error"?}]}``.

    ``stream(item)`` yields ``{"index", "part", "result"}`` per part as it arrives, then
    ``{"index", "part", "missing": True, "reason"}`` for each part lost.
    """

    kind = "fanout"

    def __init__(self, worker: StepLike | Mapping[str, StepLike], *, split: StepLike | None = None,
                 gather_timeout: float | None = None, on_error: OnPartError = "raise", capacity: int | None = None,
                 max_parallel: int | None = None, combine: Any = "gather", max_depth: int = 16,
                 max_in_flight: int | None = None) -> None:
        super().__init__(max_depth=max_depth, max_in_flight=max_in_flight)
        self._split = None if split is None else self._add("split", split, "FanOut split")
        self._workers: dict[str, str] = {}
        if isinstance(worker, Mapping):
            if not worker:
                raise ConfigurationError("FanOut: worker must be a step or a non-empty {name: step} mapping")
            for name, step in worker.items():
                check_label(name, "FanOut workers")
                self._workers[name] = self._add(name, step, f"FanOut worker {name!r}")
        else:
            self._workers["worker"] = self._add("worker", worker, "FanOut worker")
        self._default_worker = next(iter(self._workers)) if len(self._workers) == 1 else None
        if gather_timeout is not None and not (isinstance(gather_timeout, (int, float)) and gather_timeout > 0):
            raise ConfigurationError(f"FanOut: gather_timeout must be a positive number of seconds or None, "
                                     f"got {gather_timeout!r}")
        self.gather_timeout = None if gather_timeout is None else float(gather_timeout)
        self.on_error: OnPartError = _choice(on_error, ("raise", "missing"), "FanOut: on_error")
        self.capacity = _positive_int(capacity, "FanOut: capacity")
        self.max_parallel = _positive_int(max_parallel, "FanOut: max_parallel")
        self._combine_mode: str | None = None
        self._combine_label: str | None = None
        if isinstance(combine, str):
            self._combine_mode = _choice(combine, ("gather", "results"), "FanOut: combine")
        else:
            self._combine_label = self._add("combine", combine, "FanOut combine")
        self._reset_kind_metrics()

    def _reset_kind_metrics(self) -> None:
        self._counts = dict.fromkeys(("requests", "parts", "received", "late", "dropped", "failed", "incomplete"), 0)

    def _kind_metrics(self) -> dict[str, Any]:
        c = self._counts
        return {"fanout": {**c, "mean_parts": rate(c["parts"], c["requests"]),
                           "loss_rate": rate(c["late"] + c["dropped"] + c["failed"], c["parts"])}}

    # -- parts --------------------------------------------------------------------------

    def _parts(self, split: Any) -> tuple[list[_Part], int]:
        def bad(why: str) -> InvalidDecision:
            where = self._hop(self._split) if self._split is not None else self.name
            return InvalidDecision(f"the split answered {_short(split)}: {why}", path=(where,), answer=_short(split))

        if isinstance(split, (list, tuple)):
            if self._default_worker is None:
                raise bad(f"a plain list of parts, but there are several workers {sorted(self._workers)}: "
                          "answer {'parts': [{'index', 'data', 'worker'}, ...]}")
            return [_Part(k, k, x, self._default_worker, None) for k, x in enumerate(split)], len(split)
        if not (isinstance(split, Mapping) and isinstance(split.get("parts"), (list, tuple))):
            raise bad("parts are a list, or {'parts': [...], 'size': n}")
        parts: list[_Part] = []
        for k, p in enumerate(split["parts"]):
            if not (isinstance(p, Mapping) and "data" in p):
                raise bad(f"part {k} is not a dict with 'index' and 'data'")
            index = p.get("index")
            if type(index) is not int or index < 0:
                raise bad(f"part {k} has index {index!r}, not an int >= 0")
            worker = p.get("worker", self._default_worker)
            if worker not in self._workers:
                raise bad(f"part {k} names worker {worker!r}; the workers are {sorted(self._workers)}")
            weight = None
            if p.get("weight") is not None:
                weight = check_weight(p["weight"])
                if weight is None:
                    raise bad(f"part {k} has weight {p['weight']!r}, not a finite number")
            parts.append(_Part(k, index, p["data"], worker, weight))
        size = split.get("size")
        top = max((p.index for p in parts), default=-1) + 1
        if size is None:
            size = top
        elif type(size) is not int or size < top:
            raise bad(f"size {size!r} is not an int covering every index (largest {top - 1})")
        return parts, size

    async def _start(self, item: Any) -> tuple[list[_Part], int]:
        split = item if self._split is None else await self._call(self._split, item)
        parts, size = self._parts(split)
        if self.capacity is not None:
            load: dict[str, int] = {}
            for p in parts:
                load[p.worker] = load.get(p.worker, 0) + 1
                if load[p.worker] > self.capacity:
                    p.status = "dropped"
        self._counts["requests"] += 1
        self._counts["parts"] += len(parts)
        return parts, size

    async def _one(self, part: _Part, slots: asyncio.Semaphore | None) -> Any:
        if slots is None:
            return await self._call(self._workers[part.worker], part.data)
        async with slots:
            return await self._call(self._workers[part.worker], part.data)

    def _settle(self, part: _Part, task: asyncio.Task[Any]) -> None:
        """Record a finished part; raises its error when on_error='raise'."""
        exc = task.exception()
        if exc is None:
            part.status, part.result = "ok", task.result()
            self._counts["received"] += 1
            return
        if self.on_error == "raise":
            raise exc
        part.status, part.error = "error", str(exc)[:500]
        self._counts["failed"] += 1

    def _mark_late(self, parts: list[_Part]) -> None:
        for p in parts:
            if p.status == "pending":
                p.status = "late"
                self._counts["late"] += 1
            elif p.status == "dropped":
                self._counts["dropped"] += 1

    def _deadline(self) -> float | None:
        return None if self.gather_timeout is None else asyncio.get_running_loop().time() + self.gather_timeout

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())

    async def _run(self, item: Any, **options: Any) -> Any:
        if options:
            raise TypeError(f"FanOut.run takes no options, got {sorted(options)}")
        deadline = self._deadline()
        parts, size = await self._start(item)
        slots = asyncio.Semaphore(self.max_parallel) if self.max_parallel else None
        async with Branches[Any]() as branches:
            which = {branches.start(self._one(p, slots)): p for p in parts if p.status == "pending"}
            while branches.pending:
                done = await branches.wait(self._left(deadline), fail_fast=self.on_error == "raise")
                if not done:
                    break  # the gather deadline passed
                for t in sorted(done, key=lambda t: which[t].no):
                    self._settle(which[t], t)
            await branches.cancel()  # the late ones: their calls (and the handlers behind) are cancelled
        self._mark_late(parts)
        return await self._finish(parts, size)

    async def _finish(self, parts: list[_Part], size: int) -> Any:
        expected = [0] * size
        received = [0] * size
        groups: list[list[_Part]] = [[] for _ in range(size)]
        for p in parts:
            expected[p.index] += 1
            groups[p.index].append(p)
            if p.status == "ok":
                received[p.index] += 1
        results: list[Any] = []
        for i, group in enumerate(groups):
            got = [p for p in group if p.status == "ok"]
            if not group:
                results.append(None)  # no part was made for this index
            elif any(p.weight is not None for p in group):
                results.append(self._weighted(i, got) if got else None)
            elif expected[i] == 1:
                results.append(got[0].result if got else None)
            else:
                results.append([p.result for p in got])
        missing = [i for i in range(size) if received[i] < expected[i]]
        if missing:
            self._counts["incomplete"] += 1
        lost = [{"index": p.index, "part": p.no, "reason": p.status, **({"error": p.error} if p.error else {})}
                for p in parts if p.status != "ok"]
        record = {"results": results, "missing": missing, "expected": expected, "received": received,
                  "complete": not missing, "lost": lost}
        if self._combine_label is not None:
            return await self._call(self._combine_label, record)
        return results if self._combine_mode == "results" else record

    def _weighted(self, index: int, got: list[_Part]) -> Any:
        try:
            return weighted_sum([(1.0 if p.weight is None else p.weight, p.result) for p in got])
        except (TypeError, ValueError) as exc:
            raise self._fail_here("combine", exc, f"weighted_sum(index {index})") from exc

    async def _stream(self, item: Any, **options: Any) -> AsyncIterator[Any]:
        if options:
            raise TypeError(f"FanOut.stream takes no options, got {sorted(options)}")
        deadline = self._deadline()
        parts, _ = await self._start(item)
        slots = asyncio.Semaphore(self.max_parallel) if self.max_parallel else None
        async with Branches[Any]() as branches:
            which = {branches.start(self._one(p, slots)): p for p in parts if p.status == "pending"}
            while branches.pending:
                done = await branches.wait(self._left(deadline), first=True)
                if not done:
                    break
                for t in sorted(done, key=lambda t: which[t].no):
                    p = which[t]
                    self._settle(p, t)
                    if p.status == "ok":
                        yield {"index": p.index, "part": p.no, "result": p.result}
            await branches.cancel()
        self._mark_late(parts)
        if any(p.status != "ok" for p in parts):
            self._counts["incomplete"] += 1
        for p in parts:
            if p.status != "ok":
                yield {"index": p.index, "part": p.no, "missing": True, "reason": p.status,
                       **({"error": p.error} if p.error else {})}


# --------------------------------------------------------------------------- loop-until


class LoopUntil(Flow):
    """Run ``body``, ask ``until`` (a verifier) whether to stop, repeat.

    - ``body``: the step run each round; round 1 gets the item, every later round the
      previous round's output (or the verifier's ``"next"``, when it gives one).
    - ``until``: a verifier step called with the body's output. It answers a bool (True:
      stop), ``"accept"``/``"stop"`` vs ``"reject"``/``"continue"``, or a dict with
      ``"verdict"`` (the stage library's Verifier), ``"stop"`` or ``"accept"``, and
      optionally ``"next"``.
    - ``max_rounds``: the round limit. When it is reached without a stop, ``on_limit``
      decides: ``"result"`` (default) answers the last output with ``stopped: False``;
      ``"error"`` raises RoundLimitExceeded.

    ``run`` answers ``{"value": last output, "rounds": n, "stopped": bool}``;
    ``stream`` yields ``{"round": n, "value": output, "stop": bool}`` every round.
    """

    kind = "loop"

    def __init__(self, body: StepLike, until: StepLike, *, max_rounds: int = 8, on_limit: OnLimit = "result",
                 max_depth: int = 16, max_in_flight: int | None = None) -> None:
        super().__init__(max_depth=max_depth, max_in_flight=max_in_flight)
        self._body = self._add("body", body, "LoopUntil body")
        self._until = self._add("until", until, "LoopUntil until")
        self.max_rounds = _positive_int(max_rounds, "LoopUntil: max_rounds", none=False)
        self.on_limit: OnLimit = _choice(on_limit, ("result", "error"), "LoopUntil: on_limit")
        self._reset_kind_metrics()

    def _reset_kind_metrics(self) -> None:
        self._loops = 0
        self._stopped = 0
        self._limit_hit = 0
        self._rounds = 0

    def _kind_metrics(self) -> dict[str, Any]:
        return {"loop": {"loops": self._loops, "stopped": self._stopped, "limit_hit": self._limit_hit,
                         "mean_rounds": self._rounds / self._loops if self._loops else None}}

    async def _rounds_of(self, item: Any) -> AsyncIterator[tuple[int, Any, bool]]:
        x = item
        for r in range(1, (self.max_rounds or 1) + 1):
            y = await self._call(self._body, x)
            v = await self._call(self._until, y)
            verdict = read_verdict(v)
            if verdict is None:
                raise InvalidDecision(f"the verifier answered {_short(v)}: a verifier answers a bool, "
                                      "'accept'/'reject', or {'verdict': ...} / {'stop': bool, 'next': ...}",
                                      path=(self._hop(self._until),), answer=_short(v))
            stop, nxt = verdict
            yield r, y, stop
            if stop:
                return
            x = y if nxt is NO_NEXT else nxt

    def _limit(self, rounds: int) -> None:
        self._limit_hit += 1
        if self.on_limit == "error":
            raise RoundLimitExceeded(f"the verifier did not say stop within max_rounds={rounds}: raise "
                                     "max_rounds, or use on_limit='result' to get the last output",
                                     path=(self.name,), rounds=rounds)

    async def _run(self, item: Any, **options: Any) -> Any:
        if options:
            raise TypeError(f"LoopUntil.run takes no options, got {sorted(options)}")
        self._loops += 1
        rounds, value, stop = 0, None, False
        async for rounds, value, stop in self._rounds_of(item):
            pass
        self._rounds += rounds
        if stop:
            self._stopped += 1
        else:
            self._limit(rounds)
        return {"value": value, "rounds": rounds, "stopped": stop}

    async def _stream(self, item: Any, **options: Any) -> AsyncIterator[Any]:
        if options:
            raise TypeError(f"LoopUntil.stream takes no options, got {sorted(options)}")
        self._loops += 1
        rounds, stop = 0, False
        async with closing(self._rounds_of(item)) as rounds_of:
            async for rounds, value, stop in rounds_of:
                self._rounds += 1
                yield {"round": rounds, "value": value, "stop": stop}
        if stop:
            self._stopped += 1
        else:
            self._limit(rounds)


# --------------------------------------------------------------------------- cascade


class Cascade(Flow):
    """Try the cheap tier first; a verifier accepts its answer or escalates to the next tier.

    - ``tiers``: steps, cheapest first. Each is called with the item.
    - ``verifier``: one step used after every tier but the last, or a list with one per
      tier (None where a tier is never checked). It gets the tier's output and answers as
      for LoopUntil (accept = answer now, reject or abstain = escalate).
    - ``verify_last``: check the last tier too (its answer stands anyway; ``accepted`` tells).
    - ``max_escalations``: at most this many escalations per request (None: up to the last).
    - ``tier_costs``: the cost of each tier, in the unit of the request's budget. A tier's
      cost is ``tier_costs[i]`` when given, else its result's ``"cost"``, else its
      ``"macs"``, else 0.
    - ``on_exhausted``: when the verifier rejects and no escalation is left: ``"answer"``
      (default: the rejected answer, with ``exhausted`` saying why) or ``"error"``
      (BudgetExhausted).

    The budget: a request's context budget (``with cascada.context(budget=B)`` at the top,
    or what an outer flow handed down) is spent tier by tier; an escalation happens only
    when what is left covers the next tier's ``tier_costs`` entry (without tier_costs: is
    above zero). Each tier is called with what is left as its budget, so a nested cascade
    spends from the same purse. Tier 0 always runs.

    ``run`` answers ``{"value", "tier", "tier_name", "accepted" (bool, None when not
    checked), "escalations", "exhausted" (None, "max_escalations" or "budget"), "cost"}``.
    ``stream`` yields ``{"tier", "tier_name", "value", "accepted", "final"}`` for every tier
    tried, the answer last.
    """

    kind = "cascade"

    def __init__(self, tiers: list[StepLike] | tuple[StepLike, ...], verifier: StepLike | list[StepLike | None],
                 *, max_escalations: int | None = None, tier_costs: list[float] | None = None,
                 on_exhausted: OnExhausted = "answer", verify_last: bool = False, max_depth: int = 16,
                 max_in_flight: int | None = None) -> None:
        super().__init__(max_depth=max_depth, max_in_flight=max_in_flight)
        if not isinstance(tiers, (list, tuple)) or not tiers:
            raise ConfigurationError(f"Cascade: tiers must be a non-empty list of steps, got {tiers!r:.100}")
        self._tiers = [self._add(as_step(t, f"Cascade tier {i}").name, t, f"Cascade tier {i}")
                       for i, t in enumerate(tiers)]
        n = len(self._tiers)
        self.verify_last = bool(verify_last)
        self._verifiers: list[str | None]
        if isinstance(verifier, list):
            if len(verifier) not in (n, n - 1) or (n == 1 and not verifier):
                raise ConfigurationError(f"Cascade: verifier is a list of {len(verifier)}; give one per tier "
                                         f"({n}) or one per tier but the last ({n - 1})")
            self._verifiers = [None if v is None else self._add(f"verifier.{self._tiers[i]}", v,
                                                                f"Cascade verifier {i}")
                               for i, v in enumerate(verifier)]
            self._verifiers += [None] * (n - len(self._verifiers))
        else:
            shared = self._add("verifier", verifier, "Cascade verifier")
            self._verifiers = [shared] * n
        if not self.verify_last:
            self._verifiers[-1] = None
        if n > 1 and all(v is None for v in self._verifiers[:-1]):
            raise ConfigurationError("Cascade: no tier below the last has a verifier, so it could never escalate")
        self.max_escalations = None
        if max_escalations is not None:
            if type(max_escalations) is not int or max_escalations < 0:
                raise ConfigurationError(f"Cascade: max_escalations must be an int >= 0 or None, got {max_escalations!r}")
            self.max_escalations = max_escalations
        self.tier_costs: list[float] | None = None
        if tier_costs is not None:
            if (not isinstance(tier_costs, (list, tuple)) or len(tier_costs) != n
                    or any(check_weight(c) is None or c < 0 for c in tier_costs)):
                raise ConfigurationError(f"Cascade: tier_costs must be {n} numbers >= 0 (one per tier), "
                                         f"got {tier_costs!r}")
            self.tier_costs = [float(c) for c in tier_costs]
        self.on_exhausted: OnExhausted = _choice(on_exhausted, ("answer", "error"), "Cascade: on_exhausted")
        self._reset_kind_metrics()

    def _reset_kind_metrics(self) -> None:
        n = len(self._tiers)
        self._reached = [0] * n
        self._answered = [0] * n
        self._escalated = [0] * n
        self._checked = [0] * n
        self._accepted = [0] * n
        self._exhausted = {"max_escalations": 0, "budget": 0}
        self._spent = 0.0
        self._answers = 0

    def _kind_metrics(self) -> dict[str, Any]:
        names = self._tiers
        checked, accepted = sum(self._checked), sum(self._accepted)
        return {"cascade": {
            "tiers": list(names),
            "answered_by": dict(zip(names, self._answered)),
            "reached": dict(zip(names, self._reached)),
            "escalated": dict(zip(names, self._escalated)),
            "escalation_rate": {t: rate(e, r) for t, e, r in zip(names, self._escalated, self._reached)},
            "acceptance_rate": rate(accepted, checked),
            "acceptance_rate_by_tier": {t: rate(a, c) for t, a, c in zip(names, self._accepted, self._checked)},
            "exhausted": dict(self._exhausted),
            "mean_cost": self._spent / self._answers if self._answers else None,
        }}

    def _cost(self, i: int, raw: Any) -> float:
        if self.tier_costs is not None:
            return self.tier_costs[i]
        macs, cost = compute_of(raw)
        return cost if cost is not None else (macs if macs is not None else 0.0)

    def _blocked(self, i: int, escalations: int, budget: float | None, spent: float) -> str | None:
        """Why the cascade cannot escalate from tier i (None: it can)."""
        if self.max_escalations is not None and escalations >= self.max_escalations:
            return "max_escalations"
        if budget is not None:
            left = budget - spent
            need = self.tier_costs[i + 1] if self.tier_costs is not None else 0.0
            if left < need or left <= 0:
                return "budget"
        return None

    async def _tiers_of(self, item: Any) -> AsyncIterator[dict[str, Any]]:
        budget = current_context().budget
        spent = 0.0
        escalations = 0
        last = len(self._tiers) - 1
        for i, label in enumerate(self._tiers):
            self._reached[i] += 1
            if budget is None:
                raw = await self._call_raw(label, item)
            else:
                with context(budget=budget - spent):
                    raw = await self._call_raw(label, item)
            spent += self._cost(i, raw)
            value = self._take(label, raw)
            accepted: bool | None = None
            vlabel = self._verifiers[i]
            if vlabel is not None:
                v = await self._call(vlabel, value)
                verdict = read_verdict(v)
                if verdict is None:
                    raise InvalidDecision(f"the verifier answered {_short(v)}: a verifier answers a bool, "
                                          "'accept'/'reject', or {'verdict': 'accept' | 'reject' | 'abstain'}",
                                          path=(self._hop(vlabel),), answer=_short(v))
                accepted = verdict[0]
                self._checked[i] += 1
                self._accepted[i] += accepted
            exhausted = None
            if i < last and not accepted:
                exhausted = self._blocked(i, escalations, budget, spent)
                if exhausted is None:
                    self._escalated[i] += 1
                    escalations += 1
                    yield {"tier": i, "tier_name": label, "value": value, "accepted": accepted, "final": False}
                    continue
                self._exhausted[exhausted] += 1
                if self.on_exhausted == "error":
                    raise BudgetExhausted(
                        f"tier {label!r} was rejected and the cascade cannot escalate ({exhausted}: "
                        f"{escalations} escalations of max_escalations={self.max_escalations}, spent {spent:g} of "
                        f"budget {budget}); raise the budget, or use on_exhausted='answer'",
                        path=(self.name,), tier=i, escalations=escalations, spent=spent, budget=budget,
                        reason=exhausted)
            self._answered[i] += 1
            self._answers += 1
            self._spent += spent
            yield {"value": value, "tier": i, "tier_name": label, "accepted": accepted, "final": True,
                   "escalations": escalations, "exhausted": exhausted, "cost": spent}
            return

    async def _run(self, item: Any, **options: Any) -> Any:
        if options:
            raise TypeError(f"Cascade.run takes no options, got {sorted(options)}")
        answer: dict[str, Any] = {}
        async for step in self._tiers_of(item):
            answer = step  # the generator ends right after the final tier
        del answer["final"]
        return answer

    async def _stream(self, item: Any, **options: Any) -> AsyncIterator[Any]:
        if options:
            raise TypeError(f"Cascade.stream takes no options, got {sorted(options)}")
        async with closing(self._tiers_of(item)) as tiers_of:
            async for step in tiers_of:
                yield {k: step[k] for k in ("tier", "tier_name", "value", "accepted", "final")}

