"""The harness's own tests: checkers over synthetic histories, outcome classification, the
nemesis's refusals, and the resource checker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import cascada
from reliability.harness import (
    FAIL,
    INFO,
    OK,
    History,
    Nemesis,
    NotOurProcess,
    Op,
    Resources,
    check_fifo,
    check_set,
    classify,
    jsonable,
    latency_by_phase,
    leaks_since,
    new_record,
    percentile,
    process_gone,
    wait_gone,
)


def _op(req_id: int, value: object, outcome: str, t0: float = 0.0, t1: float = 1.0) -> Op:
    return Op(req_id, None, "client", "sink", "inc-1", "add", value, t0, t1, outcome)


# -- classification -----------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "outcome", "untyped"), [
    (None, OK, False),
    (cascada.ActorNotFound("x"), FAIL, False),
    (cascada.SerializationError("x"), FAIL, False),
    (cascada.ConfigurationError("x"), FAIL, False),
    (cascada.ProtocolError("x"), FAIL, False),
    (cascada.SystemClosed("x"), FAIL, False),
    (cascada.TensorLost("x"), FAIL, False),
    (cascada.PoolExhausted("x"), FAIL, False),
    (cascada.ActorDied("x"), INFO, False),
    (cascada.DeadlineExceeded("x"), INFO, False),
    (cascada.RemoteError("boom", remote_type="ValueError", remote_traceback=None), INFO, False),
    (ValueError("bare"), INFO, True),
    (TimeoutError("bare"), INFO, True),
])
def test_classify(exc: BaseException | None, outcome: str, untyped: bool) -> None:
    got, error_type, is_untyped = classify(exc)
    assert (got, is_untyped) == (outcome, untyped)
    assert error_type == (None if exc is None else type(exc).__name__)


class _FakeRef:
    """Stands in for an ActorRef: ask returns, raises, or never answers."""

    name = "fake"
    incarnation = "inc-0"

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    async def ask(self, method: str, *args: object, **kwargs: object) -> object:
        if self.behaviour == "ok":
            return args[0] if args else None
        if self.behaviour == "died":
            raise cascada.ActorDied("gone")
        if self.behaviour == "untyped":
            raise KeyError("oops")
        if self.behaviour == "bare-timeout":
            raise TimeoutError("not cascada's")
        await asyncio.sleep(3600)
        return None

    tell = ask


async def test_history_call_records_outcomes_and_hangs() -> None:
    h = History()
    ok = await h.call(_FakeRef("ok"), "add", 7)  # type: ignore[arg-type]
    died = await h.call(_FakeRef("died"), "add", 8)  # type: ignore[arg-type]
    untyped = await h.call(_FakeRef("untyped"), "add", 9)  # type: ignore[arg-type]
    bare = await h.call(_FakeRef("bare-timeout"), "add", 10)  # type: ignore[arg-type]
    hung = await h.call(_FakeRef("hang"), "add", 11, hang_after=0.05)  # type: ignore[arg-type]
    assert (ok.outcome, ok.result, ok.value, ok.target_incarnation) == (OK, 7, 7, "inc-0")
    assert (died.outcome, died.error_type) == (INFO, "ActorDied")
    assert (untyped.outcome, untyped.untyped) == (INFO, True)
    assert (bare.outcome, bare.untyped, bare.hang) == (INFO, True, False)  # raised by the callee: not a hang
    assert (hung.outcome, hung.hang) == (INFO, True)
    assert all(op.t_complete is not None and op.t_complete >= op.t_invoke for op in h.ops)
    assert [op.req_id for op in h.ops] == [1, 2, 3, 4, 5]
    errors = h.errors()
    assert errors["ActorDied"] == 1 and errors["untyped"] == 2 and errors["hangs"] == 1
    assert h.outcomes() == {"ok": 1, "fail": 0, "info": 4, "pending": 0}


# -- set checker --------------------------------------------------------------------------


def test_set_checker_counts_each_category() -> None:
    ops = [
        _op(1, "a", OK),      # acknowledged, present            -> ok
        _op(2, "b", OK),      # acknowledged, absent             -> lost
        _op(3, "c", INFO),    # indeterminate, present           -> recovered
        _op(4, "d", INFO),    # indeterminate, absent            -> fine
        _op(5, "e", FAIL),    # did not run, absent              -> fine
        _op(6, "f", FAIL),    # did not run, yet present         -> failed_but_present
        _op(7, "g", OK),      # acknowledged, executed twice     -> duplicated
    ]
    executed = {"a": 1, "c": 1, "f": 1, "g": 2, "z": 1}  # z was never attempted -> unexpected
    r = check_set(ops, executed)
    assert r.attempted == 7 and r.acknowledged == 3 and r.ok == 4
    assert r.lost == ["b"] and r.recovered == ["c"] and r.unexpected == ["z"]
    assert r.failed_but_present == ["f"] and r.duplicated == {"g": 2}
    assert r.indeterminate == 2 and not r.valid
    c = r.counts()
    assert (c["lost"], c["recovered"], c["unexpected"], c["executed_more_than_once"]) == (1, 1, 1, 1)


def test_set_checker_valid_history_and_retries() -> None:
    # A key retried: first attempt indeterminate, the retry acknowledged -> acknowledged.
    ops = [_op(1, 1, INFO), _op(2, 1, OK), _op(3, 2, OK), _op(4, 3, FAIL), _op(5, 3, OK)]
    r = check_set(ops, {1: 1, 2: 1, 3: 1})
    assert r.valid and r.acknowledged == 3 and r.indeterminate == 0 and not r.recovered
    assert not r.failed_but_present  # 3 also had an ok attempt
    dup = check_set(ops, {1: 2, 2: 1, 3: 1})
    assert not dup.valid and dup.duplicated == {1: 2}
    assert check_set(ops, {1: 2, 2: 1, 3: 1}, allow_duplicates=True).valid


def test_set_checker_pending_ops_are_indeterminate() -> None:
    pending = Op(1, None, "c", "s", None, "add", "x", 0.0)  # never completed (crashed client)
    r = check_set([pending], {"x": 1})
    assert r.recovered == ["x"] and r.valid


# -- FIFO checker -------------------------------------------------------------------------


def test_fifo_checker_finds_reordering_and_duplicates() -> None:
    a, b = ("A", "inc1"), ("B", "inc1")
    received = [(a, 0), (b, 5), (a, 1), (b, 3), (a, 1), (a, 2), (b, 6)]
    r = check_fifo(received)
    assert r.violations == [(b, 5, 3), (a, 1, 1)]
    assert not r.valid and r.received == 7 and r.pairs == 2


def test_fifo_checker_orders_only_within_a_pair_and_incarnation() -> None:
    # Interleaving across senders, and a restart (new incarnation) starting over, are fine.
    received = [(("A", "i1"), 0), (("B", "i1"), 0), (("A", "i1"), 1), (("A", "i2"), 0), (("B", "i1"), 1)]
    assert check_fifo(received).valid


def test_fifo_checker_gaps_need_a_matching_error() -> None:
    a = ("A", "inc1")
    received = [(a, 0), (a, 2), (a, 4)]
    explained = check_fifo(received, sent={a: range(5)}, errored={a: [1, 3]})
    assert explained.valid and explained.gaps == [(a, 1), (a, 3)] and not explained.unexplained_gaps
    silent = check_fifo(received, sent={a: range(5)}, errored={a: [1]})
    assert not silent.valid and silent.unexplained_gaps == [(a, 3)]


# -- latency checker ----------------------------------------------------------------------


def test_latency_by_phase() -> None:
    ops = [_op(i, i, OK, t0=float(i), t1=float(i) + 0.001 * (i + 1)) for i in range(10)]
    ops.append(_op(99, 99, INFO, t0=5.5, t1=9.0))  # not ok: not counted by default
    phases = [("before", 0.0, 3.0), ("during", 3.0, 6.0), ("after", 6.0, 100.0)]
    r = latency_by_phase(ops, phases)
    assert [r[p]["count"] for p in ("before", "during", "after")] == [3, 3, 4]
    assert r["before"]["max"] == pytest.approx(3.0) and r["after"]["p50"] == pytest.approx(8.0)
    assert latency_by_phase(ops, phases, outcomes=(OK, INFO))["during"]["max"] == pytest.approx(3500.0)
    assert percentile([], 50) is None and percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0


# -- nemesis and resources ----------------------------------------------------------------


def test_nemesis_refuses_what_is_not_ours() -> None:
    nem = Nemesis()
    for pid in (os.getpid(), 1, os.getppid(), 0, -1):
        with pytest.raises(NotOurProcess):
            nem.kill9(pid)
    assert not nem.history.events


async def test_nemesis_logs_and_always_continues_stopped_pids() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Nemesis() as nem:
            t = nem.stop(child.pid)
            assert nem.history.events[0].op == "sigstop" and nem.history.events[0].t == t
            deadline = time.monotonic() + 5
            while _state(child.pid) != "T" and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert _state(child.pid) == "T"
        # The context manager sent SIGCONT on the way out.
        assert [e.op for e in nem.history.events] == ["sigstop", "sigcont"]
        deadline = time.monotonic() + 5
        while _state(child.pid) == "T" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert _state(child.pid) in ("S", "R")
        nem.kill9(child.pid)
        assert child.wait(5) == -signal.SIGKILL
        assert nem.faults() == {"kill9": 1, "sigstop": 1, "partition_s": 0}
        with pytest.raises(NotOurProcess):
            nem.kill9(child.pid)  # reaped: no longer a descendant, maybe someone else's pid
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rfind(b")") + 2:][:1].decode()


async def test_resource_checker_sees_a_left_process() -> None:
    before = Resources.take()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        snap = Resources.take([child.pid])
        assert child.pid in snap.descendants
        assert snap.max_rss_mib[child.pid] and snap.fd_counts[child.pid]
        leaks = leaks_since(before, settle=0.1)
        assert leaks["processes"] == 1 and leaks["detail"]["processes"] == [child.pid]
    finally:
        child.kill()
        child.wait()
    alive, _ = await wait_gone([child.pid], 2)
    assert not alive and process_gone(child.pid)
    assert leaks_since(before)["processes"] == 0


async def test_resource_checker_clean_after_a_system() -> None:
    before = Resources.take()
    async with cascada.ActorSystem() as system:
        from reliability.actors import Bystander

        ref = await system.spawn(Bystander)
        during = leaks_since(before, Resources.take())
        assert during["processes"] == 2 and during["ipc_files"] >= 2  # actor + forkserver; dir + sockets
        assert await ref.ask("ping", 1) == 1
    leaks = leaks_since(before)
    assert {k: leaks[k] for k in ("processes", "fds", "shm_segments", "ipc_files")} == \
        {"processes": 0, "fds": 0, "shm_segments": 0, "ipc_files": 0}


def test_record_shape() -> None:
    rec = new_record("R99", "x")
    for key in ("scenario", "commit", "seed", "env", "faults", "delivery", "errors", "recovery_ms",
                "latency_ms", "memory", "leaks_after"):
        assert key in rec
    assert set(rec["env"]) >= {"cpus", "kernel", "python", "pyzmq", "libzmq", "msgpack", "transport"}
    rec["figures"] = {"s": {1, 2}, "t": (1, float("inf"))}
    json.dumps(jsonable(rec))
