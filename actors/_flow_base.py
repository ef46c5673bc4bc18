"""Flow: the actor every flow kind is. Its entry handlers, the depth guard, how it calls its
steps (with timing, compute accounting and error translation) and its metrics."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from ..transport._errors import DeadlineExceeded
from ..transport._wire import MAX_CTX_PATH
from ._actor import Actor, concurrent
from ._context import current_context
from ._errors import CascadaError, ConfigurationError, RemoteError
from ._flow_errors import FlowDepthExceeded, FlowError, StageFailed, flow_error, type_name
from ._flow_metrics import FlowStats, StepStats
from ._flow_step import Step, StepLike, as_step, call_callable, check_label, closing, stop_if_cancelled
from ._ref import ActorRef

__all__ = ["Flow"]

# A request deeper than this many hops could no longer count its own recursion: the context's
# path keeps only the last MAX_CTX_PATH actor names.
MAX_HOPS = MAX_CTX_PATH - 8


class Flow(Actor):
    """Base of the flow kinds: an actor that calls steps.

    Entry handlers (both ``@concurrent``: a flow serves many requests at once):

    - ``run(item, **options) -> result`` (ask or tell)
    - ``stream(item, **options)``: a stream of partial results; what each kind yields is in
      its docstring (by default the one result of ``run``).

    Other handlers: ``metrics()`` (plain dict: requests, latency p50/p95, and per step calls,
    errors, cancellations, latency, seconds, macs and cost; kinds add their own),
    ``reset_metrics()``, ``describe()`` (the kind and the steps).

    Constructor options shared by every kind (keyword-only):

    - ``max_depth``: how many times this flow may appear in one request's path (it calls
      itself through ``SELF``, or through other flows) before it refuses with
      FlowDepthExceeded. 1 forbids any recursion.
    - ``max_in_flight``: requests run at once (None: no bound); the others wait their turn.
      A request re-entering the flow (recursion) does not take a second turn.

    A stage that fails comes back as StageFailed with the path to it; a deadline passing
    comes back as DeadlineExceeded, never wrapped. Cancelling a call to a flow cancels every
    call it is waiting on, at every level below.
    """

    kind: ClassVar[str] = "flow"

    def __init__(self, *, max_depth: int = 16, max_in_flight: int | None = None) -> None:
        where = type(self).__name__
        if type(max_depth) is not int or not 1 <= max_depth <= MAX_HOPS:
            raise ConfigurationError(f"{where}: max_depth must be an int from 1 to {MAX_HOPS}, got {max_depth!r}")
        if max_in_flight is not None and (type(max_in_flight) is not int or max_in_flight < 1):
            raise ConfigurationError(f"{where}: max_in_flight must be a positive int or None, got {max_in_flight!r}")
        self.max_depth = max_depth
        self.max_in_flight = max_in_flight
        self._slots: asyncio.Semaphore | None = None
        self._steps: dict[str, Step] = {}
        self._chains: dict[str, tuple[str, ...]] = {}
        self._stats: dict[str, StepStats] = {}
        self._flow_stats = FlowStats()

    # -- wiring (subclasses call these from __init__) -------------------------------------

    def _add(self, label: str, step_like: StepLike, where: str) -> str:
        """Register a step under ``label`` (made unique); returns the label."""
        step = as_step(step_like, where)
        check_label(label, where)
        base, n = label, 1
        while label in self._steps:
            n += 1
            label = f"{base}#{n}"
        self._steps[label] = step
        self._stats[label] = StepStats()
        if step.chain is not None:
            self._chains[label] = tuple(self._add(f"{label}.{sub.name}", sub, f"{where}.{sub.name}")
                                        for sub in step.chain)
        return label

    # -- entry handlers -------------------------------------------------------------------

    @concurrent
    async def run(self, item: Any, **options: Any) -> Any:
        stats = self._flow_stats
        stats.requests += 1
        stats.in_flight += 1
        t0 = time.perf_counter()
        try:
            depth = self._guard()
            if self.max_in_flight is not None and depth == 1:  # re-entries belong to a request holding a slot
                if self._slots is None:
                    self._slots = asyncio.Semaphore(self.max_in_flight)
                async with self._slots:
                    result = await self._run(item, **options)
            else:
                result = await self._run(item, **options)
        except BaseException as exc:
            stats.failed(exc)
            raise
        finally:
            stats.in_flight -= 1
        stats.ok += 1
        stats.latency.add(time.perf_counter() - t0)
        return result

    @concurrent
    async def stream(self, item: Any, **options: Any) -> AsyncIterator[Any]:
        stats = self._flow_stats
        stats.requests += 1
        stats.in_flight += 1
        t0 = time.perf_counter()
        try:
            self._guard()
            # aclosing: a consumer that leaves early closes the kind's stream (and its branches) now
            async with closing(self._stream(item, **options)) as items:
                async for x in items:
                    yield x
        except BaseException as exc:  # GeneratorExit: the consumer left early
            stats.failed(exc)
            raise
        else:
            stats.ok += 1
            stats.latency.add(time.perf_counter() - t0)
        finally:
            stats.in_flight -= 1

    async def metrics(self) -> dict[str, Any]:
        """Plain-dict metrics: the flow's requests and latency, each step's counters,
        latency and compute, and the kind's own figures."""
        out: dict[str, Any] = {"flow": self.name, "kind": self.kind, **self._flow_stats.snapshot(),
                               "steps": {label: st.snapshot() for label, st in self._stats.items()}}
        out.update(self._kind_metrics())
        return out

    async def reset_metrics(self) -> None:
        in_flight = self._flow_stats.in_flight
        self._flow_stats = FlowStats()
        self._flow_stats.in_flight = in_flight  # still running: they will count themselves out
        self._stats = {label: StepStats() for label in self._stats}
        self._reset_kind_metrics()

    async def describe(self) -> dict[str, Any]:
        """The flow's kind, name, depth guard and steps (label: what it calls)."""
        return {"name": self.name, "kind": self.kind, "max_depth": self.max_depth,
                "steps": {label: step.describe() for label, step in self._steps.items()}}

    # -- what kinds implement -------------------------------------------------------------

    async def _run(self, item: Any, **options: Any) -> Any:
        raise NotImplementedError

    async def _stream(self, item: Any, **options: Any) -> AsyncIterator[Any]:
        yield await self._run(item, **options)

    def _kind_metrics(self) -> dict[str, Any]:
        return {}

    def _reset_kind_metrics(self) -> None:
        pass

    # -- the depth guard ------------------------------------------------------------------

    def _guard(self) -> int:
        """How many times this flow is in the request's path (1: not recursing); raises
        FlowDepthExceeded past max_depth."""
        ctx = current_context()
        depth = ctx.path.count(self.name)
        if depth > self.max_depth:
            raise FlowDepthExceeded(
                f"flow {self.name!r} was entered {depth} times in one request, past its max_depth="
                f"{self.max_depth}: the recursion does not end (check the decision that recurses), or raise "
                "max_depth", path=(self.name,), name=self.name, depth=depth, max_depth=self.max_depth)
        if ctx.depth > MAX_HOPS:
            raise FlowDepthExceeded(
                f"flow {self.name!r} was reached {ctx.depth} hops below the top of one request, past the "
                f"{MAX_HOPS} hops a request can count: the flows call each other without end",
                path=(self.name,), name=self.name, depth=ctx.depth, max_depth=self.max_depth)
        return depth

    # -- calling steps --------------------------------------------------------------------

    def _hop(self, label: str) -> str:
        return f"{self.name}[{label}]"

    async def _call(self, label: str, x: Any) -> Any:
        """Call step ``label`` with ``x``; its result, after ``take``."""
        return self._take(label, await self._call_raw(label, x))

    async def _call_raw(self, label: str, x: Any) -> Any:
        """Call step ``label`` with ``x``; its whole result (compute already accounted)."""
        step = self._steps[label]
        st = self._stats[label]
        st.calls += 1
        t0 = time.perf_counter()
        try:
            if step.chain is not None:
                for sub in self._chains[label]:
                    x = await self._call(sub, x)
                out = x
            else:
                target = self.ref if step.is_self else step.target
                if isinstance(target, ActorRef):
                    kwargs = step.kwargs or {}
                    if step.stream:
                        async with closing(target.stream(step.method, x, *step.args,
                                                                     timeout=step.timeout, **kwargs)) as items:
                            out = []
                            async for y in items:
                                stop_if_cancelled()
                                out.append(y)
                    else:
                        out = await target.ask(step.method, x, *step.args, timeout=step.timeout, **kwargs)
                else:
                    out = await call_callable(target, (x, *step.args), step.kwargs)
        except asyncio.CancelledError:
            st.cancelled += 1
            raise
        except DeadlineExceeded:
            st.deadline += 1
            raise
        except Exception as exc:
            st.errors += 1
            if step.chain is not None:
                raise  # its own steps made the error (with their paths)
            raise self._stage_error(label, step, exc) from exc
        st.record(time.perf_counter() - t0, out)
        return out

    async def _stream_step(self, label: str, x: Any) -> AsyncIterator[Any]:
        """The live items of a ``stream=True`` actor step (each after ``take``)."""
        step = self._steps[label]
        st = self._stats[label]
        target = self.ref if step.is_self else step.target
        assert isinstance(target, ActorRef) and step.stream
        st.calls += 1
        t0 = time.perf_counter()
        try:
            async with closing(target.stream(step.method, x, *step.args, timeout=step.timeout,
                                                         **(step.kwargs or {}))) as items:
                async for y in items:
                    stop_if_cancelled()
                    yield self._take(label, y)
        except (asyncio.CancelledError, GeneratorExit):
            st.cancelled += 1
            raise
        except DeadlineExceeded:
            st.deadline += 1
            raise
        except Exception as exc:
            st.errors += 1
            raise self._stage_error(label, step, exc) from exc
        st.record(time.perf_counter() - t0, None)

    def _take(self, label: str, out: Any) -> Any:
        key = self._steps[label].take
        if key is None:
            return out
        if isinstance(out, dict) and key in out:
            return out[key]
        step = self._steps[label]
        raise StageFailed(f"answered {type(out).__name__} without the key {key!r} that the step's take= names",
                          path=(self._hop(label), step.describe()), remote_type="KeyError",
                          remote_message=repr(key), actor=getattr(step.target, "name", None), method=step.method)

    def _stage_error(self, label: str, step: Step, exc: Exception) -> FlowError:
        """What a step's failure becomes one level up: the same flow error with this hop
        prepended, or a StageFailed naming this hop and the stage."""
        hop = self._hop(label)
        inner = flow_error(exc)
        target = self.ref if step.is_self else step.target
        if inner is not None:
            if (not isinstance(target, ActorRef) and inner.path
                    and inner.path[0].startswith(f"{self.name}[")):
                return inner  # made in this flow already (a local callable re-raising it)
            return inner.copy(hop=hop)
        if isinstance(exc, RemoteError):
            where = f"{exc.actor}.{exc.method}" if exc.actor else step.describe()
            return StageFailed(f"{exc.remote_type}: {exc.remote_message}", path=(hop, where),
                               remote_type=exc.remote_type, remote_message=exc.remote_message,
                               remote_traceback=exc.remote_traceback, actor=exc.actor, method=exc.method)
        if isinstance(exc, CascadaError) and isinstance(target, ActorRef):
            # The stage died, was not there, or the call could not be made.
            name = f"cascada.{type(exc).__name__}"
            return StageFailed(f"{name}: {exc}", path=(hop, f"{target.name}.{step.method}"), remote_type=name,
                               remote_message=str(exc), actor=target.name, method=step.method)
        name = type_name(type(exc))
        return StageFailed(f"{name}: {exc}", path=(hop, f"{step.name}()"), remote_type=name, remote_message=str(exc),
                           remote_traceback="".join(traceback.format_exception(exc)))

    def _fail_here(self, label: str, exc: Exception, what: str) -> FlowError:
        """A StageFailed for something the flow itself ran under ``label`` (a combiner)."""
        name = type_name(type(exc))
        return StageFailed(f"{name}: {exc}", path=(self._hop(label), what), remote_type=name, remote_message=str(exc),
                           remote_traceback="".join(traceback.format_exception(exc)))
