"""A small TCP chaos proxy for the reliability scenarios (RELIABILITY.md, "Shared harness":
chaos-proxy faults), in the style of Toxiproxy: netem is not available on the test machines.

It listens on 127.0.0.1 only and forwards every accepted connection to one upstream
address, adding a delay and random jitter to each chunk it forwards and resetting (RST)
every live connection when the bytes it has forwarded cross the thresholds of its
:class:`Schedule`, or when a test calls :meth:`ChaosProxy.reset_all`. Jitter never reorders
bytes: TCP is a byte stream, so a chunk is forwarded no earlier than the one before it.

It runs on the caller's event loop (asyncio or uvloop), and every connection and task it
made is gone after :meth:`ChaosProxy.close`."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, timeout 0: close() sends RST, not FIN
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Schedule:
    """What the proxy does to the traffic, all of it in one value (Hypothesis draws these).

    - ``delay`` and ``jitter`` (seconds): each chunk is held ``delay + uniform(0, jitter)``.
    - ``resets_up`` / ``resets_down``: reset every live connection when the bytes forwarded
      client->server (server->client) since the proxy started cross each threshold; the chunk
      that crossed it is dropped with the connections.
    - ``stalls``: (bytes client->server, seconds) pairs: forwarding stops both ways for that
      long once that many bytes went up.
    - ``seed``: the jitter's random generator."""

    delay: float = 0.0
    jitter: float = 0.0
    resets_up: tuple[int, ...] = ()
    resets_down: tuple[int, ...] = ()
    stalls: tuple[tuple[int, float], ...] = ()
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        return {"delay_ms": round(self.delay * 1000, 3), "jitter_ms": round(self.jitter * 1000, 3),
                "resets_up": list(self.resets_up), "resets_down": list(self.resets_down),
                "stalls": [[b, round(s, 3)] for b, s in self.stalls], "seed": self.seed}


@dataclass
class ProxyStats:
    connections: int = 0
    resets: int = 0  # reset events (each may abort several connections)
    aborted: int = 0  # connections aborted by resets
    upstream_refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    stalls: int = 0
    max_hold_s: float = 0.0
    events: list[tuple[float, str]] = field(default_factory=list)


class _Conn:
    __slots__ = ("client", "upstream", "tasks", "closed")

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def abort(self, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.client, self.upstream):
            if rst:
                sock = w.get_extra_info("socket")
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
            w.transport.abort()
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()


class ChaosProxy:
    """``async with ChaosProxy(("127.0.0.1", port), Schedule(...)) as proxy:`` then connect
    to ``proxy.endpoint`` (``tcp://127.0.0.1:<port>``) instead of the upstream."""

    def __init__(self, upstream: tuple[str, int] | str, schedule: Schedule | None = None, *,
                 on_event: Any = None) -> None:
        if isinstance(upstream, str):
            upstream = parse_tcp(upstream)
        host, _port = upstream
        if not (host.startswith("127.") or host in ("localhost", "::1")):
            raise ValueError(f"the chaos proxy forwards to loopback only, not {host!r}")
        self.upstream = upstream
        self.schedule = schedule or Schedule()
        self.stats = ProxyStats()
        self._rng = random.Random(self.schedule.seed)
        self._delay = self.schedule.delay
        self._jitter = self.schedule.jitter
        self._resets_up = sorted(self.schedule.resets_up)
        self._resets_down = sorted(self.schedule.resets_down)
        self._stalls = sorted(self.schedule.stalls)
        self._stalled_until = 0.0
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._on_event = on_event
        self._closing = False
        self.port = 0
        self.t0 = time.monotonic()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def start(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.t0 = time.monotonic()
        return self

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        # Aborting a connection ends its pumps, and with them its handler; a handler is not
        # cancelled (asyncio's stream server would log the CancelledError), unless it is
        # still stuck after a while.
        for conn in list(self._conns):
            conn.abort(rst=False)
        handlers = set(self._handlers)
        if handlers:
            _done, stuck = await asyncio.wait(handlers, timeout=2.0)
            for t in stuck:
                t.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        self._conns.clear()
        self._handlers.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> ChaosProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- faults a test can inject by hand ------------------------------------------------

    def reset_all(self, why: str = "reset") -> int:
        """RST every live connection now; returns how many there were."""
        conns = [c for c in self._conns if not c.closed]
        for conn in conns:
            conn.abort(rst=True)
        self._conns.difference_update(conns)
        self.stats.resets += 1
        self.stats.aborted += len(conns)
        self._event(f"{why}: {len(conns)} connection(s)")
        return len(conns)

    def stall(self, seconds: float) -> None:
        """Forward nothing, either way, for ``seconds``."""
        self._stalled_until = max(self._stalled_until, time.monotonic() + seconds)
        self.stats.stalls += 1
        self._event(f"stall {seconds:.3f}s")

    def set_delay(self, delay: float, jitter: float = 0.0) -> None:
        self._delay, self._jitter = delay, jitter
        self._event(f"delay {delay:.4f}s jitter {jitter:.4f}s")

    # -- forwarding ---------------------------------------------------------------------

    def _event(self, what: str) -> None:
        t = time.monotonic()
        self.stats.events.append((round(t - self.t0, 4), what))
        if self._on_event is not None:
            self._on_event(what)

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            try:
                ureader, uwriter = await asyncio.open_connection(*self.upstream)
            except OSError:
                self.stats.upstream_refused += 1
                cwriter.transport.abort()
                return
            if self._closing:
                uwriter.transport.abort()
                cwriter.transport.abort()
                return
            self.stats.connections += 1
            conn = _Conn(cwriter, uwriter)
            self._conns.add(conn)
            conn.tasks = [asyncio.ensure_future(self._pump(creader, uwriter, conn, up=True)),
                          asyncio.ensure_future(self._pump(ureader, cwriter, conn, up=False))]
            try:
                await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                conn.abort(rst=False)  # one side ended: so does the other (a proxy passes FIN on as a close)
                self._conns.discard(conn)
                await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            if task is not None:
                self._handlers.discard(task)

    def _crossed(self, thresholds: list[int], total: int) -> bool:
        hit = False
        while thresholds and total >= thresholds[0]:
            thresholds.pop(0)
            hit = True
        return hit

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn, *,
                    up: bool) -> None:
        stats = self.stats
        last = 0.0
        try:
            while not conn.closed:
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    return
                if up:
                    stats.bytes_up += len(chunk)
                    total, thresholds = stats.bytes_up, self._resets_up
                    while self._stalls and stats.bytes_up >= self._stalls[0][0]:
                        self.stall(self._stalls.pop(0)[1])
                else:
                    stats.bytes_down += len(chunk)
                    total, thresholds = stats.bytes_down, self._resets_down
                if self._crossed(thresholds, total):
                    self.reset_all(f"reset at {total} bytes {'up' if up else 'down'}")
                    return
                now = time.monotonic()
                hold = self._delay + (self._rng.random() * self._jitter if self._jitter else 0.0)
                at = max(last, now + hold, self._stalled_until)
                if at > now:
                    stats.max_hold_s = max(stats.max_hold_s, at - now)
                    await asyncio.sleep(at - now)
                    while self._stalled_until > time.monotonic():  # a stall began while we waited
                        await asyncio.sleep(self._stalled_until - time.monotonic())
                last = at
                if conn.closed:
                    return
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            return


def parse_tcp(endpoint: str) -> tuple[str, int]:
    """("127.0.0.1", 5555) from "tcp://127.0.0.1:5555"."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"not a tcp endpoint: {endpoint!r}")
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    return host.strip("[]"), int(port)
