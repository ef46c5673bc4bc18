"""The runnable workloads through real actor processes, small and fast: F1 (the digits
cascade), F2 (speculative decoding equals target-only greedy), F3 (MoE dispatch exact against
the reference, drops as the reference's), and ``cascada run`` on topology files and its
error exits. Behaviour only: no timing asserts."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

torch = pytest.importorskip("torch")

from cascada import _cli  # noqa: E402
from cascada.workloads import run_f1, run_f2, run_f3  # noqa: E402

TOPOLOGY = pathlib.Path(run_f1.__file__).parent / "topologies" / "f1_two_tier.toml"


async def test_f1_cascade_through_the_actors_matches_the_offline_cascade() -> None:
    f = await run_f1.run_async(300, progress=False)
    c = f["cascade"]
    assert f["requests"] == 300
    assert abs(sum(c["fraction_per_tier"]) - 1.0) < 1e-5
    assert c["fraction_per_tier"][0] > 0  # the cheap tier answers some items
    # The live cascade's exits and answers are the offline cascade's on the recorded outputs.
    assert f["offline_agreement"]["agree"] == 300
    assert 0 < c["macs_ratio"] < 1 and f["big"]["macs_per_item"] == f["tier_macs"][-1]
    assert c["accuracy"] > 0.8 and f["big"]["accuracy"] > 0.8
    # Every tier and verifier is its own process, none of them the driver.
    pids = [a["pid"] for a in f["actors"]]
    assert len(set(pids)) == len(pids) == 8 and os.getpid() not in pids
    handled = {a["name"]: a["handled"] for a in f["actors"]}
    assert handled["verifier0"] >= 300  # every item was checked after tier 0
    assert [p["threshold"] for p in f["curve"]] == list(run_f1.SWEEP)
    assert f["curve"][0]["macs_ratio"] <= f["curve"][-1]["macs_ratio"]


async def test_f2_greedy_speculative_output_equals_target_only() -> None:
    f = await run_f2.run_async(1, max_new=16, progress=False)
    assert f["greedy_identical"] and f["greedy_mismatched_prompts"] == []
    g = f["greedy"]
    assert g["tokens"] == 16 and g["rounds"] >= 4  # k=4: at most 5 tokens per round
    assert all(r is None or 0.0 <= r <= 1.0 for r in g["position_rates"])
    assert 0 < g["offered_at"][0] <= g["rounds"]
    assert f["sample"]["tokens"] == 16 and f["cost_ratio_c"] > 0
    assert f["baseline"] == "target Decoder with KV cache" and f["greedy"]["target_only_tokens_per_s"] > 0
    assert f["target_sessions"]["opened"] == 2  # one KV session per speculative run
    assert len({a["pid"] for a in f["actors"]} | {os.getpid()}) == 4  # draft, target, KV target, driver


async def test_f3_dispatch_is_exact_and_drops_like_the_reference() -> None:
    f = await run_f3.run_async(512, batch=128, progress=False)
    runs = f["runs"]
    assert f["exact"] and runs["dropless"]["max_abs_diff"] < 1e-5
    assert runs["dropless"]["dropped"] == 0
    assert runs["capacity 1.0"]["dropped"] == runs["capacity 1.0"]["reference_dropped"] > 0
    assert runs["capacity 1.25"]["dropped"] == runs["capacity 1.25"]["reference_dropped"]
    assert runs["capacity 1.25"]["dropped"] <= runs["capacity 1.0"]["dropped"]
    assert runs["capacity 1.0"]["capacity_per_batch"] == 64  # ceil(1.0 * 128 * 2 / 4)
    assert f["drops_match_reference"] and f["distinct_processes"] == 6


def test_cascada_run_on_a_topology_file(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "topo.json"
    assert _cli.main(["run", str(TOPOLOGY), "--requests", "60", "--no-progress", "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    assert f["requests"] == f["ok"] == 60 and f["errors"] == {}
    assert sum(f["answered_per_tier"].values()) == 60
    assert {a["name"] for a in f["actors"]} == {"small", "big", "check", "digits"}


@pytest.mark.parametrize("body, why", [
    ("x = [", "not a readable TOML"),
    ('top = "a"\n[actors.a]\nclass = "cascada.stages:Expert"\n', "needs a [run] table"),
    ('[run]\nsource = "cascada.workloads.run_f1:test_items"\nbogus = 1\n[actors.a]\nclass = "x:Y"\n', "run.bogus"),
    ('[run]\nsource = "cascada.workloads.run_f1:test_items"\n[actors.a]\nclass = "no.such.module:Thing"\n',
     "cannot import"),
])
def test_a_bad_topology_file_is_one_line_and_exit_2(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
                                                   body: str, why: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    assert _cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err


def test_unknown_names_and_bad_counts_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["run", "f9"]) == 2
    assert "unknown topology 'f9'" in capsys.readouterr().err
    assert _cli.main(["run", "no-such-file.toml"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert _cli.main(["run", "f1", "--requests", "0"]) == 2
    assert _cli.main(["run", "f1", "--source", "nope"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
