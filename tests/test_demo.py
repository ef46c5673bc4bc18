"""The README's main command: ``cascada demo`` runs F1 (the digits cascade) across processes;
the old text cascade stays available as ``cascada run text``."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from cascada import _cli, _demo


def test_demo_command_runs_f1_across_processes(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "f1.json"
    assert _cli.main(["demo", "--requests", "120", "--no-progress", "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    assert f["workload"] == "f1 digits-cascade" and f["requests"] == 120
    assert abs(sum(f["cascade"]["fraction_per_tier"]) - 1.0) < 1e-5
    assert f["offline_agreement"]["agree"] == 120  # live decisions equal the offline cascade
    pids = {a["pid"] for a in f["actors"]}
    assert len(pids) == len(f["actors"]) and os.getpid() not in pids
    printed = capsys.readouterr().out
    assert "seed shape" in printed and "always big" in printed


def test_text_cascade_runs_across_processes_and_its_figures_add_up(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "figures.json"
    assert _cli.main(["run", "text", "--requests", "150", "--json", str(out)]) == 0
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


def test_text_cascade_refuses_a_bad_request_count() -> None:
    assert _demo.main(requests=0) == 2
