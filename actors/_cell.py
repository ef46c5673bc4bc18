"""An actor cell: one actor instance, its bounded mailbox and the loop that serves it."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from ..transport._errors import DeadlineExceeded, TensorLost
from ..transport._wire import Kind
from ._actor import Actor, Handler, handlers_of
from ._context import handling
from ._errors import ActorDied, ActorNotFound
from ._messages import Message, Reply

REPLY_CACHE_SIZE = 10_000
"""Idempotency keys an actor remembers answers for (see cascada.idempotent)."""

if TYPE_CHECKING:
    from ._node import Node


class CellStats:
    __slots__ = ("handled", "failed", "expired", "cancelled", "deduped", "refused", "max_depth", "max_bytes",
                 "put_waits")

    def __init__(self) -> None:
        self.deduped = 0
        self.refused = 0  # arrived while the actor was stopping: failed back with ActorDied
        self.max_bytes = 0
        self.handled = 0
        self.failed = 0
        self.expired = 0
        self.cancelled = 0
        self.max_depth = 0
        self.put_waits = 0


class ActorCell:
    def __init__(self, node: Node, name: str, instance: Actor, incarnation: str) -> None:
        self.node = node
        self.name = name
        self.instance = instance
        self.incarnation = incarnation
        self.handlers = handlers_of(type(instance))
        self._bound = {name: getattr(instance, name) for name in self.handlers}
        self.capacity = node.config.mailbox_size
        self.capacity_bytes = node.config.mailbox_bytes
        self.bytes = 0  # held in the mailbox, counted for messages from other processes
        self.mailbox: deque[Message] = deque()
        self.stats = CellStats()
        self.running = False
        self.stopping = False
        self._wakeup: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        # Eager execution: while the loop is parked on an empty mailbox, a message is handled
        # straight from the reader callback, saving a loop iteration per message. A handler
        # that suspends finishes in `_current`, and the actor is busy until it does; a
        # concurrent one finishes in a side task, and the actor is free at once.
        self._parked = False
        self._current: asyncio.Task[None] | None = None
        # Handlers share one context, eager or not, as they would in the cell's one task.
        self._ctx = contextvars.copy_context()
        self.crashed: ActorDied | None = None
        self.replies: OrderedDict[str, _Answer] = OrderedDict()  # idempotency key -> answer
        self._side_tasks: set[asyncio.Task[None]] = set()  # concurrent handlers running now

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Run on_start, then serve. Raises whatever on_start raised."""
        await self.instance.on_start()
        self.running = True
        self._stopped = self.node.loop.create_future()
        self.node.cells[self.name] = self
        self._task = self.node.tasks.spawn(self._run(), name=f"actor {self.name}",
                                           context=self._ctx if _EAGER_CONTEXT else None)

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
            self._parked = False
            w.set_result(None)

    # -- mailbox -------------------------------------------------------------------------

    def deliver(self, msg: Message) -> bool:
        """Accept a message from the ROUTER path. Returns True when the mailbox is now full,
        so the node stops reading and zmq's queues push back on the senders."""
        if self.stopping or not self.running:
            self._refuse(msg)
            return False
        mailbox = self.mailbox
        if self._parked and self._current is None and not mailbox and self._try_eager(msg):
            return False
        mailbox.append(msg)
        depth = len(mailbox)
        if depth > self.stats.max_depth:
            self.stats.max_depth = depth
        size = msg.size
        if size:
            self.bytes += size
            if self.bytes > self.stats.max_bytes:
                self.stats.max_bytes = self.bytes
        if depth == 1:
            self._wake()
        return depth >= self.capacity or self.bytes >= self.capacity_bytes

    async def put(self, msg: Message) -> None:
        """Accept a message from this process; waits while the mailbox is full."""
        while len(self.mailbox) >= self.capacity and not self.stopping:
            self.stats.put_waits += 1
            if self._room is None or self._room.done():
                self._room = self.node.loop.create_future()
            await self._room
        self.deliver(msg)

    def _refuse(self, msg: Message) -> None:
        self.stats.refused += 1
        if msg.reply is not None:
            msg.reply.fail(ActorDied(f"actor {self.name!r} is stopping; the message was not run", actor=self.name), "died")

    def crash(self, why: str) -> None:
        """Tear the actor down at once, as if its process died: queued and running calls fail
        with ActorDied (they may or may not have run), on_stop does not run."""
        if self.crashed is not None or not self.running:
            return
        err = self.crashed = ActorDied(f"actor {self.name!r} {why}; the call may or may not have run", actor=self.name)
        self.stopping = True
        self.running = False
        self.node.cells.pop(self.name, None)
        self.node.tombstones[self.name] = err
        self.bytes = 0
        while self.mailbox:
            msg = self.mailbox.popleft()
            if msg.reply is not None:
                msg.reply.fail(err, "died")
        for task in (self._task, self._current, *self._side_tasks):
            if task is not None and not task.done():
                task.cancel()
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    def cancel(self, msg: Message) -> None:
        """The caller gave up on msg: skip it if it is still queued, cancel its handler if it
        runs (the CancelledError reaches the handler at its current await, so the calls it
        is waiting on are cancelled in turn)."""
        if msg.done or msg.cancelled:
            return
        msg.cancelled = True
        if msg.credit is not None:
            msg.credit.cancel()
        task = msg.task
        if task is not None and not task.done():
            self.stats.cancelled += 1
            task.cancel()

    def _took_one(self, msg: Message) -> None:
        if msg.size:
            self.bytes -= msg.size
        if len(self.mailbox) < self.capacity and self.bytes < self.capacity_bytes:
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
                current = self._current
                if current is not None:
                    try:
                        await current  # it reports its own errors; this only keeps the order
                    except asyncio.CancelledError:
                        me = asyncio.current_task()
                        if me is not None and me.cancelling():
                            raise  # this loop itself is being cancelled
                        # only the handler's task was: the actor serves on
                    self._current = None
                    continue
                if not mailbox:
                    if self.stopping:
                        break
                    self._wakeup = self.node.loop.create_future()
                    self._parked = True
                    try:
                        await self._wakeup
                    finally:
                        self._parked = False
                        self._wakeup = None
                    continue
                msg = mailbox.popleft()
                self._took_one(msg)
                await self._handle(msg)
        finally:
            self.running = False
            if self.node.cells.get(self.name) is self:
                self.node.cells.pop(self.name, None)
            try:
                if self.crashed is None:
                    await self.instance.on_stop()
            finally:
                if self._stopped is not None and not self._stopped.done():
                    self._stopped.set_result(None)

    async def _handle(self, msg: Message) -> None:
        if msg.cancelled:  # still queued when its caller gave up: never run
            if msg.deadline is not None and msg.deadline <= time.time():
                self.stats.expired += 1
            else:
                self.stats.cancelled += 1
            return
        reply = msg.reply
        if msg.deadline is not None and msg.deadline <= time.time():
            self.stats.expired += 1
            if reply is not None:
                reply.fail(DeadlineExceeded(f"{self.name}.{msg.method}: the deadline passed while the "
                                            "message waited in the mailbox; it was not run"), "deadline")
            return
        if msg.owners is not None:
            gone = self.node.owners.gone
            dead = [pid for pid in msg.owners if gone(pid)]
            if dead:
                self.node.tensors.stats.lost += 1
                self._fail(msg, TensorLost(
                    f"{self.name}.{msg.method}: the process that owns tensors in this message (pid "
                    f"{dead[0]}) died while it waited in the mailbox; it was not run"), "tensor_lost")
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
                self._side(self.node.tasks.spawn(self._pump(msg, handler), name=f"stream {self.name}.{msg.method}"))
            else:
                await self._pump(msg, handler)
            return
        if handler.kind == "stream":
            self._fail(msg, ActorNotFound(f"{self.name}.{msg.method} is a stream (an async generator): "
                                          "call it with ref.stream"), "not_found")
            return
        if msg.key is not None and handler.idempotent and self._answered(msg):
            return
        if handler.concurrent:
            self._side(self.node.tasks.spawn(self._call(msg, handler), name=f"{self.name}.{msg.method}"))
        else:
            await self._call(msg, handler)

    def _side(self, task: asyncio.Task[None]) -> None:
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _answered(self, msg: Message) -> bool:
        """An at-least-once call: True when its key was seen (answered from the cache, or
        made to wait for the attempt that is running); else record it and let it run."""
        key = msg.key
        assert key is not None
        answer = self.replies.get(key)
        if answer is None:
            answer = self.replies[key] = _Answer()
            if len(self.replies) > REPLY_CACHE_SIZE:
                self.replies.popitem(last=False)
            msg.reply = _RecordingReply(self, key, answer, msg.reply)
            return False
        self.stats.deduped += 1
        if answer.done:
            answer.give(msg.reply)
        elif msg.reply is not None:
            answer.waiting.append(msg.reply)
        return True

    def _killed_before_start(self, msg: Message, task: asyncio.Task[None]) -> None:
        if task.cancelled() and not msg.done:
            self._crashed_under(msg)

    def _crashed_under(self, msg: Message) -> None:
        if self.crashed is not None and msg.reply is not None:
            msg.reply.fail(self.crashed, "died")

    def _fail(self, msg: Message, exc: BaseException, code: str) -> None:
        self.stats.failed += 1
        if self.crashed is not None:  # killed under its own handler: the dead incarnation does not answer
            self._crashed_under(msg)
            return
        if msg.reply is not None:
            msg.reply.fail(exc, code)
        else:
            self.node.stats.tell_failures += 1
            self.node.log.warning(f"tell-{self.name}", "tell %s.%s failed: %s", self.name, msg.method, exc)

    def _try_eager(self, msg: Message) -> bool:
        """Handle msg now if it is a plain ask or tell; False leaves it to the loop."""
        if msg.kind is Kind.STREAM or not _EAGER_CONTEXT or msg.key is not None:
            return False
        handler = self.handlers.get(msg.method)
        if handler is None or handler.kind == "stream":
            return False
        if msg.deadline is not None and msg.deadline <= time.time():
            return False
        concurrent = handler.concurrent
        # A concurrent handler gets a context of its own, as its task would; sequential ones
        # share the cell's.
        ctx = self._ctx.copy() if concurrent else self._ctx
        if concurrent and handler.suspends:
            handler.probe -= 1
            if handler.probe > 0:
                # It awaits at once: a task that runs it from the start costs one step less
                # than a first step here and a task to finish it.
                task = self.node.tasks.spawn(self._call(msg, handler), name=f"{self.name}.{msg.method}", context=ctx)
                self._side(task)
                task.add_done_callback(functools.partial(self._killed_before_start, msg))
                return True
        # Run here, not in a task the cell's loop makes on its next turn: a concurrent handler
        # that answers without awaiting then costs no loop iteration and no task.
        # Busy while the first step runs: a message it causes (a tell to itself) must queue,
        # not run nested inside it.
        self._parked = False
        try:
            result = ctx.run(self._first_step, msg, handler)
        except Exception as exc:
            self._fail(msg, exc, "remote")
            return True
        finally:
            w = self._wakeup
            if w is not None and not w.done():
                self._parked = True
        if concurrent:
            handler.suspends = type(result) is _Suspended
            handler.probe = _EAGER_PROBE
        if type(result) is _Suspended:
            task = self.node.tasks.spawn(self._finish(msg, result), name=f"{self.name}.{msg.method}", context=ctx)
            if concurrent:  # the actor takes its next message at once
                self._side(task)
            else:
                self._parked = False
                self._current = task
            # Killed before that task's first step: _finish never runs, so answer from here.
            task.add_done_callback(functools.partial(self._killed_before_start, msg))
            return True
        self.stats.handled += 1
        if self.crashed is not None:
            self._crashed_under(msg)
        elif msg.reply is not None:
            pending = msg.reply.ok(result)
            if pending is not None:
                sent = self.node.tasks.spawn(_wait_sent(pending), name=f"{self.name} reply")
                if concurrent:
                    self._side(sent)
                else:
                    self._parked = False
                    self._current = sent
        return True

    def _first_step(self, msg: Message, handler: Handler) -> Any:
        handling.set(msg)
        fn = self._bound[handler.name]
        try:
            result = fn(*msg.args, **msg.kwargs) if msg.kwargs else fn(*msg.args)
            if handler.kind != "async":
                _ended(msg)
                return result
            try:
                yielded = result.send(None)
            except StopIteration as stop:
                _ended(msg)
                return stop.value
        except BaseException:
            _ended(msg)
            raise
        return _Suspended(result, yielded)

    async def _finish(self, msg: Message, suspended: _Suspended) -> None:
        # msg.task is set here, not when the task is made: a task cancelled before its first
        # step never enters this try, and the handler would never hear of it.
        msg.task = task = asyncio.current_task()
        try:
            if msg.cancelled and task is not None:
                task.cancel()  # cancelled before this task ran: deliver it at the handler's await
            result = await suspended
        except asyncio.CancelledError:
            if not _ended(msg):
                self._crashed_under(msg)
                raise
        except Exception as exc:
            _ended(msg)
            self._fail(msg, exc, "remote")
        else:
            _ended(msg)
            self.stats.handled += 1
            if self.crashed is not None:
                self._crashed_under(msg)
            elif msg.reply is not None:
                pending = msg.reply.ok(result)
                if pending is not None:
                    await pending
        finally:
            if self._current is asyncio.current_task():
                self._current = None
                w = self._wakeup
                if w is not None and not w.done():
                    self._parked = True

    async def _call(self, msg: Message, handler: Handler) -> None:
        if msg.cancelled:  # a concurrent handler's task, cancelled before it started
            _ended(msg)
            return
        fn = self._bound[handler.name]
        handling.set(msg)
        msg.task = asyncio.current_task()
        try:
            result = fn(*msg.args, **msg.kwargs) if msg.kwargs else fn(*msg.args)
            if handler.kind == "async":
                result = await result
        except asyncio.CancelledError:
            if not _ended(msg):
                self._crashed_under(msg)
                raise
            return
        except Exception as exc:
            _ended(msg)
            self._fail(msg, exc, "remote")
            return
        _ended(msg)
        self.stats.handled += 1
        if self.crashed is not None:
            self._crashed_under(msg)
        elif msg.reply is not None:
            pending = msg.reply.ok(result)
            if pending is not None:
                await pending

    async def _pump(self, msg: Message, handler: Handler) -> None:
        reply = msg.reply
        credit = msg.credit
        assert reply is not None and credit is not None
        if msg.cancelled:  # a concurrent stream's task, cancelled before it started
            _ended(msg)
            self.node.stream_done(reply)
            return
        handling.set(msg)
        msg.task = asyncio.current_task()
        agen = getattr(self.instance, handler.name)(*msg.args, **(msg.kwargs or {}))
        try:
            while True:
                timeout = None if msg.deadline is None else max(0.0, msg.deadline - time.time())
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    # The arguments go first, so the end can carry their leases' releases.
                    msg.args, msg.kwargs = (), None
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
        except asyncio.CancelledError:
            if not _ended(msg):
                self._crashed_under(msg)
                raise
        except Exception as exc:
            self._fail(msg, exc, "remote")
        finally:
            _ended(msg)
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
            "bytes": self.bytes,
            "capacity_bytes": self.capacity_bytes,
            "max_bytes": s.max_bytes,
            "refused": s.refused,
            "max_depth": s.max_depth,
            "handled": s.handled,
            "failed": s.failed,
            "expired": s.expired,
            "cancelled": s.cancelled,
            "deduped": s.deduped,
            "put_waits": s.put_waits,
        }


_EAGER_CONTEXT = sys.version_info >= (3, 11)  # create_task(context=) arrived in 3.11
_EAGER_PROBE = 32  # a concurrent handler that awaited at once is tried eagerly again after this many calls


class _Answer:
    __slots__ = ("done", "ok", "value", "code", "waiting")

    def __init__(self) -> None:
        self.done = False
        self.ok = True
        self.value: Any = None
        self.code = ""
        self.waiting: list[Reply] = []

    def give(self, reply: Reply | None) -> None:
        if reply is None:
            return
        if self.ok:
            reply.ok(self.value)
        else:
            reply.fail(self.value, self.code)


class _RecordingReply(Reply):
    """Answers the first attempt of a keyed call and records the answer for its repeats."""

    __slots__ = ("cell", "key", "answer", "inner")

    def __init__(self, cell: ActorCell, key: str, answer: _Answer, inner: Reply | None) -> None:
        self.cell = cell
        self.key = key
        self.answer = answer
        self.inner = inner

    def ok(self, value: Any) -> asyncio.Future[None] | None:
        a = self.answer
        a.done, a.ok, a.value = True, True, value
        for waiting in a.waiting:
            waiting.ok(value)
        a.waiting.clear()
        return None if self.inner is None else self.inner.ok(value)

    def fail(self, exc: BaseException, code: str) -> None:
        a = self.answer
        if code in ("died", "tensor_lost"):
            # Not an answer: the attempt did not complete. Forget the key so a retry runs.
            self.abandon(exc, code)
        else:
            a.done, a.ok, a.value, a.code = True, False, exc, code
            for waiting in a.waiting:
                waiting.fail(exc, code)
            a.waiting.clear()
        if self.inner is not None:
            self.inner.fail(exc, code)

    def abandon(self, exc: BaseException, code: str) -> None:
        if self.answer.done:
            return
        if self.cell.replies.get(self.key) is self.answer:
            del self.cell.replies[self.key]
        for waiting in self.answer.waiting:
            waiting.fail(exc, code)
        self.answer.waiting.clear()

    def item(self, value: Any) -> asyncio.Future[None] | None:
        return None if self.inner is None else self.inner.item(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def _ended(msg: Message) -> bool:
    """A handler ended. Forget the message here (the cell's context would otherwise keep its
    arguments, tensors and all, alive until the next message) and, if its caller cancelled
    it, take back the cancellation that ``cancel`` sent its task (the task goes on serving
    the mailbox); True then."""
    msg.done = True
    msg.task = None
    msg.args = ()
    msg.kwargs = None
    if handling.get() is msg:
        handling.set(None)
    if not msg.cancelled:
        return False
    if isinstance(msg.reply, _RecordingReply):
        msg.reply.abandon(ActorDied("the first attempt with this idempotency key was cancelled before it "
                                    "answered; the call may or may not have run"), "died")
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()
    return True


async def _wait_sent(pending: asyncio.Future[None]) -> None:
    await pending


class _Suspended:
    """A handler coroutine that was started by hand and suspended at its first await.

    Awaiting it hands each yielded future to the task that awaits us and sends results (or
    throws exceptions) back into the coroutine: the same protocol a Task speaks, so the
    handler cannot tell that its first step ran outside a task."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Any:
        coro = self.coro
        to_yield = self.first
        self.first = None
        while True:
            try:
                sent = yield to_yield
            except BaseException as exc:  # noqa: B036 - cancellation must reach the handler too
                try:
                    to_yield = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    to_yield = coro.send(sent)
                except StopIteration as stop:
                    return stop.value
