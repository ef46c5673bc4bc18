"""ActorRef: the address of an actor, and the only way to talk to it.

A ref is a value. It can be stored, compared, and sent inside any message or constructor
argument; wherever it lands it works, because it names an endpoint, not an object. It binds
to the node of the process that uses it (the running ActorSystem, or the actor process it
was delivered to)."""

from __future__ import annotations

import asyncio
import contextvars
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..transport._errors import DeadlineExceeded
from ..transport._tensors import Via, unwrap_via
from ..transport._wire import Kind
from ._context import outgoing
from ._errors import ActorDied, ConfigurationError, Overloaded, SystemClosed, WrongThread
from ._node import wait_reply, wait_room
from ._messages import END, LocalReply, Message, StreamCredit, StreamSink

if TYPE_CHECKING:
    from ._node import Node

current_node: contextvars.ContextVar[Node] = contextvars.ContextVar("cascada_node")


_RETRY_BACKOFF = 0.02  # seconds before the first retry; doubles up to the max
_RETRY_BACKOFF_MAX = 1.0


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.time())


class ActorRef:
    __slots__ = ("name", "endpoint", "pid", "host", "incarnation", "_node")

    def __init__(self, name: str, endpoint: str, pid: int, host: str, incarnation: str | None = None,
                 *, node: Node | None = None) -> None:
        self.name = name
        self.endpoint = endpoint
        self.pid = pid
        self.host = host
        self.incarnation = incarnation
        self._node = node

    def __repr__(self) -> str:
        return f"<ActorRef {self.name!r} at {self.endpoint} pid={self.pid}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and (self.name, self.endpoint) == (other.name, other.endpoint)

    def __hash__(self) -> int:
        return hash((self.name, self.endpoint))

    def __reduce__(self) -> tuple[Any, ...]:
        # For the trusted spawn channel only (constructor arguments); the wire uses an ext type.
        return (ActorRef, (self.name, self.endpoint, self.pid, self.host, self.incarnation))

    def _bind(self) -> Node:
        node = self._node
        if node is None or node.closed or node._thread != threading.get_ident():
            here = current_node.get(None)
            if here is not None and not here.closed:
                node = here
            elif node is None or node.closed:
                raise SystemClosed(
                    f"ref to {self.name!r} used outside a running ActorSystem: use it inside "
                    "`async with cascada.ActorSystem()` or inside an actor"
                )
            if node._thread != threading.get_ident():
                raise WrongThread(
                    f"ref to {self.name!r} used from thread {threading.get_ident()}, but its ActorSystem's "
                    f"event loop runs on thread {node._thread}: hand the call to that loop, e.g. "
                    "asyncio.run_coroutine_threadsafe(ref.ask(...), loop).result()"
                )
            self._node = node
        return node

    async def ask(self, method: str, /, *args: Any, timeout: float | None = None, retries: int = 0,
                  idempotency_key: str | None = None, **kwargs: Any) -> Any:
        """Call ``method`` and return its result.

        ``timeout`` is in seconds (None: the system's default_timeout; ``math.inf``: none).
        Raises RemoteError if the handler raised, DeadlineExceeded when late, ActorDied if
        the actor's process died first, ActorNotFound for an unknown actor or method.

        Delivery is at-most-once unless ``retries`` is given: then a call that failed with
        ActorDied or Overloaded is sent again (``-1``: as often as the deadline allows), with
        backoff, every attempt carrying the same idempotency key (``idempotency_key``, or a
        fresh one). A handler marked ``@cascada.idempotent`` runs once per key and answers
        repeats from its reply cache; any other handler may run more than once."""
        node = self._node
        if node is None or node.closed or node._thread != threading.get_ident():
            node = self._bind()
        deadline, ctx = outgoing(self.name, node.deadline(timeout))
        if retries or idempotency_key is not None:
            return await self._ask_retrying(node, method, args, kwargs, deadline, ctx, retries, idempotency_key)
        return await self._ask_once(node, method, args, kwargs, deadline, ctx, None)

    async def _ask_once(self, node: Node, method: str, args: Any, kwargs: dict[str, Any], deadline: float | None,
                        ctx: list[Any] | None, key: str | None) -> Any:
        if self.endpoint == node.endpoint:
            cell = node.cells.get(self.name)
            if cell is None:
                raise _not_here(self, node)
            if Via.live:
                args, kwargs = unwrap_via(args), unwrap_via(kwargs)
            fut: asyncio.Future[Any] = node.loop.create_future()
            msg = Message(Kind.ASK, method, args, kwargs or None, deadline, LocalReply(fut, self.name, method),
                          ctx=ctx, target=self.name, key=key)
            try:
                if not cell.offer(msg):
                    await wait_room(cell.put(msg), deadline, f"{self.name}.{method}")
                return await wait_reply(fut, deadline, node.loop, f"{self.name}.{method}")
            except (asyncio.CancelledError, DeadlineExceeded):
                # Nobody waits for the answer any more: stop the work (and what it called).
                cell.cancel(msg)
                raise
        peer = node.peer(self.endpoint, self.pid, self.host, self.incarnation)
        return await node.call(peer, self.name, method, args, kwargs or None, deadline=deadline, ctx=ctx, key=key)

    async def _ask_retrying(self, node: Node, method: str, args: Any, kwargs: dict[str, Any],
                            deadline: float | None, ctx: list[Any] | None, retries: int, key: str | None) -> Any:
        if not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= -1):
            raise ConfigurationError(f"retries must be an int >= -1 (-1: until the deadline), got {retries!r}")
        if key is None:
            key = secrets.token_hex(12)
        elif not (isinstance(key, str) and 0 < len(key) <= 128):
            raise ConfigurationError(f"idempotency_key must be a string of 1-128 characters, got {key!r}")
        attempt = 0
        backoff = _RETRY_BACKOFF
        while True:
            try:
                return await self._ask_once(node, method, args, kwargs, deadline, ctx, key)
            except (ActorDied, Overloaded):
                left = _remaining(deadline)
                if (retries != -1 and attempt >= retries) or (left is not None and left <= backoff):
                    raise
                attempt += 1
                node.stats.retries += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_BACKOFF_MAX)

    async def tell(self, method: str, /, *args: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Send ``method`` one way. Returns once the message is accepted for delivery; a full
        mailbox or transport pushes back (this awaits), up to the deadline. Errors in the
        handler are logged and counted on the receiving side, not returned."""
        node = self._node
        if node is None or node.closed or node._thread != threading.get_ident():
            node = self._bind()
        deadline, ctx = outgoing(self.name, node.deadline(timeout))
        if self.endpoint == node.endpoint:
            cell = node.cells.get(self.name)
            if cell is None:
                raise _not_here(self, node)
            if Via.live:
                args, kwargs = unwrap_via(args), unwrap_via(kwargs)
            msg = Message(Kind.TELL, method, args, kwargs or None, deadline, None, ctx=ctx, target=self.name)
            if not cell.offer(msg):
                await wait_room(cell.put(msg), deadline, f"{self.name}.{method}")
            return
        peer = node.peer(self.endpoint, self.pid, self.host, self.incarnation)
        peer.check_alive(self.name)
        sent = peer.send(Kind.TELL, next(node.corr), self.name, method, deadline, [list(args), kwargs or None],
                         ctx=ctx)
        if sent is not None:
            await peer.wait_sent(sent, deadline, f"{self.name}.{method}")

    async def stream(self, method: str, /, *args: Any, timeout: float | None = None, window: int | None = None,
                     **kwargs: Any) -> AsyncIterator[Any]:
        """Iterate over the items an async-generator handler yields.

        At most ``window`` items are in flight (the producer waits for the consumer), and
        closing the stream early cancels the producer (and the calls it waits on). Close it
        explicitly when you leave the loop early, ``async with contextlib.aclosing(ref.stream(...))``:
        an abandoned async generator is only closed when the garbage collector finalizes it.
        ``timeout`` bounds the whole stream."""
        node = self._node
        if node is None or node.closed or node._thread != threading.get_ident():
            node = self._bind()
        deadline, ctx = outgoing(self.name, node.deadline(timeout))
        window = window or node.config.stream_window
        half = max(1, window // 2)
        if self.endpoint == node.endpoint:
            cell = node.cells.get(self.name)
            if cell is None:
                raise _not_here(self, node)
            if Via.live:
                args, kwargs = unwrap_via(args), unwrap_via(kwargs)
            sink = StreamSink(self.name, method)
            credit = StreamCredit(window)
            msg = Message(Kind.STREAM, method, args, kwargs or None, deadline, sink, credit, ctx=ctx,
                          target=self.name)
            if not cell.offer(msg):
                await wait_room(cell.put(msg), deadline, f"{self.name}.{method}")
            grant = credit.grant

            def cancel() -> None:
                cell.cancel(msg)
        else:
            peer = node.peer(self.endpoint, self.pid, self.host, self.incarnation)
            peer.check_alive(self.name)
            corr = next(node.corr)
            sink = StreamSink(self.name, method)
            peer.streams[corr] = sink
            sent = peer.send(Kind.STREAM, corr, self.name, method, deadline, [list(args), kwargs or None], window,
                             ctx=ctx)
            if sent is not None:
                await peer.wait_sent(sent, deadline, f"{self.name}.{method}")

            def grant(n: int) -> None:
                if corr in peer.streams and not peer.sock.closed:
                    peer.send(Kind.CREDIT, corr, self.name, None, None, None, n)

            def cancel() -> None:
                if peer.forget_stream(corr) is not None and not peer.sock.closed:
                    peer.send(Kind.CANCEL, corr, self.name, None, None, None)

        taken = 0
        try:
            while True:
                try:
                    item = await sink.get(_remaining(deadline))
                except asyncio.TimeoutError as exc:
                    raise DeadlineExceeded(f"{self.name}.{method}: the stream's deadline passed") from exc
                if item is END:
                    return
                yield item
                taken += 1
                if taken >= half:
                    grant(taken)
                    taken = 0
        finally:
            if not sink.finished:
                cancel()


def _not_here(ref: ActorRef, node: Node) -> BaseException:
    from ._errors import ActorNotFound

    dead = node.tombstones.get(ref.name)
    if dead is not None:
        return dead

    return ActorNotFound(f"no actor named {ref.name!r} on node {node.id} (it was stopped, or never spawned here)")


