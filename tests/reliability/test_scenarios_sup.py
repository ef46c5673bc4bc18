"""Supervision and liveness scenarios (RELIABILITY.md R01 with a restart, R03, R04, R07, R08,
R13): OTP supervision, heartbeats, fencing and restarts on the same endpoint, against real
actor processes.

The bodies live in reliability/scenarios_sup.py, shared with scripts/reliability.py; each
returns its part (c) record and the expectations it broke, and these tests assert there are
none. Heartbeats run at H = 0.1 s x L = 10 (1 s to a death declaration): tighter settings give
false deaths on the loaded 2-core machines. A scenario that shows a gap in the runtime is
marked xfail with the reason and a reproduction; strict where the failure is deterministic,
so that the mark must go when the runtime is fixed. Set CASCADA_RELIABILITY_RECORDS=path to
append every record to a JSON-lines file."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable
from typing import Any

import pytest

from reliability import scenarios_sup as S
from reliability.harness import Outcome, jsonable

SOAK = pytest.mark.skipif(not os.environ.get("CASCADA_SOAK"), reason="soak: set CASCADA_SOAK=1")

MONITOR_WEDGE = (
    "a node's zmq context wedged: its I/O thread blocked sending a monitor event to a monitor "
    "socket that was already closed (libzmq #3575), so it accepts, sends and reconnects "
    "nothing. Peers now disable monitoring before closing (d70b6b2); a wedge again is a "
    "regression (check Peer._close_sockets and any other socket with a monitor)."
)


async def _check(scenario: Awaitable[Outcome], record_property: Any, budget: float = 30.0) -> None:
    """Run a scenario within its budget (well under the pytest timeout: a timeout that fires
    inside the event loop can be swallowed by it and leave the test hanging), record it, and
    assert it broke no expectation. A node that stopped answering anything (the scenarios
    probe for it at the end) is reported as that, first."""
    try:
        outcome = await asyncio.wait_for(scenario, budget)
    except asyncio.TimeoutError:
        pytest.fail(f"the scenario ran past its {budget:g}s budget (a hang)")
    record = jsonable(outcome.record)
    record_property("reliability_record", json.dumps(record))
    path = os.environ.get("CASCADA_RELIABILITY_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    wedged = outcome.record["figures"].get("wedged_nodes")
    if wedged:
        pytest.fail(f"{wedged}: {MONITOR_WEDGE} Violations: {'; '.join(outcome.violations)}")
    outcome.assert_ok()


# -- R01 ----------------------------------------------------------------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("n", [1, 10, 100])
async def test_r01_kill9_with_calls_in_flight_is_restarted_once(n: int, record_property: Any) -> None:
    """SIGKILL the expert (pid from the supervisor) holding n calls sent through the router:
    every call ends ActorDied within H*L + the restart time; one_for_one restarts only the
    expert, once; the first call after the restart succeeds, from the new incarnation."""
    await _check(S.r01_kill9_with_restart(n), record_property)


# -- R03 ----------------------------------------------------------------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("placement", ["local", "process"])
async def test_r03_crash_loop_escalates_after_exactly_the_intensity(placement: Any, record_property: Any) -> None:
    """The decoder raises in __init__ on every restart, intensity 3 in 5 s: exactly 3 failed
    restarts, one RestartIntensityExceeded(chain, decoder, 3, 5.0), children stopped, callers
    get ActorDied at once; the supervisor's process uses little CPU and none after."""
    await _check(S.r03_crash_loop(placement), record_property)


@pytest.mark.timeout(40)
async def test_r03_shutdown_during_a_process_restart_loop_is_bounded(record_property: Any) -> None:
    """The decoder process fails to start (0.1 s each) with the intensity out of reach; a
    shutdown issued during the loop ends within 3 x stop_timeout + 1 s and stops the loop."""
    await _check(S.r03_shutdown_during_loop("process"), record_property)


@pytest.mark.timeout(40)
async def test_r03_shutdown_during_a_local_restart_loop_is_bounded(record_property: Any) -> None:
    await _check(S.r03_shutdown_during_loop("local", delay=0.002), record_property)


@pytest.mark.timeout(40)
async def test_r03_a_large_intensity_still_escalates(record_property: Any) -> None:
    """Intensity 1500 in 600 s, a local decoder failing in __init__: one escalation with count
    1500 after 1500 failed starts, and the event loop keeps turning (the restart loop once
    recursed and died of RecursionError at ~984)."""
    await _check(S.r03_high_intensity("local"), record_property)


@pytest.mark.soak
@SOAK
@pytest.mark.timeout(300)
async def test_r03_high_intensity_process_soak(record_property: Any) -> None:
    await _check(S.r03_high_intensity("process", intensity=1100), record_property, budget=250)


# -- R04 ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all", "rest_for_one"])
async def test_r04_strategy_restart_type_exit_kind_matrix(strategy: str, record_property: Any) -> None:
    """For each restart type of the expert (others permanent) and exit kind (SIGTERM: drains,
    exit 0; SIGKILL): the children restarted and removed are OTP's, stopped in reverse order
    and started in order (supervisor events and the actors' own on_stop/on_start)."""
    await _check(S.r04_matrix([strategy]), record_property, budget=45)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
async def test_r04_a_temporary_sibling_is_not_restarted(strategy: str, record_property: Any) -> None:
    await _check(S.r04_temporary_sibling(strategy), record_property)


# -- R07 ----------------------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_r07_sigstopped_expert_is_detected_fenced_and_replaced(record_property: Any) -> None:
    """SIGSTOP the expert for 5 x H*L: declared unresponsive within H*L +- a beat, SIGKILLed
    before its replacement starts (SIGCONT finds no process), its held and queued calls end
    ActorDied, nothing from it is delivered, the others keep their pids."""
    await _check(S.r07_sigstop(), record_property)


@pytest.mark.timeout(40)
async def test_r07_short_stop_causes_no_false_death(record_property: Any) -> None:
    """SIGSTOP for H*L/3 then SIGCONT: no death declared, same process, every call held or
    queued across the stop is answered."""
    await _check(S.r07_sigstop(early_cont=True), record_property)


@pytest.mark.timeout(60)
async def test_r07_default_heartbeats_give_no_false_positives_under_load(record_property: Any) -> None:
    """Default heartbeat settings, 10 s of 4 CPU-burning actor processes (threads plus a busy
    handler) and a busy driver on this machine's cores: no death declared, no restart; the
    record has the longest silence seen and which shorter timeouts would have fired."""
    await _check(S.r07_false_positives(10.0), record_property, budget=45)


@pytest.mark.soak
@SOAK
@pytest.mark.timeout(600)
@pytest.mark.parametrize("interval,liveness", [(None, None), (0.1, 10), (0.1, 3)],
                         ids=["defaults", "H0.1xL10", "H0.1xL3"])
async def test_r07_false_positives_under_load_soak(interval: Any, liveness: Any, record_property: Any) -> None:
    await _check(S.r07_false_positives(60.0, interval=interval, liveness=liveness), record_property, budget=540)


# -- R08 ----------------------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_r08_blocked_event_loop_is_declared_unresponsive(record_property: Any) -> None:
    """A handler in time.sleep(10): the process stays alive but stops beating; declared within
    H*L +- a beat, killed and replaced; the stalled call and one queued behind it end ActorDied."""
    await _check(S.r08_blocked_loop(), record_property)


@pytest.mark.timeout(40)
async def test_r08_without_heartbeats_a_blocked_loop_goes_unnoticed(record_property: Any) -> None:
    """heartbeat_interval=None and the same stall (3 s here): nothing is declared, the call
    returns after the whole stall from the same process."""
    await _check(S.r08_blocked_loop(heartbeats=False, stall_s=3.0), record_property)


# -- R13 ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.xfail(strict=False, reason=(
    "open, intermittent (about 1 run in 3, ipc and tcp): incarnation fencing compares a reply's "
    "incarnation with the one the caller's peer believes current, so around a restart (a) a "
    "request sent while the caller still saw the old incarnation can run on the new one and its "
    "reply be delivered (seen: ~2 of ~340 direct replies from the incarnation after the one "
    "current at send), and (b) the router's peer, not yet told of the restart (peer.update) but "
    "already reconnected by zmq, drops the new incarnation's replies as stale: the work ran, the "
    "call waits out its deadline (seen: router stale_replies == 2 == the DeadlineExceeded count, "
    "one 'reconnect' of ~4.95 s = the 5 s call timeout). Fix to come: stamp requests with the "
    "incarnation the caller expects and have the receiver refuse (ActorDied, not run) a request "
    "for another one."))
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
async def test_r13_ten_restarts_on_the_same_endpoint(transport: Any, record_property: Any) -> None:
    """Kill the decoder 10 times while clients call it directly and through the router: every
    answer is to its own request and from the incarnation current when it was sent (or one
    current while it was pending, through the router); only ActorDied otherwise; each
    reconnect is quick; the driver's and the router's fds do not grow."""
    await _check(S.r13_restarts_same_endpoint(transport), record_property, budget=45)


@pytest.mark.timeout(40)
async def test_r13_dropping_a_reconnecting_peer_keeps_the_node_working(record_property: Any) -> None:
    """The node drops (mark_dead) peers to an endpoint nobody listens on while libzmq retries
    the connect, 4 at a time for up to 400 rounds; a new actor can still start after each 20."""
    await _check(S.r13_dropping_reconnecting_peers("tcp"), record_property)
