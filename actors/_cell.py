"""An actor cell: one actor instance, its bounded mailbox and the loop that serves it."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..transport._errors import DeadlineExceeded
from ..transport._wire import Kind
from ._actor import Actor, Handler, handlers_of
from ._errors import ActorDied, ActorNotFound
from ._messages import Message

if TYPE_CHECKING:
    from ._node import Node


class CellStats:
    __slots__ = ("handled", "failed", "expired", "max_depth", "put_waits")

    def __init__(self) -> None:
        self.handled = 0
        self.failed = 0
        self.expired = 0
        self.max_depth = 0
        self.put_waits = 0


class ActorCell:
    def __init__(self, node: Node, name: str, instance: Actor, incarnation: str) -> None:
        self.node = node
        self.name = name
        self.instance = instance
        self.incarnation = incarnation
        self.handlers = handlers_of(type(instance))
        self.capacity = node.config.mailbox_size
        self.mailbox: deque[Message] = deque()
        self.stats = CellStats()
        self.running = False
        self.stopping = False
        self._wakeup: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Future[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Run on_start, then serve. Raises whatever on_start raised."""
        await self.instance.on_start()
        self.running = True
        self._stopped = self.node.loop.create_future()
        self.node.cells[self.name] = self
        self._task = self.node.tasks.spawn(self._run(), name=f"actor {self.name}")

    async def stop(self) -> None:
        """Stop taking messages, finish every message already accepted, run on_stop."""
        if not self.running:
            return
        self.stopping = True
        self._wake()
        assert self._stopped is not None
        await asyncio.shield(self._stopped)

    def _wake(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    # -- mailbox -------------------------------------------------------------------------

    def deliver(self, msg: Message) -> bool:
        """Accept a message from the ROUTER path. Returns True when the mailbox is now full,
        so the node stops reading and zmq's queues push back on the senders."""
        if self.stopping or not self.running:
            self._refuse(msg)
            return False
        mailbox = self.mailbox
        mailbox.append(msg)
        depth = len(mailbox)
        if depth > self.stats.max_depth:
            self.stats.max_depth = depth
        if depth == 1:
            self._wake()
        return depth >= self.capacity

    async def put(self, msg: Message) -> None:
        """Accept a message from this process; waits while the mailbox is full."""
        while len(self.mailbox) >= self.capacity and not self.stopping:
            self.stats.put_waits += 1
            if self._room is None or self._room.done():
                self._room = self.node.loop.create_future()
            await self._room
        self.deliver(msg)

    def _refuse(self, msg: Message) -> None:
        if msg.reply is not None:
            msg.reply.fail(ActorDied(f"actor {self.name!r} is stopping; the message was not run", actor=self.name), "died")

    def _took_one(self) -> None:
        if len(self.mailbox) < self.capacity:
            room = self._room
            if room is not None and not room.done():
                room.set_result(None)
            if self.name in self.node.full_cells:
                self.node.mailbox_has_room(self.name)

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        mailbox = self.mailbox
        try:
            while True:
                if not mailbox:
                    if self.stopping:
                        break
                    self._wakeup = self.node.loop.create_future()
                    await self._wakeup
                    self._wakeup = None
                    continue
                msg = mailbox.popleft()
                self._took_one()
                await self._handle(msg)
        finally:
            self.running = False
            self.node.cells.pop(self.name, None)
            try:
                await self.instance.on_stop()
            finally:
                if self._stopped is not None and not self._stopped.done():
                    self._stopped.set_result(None)

    async def _handle(self, msg: Message) -> None:
        reply = msg.reply
        if msg.deadline is not None and msg.deadline <= time.time():
            self.stats.expired += 1
            if reply is not None:
                reply.fail(DeadlineExceeded(f"{self.name}.{msg.method}: the deadline passed while the "
                                            "message waited in the mailbox; it was not run"), "deadline")
            return
        handler = self.handlers.get(msg.method)
        if handler is None:
            self._fail(msg, ActorNotFound(f"actor {self.name!r} ({type(self.instance).__qualname__}) has no "
                                          f"public handler {msg.method!r}"), "not_found")
            return
        if msg.kind is Kind.STREAM:
            if handler.kind != "stream":
                self._fail(msg, ActorNotFound(f"{self.name}.{msg.method} is not a stream (not an async "
                                              "generator): call it with ask or tell"), "not_found")
                return
            if handler.concurrent:
                self.node.tasks.spawn(self._pump(msg, handler), name=f"stream {self.name}.{msg.method}")
            else:
                await self._pump(msg, handler)
            return
        if handler.kind == "stream":
            self._fail(msg, ActorNotFound(f"{self.name}.{msg.method} is a stream (an async generator): "
                                          "call it with ref.stream"), "not_found")
            return
        if handler.concurrent:
            self.node.tasks.spawn(self._call(msg, handler), name=f"{self.name}.{msg.method}")
        else:
            await self._call(msg, handler)

    def _fail(self, msg: Message, exc: BaseException, code: str) -> None:
        self.stats.failed += 1
        if msg.reply is not None:
            msg.reply.fail(exc, code)
        else:
            self.node.stats.tell_failures += 1
            self.node.log.warning(f"tell-{self.name}", "tell %s.%s failed: %s", self.name, msg.method, exc)

    async def _call(self, msg: Message, handler: Handler) -> None:
        fn = getattr(self.instance, handler.name)
        try:
            result = fn(*msg.args, **msg.kwargs) if msg.kwargs else fn(*msg.args)
            if handler.kind == "async":
                result = await result
        except Exception as exc:
            self._fail(msg, exc, "remote")
            return
        self.stats.handled += 1
        if msg.reply is not None:
            pending = msg.reply.ok(result)
            if pending is not None:
                await pending

    async def _pump(self, msg: Message, handler: Handler) -> None:
        reply = msg.reply
        credit = msg.credit
        assert reply is not None and credit is not None
        agen = getattr(self.instance, handler.name)(*msg.args, **(msg.kwargs or {}))
        try:
            while True:
                timeout = None if msg.deadline is None else max(0.0, msg.deadline - time.time())
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    reply.end()
                    break
                if not await credit.acquire(timeout):
                    if not credit.cancelled:
                        reply.fail(DeadlineExceeded(f"{self.name}.{msg.method}: the stream's deadline passed "
                                                    "while the consumer was not taking items"), "deadline")
                    break
                pending = reply.item(item)
                if pending is not None:
                    await pending
            self.stats.handled += 1
        except Exception as exc:
            self._fail(msg, exc, "remote")
        finally:
            await agen.aclose()
            self.node.stream_done(reply)

    # -- calls from this process (local placement) ----------------------------------------

    def offer(self, msg: Message) -> bool:
        """Accept a local message if there is room (True); False means await ``put``."""
        if len(self.mailbox) >= self.capacity and not self.stopping:
            return False
        self.deliver(msg)
        return True

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "name": self.name,
            "incarnation": self.incarnation,
            "depth": len(self.mailbox),
            "capacity": self.capacity,
            "max_depth": s.max_depth,
            "handled": s.handled,
            "failed": s.failed,
            "expired": s.expired,
            "put_waits": s.put_waits,
        }
