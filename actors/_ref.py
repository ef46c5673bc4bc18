"""ActorRef: the address of an actor, and the only way to talk to it.

A ref is a value. It can be stored, compared, and sent inside any message or constructor
argument; wherever it lands it works, because it names an endpoint, not an object. It binds
to the node of the process that uses it (the running ActorSystem, or the actor process it
was delivered to)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..transport._errors import DeadlineExceeded
from ..transport._tensors import Via, unwrap_via
from ..transport._wire import Kind
from ._context import outgoing
from ._errors import SystemClosed
from ._node import wait_reply, wait_room
from ._messages import END, LocalReply, Message, StreamCredit, StreamSink

if TYPE_CHECKING:
    from ._node import Node

current_node: contextvars.ContextVar[Node] = contextvars.ContextVar("cascada_node")


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
        if node is None or node.closed:
            node = current_node.get(None)
            if node is None or node.closed:
                raise SystemClosed(
                    f"ref to {self.name!r} used outside a running ActorSystem: use it inside "
                    "`async with cascada.ActorSystem()` or inside an actor"
                )
            self._node = node
        return node

    async def ask(self, method: str, /, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` and return its result.

        ``timeout`` is in seconds (None: the system's default_timeout; ``math.inf``: none).
        Raises RemoteError if the handler raised, DeadlineExceeded when late, ActorDied if
        the actor's process died first, ActorNotFound for an unknown actor or method."""
        node = self._node
        if node is None or node.closed:
            node = self._bind()
        deadline, ctx = outgoing(self.name, node.deadline(timeout))
        if self.endpoint == node.endpoint:
            cell = node.cells.get(self.name)
            if cell is None:
                raise _not_here(self, node)
            if Via.live:
                args, kwargs = unwrap_via(args), unwrap_via(kwargs)
            fut: asyncio.Future[Any] = node.loop.create_future()
            msg = Message(Kind.ASK, method, args, kwargs or None, deadline, LocalReply(fut, self.name, method),
                          ctx=ctx, target=self.name)
            try:
                if not cell.offer(msg):
                    await wait_room(cell.put(msg), deadline, f"{self.name}.{method}")
                return await wait_reply(fut, deadline, node.loop, f"{self.name}.{method}")
            except (asyncio.CancelledError, DeadlineExceeded):
                # Nobody waits for the answer any more: stop the work (and what it called).
                cell.cancel(msg)
                raise
        return await node.call(node.peer(self.endpoint, self.pid, self.host), self.name, method, args,
                               kwargs or None, deadline=deadline, ctx=ctx)

    async def tell(self, method: str, /, *args: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Send ``method`` one way. Returns once the message is accepted for delivery; a full
        mailbox or transport pushes back (this awaits), up to the deadline. Errors in the
        handler are logged and counted on the receiving side, not returned."""
        node = self._node
        if node is None or node.closed:
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
        peer = node.peer(self.endpoint, self.pid, self.host)
        peer.check_alive(self.name)
        sent = peer.send(Kind.TELL, next(node.corr), self.name, method, deadline, [list(args), kwargs or None],
                         ctx=ctx)
        if sent is not None:
            await peer.wait_sent(sent, deadline, f"{self.name}.{method}")

    async def stream(self, method: str, /, *args: Any, timeout: float | None = None, window: int | None = None,
                     **kwargs: Any) -> AsyncIterator[Any]:
        """Iterate over the items an async-generator handler yields.

        At most ``window`` items are in flight (the producer waits for the consumer), and
        leaving the loop early cancels the producer. ``timeout`` bounds the whole stream."""
        node = self._node
        if node is None or node.closed:
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
            peer = node.peer(self.endpoint, self.pid, self.host)
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
                if peer.streams.pop(corr, None) is not None and not peer.sock.closed:
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


