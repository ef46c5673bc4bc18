"""Steps: what a flow calls. An actor ref and a method, the flow itself, a local callable,
or a list of steps run one after the other. Plus the small pure pieces the flow kinds share:
reading a verifier's verdict, weighted sums, and running branches that are cancelled
together."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar

from ._errors import ConfigurationError
from ._ref import ActorRef

__all__ = ["SELF", "Step", "StepLike", "as_step", "check_label", "Branches", "closing", "weighted_sum",
           "read_verdict", "stop_if_cancelled"]

T = TypeVar("T")

_LABEL = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_METHOD = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")


class _SelfMarker:
    """The flow that holds the step: ``Step(SELF)`` calls the flow's own entry (recursion,
    bounded by the flow's ``max_depth``)."""

    _instance: _SelfMarker | None = None

    def __new__(cls) -> _SelfMarker:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "SELF"

    def __reduce__(self) -> str:
        return "SELF"


SELF = _SelfMarker()


def check_label(label: Any, where: str) -> str:
    if not (isinstance(label, str) and _LABEL.match(label)):
        raise ConfigurationError(f"{where}: name {label!r} must be 1-128 characters of letters, digits, _ . : - "
                                 "(it appears in error paths and metrics)")
    return label


def _auto_label(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    name = re.sub(r"[^A-Za-z0-9_.:\-]", "", str(name)) or "fn"
    return name[:128]


class Step:
    """One thing a flow calls with the current item.

    - ``target``: an ``ActorRef`` (a stage, or another flow), ``SELF`` (this flow), a local
      callable (sync or async, called with the item in the flow's own process: keep it cheap
      and non-blocking), or a list of step-likes run in order (each one's output the next
      one's input).
    - ``method``: the handler to call on an actor (default ``"run"``, the entry of a flow).
    - ``args``/``kwargs``: extra arguments after the item.
    - ``timeout``: seconds for each call (None: the system default), never past the
      request's own deadline.
    - ``take``: a key to take out of a dict result (``take="out"`` for an Expert called with
      ``with_cost=True``), after its ``macs``/``cost`` were accounted.
    - ``stream``: call the method with ``ref.stream``: the step's result is the list of
      items, or (as the last step of a streaming sequence) the items are passed on live.
    - ``name``: how the step appears in error paths and metrics (default: the actor's name,
      the function's name, ``self``).

    A bare ``ActorRef``, ``SELF``, callable or list is accepted wherever a step is, meaning
    ``Step(x)``.
    """

    __slots__ = ("target", "method", "name", "args", "kwargs", "timeout", "take", "stream", "chain")

    target: Any
    method: str
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] | None
    timeout: float | None
    take: str | None
    stream: bool
    chain: tuple[Step, ...] | None

    def __init__(self, target: Any, method: str | None = None, *, name: str | None = None,
                 args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None, timeout: float | None = None,
                 take: str | None = None, stream: bool = False) -> None:
        where = f"Step({target!r})"
        self.chain: tuple[Step, ...] | None = None
        if isinstance(target, (list, tuple)) and not isinstance(target, str):
            if not target:
                raise ConfigurationError(f"{where}: a list of steps must not be empty")
            chain: tuple[Step, ...] = tuple(as_step(t, f"{where}[{i}]") for i, t in enumerate(target))
            self.chain = chain
            default_name = "-".join(s.name for s in chain)[:128]
        elif isinstance(target, ActorRef):
            default_name = target.name
        elif target is SELF:
            default_name = "self"
        elif isinstance(target, type):
            raise ConfigurationError(f"{where}: a step needs a running actor's ref (spawn the class first) or a "
                                     "function, not a class")
        elif callable(target):
            default_name = _auto_label(target)
        else:
            raise ConfigurationError(f"{where}: a step is an ActorRef, SELF, a callable or a list of steps, "
                                     f"got {type(target).__name__}")
        if method is not None and (self.chain is not None or not (isinstance(target, ActorRef) or target is SELF)):
            raise ConfigurationError(f"{where}: method= applies to an actor (or SELF), not to a "
                                     f"{'list of steps' if self.chain is not None else 'callable'}")
        method = "run" if method is None else method
        if not (isinstance(method, str) and _METHOD.match(method)):
            raise ConfigurationError(f"{where}: method {method!r} is not a public handler name")
        if stream and not (isinstance(target, ActorRef) or target is SELF):
            raise ConfigurationError(f"{where}: stream=True applies to an actor's stream handler")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigurationError(f"{where}: timeout must be a positive number of seconds or None, got {timeout!r}")
        if take is not None and not isinstance(take, str):
            raise ConfigurationError(f"{where}: take must be a key (str) or None, got {take!r}")
        if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
            raise ConfigurationError(f"{where}: kwargs must be a dict with str keys, got {kwargs!r}")
        self.target = target
        self.method = method
        self.name = check_label(default_name if name is None else name, where)
        self.args = tuple(args)
        self.kwargs = dict(kwargs) if kwargs else None
        self.timeout = None if timeout is None else float(timeout)
        self.take = take
        self.stream = bool(stream)

    @property
    def is_self(self) -> bool:
        return self.target is SELF

    def describe(self) -> str:
        if self.chain is not None:
            return " -> ".join(s.describe() for s in self.chain)
        if isinstance(self.target, ActorRef):
            return f"{self.target.name}.{self.method}"
        if self.target is SELF:
            return f"self.{self.method}"
        return f"{self.name}()"

    def __repr__(self) -> str:
        return f"<Step {self.name}: {self.describe()}>"


StepLike = Any  # Step | ActorRef | SELF | Callable[..., Any] | list[StepLike]


def as_step(x: StepLike, where: str) -> Step:
    """``x`` as a Step; ConfigurationError naming ``where`` when it cannot be one."""
    if isinstance(x, Step):
        return x
    if isinstance(x, ActorRef) or x is SELF or callable(x) or (isinstance(x, (list, tuple)) and not isinstance(x, str)):
        try:
            return Step(x)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from exc
    raise ConfigurationError(f"{where}: expected a step (an ActorRef, SELF, a callable, a list of steps or "
                             f"Step(...)), got {type(x).__name__} {x!r:.80}")


# --------------------------------------------------------------------------- verdicts

_ACCEPT = frozenset(("accept", "accepted", "stop", "done", "yes", "true", "ok"))
_REJECT = frozenset(("reject", "rejected", "abstain", "continue", "escalate", "no", "false", "again"))
class _NoNext:
    """A verdict without a "next" input. A singleton that survives pickling (flow classes
    may travel to their process by value, with their globals)."""

    _instance: _NoNext | None = None

    def __new__(cls) -> _NoNext:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __reduce__(self) -> str:
        return "NO_NEXT"


NO_NEXT: Any = _NoNext()


def read_verdict(v: Any) -> tuple[bool, Any] | None:
    """``(accepted, next_input)`` from what a verifier answered, or None if unreadable.

    Accepted answers: a bool; a string (``"accept"``/``"stop"``/``"done"`` vs
    ``"reject"``/``"abstain"``/``"continue"``/``"escalate"``); a dict with ``"verdict"`` (the
    stage library's Verifier: accept, reject or abstain), ``"accept"``, ``"accepted"`` or
    ``"stop"``, and optionally ``"next"``: the next round's input (loops)."""
    nxt = NO_NEXT
    if isinstance(v, dict):
        if "next" in v:
            nxt = v["next"]
        for key in ("verdict", "accept", "accepted", "stop"):
            if key in v:
                v = v[key]
                break
        else:
            return None
    if isinstance(v, bool):
        return v, nxt
    if isinstance(v, str):
        low = v.lower()
        if low in _ACCEPT:
            return True, nxt
        if low in _REJECT:
            return False, nxt
    return None


# --------------------------------------------------------------------------- combining


def weighted_sum(pairs: list[tuple[float, Any]]) -> Any:
    """sum(w * y): numbers, tensors and arrays (anything with * and +), and lists or dicts of
    those elementwise (lists of equal length, dicts with the same keys)."""
    if not pairs:
        raise ValueError("nothing to combine")
    first = pairs[0][1]
    if isinstance(first, bool):
        raise TypeError("cannot take a weighted sum of booleans")
    if isinstance(first, (list, tuple)):
        n = len(first)
        for _, y in pairs:
            if not isinstance(y, (list, tuple)) or len(y) != n:
                raise ValueError(f"cannot sum lists of different lengths or types: {n} and "
                                 f"{len(y) if isinstance(y, (list, tuple)) else type(y).__name__}")
        return [weighted_sum([(w, y[i]) for w, y in pairs]) for i in range(n)]
    if isinstance(first, dict):
        keys = set(first)
        for _, y in pairs:
            if not isinstance(y, dict) or set(y) != keys:
                raise ValueError("cannot sum dicts with different keys")
        return {k: weighted_sum([(w, y[k]) for w, y in pairs]) for k in first}
    if isinstance(first, str) or first is None:
        raise TypeError(f"cannot take a weighted sum of {type(first).__name__} results: give the route a "
                        "combine= (\"list\", \"dict\" or a callable)")
    acc = first * pairs[0][0]
    for w, y in pairs[1:]:
        acc = acc + y * w
    return acc


def check_weight(w: Any) -> float | None:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        return None
    return float(w)


# --------------------------------------------------------------------------- branches


class Branches(Generic[T]):
    """Tasks a handler runs side by side and never leaves behind.

    ``async with Branches() as b:`` ... ``b.start(coro)``: on leaving the block (normally,
    by an error, or cancelled) every branch still running is cancelled and awaited, so a
    branch's ask is cancelled in turn and the callee's handler stops. Exceptions of finished
    branches are always retrieved (never "Task exception was never retrieved")."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[T]] = []
        self.pending: set[asyncio.Task[T]] = set()

    def start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        self.pending.add(task)
        return task

    async def wait(self, timeout: float | None = None, *, first: bool = False,
                   fail_fast: bool = True) -> set[asyncio.Task[T]]:
        """Wait until every pending branch is done (or the first one, with ``first``; or one
        fails, with ``fail_fast``), at most ``timeout`` seconds. Returns the branches that
        finished."""
        if not self.pending:
            return set()
        when = asyncio.FIRST_COMPLETED if first else (asyncio.FIRST_EXCEPTION if fail_fast else asyncio.ALL_COMPLETED)
        done, _ = await asyncio.wait(self.pending, timeout=timeout, return_when=when)
        self.pending.difference_update(done)
        return done

    async def cancel(self) -> int:
        """Cancel every pending branch and wait until they have all ended. Returns how many
        were cancelled. A cancellation of the caller meanwhile is held until they ended,
        then raised."""
        pending = [t for t in self.pending if not t.done()]
        self.pending.clear()
        for t in pending:
            t.cancel()
        interrupted = False
        while pending:
            try:
                await asyncio.wait(pending)
            except asyncio.CancelledError:
                interrupted = True
            pending = [t for t in pending if not t.done()]
        self._retrieve()
        if interrupted:
            raise asyncio.CancelledError
        return len([t for t in self.tasks if t.cancelled()])

    def _retrieve(self) -> None:
        for t in self.tasks:
            if t.done() and not t.cancelled():
                t.exception()

    async def __aenter__(self) -> Branches[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel()


async def call_callable(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Any:
    out = fn(*args, **kwargs) if kwargs else fn(*args)
    if isinstance(out, Awaitable):
        out = await out
    return out


@contextlib.asynccontextmanager
async def closing(items: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """``async with closing(agen) as items:``: the generator is closed when the block is
    left, at once, even when it was left early (a consumer that stopped, a cancellation), so
    whatever it holds (branches, a stream from another actor) ends now, not at garbage
    collection."""
    try:
        yield items
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


def stop_if_cancelled() -> None:
    """Raise CancelledError when this task was asked to cancel and is still running.

    Called at every item a flow takes from a stream: before Python 3.12, ``asyncio.wait_for``
    (which the runtime's stream sink uses) swallows a cancellation that arrives just as an
    item does, and a consumer of a busy stream would then run on. See
    tests/flows/test_runtime_gaps.py."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError
