"""Raw-pyzmq floors for scripts/bench_core.py.

Each function here measures what the same work costs with no runtime in the way:
the same small msgpack message, the same one-unpack-plus-one-pack per side, the
same ipc transport, the same asyncio-over-uvloop integration style. bench_core
runs these in the same process and the same run as the runtime, so the printed
ratios compare like with like on whatever the machine is doing at that moment.

Rules every function keeps, so a benchmark run leaves nothing behind:
  * children are started with the "spawn" start method only, and always
    stopped (join, then terminate, then kill) in a ``finally``;
  * ipc endpoints live in a private ``tempfile.mkdtemp()`` directory (0700)
    that is removed at the end;
  * every zmq socket is closed with linger=0 and every context terminated;
  * pinning the calling thread is undone before returning.

Child-process targets are module-level functions because spawn pickles them by
reference (``_floors.<name>``); bench_core imports this module as ``_floors``
with scripts/ on sys.path, and spawn hands that sys.path to the children.

Run ``python scripts/_floors.py`` to check the floors by themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, NoReturn, TypeVar

import msgpack
import zmq

_T = TypeVar("_T")

PLACEMENTS: tuple[str, ...] = ("unpinned", "same-core", "cross-core")

# Sequential warm-up round trips before timing: lets ipc connect, the allocator
# and the CPU caches settle, so the first samples don't carry setup cost.
WARMUP_ROUNDS = 200

# A server child that is not ready within this long is treated as broken. Generous
# because under bench_core each spawn child re-imports bench_core as __mp_main__,
# which may pull in heavy modules.
_READY_TIMEOUT_S = 120.0
# How long a blocked send/recv may wait before we decide the peer is gone, so a
# crashed child turns into an exception instead of a hung benchmark.
_IO_TIMEOUT_MS = 30_000
# How long a child gets to exit by itself after being told to stop.
_STOP_GRACE_S = 5.0

# Control frame that asks an echo server to shut down. It is not valid msgpack
# for a request list, so it can never collide with a real request.
_STOP = b"\x00STOP"
_STOP_ACK = b"\x00STOPPED"


# --------------------------------------------------------------------------- payload


def small_message(corr: int) -> bytes:
    """The request the runtime sends for a small call, byte-for-byte the same shape."""
    return msgpack.packb([1, 1, corr, "n-client", "echo", "add", time.time() + 60.0, [2], None])


def _echo_reply(request: bytes) -> bytes:
    """Server side of one call: one unpack and one pack, like the runtime's server."""
    req = msgpack.unpackb(request)
    return msgpack.packb([1, 4, req[2], None, 3])


# --------------------------------------------------------------------------- placement


def _cpu_pair() -> list[int]:
    # The first two CPUs this process may run on (0 and 1 on an ordinary box).
    # Taken from the process's own mask rather than hard-coded so a cgroup/cpuset
    # that hides CPU 0 does not make sched_setaffinity fail.
    return sorted(os.sched_getaffinity(0))[:2]


# -- pinning whole processes (every thread: the event loop, zmq's I/O thread, the rest) --


def tids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def set_all_threads(pid: int, cpus: set[int]) -> int:
    """sched_setaffinity on every thread of pid; repeat until no new thread shows up.

    Returns how many threads are now on ``cpus``."""
    done: set[int] = set()
    for _ in range(5):
        new = [t for t in tids(pid) if t not in done]
        if not new:
            break
        for tid in new:
            try:
                os.sched_setaffinity(tid, cpus)
            except (ProcessLookupError, FileNotFoundError):
                pass  # the thread ended meanwhile
            done.add(tid)
    pinned = 0
    for tid in tids(pid):
        try:
            if os.sched_getaffinity(tid) == cpus:
                pinned += 1
        except (ProcessLookupError, FileNotFoundError):
            pass
    return pinned


ALL_CPUS: set[int] = os.sched_getaffinity(0)


def unpin_driver() -> None:
    set_all_threads(os.getpid(), ALL_CPUS)


def placement_cpus(placement: str) -> tuple[set[int], set[int]] | None:
    """(driver cpus, actor cpus) for a pinned placement, None for unpinned."""
    cpus = _cpu_pair()
    if placement == "same-core":
        return {cpus[0]}, {cpus[0]}
    if placement == "cross-core":
        return {cpus[0]}, {cpus[1]}
    return None


def pin_driver_and(pid: int, placement: str) -> tuple[tuple[set[int], set[int]] | None, str | None]:
    """Pin every thread of this process and of ``pid`` for an effective ``placement``.
    Returns (driver cpus, actor cpus) or None when unpinned, and a line saying what was done."""
    cpus = placement_cpus(placement)
    if cpus is None:
        return None, None
    d = set_all_threads(os.getpid(), cpus[0])
    a = set_all_threads(pid, cpus[1])
    return cpus, (f"pinned {d} driver threads to {sorted(cpus[0])}, "
                  f"{a} threads of pid {pid} to {sorted(cpus[1])}")


def resolve_placement(placement: str) -> tuple[str, str | None]:
    """Validate ``placement``; return (effective placement, note or None).

    cross-core needs two CPUs; with one it silently would mean same-core, which
    is a different measurement, so it falls back to unpinned and says so.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
    if placement == "cross-core" and len(_cpu_pair()) < 2:
        return "unpinned", "only one CPU available: cross-core fell back to unpinned"
    return placement, None


def pin(role: str, placement: str) -> set[int] | None:
    """Pin the calling thread for ``role`` ("client" or "server") under ``placement``.

    Returns the previous affinity mask when it changed something (so the caller
    can restore it), else None.

    Linux applies sched_setaffinity(0, ...) to the calling *thread*, and threads
    inherit the mask of the thread that creates them. So this must run before the
    zmq context is created: its I/O thread then inherits the pin, which is what
    same-core/cross-core are meant to measure. The calling process's other threads
    are not touched.
    """
    if role not in ("client", "server"):
        raise ValueError(f"role must be 'client' or 'server', not {role!r}")
    effective, _ = resolve_placement(placement)
    if effective == "unpinned":
        return None
    cpus = _cpu_pair()
    if effective == "same-core":
        target = {cpus[0]}
    else:  # cross-core: server on the second CPU, client on the first
        target = {cpus[1]} if role == "server" else {cpus[0]}
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, target)
    return previous


@contextlib.contextmanager
def _pinned(role: str, placement: str) -> Iterator[None]:
    # Client-side pinning happens in the caller's own thread; undo it afterwards so
    # the runtime measured next in the same process is not left pinned by a floor.
    previous = pin(role, placement)
    try:
        yield
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)


def _result_placement(result: dict[str, Any], requested: str) -> dict[str, Any]:
    effective, note = resolve_placement(requested)
    result["placement"] = effective
    if effective != requested:
        result["requested_placement"] = requested
    if note is not None:
        result["note"] = note
    return result


# --------------------------------------------------------------------------- plumbing


def _spawn_ctx() -> Any:
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _private_dir() -> Iterator[str]:
    # mkdtemp already creates 0700; chmod anyway so the guarantee does not depend
    # on that implementation detail. Nobody else can connect to our ipc sockets.
    path = tempfile.mkdtemp(prefix="cascada-floor-")
    try:
        os.chmod(path, 0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _ipc(directory: str, name: str) -> str:
    return "ipc://" + os.path.join(directory, name)


def _close(sock: zmq.Socket | None) -> None:
    if sock is not None and not sock.closed:
        sock.close(linger=0)


def _stop_child(proc: Any, grace_s: float = _STOP_GRACE_S) -> None:
    """Make sure ``proc`` is gone: wait briefly, then SIGTERM, then SIGKILL."""
    if proc is None:
        return
    try:
        if proc.pid is None:  # never started
            return
        proc.join(grace_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    finally:
        with contextlib.suppress(ValueError):  # ValueError: still running (cannot happen after kill+join)
            proc.close()


def _start_server(target: Callable[..., None], args: tuple[Any, ...], name: str) -> Any:
    """Spawn ``target(*args, ready_conn)`` and wait until it reports it is bound.

    The child sends ("ready", pid) after binding, or ("error", traceback) if its
    setup fails, so a setup failure surfaces here with the child's traceback
    instead of as a timeout. The child is stopped again if waiting fails.
    """
    ctx = _spawn_ctx()
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, writer), name=name, daemon=True)
    try:
        proc.start()
        # Drop our copy of the write end so the child's death reads as EOF here.
        writer.close()
        if not reader.poll(_READY_TIMEOUT_S):
            raise TimeoutError(f"{name}: not ready after {_READY_TIMEOUT_S:.0f}s")
        try:
            kind, detail = reader.recv()
        except EOFError:
            proc.join(1.0)
            raise RuntimeError(f"{name}: exited before ready (exit code {proc.exitcode})") from None
        if kind != "ready":
            raise RuntimeError(f"{name}: failed during setup:\n{detail}")
        return proc
    except BaseException:
        _stop_child(proc, grace_s=0.5)
        raise
    finally:
        writer.close()
        reader.close()


def _setup_failed(ready_conn: Any) -> NoReturn:
    """In a child, from an ``except`` block: hand the traceback to the parent and exit.

    The parent re-raises it with the traceback, so the child exits quietly
    (SystemExit) instead of printing the same traceback a second time.
    """
    with contextlib.suppress(Exception):
        ready_conn.send(("error", traceback.format_exc()))
        ready_conn.close()
    raise SystemExit(1)


def _run_uvloop(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine on a fresh, private uvloop loop and close it.

    A private loop (not uvloop.install()) leaves the caller's event-loop policy
    alone. Written without asyncio.Runner so it also works on Python 3.10.
    """
    import uvloop  # imported here so merely importing _floors stays light

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(factory())
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _call_sync(fn: Callable[..., _T], *args: Any) -> _T:
    """Call ``fn`` here, or in a one-off thread if this thread already runs a loop.

    The floors are synchronous; if bench_core ever calls them from inside a
    coroutine, the client code (its own uvloop, its own pinning) must not run on
    the caller's loop thread, so it gets a thread of its own.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor") as pool:
        return pool.submit(fn, *args).result()


def _rtt_result(samples_us: list[float]) -> dict[str, Any]:
    ordered = sorted(samples_us)
    # Nearest-rank percentile: an actually observed sample, no interpolation.
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        "samples_us": samples_us,
        "n": len(samples_us),
        "median_us": statistics.median(ordered),
        "p99_us": p99,
        "mean_us": statistics.fmean(ordered),
    }


# --------------------------------------------------------------------------- lean asyncio integration


class _LeanSocket:
    """A non-blocking zmq socket driven by loop.add_reader on its FD.

    zmq's FD is edge-triggered: it signals "events may have changed", and any
    zmq call on the socket (including a send) may consume that signal while
    leaving messages queued. So a wake-up drains until zmq.Again, and a send made
    outside a drain re-checks EVENTS and schedules a drain itself if POLLIN is set
    (otherwise a reply already queued would sit there with no FD wake-up).
    """

    def __init__(
        self,
        sock: zmq.Socket,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[list[bytes]], None],
    ) -> None:
        self.sock = sock
        self.on_message = on_message
        self._loop = loop
        self._fd: int = sock.getsockopt(zmq.FD)
        self._draining = False
        self._drain_scheduled = False
        loop.add_reader(self._fd, self._drain)
        # Messages may have arrived before the reader was registered; their edge
        # is already gone, so look once.
        self._recheck()

    def _drain(self) -> None:
        self._drain_scheduled = False
        self._draining = True
        sock = self.sock
        try:
            # Reading EVENTS is what re-arms the FD; then take everything there is.
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return  # a recv that found nothing leaves the FD armed
                self.on_message(frames)
        finally:
            self._draining = False

    def _recheck(self) -> None:
        if not self._drain_scheduled and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames, zmq.NOBLOCK)
        # Inside a drain the loop's next recv covers anything this send uncovered,
        # so the extra EVENTS call is only needed for sends from outside it.
        if not self._draining:
            self._recheck()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        _close(self.sock)


def _lean_socket_opts(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # Unbounded queues: at the HWM a ROUTER silently drops replies and a DEALER
    # raises Again on a NOBLOCK send; either would stall the pipelined floor.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


async def _lean_echo_server(endpoint: str, ready_conn: Any) -> None:
    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    lean: _LeanSocket | None = None
    try:
        sock = ctx.socket(zmq.ROUTER)
        _lean_socket_opts(sock)
        stopped: asyncio.Future[None] = loop.create_future()

        def on_message(frames: list[bytes]) -> None:
            assert lean is not None
            identity, payload = frames[0], frames[-1]
            if payload == _STOP:
                lean.send([identity, _STOP_ACK])
                if not stopped.done():
                    stopped.set_result(None)
                return
            lean.send([identity, _echo_reply(payload)])

        try:
            sock.bind(endpoint)
        except BaseException:
            _close(sock)
            raise
        lean = _LeanSocket(sock, loop, on_message)
        ready_conn.send(("ready", os.getpid()))
        ready_conn.close()
        await stopped
        # Let the I/O thread push the ack out before the socket goes (linger=0
        # would otherwise discard it). The client does not depend on it, but a
        # clean ack keeps the stop path quiet.
        await asyncio.sleep(0.05)
    finally:
        if lean is not None:
            lean.close()
        ctx.term()


def _lean_echo_server_main(endpoint: str, placement: str, ready_conn: Any) -> None:
    """Child: lean ROUTER echo server under uvloop until told to stop."""
    try:
        pin("server", placement)
    except BaseException:
        _setup_failed(ready_conn)
    try:
        _run_uvloop(lambda: _lean_echo_server(endpoint, ready_conn))
    except BaseException:
        # Before "ready" the parent is still listening on ready_conn (closed once
        # ready is sent); after it, stderr and the exit code are the only channel.
        if not ready_conn.closed:
            _setup_failed(ready_conn)
        raise


class _LeanClient:
    """Lean DEALER client in the calling process, watched against server death."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ctx: zmq.Context, endpoint: str, server: Any) -> None:
        self._loop = loop
        self._server = server
        self._waiters: set[asyncio.Future[Any]] = set()
        self._on_reply: Callable[[list[bytes]], None] = self._reply_to_future
        self._pending: dict[int, asyncio.Future[Any]] = {}
        sock = ctx.socket(zmq.DEALER)
        try:
            _lean_socket_opts(sock)
            sock.connect(endpoint)
        except BaseException:
            _close(sock)
            raise
        self._lean = _LeanSocket(sock, loop, lambda frames: self._on_reply(frames))
        # The process sentinel becomes readable when the server dies, so a crash
        # fails the outstanding waits at no per-call cost (no wait_for timers in
        # the timed loop).
        self._sentinel: int | None = server.sentinel
        loop.add_reader(server.sentinel, self._server_died)

    def _server_died(self) -> None:
        self._unwatch()
        exc = RuntimeError(f"echo server exited unexpectedly (exit code {self._server.exitcode})")
        for fut in list(self._pending.values()) + list(self._waiters):
            if not fut.done():
                fut.set_exception(exc)

    def _unwatch(self) -> None:
        if self._sentinel is not None:
            self._loop.remove_reader(self._sentinel)
            self._sentinel = None

    def _reply_to_future(self, frames: list[bytes]) -> None:
        reply = msgpack.unpackb(frames[-1])
        fut = self._pending.pop(reply[2], None)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    async def call(self, corr: int) -> Any:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[corr] = fut
        self._lean.send([small_message(corr)])
        return await fut

    async def sequential(self, n: int, first_corr: int) -> list[float]:
        """n sequential calls; returns each round trip in microseconds."""
        samples = [0.0] * n
        clock = time.perf_counter_ns
        for i in range(n):
            t0 = clock()
            await self.call(first_corr + i)
            samples[i] = (clock() - t0) / 1000.0
        return samples

    async def pipelined(self, total: int, in_flight: int, first_corr: int) -> float:
        """Keep ``in_flight`` calls outstanding until ``total`` replies; return seconds.

        Replies are handled straight in the reader callback (no future per call):
        the floor is the cheapest correct way to do it.
        """
        done: asyncio.Future[None] = self._loop.create_future()
        self._waiters.add(done)
        sent = 0
        received = 0
        lean = self._lean

        def on_reply(frames: list[bytes]) -> None:
            nonlocal sent, received
            msgpack.unpackb(frames[-1])
            received += 1
            if sent < total:
                lean.send([small_message(first_corr + sent)])
                sent += 1
            if received == total and not done.done():
                done.set_result(None)

        self._on_reply = on_reply
        try:
            t0 = time.perf_counter()
            for _ in range(min(in_flight, total)):
                lean.send([small_message(first_corr + sent)])
                sent += 1
            await done
            return time.perf_counter() - t0
        finally:
            self._on_reply = self._reply_to_future
            self._waiters.discard(done)

    async def stop_server(self) -> None:
        # The server exiting is now expected, not a failure.
        self._unwatch()
        if not self._server.is_alive():
            return  # nothing to ask; waiting for an ack would only burn the grace period
        acked: asyncio.Future[None] = self._loop.create_future()

        def on_ack(frames: list[bytes]) -> None:
            if frames[-1] == _STOP_ACK and not acked.done():
                acked.set_result(None)

        self._on_reply = on_ack
        self._lean.send([_STOP])
        # Best effort: if the ack is lost the caller's _stop_child still ends it.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(acked, _STOP_GRACE_S)

    def close(self) -> None:
        self._unwatch()
        self._lean.close()


async def _with_lean_client(
    endpoint: str, server: Any, body: Callable[[_LeanClient], Coroutine[Any, Any, _T]]
) -> _T:
    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    client: _LeanClient | None = None
    try:
        client = _LeanClient(loop, ctx, endpoint, server)
        result = await body(client)
        await client.stop_server()
        return result
    finally:
        if client is not None:
            client.close()
        ctx.term()


def _lean_session(placement: str, body: Callable[[_LeanClient], Coroutine[Any, Any, _T]]) -> _T:
    """Start a lean echo server child, run ``body`` against it as the client, stop it."""
    effective, _ = resolve_placement(placement)
    with _private_dir() as directory:
        endpoint = _ipc(directory, "echo")
        server = None
        try:
            # Start the server before pinning ourselves: spawn children inherit the
            # parent thread's mask, and the server pins itself anyway.
            server = _start_server(_lean_echo_server_main, (endpoint, effective), "floor-lean-echo")

            def client_side() -> _T:
                with _pinned("client", effective):
                    return _run_uvloop(lambda: _with_lean_client(endpoint, server, body))

            return _call_sync(client_side)
        finally:
            _stop_child(server)


# --------------------------------------------------------------------------- 1. lean echo RTT


def lean_echo_rtt(n: int, placement: str) -> dict[str, Any]:
    """Sequential round trips, lean DEALER client <-> lean ROUTER echo server, over ipc.

    Returns samples_us (one per round trip), median_us, p99_us, placement.
    """
    if n < 1:
        raise ValueError("n must be >= 1")

    async def body(client: _LeanClient) -> list[float]:
        await client.sequential(WARMUP_ROUNDS, first_corr=0)
        return await client.sequential(n, first_corr=WARMUP_ROUNDS)

    samples = _lean_session(placement, body)
    return _result_placement(_rtt_result(samples), placement)


# --------------------------------------------------------------------------- 2. blocking REQ/REP RTT


def _rep_server_main(endpoint: str, placement: str, ready_conn: Any) -> None:
    """Child: blocking REP echo server until told to stop."""
    ctx: zmq.Context | None = None
    sock: zmq.Socket | None = None
    try:
        try:
            pin("server", placement)
            ctx = zmq.Context()
            sock = ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint)
        except BaseException:
            _setup_failed(ready_conn)
        ready_conn.send(("ready", os.getpid()))
        ready_conn.close()
        recv, send = sock.recv, sock.send
        while True:
            request = recv()
            if request == _STOP:
                send(_STOP_ACK)
                break
            send(_echo_reply(request))
        # Give the I/O thread a moment to flush the ack before linger=0 close.
        time.sleep(0.05)
    finally:
        _close(sock)
        if ctx is not None:
            ctx.term()


def _reqrep_client(endpoint: str, n: int, placement: str) -> list[float]:
    with _pinned("client", placement):
        ctx = zmq.Context()
        sock: zmq.Socket | None = None
        try:
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            # A dead server raises zmq.Again after this long instead of hanging.
            sock.setsockopt(zmq.RCVTIMEO, _IO_TIMEOUT_MS)
            sock.setsockopt(zmq.SNDTIMEO, _IO_TIMEOUT_MS)
            sock.connect(endpoint)
            send, recv, clock = sock.send, sock.recv, time.perf_counter_ns
            for corr in range(WARMUP_ROUNDS):
                send(small_message(corr))
                msgpack.unpackb(recv())
            samples = [0.0] * n
            for i in range(n):
                t0 = clock()
                send(small_message(WARMUP_ROUNDS + i))
                msgpack.unpackb(recv())
                samples[i] = (clock() - t0) / 1000.0
            send(_STOP)
            with contextlib.suppress(zmq.Again):
                recv()
            return samples
        finally:
            _close(sock)
            ctx.term()


def reqrep_rtt(n: int, placement: str) -> dict[str, Any]:
    """Sequential round trips with blocking REQ/REP (no asyncio), same payload and msgpack work."""
    if n < 1:
        raise ValueError("n must be >= 1")
    effective, _ = resolve_placement(placement)
    with _private_dir() as directory:
        endpoint = _ipc(directory, "rep")
        server = None
        try:
            server = _start_server(_rep_server_main, (endpoint, effective), "floor-rep-echo")
            samples = _call_sync(_reqrep_client, endpoint, n, effective)
        finally:
            _stop_child(server)
    return _result_placement(_rtt_result(samples), placement)


# --------------------------------------------------------------------------- 3. lean pipelined throughput


def lean_pipelined(total: int, in_flight: int, placement: str, runs: int = 3) -> dict[str, Any]:
    """Throughput with ``in_flight`` calls outstanding, lean client and server.

    One server and one connection serve a warm-up and ``runs`` timed runs;
    calls_per_s is the median run, runs_calls_per_s lists them all.
    """
    if total < 1 or in_flight < 1 or runs < 1:
        raise ValueError("total, in_flight and runs must be >= 1")

    async def body(client: _LeanClient) -> list[float]:
        await client.sequential(WARMUP_ROUNDS, first_corr=0)
        # A short pipelined warm-up so the first timed run does not pay for
        # growing the zmq pipes and queues to in_flight depth.
        corr = WARMUP_ROUNDS
        warm = min(total, max(in_flight * 2, 2000))
        await client.pipelined(warm, in_flight, first_corr=corr)
        corr += warm
        rates = []
        for _ in range(runs):
            seconds = await client.pipelined(total, in_flight, first_corr=corr)
            corr += total
            rates.append(total / seconds)
        return rates

    rates = _lean_session(placement, body)
    result = {
        "calls_per_s": statistics.median(rates),
        "runs_calls_per_s": rates,
        "total": total,
        "in_flight": in_flight,
    }
    return _result_placement(result, placement)


# --------------------------------------------------------------------------- 4. PUSH/PULL msgpack throughput


def _pull_sink_main(
    data_endpoint: str, done_endpoint: str, rounds: list[int], placement: str, ready_conn: Any
) -> None:
    """Child: PULL and decode each round's messages, then PUSH back the count."""
    ctx: zmq.Context | None = None
    pull: zmq.Socket | None = None
    done: zmq.Socket | None = None
    try:
        try:
            pin("server", placement)
            ctx = zmq.Context()
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.bind(data_endpoint)
            done = ctx.socket(zmq.PUSH)
            done.setsockopt(zmq.LINGER, 0)
            done.setsockopt(zmq.SNDTIMEO, _IO_TIMEOUT_MS)
            done.bind(done_endpoint)
        except BaseException:
            _setup_failed(ready_conn)
        ready_conn.send(("ready", os.getpid()))
        ready_conn.close()
        recv, unpack = pull.recv, msgpack.unpackb
        for size in rounds:
            count = 0
            for _ in range(size):
                unpack(recv())
                count += 1
            done.send(msgpack.packb(count))
        # Let the last count leave before the linger=0 close.
        time.sleep(0.05)
    finally:
        _close(pull)
        _close(done)
        if ctx is not None:
            ctx.term()


def _pushpull_client(data_endpoint: str, done_endpoint: str, rounds: list[int], placement: str) -> list[float]:
    """Push each round and time it until the sink reports it decoded every message."""
    with _pinned("client", placement):
        ctx = zmq.Context()
        push: zmq.Socket | None = None
        done: zmq.Socket | None = None
        try:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            # Blocking sends with the default HWM (back-pressure is part of the
            # floor); the timeout only turns a dead sink into an error.
            push.setsockopt(zmq.SNDTIMEO, _IO_TIMEOUT_MS)
            push.connect(data_endpoint)
            done = ctx.socket(zmq.PULL)
            done.setsockopt(zmq.LINGER, 0)
            done.setsockopt(zmq.RCVTIMEO, _IO_TIMEOUT_MS)
            done.connect(done_endpoint)
            send = push.send
            seconds = []
            for size in rounds:
                t0 = time.perf_counter()
                for i in range(size):
                    send(small_message(i))
                count = msgpack.unpackb(done.recv())
                seconds.append(time.perf_counter() - t0)
                if count != size:
                    raise RuntimeError(f"sink decoded {count} messages, expected {size}")
            return seconds
        finally:
            _close(push)
            _close(done)
            ctx.term()


def pushpull_msgpack(total: int, placement: str, runs: int = 3) -> dict[str, Any]:
    """One-way throughput: blocking PUSH here, PULL+unpack in a child, over ipc.

    Each run is timed until the child has decoded all ``total`` messages and said
    so on a second socket. msgs_per_s is the median of ``runs``.
    """
    if total < 1 or runs < 1:
        raise ValueError("total and runs must be >= 1")
    effective, _ = resolve_placement(placement)
    # First round is a warm-up: it also guarantees the connection exists before
    # anything is timed.
    rounds = [min(total, 20_000)] + [total] * runs
    with _private_dir() as directory:
        data_endpoint = _ipc(directory, "data")
        done_endpoint = _ipc(directory, "done")
        sink = None
        try:
            sink = _start_server(
                _pull_sink_main, (data_endpoint, done_endpoint, rounds, effective), "floor-pull-sink"
            )
            seconds = _call_sync(_pushpull_client, data_endpoint, done_endpoint, rounds, effective)
        finally:
            _stop_child(sink)
    rates = [total / s for s in seconds[1:]]
    result = {"msgs_per_s": statistics.median(rates), "runs_msgs_per_s": rates, "total": total}
    return _result_placement(result, placement)


# --------------------------------------------------------------------------- 5. plain spawn + import


def _import_child_main(module: str, conn: Any) -> None:
    """Child: import ``module``, say so, then wait until told to stop (or EOF)."""
    try:
        import importlib

        importlib.import_module(module)
    except BaseException:
        _setup_failed(conn)
    conn.send(("ready", os.getpid()))
    with contextlib.suppress(EOFError):
        conn.recv()
    conn.close()


def plain_spawn_import(module: str, k: int) -> dict[str, Any]:
    """Wall time for k spawn-started processes to each import ``module`` and report ready.

    Timed from the first start() until the last ready message. Under bench_core
    this includes spawn re-importing bench_core as __mp_main__ in each child,
    the same price any spawn-based runtime pays in that process.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    ctx = _spawn_ctx()
    procs: list[Any] = []
    conns: list[Any] = []
    try:
        t0 = time.perf_counter()
        for i in range(k):
            parent_end, child_end = ctx.Pipe(duplex=True)
            conns.append(parent_end)
            proc = ctx.Process(
                target=_import_child_main, args=(module, child_end), name=f"floor-import-{i}", daemon=True
            )
            procs.append(proc)
            proc.start()
            # Our copy of the child end must go, or a dead child never reads as EOF.
            child_end.close()
        waiting = set(conns)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(waiting)} of {k} children not ready after {_READY_TIMEOUT_S:.0f}s")
            for conn in multiprocessing.connection.wait(list(waiting), timeout=left):
                try:
                    kind, detail = conn.recv()
                except EOFError:
                    raise RuntimeError(f"a child exited before importing {module!r}") from None
                if kind != "ready":
                    raise RuntimeError(f"a child failed to import {module!r}:\n{detail}")
                waiting.discard(conn)
        seconds = time.perf_counter() - t0
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send("stop")
    finally:
        for conn in conns:
            conn.close()  # EOF also releases any child that missed "stop"
        for proc in procs:
            _stop_child(proc)
    return {"seconds": seconds, "k": k, "module": module}


# --------------------------------------------------------------------------- 6. idle CPU


def _cpu_seconds(pid: int) -> float:
    """utime+stime of every thread of ``pid``, in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # comm (field 2) may contain spaces and parentheses; fields after the last
    # ")" are fixed. There, index 0 is field 3 (state); utime/stime are 14/15.
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_percent(pids: list[int], seconds: float) -> dict[str, Any]:
    """CPU the given processes burn over ``seconds`` of wall time, in % of one core.

    Resolution is one clock tick (usually 10 ms) per process, so use a window of
    a few seconds for idle figures. The denominator is the measured elapsed
    wall time, which is ``seconds`` plus sleep overshoot. A pid that vanishes
    during the window is reported as None and left out of the total.
    """
    if seconds <= 0:
        raise ValueError("seconds must be > 0")
    before: dict[int, float | None] = {}
    for pid in pids:
        try:
            before[pid] = _cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            before[pid] = None
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    per_pid: dict[int, float | None] = {}
    total = 0.0
    for pid in pids:
        start = before[pid]
        try:
            end = _cpu_seconds(pid) if start is not None else None
        except (FileNotFoundError, ProcessLookupError):
            end = None
        if start is None or end is None:
            per_pid[pid] = None
            continue
        used = end - start
        total += used
        per_pid[pid] = used / elapsed * 100.0
    return {
        "percent_of_core": total / elapsed * 100.0,
        "per_pid": per_pid,
        "cpu_seconds": total,
        "elapsed_s": elapsed,
        "vanished": [pid for pid, value in per_pid.items() if value is None],
    }


# --------------------------------------------------------------------------- self-check


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    def tidy(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 2)
        if isinstance(value, list):
            return [tidy(v) for v in value]
        return value

    return {key: tidy(value) for key, value in result.items() if key != "samples_us"}


def _main() -> None:
    print(f"cpus available: {sorted(os.sched_getaffinity(0))}")
    for placement in PLACEMENTS:
        print(f"lean_echo_rtt    {placement:10s}", _brief(lean_echo_rtt(2000, placement)))
        print(f"reqrep_rtt       {placement:10s}", _brief(reqrep_rtt(2000, placement)))
    for placement in PLACEMENTS:
        print(f"lean_pipelined   {placement:10s}", _brief(lean_pipelined(20_000, 1000, placement)))
    for placement in PLACEMENTS:
        print(f"pushpull_msgpack {placement:10s}", _brief(pushpull_msgpack(200_000, placement)))
    print("plain_spawn_import", _brief(plain_spawn_import("json", 4)))
    print("idle_cpu_percent (self, 0.5 s)", _brief(idle_cpu_percent([os.getpid()], 0.5)))


if __name__ == "__main__":
    _main()
