"""Shared fixtures: uvloop, real systems per placement, and a leak check after every test.

Every test is checked for what it leaves behind: child processes (any descendant of the
test process), ipc directories, shared-memory segments in /dev/shm, and file descriptors
(zmq sockets and contexts hold fds, so a socket or context left open shows up here)."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvloop

import cascada
from support import descendants, spawn_placement, system_kwargs

PLACEMENTS = ["local", "process-ipc", "process-tcp"]

# A private temp dir for the whole session, so the leak check sees only what these tests
# made (a demo or benchmark running beside the suite makes its own cascada-* dirs in /tmp).
_SESSION_TMP = tempfile.mkdtemp(prefix="cascada-tests-")
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = _SESSION_TMP
# Also at exit: a usage error ends pytest before pytest_sessionfinish runs.
atexit.register(shutil.rmtree, _SESSION_TMP, True)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    return {"uvloop": uvloop.new_event_loop}


def _fds() -> dict[int, str]:
    out: dict[int, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def _cascada_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "cascada-*")))


def _shm_segments() -> set[str]:
    return set(glob.glob("/dev/shm/cascada-*"))


def _ours(segment: str) -> bool:
    # Segments are named cascada-<owner pid>-...: ours are this process's, or those of a
    # process already gone (an actor of this test). A live stranger's (a benchmark running
    # beside the suite) are not this test's doing.
    from cascada.transport._endpoints import process_gone

    try:
        pid = int(os.path.basename(segment).split("-")[1])
    except (IndexError, ValueError):
        return False
    return pid == os.getpid() or process_gone(pid)


@pytest.fixture(scope="session", autouse=True)
def _process_lifetime_singletons() -> None:
    """pyzmq's zero-copy garbage collector is a thread with its own context and sockets that
    lives as long as the process once started; start it before any baseline is taken."""
    import zmq

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://warm-up")
    b.connect("inproc://warm-up")
    a.send(b"x" * (1 << 17), copy=False)  # starts the collector and this thread's socket to it
    b.recv()
    a.close(linger=0)
    b.close(linger=0)
    ctx.term()


@pytest.fixture(autouse=True)
def leak_check(_process_lifetime_singletons: None) -> Iterator[None]:
    fds_before = _fds()
    dirs_before = _cascada_dirs()
    shm_before = _shm_segments()
    yield
    me = os.getpid()
    deadline = time.monotonic() + 3.0
    left = descendants(me)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = descendants(me)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    new_dirs = _cascada_dirs() - dirs_before
    new_shm = {seg for seg in _shm_segments() - shm_before if _ours(seg)}
    fds_after = _fds()
    leaked = {fd: t for fd, t in fds_after.items() if fds_before.get(fd) != t
              and (t.startswith(("socket:", "anon_inode:")) or "cascada-" in t)}
    problems = []
    if left:
        problems.append(f"child processes left running (now killed): {left}")
    if new_dirs:
        problems.append(f"ipc directories left behind: {sorted(new_dirs)}")
    if leaked:
        problems.append(f"file descriptors left open: {leaked}")
    if new_shm:
        for seg in new_shm:
            os.unlink(seg)
        problems.append(f"shared-memory segments left in /dev/shm (now removed): {sorted(new_shm)}")
    assert not problems, "; ".join(problems)


@pytest.fixture(params=PLACEMENTS)
def placement(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def system(placement: str) -> AsyncIterator[cascada.ActorSystem]:
    async with cascada.ActorSystem(**system_kwargs(placement)) as sys_:
        yield sys_


@pytest.fixture
def spawn(system: cascada.ActorSystem, placement: str) -> Any:
    """spawn(cls, *args, **kwargs) with the placement under test."""

    async def _spawn(cls: type[cascada.Actor], *args: Any, **kwargs: Any) -> cascada.ActorRef:
        kwargs.setdefault("placement", spawn_placement(placement))
        return await system.spawn(cls, *args, **kwargs)

    return _spawn
