"""Supervision (OTP semantics), incarnations and heartbeat failure detection, across real
processes: strategies, restart types, intensity and escalation, nesting, fencing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

import cascada
from cascada.transport._wire import Envelope, Kind


class Worker(cascada.Actor):
    def __init__(self, log: list[str] | None = None) -> None:
        self.log = log
        self.n = 0

    async def on_start(self) -> None:
        if self.log is not None:
            self.log.append(f"start {self.name}")

    async def on_stop(self) -> None:
        if self.log is not None:
            self.log.append(f"stop {self.name}")

    async def add(self, k: int) -> int:
        self.n += k
        return self.n

    async def pid(self) -> int:
        return os.getpid()

    async def hang(self) -> None:
        await asyncio.Event().wait()

    async def size(self, x: Any) -> int:
        return int(x.nbytes)

    async def block(self, seconds: float) -> str:
        time.sleep(seconds)  # blocks the event loop on purpose
        return "woke"


class FailsAfterFirst(cascada.Actor):
    """Starts once; every restart fails in the constructor (a crash loop)."""

    def __init__(self, marker: str) -> None:
        if os.path.exists(marker):
            raise RuntimeError("cannot start again")
        with open(marker, "w"):
            pass

    async def pid(self) -> int:
        return os.getpid()


async def _until(pred: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _incarnations(sup: cascada.ActorRef) -> dict[str, str | None]:
    return {c["name"]: c["incarnation"] for c in await sup.ask("children")}


async def _restarted(sup: cascada.ActorRef, before: dict[str, str | None], names: set[str]) -> bool:
    now = await _incarnations(sup)
    return all(now[n] is not None and now[n] != before[n] for n in names)


@pytest.mark.parametrize("strategy,expected", [
    ("one_for_one", {"expert"}),
    ("one_for_all", {"router", "expert", "decoder", "verifier"}),
    ("rest_for_one", {"expert", "decoder", "verifier"}),
])
async def test_strategies_restart_exactly_the_children_otp_says(strategy: str, expected: set[str]) -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        sup = await system.supervisor("sup", strategy=strategy, intensity=5)  # type: ignore[arg-type]
        refs = {}
        for name in ("router", "expert", "decoder", "verifier"):
            refs[name] = await system.spawn(Worker, name=name, supervisor=sup, restart="permanent")
        await refs["expert"].ask("add", 1)
        before = await _incarnations(sup)
        pids = {n: r.pid for n, r in refs.items()}
        os.kill(pids["expert"], signal.SIGKILL)

        async def settled() -> bool:
            now = await _incarnations(sup)
            return await _restarted(sup, before, expected) and all(v is not None for v in now.values())

        await _until(settled)
        now = await _incarnations(sup)
        changed = {n for n in now if now[n] != before[n]}
        assert changed == expected
        # Refs keep working for new calls; state starts afresh in a new incarnation.
        assert await refs["expert"].ask("add", 2) == 2
        assert await refs["expert"].ask("pid") != pids["expert"]
        for name in set(refs) - expected:
            assert await refs[name].ask("pid") == pids[name]
        events = await sup.ask("events")
        restarts = [e["child"] for e in events if e["event"] == "restart"]
        assert restarts == [n for n in ("router", "expert", "decoder", "verifier") if n in expected]  # start order
        stops = [e["child"] for e in events if e["event"] == "stop"]
        assert stops == [n for n in ("verifier", "decoder", "router") if n in expected and n != "expert"]  # reverse


@pytest.mark.parametrize("restart,exit_kind,comes_back", [
    ("permanent", "normal", True), ("permanent", "abnormal", True),
    ("transient", "normal", False), ("transient", "abnormal", True),
    ("temporary", "normal", False), ("temporary", "abnormal", False),
])
async def test_restart_types(restart: str, exit_kind: str, comes_back: bool) -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        sup = await system.supervisor("sup", intensity=5)
        ref = await system.spawn(Worker, name="w", supervisor=sup, restart=restart)  # type: ignore[arg-type]
        pid = ref.pid
        # SIGTERM drains and exits 0 (a normal exit); SIGKILL is abnormal.
        os.kill(pid, signal.SIGTERM if exit_kind == "normal" else signal.SIGKILL)

        async def exited() -> bool:
            return any(e["event"] == "exit" for e in await sup.ask("events"))

        await _until(exited)
        if comes_back:
            async def back() -> bool:
                kids = await sup.ask("children")
                return bool(kids and kids[0]["pid"] not in (None, pid))

            await _until(back)
            assert await ref.ask("add", 3) == 3
        else:
            assert await sup.ask("children") == []
            with pytest.raises(cascada.ActorDied, match="was not restarted"):
                await ref.ask("add", 1)


async def test_pending_calls_fail_with_actor_died_and_new_calls_reach_the_new_incarnation() -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        ref = await system.spawn(Worker, name="w", restart="permanent")
        pending = [asyncio.ensure_future(ref.ask("hang", timeout=30)) for _ in range(10)]
        await asyncio.sleep(0.1)
        old = ref.pid
        os.kill(old, signal.SIGKILL)
        for call in pending:
            with pytest.raises(cascada.ActorDied, match="may or may not have run"):
                await call

        async def back() -> bool:
            try:
                return bool(await ref.ask("pid", timeout=1) != old)
            except cascada.ActorDied:
                return False

        await _until(back)
        assert system.lookup("w").pid != old and system.lookup("w").incarnation != ref.incarnation
        # Fencing: a reply from another incarnation than the one its request was meant for is
        # dropped and counted, and its call fails with ActorDied at once (no other answer comes).
        peer = system.node.peers[ref.endpoint]
        assert peer.incarnation == system.lookup("w").incarnation
        fut = asyncio.get_running_loop().create_future()
        peer.calls[10**9] = (fut, "w", "add", peer.incarnation)
        peer._on_reply_env(Envelope(Kind.REPLY, 10**9, None, None, None, None, 42, None, ref.incarnation))
        assert fut.done() and isinstance(fut.exception(), cascada.ActorDied)
        assert system.node.stats.stale_replies == 1 and 10**9 not in peer.calls
        # ... but a reply from the incarnation its request was meant for is its answer, even
        # after the peer heard of a later one.
        fut = asyncio.get_running_loop().create_future()
        peer.calls[10**9] = (fut, "w", "add", ref.incarnation)
        peer._on_reply_env(Envelope(Kind.REPLY, 10**9, None, None, None, None, 42, None, ref.incarnation))
        assert fut.result() == [42] and system.node.stats.stale_replies == 1  # boxed: see Node.call


async def test_a_request_meant_for_another_incarnation_is_refused_unrun() -> None:
    """Each request carries the incarnation its sender means it for; a process hosting another
    one refuses it (ActorDied, it did not run; a tell is dropped), and a sender that only
    guessed the incarnation from a ref takes the receiver's word for the next call."""
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        ref = await system.spawn(Worker, name="w")
        assert await ref.ask("add", 1) == 1
        peer = system.node.peers[ref.endpoint]
        assert peer.incarnation == ref.incarnation and not peer.told  # seeded from the ref
        peer.incarnation = "0ld1nc"  # as if the ref predated a restart nobody told us of
        await ref.tell("add", 100)  # dropped by the receiver, not run
        with pytest.raises(cascada.ActorDied, match="did not run"):
            await ref.ask("add", 10)
        assert peer.incarnation == ref.incarnation  # the refusal named the incarnation there now
        assert await ref.ask("add", 1) == 2  # neither the tell nor the refused ask ran
        assert (await system.stats(ref))["node"]["fenced_requests"] == 2
        # Told by the system (update_peer), a peer does not take a refusal's word for it.
        peer.incarnation, peer.told = "0ld1nc", True
        with pytest.raises(cascada.ActorDied, match="did not run"):
            await ref.ask("add", 10)
        assert peer.incarnation == "0ld1nc"
        system.node.update_peer(ref.endpoint, ref.pid, ref.incarnation)
        assert await ref.ask("add", 1) == 3


async def test_a_crash_loop_hits_the_intensity_and_escalates(tmp_path: Any) -> None:
    marker = str(tmp_path / "started")
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        sup = await system.supervisor("sup", intensity=3, period=30.0, restart="temporary")
        bystander = await system.spawn(Worker, name="router", supervisor=sup, restart="permanent")
        ref = await system.spawn(FailsAfterFirst, marker, name="decoder", supervisor=sup, restart="permanent")
        os.kill(ref.pid, signal.SIGKILL)

        async def escalated() -> bool:
            return bool(system.escalations)

        await _until(escalated)
        err = system.escalations[0]
        assert isinstance(err, cascada.RestartIntensityExceeded)
        assert (err.supervisor, err.actor, err.count, err.period) == ("sup", "decoder", 3, 30.0)
        assert "'decoder'" in str(err) and "3 restart(s) within 30s" in str(err)
        events = await sup.ask("events")
        assert [e["event"] for e in events].count("start_failed") == 3  # exactly 3 restarts, then escalation
        # The supervisor stopped its other children; calls fail at once with the reason.
        with pytest.raises(cascada.ActorDied, match="gave up"):
            await bystander.ask("add", 1, timeout=5)
        with pytest.raises(cascada.ActorDied, match="gave up"):
            await ref.ask("pid", timeout=5)


async def test_shutdown_during_a_restart_loop_is_bounded(tmp_path: Any) -> None:
    marker = str(tmp_path / "started")
    t0 = time.monotonic()
    async with cascada.ActorSystem(heartbeat_interval=None, restart_intensity=1000, restart_period=60) as system:
        ref = await system.spawn(FailsAfterFirst, marker, name="decoder", restart="permanent")
        os.kill(ref.pid, signal.SIGKILL)
        await asyncio.sleep(0.3)  # let it spin a few times
        t1 = time.monotonic()
    assert time.monotonic() - t1 < 10.0
    assert time.monotonic() - t0 < 20.0


async def test_nested_supervisors_escalate_to_the_parent_which_restarts_the_subtree() -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        top = await system.supervisor("top", intensity=5)
        inner = await system.supervisor("inner", intensity=0, supervisor=top, restart="permanent")
        a = await system.spawn(Worker, name="a", supervisor=inner, restart="permanent")
        b = await system.spawn(Worker, name="b", supervisor=inner, restart="permanent")
        pids = (a.pid, b.pid)
        os.kill(a.pid, signal.SIGKILL)  # intensity 0: the first failure escalates

        async def subtree_back() -> bool:
            kids = await inner.ask("children")
            return all(k["pid"] is not None and k["pid"] not in pids for k in kids)

        await _until(subtree_back)
        assert await a.ask("add", 1) == 1 and await b.ask("add", 1) == 1
        top_events = [e["event"] for e in await top.ask("events")]
        assert "restart" in top_events
        assert (await inner.ask("status"))["failed"] is None
        assert [e.supervisor for e in system.escalations] == ["inner"]


async def test_children_start_in_order_and_stop_in_reverse() -> None:
    log: list[str] = []
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        sup = await system.supervisor("sup")
        for name in ("a", "b", "c"):
            await system.spawn(Worker, log, name=name, supervisor=sup, placement="local", restart="permanent")
        await system.stop(sup)
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


async def test_a_killed_local_actor_is_restarted_and_its_calls_fail() -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        ref = await system.spawn(Worker, name="w", placement="local", restart="permanent")
        await ref.ask("add", 5)
        pending = asyncio.ensure_future(ref.ask("hang", timeout=30))
        await asyncio.sleep(0.01)
        await system.kill(ref)
        with pytest.raises(cascada.ActorDied):
            await pending

        async def back() -> bool:
            try:
                return bool(await ref.ask("add", 1) == 1)
            except cascada.ActorDied:
                return False

        await _until(back)


def test_bad_supervision_config_is_refused() -> None:
    async def main() -> None:
        async with cascada.ActorSystem(heartbeat_interval=None) as system:
            with pytest.raises(cascada.ConfigurationError, match="strategy"):
                await system.supervisor(strategy="one_for_some")  # type: ignore[arg-type]
            with pytest.raises(cascada.ConfigurationError, match="intensity"):
                await system.supervisor(intensity=-1)
            with pytest.raises(cascada.ConfigurationError, match="restart"):
                await system.spawn(Worker, restart="sometimes")  # type: ignore[arg-type]
            w = await system.spawn(Worker, placement="local")
            with pytest.raises(cascada.ConfigurationError, match="supervisor must be"):
                await system.spawn(Worker, supervisor=w)
    for bad in ({"heartbeat_interval": 0}, {"heartbeat_liveness": 1}):
        with pytest.raises(cascada.ConfigurationError):
            cascada.ActorSystem(**bad)  # type: ignore[arg-type]
    cascada.run(main())


# -- heartbeats (R07, R08) ------------------------------------------------------------------

H, L = 0.1, 20  # 2 s: tight enough to test, loose enough for a loaded 2-core machine


async def test_a_sigstopped_process_is_declared_unresponsive_killed_and_replaced() -> None:
    async with cascada.ActorSystem(heartbeat_interval=H, heartbeat_liveness=L) as system:
        ref = await system.spawn(Worker, name="expert", restart="permanent")
        bystander = await system.spawn(Worker, name="router")
        old = ref.pid
        pending = asyncio.ensure_future(ref.ask("hang", timeout=30))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        os.kill(old, signal.SIGSTOP)
        try:
            with pytest.raises(cascada.ActorDied, match="unresponsive"):
                await pending
            detected = time.monotonic() - t0
        finally:
            try:
                os.kill(old, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert H * L * 0.8 <= detected < H * L + 2.0, detected

        async def replaced() -> bool:
            try:
                return bool(await ref.ask("pid", timeout=1) != old)
            except cascada.ActorDied:
                return False

        await _until(replaced)
        with pytest.raises(ProcessLookupError):
            os.kill(old, 0)  # fenced: the stopped process was killed, not left to wake up
        assert await bystander.ask("add", 1) == 1


async def test_a_short_stop_causes_no_false_death() -> None:
    async with cascada.ActorSystem(heartbeat_interval=H, heartbeat_liveness=L) as system:
        ref = await system.spawn(Worker, name="expert", restart="permanent")
        os.kill(ref.pid, signal.SIGSTOP)
        await asyncio.sleep(H * L / 3)
        os.kill(ref.pid, signal.SIGCONT)
        await asyncio.sleep(H * L * 2)
        assert await ref.ask("add", 1) == 1
        assert system.lookup("expert").pid == ref.pid


async def test_a_handler_that_blocks_the_loop_is_declared_unresponsive() -> None:
    async with cascada.ActorSystem(heartbeat_interval=H, heartbeat_liveness=L) as system:
        ref = await system.spawn(Worker, name="decoder", restart="permanent")
        old = ref.pid
        t0 = time.monotonic()
        with pytest.raises(cascada.ActorDied, match="unresponsive"):
            await ref.ask("block", 30.0, timeout=20)
        assert time.monotonic() - t0 < H * L + 2.0

        async def replaced() -> bool:
            try:
                return bool(await ref.ask("pid", timeout=1) != old)
            except cascada.ActorDied:
                return False

        await _until(replaced)


async def test_without_heartbeats_a_blocked_loop_goes_unnoticed() -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        ref = await system.spawn(Worker, name="decoder", restart="permanent")
        assert await ref.ask("block", H * L * 3, timeout=20) == "woke"
        assert system.lookup("decoder").pid == ref.pid


async def test_a_large_transfer_causes_no_false_death() -> None:
    np = pytest.importorskip("numpy")
    async with cascada.ActorSystem(heartbeat_interval=H, heartbeat_liveness=L) as system:
        ref = await system.spawn(Worker, name="expert", restart="permanent")
        big = np.ones(256 << 20, dtype=np.uint8)
        for _ in range(4):
            assert await ref.ask("size", big, timeout=60) == big.nbytes
        assert system.lookup("expert").pid == ref.pid
        assert system._hb is not None and system._hb.declared == 0

