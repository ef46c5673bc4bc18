"""ActorSystem: spawns actors, owns their processes, and stops them all on exit."""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from ..transport._endpoints import IpcDirectory, check_ipc_base, ipc_path
from ..transport._wire import DEFAULT_MAX_CONTAINERS, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_MESSAGE_BYTES
from ..transport._errors import ConfigurationError
from ..transport._shm import sweep_dead_segments
from ..transport._tensors import DEFAULT_INLINE_MAX, TensorOptions
from ..transport._wire import Kind
from ._actor import Actor
from ._cell import ActorCell
from ._child import EXIT_MEMORY_ERROR, normalize_cpus, normalize_rlimits
from ._errors import ActorDied, ActorInitFailed, ActorNotFound, CascadaError, RestartIntensityExceeded, SystemClosed
from ._heartbeat import HeartbeatMonitor
from ._node import Node, NodeConfig, wait_until
from ._ref import ActorRef, current_node
from ._spawner import Spawner, pickle_spec
from ._supervision import RestartType, Strategy, Supervisor, SupervisorState, check_restart

Placement = Literal["process", "local"]
Transport = Literal["ipc", "tcp"]
OnExhausted = Literal["wait", "inline", "error"]
CudaCrossHost = Literal["copy", "error"]
_LOOPBACK = ("127.", "::1", "localhost")
_PLACEMENTS = ("process", "local")
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
ANNOUNCE_TIMEOUT = 1.0  # seconds a restart waits for the other nodes to hear of it


class _Child:
    __slots__ = ("ref", "pid", "exited", "stopping")

    def __init__(self, ref: ActorRef, pid: int, exited: asyncio.Future[int]) -> None:
        self.ref = ref
        self.pid = pid
        self.exited = exited
        self.stopping = False  # stopped on purpose: its exit is not a failure


class _Spec:
    """How to start an actor again: what the supervisor needs to restart it."""

    __slots__ = ("cls", "args", "kwargs", "placement", "restart", "supervisor", "blob", "endpoint", "rlimits", "cpus")

    def __init__(self, cls: type[Actor], args: tuple[Any, ...], kwargs: dict[str, Any], placement: Placement,
                 restart: RestartType, supervisor: str, rlimits: dict[str, list[int]] | None = None,
                 cpus: list[int] | None = None) -> None:
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.placement = placement
        self.restart = restart
        self.supervisor = supervisor
        self.blob: bytes | None = None  # the pickled class and arguments, for a process actor
        self.endpoint: str | None = None  # where it listens: a restart binds the same one
        self.rlimits = rlimits or {}  # resource limits of its process, set again on every restart
        self.cpus = cpus  # the CPUs its process may run on (None: any), again on every restart


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_MEMORY_ERROR:
        return f"exited with code {code} (MemoryError: a handler ran out of memory under the process's rlimits)"
    return f"exited with code {code}"


class ActorSystem:
    """The root of a cascade: ``async with ActorSystem() as system: ...``.

    Parameters (all keyword-only):

    - ``preload``: modules the forkserver imports once, so that spawning actors that need
      them (``"torch"``) costs a fork, not an interpreter start.
    - ``default_timeout``: seconds an ask, tell or stream waits when no ``timeout`` is given
      (``math.inf`` for none).
    - ``mailbox_size``: messages an actor's mailbox holds before senders are pushed back;
      ``mailbox_bytes`` (64 MiB): the bytes it holds of messages from other processes (their
      frames as received; shared-memory tensors count as their small descriptors, the pool
      bounds their data).
    - ``spawn_timeout``: seconds a process actor has to become ready.
    - ``stop_timeout``: seconds an actor has to drain and stop before it is sent SIGTERM,
      and again before SIGKILL.
    - ``ipc_dir``: where the private 0700 directory of ipc sockets is made (default: the
      system temp dir).
    - ``transport``: ``"ipc"`` (default; unix sockets in that private directory) or ``"tcp"``
      (each node listens on ``tcp_host`` at a free port). Until CurveZMQ authentication
      lands, tcp is limited to loopback addresses.
    - ``stream_window``, ``hwm``, ``max_header_bytes``, ``max_frames``, ``max_frame_bytes``,
      ``max_message_bytes``, ``max_header_containers``: flow-control and wire limits (see
      README, and NodeConfig for what each bounds).
    - Tensors (torch, numpy, cupy) travel out of band, by one of three paths chosen per
      tensor (see README, "Tensors"):
      ``tensor_inline_max``: below this many bytes, or to another host, a tensor travels as a
      zmq frame; at or above it, a CPU tensor for a process on this host goes through the
      sender's shared-memory pool. ``shm_pool_bytes``: the bound on each process's pool (0
      turns the pool off). ``shm_on_exhausted``: ``"wait"`` (the sender waits for a free
      segment, up to its deadline, then PoolExhausted), ``"inline"`` (fall back to a zmq
      frame) or ``"error"``. ``lease_ttl``: seconds after which a lease that no consumer took
      up is reclaimed (None: only when the consumer dies). ``cuda_cross_host``: ``"copy"``
      (stage a CUDA tensor through host memory) or ``"error"`` (HandleNotPortable).
      ``tensor_copy_threads``: threads that copy a tensor of 4 MiB or more into the pool (the
      sender's own thread included; None: 2, or 1 on a one-CPU machine).
    - Liveness: every actor process's event loop sends a heartbeat each
      ``heartbeat_interval`` seconds on a channel of its own; one silent for
      ``heartbeat_interval x heartbeat_liveness`` seconds (SIGSTOPped, or a handler blocking
      its loop) is declared unresponsive and killed, and its supervisor takes over.
      ``heartbeat_interval=None`` turns heartbeats off.
    - ``drain_on_sigterm`` (default True): SIGTERM to this process shuts the system down
      gracefully (as leaving ``async with`` does) instead of killing it; ``wait_closed()``
      waits for that.
    - Supervision: every actor has a supervisor; without ``supervisor=`` in ``spawn`` it is
      the system's root supervisor (one_for_one, ``restart_intensity`` restarts in
      ``restart_period`` seconds). Actors are ``restart="temporary"`` unless spawned otherwise.
    """

    def __init__(
        self,
        *,
        preload: Sequence[str] = (),
        default_timeout: float = 300.0,
        mailbox_size: int = 1024,
        mailbox_bytes: int = 64 << 20,
        spawn_timeout: float = 60.0,
        stop_timeout: float = 5.0,
        ipc_dir: str | None = None,
        transport: Transport = "ipc",
        tcp_host: str = "127.0.0.1",
        stream_window: int = 64,
        hwm: int = 10_000,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_frames: int = 1024,
        max_frame_bytes: int = 1 << 30,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_header_containers: int = DEFAULT_MAX_CONTAINERS,
        tensor_inline_max: int = DEFAULT_INLINE_MAX,
        shm_pool_bytes: int = 1 << 30,
        shm_on_exhausted: OnExhausted = "wait",
        lease_ttl: float | None = 60.0,
        cuda_cross_host: CudaCrossHost = "copy",
        tensor_copy_threads: int | None = None,
        heartbeat_interval: float | None = 0.5,
        heartbeat_liveness: int = 10,
        restart_intensity: int = 3,
        restart_period: float = 5.0,
        drain_on_sigterm: bool = True,
    ) -> None:
        if isinstance(preload, str) or not all(isinstance(m, str) and m for m in preload):
            raise ConfigurationError(f"preload must be a sequence of module names, got {preload!r}")
        for key, value in (("spawn_timeout", spawn_timeout), ("stop_timeout", stop_timeout)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigurationError(f"{key} must be a positive number of seconds, got {value!r}")
        self.config = NodeConfig(hwm=hwm, max_header_bytes=max_header_bytes, max_frames=max_frames,
                                 max_frame_bytes=max_frame_bytes, max_message_bytes=max_message_bytes,
                                 max_header_containers=max_header_containers, mailbox_size=mailbox_size,
                                 mailbox_bytes=mailbox_bytes,
                                 stream_window=stream_window, default_timeout=default_timeout,
                                 tensors=TensorOptions(inline_max=tensor_inline_max, shm_pool_bytes=shm_pool_bytes,
                                                       shm_on_exhausted=shm_on_exhausted, lease_ttl=lease_ttl,
                                                       cuda_cross_host=cuda_cross_host,
                                                       copy_threads=tensor_copy_threads))
        if transport not in ("ipc", "tcp"):
            raise ConfigurationError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
        if transport == "tcp" and not (isinstance(tcp_host, str) and tcp_host.startswith(_LOOPBACK)):
            raise ConfigurationError(
                f"tcp_host {tcp_host!r} is not a loopback address: tcp between hosts needs CurveZMQ "
                "authentication, which cascada does not offer yet; use 127.0.0.1"
            )
        if transport == "ipc":
            check_ipc_base(ipc_dir)
        self._transport = transport
        self._tcp_host = "[::1]" if tcp_host == "::1" else tcp_host
        self._preload = tuple(preload)
        self._spawn_timeout = float(spawn_timeout)
        self._stop_timeout = float(stop_timeout)
        self._ipc_base = ipc_dir
        self._dir: IpcDirectory | None = None
        self._node: Node | None = None
        self._spawner: Spawner | None = None
        self._order: list[str] = []
        self._refs: dict[str, ActorRef] = {}
        self._up_at: dict[str, float] = {}  # when a restarted actor came up (see _start_again)
        self._starting: set[str] = set()  # names reserved while their actor starts
        self._children: dict[str, _Child] = {}
        self._by_pid: dict[int, str] = {}
        self._pending_spawns: dict[str, tuple[asyncio.Future[Any], str]] = {}
        self._ctx_token: contextvars.Token[Node] | None = None
        self._count = 0
        self._closing = False
        self._dead_pids: set[int] = set()  # children gone: their shm segments are swept
        if heartbeat_interval is not None and not (isinstance(heartbeat_interval, (int, float))
                                                   and 0.001 <= heartbeat_interval <= 3600):
            raise ConfigurationError(f"heartbeat_interval must be seconds in [0.001, 3600] or None, got {heartbeat_interval!r}")
        if not (isinstance(heartbeat_liveness, int) and not isinstance(heartbeat_liveness, bool)
                and heartbeat_liveness >= 2):
            raise ConfigurationError(f"heartbeat_liveness must be an int >= 2 (missed beats before a process "
                                     f"is declared unresponsive), got {heartbeat_liveness!r}")
        self._hb_interval = None if heartbeat_interval is None else float(heartbeat_interval)
        self._hb_liveness = heartbeat_liveness
        self._hb: HeartbeatMonitor | None = None
        self._silent: dict[int, str] = {}  # pid -> why it was declared unresponsive
        self._dead_pids_silent: set[int] = set()
        root = SupervisorState("root", "one_for_one", restart_intensity, restart_period, None, "permanent")
        self._sups: dict[str, SupervisorState] = {"root": root}
        self._specs: dict[str, _Spec] = {}
        self._sup_locks: dict[str, asyncio.Lock] = {}
        self._escalations: list[RestartIntensityExceeded] = []
        self._drain_on_sigterm = bool(drain_on_sigterm)
        self._sigterm_prev: Any = None
        self._sigterm_installed = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._closed_event: asyncio.Event | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> ActorSystem:
        if self._node is not None:
            raise ConfigurationError("an ActorSystem can be entered only once")
        self._dir = IpcDirectory(self._ipc_base)
        sweep_dead_segments()  # pools of processes SIGKILLed in earlier runs
        try:
            node = Node(f"system-{secrets.token_hex(3)}", self._new_endpoint("system"), self.config)
            await node.start()
        except BaseException:
            self._dir.remove()
            raise
        node.control["spawn_ready"] = self._on_spawn_ready
        node.control["spawn_failed"] = self._on_spawn_failed
        if self._hb_interval is not None:
            self._hb = HeartbeatMonitor(os.path.join(self._dir.path, "hb.sock"), self._hb_interval,
                                        self._hb_liveness, self._on_silent)
        self._node = node
        self._spawner = Spawner(self._preload, self._on_child_exit)
        self._ctx_token = current_node.set(node)
        self._closed_event = asyncio.Event()
        if self._drain_on_sigterm and threading.current_thread() is threading.main_thread():
            try:
                self._sigterm_prev = signal.getsignal(signal.SIGTERM)
                node.loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
                self._sigterm_installed = True
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # a loop without signal support: SIGTERM keeps its old meaning
        return self

    def _on_sigterm(self) -> None:
        """SIGTERM drains the system: no new work, every actor finishes what it accepted and
        stops (newest first, each within stop_timeout, then SIGTERM, then SIGKILL)."""
        if self._shutdown_task is None and not self._closing and self._node is not None:
            self._node.log.warning("sigterm", "SIGTERM: draining and stopping every actor")
            self._shutdown_task = self._node.loop.create_task(self.shutdown())

    async def wait_closed(self) -> None:
        """Wait until the system has shut down (after SIGTERM, say): a daemon's main loop."""
        if self._closed_event is None:
            raise SystemClosed("the ActorSystem was never entered")
        await self._closed_event.wait()

    def _new_endpoint(self, stem: str | None = None) -> str:
        if self._transport == "tcp":
            return f"tcp://{self._tcp_host}:*"
        assert self._dir is not None
        return self._dir.endpoint(stem)

    async def __aexit__(self, *exc: object) -> None:
        if self._shutdown_task is not None:
            await asyncio.shield(self._shutdown_task)
        await self.shutdown()

    @property
    def node(self) -> Node:
        node = self._node
        if node is None or node.closed:
            raise SystemClosed("the ActorSystem is not running: use it inside `async with ActorSystem() as system`")
        return node

    async def shutdown(self) -> None:
        """Stop every actor (newest first), then the forkserver, then the node; remove the
        ipc directory. Safe to call twice."""
        if self._closing or self._node is None:
            return
        self._closing = True
        try:
            for name in reversed(list(self._order)):
                ref = self._refs.get(name)
                if ref is not None:
                    try:
                        await self.stop(ref)
                    except CascadaError:
                        pass  # stop() already escalated to SIGKILL; nothing more to do here
        finally:
            if self._spawner is not None:
                await self._spawner.close()
            if self._hb is not None:
                await self._hb.close()
            await self._node.close()
            sweep_dead_segments(pids=self._dead_pids)
            if self._dir is not None:
                self._dir.remove()
            if self._ctx_token is not None:
                try:
                    current_node.reset(self._ctx_token)
                except ValueError:
                    pass  # exited from another context than the one that entered
                self._ctx_token = None
            if self._sigterm_installed:
                self._sigterm_installed = False
                try:
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
                    signal.signal(signal.SIGTERM, self._sigterm_prev)
                except (RuntimeError, ValueError, TypeError):
                    pass
            if self._closed_event is not None:
                self._closed_event.set()

    # -- spawning --------------------------------------------------------------------------

    async def spawn(self, cls: type[Actor], /, *args: Any, name: str | None = None,
                    placement: Placement = "process", supervisor: ActorRef | None = None,
                    restart: RestartType = "temporary",
                    rlimits: Mapping[str, int | tuple[int, int]] | None = None,
                    cpus: Iterable[int] | None = None, **kwargs: Any) -> ActorRef:
        """Start an actor and return its ref once it is ready (``on_start`` has run).

        ``placement="process"`` runs it in its own OS process; ``"local"`` in this process
        and event loop. Raises ActorInitFailed if the constructor or ``on_start`` raised, with
        the remote traceback; nothing of the actor is left running then.

        ``supervisor`` (a ref from ``system.supervisor``; default the root supervisor) and
        ``restart`` (``"permanent"``: restarted after any exit; ``"transient"``: only after an
        abnormal one; ``"temporary"``: never) say what happens when it dies. A restarted
        actor is a new incarnation on the same address: refs keep working for new calls,
        calls pending on the old one fail with ActorDied.

        ``rlimits`` (process actors only) sets resource limits of the actor's process, as
        ``resource.setrlimit`` does, before its constructor runs and again on every restart:
        ``{"AS": 2 << 30}`` (names of ``resource.RLIMIT_*``; an int for soft and hard alike,
        or a ``(soft, hard)`` pair). Under a memory limit (``AS`` or ``DATA``) a handler that
        raises MemoryError ends its process (its calls in flight fail with ActorDied) and the
        supervisor sees an abnormal exit whose reason names the MemoryError.

        ``cpus`` (process actors only) pins every thread of the actor's process (its event
        loop, zmq's I/O thread, torch's threads) to these CPUs, as ``os.sched_setaffinity``
        does, from before its constructor and again on every restart: ``{0}``, ``[2, 3]``
        (CPUs that are online and in this cgroup's cpuset). Without it an actor inherits the
        driver's CPU mask as it was at the system's first process spawn. Two processes that talk a lot
        answer each other faster on one core than across cores on a machine where a
        cross-core wake-up is dear (see README, Performance)."""
        node = self.node
        restart = check_restart(restart)
        limits = normalize_rlimits(rlimits)
        pinned = normalize_cpus(cpus)
        sup = self._sup_for(supervisor)
        if self._closing:
            raise SystemClosed("the ActorSystem is shutting down; no more actors can be spawned")
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise ConfigurationError(f"spawn needs a subclass of cascada.Actor, got {cls!r}")
        if placement not in _PLACEMENTS:
            raise ConfigurationError(f"placement must be one of {_PLACEMENTS}, got {placement!r}")
        if limits and placement != "process":
            raise ConfigurationError("rlimits are limits of an actor's own process: spawn it with placement='process'")
        if pinned and placement != "process":
            raise ConfigurationError("cpus pins an actor's own process: spawn it with placement='process' "
                                     "(a local actor runs on this process's CPUs)")
        if name is None:
            self._count += 1
            name = f"{cls.__name__.lower()}-{self._count}"
            while name in self._refs or name in self._starting:
                self._count += 1
                name = f"{cls.__name__.lower()}-{self._count}"
        elif not (isinstance(name, str) and _NAME.match(name)):
            raise ConfigurationError(f"actor name {name!r} must be 1-128 characters of letters, digits, _ . : -")
        if name in self._refs or name in self._starting:
            raise ConfigurationError(f"an actor named {name!r} already exists in this system")
        spec = _Spec(cls, args, kwargs, placement, restart, sup.name, limits, pinned)
        self._starting.add(name)
        try:
            ref = await self._start(node, name, spec)
        finally:
            self._starting.discard(name)
        self._refs[name] = ref
        self._order.append(name)
        self._specs[name] = spec
        sup.children.append(name)
        sup.event("start", name, pid=ref.pid, incarnation=ref.incarnation)
        node.tombstones.pop(name, None)
        return ref

    async def _start(self, node: Node, name: str, spec: _Spec) -> ActorRef:
        incarnation = secrets.token_hex(4)
        if spec.placement == "local":
            return await self._spawn_local(node, spec.cls, spec.args, spec.kwargs, name, incarnation)
        return await self._spawn_process(node, spec, name, incarnation)

    async def supervisor(self, name: str | None = None, *, strategy: Strategy = "one_for_one", intensity: int = 1,
                         period: float = 5.0, supervisor: ActorRef | None = None,
                         restart: RestartType = "permanent") -> ActorRef:
        """Make a supervisor (an actor in this process) and return its ref; spawn children
        under it with ``spawn(..., supervisor=ref, restart=...)``. Children start in the order
        they are spawned and stop in reverse. ``strategy``: ``"one_for_one"`` restarts only
        the child that failed, ``"one_for_all"`` all of them, ``"rest_for_one"`` it and those
        started after it. More than ``intensity`` restarts within ``period`` seconds and it
        stops its children and escalates to its own ``supervisor`` (default: the root),
        which restarts it (and so its children) as its ``restart`` type says."""
        parent = self._sup_for(supervisor)
        if name is None:
            self._count += 1
            name = f"supervisor-{self._count}"
        if name in self._refs or name in self._starting:
            raise ConfigurationError(f"an actor named {name!r} already exists in this system")
        state = SupervisorState(name, strategy, intensity, period, parent, check_restart(restart))
        ref = await self.spawn(Supervisor, self, state, name=name, placement="local", supervisor=supervisor,
                               restart="temporary")
        self._specs[name].restart = state.restart
        self._sups[name] = state
        return ref

    @property
    def escalations(self) -> list[RestartIntensityExceeded]:
        """Every supervisor that gave up (more restarts than its intensity), oldest first. One
        whose own supervisor did not restart it keeps its children stopped."""
        return list(self._escalations)

    def _sup_for(self, ref: ActorRef | None) -> SupervisorState:
        if ref is None:
            return self._sups["root"]
        if not isinstance(ref, ActorRef) or ref.name not in self._sups:
            raise ConfigurationError(f"supervisor must be a ref returned by ActorSystem.supervisor, got {ref!r}")
        state = self._sups[ref.name]
        if state.failed is not None:
            raise ConfigurationError(f"supervisor {ref.name!r} has escalated ({state.failed}); it takes no children")
        return state

    def _children_of(self, sup: SupervisorState) -> list[dict[str, Any]]:
        out = []
        for child in sup.children:
            spec = self._specs.get(child)
            up = self._refs.get(child)
            proc = self._children.get(child)
            alive = up is not None and (proc is None or not proc.exited.done()) and child not in self.node.tombstones
            out.append({"name": child, "kind": "supervisor" if child in self._sups else "actor",
                        "restart": spec.restart if spec else None,
                        "pid": up.pid if alive and up is not None else None,
                        "incarnation": up.incarnation if alive and up is not None else None})
        return out

    async def _spawn_local(self, node: Node, cls: type[Actor], args: tuple[Any, ...], kwargs: dict[str, Any],
                           name: str, incarnation: str) -> ActorRef:
        ref = ActorRef(name, node.endpoint, node.pid, node.host, incarnation, node=node)
        try:
            instance = cls(*args, **kwargs)
            instance.name = name
            instance.ref = ref
            cell = ActorCell(node, name, instance, incarnation)
            await cell.start()
        except Exception as exc:
            import traceback

            raise ActorInitFailed(f"actor {name!r} ({cls.__qualname__}) failed to start: {type(exc).__qualname__}: {exc}",
                                  actor=name, remote_traceback="".join(traceback.format_exception(exc))) from exc
        return ref

    async def _spawn_process(self, node: Node, spec: _Spec, name: str, incarnation: str) -> ActorRef:
        assert self._spawner is not None and self._dir is not None
        cls = spec.cls
        if spec.blob is None:
            spec.blob = pickle_spec(cls, spec.args, spec.kwargs)
        blob = spec.blob
        endpoint = spec.endpoint or self._new_endpoint()
        token = secrets.token_hex(8)
        header = {
            "name": name, "incarnation": incarnation, "node_id": f"{name}-{incarnation}",
            "endpoint": endpoint, "parent": node.endpoint, "parent_pid": node.pid,
            "token": token, "config": self.config.to_dict(),
            "heartbeat": None if self._hb is None else [self._hb.path, self._hb.interval],
            "rlimits": spec.rlimits or None,
            "cpus": spec.cpus,
            # Actors restarted so far: a ref made before a restart reaches the incarnation now there.
            "moved": [[ep, pid_, inc] for ep, (pid_, inc) in node.endpoint_pids.items()],
        }
        ready: asyncio.Future[Any] = node.loop.create_future()
        self._pending_spawns[token] = (ready, name)
        pid: int | None = None
        try:
            pid = await asyncio.wait_for(self._spawner.spawn(token, header, blob), self._spawn_timeout)
            self._by_pid[pid] = name
            exited = self._spawner.exit_future(pid)
            done, _ = await asyncio.wait({ready, exited}, timeout=self._spawn_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if ready in done:
                endpoint = ready.result()  # raises ActorInitFailed when on_start or the constructor raised
                spec.endpoint = endpoint
                ref = ActorRef(name, endpoint, pid, node.host, incarnation, node=node)
                self._children[name] = _Child(ref, pid, exited)
                if self._hb is not None:
                    self._hb.watch(pid)
                return ref
            if exited in done:
                raise ActorInitFailed(f"actor {name!r} ({cls.__qualname__}): its process "
                                      f"{describe_exit(exited.result())} before it was ready", actor=name)
            raise ActorInitFailed(f"actor {name!r} ({cls.__qualname__}) was not ready within "
                                  f"spawn_timeout={self._spawn_timeout}s", actor=name)
        except BaseException:
            if pid is not None:
                self._dead_pids.add(pid)
                await self._reap(pid)
            path = ipc_path(endpoint)
            if path is not None and os.path.exists(path):
                os.unlink(path)
            raise
        finally:
            self._pending_spawns.pop(token, None)

    async def _reap(self, pid: int) -> None:
        """Make sure pid is gone: wait, then SIGTERM, then SIGKILL."""
        assert self._spawner is not None
        exited = self._spawner.exit_future(pid)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and not exited.done():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                await asyncio.wait_for(asyncio.shield(exited), self._stop_timeout)
                break
            except asyncio.TimeoutError:
                continue
        self._by_pid.pop(pid, None)
        self._spawner.forget(pid)

    async def _on_spawn_ready(self, env: Any) -> None:
        token, _pid, endpoint = env.body[0]
        entry = self._pending_spawns.get(token)
        if entry is not None and not entry[0].done():
            entry[0].set_result(endpoint)

    async def _on_spawn_failed(self, env: Any) -> None:
        token, message, tb = env.body[0]
        entry = self._pending_spawns.get(token)
        if entry is not None and not entry[0].done():
            fut, name = entry
            fut.set_exception(ActorInitFailed(f"actor {name!r} failed to start: {message}", actor=name,
                                              remote_traceback=tb))

    def _on_child_exit(self, pid: int, code: int) -> None:
        if self._hb is not None:
            self._hb.forget(pid)
        name = self._by_pid.get(pid)
        if name is None or self._node is None:
            return
        child = self._children.get(name)
        if child is None or child.pid != pid:
            return
        why = self._silent.pop(pid, None) or describe_exit(code)
        self._node.peer_died(child.ref.endpoint, f"actor {name!r} (pid {pid}) {why}", code)
        self._node.process_died(pid)
        self._dead_pids.add(pid)
        # A SIGKILLed process cannot unlink its pool; consumers of those segments have
        # them mapped already, or fail with TensorLost.
        sweep_dead_segments(pids={pid})
        path = ipc_path(child.ref.endpoint)
        if path is not None and os.path.exists(path):
            try:
                os.unlink(path)  # a SIGKILLed process cannot remove its own socket file
            except OSError:
                pass
        if not child.stopping:
            self._by_pid.pop(pid, None)
            if self._spawner is not None:
                self._spawner.forget(pid)
        if not child.stopping and not self._closing and name in self._specs:
            abnormal = code != 0 or pid in self._dead_pids_silent
            self._node.tasks.spawn(self._child_failed(name, f"pid {pid} {why}", abnormal, code),
                                   name=f"supervise {name}")

    def _on_silent(self, pid: int, quiet: float) -> None:
        """A watched process stopped beating: fence it (SIGKILL) before anything replaces it;
        its exit then goes to its supervisor as an abnormal one."""
        name = self._by_pid.get(pid)
        assert self._hb is not None
        why = (f"was declared unresponsive: no heartbeat for {quiet:.2f}s (heartbeat_interval "
               f"{self._hb.interval:g}s x liveness {self._hb.liveness}); it was killed")
        self._silent[pid] = why
        self._dead_pids_silent.add(pid)
        child = self._children.get(name) if name is not None else None
        if child is not None and self._node is not None:
            sup = self._sups.get(self._specs[name].supervisor) if name in self._specs else None
            if sup is not None:
                sup.event("unresponsive", name, pid=pid, silent_s=round(quiet, 3))
            # Fail its pending calls now, with the reason, rather than at the exit.
            self._node.peer_died(child.ref.endpoint, f"actor {name!r} (pid {pid}) {why}", None)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- stopping and looking up -----------------------------------------------------------

    async def stop(self, ref: ActorRef) -> None:
        """Stop an actor gracefully: it finishes every message it accepted, runs on_stop and
        exits. One that does not within stop_timeout gets SIGTERM, then SIGKILL. A supervisor
        stops its children first, newest first. A stopped actor is not restarted."""
        node = self.node
        name = ref.name
        if name not in self._refs:
            if name in node.tombstones:
                return  # it died and was not restarted: nothing left to stop
            raise ActorNotFound(f"no actor named {name!r} in this system")
        try:
            await self._terminate(name, final=True)
        finally:
            self._forget(name)

    async def kill(self, ref: ActorRef) -> None:
        """Kill an actor abruptly, as a crash would: a process actor gets SIGKILL; a local one
        is torn down, its queued and running calls failing with ActorDied. Its supervisor then
        acts as after any abnormal exit. For tests and fault drills."""
        node = self.node
        name = ref.name
        if name not in self._refs:
            raise ActorNotFound(f"no actor named {name!r} in this system")
        child = self._children.get(name)
        if child is not None:
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        cell = node.cells.get(name)
        if cell is not None and name not in self._sups:
            cell.crash("was killed")
            if not self._closing and name in self._specs:
                node.tasks.spawn(self._child_failed(name, "was killed", True), name=f"supervise {name}")

    async def _terminate(self, name: str, *, final: bool) -> None:
        """Stop the running incarnation of name (a supervisor: its children, newest first)."""
        node = self.node
        sup = self._sups.get(name)
        if sup is not None:
            for child in reversed(list(sup.children)):
                if child in self._refs:
                    if final:
                        try:
                            await self._terminate(child, final=True)
                        finally:
                            self._forget(child)
                    elif self._is_up(child):
                        await self._terminate(child, final=False)
            if not final:
                return
        child_proc = self._children.get(name)
        if child_proc is None:
            cell = node.cells.get(name)
            if cell is not None:
                if not final:
                    # Until it is started again, calls fail with ActorDied (which at-least-once
                    # calls retry), not ActorNotFound.
                    node.tombstones[name] = ActorDied(
                        f"actor {name!r} was stopped by its supervisor to be restarted", actor=name)
                try:
                    await wait_until(cell.stop(), time.time() + self._stop_timeout)
                except asyncio.TimeoutError:
                    # A handler that does not finish: the local equivalent of SIGKILL after
                    # the grace period (what it still holds fails with ActorDied).
                    cell.crash(f"did not stop within stop_timeout={self._stop_timeout:g}s and was torn down")
            return
        child_proc.stopping = True
        ref = child_proc.ref
        if not child_proc.exited.done():
            peer = node.peer(ref.endpoint, ref.pid, ref.host)
            try:
                await node.call(peer, None, "stop", [], timeout=self._stop_timeout)
                await node.call(peer, None, "exit", [], timeout=self._stop_timeout)
            except CascadaError:
                pass  # it died, hangs, or broke the handshake: _reap escalates to signals
            await self._reap(child_proc.pid)
        if final:
            peer_ = node.peers.pop(ref.endpoint, None)
            if peer_ is not None:
                peer_.close(ActorDied(f"actor {name!r} was stopped", actor=name))
        else:
            node.peer_died(ref.endpoint, f"actor {name!r} was stopped by its supervisor to be restarted", None)
        path = ipc_path(ref.endpoint)
        if path is not None and os.path.exists(path):
            os.unlink(path)

    def _forget(self, name: str) -> None:
        self._refs.pop(name, None)
        self._children.pop(name, None)
        if name in self._order:
            self._order.remove(name)
        spec = self._specs.pop(name, None)
        if spec is not None:
            sup = self._sups.get(spec.supervisor)
            if sup is not None and name in sup.children:
                sup.children.remove(name)
        self._sups.pop(name, None)

    def _is_up(self, name: str) -> bool:
        if name in self._sups:
            return self._sups[name].failed is None
        proc = self._children.get(name)
        if proc is not None:
            return not proc.exited.done() and not proc.stopping
        return self._node is not None and name in self._node.cells

    # -- supervision -------------------------------------------------------------------------

    async def _child_failed(self, name: str, why: str, abnormal: bool, code: int | None = None) -> None:
        spec = self._specs.get(name)
        if spec is None or self._closing:
            return
        sup = self._sups[spec.supervisor]
        sup.event("exit", name, reason=why, abnormal=abnormal, code=code)
        if spec.restart == "temporary" or (spec.restart == "transient" and not abnormal):
            died = ActorDied(f"actor {name!r} {why}; it is {spec.restart} and was not restarted", actor=name)
            self.node.tombstones[name] = died
            proc = self._children.get(name)
            if proc is not None:
                self.node.bury(proc.ref.endpoint, died)
            self._forget(name)
            return
        await self._restart(sup, name)

    async def _restart(self, sup: SupervisorState, name: str) -> None:
        """Restart name (and whom the strategy says) until it starts, or the intensity is
        spent and the supervisor escalates. A loop, not recursion: a child that fails every
        start must neither grow the stack nor hold the event loop between attempts."""
        lock = self._sup_locks.setdefault(sup.name, asyncio.Lock())
        failed: str | None = name
        while failed is not None:
            name, failed = failed, None
            async with lock:
                if self._closing or sup.failed is not None or name not in self._specs or self._is_up(name):
                    return
                err = sup.note_restart(name)
                if err is not None:
                    await self._escalate(sup, err)
                    return
                affected = sup.affected(name)
                for other in reversed(affected):
                    if other != name and self._is_up(other):
                        sup.event("stop", other, reason=f"{sup.strategy}: {name!r} failed")
                        await self._terminate(other, final=False)
                for child in affected:
                    if self._closing:
                        return
                    spec = self._specs.get(child)
                    if child != name and spec is not None and spec.restart == "temporary":
                        # OTP: a temporary child stopped on the way is removed, not restarted.
                        self.node.tombstones[child] = ActorDied(
                            f"actor {child!r} is temporary and was stopped by its supervisor "
                            f"({sup.strategy} after {name!r} failed); it was not restarted", actor=child)
                        self._forget(child)
                        continue
                    try:
                        await self._start_again(child)
                    except (CascadaError, OSError) as exc:
                        sup.event("start_failed", child, error=str(exc).splitlines()[0])
                        failed = child  # counts against the intensity too
                        break
                    ref = self._refs.get(child)
                    # t: when the new incarnation was up (before the other nodes were told)
                    sup.event("restart", child, pid=None if ref is None else ref.pid,
                              incarnation=None if ref is None else ref.incarnation,
                              t=self._up_at.pop(child, time.monotonic()))
            await asyncio.sleep(0)  # let the loop run between attempts

    async def _start_again(self, name: str) -> None:
        node = self.node
        sub = self._sups.get(name)
        if sub is not None:
            sub.failed = None
            sub.restarts.clear()
            for child in list(sub.children):
                await self._start_again(child)
            return
        spec = self._specs[name]
        ref = await self._start(node, name, spec)
        self._up_at[name] = time.monotonic()
        if spec.placement == "process":
            # The other nodes first, this one (and the listing) once they have it: whoever
            # sees the restart can reach the new incarnation through any actor.
            await self._announce(ref)
            node.update_peer(ref.endpoint, ref.pid, ref.incarnation)
        self._refs[name] = ref
        node.tombstones.pop(name, None)

    async def _announce(self, ref: ActorRef) -> None:
        """A new incarnation listens where the old one did: tell every node that talks to it,
        and wait (up to ANNOUNCE_TIMEOUT) until they have applied it, so that once a restart
        is reported, a call through any other actor reaches the new incarnation instead of
        being refused as meant for the old one."""
        node = self.node
        args = [ref.endpoint, ref.pid, ref.incarnation]
        calls = []
        for other in list(self._children.values()):
            if other.ref.endpoint == ref.endpoint or other.exited.done() or other.stopping:
                continue
            peer = node.peer(other.ref.endpoint, other.pid, other.ref.host)
            if peer.dead is None:
                calls.append(node.call(peer, None, "peer.update", args, timeout=ANNOUNCE_TIMEOUT))
        if calls:
            # A node that does not answer in time is stopped or dying: its own liveness
            # check deals with it, and it learns of the restart from its first refused call.
            await asyncio.gather(*calls, return_exceptions=True)

    async def _escalate(self, sup: SupervisorState, err: RestartIntensityExceeded) -> None:
        node = self.node
        sup.failed = err
        sup.event("escalate", err.actor, error=str(err))
        node.log.warning("escalate", "%s", err)
        for child in reversed(list(sup.children)):
            if self._is_up(child):
                await self._terminate(child, final=False)
        for child in sup.children:
            died = ActorDied(f"actor {child!r} is stopped: {err}", actor=child)
            node.tombstones[child] = died
            proc = self._children.get(child)
            if proc is not None:
                node.bury(proc.ref.endpoint, died)
        self._escalations.append(err)
        if sup.parent is not None:
            node.tasks.spawn(self._child_failed(sup.name, f"escalated: {err}", True), name=f"supervise {sup.name}")

    def lookup(self, name: str) -> ActorRef:
        """The ref of a running actor of this system, by name."""
        ref = self._refs.get(name)
        if ref is None:
            raise ActorNotFound(f"no actor named {name!r} in this system")
        return ref

    @property
    def actors(self) -> list[ActorRef]:
        """Refs of every running actor, oldest first."""
        return [self._refs[n] for n in self._order if n in self._refs]

    def pid_of(self, ref: ActorRef) -> int:
        """The OS pid of an actor's process (the caller's own pid for local actors)."""
        return ref.pid

    async def stats(self, ref: ActorRef, *, timeout: float | None = None) -> dict[str, Any]:
        """Counters of an actor and its node: mailbox depth and capacity, handled, failed,
        expired; rejected frames, late replies, unroutable replies."""
        node = self.node
        if ref.endpoint == node.endpoint:
            cell = node.cells.get(ref.name)
            if cell is None:
                raise ActorNotFound(f"no actor named {ref.name!r} on this node")
            return {"node": node.stats_snapshot(), "pid": node.pid, "actors": [cell.snapshot()]}
        result: dict[str, Any] = await node.call(node.peer(ref.endpoint, ref.pid, ref.host), None, "stats", [],
                                                 timeout=timeout)
        return result

    async def tensor_stats(self, ref: ActorRef | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """Tensor counters of an actor's process (None: this process): tensors sent by each
        path, received, lost; leases issued, released, expired and outstanding; the pool's
        segments, bytes and reuse counts."""
        node = self.node
        if ref is None or ref.endpoint == node.endpoint:
            return node.tensor_stats()
        result: dict[str, Any] = await node.call(node.peer(ref.endpoint, ref.pid, ref.host), None,
                                                 "tensor_stats", [], timeout=timeout)
        return result
