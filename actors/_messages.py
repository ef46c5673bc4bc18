"""What sits in a mailbox, and how a handled message answers its caller.

A reply goes either to a future in this process (local actors: no serialization) or back
over the ROUTER to the connection the request came on (process actors). Both kinds offer
the same four calls, so the actor loop does not care where its caller lives.
"""

from __future__ import annotations

import asyncio
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any

from ..transport._tensors import Via, unwrap_via
from ..transport._wire import Kind
from ._errors import RemoteError
from ._portable_errors import describe_error, error_from_parts

if TYPE_CHECKING:
    from ._node import Node


class Message:
    __slots__ = ("kind", "method", "args", "kwargs", "deadline", "reply", "credit", "owners", "ctx", "target",
                 "done", "cancelled", "task", "key", "size", "leased")

    def __init__(
        self,
        kind: Kind,
        method: str,
        args: list[Any] | tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        deadline: float | None,
        reply: Reply | None,
        credit: StreamCredit | None = None,
        owners: list[int] | None = None,
        ctx: list[Any] | None = None,
        target: str = "",
        key: str | None = None,
    ) -> None:
        self.kind = kind
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.deadline = deadline
        self.reply = reply
        self.credit = credit
        self.owners = owners  # pids owning leased tensors in args (see Envelope.owners)
        self.ctx = ctx  # the wire context [trace_id, budget, depth, path] (see _context)
        self.target = target
        self.done = False  # the handler returned: calls it left running no longer inherit its deadline
        self.cancelled = False  # the caller cancelled: skip it if queued, cancel its handler if running
        self.task: asyncio.Task[Any] | None = None  # the task its handler runs in, while it runs
        self.key = key  # idempotency key of an at-least-once call (see cascada.idempotent)
        self.size = 0  # bytes it arrived in (0 for a local message: nothing was serialized)
        # (address, nbytes) of the shm tensors it brought: its handler may pass them on
        # without a copy (see TensorCodec._pass_on).
        self.leased: list[tuple[int, int]] | None = None


class Reply:
    """How a handler's outcome reaches its caller. Each method may return a future that the
    actor awaits: the transport is at its high-water mark and pushes back."""

    def ok(self, value: Any) -> asyncio.Future[None] | None:
        raise NotImplementedError

    def fail(self, exc: BaseException, code: str) -> None:
        raise NotImplementedError

    def item(self, value: Any) -> asyncio.Future[None] | None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


def format_remote(exc: BaseException) -> tuple[str, str, str]:
    t = type(exc)
    type_name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return type_name, str(exc), "".join(traceback.format_exception(exc))


class RemoteReply(Reply):
    __slots__ = ("node", "identity", "corr")

    def __init__(self, node: Node, identity: bytes, corr: int) -> None:
        self.node = node
        self.identity = identity
        self.corr = corr

    def ok(self, value: Any) -> asyncio.Future[None] | None:
        self.node.running.pop((self.identity, self.corr), None)
        return self.node.send_reply(self.identity, Kind.REPLY, self.corr, value)

    def fail(self, exc: BaseException, code: str) -> None:
        self.node.running.pop((self.identity, self.corr), None)
        if code == "remote":
            type_name, message, tb, details = describe_error(exc)
            self.node.send_error(self.identity, self.corr, code, type_name, message, tb, details)
        else:
            type_name, message, _ = format_remote(exc)
            self.node.send_error(self.identity, self.corr, code, type_name, message, None)

    def item(self, value: Any) -> asyncio.Future[None] | None:
        return self.node.send_reply(self.identity, Kind.ITEM, self.corr, value)

    def end(self) -> None:
        self.node.send_reply(self.identity, Kind.END, self.corr, None)


class LocalReply(Reply):
    __slots__ = ("fut", "actor", "method")

    def __init__(self, fut: asyncio.Future[Any], actor: str, method: str) -> None:
        self.fut = fut
        self.actor = actor
        self.method = method

    def ok(self, value: Any) -> None:
        if not self.fut.done():
            self.fut.set_result(unwrap_via(value) if Via.live else value)
        return None

    def fail(self, exc: BaseException, code: str) -> None:
        if self.fut.done():
            return
        if code == "remote":
            # A copy, as a remote caller would get it: the original stays the __cause__.
            err = error_from_parts(*describe_error(exc), actor=self.actor, method=self.method, local=True)
            err.__cause__ = exc
            self.fut.set_exception(err)
        else:
            self.fut.set_exception(exc)


_END = object()


def _timed_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_TimedOut())


class _TimedOut(Exception):
    pass


async def _wait(waiter: asyncio.Future[None], timeout: float | None) -> bool:
    """Wait for waiter: True when it resolved, False at the timeout. A timer rather than
    wait_for, which before Python 3.12 can swallow a cancellation that arrives just as the
    future completes (a cancelled consumer would then go on taking items)."""
    if timeout is None:
        await waiter
        return True
    timer = asyncio.get_running_loop().call_later(max(0.0, timeout), _timed_out, waiter)
    try:
        await waiter
    except _TimedOut:
        return False
    finally:
        timer.cancel()
    return True


class StreamCredit:
    """The serving side of a stream's flow control: at most ``window`` items ahead of what
    the consumer has taken, so neither side's memory grows with a slow consumer."""

    __slots__ = ("credit", "cancelled", "_waiter")

    def __init__(self, window: int) -> None:
        self.credit = window
        self.cancelled = False
        self._waiter: asyncio.Future[None] | None = None

    def grant(self, n: int) -> None:
        self.credit += n
        self._wake()

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def acquire(self, timeout: float | None) -> bool:
        """Take one credit; False if the stream was cancelled or the wait timed out."""
        while self.credit <= 0 and not self.cancelled:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if not await _wait(self._waiter, timeout):
                    return False
            finally:
                self._waiter = None
        if self.cancelled:
            return False
        self.credit -= 1
        return True


class StreamSink(Reply):
    """The consuming side of a stream: items land here in order, from the ROUTER path or
    straight from a local actor."""

    __slots__ = ("_items", "_waiter", "finished", "error", "actor", "method")

    def __init__(self, actor: str, method: str) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.finished = False
        self.error: BaseException | None = None
        self.actor = actor
        self.method = method

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def item(self, value: Any) -> None:
        self._items.append(unwrap_via(value) if Via.live else value)
        self._wake()
        return None

    def end(self) -> None:
        self._items.append(_END)
        self._wake()

    def ok(self, value: Any) -> None:  # a stream answers with items, never a single value
        self.end()

    def fail(self, exc: BaseException, code: str) -> None:
        if code == "remote":
            # A copy, as a remote caller would get it: the original stays the __cause__.
            err = error_from_parts(*describe_error(exc), actor=self.actor, method=self.method, local=True)
            err.__cause__ = exc
            exc = err
        self.fail_with(exc)

    def fail_with(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._items.append(_END)
        self._wake()

    async def get(self, timeout: float | None) -> Any:
        """The next item, or ``_END``; raises the stream's error or DeadlineExceeded."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if not await _wait(self._waiter, timeout):
                    raise asyncio.TimeoutError
            finally:
                self._waiter = None
        value = self._items.popleft()
        if value is _END:
            self.finished = True
            if self.error is not None:
                raise self.error
        return value


END = _END
