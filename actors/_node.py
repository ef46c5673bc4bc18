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
import math
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import msgpack
import zmq

from ..transport import _monitor
from ..transport._endpoints import check_endpoint, host_id, ipc_path, process_gone
from ..transport._errors import (
    CascadaError,
    ConfigurationError,
    DeadlineExceeded,
    HandleNotPortable,
    PoolExhausted,
    ProtocolError,
    SerializationError,
    TensorLost,
    TransportClosed,
)
from ..transport._socket import AsyncSocket, Unroutable, configure
from ..transport._tensors import Destination, PoolBusy, TensorCodec, TensorOptions
from ..transport._wire import DEFAULT_MAX_HEADER_BYTES, EXT_REF, Codec, Envelope, Kind, Limits, error_body
from ._errors import ActorDied, ActorInitFailed, ActorNotFound, Overloaded, RemoteError, SystemClosed
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

    __slots__ = ("hwm", "max_header_bytes", "max_frames", "max_frame_bytes", "mailbox_size", "mailbox_bytes",
                 "stream_window", "default_timeout", "tensors")

    def __init__(
        self,
        *,
        hwm: int = 10_000,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_frames: int = 1024,
        max_frame_bytes: int = 1 << 30,
        mailbox_size: int = 1024,
        mailbox_bytes: int = 64 << 20,
        stream_window: int = 64,
        default_timeout: float = 300.0,
        tensors: TensorOptions | None = None,
    ) -> None:
        for key, value in (("hwm", hwm), ("max_header_bytes", max_header_bytes), ("max_frames", max_frames),
                           ("max_frame_bytes", max_frame_bytes), ("mailbox_size", mailbox_size),
                           ("mailbox_bytes", mailbox_bytes), ("stream_window", stream_window)):
            if type(value) is not int or value <= 0:
                raise ConfigurationError(f"{key} must be a positive int, got {value!r}")
        if not (isinstance(default_timeout, (int, float)) and default_timeout > 0):
            raise ConfigurationError(f"default_timeout must be a positive number (or math.inf), got {default_timeout!r}")
        self.hwm = hwm
        if max_header_bytes < 64 * 1024:
            raise ConfigurationError(f"max_header_bytes must be at least 65536 (batches of small messages "
                                     f"are up to 64 KiB), got {max_header_bytes}")
        self.max_header_bytes = max_header_bytes
        self.max_frames = max_frames
        self.max_frame_bytes = max_frame_bytes
        self.mailbox_size = mailbox_size
        self.mailbox_bytes = mailbox_bytes
        self.stream_window = stream_window
        self.default_timeout = float(default_timeout)
        self.tensors = tensors or TensorOptions()

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["tensors"] = self.tensors.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeConfig:
        d = dict(d)
        d["tensors"] = TensorOptions.from_dict(d["tensors"])
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
    if code == "tensor_lost":
        return TensorLost(message)
    if code == "pool_exhausted":
        return PoolExhausted(message)
    if code == "not_portable":
        return HandleNotPortable(message)
    return SystemClosed(message)


# Errors raised while encoding a reply that travel back to the caller under their own code.
_SEND_ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (SerializationError, "serialization"), (PoolExhausted, "pool_exhausted"),
    (HandleNotPortable, "not_portable"), (TensorLost, "tensor_lost"),
)


def send_error_code(exc: BaseException) -> str | None:
    for type_, code in _SEND_ERROR_CODES:
        if isinstance(exc, type_):
            return code
    return None


LEASE_SWEEP_INTERVAL = 0.25  # seconds between checks for dead consumers while leases are out


class NodeStats:
    __slots__ = ("rejected_frames", "late_replies", "stale_replies", "dropped_connections", "retries", "unroutable_replies",
                 "tell_failures", "received", "sent")

    def __init__(self) -> None:
        self.rejected_frames = 0
        self.late_replies = 0
        self.stale_replies = 0  # replies from an incarnation that was replaced: fenced off
        self.dropped_connections = 0  # to dead peers, with whatever zmq still queued for them
        self.retries = 0  # at-least-once calls sent again
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
        self.tensors = TensorCodec(config.tensors, host=self.host, owner_endpoint=endpoint,
                                   process_gone=process_gone, on_release=self._lease_released)
        self.tensors.leases.on_change = self._leases_changed
        self.codec.install_tensors(self.tensors)
        self._releases: deque[tuple[str, int, int]] = deque()
        self._release_scheduled = False
        self._sweeper: asyncio.Task[None] | None = None
        self._room: asyncio.Event | None = None  # set when a pool segment comes free
        self._dests: dict[bytes, Destination] = {}
        self._routing_ids = itertools.count(1)
        self._thread = 0
        # Replies waiting for room in the shm pool, per caller connection: later replies to
        # the same caller queue behind them, so per-pair order holds.
        self._reply_queues: dict[bytes, _SendQueue] = {}
        self.cells: dict[str, ActorCell] = {}
        self.peers: dict[str, Peer] = {}
        self.control: dict[str, ControlHandler] = {}
        self.control_sync: dict[str, Callable[[Envelope], None]] = {}  # one-way, run inline
        self.streams: dict[tuple[bytes, int], StreamCredit] = {}
        # Requests from remote callers not answered yet, so a CANCEL can find them.
        self.running: dict[tuple[bytes, int], Message] = {}
        self.incarnation: str | None = None  # of the actor this node hosts (stamped on replies)
        # endpoint -> (pid, incarnation) of an actor restarted there: a peer made from an old
        # ref takes these, not the ref's stale pid.
        self.endpoint_pids: dict[str, tuple[int, str | None]] = {}
        # Actors of this node that died and were not restarted (or wait for it): calls to
        # them fail with this, not ActorNotFound.
        self.tombstones: dict[str, BaseException] = {}
        self.dead_endpoints: dict[str, ActorDied] = {}  # the same, by address, for peers made later
        self.stats = NodeStats()
        self.tasks = TaskSet(f"node {node_id}")
        self.corr = itertools.count(1)
        self.log = RateLimitedLog()
        self.closed = False
        self.full_cells: set[str] = set()
        self._inbound_size = 0
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
        self.tensors.owner_endpoint = self.endpoint
        self._thread = threading.get_ident()
        self.tensors.pool_waker = self._wake_room
        self.control_sync["lease.release"] = self._on_lease_release
        self.control_sync["peer.update"] = self._on_peer_update

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
        self.tensors.on_release = None
        self.tensors.close()

    def stats_snapshot(self) -> dict[str, int]:
        stats = self.stats.to_dict()
        if self._router is not None:
            stats["unroutable_replies"] += self._router.unroutable
        stats["backlog"] = len(self.backlog)
        return stats

    def tensor_stats(self) -> dict[str, Any]:
        return self.tensors.snapshot()

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
        except (ProtocolError, TensorLost) as exc:
            self._reject(identity, frames, exc)
            return
        self.stats.received += len(envs)
        # What each message holds in a mailbox: its frames (a batch's frame shared out evenly).
        self._inbound_size = sum(len(f) for f in frames[1:]) // len(envs) if envs else 0
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
            msg = Message(kind, method, args, kwargs, env.deadline, reply, credit, env.owners, env.ctx, env.target,
                          env.key)
            msg.size = self._inbound_size
            if reply is not None:
                self.running[(identity, env.corr)] = msg
            if cell.deliver(msg):
                self.full_cells.add(cell.name)
                assert self._router is not None
                self._router.pause_reading()
                return True
        elif kind is Kind.CREDIT:
            credit = self.streams.get((identity, env.corr))
            if credit is not None:
                credit.grant(env.opts or 0)
        elif kind is Kind.CANCEL:
            wanted = self.running.pop((identity, env.corr), None)
            if wanted is not None:
                cell = self.cells.get(wanted.target)
                if cell is not None:
                    cell.cancel(wanted)
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
            self.running.pop((reply.identity, reply.corr), None)

    def _reject(self, identity: bytes, frames: list[bytes], exc: Exception) -> None:
        corr = _salvage_corr(frames)
        if isinstance(exc, TensorLost):
            # Not the sender's fault: a leased tensor's owner died or its lease expired.
            self.tensors.stats.lost += 1
            if corr is not None:
                self.send_error(identity, corr, "tensor_lost", "TensorLost", str(exc), None)
            return
        self.stats.rejected_frames += 1
        self.log.warning("protocol", "node %s rejected a message: %s", self.id, exc)
        if corr is not None:
            self.send_error(identity, corr, "protocol", "ProtocolError", str(exc), None)

    def _on_control(self, identity: bytes, env: Envelope) -> None:
        sync = self.control_sync.get(env.method or "")
        if sync is not None and env.kind is Kind.TELL:
            try:
                sync(env)
            except ProtocolError as exc:
                self.stats.rejected_frames += 1
                self.log.warning("control", "control %s rejected: %s", env.method, exc)
            return
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
        queue = self._reply_queues.get(identity)
        if queue is not None:
            return queue.push((identity, kind, corr, body))
        try:
            return self._encode_reply(identity, kind, corr, body)
        except PoolBusy:
            queue = self._reply_queues[identity] = _SendQueue(self, self._encode_reply,
                                                              lambda: self._reply_queues.pop(identity, None))
            return queue.push((identity, kind, corr, body))

    def _encode_reply(self, identity: bytes, kind: Kind, corr: int, body: Any,
                      deadline: float | None = None) -> asyncio.Future[None] | None:
        self.tensors.dest = self.dest_for(identity)
        try:
            frames = self.codec.encode(kind, corr, None, None, None, None, body, None, self.incarnation)
        except PoolBusy:
            raise
        except CascadaError as exc:
            code = send_error_code(exc)
            if code is None:
                raise
            self.send_error(identity, corr, code, type(exc).__name__, f"the reply cannot travel: {exc}", None)
            return None
        return self._route(identity, frames)

    def dest_for(self, identity: bytes) -> Destination:
        """Where a reply to this caller connection goes (its routing id names its pid and host)."""
        dest = self._dests.get(identity)
        if dest is None:
            dest = _parse_routing_id(identity, self.host)
            if len(self._dests) > 4096:
                self._dests.clear()
            self._dests[identity] = dest
        return dest

    def routing_id(self) -> bytes:
        return f"{self.pid}.{next(self._routing_ids)}.{self.host[:12]}".encode()

    def send_error(self, identity: bytes, corr: int, code: str, type_name: str, message: str, tb: str | None) -> None:
        frames = self.codec.encode(Kind.ERROR, corr, None, None, None, None, error_body(code, type_name, message, tb),
                                   None, self.incarnation)
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
            moved = self.endpoint_pids.get(endpoint)
            peer = Peer(self, endpoint, pid if moved is None else moved[0], host)
            if moved is not None:
                peer.incarnation = moved[1]
            peer.dead = self.dead_endpoints.get(endpoint)
            self.peers[endpoint] = peer
        return peer

    def bury(self, endpoint: str, died: ActorDied) -> None:
        """Calls to endpoint fail with died from now on (until an actor is restarted there)."""
        if len(self.dead_endpoints) > 65536:
            self.dead_endpoints.clear()
        self.dead_endpoints[endpoint] = died
        peer = self.peers.get(endpoint)
        if peer is not None:
            peer.dead = died

    def update_peer(self, endpoint: str, pid: int, incarnation: str | None) -> None:
        """A restarted actor listens at endpoint again, as pid: talk to it from now on, and
        fence off replies from the incarnation before."""
        if len(self.endpoint_pids) > 65536:
            self.endpoint_pids.clear()
        self.endpoint_pids[endpoint] = (pid, incarnation)
        self.dead_endpoints.pop(endpoint, None)
        peer = self.peers.get(endpoint)
        if peer is not None:
            peer.revive(pid, incarnation)

    def _on_peer_update(self, env: Envelope) -> None:
        args = env.body[0]
        if not (len(args) == 3 and type(args[0]) is str and type(args[1]) is int
                and type(args[2]) in (str, type(None))):
            raise ProtocolError("peer.update needs [endpoint, pid, incarnation]")
        self.update_peer(args[0], args[1], args[2])

    async def call(self, peer: Peer, target: str | None, method: str, args: Any,
                   kwargs: dict[str, Any] | None = None, *, timeout: float | None = None,
                   deadline: float | None | _Unset = UNSET, ctx: list[Any] | None = None,
                   key: str | None = None) -> Any:
        """Ask ``target`` (None: the peer node itself) over ``peer`` and await the reply."""
        if isinstance(deadline, _Unset):
            deadline = self.deadline(timeout)
        label = f"{target}.{method}" if target else f"node {peer.endpoint} {method}"
        peer.check_alive(target or peer.endpoint)
        corr = next(self.corr)
        fut: asyncio.Future[Any] = self.loop.create_future()
        peer.calls[corr] = (fut, target, method)
        try:
            sent = peer.send(Kind.ASK, corr, target, method, deadline, [list(args), kwargs], ctx=ctx, key=key)
            if sent is not None:
                await peer.wait_sent(sent, deadline, label)
            return await wait_reply(fut, deadline, self.loop, label)
        except (asyncio.CancelledError, DeadlineExceeded):
            # Nobody waits for the answer any more: tell the callee to stop the work (and
            # what it called in turn). Best effort: a callee that already answered ignores it.
            if corr in peer.calls and peer.dead is None and not peer.sock.closed and target is not None:
                peer.send(Kind.CANCEL, corr, target, None, None, None)
            raise
        finally:
            peer.calls.pop(corr, None)

    def peer_died(self, endpoint: str, message: str, exitcode: int | None) -> None:
        peer = self.peers.get(endpoint)
        if peer is not None:
            peer.mark_dead(message, exitcode)

    def process_died(self, pid: int) -> None:
        """A process on this host is gone: its leases on our tensors end now, and cached
        mappings of its segments are dropped."""
        tensors = self.tensors
        if len(tensors.leases):
            tensors.leases.expire_consumer((self.host, pid))
        if tensors._reader is not None:
            tensors._reader.forget_owner(pid)

    # -- leases ----------------------------------------------------------------------------

    def _lease_released(self, owner_endpoint: str, owner_pid: int, lease_id: int) -> None:
        """A received tensor was freed (on any thread): tell its owner, batched per tick."""
        self._releases.append((owner_endpoint, owner_pid, lease_id))
        if self._release_scheduled or self.closed or self._loop is None:
            return
        self._release_scheduled = True
        try:
            if threading.get_ident() == self._thread:
                self._loop.call_soon(self._flush_releases)
            else:
                self._loop.call_soon_threadsafe(self._flush_releases)
        except RuntimeError:
            pass  # the loop is closed: the owner expires these leases when we are gone

    def _flush_releases(self) -> None:
        self._release_scheduled = False
        by_owner: dict[tuple[str, int], list[int]] = {}
        q = self._releases
        while q:
            ep, pid, lease_id = q.popleft()
            by_owner.setdefault((ep, pid), []).append(lease_id)
        for (ep, pid), ids in by_owner.items():
            if self.closed:
                return
            if ep == self.endpoint:
                self.tensors.leases.release(ids)
                continue
            try:
                peer = self.peer(ep, pid, self.host)
                if peer.dead is None:
                    peer.send(Kind.TELL, next(self.corr), None, "lease.release", None, [[ids], None])
            except CascadaError as exc:
                self.log.warning("lease", "could not release %d leases to %s: %s", len(ids), ep, exc)

    def _on_lease_release(self, env: Envelope) -> None:
        args = env.body[0]
        if len(args) != 1 or type(args[0]) is not list or not all(type(i) is int for i in args[0]):
            raise ProtocolError("lease.release takes one list of lease ids")
        self.tensors.leases.release(args[0])

    def _leases_changed(self) -> None:
        if len(self.tensors.leases) and (self._sweeper is None or self._sweeper.done()) and not self.closed:
            self._sweeper = self.tasks.spawn(self._sweep_leases(), name="lease sweeper")

    async def _sweep_leases(self) -> None:
        tensors = self.tensors
        leases = tensors.leases
        while len(leases) and not self.closed:
            await asyncio.sleep(LEASE_SWEEP_INTERVAL)
            leases.sweep()
            if tensors._pool is not None:
                tensors._pool.sweep()
            if tensors._cuda is not None:
                tensors._cuda.collect()
        if tensors._cuda is not None and not self.closed:
            tensors._cuda.collect(force=True)  # the last leases' blocks leave torch's limbo

    def _wake_room(self) -> None:
        """A pool segment came free (any thread): wake senders waiting for room."""
        if self._room is None or self._loop is None or self.closed:
            return
        if threading.get_ident() == self._thread:
            self._room.set()
        else:
            try:
                self._loop.call_soon_threadsafe(self._room.set)
            except RuntimeError:
                pass

    async def wait_for_room(self, deadline: float | None) -> None:
        """Wait until a pool segment comes free, or fail with PoolExhausted at the deadline."""
        if self._room is None:
            self._room = asyncio.Event()
        self._room.clear()
        pool = self.tensors.pool
        timeout = None if deadline is None else deadline - time.time()
        if timeout is not None and timeout <= 0:
            raise PoolExhausted(f"the shared-memory pool ({pool.max_bytes} bytes) stayed full until the "
                                "deadline: release received tensors sooner or raise shm_pool_bytes")
        # Leases of dead consumers may be all that holds the pool: look now, then wait.
        self.tensors.leases.sweep()
        pool.sweep()
        try:
            await asyncio.wait_for(self._room.wait(), min(timeout, LEASE_SWEEP_INTERVAL) if timeout else LEASE_SWEEP_INTERVAL)
        except asyncio.TimeoutError:
            pass


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


async def wait_room(aw: Awaitable[Any], deadline: float | None, label: str) -> Any:
    """Await room for a message (a full mailbox, a transport at its high-water mark): at the
    deadline, Overloaded. The message cannot run after that: receivers drop expired work."""
    if deadline is None:
        return await aw
    try:
        return await asyncio.wait_for(aw, max(0.0, deadline - time.time()))
    except asyncio.TimeoutError as exc:
        raise Overloaded(f"{label}: the callee's mailbox stayed full until the deadline; the message "
                         "was not run (it is safe to retry; see the callee's mailbox stats)") from exc


async def with_deadline(aw: Awaitable[Any], deadline: float | None, label: str) -> Any:
    if deadline is None:
        return await aw
    try:
        return await asyncio.wait_for(aw, max(0.0, deadline - time.time()))
    except asyncio.TimeoutError as exc:
        raise DeadlineExceeded(f"{label}: the deadline passed before the call completed; "
                               "it may or may not have run") from exc


def _salvage_corr(frames: list[bytes], replies: bool = False) -> int | None:
    """Best effort: the correlation id of a message that could not be decoded, so its caller
    (or, for a reply, the pending call) hears back instead of waiting out its deadline. Reads
    only the first three header fields, raw, so whatever broke the rest (bad UTF-8, a deep
    or truncated tail, an unknown ext type) does not hide the address."""
    if len(frames) < 2:
        return None
    head = frames[1]
    if not head or head[:1] == b"\xc1":  # a batch frame carries many messages: no single address
        return None
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False, ext_hook=lambda code, data: None,
                                max_buffer_size=64)
    try:
        unpacker.feed(bytes(head[:32]))
        if unpacker.read_array_header() < 3:
            return None
        version, kind, corr = unpacker.unpack(), unpacker.unpack(), unpacker.unpack()
    except Exception:  # noqa: BLE001 - an unreadable prefix: no reply address
        return None
    kinds = (4, 5, 6, 7) if replies else (1, 3)
    if version == 1 and type(kind) is int and kind in kinds and type(corr) is int and corr > 0:
        return corr
    return None


def _parse_routing_id(identity: bytes, host: str) -> Destination:
    # "<pid>.<n>.<host prefix>", set by Peer on its DEALER; anything else is a caller we
    # know nothing about, so its tensors travel inline (never by shm name).
    try:
        pid_s, _n, tag = identity.decode("ascii").split(".")
        pid = int(pid_s)
    except (UnicodeDecodeError, ValueError):
        return Destination(False, ("", 0))
    if tag == host[:12]:
        return Destination(True, (host, pid))
    return Destination(False, (tag, pid))


class _SendQueue:
    """Messages to one connection waiting for room in the shm pool, sent in order. While a
    queue exists every later message to that connection goes through it (per-pair FIFO)."""

    def __init__(self, node: Node, encode_send: Callable[..., asyncio.Future[None] | None],
                 on_empty: Callable[[], object]) -> None:
        self.node = node
        self._encode_send = encode_send
        self._on_empty = on_empty
        self._items: deque[tuple[tuple[Any, ...], float | None, asyncio.Future[None]]] = deque()
        self._task = node.tasks.spawn(self._run(), name="shm wait queue")

    def push(self, args: tuple[Any, ...], deadline: float | None = None) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.node.loop.create_future()
        self._items.append((args, deadline, fut))
        return fut

    def owns(self, fut: asyncio.Future[None]) -> bool:
        return any(f is fut for _a, _d, f in self._items)

    async def _run(self) -> None:
        node = self.node
        try:
            await asyncio.sleep(0)
            while self._items:
                args, deadline, fut = self._items[0]
                if fut.done():  # given up on by its sender (cancelled): it must not go
                    self._items.popleft()
                    continue
                try:
                    sent = self._encode_send(*args)
                except PoolBusy:
                    try:
                        await node.wait_for_room(deadline if deadline is not None else _reply_deadline())
                    except PoolExhausted as exc:
                        self._items.popleft()
                        _fail_send(fut, args, exc, node)
                    continue
                except BaseException as exc:
                    self._items.popleft()
                    if not fut.done():
                        fut.set_exception(exc)
                    continue
                self._items.popleft()
                if sent is not None:
                    try:
                        await sent
                    except BaseException as exc:
                        if not fut.done():
                            fut.set_exception(exc)
                        continue
                if not fut.done():
                    fut.set_result(None)
        finally:
            self._on_empty()
            for _args, _d, fut in self._items:
                if not fut.done():
                    fut.set_exception(TransportClosed("the node closed while the message waited for room in the shm pool"))


def _reply_deadline() -> float:
    # Replies carry no deadline of their own; a reply waits for pool room at most this long.
    return time.time() + 30.0


def _fail_send(fut: asyncio.Future[None], args: tuple[Any, ...], exc: PoolExhausted, node: Node) -> None:
    if len(args) == 4 and type(args[0]) is bytes:  # a reply: the caller hears of it
        identity, _kind, corr, _body = args
        node.send_error(identity, corr, "pool_exhausted", "PoolExhausted", str(exc), None)
        if not fut.done():
            fut.set_result(None)
    elif not fut.done():
        fut.set_exception(exc)


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
        self.host = host
        self.incarnation: str | None = None  # when known: replies from any other are stale
        self.dest = Destination(self.same_host, (host, pid))
        self._queue: _SendQueue | None = None  # sends waiting for room in the shm pool
        self._open()

    def _open(self) -> None:
        node = self.node
        sock = node.context.socket(zmq.DEALER)
        configure(sock, hwm=node.config.hwm, max_frame_bytes=node.config.max_frame_bytes)
        # The routing id tells the other side our pid and host, so the tensors in its
        # replies can take the shm path and their leases end if we die.
        sock.setsockopt(zmq.ROUTING_ID, node.routing_id())
        mon = sock.get_monitor_socket(_monitor.WATCHED)
        mon.setsockopt(zmq.LINGER, 0)
        self._mon = AsyncSocket(mon, self._on_monitor, node.loop)
        try:
            sock.connect(check_endpoint(self.endpoint))
        except (zmq.ZMQError, ConfigurationError) as exc:
            self._mon.close()
            sock.close(linger=0)
            raise ConfigurationError(f"cannot connect to {self.endpoint!r}: {exc}") from exc
        self.sock = AsyncSocket(sock, self._on_reply, node.loop)

    def _drop_socket(self) -> None:
        """The process behind this endpoint is gone: drop the connection and whatever zmq still
        queued for it, so none of it reaches a later incarnation bound to the same address."""
        if not self.sock.closed and self.dead is not None:
            self.node.stats.dropped_connections += 1
            self._close_sockets()

    def close(self, exc: BaseException) -> None:
        self._fail_all(exc)
        self._close_sockets()

    def _close_sockets(self) -> None:
        # Monitoring off first: a monitor event libzmq emits for a socket whose monitor PAIR
        # is already gone blocks its I/O thread for good (libzmq #3575), wedging the context.
        if not self.sock.closed:
            try:
                self.sock.sock.disable_monitor()
            except zmq.ZMQError:
                pass
        self.sock.close()
        self._mon.close()

    def revive(self, pid: int, incarnation: str | None) -> None:
        """The actor behind this endpoint was restarted as pid: talk to it on a new connection."""
        self.pid = pid
        self.dest = Destination(self.same_host, (self.host, pid))
        self.incarnation = incarnation
        self.dead = None
        if self.sock.closed and not self.node.closed:
            self._open()

    # -- replies -------------------------------------------------------------------------

    def _on_reply(self, frames: list[bytes]) -> None:
        node = self.node
        try:
            envs, err = node.codec.decode_all(frames)
        except (ProtocolError, TensorLost) as exc:
            envs, err = [], exc
        for env in envs:
            self._on_reply_env(env)
        if err is not None:
            if isinstance(err, TensorLost):
                node.tensors.stats.lost += 1
            else:
                node.stats.rejected_frames += 1
                node.log.warning("protocol-reply", "node %s rejected a reply from %s: %s", node.id, self.endpoint, err)
            # The call it answered must not wait out its deadline: fail it with the reason.
            corr = _salvage_corr([b"", *frames], replies=True) if not envs else None
            if corr is not None:
                entry = self.calls.pop(corr, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_exception(err)

    def _on_reply_env(self, env: Envelope) -> None:
        node = self.node
        kind = env.kind
        if env.incarnation is not None and self.incarnation is not None and env.incarnation != self.incarnation:
            node.stats.stale_replies += 1  # from an incarnation since replaced: never delivered
            return
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
                self.node.process_died(self.pid)
                self.node.loop.call_soon(self._drop_socket)
        elif event == _monitor.CONNECT_RETRIED:
            if self.same_host and process_gone(self.pid):
                self.mark_dead(f"the process behind {self.endpoint} (pid {self.pid}) is gone", None)

    def mark_dead(self, message: str, exitcode: int | None) -> None:
        if not self.sock.closed:
            self.sock.drain_now()
        self.dead = ActorDied(message, exitcode=exitcode)
        if self.same_host:
            self.node.process_died(self.pid)
        self._fail_all(ActorDied(message + "; the call may or may not have run", exitcode=exitcode))
        self.node.loop.call_soon(self._drop_socket)

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
             body: Any, opts: int | None = None, ctx: list[Any] | None = None,
             key: str | None = None) -> asyncio.Future[None] | None:
        """Send one message. Returns None when it went, or a future to await: zmq is at its
        high-water mark, or holds a zero-copy frame, or the message waits for pool room."""
        args = (kind, corr, target, method, deadline, body, opts, ctx, key)
        if self._queue is not None:
            return self._queue.push(args, deadline)
        try:
            return self._send_now(*args)
        except PoolBusy:
            self._queue = _SendQueue(self.node, self._send_now, self._queue_done)
            return self._queue.push(args, deadline)

    def _queue_done(self) -> None:
        self._queue = None

    async def wait_sent(self, sent: asyncio.Future[None], deadline: float | None, label: str) -> None:
        """Await what send returned. A message waiting for pool room is failed by its queue at
        the deadline, with PoolExhausted (it did not run); anything else is bounded here."""
        if self._queue is not None and self._queue.owns(sent):
            await sent
        else:
            await wait_room(sent, deadline, label)

    def _send_now(self, kind: Kind, corr: int, target: str | None, method: str | None, deadline: float | None,
                  body: Any, opts: int | None = None, ctx: list[Any] | None = None,
                  key: str | None = None) -> asyncio.Future[None] | None:
        node = self.node
        node.tensors.dest = self.dest
        frames = node.codec.encode(kind, corr, node.id, target, method, deadline, body, opts, None, ctx, key)
        node.stats.sent += 1
        return self.sock.send(frames)
