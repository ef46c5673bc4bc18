"""What a flow raises, and how those errors cross process boundaries without losing shape.

::

    CascadaError
    └── FlowError                 a flow could not produce its result; ``path`` says where
        ├── StageFailed           a stage raised (or died, or was not there); carries the
        │                         original type, message and traceback of the stage itself
        ├── FlowDepthExceeded     a flow recursed into itself more than ``max_depth`` times
        ├── BudgetExhausted       a cascade ran out of escalations or budget before a tier was
        │                         accepted (only with ``on_exhausted="error"``)
        ├── RoundLimitExceeded    a loop reached ``max_rounds`` before its verifier said stop
        │                         (only with ``on_limit="error"``)
        └── InvalidDecision       a router, split or verifier answered something the flow
                                  cannot act on (not a list of edges, an unknown edge, ...)

``DeadlineExceeded`` and cancellation are never wrapped: a deadline passing inside a flow
reaches the caller as ``DeadlineExceeded``, a cancelled call as ``CancelledError``.

**Paths.** ``path`` is a tuple of hops from the flow that raised (or re-raised) the error
down to what failed: ``"flow[step]"`` for each flow level, then ``"actor.method"`` (an actor
stage) or ``"function()"`` (a local callable step). For example a stage failing two flows
down reads ``("top[classify] > mid[expert] > leaf.infer")`` when joined with ``" > "``.

**Crossing processes.** Flow errors are CascadaErrors, so the runtime sends their fields
with them and the caller gets the same type back, in any process (see
``actors._portable_errors``). A flow one level up re-raises a stage's flow error with its own
hop prepended, so the top sees one error with the full path, not a chain of wrappers.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ._errors import CascadaError, RemoteError

__all__ = [
    "BudgetExhausted",
    "FlowDepthExceeded",
    "FlowError",
    "InvalidDecision",
    "RoundLimitExceeded",
    "StageFailed",
    "flow_error",
    "type_name",
]

def type_name(t: type) -> str:
    """The name the runtime gives an exception type on the wire (``ValueError``,
    ``pkg.mod.MyError``)."""
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class FlowError(CascadaError):
    """Base of the errors a flow raises. ``path`` is the hops from the flow that raised it
    down to what failed; ``flow`` the flow at the head of the path (the one it surfaced
    from). Subclasses add fields; each field is a keyword of the constructor."""

    _fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, detail: str, *, path: tuple[str, ...] | list[str] = ()) -> None:
        self.detail = detail
        self.path: tuple[str, ...] = tuple(path)
        super().__init__(detail)

    @property
    def flow(self) -> str | None:
        """The flow at the head of the path (None for an empty path)."""
        if not self.path:
            return None
        head = self.path[0]
        return head.split("[", 1)[0] if "[" in head else head

    @property
    def where(self) -> str:
        """The path joined with `` > ``."""
        return " > ".join(self.path)

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}" if self.path else self.detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (_build, (type(self).__name__, self.detail, list(self.path), self.fields()))

    def __cascada_fields__(self) -> dict[str, Any]:
        return {"detail": self.detail, "path": list(self.path), **self.fields()}

    @classmethod
    def __cascada_rebuild__(cls, args: list[Any], fields: dict[str, Any]) -> FlowError:
        detail, path = fields.pop("detail"), fields.pop("path")
        if type(detail) is not str or type(path) not in (list, tuple) or not all(type(p) is str for p in path):
            raise TypeError("a flow error needs a str detail and a path of str")
        return _build(cls.__name__, detail, list(path), {name: fields[name] for name in cls._fields})

    def copy(self, *, hop: str | None = None) -> FlowError:
        """The same error, with ``hop`` prepended to its path (one level up)."""
        path = list(self.path) if hop is None else [hop, *self.path]
        return _build(type(self).__name__, self.detail, path, self.fields())


class StageFailed(FlowError):
    """A stage raised, died or could not be reached while a flow was calling it.

    ``remote_type`` and ``remote_message`` are the stage's own exception (for an actor stage
    the type name the runtime reported, for a local callable its exception type),
    ``remote_traceback`` its traceback text when there is one; ``actor`` and ``method`` name
    the failing stage (None for a local callable)."""

    _fields = ("remote_type", "remote_message", "remote_traceback", "actor", "method")

    def __init__(self, detail: str, *, path: tuple[str, ...] | list[str] = (), remote_type: str,
                 remote_message: str, remote_traceback: str | None = None, actor: str | None = None,
                 method: str | None = None) -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.actor = actor
        self.method = method
        super().__init__(detail, path=path)


class FlowDepthExceeded(FlowError):
    """A flow was entered more than ``max_depth`` times within one request's path (it
    recursed into itself, directly or through other flows). ``name`` is that flow, ``depth``
    how deep it was when it refused."""

    _fields = ("name", "depth", "max_depth")

    def __init__(self, detail: str, *, path: tuple[str, ...] | list[str] = (), name: str, depth: int,
                 max_depth: int) -> None:
        self.name = name
        self.depth = depth
        self.max_depth = max_depth
        super().__init__(detail, path=path)


class BudgetExhausted(FlowError):
    """A cascade's verifier rejected tier ``tier`` and no escalation was left: ``reason`` is
    ``"max_escalations"`` or ``"budget"``; ``spent`` what the tiers cost so far and
    ``budget`` the request's budget (None: none was set)."""

    _fields = ("tier", "escalations", "spent", "budget", "reason")

    def __init__(self, detail: str, *, path: tuple[str, ...] | list[str] = (), tier: int, escalations: int,
                 spent: float, budget: float | None, reason: str) -> None:
        self.tier = tier
        self.escalations = escalations
        self.spent = spent
        self.budget = budget
        self.reason = reason
        super().__init__(detail, path=path)


class RoundLimitExceeded(FlowError):
    """A loop ran ``rounds`` rounds (its ``max_rounds``) and its verifier never said stop."""

    _fields = ("rounds",)

    def __init__(self, detail: str, *, path: tuple[str, ...] | list[str] = (), rounds: int) -> None:
        self.rounds = rounds
        super().__init__(detail, path=path)


class InvalidDecision(FlowError):
    """A router, split or verifier answered something the flow cannot act on: not a list of
    ``[edge, weight]`` pairs, an edge the flow does not have, a weight that is not a finite
    number, a part without an index. ``answer`` is a short repr of what it answered."""

    _fields = ("answer",)

    def __init__(self, detail: str, *, path: tuple[str, ...] | list[str] = (), answer: str = "") -> None:
        self.answer = answer
        super().__init__(detail, path=path)


_TYPES: dict[str, type[FlowError]] = {
    t.__name__: t for t in (FlowError, StageFailed, FlowDepthExceeded, BudgetExhausted, RoundLimitExceeded,
                            InvalidDecision)
}


def _build(kind: str, detail: str, path: list[str], fields: dict[str, Any]) -> FlowError:
    cls = _TYPES[kind]
    if cls is FlowError:
        return FlowError(detail, path=path)
    return cls(detail, path=path, **fields)


def flow_error(exc: BaseException) -> FlowError | None:
    """The flow error ``exc`` is or carries, or None.

    A call to a flow raises its FlowError as itself, in any process; this also finds one
    kept as the ``__cause__`` of another error, and so reads the same for every caller::

        try:
            await flow.ask("run", x)
        except cascada.CascadaError as exc:
            err = cascada.flow_error(exc)
            if err is None:
                raise
            print(err.path, err)     # e.g. StageFailed with path top[mid] > mid[e1] > e1.infer
    """
    if isinstance(exc, FlowError):
        return exc
    cause = exc.__cause__
    if isinstance(exc, RemoteError) and isinstance(cause, FlowError):
        return cause
    return None
