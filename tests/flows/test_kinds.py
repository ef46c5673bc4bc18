"""Every flow kind across real processes: sequence, route, fan-out and gather, loop-until,
cascade; their results, their metrics and their bad inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import cascada
from cascada.actors._flow import (
    SELF,
    BudgetExhausted,
    Cascade,
    FanOut,
    InvalidDecision,
    LoopUntil,
    RoundLimitExceeded,
    Route,
    Sequential,
    StageFailed,
    Step,
    ask_flow,
    stream_flow,
)
from flows.flowkit import Leaf, close, eventually, is_big, until

P: cascada.Placement = "process"


async def test_sequence_chains_steps_streams_its_last_one_and_counts() -> None:
    async with cascada.ActorSystem() as system:
        a = await system.spawn(Leaf, 1, name="a", placement=P)
        b = await system.spawn(Leaf, 10, name="b", placement=P)
        seq = await system.spawn(Sequential, Step(a, "add"), lambda x: x * 2, [Step(b, "add"), Step(a, "add")],
                                 name="seq", placement=P)
        assert await seq.ask("run", 1) == (1 + 1) * 2 + 10 + 1
        assert [x async for x in seq.stream("stream", 1)] == [15]  # not a streaming last step: one item
        streamer = await system.spawn(Sequential, Step(a, "add"), Step(b, "count_up", stream=True),
                                      name="streamer", placement=P)
        assert [x async for x in streamer.stream("stream", 2)] == [0, 1, 2]  # live items of the last step
        assert await streamer.ask("run", 1) == [0, 1]  # run collects them

        m = await seq.ask("metrics")
        assert m["kind"] == "sequence" and m["requests"] == 2 and m["ok"] == 2 and m["in_flight"] == 0
        assert list(m["steps"]) == ["a", "lambda", "b-a", "b-a.b", "b-a.a"]
        assert m["steps"]["a"]["calls"] == 2 and m["steps"]["b-a.b"]["ok"] == 2
        assert m["p95_ms"] >= m["p50_ms"] > 0
        assert (await seq.ask("describe"))["steps"]["b-a"] == "b.add -> a.add"


async def test_route_calls_several_weighted_edges_at_once_and_combines_them() -> None:
    async with cascada.ActorSystem() as system:
        x2 = await system.spawn(Leaf, 2, name="x2", placement=P)
        x3 = await system.spawn(Leaf, 3, name="x3", placement=P)

        def gate(x: Any) -> Any:
            return [["two", 0.25], ["three", 0.75]] if x["n"] > 0 else []

        edges = {"two": Step(x2, "scale"), "three": Step(x3, "scale")}
        route = await system.spawn(Route, lambda x: gate(x), {k: [lambda x: x["v"], s] for k, s in edges.items()},
                                   name="route", placement=P)
        assert close(await route.ask("run", {"n": 1, "v": 4.0}), 0.25 * 8 + 0.75 * 12)
        lists = await route.ask("run", {"n": 1, "v": [1.0, 2.0]})  # lists are summed elementwise
        assert np.allclose(lists, [0.25 * 2 + 0.75 * 3, 0.25 * 4 + 0.75 * 6])
        arr = await route.ask("run", {"n": 1, "v": np.arange(3, dtype=np.float32)})  # arrays travel out of band
        assert isinstance(arr, np.ndarray) and np.allclose(arr, np.arange(3) * (0.5 + 2.25))
        assert await route.ask("run", {"n": 0, "v": 1.0}) is None  # no edge: on_empty="none"
        # A recorded decision replays without the router.
        assert close(await route.ask("run", {"n": 0, "v": 1.0}, route=[["three", 1.0]]), 3.0)
        got = [x async for x in route.stream("stream", {"n": 1, "v": 1.0})]
        assert sorted((g["edge"], g["weight"], g["result"]) for g in got) == [("three", 0.75, 3.0), ("two", 0.25, 2.0)]

        listing = await system.spawn(Route, lambda x: ["two", "three"], edges, combine="list", on_empty="item",
                                     name="listing", placement=P)
        assert await listing.ask("run", 5) == [["two", 1.0, 10], ["three", 1.0, 15]]
        assert await listing.ask("run", 5, route=[]) == 5  # on_empty="item": a skip
        by_edge = await system.spawn(Route, lambda x: {"two": 1.0}, edges,
                                     combine=lambda rows: {e: r for e, _, r in rows}, name="by_edge", placement=P)
        assert await by_edge.ask("run", 5) == {"two": 10}
        normalized = await system.spawn(Route, lambda x: {"two": 1.0, "three": 3.0}, edges, normalize=True,
                                        name="normalized", placement="local")
        assert close(await normalized.ask("run", 5), 0.25 * 10 + 0.75 * 15)

        # Speculative: the first edge to answer wins, the other is cancelled at once (a failing edge just loses).
        race = await system.spawn(Route, lambda x: ["broken", "slow", "fast"],
                                  {"fast": Step(x2, "sleep", kwargs={"seconds": 0.05}), "slow": Step(x3, "hang"),
                                   "broken": Step(x3, "fail")}, combine="first", name="race", placement=P)
        assert await race.ask("run", 7) == 7
        assert [x async for x in race.stream("stream", 8)] == [{"edge": "fast", "weight": 1.0, "result": 8}]

        async def loser_cancelled() -> bool:
            return bool((await x3.ask("counts")).get("hang") == [2, 0, 2])

        await eventually(loser_cancelled, what="the losing edges cancelled")
        assert (await race.ask("metrics"))["route"]["wins"] == {"fast": 2, "slow": 0, "broken": 0}
        with pytest.raises(StageFailed) as lost:
            await ask_flow(race, 7, route=["broken"])
        assert lost.value.path == ("race[broken]", "x3.fail")

        m = await route.ask("metrics")
        assert m["route"]["chosen"] == {"two": 4, "three": 5} and m["route"]["empty"] == 1
        assert m["route"]["overrides"] == 1 and m["steps"]["router"]["calls"] == 5
        assert m["steps"]["two.x2"]["calls"] == 4

        for bad, why in (([["four", 1.0]], "no edge 'four'"), ([["two", "heavy"]], "not a finite number"),
                         ([["two", 1], ["two", 1]], "chosen twice"), (7, "not a list")):
            with pytest.raises(InvalidDecision, match=why) as info:
                await ask_flow(listing, 1, route=bad)
            assert info.value.path == ("listing[router]",)
        with pytest.raises(StageFailed, match="weighted sum of str") as failed:
            await ask_flow(route, {"n": 1, "v": "text"})
        assert failed.value.path == ("route[combine]", "weighted_sum()")


async def test_fanout_gathers_by_index_and_marks_parts_missing_past_the_deadline() -> None:
    async with cascada.ActorSystem() as system:
        w = await system.spawn(Leaf, 10, name="w", placement=P)
        fan = await system.spawn(FanOut, Step(w, "maybe_hang"), split=lambda xs: [int(v) for v in xs],
                                 gather_timeout=0.5, name="fan", placement=P)
        assert await fan.ask("run", [1, 2, 3]) == {"results": [10, 20, 30], "missing": [], "expected": [1, 1, 1],
                                                   "received": [1, 1, 1], "complete": True, "lost": []}
        assert (await fan.ask("run", []))["results"] == []  # zero parts is fine

        # Part 1 never answers: past the gather deadline it is marked missing, and its call is cancelled.
        out = await fan.ask("run", [1, -1, 3])
        assert out["results"] == [10, None, 30] and out["missing"] == [1] and not out["complete"]
        assert out["lost"] == [{"index": 1, "part": 1, "reason": "late"}]

        async def late_part_cancelled() -> bool:
            return (await w.ask("counts"))["maybe_hang"] == [6, 5, 1]

        await eventually(late_part_cancelled, what="the late part's handler cancelled")
        streamed = [x async for x in fan.stream("stream", [2, -1])]
        assert streamed == [{"index": 0, "part": 0, "result": 20},
                            {"index": 1, "part": 1, "missing": True, "reason": "late"}]

        # Several parts per index with weights (top-2 dispatch), named workers, capacity drops.
        e1 = await system.spawn(Leaf, 1, name="e1", placement=P)

        def dispatch(xs: list[float]) -> dict[str, Any]:
            parts = [{"index": i, "data": x, "worker": "a", "weight": 0.5} for i, x in enumerate(xs)]
            parts += [{"index": i, "data": x, "worker": "b", "weight": 0.5} for i, x in enumerate(xs)]
            return {"parts": parts, "size": len(xs) + 1}

        moe = await system.spawn(FanOut, {"a": Step(e1, "scale"), "b": Step(w, "scale")}, split=dispatch,
                                 capacity=2, name="moe", placement=P)
        out = await moe.ask("run", [1.0, 2.0, 3.0])
        assert out["expected"] == [2, 2, 2, 0] and out["received"] == [2, 2, 0, 0]
        assert out["results"][:2] == [5.5, 11.0] and out["results"][2:] == [None, None]
        assert out["missing"] == [2] and {tuple(x.values()) for x in out["lost"]} == {(2, 2, "dropped"), (2, 5, "dropped")}

        # A failing part fails the request (on_error="raise") or is marked missing.
        strict = await system.spawn(FanOut, Step(w, "fail"), name="strict", placement=P)
        with pytest.raises(StageFailed) as failed:
            await ask_flow(strict, [1, 2])
        assert failed.value.path == ("strict[worker]", "w.fail") and failed.value.remote_type == "ValueError"
        lenient = await system.spawn(FanOut, [lambda x: x if x else 1 / x], on_error="missing", combine="results",
                                     max_parallel=1, name="lenient", placement=P)
        assert await lenient.ask("run", [1, 0, 2]) == [1, None, 2]
        picky = await system.spawn(FanOut, {"a": Step(e1, "scale"), "b": Step(w, "scale")},
                                   split=lambda x: x, name="picky", placement="local")
        for bad, why in (([1, 2], "several workers"), ({"parts": [{"index": 0, "data": 1, "worker": "c"}]},
                                                       "part 0 names worker 'c'"),
                         ({"parts": [{"index": -1, "data": 1, "worker": "a"}]}, "not an int >= 0"),
                         ({"parts": [{"index": 3, "data": 1, "worker": "a"}], "size": 2}, "size 2")):
            with pytest.raises(InvalidDecision, match=why) as bad_split:
                await ask_flow(picky, bad)
            assert bad_split.value.path == ("picky[split]",)
        m = await fan.ask("metrics")
        assert m["fanout"]["late"] == 2 and m["fanout"]["parts"] == 8 and m["fanout"]["incomplete"] == 2
        assert (await lenient.ask("metrics"))["fanout"]["failed"] == 1


async def test_loop_until_stops_when_the_verifier_says_so_or_at_its_round_limit() -> None:
    async with cascada.ActorSystem() as system:
        a = await system.spawn(Leaf, 1, name="a", placement=P)
        loop = await system.spawn(LoopUntil, Step(a, "add"), until, max_rounds=5, name="loop", placement=P)
        assert await loop.ask("run", 0) == {"value": 3, "rounds": 3, "stopped": True}
        assert await loop.ask("run", -10) == {"value": -5, "rounds": 5, "stopped": False}  # the limit: explicit
        assert [r["value"] async for r in loop.stream("stream", 1)] == [2, 3]
        strict = await system.spawn(LoopUntil, Step(a, "add"), lambda v: {"stop": v >= 3, "next": v * 2},
                                    max_rounds=3, on_limit="error", name="strict", placement=P)
        assert await strict.ask("run", 0) == {"value": 3, "rounds": 2, "stopped": True}  # 0+1, then next 2*1, +1
        with pytest.raises(RoundLimitExceeded, match="max_rounds=3") as info:
            await ask_flow(strict, -100)
        assert info.value.rounds == 3 and info.value.path == ("strict",)
        verdicts = await system.spawn(LoopUntil, Step(a, "add"), lambda v: "maybe", name="verdicts", placement=P)
        with pytest.raises(InvalidDecision, match="'maybe'"):
            await ask_flow(verdicts, 0)
        m = await loop.ask("metrics")
        assert m["loop"] == {"loops": 3, "stopped": 2, "limit_hit": 1, "mean_rounds": (3 + 5 + 2) / 3}
        assert m["steps"]["body"]["calls"] == 10 and m["steps"]["until"]["calls"] == 10


async def test_cascade_escalates_until_accepted_within_its_escalation_budget() -> None:
    async with cascada.ActorSystem() as system:
        cheap = await system.spawn(Leaf, 1, name="cheap", placement=P)
        mid = await system.spawn(Leaf, 4, name="mid", placement=P)
        big = await system.spawn(Leaf, 10, name="big", placement=P)
        tiers = [Step(cheap, "priced", take="value"), Step(mid, "priced", take="value"),
                 Step(big, "priced", take="value")]
        cas = await system.spawn(Cascade, tiers, is_big, name="cas", placement=P)
        assert await cas.ask("run", 20) == {"value": 20, "tier": 0, "tier_name": "cheap", "accepted": True,
                                            "escalations": 0, "exhausted": None, "cost": 1.0}
        assert await cas.ask("run", 3) == {"value": 12, "tier": 1, "tier_name": "mid", "accepted": True,
                                           "escalations": 1, "exhausted": None, "cost": 5.0}
        last = await cas.ask("run", 0.5)  # the last tier answers whatever the verifier would say
        assert last["tier_name"] == "big" and last["accepted"] is None and last["cost"] == 15.0
        tried = [t async for t in cas.stream("stream", 3)]
        assert [(t["tier_name"], t["accepted"], t["final"]) for t in tried] == [("cheap", False, False),
                                                                               ("mid", True, True)]
        # The request's budget (from the context) stops escalation: 1 + 4 fit in 5, the big tier does not.
        with cascada.context(budget=5.0):
            out = await cas.ask("run", 0.5)
        assert (out["tier_name"], out["accepted"], out["exhausted"], out["cost"]) == ("mid", False, "budget", 5.0)

        capped = await system.spawn(Cascade, tiers, is_big, max_escalations=1, tier_costs=[1, 2, 8],
                                    on_exhausted="error", name="capped", placement=P)
        with pytest.raises(BudgetExhausted, match="max_escalations") as info:
            await ask_flow(capped, 0.5)
        assert (info.value.tier, info.value.escalations, info.value.reason) == (1, 1, "max_escalations")
        with cascada.context(budget=2.5), pytest.raises(BudgetExhausted) as info:
            await ask_flow(capped, 0.5)  # 1 spent on the cheap tier: 1.5 left does not cover the mid tier's 2
        assert (info.value.tier, info.value.reason, info.value.spent, info.value.budget) == (0, "budget", 1.0, 2.5)

        m = (await cas.ask("metrics"))
        c = m["cascade"]
        assert c["answered_by"] == {"cheap": 1, "mid": 3, "big": 1}
        assert c["reached"] == {"cheap": 5, "mid": 4, "big": 1}
        assert c["escalation_rate"] == {"cheap": 4 / 5, "mid": 1 / 4, "big": 0.0}
        assert c["acceptance_rate"] == 3 / 9 and c["exhausted"] == {"max_escalations": 0, "budget": 1}
        assert m["steps"]["mid"]["cost"] == 16.0 and m["steps"]["mid"]["macs"] == 1600.0
        assert m["steps"]["big"]["p50_ms"] > 0 and m["steps"]["verifier"]["calls"] == 9


async def test_flows_reject_bad_wiring_with_configuration_errors() -> None:
    async with cascada.ActorSystem() as system:
        a = await system.spawn(Leaf, name="a", placement="local")
        cases: list[tuple[Any, str]] = [
            (lambda: Sequential(), "at least one step"),
            (lambda: Sequential(42), "expected a step"),
            (lambda: Sequential(Leaf), "not a class"),
            (lambda: Sequential(Step(a, "bad-name")), "not a public handler name"),
            (lambda: Sequential(Step(a, name="has space")), "must be 1-128 characters"),
            (lambda: Sequential(Step(lambda x: x, "run")), "method= applies to an actor"),
            (lambda: Sequential(Step(a, timeout=-1)), "timeout must be"),
            (lambda: Sequential(a, max_depth=0), "max_depth"),
            (lambda: Route(a, {}), "non-empty"),
            (lambda: Route(a, {"x": a}, combine="mean"), "combine must be one of"),
            (lambda: FanOut(a, gather_timeout=0), "gather_timeout"),
            (lambda: FanOut(a, on_error="ignore"), "on_error"),
            (lambda: LoopUntil(a, a, max_rounds=0), "max_rounds"),
            (lambda: Cascade([], a), "non-empty list"),
            (lambda: Cascade([a, a], [a, a, a]), "one per tier"),
            (lambda: Cascade([a, a], a, tier_costs=[1]), "tier_costs"),
            (lambda: Cascade([a, a], [None]), "could never escalate"),
        ]
        for make, why in cases:
            with pytest.raises(cascada.ConfigurationError, match=why):
                make()
        with pytest.raises(cascada.ActorInitFailed, match="max_rounds"):
            await system.spawn(LoopUntil, a, a, max_rounds=-1, placement=P)
        seq = await system.spawn(Sequential, SELF, name="loopy", placement="local")
        with pytest.raises(cascada.RemoteError, match="takes no options"):
            await seq.ask("run", 1, fast=True)
