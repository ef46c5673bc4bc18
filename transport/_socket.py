"""A ZeroMQ socket driven straight from the event loop.

pyzmq's ``zmq.asyncio`` wraps every recv in a future and polls per call; measured here it
costs 127-134 us per ipc round trip. This module watches the socket's FD with the loop's
``add_reader`` and, on each wake-up, drains every ready message into a callback. No future
is created per message on the receive side.

The zmq FD is edge-triggered and signals "something changed", not "readable": after a wake
we must read until EAGAIN, and after any *send* we must re-check ``EVENTS``, because a send
can consume the edge that announced pending input (the classic lost wake-up).
"""

from __future__ import annotations

import asyncio
import errno
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import zmq

from ._errors import TransportClosed
from ._wire import BATCH_MARKER

# Fairness: after this many messages in one wake-up, yield to the loop and continue later.
_DRAIN_BUDGET = 512
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_ZEROCOPY_MIN = 64 * 1024
_BATCH_MAX = 64  # messages per batch frame
_BATCH_ITEM_BYTES = 16 * 1024  # larger messages always travel alone
_BATCH_BYTES = 64 * 1024  # a batch frame stays under this (every receiver accepts 64 KiB headers)


class _Hold:
    """Counts down the zero-copy frames of one message as zmq lets go of them."""

    __slots__ = ("loop", "fut", "left", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None], n: int) -> None:
        self.loop = loop
        self.fut = fut
        self.left = n

    def one_done(self) -> None:  # any thread: pyzmq's collector, or ours
        try:
            self.loop.call_soon_threadsafe(self._done)
        except RuntimeError:
            pass  # the loop is closed; nobody waits any more

    def _done(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.fut.done():
            self.fut.set_result(None)


class Unroutable(Exception):
    """Private: a ROUTER could not route a message (the peer is gone). Never leaves the
    package: callers turn it into a counted drop or a typed error."""


def configure(
    sock: zmq.Socket[Any],
    *,
    hwm: int,
    max_frame_bytes: int,
    router: bool = False,
) -> None:
    """Set the options cascada relies on, on purpose, before bind or connect."""
    # LINGER 0: close never blocks; delivery is made sure of by replies and acks, never by
    # LINGER (libzmq #4660 drops ipc messages on close despite it).
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
    if router:
        # Without MANDATORY a ROUTER silently drops what it cannot route.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


class AsyncSocket:
    """Owns one zmq socket; calls ``on_message(frames)`` for every message received."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        on_message: Callable[[list[bytes]], None],
        loop: asyncio.AbstractEventLoop,
        *,
        router: bool = False,
        batching: bool = True,
    ) -> None:
        self.sock = sock
        self._on_message = on_message
        self._loop = loop
        self._fd = int(sock.getsockopt(zmq.FD))
        self._recv = self._recv_multipart
        self._recv_one = sock.recv
        self._pending: deque[tuple[list[Any], asyncio.Future[None] | None]] = deque()
        self._drain_scheduled = False
        self._in_drain = False
        self._paused = False
        self.closed = False
        # Only ever asked for int options (EVENTS, RCVMORE).
        self._get = cast(Callable[[int], int], sock.getsockopt)
        self._send_one = sock.send
        # Batching: the first message of a loop tick goes at once; single-frame messages to
        # the same peer sent later in that tick are coalesced into one frame (see _wire).
        self._router = router
        self._batching = batching
        self._batches: dict[bytes | None, list[bytes]] = {}
        self._batch_bytes: dict[bytes | None, int] = {}
        self.unroutable = 0  # batched messages dropped because their peer was gone
        # Senders held until zmq lets go of their zero-copy frames (see _hold).
        self._holds: set[_Hold] = set()
        loop.add_reader(self._fd, self._on_ready)
        # Messages may already be waiting (the edge fired before we watched the FD).
        self._schedule_drain()

    # -- receiving -----------------------------------------------------------------------

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self.closed:
            self._drain_scheduled = True
            self._loop.call_soon(self._on_ready)

    def _on_ready(self) -> None:
        self._drain_scheduled = False
        if self.closed:
            return
        get = self._get
        self._in_drain = True
        try:
            if self._batches:
                self._flush_batches()
            events = get(_EVENTS)
            if self._pending and events & _POLLOUT:
                self._flush()
                events = get(_EVENTS)
            if self._paused:
                return
            recv = self._recv
            on_message = self._on_message
            n = 0
            # Invariant: every EVENTS reading is acted on, because reading it consumes the
            # edge that would otherwise wake us again.
            while events & _POLLIN:
                if n < 2:
                    # One message per wake-up is the request/reply case: asking EVENTS
                    # (~1.3 us, a syscall inside libzmq) beats ending on zmq.Again (~4 us).
                    on_message(recv(_NOBLOCK))
                    n += 1
                else:
                    # A burst: recv costs no syscall while messages are queued, so read
                    # until Again and pay for that once per burst.
                    while True:
                        try:
                            frames = recv(_NOBLOCK)
                        except zmq.Again:
                            break
                        on_message(frames)
                        n += 1
                        if self._paused or self.closed or n >= _DRAIN_BUDGET:
                            break
                if self._paused or self.closed:
                    return
                if n >= _DRAIN_BUDGET:
                    # Fairness: yield to the loop and continue on a later iteration.
                    self._schedule_drain()
                    return
                events = get(_EVENTS)
            if self._pending and events & _POLLOUT:
                self._flush()
                # Those sends may have consumed the edge that announces the next input.
                self._schedule_drain()
        except zmq.ZMQError:
            if self.closed:
                return
            raise
        finally:
            self._in_drain = False
            if self._batches:
                if any(self._batches.values()) and not self.closed:
                    # Replies batched while draining: send them, and look at EVENTS again
                    # afterwards, since those sends may consume the next input's edge.
                    self._flush_batches()
                    self._schedule_drain()
                else:
                    self._batches.clear()
                    self._batch_bytes.clear()

    def _recv_multipart(self, flags: int) -> list[Any]:
        # pyzmq's recv_multipart converts each option to an enum on every call; plain ints
        # and a plain loop save ~0.5 us a message.
        recv = self._recv_one
        frames: list[Any] = [recv(flags)]
        get = self._get
        if self._router and get(_RCVMORE):
            frames.append(recv(flags))  # a ROUTER's first frame is the sender's routing id
        while get(_RCVMORE):
            # Out-of-band frames (tensor data) are taken as zmq.Frame, without a copy; the
            # tensor built over one keeps it alive.
            frames.append(recv(flags, copy=False))
        return frames

    def pause_reading(self) -> None:
        """Stop draining input; zmq's queues then fill and push back on the senders."""
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._schedule_drain()

    def drain_now(self) -> None:
        """Receive whatever is queued right now (used before declaring a peer dead)."""
        if not self.closed and not self._paused:
            self._on_ready()

    # -- sending -------------------------------------------------------------------------

    def send(self, frames: list[Any], batchable: bool = True) -> asyncio.Future[None] | None:
        """Send without blocking. Returns None when the message was taken (by zmq, or into
        this tick's batch), or a future that resolves once zmq takes it (the socket is at its
        high-water mark: await it, that is the backpressure). ``batchable=False``: this
        message travels alone (in order with the rest)."""
        if self.closed:
            raise TransportClosed("send on a closed socket")
        if not self._batching:
            return self._send_now(frames)
        router = self._router
        # Only small messages are batched, and a batch stays under _BATCH_BYTES: a receiver
        # refuses a frame over its header cap as a whole, and every message in it with it.
        single = batchable and len(frames) == (2 if router else 1) and len(frames[-1]) <= _BATCH_ITEM_BYTES
        key = frames[0] if router else None
        batch = self._batches.get(key)
        if batch is not None:
            if single and frames[-1][:1] != BATCH_MARKER:
                size = self._batch_bytes.get(key, 0) + len(frames[-1])
                if size > _BATCH_BYTES:
                    self._flush_batch(key, want_future=False)  # full: it goes, this one after it
                    return self._send_now(frames)
                batch.append(frames[-1])
                self._batch_bytes[key] = size
                if len(batch) >= _BATCH_MAX:
                    return self._flush_batch(key)
                return None
            self._flush_batch(key, want_future=False)  # keep the order: the batch goes first
            return self._send_now(frames)
        pending = self._send_now(frames)
        if pending is None and single:
            self._batches[key] = []
        return pending

    def _flush_batch(self, key: bytes | None, want_future: bool = True) -> asyncio.Future[None] | None:
        self._batch_bytes.pop(key, None)
        batch = self._batches.pop(key, None)
        if not batch:
            return None
        payload = batch[0] if len(batch) == 1 else BATCH_MARKER + b"".join(batch)
        try:
            return self._send_now([key, payload] if self._router else [payload], want_future)
        except Unroutable:
            self.unroutable += len(batch)  # the peer is gone; its caller already failed these
            return None

    def _flush_batches(self) -> None:
        for key in list(self._batches):
            self._flush_batch(key, want_future=False)

    def _send_now(self, frames: list[Any], want_future: bool = True) -> asyncio.Future[None] | None:
        if self._pending:
            fut = self._loop.create_future() if want_future else None
            self._pending.append((frames, fut))
            return fut
        try:
            held = self._write(frames)
        except zmq.Again:
            fut = self._loop.create_future() if want_future else None
            self._pending.append((frames, fut))
            self._schedule_drain()
            return fut
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                raise Unroutable(str(exc)) from exc
            raise
        if held is not None:
            if not self._in_drain:
                self._schedule_drain()
            return self._hold(held)
        # A send can swallow the edge that announced input, so EVENTS must be looked at
        # again before the loop sleeps. One look per loop iteration covers every send made
        # in it (a syscall per send would halve tell throughput); a drain of this very
        # socket in progress looks anyway. That same drain flushes this tick's batches.
        if not self._in_drain:
            self._schedule_drain()
        return None

    def _write(self, frames: list[Any]) -> list[Any] | None:
        """Hand one message to zmq. Returns the frames zmq may still read from (large
        mutable buffers sent without a copy), or None."""
        send = self._send_one
        last = len(frames) - 1
        if last == 0:
            send(frames[0], _NOBLOCK)
            return None
        # Once zmq accepts the first part of a multipart message it accepts the rest, so only
        # the first send can raise Again. Small frames are copied (cheaper than tracking a
        # zero-copy buffer); large ones go without a copy, and a large *mutable* buffer (a
        # tensor's memory) is tracked, so its sender can be held until zmq is done with it:
        # a tensor changed after send must not change what the receiver gets.
        held = None
        for i, frame in enumerate(frames):
            flags = _NOBLOCK | _SNDMORE if i < last else _NOBLOCK
            if len(frame) < _ZEROCOPY_MIN:
                send(frame, flags)
            elif type(frame) is bytes:
                send(frame, flags, copy=False)
            else:
                send(frame, flags, copy=False)
                if held is None:
                    held = []
                held.append(frame)
        return held

    def _hold(self, held: list[Any], fut: asyncio.Future[None] | None = None) -> asyncio.Future[None]:
        """A future that resolves once zmq has let go of every zero-copy frame in ``held``.

        pyzmq keeps a frame's buffer object referenced until libzmq frees the message (its
        garbage-collector thread drops it). Each buffer here is a fresh object made for this
        send (see transport/_tensors.py), so its finalizer tells the moment zmq is done,
        from whichever thread that is: no polling, no timer granularity in the way."""
        if fut is None:
            fut = self._loop.create_future()
        hold = _Hold(self._loop, fut, len(held))
        self._holds.add(hold)
        fut.add_done_callback(lambda _f: self._holds.discard(hold))
        for obj in held:
            weakref.finalize(obj, hold.one_done)
        return fut

    def _flush(self) -> None:
        while self._pending:
            frames, fut = self._pending[0]
            try:
                held = self._write(frames)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                self._pending.popleft()
                if fut is not None and not fut.done():
                    err: BaseException = (
                        Unroutable(str(exc)) if exc.errno == errno.EHOSTUNREACH else exc
                    )
                    fut.set_exception(err)
                continue
            self._pending.popleft()
            if fut is not None and not fut.done():
                if held is not None:
                    self._hold(held, fut)
                else:
                    fut.set_result(None)
        if not self._in_drain:
            self._schedule_drain()

    @property
    def backlog(self) -> int:
        """Messages waiting for zmq to take them (the socket is at its high-water mark)."""
        return len(self._pending)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._loop.remove_reader(self._fd)
        except (ValueError, OSError, RuntimeError):
            pass  # the loop is already closed; the FD goes with the socket below
        self._batches.clear()
        self._batch_bytes.clear()
        for hold in list(self._holds):
            if not hold.fut.done():
                hold.fut.set_exception(TransportClosed("socket closed while zmq still held a zero-copy frame"))
        self._holds.clear()
        while self._pending:
            _, fut = self._pending.popleft()
            if fut is not None and not fut.done():
                fut.set_exception(TransportClosed("socket closed before the message was sent"))
        self.sock.close(linger=0)
