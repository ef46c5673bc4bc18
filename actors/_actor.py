"""The Actor base class and how its handlers are found."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from ._ref import ActorRef

F = TypeVar("F", bound=Callable[..., Any])

HandlerKind = Literal["async", "sync", "stream"]

_LIFECYCLE = frozenset(("on_start", "on_stop"))


def concurrent(fn: F) -> F:
    """Mark a handler as safe to run while other messages are handled.

    By default an actor handles one message at a time, so its state needs no locks. A
    handler marked ``@concurrent`` is started and the actor moves on to the next message;
    it must then guard any state it shares with other handlers itself."""
    fn.__cascada_concurrent__ = True  # type: ignore[attr-defined]
    return fn


def idempotent(fn: F) -> F:
    """Mark a handler as safe to call at least once: a call that carries an idempotency key
    (``ref.ask(..., retries=N)`` sends one, the same for every attempt) runs at most once per
    key in this incarnation; a repeat of a key already answered gets the recorded answer
    (value or error) without running again, and a repeat that arrives while the first is
    running waits for it. The reply cache holds the last ``REPLY_CACHE_SIZE`` keys and lives
    in memory: an actor that restarts starts with an empty one, so state that must survive a
    crash exactly once needs the handler's own bookkeeping (dedupe by key in your store)."""
    fn.__cascada_idempotent__ = True  # type: ignore[attr-defined]
    return fn


class Handler:
    __slots__ = ("name", "kind", "concurrent", "idempotent", "suspends", "probe")

    def __init__(self, name: str, kind: HandlerKind, concurrent: bool, idempotent: bool = False) -> None:
        self.name = name
        self.kind = kind
        self.concurrent = concurrent
        self.idempotent = idempotent
        # Learned by the cells for a concurrent handler (per class, in each process): its
        # first step awaited the last time it was started eagerly (so the next calls start in
        # a task at once), and a countdown to the next eager try, in case that changed.
        self.suspends = False
        self.probe = 0


class Actor:
    """Base class of every actor.

    Subclass it and write ``async def`` methods: each public method is a handler that
    ``ref.ask`` and ``ref.tell`` call; an ``async def`` generator method is a stream for
    ``ref.stream``. Plain ``def`` methods work too and run on the actor's event loop.
    Names starting with ``_`` are private and never reachable by messages.

    ``self.ref`` (the actor's own ref) and ``self.name`` are set before ``on_start`` runs.
    """

    ref: ActorRef
    name: str

    async def on_start(self) -> None:
        """Runs once in the actor's own process and loop, before any message."""

    async def on_stop(self) -> None:
        """Runs once when the actor is stopped gracefully, after its mailbox drained."""


_HANDLER_CACHE: dict[type, dict[str, Handler]] = {}


def handlers_of(cls: type) -> dict[str, Handler]:
    """The public handlers of an actor class, computed once per class."""
    table = _HANDLER_CACHE.get(cls)
    if table is not None:
        return table
    table = {}
    for name in dir(cls):
        if name.startswith("_") or name in _LIFECYCLE:
            continue
        attr = inspect.getattr_static(cls, name)
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if not inspect.isfunction(attr):
            continue
        if inspect.isasyncgenfunction(attr):
            kind: HandlerKind = "stream"
        elif inspect.iscoroutinefunction(attr):
            kind = "async"
        else:
            kind = "sync"
        table[name] = Handler(name, kind, bool(getattr(attr, "__cascada_concurrent__", False)),
                              bool(getattr(attr, "__cascada_idempotent__", False)))
    _HANDLER_CACHE[cls] = table
    return table
