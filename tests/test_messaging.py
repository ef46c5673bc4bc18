"""ask / tell / stream, ordering, errors and deadlines: the same tests for every placement
(an actor in this process, in its own process over ipc, and over tcp loopback)."""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any

import pytest
from actors_for_tests import Counter, Gate, Isolated, Recorder

import cascada


async def test_issue_contract(system: cascada.ActorSystem, spawn: Any) -> None:
    ref = await spawn(Counter, name="c")
    assert await ref.ask("add", 2) == 2
    await ref.tell("add", 1)
    assert [x async for x in ref.stream("count_to", 3)] == [0, 1, 2]
    assert await ref.ask("add", 1, timeout=0.5) == 4
    await system.stop(ref)
    with pytest.raises(cascada.ActorNotFound):
        system.lookup("c")


async def test_values_survive_the_trip(spawn: Any) -> None:
    ref = await spawn(Recorder)
    value = {"t": (1, (2, 3)), "l": [1, 2.5, None, True], "b": b"\x00\xff", 7: "int key", "s": "ü"}
    assert await ref.ask("echo_value", value) == value
    assert await ref.ask("echo", 1, "a", k=(1,)) == [(1, "a"), {"k": (1,)}]
    assert await ref.ask("sync_add", 2, 3) == 5
    big = list(range(100_000))
    assert await ref.ask("echo_value", big) == big


async def test_unsendable_value_is_refused_before_sending(spawn: Any, placement: str) -> None:
    ref = await spawn(Recorder)
    thing = object()
    if placement == "local":
        # No serialization in-process: the very object arrives.
        assert await ref.ask("echo_value", thing) is thing
        return
    with pytest.raises(cascada.SerializationError, match="cannot send a value of type"):
        await ref.ask("echo_value", thing)
    assert await ref.ask("echo_value", 1) == 1


async def test_tells_are_handled_in_order(spawn: Any) -> None:
    ref = await spawn(Recorder)
    for i in range(500):
        await ref.tell("record", i)
    assert await ref.ask("history") == list(range(500))


async def test_concurrent_asks_keep_sending_order(spawn: Any) -> None:
    ref = await spawn(Recorder)
    await asyncio.gather(*(ref.ask("nap", 0.0, i) for i in range(200)))
    assert await ref.ask("history") == list(range(200))


async def test_one_message_at_a_time_by_default(spawn: Any) -> None:
    ref = await spawn(Recorder)
    await asyncio.gather(*(ref.ask("nap", 0.01) for _ in range(10)))
    assert await ref.ask("max_concurrency") == 1


async def test_concurrent_handlers_overlap(spawn: Any) -> None:
    ref = await spawn(Gate)
    waiting = asyncio.ensure_future(ref.ask("wait", timeout=10))
    assert await ref.ask("release", timeout=10) == "done"
    assert await waiting == "released"


async def test_concurrent_handlers_keep_their_own_context(spawn: Any) -> None:
    ref = await spawn(Isolated)
    # Interleaved: each handler sets the variable, then waits while the others set theirs.
    got = await asyncio.gather(*(ref.ask("tagged", i, 0.02 * (i % 3), timeout=10) for i in range(12)))
    assert got == [[i, i] for i in range(12)]
    # Nothing leaks into the context that the actor's sequential handlers share.
    assert await ref.ask("peek", timeout=10) is None
    assert await ref.ask("at_once", {"k": [1, 2]}, timeout=10) == {"k": [1, 2]}


async def test_concurrent_handler_that_changes_between_awaiting_and_not(spawn: Any) -> None:
    # The cell learns whether a concurrent handler awaits at once (then it starts the next
    # ones in a task straight away) and tries again now and then: every path answers right.
    ref = await spawn(Isolated)
    pattern = [True] * 40 + [False] * 40 + [i % 3 == 0 for i in range(80)]
    for i, wait in enumerate(pattern):
        assert await ref.ask("maybe_wait", i, wait, timeout=10) == [i, i]
    got = await asyncio.gather(*(ref.ask("maybe_wait", i, i % 2 == 0, timeout=10) for i in range(100)))
    assert got == [[i, i] for i in range(100)]
    assert await ref.ask("peek", timeout=10) is None


async def test_concurrent_handler_is_cancelled_at_its_first_await(spawn: Any) -> None:
    ref = await spawn(Isolated)
    # The first call starts eagerly; having awaited, the second starts in a task at once.
    for k in (1, 2):
        with pytest.raises(cascada.DeadlineExceeded):
            await ref.ask("nap", 5.0, timeout=0.2)
        for _ in range(100):  # the cancellation travels as a message to a process actor
            if (await ref.ask("counts", timeout=10))["cancelled"] == k:
                break
            await asyncio.sleep(0.02)
        assert await ref.ask("counts", timeout=10) == {"cancelled": k, "started": k}
    assert await ref.ask("nap", 0.0, timeout=10) == "slept"


@pytest.mark.parametrize("step", ["first", "later"])
async def test_concurrent_handler_failure_is_typed_in_either_step(spawn: Any, step: str) -> None:
    ref = await spawn(Isolated, name="iso")
    with pytest.raises(cascada.RemoteError) as info:
        await ref.ask("fail_in", step, timeout=10)
    assert info.value.remote_type == "ValueError"
    assert ("before" if step == "first" else "after") in str(info.value)
    assert info.value.actor == "iso" and info.value.method == "fail_in"
    assert await ref.ask("at_once", 7, timeout=10) == 7


async def test_remote_error_carries_type_and_traceback(spawn: Any) -> None:
    ref = await spawn(Recorder, name="rec")
    with pytest.raises(cascada.RemoteError) as info:
        await ref.ask("fail", "bad input 42")
    err = info.value
    assert err.remote_type == "ValueError"
    assert "bad input 42" in str(err)
    assert err.remote_traceback is not None and "in fail" in err.remote_traceback
    assert err.actor == "rec" and err.method == "fail"
    assert await ref.ask("echo_value", "still alive") == "still alive"


async def test_unknown_private_and_mismatched_methods(spawn: Any) -> None:
    ref = await spawn(Recorder)
    with pytest.raises(cascada.ActorNotFound, match="no public handler 'nope'"):
        await ref.ask("nope")
    with pytest.raises(cascada.ActorNotFound, match="_secret"):
        await ref.ask("_secret")
    with pytest.raises(cascada.ActorNotFound, match="is a stream"):
        await ref.ask("ticks", 3)
    with pytest.raises(cascada.ActorNotFound, match="not a stream"):
        async for _ in ref.stream("record", 1):
            pass
    await ref.tell("nope")  # a bad tell is counted where it lands, not raised here
    assert await ref.ask("echo_value", 1) == 1


async def test_deadline_exceeded_then_actor_still_serves(spawn: Any) -> None:
    ref = await spawn(Recorder)
    t0 = time.monotonic()
    with pytest.raises(cascada.DeadlineExceeded) as info:
        await ref.ask("nap", 1.0, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - t0 < 0.8
    assert await ref.ask("echo_value", "ok", timeout=5) == "ok"


async def test_expired_work_is_dropped_not_computed(system: cascada.ActorSystem, spawn: Any) -> None:
    ref = await spawn(Recorder)
    busy = asyncio.ensure_future(ref.ask("nap", 0.5))
    await asyncio.sleep(0.05)
    with pytest.raises(cascada.DeadlineExceeded):
        await ref.ask("nap", 0.0, "late", timeout=0.1)
    await busy
    assert await ref.ask("history") == []
    stats = await system.stats(ref)
    assert stats["actors"][0]["expired"] == 1


async def test_bad_timeouts_are_refused(spawn: Any) -> None:
    ref = await spawn(Recorder)
    with pytest.raises(cascada.ConfigurationError):
        await ref.ask("echo_value", 1, timeout=-1)
    with pytest.raises(cascada.ConfigurationError):
        await ref.ask("echo_value", 1, timeout=math.nan)
    assert await ref.ask("echo_value", 1, timeout=math.inf) == 1


async def test_stream_error_midway(spawn: Any) -> None:
    ref = await spawn(Recorder)
    got = []
    with pytest.raises(cascada.RemoteError, match="tick 3 broke"):
        async for x in ref.stream("ticks", 10, fail_at=3):
            got.append(x)
    assert got == [0, 1, 2]


async def test_leaving_a_stream_early_cancels_the_producer(spawn: Any) -> None:
    ref = await spawn(Recorder)
    agen = ref.stream("ticks", 1_000_000, window=8)
    async for x in agen:
        if x == 5:
            break
    await agen.aclose()
    for _ in range(100):
        state = await ref.ask("stream_state")
        if state["closed"] == 1:
            break
        await asyncio.sleep(0.01)
    assert state["closed"] == 1
    assert state["produced"] < 100  # the producer was held back by credit, then stopped


async def test_stream_backpressure_bounds_the_producer(spawn: Any) -> None:
    ref = await spawn(Recorder)
    agen = ref.stream("ticks", 10_000, window=16)
    assert await agen.__anext__() == 0
    await asyncio.sleep(0.2)  # give an unbounded producer time to run far ahead
    await agen.aclose()
    # The actor finished the cancelled stream and serves again; it never ran ahead of credit.
    state = await ref.ask("stream_state")
    assert state["produced"] <= 16 + 1


async def test_stream_timeout(spawn: Any) -> None:
    ref = await spawn(Recorder)
    with pytest.raises(cascada.DeadlineExceeded):
        async for _ in ref.stream("ticks", 10**9, timeout=0.2, window=1):
            await asyncio.sleep(0.05)


async def test_refs_travel_in_messages_and_constructors(system: cascada.ActorSystem, spawn: Any, placement: str) -> None:
    from actors_for_tests import Holder

    counter = await spawn(Counter, name="counter")
    a = await spawn(Recorder, name="a")
    assert await a.ask("call_other", counter, "add", 5) == 5
    holder = await spawn(Holder, counter)
    assert await holder.ask("forward", "add", 1) == 6
    me = await a.ask("whoami")
    assert me == a and isinstance(me, cascada.ActorRef)
    # A process actor calling back into an actor that lives in the driver's process.
    local = await system.spawn(Counter, name="local-counter", placement="local")
    assert await a.ask("call_other", local, "add", 3) == 3


async def test_runs_on_uvloop(spawn: Any, placement: str) -> None:
    ref = await spawn(Recorder)
    env = await ref.ask("env")
    assert env["loop"].startswith("uvloop")
    if placement != "local":  # the test process itself has imported torch for other tests
        assert env["torch"] is False


async def test_tell_and_ask_to_a_stopped_actor(system: cascada.ActorSystem, spawn: Any) -> None:
    ref = await spawn(Recorder)
    await system.stop(ref)
    with pytest.raises((cascada.ActorNotFound, cascada.ActorDied)):
        await ref.ask("echo_value", 1, timeout=2)


async def test_graceful_stop_drains_accepted_messages(system: cascada.ActorSystem, spawn: Any, tmp_path: Any) -> None:
    from actors_for_tests import Drainer

    out = tmp_path / "count"
    ref = await spawn(Drainer, str(out))
    for _ in range(20):
        await ref.tell("work", 0.005)
    await system.stop(ref)
    assert out.read_text() == "20"


async def test_mailbox_is_bounded_and_pushes_back(placement: str) -> None:
    from support import spawn_placement, system_kwargs

    async with cascada.ActorSystem(mailbox_size=4, hwm=4, **system_kwargs(placement)) as system:
        ref = await system.spawn(Recorder, placement=spawn_placement(placement))
        for i in range(200):
            await ref.tell("nap", 0.0005, i)
        assert await ref.ask("history", timeout=30) == list(range(200))
        stats = await system.stats(ref)
        assert stats["actors"][0]["max_depth"] <= 4
        assert stats["actors"][0]["capacity"] == 4


async def test_stats_report_counters(system: cascada.ActorSystem, spawn: Any) -> None:
    ref = await spawn(Recorder)
    await ref.ask("echo_value", 1)
    with pytest.raises(cascada.RemoteError):
        await ref.ask("fail", "x")
    stats = await system.stats(ref)
    actor = stats["actors"][0]
    assert actor["handled"] >= 1 and actor["failed"] == 1
    assert stats["pid"] == ref.pid
    assert set(stats["node"]) >= {"rejected_frames", "late_replies", "unroutable_replies"}


async def test_distinct_processes(system: cascada.ActorSystem, placement: str, spawn: Any) -> None:
    a = await spawn(Recorder)
    b = await spawn(Recorder)
    pa, pb = (await a.ask("env"))["pid"], (await b.ask("env"))["pid"]
    if placement == "local":
        assert pa == pb == os.getpid()
    else:
        assert len({pa, pb, os.getpid()}) == 3
        assert (pa, pb) == (a.pid, b.pid)


async def test_ref_with_an_unreachable_endpoint_is_a_typed_error(system: cascada.ActorSystem) -> None:
    ghost = cascada.ActorRef("ghost", "bogus://nowhere", 1, "elsewhere", node=system.node)
    with pytest.raises(cascada.ConfigurationError, match="cannot connect"):
        await ghost.ask("x", timeout=1)


async def test_a_mailbox_full_until_the_deadline_raises_overloaded() -> None:
    async with cascada.ActorSystem(mailbox_size=2) as system:
        ref = await system.spawn(Recorder, placement="local")
        busy = asyncio.ensure_future(ref.ask("nap", 1.0, "busy"))
        await asyncio.sleep(0.05)
        await ref.tell("record", 0, timeout=5)
        await ref.tell("record", 1, timeout=5)  # the mailbox (2) is full now
        with pytest.raises(cascada.Overloaded, match="mailbox stayed full"):
            await ref.tell("record", 2, timeout=0.2)
        await busy
        assert await ref.ask("history") == ["busy", 0, 1]  # the refused one never ran


async def test_a_mailbox_is_bounded_in_bytes_too() -> None:
    np = pytest.importorskip("numpy")
    # Arrays of 200 KiB travel as frames (under tensor_inline_max): a 1 MiB mailbox holds five.
    async with cascada.ActorSystem(mailbox_bytes=1 << 20, hwm=2, tensor_inline_max=256 << 10) as system:
        ref = await system.spawn(Recorder)
        busy = asyncio.ensure_future(ref.ask("nap", 1.0, "busy"))
        await asyncio.sleep(0.1)
        for i in range(40):
            await ref.tell("record", np.full(200 << 10, i % 256, dtype=np.uint8), timeout=30)
        await busy
        assert len(await ref.ask("history", timeout=30)) == 41
        actor = (await system.stats(ref))["actors"][0]
        assert actor["capacity_bytes"] == 1 << 20
        assert (1 << 20) <= actor["max_bytes"] < (1 << 20) + (256 << 10)  # stopped reading at the bound
        assert actor["max_depth"] <= 6 and actor["bytes"] == 0


async def test_a_ref_used_from_another_thread_raises_wrong_thread() -> None:
    async with cascada.ActorSystem() as system:
        for placement in ("local", "process"):
            ref = await system.spawn(Counter, placement=placement)  # type: ignore[arg-type]
            loop = asyncio.get_running_loop()

            def elsewhere() -> str:
                try:
                    asyncio.run(ref.ask("add", 1))
                except cascada.WrongThread as exc:
                    return str(exc)
                return "no error"

            assert "run_coroutine_threadsafe" in await asyncio.to_thread(elsewhere)

            def handed_over() -> Any:
                return asyncio.run_coroutine_threadsafe(ref.ask("add", 2), loop).result(10)

            assert await asyncio.to_thread(handed_over) == 2  # the call the other thread made did not run
