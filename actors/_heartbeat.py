"""Liveness: each actor process's event loop sends a tiny datagram every interval to its
system, on a unix datagram socket of its own (not the zmq data path), so a transfer of a
large message never delays a beat, while a stopped process (SIGSTOP) and a blocked event
loop (time.sleep or a long C call in a handler) both go quiet and are declared
unresponsive after interval x liveness.

ZMTP heartbeats would not do: libzmq answers them from its own I/O thread, which keeps
running while Python's loop is stuck.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable

from ._tasks import TaskSet

_BEAT = struct.Struct("<iQ")  # pid, sequence number


class HeartbeatMonitor:
    """The system's side: hears beats, and calls ``on_silent(pid, seconds)`` once for a watched
    process that has been quiet for longer than interval x liveness."""

    def __init__(self, path: str, interval: float, liveness: int,
                 on_silent: Callable[[int, float], None]) -> None:
        self.path = path
        self.interval = interval
        self.liveness = liveness
        self._on_silent = on_silent
        self._last: dict[int, float] = {}
        self._watched: set[int] = set()
        self.beats = 0
        self.declared = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self._tasks = TaskSet("heartbeat watchdog")
        self._tasks.spawn(self._watch(), name="heartbeat watchdog")

    @property
    def timeout(self) -> float:
        return self.interval * self.liveness

    def watch(self, pid: int) -> None:
        """Start judging pid (once it is ready: a slow on_start is spawn_timeout's business)."""
        self._watched.add(pid)
        self._last.setdefault(pid, time.monotonic())
        self._last[pid] = max(self._last[pid], time.monotonic())

    def forget(self, pid: int) -> None:
        self._watched.discard(pid)
        self._last.pop(pid, None)

    def silent_for(self, pid: int) -> float | None:
        last = self._last.get(pid)
        return None if last is None else time.monotonic() - last

    def _on_readable(self) -> None:
        now = time.monotonic()
        while True:
            try:
                data = self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(data) != _BEAT.size:
                continue
            pid, _seq = _BEAT.unpack(data)
            if pid in self._watched or pid not in self._last:
                self._last[pid] = now
            self.beats += 1

    async def _watch(self) -> None:
        step = max(0.005, self.interval / 2)
        tick = time.monotonic()
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            late, tick = now - tick - step, now
            if late > self.timeout / 2:
                # The watchdog runs on this loop: if it was this late, this process was the
                # one stalled, and the children's silence over that gap proves nothing.
                for pid in self._watched:
                    self._last[pid] = now
                continue
            for pid in list(self._watched):
                quiet = now - self._last.get(pid, now)
                if quiet > self.timeout:
                    self._watched.discard(pid)
                    self.declared += 1
                    self._on_silent(pid, quiet)

    async def close(self) -> None:
        try:
            self._loop.remove_reader(self._sock.fileno())
        except (ValueError, RuntimeError):
            pass
        await self._tasks.aclose()
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


async def send_beats(path: str, interval: float) -> None:
    """The actor process's side: beat every interval from this event loop, forever. A beat
    that cannot be sent (the system is gone, its buffer is full) is simply skipped."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    pid = os.getpid()
    seq = 0
    try:
        while True:
            seq += 1
            try:
                sock.sendto(_BEAT.pack(pid, seq), path)
            except OSError:
                pass
            await asyncio.sleep(interval)
    finally:
        sock.close()
