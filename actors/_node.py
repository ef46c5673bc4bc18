"""A node is one process's messaging hub.

Every process that hosts actors, or calls them, runs one node:

- one ROUTER socket bound at the node's endpoint: requests to this process's actors and
  control operations come in here, and replies go back over the connection they came on;
- one DEALER per peer node it calls (a :class:`Peer`): requests go out, replies come back on
  the same connection, so per sender-receiver pair everything is FIFO.

Replies never queue behind requests: they arrive on the DEALERs, not on the ROUTER, so an
actor whose mailbox is full (the ROUTER stops reading) can still get its own replies.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import msgpack
import zmq

from ..transport import _monitor
from ..transport._endpoints import check_endpoint, host_id, ipc_path
from ..transport._errors import ConfigurationError, DeadlineExceeded, ProtocolError, SerializationError, TransportClosed
from ..transport._socket import AsyncSocket, Unroutable, configure
from ..transport._wire import EXT_REF, Codec, Envelope, Kind, Limits, error_body
from ._errors import ActorDied, ActorInitFailed, ActorNotFound, RemoteError, SystemClosed
from ._messages import Message, RemoteReply, StreamCredit, StreamSink
from ._ratelimit import RateLimitedLog
from ._tasks import TaskSet

if TYPE_CHECKING:
    from ._cell import ActorCell
    from ._ref import ActorRef

ControlHandler = Callable[[Envelope], Awaitable[Any]]


class _Unset:
    pass


UNSET = _Unset()


class NodeConfig:
    """Settings shared by every node of a system (they travel to actor processes)."""

    __slots__ = ("hwm", "max_header_bytes", "max_frames", "max_frame_bytes", "mailbox_size", "stream_window", "default_timeout")

    def __init__(
        self,
        *,
        hwm: int = 10_000,
        max_header_bytes: int = 64 << 20,
        max_frames: int = 1024,
        max_frame_bytes: int = 1 << 30,
        mailbox_size: int = 1024,
        stream_window: int = 64,
        default_timeout: float = 300.0,
    ) -> None:
        for key, value in (("hwm", hwm), ("max_header_bytes", max_header_bytes), ("max_frames", max_frames),
                           ("max_frame_bytes", max_frame_bytes), ("mailbox_size", mailbox_size),
                           ("stream_window", stream_window)):
            if type(value) is not int or value <= 0:
                raise ConfigurationError(f"{key} must be a positive int, got {value!r}")
        if not (isinstance(default_timeout, (int, float)) and default_timeout > 0):
            raise ConfigurationError(f"default_timeout must be a positive number (or math.inf), got {default_timeout!r}")
        self.hwm = hwm
        self.max_header_bytes = max_header_bytes
        self.max_frames = max_frames
        self.max_frame_bytes = max_frame_bytes
        self.mailbox_size = mailbox_size
        self.stream_window = stream_window
        self.default_timeout = float(default_timeout)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeConfig:
        return cls(**d)


def error_from_body(body: list[Any], actor: str | None, method: str | None) -> BaseException:
    code, type_name, message, tb, _details = body
    if code == "remote":
        return RemoteError(message, remote_type=type_name or "Exception", remote_traceback=tb, actor=actor, method=method)
    if code == "not_found":
        return ActorNotFound(message)
    if code == "deadline":
        return DeadlineExceeded(message)
    if code == "protocol":
        return ProtocolError(message)
    if code == "serialization":
        return SerializationError(message)
    if code == "died":
        return ActorDied(message, actor=actor)
    if code == "init_failed":
        return ActorInitFailed(message, actor=actor or "?", remote_traceback=tb)
    return SystemClosed(message)


def process_gone(pid: int) -> bool:
    """True when pid is not a live process here (gone, or a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state in (b"Z", b"X")


class NodeStats:
    __slots__ = ("rejected_frames", "late_replies", "unroutable_replies", "tell_failures", "received", "sent")

    def __init__(self) -> None:
        self.rejected_frames = 0
        self.late_replies = 0
        self.unroutable_replies = 0
        self.tell_failures = 0
        self.received = 0
        self.sent = 0

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class Node:
    def __init__(self, node_id: str, endpoint: str, config: NodeConfig) -> None:
        self.id = node_id
        self.endpoint = endpoint
        self.config = config
        self.pid = os.getpid()
        self.host = host_id()
        self.codec = Codec(Limits(max_header_bytes=config.max_header_bytes, max_frames=config.max_frames,
                                  max_frame_bytes=config.max_frame_bytes))
        self.codec.register(_ref_type(), self._encode_ref, EXT_REF, self._decode_ref)
        self.cells: dict[str, ActorCell] = {}
        self.peers: dict[str, Peer] = {}
        self.control: dict[str, ControlHandler] = {}
        self.streams: dict[tuple[bytes, int], StreamCredit] = {}
        self.stats = NodeStats()
        self.tasks = TaskSet(f"node {node_id}")
        self.corr = itertools.count(1)
        self.log = RateLimitedLog()
        self.closed = False
        self.full_cells: set[str] = set()
        # Messages received after a mailbox filled part way through a batch frame; they are
        # delivered, in order, before the ROUTER is read again. At most one batch long.
        self.backlog: deque[tuple[bytes, Envelope]] = deque()
        self._ctx: zmq.Context[Any] | None = None
        self._router: AsyncSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.Context(io_threads=1)
        sock = self._ctx.socket(zmq.ROUTER)
        configure(sock, hwm=self.config.hwm, max_frame_bytes=self.config.max_frame_bytes, router=True)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self._ctx.term()
            self._ctx = None
            raise ConfigurationError(f"cannot listen on {self.endpoint}: {exc}") from exc
        # A wildcard tcp port ("tcp://127.0.0.1:*") is only known after bind.
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        path = ipc_path(self.endpoint)
        if path is not None:
            os.chmod(path, 0o600)
        self._router = AsyncSocket(sock, self._on_inbound, self._loop, router=True)

    @property
    def context(self) -> zmq.Context[Any]:
        if self._ctx is None:
            raise TransportClosed(f"node {self.id} is not running")
        return self._ctx

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for peer in list(self.peers.values()):
            peer.close(SystemClosed(f"node {self.id} closed while the call was pending"))
        self.peers.clear()
        await self.tasks.aclose()
        if self._router is not None:
            self._router.close()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def stats_snapshot(self) -> dict[str, int]:
        stats = self.stats.to_dict()
        if self._router is not None:
            stats["unroutable_replies"] += self._router.unroutable
        stats["backlog"] = len(self.backlog)
        return stats

    def deadline(self, timeout: float | None) -> float | None:
        """Absolute deadline (wall clock, which is what travels) for a relative timeout."""
        if timeout is None:
            timeout = self.config.default_timeout
        elif not (timeout >= 0):  # also catches NaN
            raise ConfigurationError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
        if math.isinf(timeout):
            return None
        return time.time() + timeout

    # -- refs on the wire ----------------------------------------------------------------

    def _encode_ref(self, ref: ActorRef, oob: list[Any]) -> tuple[int, bytes]:
        return EXT_REF, msgpack.packb([ref.name, ref.endpoint, ref.pid, ref.host, ref.incarnation])

    def _decode_ref(self, data: bytes, frames: Any) -> ActorRef:
        from ._ref import ActorRef

        try:
            v = msgpack.unpackb(data, max_array_len=5, max_str_len=len(data), max_map_len=0, max_bin_len=0)
        except Exception as exc:
            raise ProtocolError(f"bad actor ref: {exc}") from exc
        if (type(v) is not list or len(v) != 5 or type(v[0]) is not str or type(v[1]) is not str
                or type(v[2]) is not int or type(v[3]) is not str or not (v[4] is None or type(v[4]) is str)):
            raise ProtocolError("bad actor ref: expected [name, endpoint, pid, host, incarnation]")
        try:
            check_endpoint(v[1])
        except ConfigurationError as exc:
            raise ProtocolError(f"bad actor ref: {exc}") from exc
        return ActorRef(v[0], v[1], v[2], v[3], v[4], node=self)

    # -- inbound: requests and control -----------------------------------------------------

    def _on_inbound(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            envs, err = self.codec.decode_all(frames, 1)
        except ProtocolError as exc:
            self._reject(identity, frames, exc)
            return
        self.stats.received += len(envs)
        if self.backlog:
            self.backlog.extend((identity, env) for env in envs)
        else:
            for i, env in enumerate(envs):
                if self._dispatch(identity, env):
                    # A mailbox filled part way through a batch: the rest waits, in order.
                    self.backlog.extend((identity, e) for e in envs[i + 1 :])
                    break
        if err is not None:
            self._reject(identity, frames, err)

    def _dispatch(self, identity: bytes, env: Envelope) -> bool:
        """Handle one inbound message; True when a mailbox is now full (reading paused)."""
        kind = env.kind
        if kind is Kind.ASK or kind is Kind.TELL or kind is Kind.STREAM:
            if env.target is None:
                self._on_control(identity, env)
                return False
            cell = self.cells.get(env.target)
            if cell is None:
                if kind is not Kind.TELL:
                    self.send_error(identity, env.corr, "not_found", "ActorNotFound",
                                    f"no actor named {env.target!r} on node {self.id}", None)
                else:
                    self.stats.tell_failures += 1
                    self.log.warning("no-actor", "tell to unknown actor %r on node %s dropped", env.target, self.id)
                return False
            args, kwargs = env.body
            credit = None
            if kind is Kind.STREAM:
                credit = StreamCredit(env.opts or self.config.stream_window)
                self.streams[(identity, env.corr)] = credit
            reply = None if kind is Kind.TELL else RemoteReply(self, identity, env.corr)
            method = cast(str, env.method)  # the codec refuses requests without one
            if cell.deliver(Message(kind, method, args, kwargs, env.deadline, reply, credit)):
                self.full_cells.add(cell.name)
                assert self._router is not None
                self._router.pause_reading()
                return True
        elif kind is Kind.CREDIT:
            credit = self.streams.get((identity, env.corr))
            if credit is not None:
                credit.grant(env.opts or 0)
        elif kind is Kind.CANCEL:
            credit = self.streams.get((identity, env.corr))
            if credit is not None:
                credit.cancel()
        else:
            self.stats.rejected_frames += 1
            self.log.warning("protocol", "node %s got a %s on its ROUTER; only requests go there", self.id, kind.name)
        return False

    def mailbox_has_room(self, cell_name: str) -> None:
        """Called by a cell when its mailbox drops below capacity: deliver what waited in
        the backlog, then resume reading."""
        self.full_cells.discard(cell_name)
        backlog = self.backlog
        while backlog and not self.full_cells:
            identity, env = backlog.popleft()
            self._dispatch(identity, env)
        if not self.full_cells and self._router is not None:
            self._router.resume_reading()

    def stream_done(self, reply: Any) -> None:
        if isinstance(reply, RemoteReply):
            self.streams.pop((reply.identity, reply.corr), None)

    def _reject(self, identity: bytes, frames: list[bytes], exc: ProtocolError) -> None:
        self.stats.rejected_frames += 1
        self.log.warning("protocol", "node %s rejected a message: %s", self.id, exc)
        corr = _salvage_corr(frames)
        if corr is not None:
            self.send_error(identity, corr, "protocol", "ProtocolError", str(exc), None)

    def _on_control(self, identity: bytes, env: Envelope) -> None:
        handler = self.control.get(env.method or "")
        if handler is None:
            if env.kind is not Kind.TELL:
                self.send_error(identity, env.corr, "not_found", "ActorNotFound",
                                f"node {self.id} has no control operation {env.method!r}", None)
            return
        self.tasks.spawn(self._run_control(handler, identity, env), name=f"control {env.method}")

    async def _run_control(self, handler: ControlHandler, identity: bytes, env: Envelope) -> None:
        try:
            result = await handler(env)
        except Exception as exc:
            if env.kind is not Kind.TELL:
                RemoteReply(self, identity, env.corr).fail(exc, "remote")
            else:
                self.log.warning("control", "control %s failed: %r", env.method, exc)
            return
        if env.kind is not Kind.TELL:
            self.send_reply(identity, Kind.REPLY, env.corr, result)

    # -- outbound replies ----------------------------------------------------------------

    def send_reply(self, identity: bytes, kind: Kind, corr: int, body: Any) -> asyncio.Future[None] | None:
        try:
            frames = self.codec.encode(kind, corr, None, None, None, None, body)
        except SerializationError as exc:
            self.send_error(identity, corr, "serialization", "SerializationError", f"the reply cannot travel: {exc}", None)
            return None
        return self._route(identity, frames)

    def send_error(self, identity: bytes, corr: int, code: str, type_name: str, message: str, tb: str | None) -> None:
        frames = self.codec.encode(Kind.ERROR, corr, None, None, None, None, error_body(code, type_name, message, tb))
        self._route(identity, frames)

    def _route(self, identity: bytes, frames: list[Any]) -> asyncio.Future[None] | None:
        router = self._router
        if router is None or router.closed:
            self.stats.unroutable_replies += 1
            return None
        self.stats.sent += 1
        try:
            return router.send([identity, *frames])
        except Unroutable:
            # The caller's connection is gone; it has already failed its pending calls.
            self.stats.unroutable_replies += 1
            return None

    # -- outbound requests ---------------------------------------------------------------

    def peer(self, endpoint: str, pid: int, host: str) -> Peer:
        peer = self.peers.get(endpoint)
        if peer is None:
            if self.closed:
                raise SystemClosed(f"node {self.id} is closed")
            peer = Peer(self, endpoint, pid, host)
            self.peers[endpoint] = peer
        return peer

    async def call(self, peer: Peer, target: str | None, method: str, args: Any,
                   kwargs: dict[str, Any] | None = None, *, timeout: float | None = None,
                   deadline: float | None | _Unset = UNSET) -> Any:
        """Ask ``target`` (None: the peer node itself) over ``peer`` and await the reply."""
        if isinstance(deadline, _Unset):
            deadline = self.deadline(timeout)
        label = f"{target}.{method}" if target else f"node {peer.endpoint} {method}"
        peer.check_alive(target or peer.endpoint)
        corr = next(self.corr)
        fut: asyncio.Future[Any] = self.loop.create_future()
        peer.calls[corr] = (fut, target, method)
        try:
            sent = peer.send(Kind.ASK, corr, target, method, deadline, [list(args), kwargs])
            if sent is not None:
                await with_deadline(sent, deadline, label)
            return await wait_reply(fut, deadline, self.loop, label)
        finally:
            peer.calls.pop(corr, None)

    def peer_died(self, endpoint: str, message: str, exitcode: int | None) -> None:
        peer = self.peers.get(endpoint)
        if peer is not None:
            peer.mark_dead(message, exitcode)


def _expire(fut: asyncio.Future[Any], label: str) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded(f"{label}: no reply before the deadline; the call may or may not have run"))


async def wait_reply(fut: asyncio.Future[Any], deadline: float | None, loop: asyncio.AbstractEventLoop,
                     label: str) -> Any:
    """Await a reply future, failing it with DeadlineExceeded at the deadline. A timer, not
    wait_for: wait_for would wrap every call in a task."""
    if deadline is None:
        return await fut
    timer = loop.call_later(max(0.0, deadline - time.time()), _expire, fut, label)
    try:
        return await fut
    finally:
        timer.cancel()


async def with_deadline(aw: Awaitable[Any], deadline: float | None, label: str) -> Any:
    if deadline is None:
        return await aw
    try:
        return await asyncio.wait_for(aw, max(0.0, deadline - time.time()))
    except asyncio.TimeoutError as exc:
        raise DeadlineExceeded(f"{label}: the deadline passed before the call completed; "
                               "it may or may not have run") from exc


def _salvage_corr(frames: list[bytes]) -> int | None:
    """Best effort: the correlation id of a rejected request, so its caller hears back."""
    if len(frames) < 2 or len(frames[1]) > 4096:
        return None
    try:
        h = msgpack.unpackb(frames[1], max_array_len=64, max_map_len=64, max_str_len=4096,
                            max_bin_len=4096, max_ext_len=4096, strict_map_key=False)
    except Exception:
        return None
    if type(h) is list and len(h) > 2 and type(h[1]) is int and h[1] in (1, 3) and type(h[2]) is int and h[2] > 0:
        return h[2]
    return None


def _ref_type() -> type:
    from ._ref import ActorRef

    return ActorRef


class Peer:
    """The calling side of one connection: a DEALER to another node, its pending calls and
    streams, and a monitor that tells when the connection drops."""

    def __init__(self, node: Node, endpoint: str, pid: int, host: str) -> None:
        self.node = node
        self.endpoint = endpoint
        self.pid = pid
        self.same_host = host == node.host
        self.calls: dict[int, tuple[asyncio.Future[Any], str | None, str | None]] = {}
        self.streams: dict[int, StreamSink] = {}
        self.dead: ActorDied | None = None
        self.connected = False
        ctx = node.context
        sock = ctx.socket(zmq.DEALER)
        configure(sock, hwm=node.config.hwm, max_frame_bytes=node.config.max_frame_bytes)
        mon = sock.get_monitor_socket(_monitor.WATCHED)
        mon.setsockopt(zmq.LINGER, 0)
        self._mon = AsyncSocket(mon, self._on_monitor, node.loop)
        try:
            sock.connect(check_endpoint(endpoint))
        except (zmq.ZMQError, ConfigurationError) as exc:
            self._mon.close()
            sock.close(linger=0)
            raise ConfigurationError(f"cannot connect to {endpoint!r}: {exc}") from exc
        self.sock = AsyncSocket(sock, self._on_reply, node.loop)

    def close(self, exc: BaseException) -> None:
        self._fail_all(exc)
        self.sock.close()
        self._mon.close()

    # -- replies -------------------------------------------------------------------------

    def _on_reply(self, frames: list[bytes]) -> None:
        node = self.node
        try:
            envs, err = node.codec.decode_all(frames)
        except ProtocolError as exc:
            envs, err = [], exc
        for env in envs:
            self._on_reply_env(env)
        if err is not None:
            node.stats.rejected_frames += 1
            node.log.warning("protocol-reply", "node %s rejected a reply from %s: %s", node.id, self.endpoint, err)

    def _on_reply_env(self, env: Envelope) -> None:
        node = self.node
        kind = env.kind
        if kind is Kind.REPLY:
            entry = self.calls.pop(env.corr, None)
            if entry is None:
                node.stats.late_replies += 1
            elif not entry[0].done():
                entry[0].set_result(env.body)
        elif kind is Kind.ITEM:
            sink = self.streams.get(env.corr)
            if sink is None:
                node.stats.late_replies += 1
            else:
                sink.item(env.body)
        elif kind is Kind.END:
            sink = self.streams.pop(env.corr, None)
            if sink is None:
                node.stats.late_replies += 1
            else:
                sink.end()
        elif kind is Kind.ERROR:
            entry = self.calls.pop(env.corr, None)
            if entry is not None:
                if not entry[0].done():
                    entry[0].set_exception(error_from_body(env.body, entry[1], entry[2]))
                return
            sink = self.streams.pop(env.corr, None)
            if sink is not None:
                sink.fail_with(error_from_body(env.body, sink.actor, sink.method))
            else:
                node.stats.late_replies += 1
        else:
            node.stats.rejected_frames += 1
            node.log.warning("protocol-reply", "node %s got a %s on a reply path", node.id, kind.name)

    def _on_monitor(self, frames: list[bytes]) -> None:
        event, _value, _ep = _monitor.parse(frames)
        if event == _monitor.CONNECTED:
            self.connected = True
            self.dead = None
        elif event == _monitor.DISCONNECTED:
            self.connected = False
            # Replies sent before the drop are already in the socket's queue: take them
            # first, so only calls that really got no answer fail.
            self.sock.drain_now()
            gone = self.same_host and process_gone(self.pid)
            why = "its process exited" if gone else "the connection dropped"
            self._fail_all(ActorDied(f"lost {self.endpoint} ({why}) while the call was pending; "
                                     "it may or may not have run"))
            if gone:
                self.dead = ActorDied(f"the process behind {self.endpoint} (pid {self.pid}) is gone")
        elif event == _monitor.CONNECT_RETRIED:
            if self.same_host and process_gone(self.pid):
                self.mark_dead(f"the process behind {self.endpoint} (pid {self.pid}) is gone", None)

    def mark_dead(self, message: str, exitcode: int | None) -> None:
        self.sock.drain_now()
        self.dead = ActorDied(message, exitcode=exitcode)
        self._fail_all(ActorDied(message + "; the call may or may not have run", exitcode=exitcode))

    def _fail_all(self, exc: BaseException) -> None:
        calls, self.calls = self.calls, {}
        for fut, _a, _m in calls.values():
            if not fut.done():
                fut.set_exception(exc)
        streams, self.streams = self.streams, {}
        for sink in streams.values():
            sink.fail_with(exc)

    # -- requests ------------------------------------------------------------------------

    def check_alive(self, actor: str) -> None:
        if self.dead is not None:
            raise ActorDied(f"actor {actor!r}: {self.dead}", actor=actor, exitcode=self.dead.exitcode)

    def send(self, kind: Kind, corr: int, target: str | None, method: str | None, deadline: float | None,
             body: Any, opts: int | None = None) -> asyncio.Future[None] | None:
        frames = self.node.codec.encode(kind, corr, self.node.id, target, method, deadline, body, opts)
        self.node.stats.sent += 1
        return self.sock.send(frames)
