"""Routing policies (each one and its bad inputs), the Router actor, recording, replay and
threshold tuning."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
import torch

import cascada
from cascada.stages import (
    ConfidenceThreshold,
    ContentKey,
    LeastLoaded,
    Recorder,
    Router,
    RoutingError,
    StageInputError,
    TopK,
    Window,
    replay,
    tune_threshold,
)

# -- ConfidenceThreshold ---------------------------------------------------------------------------


def test_confidence_threshold_accepts_at_or_above_and_escalates_below() -> None:
    p = ConfidenceThreshold(0.8, accept="cheap", escalate="big")
    assert p.edges == ("cheap", "big")
    assert p.decide([0.1, 0.9]) == [("cheap", 1.0)]
    assert p.decide([0.2, 0.8]) == [("cheap", 1.0)]  # at the threshold: accepted
    assert p.decide([0.4, 0.6]) == [("big", 1.0)]
    assert p.decide(0.85) == [("cheap", 1.0)]  # a scalar is the confidence itself
    assert p.decide(torch.tensor([[0.05, 0.05, 0.9]])) == [("cheap", 1.0)]  # a [1, V] row


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.5", True, float("nan")])
def test_confidence_threshold_outside_0_1_is_refused(bad: Any) -> None:
    with pytest.raises(cascada.ConfigurationError, match=r"threshold must be a number in \[0, 1\]"):
        ConfidenceThreshold(bad)


@pytest.mark.parametrize("bad, match", [
    ([0.5, float("nan")], "finite"),
    ([-0.2, 1.2], "outside"),
    ([3.0, 1.0], "not logits"),
    ([], "empty"),
    ("high", "expected a number"),
    ([[0.1, 0.9], [0.2, 0.8]], "not a number"),
    (1.5, "scalar confidence"),
])
def test_confidence_threshold_bad_inputs(bad: Any, match: str) -> None:
    with pytest.raises(StageInputError, match=match):
        ConfidenceThreshold(0.5).decide(bad)


def test_same_edge_for_accept_and_escalate_is_refused() -> None:
    with pytest.raises(cascada.ConfigurationError, match="unique"):
        ConfidenceThreshold(0.5, accept="x", escalate="x")


# -- Window --------------------------------------------------------------------------------------------


def test_window_escalates_only_near_the_boundary() -> None:
    w = Window(0.1)
    assert w.decide(0.55) == [("escalate", 1.0)]
    assert w.decide(0.5) == [("escalate", 1.0)]
    assert w.decide(0.45) == [("escalate", 1.0)]
    assert w.decide(0.7) == [("accept", 1.0)]
    assert w.decide(0.2) == [("accept", 1.0)]
    assert Window(0.0).decide(0.5) == [("accept", 1.0)]  # an empty window escalates nothing


def test_window_on_a_binary_vector_agrees_with_the_scalar_form() -> None:
    for width in (0.05, 0.2, 0.4):
        w = Window(width)
        for i in range(101):
            p = i / 100
            if abs(abs(p - 0.5) - width) < 1e-9:
                continue  # exactly on the window's edge the two forms round differently
            assert w.decide([1 - p, p]) == w.decide(p), (width, p)


def test_window_on_many_classes_uses_the_top_two_margin() -> None:
    w = Window(0.1)
    assert w.decide([0.4, 0.35, 0.25]) == [("escalate", 1.0)]  # (0.40 - 0.35) / 2 < 0.1
    assert w.decide([0.7, 0.2, 0.1]) == [("accept", 1.0)]  # (0.7 - 0.2) / 2 >= 0.1
    assert w.distance([0.7, 0.2, 0.1]) == pytest.approx(0.25)


def test_window_between_two_scores() -> None:
    w = Window.between(0.3, 0.6, accept="exit", escalate="next")
    assert w.decide(0.5) == [("next", 1.0)]
    assert w.decide(0.31) == [("next", 1.0)]
    assert w.decide(0.65) == [("exit", 1.0)]
    assert w.decide(0.1) == [("exit", 1.0)]


def test_window_bad_config_and_inputs() -> None:
    with pytest.raises(cascada.ConfigurationError, match="width"):
        Window(-0.1)
    with pytest.raises(cascada.ConfigurationError, match="width"):
        Window(float("inf"))
    with pytest.raises(cascada.ConfigurationError, match="low <= high"):
        Window.between(0.6, 0.3)
    with pytest.raises(StageInputError, match="two classes"):
        Window(0.1).decide([1.0])


# -- TopK -------------------------------------------------------------------------------------------------


def test_topk_picks_the_k_largest_gates_and_renormalises() -> None:
    logits = [1.0, 2.0, 3.0, 0.0]
    g = TopK(2, 4).gate(logits)
    e = [math.exp(x) for x in logits]
    probs = [x / sum(e) for x in e]
    assert g.probs == pytest.approx(probs, abs=1e-15)
    assert [name for name, _ in g.choices] == ["expert_2", "expert_1"]
    w2, w1 = probs[2] / (probs[2] + probs[1]), probs[1] / (probs[2] + probs[1])
    assert [w for _, w in g.choices] == pytest.approx([w2, w1], abs=1e-15)
    assert TopK(2, 4).decide(logits) == g.choices
    assert TopK(1, ["a", "b"]).decide([0.0, 0.0]) == [("a", 1.0)]  # ties go to the lower index
    assert sum(w for _, w in TopK(3, 4).decide(torch.randn(4))) == pytest.approx(1.0)


def test_topk_gate_tensor_matches_the_per_item_gate() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    policy = TopK(2, 5)
    idx, w, probs = policy.gate_tensor(logits)
    for row in range(6):
        g = policy.gate(logits[row])
        assert [f"expert_{i}" for i in idx[row].tolist()] == [n for n, _ in g.choices]
        assert w[row].tolist() == pytest.approx([x for _, x in g.choices], abs=1e-12)
        assert probs[row].tolist() == pytest.approx(g.probs, abs=1e-12)


@pytest.mark.parametrize("k", [0, -1, 5, 1.5, True])
def test_topk_k_out_of_range_is_refused(k: Any) -> None:
    with pytest.raises(cascada.ConfigurationError, match=r"k must be an integer in \[1, 4\]"):
        TopK(k, 4)


def test_topk_bad_config_and_inputs() -> None:
    with pytest.raises(cascada.ConfigurationError, match="at least one expert"):
        TopK(1, 0)
    with pytest.raises(cascada.ConfigurationError, match="unique"):
        TopK(1, ["a", "a"])
    with pytest.raises(cascada.ConfigurationError, match="temperature"):
        TopK(1, 2, temperature=0.0)
    with pytest.raises(StageInputError, match="got 3 gate logits for 4 experts"):
        TopK(2, 4).gate([1.0, 2.0, 3.0])
    with pytest.raises(StageInputError, match=r"\[N, 4\]"):
        TopK(2, 4).gate_tensor(torch.zeros(3, 5))


# -- ContentKey ------------------------------------------------------------------------------------------


def test_content_key_hash_is_stable_across_processes_and_runs() -> None:
    # Fixed expectations: the hash is BLAKE2b, not Python's per-process salted hash().
    c = ContentKey(["a", "b", "c", "d"])
    assert [c.edge_for(k) for k in ["user-42", 42, b"x", ["a", 1], "zzz"]] == ["b", "a", "a", "d", "a"]
    assert c.edge_for(("a", 1)) == c.edge_for(["a", 1])  # tuples arrive as lists on the wire


def test_content_key_spreads_keys_and_moves_few_when_an_edge_goes() -> None:
    four = ContentKey(["a", "b", "c", "d"])
    three = ContentKey(["a", "b", "c"])
    keys = [f"k{i}" for i in range(2000)]
    placed = [four.edge_for(k) for k in keys]
    assert all(placed.count(e) > 350 for e in "abcd")
    moved = [k for k, e in zip(keys, placed) if e != "d" and three.edge_for(k) != e]
    assert moved == []  # rendezvous hashing: only d's keys move


def test_content_key_mapping_first_then_hash() -> None:
    c = ContentKey(["x", "y"], mapping={"vip": "gold", ("t", 1): "x"}, key=lambda item: item["user"])
    assert set(c.edges) == {"x", "y", "gold"}
    assert c.decide({"user": "vip"}) == [("gold", 1.0)]
    assert c.decide({"user": ["t", 1]}) == [("x", 1.0)]
    assert c.decide({"user": "anyone"})[0][0] in ("x", "y")


def test_content_key_errors() -> None:
    with pytest.raises(cascada.ConfigurationError, match="edges to hash onto, a mapping"):
        ContentKey([])
    only_map = ContentKey(mapping={"a": "e1"})
    assert only_map.decide("a") == [("e1", 1.0)]
    with pytest.raises(RoutingError, match="no mapping for key 'b'"):
        only_map.decide("b")
    with pytest.raises(RoutingError, match="cannot hash a key of type float"):
        ContentKey(["a"]).decide(1.5)
    with pytest.raises(cascada.ConfigurationError, match="edge names"):
        ContentKey(["a"], mapping={"k": ""})


# -- LeastLoaded -----------------------------------------------------------------------------------------


def test_least_loaded_tracks_in_flight_and_rotates_ties() -> None:
    p = LeastLoaded(["r0", "r1", "r2"])
    assert [p.acquire() for _ in range(3)] == ["r0", "r1", "r2"]
    p.release("r1")
    assert p.decide(None) == [("r1", 1.0)]
    p.release("r0")
    p.release("r2")
    assert p.load() == {"r0": 0, "r1": 1, "r2": 0}
    assert {p.acquire(), p.acquire()} == {"r0", "r2"}
    assert p.served == {"r0": 2, "r1": 2, "r2": 2}


def test_least_loaded_errors() -> None:
    p = LeastLoaded(["r0"])
    with pytest.raises(RoutingError, match="no replica named 'r9'"):
        p.release("r9")
    with pytest.raises(RoutingError, match="released twice"):
        p.release("r0")
    with pytest.raises(cascada.ConfigurationError, match="at least one edge"):
        LeastLoaded([])
    with pytest.raises(cascada.ConfigurationError, match="not one string"):
        LeastLoaded("r0")


# -- Recorder, replay, tune_threshold ------------------------------------------------------------------------


def test_recorder_keeps_memory_and_jsonl(tmp_path: Any) -> None:
    path = tmp_path / "decisions.jsonl"
    rec = Recorder(path, keep=2)
    for i in range(3):
        rec.append({"seq": i, "input": [0.5, 0.5], "decision": [["a", 1.0]]})
    assert [r["seq"] for r in rec.records] == [1, 2] and rec.count == 3
    assert rec.update(2, {"label": 1}) and not rec.update(0, {"label": 0})
    rec.close()
    loaded = Recorder.load(path)
    assert [r["seq"] for r in loaded] == [0, 1, 2]
    assert loaded[2]["label"] == 1 and "label" not in loaded[0]
    with pytest.raises(cascada.ConfigurationError, match="cannot open"):
        Recorder(tmp_path / "missing-dir" / "x.jsonl")


def test_replay_runs_another_policy_over_recorded_inputs() -> None:
    rng = random.Random(1)
    strict = ConfidenceThreshold(0.9)
    records = []
    for i in range(200):
        p = rng.random()
        records.append({"seq": i, "input": [1 - p, p], "decision": [list(d) for d in strict.decide([1 - p, p])]})
    same = replay(records, strict)
    assert same.changed == 0
    loose = replay(records, ConfidenceThreshold(0.6))
    expected = sum(1 for r in records if 0.6 <= max(r["input"]) < 0.9)
    assert loose.changed == expected
    assert loose.counts["accept"] == sum(1 for r in records if max(r["input"]) >= 0.6)


def test_tune_threshold_small_example_by_hand() -> None:
    rows = [(0.95, True), (0.9, True), (0.85, False), (0.8, True), (0.7, False), (0.6, True)]
    records = [{"input": c, "correct": ok} for c, ok in rows]
    best = tune_threshold(records, 0.2)
    assert (best.threshold, best.accepted, best.total) == (0.9, 2, 6)
    assert best.risk == 0.0 and best.coverage == pytest.approx(2 / 6)
    best = tune_threshold(records, 0.25)
    assert (best.threshold, best.accepted, best.risk) == (0.8, 4, 0.25)
    best = tune_threshold(records, 1.0)
    assert (best.threshold, best.coverage) == (0.6, 1.0)
    none = tune_threshold([{"input": 0.9, "correct": False}], 0.0)
    assert none.threshold is None and none.coverage == 0.0


def test_tune_threshold_meets_the_target_with_maximum_coverage() -> None:
    rng = random.Random(7)
    records = []
    for _ in range(300):
        probs = [rng.random() for _ in range(3)]
        probs = [x / sum(probs) for x in probs]
        label = max(range(3), key=lambda j: probs[j]) if rng.random() < max(probs) else rng.randrange(3)
        records.append({"input": probs, "label": label})
    target = 0.15
    best = tune_threshold(records, target)
    assert best.threshold is not None

    def outcome(t: float) -> tuple[int, int]:
        acc = [r for r in records if max(r["input"]) >= t]
        wrong = sum(1 for r in acc if max(range(3), key=lambda j: r["input"][j]) != r["label"])
        return len(acc), wrong

    n, wrong = outcome(best.threshold)
    assert n == best.accepted and wrong / n <= target
    for t in sorted({max(r["input"]) for r in records}):  # no lower threshold meets the target
        if t < best.threshold:
            n2, w2 = outcome(t)
            assert w2 / n2 > target
    # Applying the chosen threshold offline accepts exactly that coverage.
    counts = replay(records, ConfidenceThreshold(best.threshold)).counts
    assert counts.get("accept", 0) == best.accepted


def test_tune_threshold_errors() -> None:
    with pytest.raises(cascada.ConfigurationError, match="target_risk"):
        tune_threshold([{"input": 0.5, "correct": True}], 1.5)
    with pytest.raises(StageInputError, match="no records"):
        tune_threshold([], 0.1)
    with pytest.raises(StageInputError, match="record 1 has neither 'correct' nor 'label'"):
        tune_threshold([{"input": 0.5, "correct": True}, {"input": 0.7}], 0.1)


# -- the Router actor -----------------------------------------------------------------------------------------


async def test_router_actor_routes_records_and_overrides() -> None:
    async with cascada.ActorSystem() as system:
        router = await system.spawn(Router, ConfidenceThreshold(0.8, accept="cheap", escalate="big"),
                                    lambda item: item["probs"], edges=["cheap", "big", "human"], record=True,
                                    placement="local")
        assert await router.ask("route", {"probs": [0.1, 0.9]}) == [["cheap", 1.0]]
        assert await router.ask("route", {"probs": [0.4, 0.6]}, note={"label": 0}) == [["big", 1.0]]
        assert await router.ask("route", {"probs": [0.4, 0.6]}, [["human", 1.0]]) == [["human", 1.0]]
        with pytest.raises(RoutingError, match="nowhere"):
            await router.ask("route", {"probs": [0.5, 0.5]}, [["nowhere", 1.0]])
        assert await router.ask("annotate", 0, {"correct": True})
        recs = await router.ask("records")
        assert [r["decision"] for r in recs] == [[["cheap", 1.0]], [["big", 1.0]], [["human", 1.0]]]
        assert recs[0]["input"] == [0.1, 0.9] and recs[0]["correct"] is True
        assert recs[1]["label"] == 0 and recs[2]["override"] is True
        stats = await router.ask("stats")
        assert stats["decisions"] == 3 and stats["overrides"] == 1
        assert stats["chosen"] == {"cheap": 1, "big": 1, "human": 1}


async def test_router_refuses_a_policy_that_can_choose_an_unknown_edge() -> None:
    async with cascada.ActorSystem() as system:
        with pytest.raises(cascada.ActorInitFailed, match="not among the router's edges"):
            await system.spawn(Router, ConfidenceThreshold(0.5), edges=["accept"], placement="local")


async def test_router_gate_and_least_loaded_release() -> None:
    async with cascada.ActorSystem() as system:
        gate = await system.spawn(Router, TopK(2, 4), record=True, placement="local")
        out = await gate.ask("gate", [1.0, 2.0, 3.0, 0.0])
        assert [e for e, _ in out["choices"]] == ["expert_2", "expert_1"]
        assert sum(out["probs"]) == pytest.approx(1.0)
        assert (await gate.ask("records"))[0]["probs"] == out["probs"]
        lb = await system.spawn(Router, LeastLoaded(["r0", "r1"]), placement="local")
        assert [(await lb.ask("route", None))[0][0] for _ in range(3)] == ["r0", "r1", "r0"]
        await lb.ask("release", "r0")
        await lb.ask("release", "r0")
        assert (await lb.ask("stats"))["in_flight"] == {"r0": 0, "r1": 1}
        with pytest.raises(StageInputError, match="does not track load"):
            await gate.ask("release", "expert_0")


async def test_router_in_its_own_process_records_to_jsonl(tmp_path: Any) -> None:
    path = tmp_path / "router.jsonl"
    async with cascada.ActorSystem() as system:
        router = await system.spawn(Router, Window(0.1), lambda x: x[1], record_path=str(path),
                                    placement="process")
        for p in (0.55, 0.9, 0.1, 0.48):
            await router.ask("route", [1 - p, p])
        assert (await router.ask("stats"))["chosen"] == {"accept": 2, "escalate": 2}
        await system.stop(router)
    recs = Recorder.load(path)
    assert [r["decision"][0][0] for r in recs] == ["escalate", "accept", "accept", "escalate"]
    assert [r["input"] for r in recs] == [0.55, 0.9, 0.1, 0.48]
    # Say the cheap tier was right exactly on the confident two: a window of width 0.4
    # escalates everything else, and no narrower one keeps the risk at 0.
    tuned = tune_threshold([{**r, "correct": abs(r["input"] - 0.5) > 0.3} for r in recs], 0.0,
                           score=Window(0.0).distance)
    assert tuned.threshold == pytest.approx(0.4) and tuned.accepted == 2
    assert all(json.loads(line) for line in path.read_text().splitlines())
