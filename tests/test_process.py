"""What only real processes can show: kill -9, init failures, hostile frames, ipc hygiene,
preloading, and classes that travel by value."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import pytest
import zmq
from actors_for_tests import BadInit, BadStart, Counter, Recorder

import cascada


class DefinedInTestModule(cascada.Actor):
    """Lives in a test module loaded by path: it must reach its process by value."""

    async def hello(self, who: str) -> str:
        return f"hello {who} from {type(self).__module__}"


async def test_class_from_test_module_travels_by_value() -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(DefinedInTestModule)
        assert (await ref.ask("hello", "you")).startswith("hello you")


async def test_class_defined_in_a_function_works() -> None:
    class Local(cascada.Actor):
        def __init__(self, base: int) -> None:
            self.base = base

        async def plus(self, k: int) -> int:
            return self.base + k

    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Local, 40)
        assert await ref.ask("plus", 2) == 42


async def test_kill9_fails_pending_asks_with_actor_died() -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Recorder, name="victim")
        pending = [asyncio.ensure_future(ref.ask("nap", 30.0, i)) for i in range(10)]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        os.kill(ref.pid, signal.SIGKILL)
        results = await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.monotonic() - t0
        assert all(isinstance(r, cascada.ActorDied) for r in results), results
        assert elapsed < 2.0
        assert "may or may not have run" in str(results[0])
        # Later calls fail at once instead of waiting for a deadline. Which message they get
        # depends on what was seen first: the exit itself (SIGKILL, gone), or, on a loaded
        # machine, a connection that dropped while the process was still exiting, then its
        # listener closing under a call sent meanwhile (its process exited).
        t0 = time.monotonic()
        with pytest.raises(cascada.ActorDied, match="SIGKILL|gone|its process exited"):
            await ref.ask("echo_value", 1, timeout=30)
        assert time.monotonic() - t0 < 1.0
        # Others in the system are unaffected.
        other = await system.spawn(Counter)
        assert await other.ask("add", 1) == 1


async def test_kill9_of_an_idle_actor_then_ask_fails_fast() -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Recorder)
        os.kill(ref.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(cascada.ActorDied):
            for _ in range(50):
                await ref.ask("echo_value", 1, timeout=5)
                await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 2.0


async def test_third_party_caller_sees_actor_died() -> None:
    """A process actor asking another process actor that dies: ActorDied crosses back."""
    async with cascada.ActorSystem() as system:
        victim = await system.spawn(Recorder, name="victim")
        caller = await system.spawn(Recorder, name="caller")
        call = asyncio.ensure_future(caller.ask("call_other", victim, "nap", 30.0))
        await asyncio.sleep(0.3)
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(cascada.ActorDied) as info:  # typed, though it crossed two processes
            await asyncio.wait_for(call, 5)
        assert info.value.actor == "victim"


@pytest.mark.parametrize("placement", ["process", "local"])
async def test_constructor_failure(placement: cascada.Placement) -> None:
    async with cascada.ActorSystem() as system:
        with pytest.raises(cascada.ActorInitFailed) as info:
            await system.spawn(BadInit, "no model", name="bad", placement=placement)
        assert "constructor refused: no model" in str(info.value)
        assert info.value.remote_traceback and "in __init__" in info.value.remote_traceback
        assert info.value.actor == "bad"
        ipc_dir = os.path.dirname(system.node.endpoint[len("ipc://"):])
        assert sorted(os.listdir(ipc_dir)) == ["hb.sock", "system.ipc"]  # hb.sock: the heartbeat channel
        # The name is free again, and the system still works.
        ref = await system.spawn(Counter, name="bad", placement=placement)
        assert await ref.ask("add", 1) == 1


@pytest.mark.parametrize("placement", ["process", "local"])
async def test_on_start_failure(placement: cascada.Placement) -> None:
    async with cascada.ActorSystem() as system:
        with pytest.raises(cascada.ActorInitFailed, match="could not find its model") as info:
            await system.spawn(BadStart, placement=placement)
        assert "on_start" in (info.value.remote_traceback or "")


async def test_ipc_directory_is_private_and_removed() -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Recorder)
        path = system.node.endpoint[len("ipc://"):]
        directory = os.path.dirname(path)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(ref.endpoint[len("ipc://"):]).st_mode) == 0o600
    assert not os.path.exists(directory)


async def test_preload_imports_in_the_forkserver() -> None:
    async with cascada.ActorSystem(preload=["xml.dom.minidom"]) as system:
        ref = await system.spawn(Recorder)
        env = await ref.ask("env")
        assert "xml.dom.minidom" in env["modules"]


async def test_preload_failure_is_a_clear_error() -> None:
    async with cascada.ActorSystem(preload=["no_such_module_xyz"]) as system:
        with pytest.raises(cascada.ConfigurationError, match="no_such_module_xyz"):
            await system.spawn(Recorder)


async def test_spawn_refuses_bad_input() -> None:
    async with cascada.ActorSystem() as system:
        with pytest.raises(cascada.ConfigurationError, match="subclass of cascada.Actor"):
            await system.spawn(dict)  # type: ignore[arg-type]
        with pytest.raises(cascada.ConfigurationError, match="placement"):
            await system.spawn(Counter, placement="gpu")  # type: ignore[arg-type]
        await system.spawn(Counter, name="x")
        with pytest.raises(cascada.ConfigurationError, match="already exists"):
            await system.spawn(Counter, name="x")
        with pytest.raises(cascada.ConfigurationError, match="actor name"):
            await system.spawn(Counter, name="a b/c")
        with pytest.raises(cascada.SerializationError):
            await system.spawn(Recorder, label=threading.Lock())  # a lock cannot travel


def test_bad_system_settings() -> None:
    with pytest.raises(cascada.ConfigurationError):
        cascada.ActorSystem(mailbox_size=0)
    with pytest.raises(cascada.ConfigurationError):
        cascada.ActorSystem(preload="torch")  # type: ignore[arg-type]
    with pytest.raises(cascada.ConfigurationError, match="loopback"):
        cascada.ActorSystem(transport="tcp", tcp_host="0.0.0.0")
    with pytest.raises(cascada.ConfigurationError):
        cascada.ActorSystem(transport="udp")  # type: ignore[arg-type]
    with pytest.raises(cascada.ConfigurationError, match="107"):
        cascada.ActorSystem(ipc_dir="/tmp/" + "x" * 90)


async def test_using_a_closed_system_or_stray_ref() -> None:
    system = cascada.ActorSystem()
    with pytest.raises(cascada.SystemClosed):
        await system.spawn(Counter)
    async with system:
        ref = await system.spawn(Counter)
    with pytest.raises(cascada.SystemClosed):
        await ref.ask("add", 1)
    with pytest.raises(cascada.SystemClosed):
        await system.spawn(Counter)


# -- hostile frames from a raw zmq socket ---------------------------------------------------

def _array32_bomb() -> bytes:
    return b"\xdd" + struct.pack(">I", 100_000_000)


def _deep(n: int) -> bytes:
    return b"\x91" * n + b"\xc0"


def _deep_tuples(n: int) -> bytes:
    inner = msgpack.packb(None)
    for _ in range(n):
        inner = msgpack.packb(msgpack.ExtType(1, inner))
    return msgpack.packb([1, 1, 6, None, "victim", "echo_value", None, [[msgpack.ExtType(1, inner)], None], None])


HOSTILE: list[tuple[str, list[bytes]]] = [
    ("random bytes", [os.urandom(64)]),
    ("empty frame", [b""]),
    ("truncated", [msgpack.packb([1, 1, 5, "x", "victim", "echo_value"])[:-3]]),
    ("trailing data", [msgpack.packb([1, 2, 0, None, "victim", "record", None, [[1], None], None]) + b"\x01"]),
    ("not an array", [msgpack.packb({"kind": 1})]),
    ("wrong version", [msgpack.packb([99, 1, 5, None, "victim", "echo_value", None, [[1], None], None])]),
    ("wrong field types", [msgpack.packb([1, 1, "corr", 3, "victim", "echo_value", None, [[1], None], None])]),
    ("array32 bomb", [_array32_bomb()]),
    ("map bomb", [b"\xdf" + struct.pack(">I", 100_000_000)]),
    ("deep nesting", [_deep(100_000)]),
    ("deep tuple ext nesting", [_deep_tuples(20_000)]),
    ("unknown ext", [msgpack.packb([1, 1, 5, None, "victim", "echo_value", None,
                                    [[msgpack.ExtType(99, b"pickle?")], None], None])]),
    ("pickle in a frame", [b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."]),
    ("too many frames", [msgpack.packb([1, 2, 0, None, "victim", "record", None, [[1], None], None])] + [b"x"] * 2000),
    ("reply kind to a router", [msgpack.packb([1, 4, 5, None, None, None, None, 1, None])]),
    ("invalid utf-8", [b"\x99\x01\x01\x05\xc0\xa6victim\xa3\xff\xfe\xfd\xc0\x92\x91\x01\xc0\xc0"]),
]


async def test_hostile_frames_leave_the_actor_serving() -> None:
    async with cascada.ActorSystem(max_header_bytes=1 << 20) as system:
        ref = await system.spawn(Recorder, name="victim")
        pid_before = ref.pid
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ref.endpoint)
        try:
            for _label, frames in HOSTILE:
                sock.send_multipart(frames)
            sock.send_multipart([b"\x00" * (2 << 20)])  # a header over max_header_bytes
            # A well-formed request on the same connection is still answered.
            good = msgpack.packb([1, 1, 77, "raw", "victim", "echo_value", None, [["fine"], None], None])
            sock.send_multipart([good])
            codec = cascada.transport.Codec()
            replies: list[Any] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if sock.poll(100):
                    envs, err = codec.decode_all([sock.recv()])  # replies may come batched
                    assert err is None
                    replies.extend(envs)
                    if replies[-1].corr == 77:
                        break
            assert replies and replies[-1].kind == cascada.transport.Kind.REPLY and replies[-1].body == "fine"
            # Salvageable requests got a typed protocol error back.
            errors = [r for r in replies if r.kind == cascada.transport.Kind.ERROR]
            assert errors and all(r.body[0] == "protocol" for r in errors)
        finally:
            sock.close(linger=0)
            ctx.term()
        stats = await system.stats(ref)
        assert stats["node"]["rejected_frames"] >= len(HOSTILE)
        assert stats["pid"] == pid_before
        assert await ref.ask("echo_value", "alive") == "alive"


def _one_reply(sock: Any) -> list[Any]:
    (env,), err = cascada.transport.Codec().decode_all([sock.recv()])
    assert err is None
    return [1, int(env.kind), env.corr, None, None, None, None, env.body]


async def test_forged_ref_in_a_message_is_rejected() -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Recorder, name="victim")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ref.endpoint)
        try:
            bad_ref = msgpack.ExtType(2, msgpack.packb(["x", 1, "not-an-int", "h", None]))
            sock.send_multipart([msgpack.packb([1, 1, 9, "raw", "victim", "echo_value", None, [[bad_ref], None], None])])
            assert sock.poll(5000)
            reply = _one_reply(sock)
            assert reply[1] == 5 and reply[7][0] == "protocol" and "actor ref" in reply[7][2]
            evil = msgpack.ExtType(2, msgpack.packb(["x", "tcp://*:1", 1, "h", None]))
            sock.send_multipart([msgpack.packb([1, 1, 10, "raw", "victim", "call_other", None,
                                                [[evil, "echo_value", 1], None], None])])
            assert sock.poll(5000)
            reply = _one_reply(sock)
            assert reply[1] == 5 and reply[7][0] == "protocol" and "every interface" in reply[7][2]
        finally:
            sock.close(linger=0)
            ctx.term()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_no_lost_wakeups_under_pushback(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a drain that read EVENTS without acting on it lost zmq's edge-triggered
    wake-up, and a flooded actor with tiny queues stalled until other traffic woke it."""
    if loop == "asyncio":
        monkeypatch.setenv("CASCADA_LOOP", "asyncio")  # the actor processes' loop
    for _ in range(8):
        async with cascada.ActorSystem(mailbox_size=4, hwm=4) as system:
            ref = await system.spawn(Recorder)

            async def flood() -> list[int]:
                for i in range(200):
                    await ref.tell("nap", 0.0005, i)
                result: list[int] = await ref.ask("history")
                return result

            assert await asyncio.wait_for(flood(), 10) == list(range(200))


def test_actor_processes_die_with_a_sigkilled_driver(tmp_path: Any) -> None:
    """No orphans: SIGKILL the driver, and its forkserver and actors follow (PDEATHSIG)."""
    import subprocess
    import sys

    from support import descendants

    script = tmp_path / "driver.py"
    script.write_text(
        "import asyncio, sys, cascada\n"
        "class A(cascada.Actor):\n"
        "    async def pid(self):\n"
        "        import os; return os.getpid()\n"
        "async def main():\n"
        "    async with cascada.ActorSystem() as s:\n"
        "        refs = [await s.spawn(A) for _ in range(3)]\n"
        "        print(*[await r.ask('pid') for r in refs], flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "cascada.run(main())\n"
    )
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        actor_pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(actor_pids) == 3
        family = descendants(driver.pid)
        assert set(actor_pids) <= set(family) and len(family) == 4  # 3 actors + the forkserver
        driver.kill()
        driver.wait(10)
        deadline = time.monotonic() + 5
        alive = family
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in family if not cascada.actors._node.process_gone(p)]
        assert alive == [], f"orphans left: {alive}"
        # Its ipc directory could not be removed by a SIGKILLed owner; the next system sweeps it.
        import glob
        import tempfile

        stale = glob.glob(os.path.join(tempfile.gettempdir(), f"cascada-{driver.pid}-*"))
        assert len(stale) == 1
        cascada.transport.IpcDirectory().remove()
        assert not os.path.exists(stale[0])
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        if driver.stdout is not None:
            driver.stdout.close()


SIGTERM_DRIVER = r"""
import asyncio, sys
import cascada

class Slow(cascada.Actor):
    def __init__(self) -> None:
        self.n = 0
    async def work(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "finished"
    async def note(self) -> None:
        self.n += 1
    async def on_stop(self) -> None:
        print(f"on_stop saw {self.n} notes", flush=True)

async def main() -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        a = await system.spawn(Slow, name="a")
        b = await system.spawn(Slow, name="b")
        for _ in range(50):
            await b.tell("note")
        pending = asyncio.ensure_future(a.ask("work", 1.0))
        await asyncio.sleep(0.2)
        print("ready", flush=True)
        await system.wait_closed()
        print("pending:", await pending, flush=True)
        try:
            await system.spawn(Slow)
        except cascada.SystemClosed:
            print("no new work", flush=True)
    print("exited", flush=True)

cascada.run(main())
"""


def test_sigterm_to_the_driver_drains_every_actor_and_exits(tmp_path: Any) -> None:
    script = tmp_path / "driver.py"
    script.write_text(SIGTERM_DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        from support import descendants

        family = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert "pending: finished" in lines  # accepted work finished, its reply arrived
    assert "on_stop saw 50 notes" in lines  # every accepted tell ran before the actor stopped
    assert "no new work" in lines and lines[-1] == "exited"
    from support import descendants as _desc

    assert _desc(proc.pid) == []
    assert all(not os.path.exists(f"/proc/{p}") or _zombie_or_gone(p) for p in family)


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_process_watch_sees_an_exit_before_the_reap() -> None:
    """ProcessWatch (the per-message owner check) agrees with process_gone: alive, then gone
    as soon as the process exits (a zombie counts), with its /proc file closed after."""
    from cascada.transport._endpoints import ProcessWatch, process_gone

    watch = ProcessWatch()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert watch.gone(child.pid) is False and watch.gone(child.pid) is False
        assert len(watch._fds) == 1
        assert child.stdin is not None
        child.stdin.close()
        deadline = time.monotonic() + 10
        while not process_gone(child.pid) and time.monotonic() < deadline:  # exits, not reaped yet
            time.sleep(0.01)
        assert watch.gone(child.pid) is True
        assert watch._fds == {}
    finally:
        child.wait(timeout=10)
    assert watch.gone(child.pid) is True  # reaped: no such process
    assert watch.gone(os.getpid()) is False
    watch.close()
    assert watch._fds == {}
