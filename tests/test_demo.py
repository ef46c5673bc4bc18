"""The README's main command runs this demo: a small run of it must work and add up."""

from __future__ import annotations

import json
import os
import pathlib

from cascada import _demo


def test_demo_runs_across_processes_and_its_figures_add_up(tmp_path: pathlib.Path, capsys: object) -> None:
    out = tmp_path / "figures.json"
    assert _demo.main(requests=150, json_path=str(out)) == 0
    f = json.loads(out.read_text())
    assert f["requests"] == 150
    assert f["cheap"] + f["escalated"] == 150
    assert 0 < f["cheap_fraction"] < 1  # both tiers answer some documents
    assert f["distinct_processes"] == 5  # the driver and four actor processes
    pids = {a["pid"] for a in f["actors"]}
    assert len(pids) == 4 and os.getpid() not in pids
    handled = {a["name"]: a["handled"] for a in f["actors"]}
    assert handled["cheap"] == handled["verifier"] == 150
    assert handled["big"] == f["escalated"]
    assert f["throughput_docs_per_s"] > 0 and f["latency_ms"]["p95"] >= f["latency_ms"]["p50"] > 0


def test_demo_refuses_a_bad_request_count() -> None:
    assert _demo.main(requests=0) == 2
