"""Reliability scenarios that need no supervisor and no heartbeat (RELIABILITY.md part b).

The bodies live in reliability/scenarios.py, shared with scripts/reliability.py; each returns
its part (c) record and the expectations it broke, and these tests assert there are none.
Set CASCADA_RELIABILITY_RECORDS=path to append every record to a JSON-lines file.

R20-R22 (malformed frames, bombs, hostile envelopes) are covered by tests/test_process.py,
tests/test_wire.py, tests/test_tensor_units.py and tests/test_fuzz_decode.py; only R23's
runtime canary is here."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from reliability import scenarios as S
from reliability.harness import Outcome, jsonable


def _check(outcome: Outcome, record_property: Any) -> None:
    record = jsonable(outcome.record)
    record_property("reliability_record", json.dumps(record))
    path = os.environ.get("CASCADA_RELIABILITY_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    outcome.assert_ok()


# -- Group A: process faults --------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("n", [1, 10, 100])
async def test_r01_kill9_with_calls_in_flight(n: int, record_property: Any) -> None:
    """Every in-flight call ends ActorDied (indeterminate), fast, none hangs or is untyped;
    later calls fail at once; the other actors keep their pids and serve."""
    _check(await S.r01_kill9_inflight(n), record_property)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("placement", ["process", "local"])
@pytest.mark.parametrize("kind", ["import", "constructor", "on_start"])
async def test_r05_failure_while_starting(kind: str, placement: Any, record_property: Any) -> None:
    """ActorInitFailed with the remote traceback; no process, socket file or restart left;
    the name can be used again."""
    _check(await S.r05_init_failure(kind, placement), record_property)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["stop", "shutdown"])
async def test_r06_child_ignoring_sigterm_is_killed_in_time(how: str, record_property: Any) -> None:
    """stop_timeout=1: a child blocking its loop with SIGTERM ignored is gone within
    3 x stop_timeout + 1 s, killed by SIGKILL; the rest stop cleanly."""
    _check(await S.r06_stubborn_child(how), record_property)


@pytest.mark.timeout(60)
async def test_r09_driver_sigkill_leaves_no_orphans_or_segments(record_property: Any) -> None:
    """SIGKILL the driver: its forkserver and actors exit within 5 s; a new system removes the
    dead actors' shm pool segments and the driver's ipc directory."""
    _check(await S.r09_driver_killed(), record_property)


# -- Group B: transport -------------------------------------------------------------------


@pytest.mark.timeout(45)
async def test_r14_flood_into_slow_consumer(record_property: Any) -> None:
    """3 s of 1 KiB tells into a 5 ms/message consumer (mailbox 16, hwm 16): tell waits,
    every sequence number arrives once and in order, the queue stays bounded, RSS flat."""
    _check(await S.r14_flood(seconds=3.0, size=1024, per_message=0.005), record_property)


@pytest.mark.timeout(45)
async def test_r14_flood_of_1mib_tensors_stays_in_budget(record_property: Any) -> None:
    """Same flood with 1 MiB numpy arrays (shm pool path) for 2 s at 10 ms/message: RSS of
    both sides stays under baseline + the pool's bound (32 MiB) + 64 MiB."""
    _check(await S.r14_flood(seconds=2.0, size=1 << 20, per_message=0.010), record_property)


@pytest.mark.timeout(30)
async def test_r14_messages_batched_in_one_tick_all_arrive(record_property: Any) -> None:
    """10 tells then 10 concurrent asks of 300 KiB each (each under the 1 MiB header cap):
    every tell arrives and every ask is answered."""
    _check(await S.r14_batch_within_header_limit(), record_property)


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("CASCADA_SOAK"), reason="soak")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("size", [
    pytest.param(1024, id="1KiB"),
    pytest.param(1 << 20, id="1MiB"),
])
async def test_r14_soak_60s(size: int, record_property: Any) -> None:
    """R14 at full length: 60 s of flood at 10 ms/message."""
    _check(await S.r14_flood(seconds=60.0, size=size, per_message=0.010), record_property)


@pytest.mark.timeout(30)
async def test_r16a_last_messages_before_exit_arrive(record_property: Any) -> None:
    """An actor's last tells (the end of a handler, and in on_stop) arrive although it is
    stopped, or drained by SIGTERM, right after sending them."""
    _check(await S.r16a_last_message(), record_property)


@pytest.mark.timeout(30)
async def test_r16b_shutdown_with_a_sigstopped_peer(record_property: Any) -> None:
    """shutdown() with one actor SIGSTOPped ends within 3 x stop_timeout + 1 s; the call
    pending on it ends with a typed error; nothing is left."""
    _check(await S.r16b_shutdown_with_stopped_peer(), record_property)


@pytest.mark.timeout(30)
async def test_r19_actors_are_not_forked_from_a_process_with_zmq(record_property: Any) -> None:
    """Actor processes come from an exec'd forkserver (no eventfd, no zmq socket), never a
    fork of the driver, and share none of its sockets."""
    _check(await S.r19_no_fork_after_zmq(), record_property)


# -- Group C: hostile input ---------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_r23_pickle_canary_never_runs(record_property: Any) -> None:
    """Pickles that would create a file, as a raw frame, batch, bin field, ext payload (codes
    1, 2, 3, 99), message body and out-of-band frame: no file, the actor keeps serving."""
    _check(await S.r23_pickle_canary(), record_property)
