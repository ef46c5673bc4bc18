"""The request context: what travels with every message through every level of a cascade.

A call made while a handler runs carries the context of the message being handled, one hop
deeper: the same trace id, the same budget, the path with the callee appended, and a deadline
no later than the caller's. So a deadline or a budget set at the top bounds all the work
below it without any stage passing it by hand, and a stage can read where it sits
(``current_context()``).

The deadline is inherited only while the handler that made the call is still running: a
background task that a handler started and left behind is not bound by that request's
deadline (it keeps the trace id and path, for logs).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..transport._wire import MAX_CTX_PATH as MAX_PATH
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._messages import Message

@dataclass(frozen=True, slots=True)
class Context:
    """Where a request is, and what it may still spend.

    ``trace_id`` names the top-level request; ``deadline`` is an absolute ``time.time()``
    (None: none); ``budget`` is what the caller allows below this point, in whatever unit
    the cascade accounts in (MACs, seconds, escalations; None: unlimited); ``depth`` is the
    number of hops from the top; ``path`` names the actors along the way, the current one
    last."""

    trace_id: str
    deadline: float | None = None
    budget: float | None = None
    depth: int = 0
    path: tuple[str, ...] = ()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (0.0 once it passed), None without a deadline."""
        return None if self.deadline is None else max(0.0, self.deadline - time.time())

    @property
    def expired(self) -> bool:
        return self.deadline is not None and self.deadline <= time.time()

    def replace(self, **changes: Any) -> Context:
        """A copy with some fields changed, e.g. ``ctx.replace(budget=ctx.budget - cost)``."""
        return replace(self, **changes)


def new_trace_id() -> str:
    return f"{random.getrandbits(64):016x}"


def _root_wire(msg: Message) -> list[Any]:
    """Start a trace at a message that came without a context: one hop from the top."""
    wire = msg.ctx = [new_trace_id(), None, 1, [msg.target]]
    return wire


# The message whose handler is running in this task (set by the actor cell), and a context
# that the code itself put in force with ``context(...)``, which wins over the message's.
handling: contextvars.ContextVar[Message | None] = contextvars.ContextVar("cascada_handling", default=None)
_override: contextvars.ContextVar[Context | None] = contextvars.ContextVar("cascada_context", default=None)


def current_context() -> Context:
    """The context of the request being handled.

    Inside a handler: the context its message carried (a request that came without one
    starts a trace here, at depth 1 with this actor as its path). Inside ``with cascada.context(...)``: that context.
    Elsewhere: a fresh top-level context (a new trace id each call)."""
    ctx = _override.get()
    if ctx is not None:
        return ctx
    msg = handling.get()
    if msg is None:
        return Context(new_trace_id())
    wire = msg.ctx or _root_wire(msg)
    return Context(wire[0], msg.deadline, wire[1], wire[2], tuple(wire[3]))


@contextlib.contextmanager
def context(*, trace_id: str | None = None, deadline: float | None | Any = ..., timeout: float | None = None,
            budget: float | None | Any = ...) -> Iterator[Context]:
    """Put a context in force for the calls made inside the block.

    Fields left out are taken from the current context (``current_context()``). ``timeout``
    is a shorthand for ``deadline=time.time() + timeout``. Use it at the top to start a
    trace with a deadline or a budget, or inside a handler to hand a smaller budget down::

        with cascada.context(budget=ctx.budget - spent):
            await next_tier.ask("infer", x)
    """
    base = current_context()
    changes: dict[str, Any] = {}
    if trace_id is not None:
        if not (isinstance(trace_id, str) and 0 < len(trace_id) <= 128):
            raise ConfigurationError(f"trace_id must be a string of 1-128 characters, got {trace_id!r}")
        changes["trace_id"] = trace_id
    if timeout is not None:
        if deadline is not ...:
            raise ConfigurationError("give context() a deadline or a timeout, not both")
        if not (isinstance(timeout, (int, float)) and timeout >= 0):
            raise ConfigurationError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        deadline = time.time() + timeout
    if deadline is not ...:
        if deadline is not None and not (isinstance(deadline, (int, float)) and not math.isnan(deadline)):
            raise ConfigurationError(f"deadline must be an absolute time.time() value or None, got {deadline!r}")
        changes["deadline"] = deadline
    if budget is not ...:
        if budget is not None and not (isinstance(budget, (int, float)) and not math.isnan(budget)):
            raise ConfigurationError(f"budget must be a number or None, got {budget!r}")
        changes["budget"] = budget
    ctx = base.replace(**changes) if changes else base
    token = _override.set(ctx)
    try:
        yield ctx
    finally:
        _override.reset(token)


def outgoing(callee: str, deadline: float | None) -> tuple[float | None, list[Any] | None]:
    """The deadline and wire context of a call to ``callee`` made from here.

    A call from plain code outside any handler carries nothing (two context-variable reads);
    a call from inside a handler always carries the trace on."""
    ctx = _override.get()
    if ctx is not None:
        if ctx.deadline is not None and (deadline is None or ctx.deadline < deadline):
            deadline = ctx.deadline
        return deadline, [ctx.trace_id, ctx.budget, ctx.depth + 1, [*ctx.path[-(MAX_PATH - 1):], callee]]
    msg = handling.get()
    if msg is None:
        return deadline, None
    if not msg.done and msg.deadline is not None and (deadline is None or msg.deadline < deadline):
        deadline = msg.deadline
    wire = msg.ctx or _root_wire(msg)
    path = wire[3]
    return deadline, [wire[0], wire[1], wire[2] + 1, [*path[-(MAX_PATH - 1):], callee]]
