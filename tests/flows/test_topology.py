"""Flow graphs built from a topology description: a dict, a TOML file, and the bad inputs
(each a ConfigurationError naming the offending key)."""

from __future__ import annotations

import copy
import pathlib
import sys
from typing import Any

import pytest

import cascada
from cascada._topology import Topology, build_topology, load_topology
from cascada.actors._flow import FlowDepthExceeded, StageFailed, ask_flow

SPEC: dict[str, Any] = {
    "top": "answer",
    "actors": {
        "cheap": {"class": "flows.flowkit:Leaf", "args": [1]},
        "big": {"class": "flows.flowkit:Leaf", "kwargs": {"k": 10}},
    },
    "flows": {
        "pre": {"kind": "sequence", "steps": ["cheap.add", {"call": "flows.flowkit:halve", "name": "halve"}],
                "placement": "local"},
        "answer": {"kind": "cascade", "tiers": ["pre", {"step": "big.priced", "take": "value"}],
                   "verifier": {"call": "flows.flowkit:is_big"}, "max_escalations": 1},
        "countdown": {"kind": "route", "router": {"call": "flows.flowkit:countdown"},
                      "edges": {"again": [{"call": "flows.flowkit:minus_one"}, "self"], "done": "cheap.where"},
                      "max_depth": 3, "placement": "local"},
        "fan": {"kind": "fanout", "worker": "cheap.add", "split": {"call": "flows.flowkit:halves"},
                "combine": "results", "placement": "local"},
    },
}

TOML = """
top = "answer"

[actors.cheap]
class = "flows.flowkit:Leaf"
args = [1]

[actors.big]
class = "flows.flowkit:Leaf"
kwargs = { k = 10 }

[flows.pre]
kind = "sequence"
steps = ["cheap.add", { call = "flows.flowkit:halve", name = "halve" }]
placement = "local"

[flows.answer]
kind = "cascade"
tiers = ["pre", { step = "big.priced", take = "value" }]
verifier = { call = "flows.flowkit:is_big" }
max_escalations = 1

[flows.countdown]
kind = "route"
router = { call = "flows.flowkit:countdown" }
edges = { again = [{ call = "flows.flowkit:minus_one" }, "self"], done = "cheap.where" }
max_depth = 3
placement = "local"
"""


async def _check(built: Topology, prefix: str = "") -> None:
    assert built.top == built.refs["answer"] and built["cheap"].name == f"{prefix}cheap"
    assert built.order.index("cheap") < built.order.index("pre") < built.order.index("answer")
    assert await built.top.ask("run", 39) == {"value": 20.0, "tier": 0, "tier_name": f"{prefix}pre", "accepted": True,
                                              "escalations": 0, "exhausted": None, "cost": 0.0}
    out = await built.top.ask("run", 1)
    assert (out["tier_name"], out["value"]) == (f"{prefix}big", 10)
    seen = await built["countdown"].ask("run", 2)
    assert seen["path"] == [f"{prefix}countdown"] * 3 + [f"{prefix}cheap"]
    with pytest.raises(FlowDepthExceeded):
        await ask_flow(built["countdown"], 3)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is 3.11+")
async def test_a_topology_builds_from_a_dict_and_from_a_toml_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cascade.toml"
    path.write_text(TOML)
    spec = copy.deepcopy(SPEC)
    del spec["flows"]["fan"]
    assert load_topology(path).names == load_topology(spec).names
    async with cascada.ActorSystem() as system:
        built = await build_topology(system, SPEC)
        await _check(built)
        assert await built["fan"].ask("run", [2, 4]) == [2, 3]  # halve as the split, then +1 per part
        again = await build_topology(system, path, prefix="t-")
        assert again.top.name == "t-answer"
        await _check(again, "t-")
        # A stage failing inside a built flow surfaces with the path under its actor names.
        with pytest.raises(StageFailed) as info:
            await ask_flow(again.top, "text")
        assert info.value.path[:2] == ("t-answer[t-pre]", "t-pre[t-cheap]")


async def test_a_failed_build_stops_what_it_spawned() -> None:
    spec = {"actors": {"ok": {"class": "flows.flowkit:Leaf"}, "broken": {"class": "flows.flowkit:Broken"}},
            "flows": {"top": {"kind": "sequence", "steps": ["ok.add", "broken"]}}}
    async with cascada.ActorSystem() as system:
        with pytest.raises(cascada.ActorInitFailed, match="broken on purpose"):
            await build_topology(system, spec)
        assert system.actors == []


def _spec(**changes: Any) -> dict[str, Any]:
    """SPEC with changes given as dotted keys ("flows.pre.kind": "bogus"; None deletes)."""
    spec = copy.deepcopy(SPEC)
    for dotted, value in changes.items():
        *parents, last = dotted.split("/")
        node = spec
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return spec


BAD: list[tuple[dict[str, Any], str]] = [
    (_spec(actor={}), "topology: actor: unknown key"),
    (_spec(**{"actors/cheap/class": None}), "actors.cheap.class: missing"),
    (_spec(**{"actors/cheap/class": "flows.nowhere:Leaf"}), "actors.cheap.class: cannot import"),
    (_spec(**{"actors/cheap/class": "flows.flowkit:halve"}), "not a subclass of cascada.Actor"),
    (_spec(**{"actors/cheap/class": "Leaf"}), "not an import path"),
    (_spec(**{"actors/cheap/placment": "local"}), "actors.cheap.placment: unknown key"),
    (_spec(**{"actors/cheap/placement": "gpu"}), "actors.cheap.placement: must be"),
    (_spec(**{"actors/cheap/args": 1}), "actors.cheap.args: must be a list"),
    (_spec(**{"actors/cheap/args": [{"ref": "nobody"}]}), r"actors.cheap.args\[0\]: unknown name 'nobody'"),
    (_spec(**{"actors/cheap/args": [{"ref": "cheap"}]}), "cannot get its own ref"),
    (_spec(**{"actors/cheap/kwargs": {"k": {"new": "flows.flowkit:Leaf", "argz": []}}}),
     "actors.cheap.kwargs.k.argz: unknown key"),
    (_spec(**{"actors/bad name": {"class": "flows.flowkit:Leaf"}}), "actors.bad name: name 'bad name'"),
    (_spec(**{"actors/self": {"class": "flows.flowkit:Leaf"}}), "'self' is reserved"),
    (_spec(**{"flows/cheap": {"kind": "sequence", "steps": ["big"]}}), "flows.cheap: the name 'cheap' is already"),
    (_spec(**{"flows/pre/kind": "pipeline"}), "flows.pre.kind: 'pipeline' is not a flow kind"),
    (_spec(**{"flows/pre/tiers": ["cheap"]}), "flows.pre.tiers: unknown key for a sequence flow"),
    (_spec(**{"flows/answer/tiers": None}), "flows.answer.tiers: missing"),
    (_spec(**{"flows/pre/steps": []}), "flows.pre.steps: must be a non-empty list"),
    (_spec(**{"flows/pre/steps": ["chep.add"]}), r"flows.pre.steps\[0\]: unknown name 'chep'"),
    (_spec(**{"flows/pre/steps": ["cheap.ad"]}), "has no handler 'ad'"),
    (_spec(**{"flows/pre/steps": ["cheap.ticks"]}), "is a stream handler: add stream = true"),
    (_spec(**{"flows/pre/steps": [{"step": "cheap.add", "stream": True}]}), "not a stream handler"),
    (_spec(**{"flows/pre/steps": [{"step": "cheap.add", "timeout": -1}]}), "timeout must be"),
    (_spec(**{"flows/pre/steps": [{"step": "cheap.add", "retries": 3}]}), r"steps\[0\].retries: unknown step option"),
    (_spec(**{"flows/pre/steps": [{"call": "flows.flowkit:halve", "step": "cheap"}]}), "a step table has step"),
    (_spec(**{"flows/pre/steps": [42]}), r"flows.pre.steps\[0\]: a step is"),
    (_spec(**{"flows/fan/worker": None}), "either worker = step or workers"),
    (_spec(**{"flows/fan/on_error": "ignore"}), "flows.fan: FanOut: on_error must be one of"),
    (_spec(**{"flows/countdown/max_depth": 0}), "flows.countdown: Route: max_depth"),
    (_spec(**{"flows/a": {"kind": "sequence", "steps": ["b"]}, "flows/b": {"kind": "sequence", "steps": ["a"]}}),
     r"flows.a \(a -> b -> a\): a cycle"),
    (_spec(top="nobody"), "top: unknown name 'nobody'"),
    (_spec(top=None), "top: cannot tell which is the top"),
    ({}, "nothing to build"),
    ({"flows": []}, "flows: must be a table"),
]


@pytest.mark.parametrize("spec, why", BAD, ids=[why[:40] for _, why in BAD])
def test_bad_topologies_are_refused_naming_the_key(spec: dict[str, Any], why: str) -> None:
    with pytest.raises(cascada.ConfigurationError, match=why):
        load_topology(spec)


def test_bad_toml_files_are_refused(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(cascada.ConfigurationError, match="cannot read"):
        load_topology(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[flows.a\nkind = 1")
    if sys.version_info >= (3, 11):
        with pytest.raises(cascada.ConfigurationError, match="not valid TOML"):
            load_topology(broken)
    import cascada._topology as topology

    class Py310:
        version_info = (3, 10, 14)

    monkeypatch.setattr(topology, "sys", Py310)
    with pytest.raises(cascada.ConfigurationError, match=r"needs Python 3.11\+ \(tomllib\)"):
        load_topology(broken)
    assert load_topology(SPEC).top == "answer"  # dicts work everywhere
