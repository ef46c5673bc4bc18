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
from ..transport._endpoints import (ProcessWatch, check_endpoint, check_ipc_listener, claim_ipc_path, host_id,
                                    ipc_path, process_gone)
from ..transport._errors import (
    CascadaError,
    ConfigurationError,
    DeadlineExceeded,
    EndpointConflict,
    HandleNotPortable,
    PoolExhausted,
    ProtocolError,
    SerializationError,
    TensorLost,
    TransportClosed,
)
from ..transport._socket import AsyncSocket, Unroutable, configure
from ..transport._tensors import Destination, PoolBusy, TensorCodec, TensorOptions
from ..transport._wire import (DEFAULT_MAX_CONTAINERS, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_MESSAGE_BYTES, EXT_REF,
                               MAX_RELEASED, Codec, Envelope, Kind, Limits, error_body)
from ._errors import ActorDied, ActorInitFailed, ActorNotFound, Overloaded, SystemClosed
from ._context import handling
from ._messages import Message, RemoteReply, StreamCredit, StreamSink
from ._portable_errors import error_from_parts
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
    """Settings shared by every node of a system (they travel to actor processes).

    The wire limits, and what they bound on a receiver (measured as VmHWM over its RSS
    before the message; see transport/_wire.py and RELIABILITY.md R21):

    - ``max_frame_bytes`` (1 GiB): ZMQ_MAXMSGSIZE. libzmq checks it per frame, from the
      frame's length, before reading it: a bigger frame disconnects the peer.
    - ``max_frames`` (1024) and ``max_message_bytes`` (1 GiB): frames in one message, and
      their bytes together. A message over either, or carrying an out-of-band frame that no
      tensor descriptor refers to, is refused (ProtocolError, counted in
      ``rejected_frames``, an error reply to a request) and dropped at once. libzmq receives
      a multipart message whole before cascada sees any of it, though, so the transient
      peak is what libzmq accepted: up to ``max_frames x max_frame_bytes``. Only
      authenticated peers, or lower limits, bound that.
    - ``max_header_bytes`` (1 MiB): the msgpack header, refused before decoding when over.
      Decoding one costs at most ~80 bytes per header byte for headers up to 80 KiB.
      Above that, arrays and maps are counted against ``max_header_containers`` (131,072
      units of ~80 bytes: an array 1, a map 3; refused past it), so a header of empty or
      small containers costs at most ~11 MiB at the 1 MiB cap. Scalars and the elements of
      lists and maps are not counted: up to ~42 bytes per header byte (small negative
      ints; two-character strings or eleven-entry maps ~26, int8 ~22, floats ~4), so
      ~42 MiB at the defaults. ``max_header_bytes`` of 256 KiB keeps every header under
      ~11 MiB, refusing bigger msgpack payloads.
    """

    __slots__ = ("hwm", "max_header_bytes", "max_frames", "max_frame_bytes", "max_message_bytes",
                 "max_header_containers", "mailbox_size", "mailbox_bytes", "stream_window", "default_timeout",
                 "tensors")

    def __init__(
        self,
        *,
        hwm: int = 10_000,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_frames: int = 1024,
        max_frame_bytes: int = 1 << 30,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_header_containers: int = DEFAULT_MAX_CONTAINERS,
        mailbox_size: int = 1024,
        mailbox_bytes: int = 64 << 20,
        stream_window: int = 64,
        default_timeout: float = 300.0,
        tensors: TensorOptions | None = None,
    ) -> None:
        for key, value in (("hwm", hwm), ("max_header_bytes", max_header_bytes), ("max_frames", max_frames),
                           ("max_frame_bytes", max_frame_bytes), ("max_message_bytes", max_message_bytes),
                           ("max_header_containers", max_header_containers), ("mailbox_size", mailbox_size),
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
        if max_message_bytes < max_header_bytes:
            raise ConfigurationError(f"max_message_bytes must be at least max_header_bytes ({max_header_bytes}), "
                                     f"got {max_message_bytes}")
        self.max_message_bytes = max_message_bytes
        self.max_header_containers = max_header_containers
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
    code, type_name, message, tb, details = body
    if code == "remote":
        return error_from_parts(type_name, message, tb, details, actor=actor, method=method)
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
                 "tell_failures", "received", "sent", "fenced_requests", "endpoint_conflicts")

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
        self.fenced_requests = 0  # requests meant for another incarnation of our actor: refused, not run
        self.endpoint_conflicts = 0  # ipc peers found held by another process than the ref names

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
                                  max_frame_bytes=config.max_frame_bytes, max_message_bytes=config.max_message_bytes,
                                  max_containers=config.max_header_containers))
        self.codec.register(_ref_type(), self._encode_ref, EXT_REF, self._decode_ref)
        self.tensors = TensorCodec(config.tensors, host=self.host, owner_endpoint=endpoint,
                                   process_gone=process_gone, on_release=self._lease_released)
        self.tensors.leases.on_change = self._leases_changed
        self.codec.install_tensors(self.tensors)
        self._releases: deque[tuple[str, int, int]] = deque()
        self._lease_owners: dict[bytes, str] = {}  # caller connection -> the node whose leased tensors it sent
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
        self.owners = ProcessWatch()  # are the owners of a message's leased tensors alive?
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
        path = ipc_path(self.endpoint)
        if path is not None:
            # libzmq's ipc bind unlinks whatever is there: refuse (EndpointConflict) to take a
            # live listener's path over; a stale socket file left by kill -9 is removed.
            claim_ipc_path(path)
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
        self.tensors.may_pass_on = self._may_pass_on
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
        self.owners.close()

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
        self.tensors.owners_seen = None  # a reply decoded elsewhere may have set it
        try:
            envs, err = self.codec.decode_all(frames, 1)
        except (ProtocolError, TensorLost) as exc:
            self._reject(identity, frames, exc)
            return
        self.stats.received += len(envs)
        for env in envs:
            if env.released is not None:  # leases of ours the caller let go of
                self.released_riding(env.released, on_reply=False)
        if self.tensors.owners_seen is not None:
            # Leased tensors came in: one zmq message has one sender, and the leases of the
            # tensors it sends are its own, so this connection leads back to their owner (a
            # reply on it can carry their releases, see take_releases).
            if len(self._lease_owners) > 4096:
                self._lease_owners.clear()
            self._lease_owners[identity] = self.tensors.owners_seen
            self.tensors.owners_seen = None
            if self.tensors.ranges:
                ranges = self.tensors.take_ranges()
                for env in envs:
                    if env.owners:
                        env.ranges = ranges
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
            if env.expect is not None and env.expect != self.incarnation and self.incarnation is not None:
                self._refuse(identity, env)
                return False
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
            credit = None
            if kind is Kind.STREAM:
                credit = StreamCredit(env.opts or self.config.stream_window)
                self.streams[(identity, env.corr)] = credit
            reply = None if kind is Kind.TELL else RemoteReply(self, identity, env.corr)
            method = cast(str, env.method)  # the codec refuses requests without one
            # The message alone holds the arguments: a handler that answers at once has let
            # go of them (leased tensors and all) before its reply is encoded, so the reply
            # can carry their releases.
            body, env.body = env.body, None
            msg = Message(kind, method, body[0], body[1], env.deadline, reply, credit, env.owners, env.ctx, env.target,
                          env.key)
            del body
            msg.size = self._inbound_size
            msg.leased = env.ranges
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

    def _refuse(self, identity: bytes, env: Envelope) -> None:
        """A request meant for another incarnation of the actor this node hosts (sent before
        its sender heard of a restart): it does not run; an ask or stream hears so."""
        self.stats.fenced_requests += 1
        what = f"actor {env.target!r}" if env.target is not None else f"node {self.id}"
        message = (f"{what} at {self.endpoint} is now incarnation {self.incarnation}, not {env.expect} that the "
                   "request was meant for (it was restarted): the request did not run")
        if env.kind is Kind.TELL:
            self.log.warning("fenced", "node %s dropped a tell: %s", self.id, message)
        else:
            self.send_error(identity, env.corr, "died", "ActorDied", message, None)

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
        if sync is not None and (env.kind is Kind.TELL or env.kind is Kind.ASK):
            try:
                sync(env)
            except ProtocolError as exc:
                self.stats.rejected_frames += 1
                self.log.warning("control", "control %s rejected: %s", env.method, exc)
                if env.kind is Kind.ASK:
                    self.send_error(identity, env.corr, "protocol", "ProtocolError", str(exc), None)
                return
            if env.kind is Kind.ASK:  # the sender waits until this node has applied it
                self.send_reply(identity, Kind.REPLY, env.corr, None)
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
        owner = self._lease_owners.get(identity) if self._releases else None
        released = self.take_releases(owner) if owner is not None else None
        try:
            frames = self.codec.encode(kind, corr, None, None, None, None, body, None, self.incarnation,
                                       released=released)
            batch = not self.codec.leased
        except BaseException as exc:
            if released is not None and owner is not None:  # they go with the next message instead
                self.owe_releases(owner, self.dest_for(identity).consumer[1], released)
            if isinstance(exc, PoolBusy):
                raise
            code = send_error_code(exc) if isinstance(exc, CascadaError) else None
            if code is None:
                raise
            self.send_error(identity, corr, code, type(exc).__name__, f"the reply cannot travel: {exc}", None)
            return None
        return self._route(identity, frames, batch)

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

    def send_error(self, identity: bytes, corr: int, code: str, type_name: str, message: str, tb: str | None,
                   details: dict[str, Any] | None = None) -> None:
        body = error_body(code, type_name, message, tb, details)
        try:
            frames = self.codec.encode(Kind.ERROR, corr, None, None, None, None, body, None, self.incarnation)
        except CascadaError:
            if details is None:
                raise
            # The details broke a limit of the wire: send the error without them (a RemoteError).
            frames = self.codec.encode(Kind.ERROR, corr, None, None, None, None,
                                       error_body(code, type_name, message, tb), None, self.incarnation)
        self._route(identity, frames)

    def _route(self, identity: bytes, frames: list[Any], batch: bool = True) -> asyncio.Future[None] | None:
        router = self._router
        if router is None or router.closed:
            self.stats.unroutable_replies += 1
            return None
        self.stats.sent += 1
        try:
            return router.send([identity, *frames], batch)
        except Unroutable:
            # The caller's connection is gone; it has already failed its pending calls.
            self.stats.unroutable_replies += 1
            return None

    # -- outbound requests ---------------------------------------------------------------

    def peer(self, endpoint: str, pid: int, host: str, incarnation: str | None = None) -> Peer:
        """The connection to endpoint; ``incarnation`` (a ref's) is what requests are meant
        for until the system says otherwise (update_peer)."""
        peer = self.peers.get(endpoint)
        if peer is None:
            if self.closed:
                raise SystemClosed(f"node {self.id} is closed")
            moved = self.endpoint_pids.get(endpoint)
            peer = Peer(self, endpoint, pid if moved is None else moved[0], host)
            if moved is not None:
                peer.incarnation = moved[1]
                peer.told = True
            else:
                peer.incarnation = incarnation
            buried = self.dead_endpoints.get(endpoint)
            if buried is not None:
                peer.dead = buried
            self.peers[endpoint] = peer
        elif peer.incarnation is None and incarnation is not None and not peer.told:
            peer.incarnation = incarnation
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
        peer.calls[corr] = (fut, target, method, peer.incarnation)  # send stamps the same
        try:
            sent = peer.send(Kind.ASK, corr, target, method, deadline, [list(args), kwargs], ctx=ctx, key=key)
            if sent is not None:
                await peer.wait_sent(sent, deadline, label)
            # The answer comes boxed (see Peer._on_reply_env) and leaves the box here: the
            # finished future, which the loop may hold a moment longer, keeps nothing alive.
            box: list[Any] = await wait_reply(fut, deadline, self.loop, label)
            return box.pop()
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

    def _may_pass_on(self, address: int, nbytes: int) -> bool:
        """Whether a received shm tensor being sent may go on by its segment (no copy): only
        while its handler runs, and only one that came in the request being handled."""
        msg = handling.get()
        if msg is None or msg.leased is None or msg.done:
            return False
        end = address + nbytes
        return any(start <= address and end <= start + n for start, n in msg.leased)

    def take_releases(self, owner: str) -> list[int] | None:
        """The lease ids owed to the node at ``owner``, taken out of the queue to ride on a
        message to it (a reply to its request, see _on_inbound; a request of ours): no
        release message of their own, and the owner has them back with what it was sent
        anyway. Up to MAX_RELEASED of them."""
        q = self._releases
        taken: list[int] = []
        # Other threads may append meanwhile (a tensor freed there): look at as many entries
        # as there are now, and put back, at the end, those for other owners.
        for _ in range(len(q)):
            entry = q.popleft()
            if entry[0] == owner and len(taken) < MAX_RELEASED:
                taken.append(entry[2])
            else:
                q.append(entry)
        return taken or None

    def released_riding(self, ids: list[int], on_reply: bool) -> None:
        """Releases of our leases that came on a reply or a request (see take_releases)."""
        stats = self.tensors.leases.stats
        if on_reply:
            stats.released_on_replies += len(ids)
        else:
            stats.released_on_requests += len(ids)
        self.tensors.leases.release(ids)

    def owe_releases(self, owner: str, pid: int, ids: list[int]) -> None:
        """Releases taken for a message that did not go: they go the usual way."""
        for lease_id in ids:
            self._lease_released(owner, pid, lease_id)

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
        self.tensors.leases.stats.release_messages += 1
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


async def wait_until(aw: Awaitable[Any], deadline: float) -> Any:
    """``asyncio.wait_for`` up to an absolute deadline (TimeoutError after it), except that
    a cancellation of the caller is never lost: on Python 3.11, wait_for returns the
    result instead when the awaited thing completes in the same loop turn as the
    cancellation arrives, and a cancelled handler would carry on (here: a stream closed
    by its consumer while the producer waited for its nested call to be sent)."""
    fut = asyncio.ensure_future(aw)
    if fut.done():
        return fut.result()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        fut.cancel()

    timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.time()), expire)
    try:
        return await fut
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if expired and (me is None or not me.cancelling()):
            raise asyncio.TimeoutError from None
        raise
    finally:
        timer.cancel()


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
        return await wait_until(aw, deadline)
    except asyncio.TimeoutError as exc:
        raise Overloaded(f"{label}: the callee's mailbox stayed full until the deadline; the message "
                         "was not run (it is safe to retry; see the callee's mailbox stats)") from exc


async def with_deadline(aw: Awaitable[Any], deadline: float | None, label: str) -> Any:
    if deadline is None:
        return await aw
    try:
        return await wait_until(aw, deadline)
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


class _HeldSend(asyncio.Future[None]):
    """What Peer.send returns for a message it holds until the connection is made and checked
    (its own type, so wait_sent can tell it from zmq's backpressure)."""


def _settle(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()  # a fire-and-forget send (CREDIT, CANCEL) has nobody to read it


def _follow(src: asyncio.Future[None], dst: asyncio.Future[None]) -> None:
    """dst (a released held send) completes as src (the send it became) does; a sender giving
    up on dst gives up on src too."""

    def done(f: asyncio.Future[None]) -> None:
        if dst.done():
            if not f.cancelled():
                f.exception()
        elif f.cancelled():
            dst.cancel()
        elif f.exception() is not None:
            _settle(dst, cast(BaseException, f.exception()))
        else:
            dst.set_result(None)

    src.add_done_callback(done)
    dst.add_done_callback(lambda d: src.cancel() if d.cancelled() and not src.done() else None)


class Peer:
    """The calling side of one connection: a DEALER to another node, its pending calls and
    streams, and a monitor that tells when the connection drops."""

    def __init__(self, node: Node, endpoint: str, pid: int, host: str) -> None:
        self.node = node
        self.endpoint = endpoint
        self.pid = pid
        self.same_host = host == node.host
        # corr -> (future, actor, method, the incarnation the request was meant for)
        self.calls: dict[int, tuple[asyncio.Future[Any], str | None, str | None, str | None]] = {}
        self.streams: dict[int, StreamSink] = {}
        self._stream_expect: dict[int, str] = {}  # corr -> the incarnation a stream was meant for
        self.dead: ActorDied | EndpointConflict | None = None
        self.connected = False
        self.host = host
        # The incarnation requests are meant for (stamped on each; None: any). A receiver
        # hosting another refuses them unrun, and a reply counts only from the one its
        # request was meant for. ``told``: it came from the system (update_peer), not a ref.
        self.incarnation: str | None = None
        self.told = False
        self.dest = Destination(self.same_host, (host, pid))
        self._queue: _SendQueue | None = None  # sends waiting for room in the shm pool
        self._ipc = self.same_host and ipc_path(endpoint) is not None
        # Sends held here, not in zmq, while an ipc connection is not made and checked yet
        # (opened, or dropped and being remade): None when they go straight to the socket.
        self._held: deque[tuple[tuple[Any, ...], _HeldSend]] | None = None
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
        # Before connecting: is the ipc path still the process the ref names? (Checked again
        # on every CONNECTED event; never per message.)
        conflict = self._listener_conflict()
        if conflict is None:
            try:
                sock.connect(check_endpoint(self.endpoint))
            except (zmq.ZMQError, ConfigurationError) as exc:
                self._mon.close()
                sock.close(linger=0)
                raise ConfigurationError(f"cannot connect to {self.endpoint!r}: {exc}") from exc
            if self._ipc and self._held is None:
                # Nothing goes before the check on CONNECTED: whoever listens by then (this
                # check saw nobody, or the path changed hands since) must be the process named.
                self._held = deque()
        self.sock = AsyncSocket(sock, self._on_reply, node.loop)
        if conflict is not None:
            self._conflict(conflict)
            self._close_sockets()  # never connected: nothing of ours reached the other process

    def _listener_conflict(self) -> EndpointConflict | None:
        """EndpointConflict when another process than ours (self.pid, still alive) listens on
        this peer's ipc path: it took the path over, and nothing may be sent to it. One
        connect and close on a unix socket (tens of microseconds); tcp, the abstract
        namespace and other hosts are not checked. Once self.pid is gone, whoever listens may
        be its restart: that is for the incarnation stamped on each request to settle."""
        if not self._ipc:
            return None
        try:
            check_ipc_listener(self.endpoint, self.pid, timeout=0.25)
        except EndpointConflict as exc:
            if exc.__cause__ is not None or process_gone(self.pid):
                return None  # a listener that does not accept (cannot be named), or a restart
            return exc
        return None

    def _conflict(self, exc: EndpointConflict) -> None:
        """Our process no longer holds the endpoint: calls fail with EndpointConflict, now and
        until the system names a new process there (revive)."""
        node = self.node
        node.stats.endpoint_conflicts += 1
        node.log.warning("endpoint-conflict", "node %s: %s", node.id, exc)
        self.dead = exc
        self.connected = False
        self._fail_all(EndpointConflict(f"{exc}; the connection to it was dropped, and nothing held for it "
                                        "was sent"))
        if self._held is None:
            self._held = deque()  # until the socket is dropped, nothing more goes to that process

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
        held, self._held = self._held, None
        for _args, fut in held or ():
            _settle(fut, TransportClosed(f"the connection to {self.endpoint} was closed before the message was sent"))

    def _reopen(self) -> None:
        """An ipc connection dropped (its process lives on): drop its socket with whatever
        zmq still queued for it (sent before the drop was seen; libzmq's own reconnect would
        deliver that before the listener is checked), and connect anew. What is sent
        meanwhile stays held until the new connection is checked."""
        if self.sock.closed or self.connected or self.dead is not None or self.node.closed:
            return
        held, self._held = self._held, None
        self._close_sockets()
        self._held = held if held is not None else deque()
        try:
            self._open()
        except ConfigurationError as exc:
            self._fail_all(exc)
            self._held = None  # no socket: later sends fail at once (TransportClosed)

    def revive(self, pid: int, incarnation: str | None) -> None:
        """The actor behind this endpoint was restarted as pid: talk to it on a new connection."""
        self.pid = pid
        self.dest = Destination(self.same_host, (self.host, pid))
        self.incarnation = incarnation
        self.told = True
        self.dead = None
        if self.sock.closed and not self.node.closed:
            self._open()
        elif self.connected:
            conflict = self._listener_conflict()
            if conflict is not None:
                self._conflict(conflict)
                self.node.loop.call_soon(self._drop_socket)

    def forget_stream(self, corr: int) -> StreamSink | None:
        """Stop expecting anything for a stream (its caller closed it)."""
        self._stream_expect.pop(corr, None)
        return self.streams.pop(corr, None)

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
        # A reply counts only from the incarnation its request was meant for (stamped on the
        # request, kept with the call), whatever this peer believes now: one from another
        # incarnation is never delivered; the call fails with ActorDied at once.
        node = self.node
        kind = env.kind
        inc = env.incarnation
        if env.released is not None:  # leases of ours the callee let go of: whoever waits or not
            node.released_riding(env.released, on_reply=True)
        if kind is Kind.REPLY or kind is Kind.ERROR:
            entry = self.calls.pop(env.corr, None)
            if entry is not None:
                fut, actor, method, expect = entry
                if fut.done():
                    return
                if inc is not None and expect is not None and inc != expect:
                    fut.set_exception(self._fenced(env, expect, actor, method))
                elif kind is Kind.REPLY:
                    # Boxed, so the caller can take it out (see Node.call): a leased tensor in
                    # it is then freed, and its release can ride on the caller's next request,
                    # the moment the caller lets go of it.
                    fut.set_result([env.body])
                else:
                    fut.set_exception(error_from_body(env.body, actor, method))
                return
            sink = self.streams.pop(env.corr, None) if kind is Kind.ERROR else None
            if sink is None:
                node.stats.late_replies += 1
                return
            expect = self._stream_expect.pop(env.corr, None)
            if inc is not None and expect is not None and inc != expect:
                sink.fail_with(self._fenced(env, expect, sink.actor, sink.method))
            else:
                sink.fail_with(error_from_body(env.body, sink.actor, sink.method))
        elif kind is Kind.ITEM or kind is Kind.END:
            sink = self.streams.get(env.corr)
            if sink is None:
                node.stats.late_replies += 1
                return
            expect = self._stream_expect.get(env.corr)
            if inc is not None and expect is not None and inc != expect:
                del self.streams[env.corr]
                self._stream_expect.pop(env.corr, None)
                sink.fail_with(self._fenced(env, expect, sink.actor, sink.method))
            elif kind is Kind.ITEM:
                sink.item(env.body)
            else:
                del self.streams[env.corr]
                self._stream_expect.pop(env.corr, None)
                sink.end()
        else:
            node.stats.rejected_frames += 1
            node.log.warning("protocol-reply", "node %s got a %s on a reply path", node.id, kind.name)

    def _fenced(self, env: Envelope, expect: str, actor: str | None, method: str | None) -> BaseException:
        """The ActorDied for a call whose answer came from another incarnation than the one
        its request was meant for: the receiver's refusal (it did not run), or a stale reply
        (counted, never delivered)."""
        node = self.node
        body = env.body
        if env.kind is Kind.ERROR and body[0] == "died":
            if not self.told and self.incarnation == expect:
                # What this node guessed from a ref is out of date and nobody told it: the
                # receiver's word is the best there is for the calls after this one.
                self.incarnation = env.incarnation
            return error_from_body(body, actor, method)
        node.stats.stale_replies += 1
        return ActorDied(f"{actor}.{method}: the answer came from incarnation {env.incarnation} of {self.endpoint}, "
                         f"not {expect} that the request was meant for; it was dropped (the call may or may not "
                         "have run)", actor=actor)

    def _on_monitor(self, frames: list[bytes]) -> None:
        event, _value, _ep = _monitor.parse(frames)
        if event == _monitor.CONNECTED:
            conflict = self._listener_conflict()
            if conflict is not None:
                self._conflict(conflict)
                self.node.loop.call_soon(self._drop_socket)
                return
            self.connected = True
            self.dead = None
            if self._held is not None:
                self._release()
        elif event == _monitor.DISCONNECTED:
            self.connected = False
            if self._ipc and self._held is None:
                # libzmq would reconnect on its own and send what it queued before the check
                # on CONNECTED: hold what is sent from now on, and make a new connection.
                self._held = deque()
                self.node.loop.call_soon(self._reopen)
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
        held = self._held
        if held:
            # Held messages never went (the gate stays shut). A call's or a stream's sender
            # hears why from its call or stream, failed below; anyone else from the send.
            items = list(held)
            held.clear()
            answered = self.calls.keys() | self.streams.keys()
            for args, sent in items:
                if args[1] in answered and not sent.done():
                    sent.set_result(None)
                else:
                    _settle(sent, exc)
        calls, self.calls = self.calls, {}
        for fut, actor, _m, _i in calls.values():
            if not fut.done():
                if isinstance(exc, ActorDied) and type(exc) is ActorDied and exc.actor is None:
                    # One error per call, naming the actor it was made to.
                    fut.set_exception(ActorDied(str(exc), actor=actor, exitcode=exc.exitcode))
                else:
                    fut.set_exception(exc)
        self._stream_expect.clear()
        streams, self.streams = self.streams, {}
        for sink in streams.values():
            sink.fail_with(exc)

    # -- requests ------------------------------------------------------------------------

    def check_alive(self, actor: str) -> None:
        dead = self.dead
        if dead is not None:
            if isinstance(dead, EndpointConflict):
                raise EndpointConflict(f"actor {actor!r}: {dead}")
            raise ActorDied(f"actor {actor!r}: {dead}", actor=actor, exitcode=dead.exitcode)

    def send(self, kind: Kind, corr: int, target: str | None, method: str | None, deadline: float | None,
             body: Any, opts: int | None = None, ctx: list[Any] | None = None,
             key: str | None = None) -> asyncio.Future[None] | None:
        """Send one message. Returns None when it went, or a future to await: zmq is at its
        high-water mark, or holds a zero-copy frame, or the message waits for pool room, or
        for an ipc connection to be made and its listener checked (held here, not in zmq).
        A request is stamped with the incarnation it is meant for (self.incarnation now)."""
        expect = self.incarnation if kind is Kind.ASK or kind is Kind.TELL or kind is Kind.STREAM else None
        if kind is Kind.STREAM and expect is not None:
            self._stream_expect[corr] = expect
        args = (kind, corr, target, method, deadline, body, opts, ctx, key, expect)
        if self._held is not None:
            return self._hold(args)
        if self._queue is not None:
            return self._queue.push(args, deadline)
        try:
            return self._send_now(*args)
        except PoolBusy:
            self._queue = _SendQueue(self.node, self._send_now, self._queue_done)
            return self._queue.push(args, deadline)

    def _hold(self, args: tuple[Any, ...]) -> asyncio.Future[None] | None:
        held = self._held
        assert held is not None
        if args[0] is Kind.CANCEL:
            # A request still held here is simply not sent: nothing to cancel on the other side.
            for req, fut in held:
                if req[1] == args[1] and req[0] is not Kind.CANCEL:
                    fut.cancel()
                    return None
        fut = _HeldSend(loop=self.node.loop)
        held.append((args, fut))
        return fut

    def _release(self) -> None:
        """The connection is made and its listener checked: send what was held, in order
        (what its sender gave up on, at its deadline or cancelled, does not go)."""
        held, self._held = self._held, None
        for args, fut in held or ():
            if fut.done():
                continue
            try:
                if self._queue is not None:
                    sent: asyncio.Future[None] | None = self._queue.push(args, args[4])
                else:
                    try:
                        sent = self._send_now(*args)
                    except PoolBusy:
                        self._queue = _SendQueue(self.node, self._send_now, self._queue_done)
                        sent = self._queue.push(args, args[4])
            except Exception as exc:  # noqa: BLE001 - e.g. the body cannot travel: its sender hears it
                _settle(fut, exc)
                continue
            if sent is None:
                fut.set_result(None)
            else:
                _follow(sent, fut)

    def _queue_done(self) -> None:
        self._queue = None

    async def wait_sent(self, sent: asyncio.Future[None], deadline: float | None, label: str) -> None:
        """Await what send returned. A message waiting for pool room is failed by its queue at
        the deadline, with PoolExhausted (it did not run); anything else is bounded here."""
        if type(sent) is _HeldSend:
            await self._wait_held(sent, deadline, label)
        elif self._queue is not None and self._queue.owns(sent):
            await sent
        else:
            await wait_room(sent, deadline, label)

    async def _wait_held(self, sent: asyncio.Future[None], deadline: float | None, label: str) -> None:
        if deadline is None:
            await sent
            return
        try:
            await wait_until(sent, deadline)
        except asyncio.TimeoutError as exc:
            # wait_until cancelled it: if it was still held, it never goes.
            raise Overloaded(f"{label}: the connection to {self.endpoint} was not made and checked (or the "
                             "message not taken) before the deadline; the message was not run (it is safe "
                             "to retry)") from exc

    def _send_now(self, kind: Kind, corr: int, target: str | None, method: str | None, deadline: float | None,
                  body: Any, opts: int | None = None, ctx: list[Any] | None = None,
                  key: str | None = None, expect: str | None = None) -> asyncio.Future[None] | None:
        node = self.node
        node.tensors.dest = self.dest
        # Releases owed to this peer ride on a request to it (tensors it answered with, let
        # go of since); a reply carries them the other way (see Node._encode_reply).
        released = (node.take_releases(self.endpoint) if node._releases
                    and (kind is Kind.ASK or kind is Kind.TELL or kind is Kind.STREAM) else None)
        try:
            frames = node.codec.encode(kind, corr, node.id, target, method, deadline, body, opts, None, ctx, key,
                                       expect, released)
            node.stats.sent += 1
            return self.sock.send(frames, not node.codec.leased)
        except BaseException:
            if released is not None:
                node.owe_releases(self.endpoint, self.pid, released)
            raise
