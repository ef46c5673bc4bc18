"""Flows: actors that wire actors. Sequence, route, fan-out and gather, loop-until, cascade.

A flow is an actor: spawn it like one (``await system.spawn(Sequential, a, b)``), call it
like one (``ask("run", x)``, ``tell``, ``stream("stream", x)``), and use its ref as a step
of another flow, to any depth. A flow may call itself (``SELF``) under a depth guard. See
FLOWS.md beside this file.

Names to export from ``cascada`` (one line each):

    Flow                base class of the flow kinds (entry handlers run/stream, metrics)
    Sequential          steps one after the other
    Route               a router picks 0..n weighted edges; results combined
    FanOut              split into parts, one worker call each, gather by index with a deadline
    LoopUntil           body then verifier, until stop or the round limit
    Cascade             cheap tier first, verifier accepts or escalates, escalation budget
    Step                an actor ref + method (or SELF, a callable, a list) as a step
    SELF                marker: the flow that holds the step (self-recursion)
    FlowError           base of flow errors (CascadaError); .path from the flow to the failure
    StageFailed         a stage raised or died; full path and the original type/message/traceback
    FlowDepthExceeded   a flow recursed past its max_depth
    BudgetExhausted     a cascade could not escalate (on_exhausted="error")
    RoundLimitExceeded  a loop hit max_rounds (on_limit="error")
    InvalidDecision     a router/split/verifier answered something the flow cannot act on
    flow_error          the FlowError an error is or carries (or None)
    ask_flow            ref.ask (kept: flow errors now cross processes typed)
    stream_flow         ref.stream (kept: likewise)
    build_topology      (cascada/_topology.py) spawn a whole flow graph from a dict or TOML file
    load_topology       (cascada/_topology.py) read and check a topology without spawning
    Topology            (cascada/_topology.py) what build_topology returns: top ref, refs by name
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ._errors import RemoteError
from ._flow_base import Flow
from ._flow_errors import (
    BudgetExhausted,
    FlowDepthExceeded,
    FlowError,
    InvalidDecision,
    RoundLimitExceeded,
    StageFailed,
    flow_error,
)
from ._flow_kinds import Cascade, FanOut, LoopUntil, Route, Sequential
from ._flow_step import SELF, Step, closing
from ._ref import ActorRef

__all__ = [
    "SELF",
    "BudgetExhausted",
    "Cascade",
    "FanOut",
    "Flow",
    "FlowDepthExceeded",
    "FlowError",
    "InvalidDecision",
    "LoopUntil",
    "RoundLimitExceeded",
    "Route",
    "Sequential",
    "StageFailed",
    "Step",
    "ask_flow",
    "flow_error",
    "stream_flow",
]


async def ask_flow(ref: ActorRef, item: Any, /, *args: Any, method: str = "run", timeout: float | None = None,
                   **kwargs: Any) -> Any:
    """``ref.ask(method, item, ...)``, kept for code written before errors crossed processes
    typed: a flow's error (StageFailed or any FlowError) is raised as its own type, with its
    full path, by a plain ``ref.ask`` too."""
    try:
        return await ref.ask(method, item, *args, timeout=timeout, **kwargs)
    except RemoteError as exc:
        err = flow_error(exc)
        if err is None:
            raise
        raise err from exc


async def stream_flow(ref: ActorRef, item: Any, /, *args: Any, method: str = "stream", timeout: float | None = None,
                      **kwargs: Any) -> AsyncIterator[Any]:
    """``ref.stream(method, item, ...)``; like :func:`ask_flow`, kept for older code."""
    try:
        async with closing(ref.stream(method, item, *args, timeout=timeout, **kwargs)) as items:
            async for x in items:
                yield x
    except RemoteError as exc:
        err = flow_error(exc)
        if err is None:
            raise
        raise err from exc
