"""Flows inside flows across real processes: three levels, self-recursion under the depth
guard, a failing stage surfacing with its full path, cancellation and deadlines reaching
every level (checked with counters in the leaf actors, never with sleeps)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cascada
from cascada.actors._flow import (
    SELF,
    Cascade,
    FlowDepthExceeded,
    Route,
    Sequential,
    StageFailed,
    Step,
    ask_flow,
    flow_error,
    stream_flow,
)
from flows.flowkit import Leaf, eventually

P: cascada.Placement = "process"


async def test_three_levels_of_flows_answer_carry_the_context_and_surface_a_failure_with_its_path() -> None:
    async with cascada.ActorSystem() as system:
        a = await system.spawn(Leaf, 1, name="a", placement=P)
        b = await system.spawn(Leaf, 10, name="b", placement=P)
        inner = await system.spawn(Sequential, Step(a, "add"), Step(b, "add"), name="inner", placement=P)
        bad = await system.spawn(Sequential, Step(a, "add"), Step(b, "fail"), name="bad", placement=P)
        probe = await system.spawn(Sequential, Step(a, "where"), name="probe", placement=P)

        def pick(x: Any) -> Any:
            if x == "probe":
                return [["probe", 1.0]]
            return [["bad", 1.0]] if x < 0 else [["inner", 0.5], ["direct", 0.5]]

        mid = await system.spawn(Route, pick, {"inner": inner, "bad": bad, "probe": probe, "direct": Step(a, "add")},
                                 name="mid", placement=P)
        top = await system.spawn(Cascade, [mid, Step(b, "add")], lambda v: not isinstance(v, float) or v < 100,
                                 name="top", placement=P)

        assert (await top.ask("run", 1))["value"] == 0.5 * 12 + 0.5 * 2  # cascade > route > sequence > leaves
        escalated = await top.ask("run", 200)
        assert (escalated["tier_name"], escalated["value"]) == ("b", 210)
        many = await asyncio.gather(*(top.ask("run", float(i)) for i in range(1, 200)))  # served concurrently
        assert [r["value"] for r in many] == [i + 6.0 if i + 6 < 100 else i + 10 for i in range(1, 200)]

        with cascada.context(trace_id="req-42", budget=7.0):
            seen = (await top.ask("run", "probe"))["value"]
        assert seen == {"path": ["top", "mid", "probe", "a"], "depth": 4, "budget": 7.0, "trace": "req-42"}

        # The failing stage, three flows down: one typed error, the whole path, the original error.
        want = ("top[mid]", "mid[bad]", "bad[b]", "b.fail")
        with pytest.raises(StageFailed) as info:
            await ask_flow(top, -1)
        err = info.value
        assert err.path == want and err.flow == "top"
        assert (err.remote_type, err.remote_message) == ("ValueError", "b cannot take 0")
        assert (err.actor, err.method) == ("b", "fail")
        assert err.remote_traceback is not None and "ValueError: b cannot take 0" in err.remote_traceback
        assert str(err) == "top[mid] > mid[bad] > bad[b] > b.fail: ValueError: b cannot take 0"
        # A plain ask raises the same typed error (errors cross processes as themselves).
        with pytest.raises(StageFailed) as plain:
            await top.ask("run", -1)
        assert plain.value.path == want and plain.value.remote_type == "ValueError"
        assert any("Remote traceback (top.run)" in note for note in plain.value.__notes__)
        typed = flow_error(plain.value)
        assert typed is plain.value
        assert flow_error(ValueError("x")) is None
        with pytest.raises(StageFailed) as streamed:
            async for _ in stream_flow(top, -1):
                pass
        assert streamed.value.path == want

        await top.tell("run", 1)  # a flow answers tell like any actor

        async def told() -> bool:
            return bool((await top.ask("metrics"))["ok"] == 4 + 199)

        await eventually(told, what="the told request handled")
        m = await top.ask("metrics")
        assert m["errors"] == 3 and m["steps"]["mid"]["errors"] == 3 and m["cascade"]["answered_by"]["mid"] == 3 + 93


async def test_a_flow_recurses_into_itself_until_its_depth_guard_stops_it() -> None:
    async with cascada.ActorSystem() as system:
        a = await system.spawn(Leaf, 1, name="a", placement=P)
        countdown = await system.spawn(
            Route, lambda x: [["again", 1.0]] if x > 0 else [["done", 1.0]],
            {"again": [lambda x: x - 1, SELF], "done": Step(a, "where")}, max_depth=5, max_in_flight=1,
            name="countdown", placement=P)  # one request at a time: its own re-entries do not wait for a turn
        outer = await system.spawn(Sequential, countdown, name="outer", placement=P)
        seen = await outer.ask("run", 3)  # outer > countdown x4 (3, 2, 1, 0) > a
        assert seen["path"] == ["outer", "countdown", "countdown", "countdown", "countdown", "a"]
        assert seen["depth"] == 6

        with pytest.raises(FlowDepthExceeded) as info:
            await ask_flow(outer, 50)  # would recurse 51 times: the sixth entry refuses
        err = info.value
        assert (err.name, err.depth, err.max_depth) == ("countdown", 6, 5)
        assert err.path == ("outer[countdown]", *["countdown[again.self]"] * 5, "countdown")
        assert "entered 6 times" in str(err) and "max_depth=5" in str(err)
        m = await countdown.ask("metrics")
        assert m["in_flight"] == 0 and m["errors"] == 6  # each level failed with the error from below


async def test_cancelling_the_top_call_cancels_every_level_parallel_branches_and_live_streams() -> None:
    async with cascada.ActorSystem() as system:
        h = await system.spawn(Leaf, 1, name="h", placement=P)
        s = await system.spawn(Leaf, 1, name="s", placement=P)
        branchy = await system.spawn(Route, lambda x: ["hang", "stream"],
                                     {"hang": Step(h, "hang"), "stream": Step(s, "ticks", stream=True)},
                                     name="branchy", placement=P)
        mid = await system.spawn(Sequential, branchy, name="mid", placement=P)
        top = await system.spawn(Sequential, Step(h, "add"), mid, name="top", placement=P)
        call = asyncio.ensure_future(top.ask("run", 1, timeout=30))

        async def both_branches_running() -> bool:
            hc, sc = await h.ask("counts"), await s.ask("counts")
            return bool(hc.get("hang", [0])[0] == 1 and sc.get("ticks", [0])[0] == 1)

        await eventually(both_branches_running, what="both parallel branches started")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

        async def all_cancelled() -> bool:
            hc, sc = await h.ask("counts"), await s.ask("counts")
            flows = [await f.ask("metrics") for f in (top, mid, branchy)]
            return bool(hc["hang"] == [1, 0, 1] and sc["ticks"] == [1, 0, 1]
                        and all(m["in_flight"] == 0 and m["cancelled"] == 1 for m in flows))

        await eventually(all_cancelled, timeout=5.0, what="every level cancelled")
        assert (await h.ask("counts"))["add"] == [1, 1, 0]

        # Leaving a live stream at the top reaches the streaming stage two flows down.
        inner = await system.spawn(Sequential, Step(h, "add"), Step(s, "ticks", stream=True), name="inner",
                                   placement=P)
        outer = await system.spawn(Sequential, Step(inner, "stream", stream=True), name="outer", placement=P)
        got = []
        async for item in outer.stream("stream", 1, timeout=30):
            got.append(item)
            if len(got) == 3:
                break
        assert got == [0, 1, 2]

        async def stream_cancelled() -> bool:
            return bool((await s.ask("counts"))["ticks"] == [2, 0, 2]
                        and (await inner.ask("metrics"))["in_flight"] == 0
                        and (await outer.ask("metrics"))["in_flight"] == 0)

        await eventually(stream_cancelled, what="the live stream cancelled at every level")


async def test_a_deadline_passing_mid_flow_stops_the_work_below_and_skips_the_stages_after() -> None:
    async with cascada.ActorSystem() as system:
        a = await system.spawn(Leaf, 1, name="a", placement=P)
        slow = await system.spawn(Leaf, 1, name="slow", placement=P)
        inner = await system.spawn(Sequential, Step(a, "add"), Step(slow, "sleep", kwargs={"seconds": 5.0}),
                                   Step(a, "scale"), name="inner", placement=P)
        top = await system.spawn(Sequential, Step(a, "add"), inner, Step(a, "scale"), name="top", placement=P)
        with pytest.raises(cascada.DeadlineExceeded):
            await ask_flow(top, 1, timeout=0.4)

        async def slow_stage_cancelled() -> bool:
            return bool((await slow.ask("counts")).get("sleep") == [1, 0, 1]
                        and (await top.ask("metrics"))["in_flight"] == 0)

        await eventually(slow_stage_cancelled, what="the slow stage cancelled at the deadline")
        counts = await a.ask("counts")
        assert counts["add"] == [2, 2, 0] and "scale" not in counts  # nothing after the deadline ran
        m = await top.ask("metrics")
        assert m["deadline_exceeded"] + m["cancelled"] == 1 and m["steps"]["a#2"]["calls"] == 0


async def test_flows_and_their_stages_are_supervised_like_any_actor() -> None:
    async with cascada.ActorSystem() as system:
        sup = await system.supervisor("sup", strategy="one_for_one", intensity=5)
        leaf = await system.spawn(Leaf, 1, name="leaf", supervisor=sup, restart="permanent", placement=P)
        flow = await system.spawn(Sequential, Step(leaf, "maybe_hang"), name="flow", supervisor=sup,
                                  restart="permanent", placement=P)
        top = await system.spawn(Sequential, flow, name="top", placement=P)
        assert await top.ask("run", 2) == 2

        async def incarnation(name: str) -> str | None:
            return {c["name"]: c["incarnation"] for c in await sup.ask("children")}[name]

        # The stage dies under a pending call: the top gets StageFailed naming it, at once.
        pending = asyncio.ensure_future(ask_flow(top, -1, timeout=30))

        async def leaf_waiting() -> bool:
            return bool((await leaf.ask("counts")).get("maybe_hang", [0])[0] == 2)

        await eventually(leaf_waiting, what="the call pending in the leaf")
        before = await incarnation("leaf")
        await system.kill(leaf)
        with pytest.raises(StageFailed) as info:
            await pending
        assert info.value.path == ("top[flow]", "flow[leaf]", "leaf.maybe_hang")
        assert info.value.remote_type == "cascada.ActorDied"

        async def restarted(name: str, old: str | None) -> bool:
            now = await incarnation(name)
            return now is not None and now != old

        await eventually(lambda: restarted("leaf", before), what="the leaf restarted")
        assert await top.ask("run", 3) == 3  # the same refs reach the new incarnation

        # The flow itself dies and comes back; the flow above it serves again.
        before = await incarnation("flow")
        await system.kill(flow)
        await eventually(lambda: restarted("flow", before), what="the flow restarted")
        assert await top.ask("run", 4) == 4
        assert (await flow.ask("metrics"))["requests"] == 1  # a new incarnation starts afresh
