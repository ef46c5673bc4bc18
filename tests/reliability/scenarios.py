"""Scenario bodies of RELIABILITY.md part (b) that need no supervisor and no heartbeats.

Each scenario is a coroutine that runs the fault, checks what the contract expects, and
returns an :class:`Outcome`: its part (c) record and the expectations it broke. pytest
(tests/reliability/test_scenarios.py) asserts there are none; scripts/reliability.py prints
the records as JSON.

Bounds used here, and where they come from:

- ``DEATH_DETECT_S`` (2 s): README, "Errors": calls pending on a SIGKILLed actor fail with
  ActorDied "as soon as the connection drops (tested: under two seconds)". There is no
  heartbeat yet, so no H·L bound applies.
- Stopping an actor that ignores everything costs up to three ``stop_timeout``s: the stop
  request, the wait before SIGTERM, the wait before SIGKILL (ActorSystem.stop and _reap).
  RELIABILITY.md asks for shutdown within the sum of the timeouts + 1 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import msgpack
import zmq

import cascada
from cascada.actors._system import describe_exit
from cascada.transport import Codec, Kind
from reliability.actors import (
    Bystander,
    Consumer,
    CtorFails,
    ImportFails,
    LastWords,
    Napper,
    Producer,
    Sink,
    StartFails,
    Stubborn,
)
from reliability.harness import (
    FAIL,
    History,
    Nemesis,
    Outcome,
    Resources,
    check_fifo,
    check_set,
    descendants,
    ipc_files,
    latency_summary,
    leaks_since,
    max_rss_mib,
    ms,
    new_record,
    percentile,
    ppid_of,
    process_gone,
    shm_segments_of,
    track_family,
    wait_gone,
)

DEATH_DETECT_S = 2.0
HANG_S = 10.0  # a call with no outcome after this long is a hang
STOP_PHASES = 3  # stop request, wait before SIGTERM, wait before SIGKILL


def _stop_bound(stop_timeout: float, stubborn: int = 1) -> float:
    return STOP_PHASES * stop_timeout * stubborn + 1.0


def _finish(out: Outcome, hist: History | None, before: Resources | None) -> Outcome:
    rec = out.record
    if hist is not None:
        rec["errors"] = hist.errors()
        out.expect(rec["errors"]["untyped"] == 0, f"untyped errors: {rec['errors']['untyped']}")
        out.expect(rec["errors"]["hangs"] == 0, f"calls hung: {rec['errors']['hangs']}")
    if before is not None:
        leaks = leaks_since(before)
        rec["leaks_after"] = leaks
        out.expect(not any(leaks[k] for k in ("processes", "fds", "shm_segments", "ipc_files")),
                   f"left behind: {leaks['detail']}")
    return out.finish()


# -- R01 ---------------------------------------------------------------------------------


async def r01_kill9_inflight(n: int) -> Outcome:
    """SIGKILL an actor process holding n calls in flight; no supervisor, so no restart."""
    out = Outcome(new_record("R01", f"in_flight={n}, no restart"))
    rec = out.record
    hist = History()
    before = Resources.take()
    async with cascada.ActorSystem() as system, Nemesis(hist) as nem:
        expert = await system.spawn(Napper, name="expert")
        others = {name: await system.spawn(Bystander, name=name) for name in ("router", "decoder", "verifier")}
        track_family()
        pids_before = {name: ref.pid for name, ref in others.items()}
        baseline = [await hist.call(expert, "ping", i, value=("ping", i), hang_after=HANG_S) for i in range(20)]
        t_calls = time.monotonic()
        calls = [asyncio.ensure_future(hist.call(expert, "nap", 60.0, i, value=i, hang_after=HANG_S))
                 for i in range(n)]
        held = 0
        while time.monotonic() - t_calls < 10.0:
            held = await expert.ask("in_flight", timeout=5)
            if held >= n:
                break
            await asyncio.sleep(0.005)
        out.expect(held == n, f"only {held} of {n} calls reached the handler before the kill")
        t_kill = nem.kill9(expert.pid)
        ops = await asyncio.gather(*calls)
        detect = [op.t_complete - t_kill for op in ops if op.t_complete is not None]
        out.expect(all(op.error_type == "ActorDied" for op in ops),
                   f"in-flight outcomes: {sorted({str(op.error_type) for op in ops})}, want ActorDied only")
        out.expect(all(op.outcome == "info" for op in ops), "an in-flight call was not indeterminate")
        out.expect(max(detect, default=0.0) <= DEATH_DETECT_S,
                   f"detection took {max(detect, default=0.0):.3f}s > {DEATH_DETECT_S}s")
        # Later calls fail fast with ActorDied instead of waiting for a deadline.
        later = [await hist.call(expert, "ping", i, value=("later", i), timeout=30, hang_after=HANG_S)
                 for i in range(3)]
        out.expect(all(op.error_type == "ActorDied" for op in later),
                   f"calls after the death: {[op.error_type for op in later]}, want ActorDied")
        later_max = max(op.latency or 0.0 for op in later)
        out.expect(later_max < 1.0, f"a call after the death took {later_max:.3f}s to fail")
        # Nobody else was touched.
        for name, ref in others.items():
            out.expect(not process_gone(ref.pid), f"{name} (pid {ref.pid}) died with the expert")
            pid = await ref.ask("pid", timeout=10)
            out.expect(pid == pids_before[name], f"{name} pid changed {pids_before[name]} -> {pid}")
        memory = {name: max_rss_mib(ref.pid) for name, ref in others.items()}
    sets = check_set([op for op in ops], {})
    rec["faults"] = nem.faults()
    rec["delivery"] = sets.counts()
    rec["recovery_ms"] = {"detect_p50": ms(percentile(detect, 50)), "detect_max": ms(max(detect, default=None)),
                          "restart_p50": None, "first_ok_after_fault_p95": None,
                          "later_call_fail_max": ms(later_max)}
    base = latency_summary([op.latency for op in baseline if op.outcome == "ok" and op.latency is not None])
    rec["latency_ms"] = {"baseline_p50": base["p50"], "baseline_p99": base["p99"],
                         "fault_p99": ms(percentile(detect, 99))}
    rec["memory"] = {"max_rss_mib": memory, "rss_delta_over_baseline_mib": None}
    rec["figures"] = {"in_flight": n, "held_by_handler": held,
                      "outcomes": {"info": sum(op.outcome == "info" for op in ops),
                                   "fail": sum(op.outcome == FAIL for op in ops),
                                   "ok": sum(op.outcome == "ok" for op in ops)}}
    return _finish(out, hist, before)


# -- R05 ---------------------------------------------------------------------------------

_R05 = {
    "import": (ImportFails, ("ModuleNotFoundError", "cascada_reliability_no_such_module", "__init__")),
    "constructor": (CtorFails, ("RuntimeError", "constructor refused to build the model", "__init__")),
    "on_start": (StartFails, ("LookupError", "on_start could not find its weights", "on_start")),
}


async def r05_init_failure(kind: str, placement: cascada.Placement) -> Outcome:
    """spawn() of an actor whose start fails: typed ActorInitFailed with the remote traceback,
    nothing left running, no restart, and the name is free again."""
    cls, markers = _R05[kind]
    out = Outcome(new_record("R05", f"{kind}, {placement}"))
    rec = out.record
    before = Resources.take()
    me = os.getpid()
    async with cascada.ActorSystem() as system:
        await system.spawn(Bystander, name="router", placement=placement)  # the forkserver is up
        t0 = time.monotonic()
        err: BaseException | None = None
        try:
            await system.spawn(cls, name="decoder", placement=placement)
        except Exception as exc:  # noqa: BLE001 - checked below
            err = exc
        took = time.monotonic() - t0
        out.expect(isinstance(err, cascada.ActorInitFailed), f"spawn raised {err!r}, want ActorInitFailed")
        if isinstance(err, cascada.ActorInitFailed):
            out.expect(err.actor == "decoder", f"ActorInitFailed.actor is {err.actor!r}")
            tb = err.remote_traceback or ""
            for marker in markers:
                out.expect(marker in tb, f"remote traceback lacks {marker!r}")
        await asyncio.sleep(0.3)  # a restart storm would show up here
        family = descendants(me)
        grandchildren = [p for p in family if ppid_of(p) in family]  # actors under the forkserver
        want = 1 if placement == "process" else 0
        out.expect(len(grandchildren) == want,
                   f"actor processes after the failure: {grandchildren}, want only the router's")
        if placement == "process":
            ipc_dir = os.path.dirname(system.node.endpoint[len("ipc://"):])
            files = sorted(f for f in os.listdir(ipc_dir) if f != "hb.sock")  # hb.sock: the heartbeat channel
            out.expect(len(files) == 2 and "system.ipc" in files, f"ipc files after the failure: {files}")
        ref = await system.spawn(Bystander, name="decoder", placement=placement)
        out.expect(await ref.ask("ping", 1, timeout=10) == 1, "the name was not free again")
    rec["recovery_ms"] = {"time_to_error": ms(took)}
    rec["figures"] = {"error": type(err).__name__ if err else None, "restarts": 0}
    return _finish(out, None, before)


# -- R06 ---------------------------------------------------------------------------------


async def r06_stubborn_child(how: str, stop_timeout: float = 1.0) -> Outcome:
    """A child that ignores SIGTERM and blocks its loop: stop/shutdown is still bounded."""
    out = Outcome(new_record("R06", f"system.{how}, stop_timeout={stop_timeout}"))
    rec = out.record
    hist = History()
    before = Resources.take()
    system = cascada.ActorSystem(stop_timeout=stop_timeout)
    exit_code: Any = None
    async with system:
        stubborn = await system.spawn(Stubborn, name="expert")
        polite = await system.spawn(Bystander, name="router")
        track_family()
        pids = {"expert": stubborn.pid, "router": polite.pid}
        stall = asyncio.ensure_future(hist.call(stubborn, "stall", 60.0, hang_after=30))
        await asyncio.sleep(0.3)  # the handler is blocking now, SIGTERM ignored
        spawner = getattr(system, "_spawner", None)  # only to report the exit reason
        exited = spawner.exit_future(stubborn.pid) if spawner is not None else None
        t0 = time.monotonic()
        if how == "stop":
            await system.stop(stubborn)
        else:
            await system.shutdown()
        took = time.monotonic() - t0
        bound = _stop_bound(stop_timeout)
        out.expect(took <= bound, f"{how} took {took:.2f}s > {bound:.2f}s")
        op = await stall
        out.expect(op.error_type == "ActorDied", f"the stalled call ended with {op.error_type}")
        if exited is not None and exited.done():
            exit_code = exited.result()
        alive, _ = await wait_gone([pids["expert"]], 1.0)
        out.expect(not alive, f"the stubborn process {pids['expert']} is still there")
        if how == "stop":
            out.expect(await polite.ask("ping", 2, timeout=10) == 2, "the other actor stopped serving")
    alive, _ = await wait_gone(pids.values(), 2.0)
    out.expect(not alive, f"processes left after shutdown: {alive}")
    rec["figures"] = {"shutdown_s": round(took, 3), "bound_s": bound,
                      "exit": describe_exit(exit_code) if isinstance(exit_code, int) else None,
                      "killed": ["expert"], "exited_cleanly": ["router"] if how == "shutdown" else []}
    return _finish(out, hist, before)


# -- R09 ---------------------------------------------------------------------------------

_DRIVER = """\
import asyncio, json, os, sys
import numpy as np
import cascada

class PoolOwner(cascada.Actor):
    async def big(self, n):
        return np.ones(n, dtype=np.uint8)   # over tensor_inline_max: goes through this actor's pool

class Plain(cascada.Actor):
    async def ping(self):
        return os.getpid()

async def main():
    async with cascada.ActorSystem() as s:
        owners = [await s.spawn(PoolOwner, name=f"expert-{i}") for i in range(2)]
        plain = await s.spawn(Plain, name="router")
        held = [await r.ask("big", 2 << 20) for r in owners]
        assert all(h.nbytes == 2 << 20 for h in held)
        await plain.ask("ping")
        print(json.dumps({"pool_owners": [r.pid for r in owners], "plain": plain.pid}), flush=True)
        await asyncio.sleep(120)

cascada.run(main())
"""


async def r09_driver_killed(bound: float = 5.0) -> Outcome:
    """SIGKILL the driver: its forkserver and actors follow (PDEATHSIG); the next system
    sweeps the dead actors' shm segments and the driver's ipc directory."""
    out = Outcome(new_record("R09", "driver SIGKILLed"))
    rec = out.record
    before = Resources.take()
    hist = History()
    workdir = tempfile.mkdtemp(prefix="rel-r09-")
    script = os.path.join(workdir, "driver.py")
    with open(script, "w") as f:
        f.write(_DRIVER)
    driver = await asyncio.create_subprocess_exec(sys.executable, script, stdout=asyncio.subprocess.PIPE)
    try:
        with Nemesis(hist) as nem:
            assert driver.stdout is not None
            line = await asyncio.wait_for(driver.stdout.readline(), 60)
            info = json.loads(line)
            track_family()
            owners: list[int] = info["pool_owners"]
            family = descendants(driver.pid)
            out.expect(set(owners) | {info["plain"]} <= set(family), f"actors {info} not under the driver {family}")
            segs_before = {p: sorted(shm_segments_of(p)) for p in owners}
            out.expect(all(segs_before.values()), f"an actor made no pool segment: {segs_before}")
            stale_dirs = ipc_files(owners=[driver.pid])
            out.expect(stale_dirs, "the driver made no ipc directory")
            t_kill = nem.kill9(driver.pid)
            await asyncio.wait_for(driver.wait(), 10)
            alive, waited = await wait_gone(family, bound)
            t_last = time.monotonic() - t_kill
            await asyncio.wait_for(driver.stdout.read(), 10)  # EOF once the whole family is gone
            out.expect(not alive, f"orphans {alive} still alive {bound}s after the driver's death")
        left_by_dead = sorted(s for p in owners for s in shm_segments_of(p))
        # A new system sweeps what the dead could not remove.
        async with cascada.ActorSystem():
            pass
        segs_after = sorted(s for p in owners for s in shm_segments_of(p))
        out.expect(not segs_after, f"dead actors' shm segments survived a new system: {segs_after}")
        dirs_after = sorted(d for d in stale_dirs if os.path.exists(d))
        out.expect(not dirs_after, f"the dead driver's ipc files survived a new system: {dirs_after}")
    finally:
        if driver.returncode is None:
            driver.kill()
            await driver.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    rec["faults"] = nem.faults()
    rec["recovery_ms"] = {"last_child_exit": ms(t_last), "processes_followed": len(family)}
    rec["figures"] = {"family": len(family), "shm_segments_before_kill": sum(len(v) for v in segs_before.values()),
                      "shm_left_by_dead_before_sweep": len(left_by_dead), "shm_left_after_sweep": len(segs_after),
                      "ipc_files_left_after_sweep": len(dirs_after)}
    return _finish(out, hist, before)


# -- R14 ---------------------------------------------------------------------------------


BATCH_MAX = 64  # transport/_socket.py: messages one batch frame carries


async def r14_flood(seconds: float = 3.0, size: int = 1024, per_message: float = 0.005,
                    mailbox: int = 16, hwm: int = 16, rss_budget_mib: float = 64.0) -> Outcome:
    """A producer tells as fast as it can into a consumer that sleeps per message: the
    producer is pushed back, nothing is lost or reordered, memory stays flat.

    Payloads under 256 KiB are bytes in the header; larger ones are numpy arrays (a header
    is capped at 1 MiB), which go through the producer's shared-memory pool."""
    array = size >= 256 << 10
    out = Outcome(new_record("R14", f"{seconds:g}s, {size} B {'arrays' if array else 'bytes'}, "
                                    f"{per_message * 1000:g} ms/msg, mailbox {mailbox}, hwm {hwm}"))
    rec = out.record
    before = Resources.take()
    # Tensors over tensor_inline_max wait in the producer's shm pool, whose descriptors are
    # a few dozen bytes each: the pool's bound, not hwm, bounds the bytes in flight there.
    pool = 32 << 20
    async with cascada.ActorSystem(mailbox_size=mailbox, hwm=hwm, shm_pool_bytes=pool) as system:
        consumer = await system.spawn(Consumer, per_message, name="decoder")
        producer = await system.spawn(Producer, name="client")
        track_family()
        warm = await producer.ask("flood", consumer, 0, size, timeout=30, array=array, count=20)
        deadline = time.monotonic() + 30
        while (await consumer.ask("progress", timeout=30))["handled"] < warm["sent"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        pids = {"client": producer.pid, "decoder": consumer.pid}
        base = {k: max_rss_mib(p) for k, p in pids.items()}
        t0 = time.monotonic()
        res = await producer.ask("flood", consumer, seconds, size, timeout=seconds + 60, array=array)
        flood_s = time.monotonic() - t0
        at_end = (await consumer.ask("progress", timeout=60))["handled"] - warm["sent"]
        backlog = res["sent"] - at_end
        drain_bound = backlog * per_message * 3 + 10.0
        t1 = time.monotonic()
        handled = at_end
        while handled < res["sent"] and time.monotonic() - t1 < drain_bound:
            await asyncio.sleep(0.05)
            handled = (await consumer.ask("progress", timeout=60))["handled"] - warm["sent"]
        drain_s = time.monotonic() - t1
        seqs = (await consumer.ask("received", timeout=60))[warm["sent"]:]
        stats = await system.stats(consumer)
        peak = {k: max_rss_mib(p) for k, p in pids.items()}
    pair = ("client", "decoder")
    fifo = check_fifo([(pair, s) for s in seqs], sent={pair: range(res["sent"])}, errored={pair: res["failed"]})
    out.expect(not res["errors"], f"tells failed: {res['errors']}")
    out.expect(fifo.valid, f"order violations {fifo.violations[:5]}, unexplained gaps {fifo.unexplained_gaps[:5]}")
    out.expect(len(seqs) == res["sent"], f"sent {res['sent']}, consumer got {len(seqs)}")
    # Pushed back: tell waited, and what was accepted but not yet handled stays within the
    # mailbox plus zmq's queues on both sides (hwm messages each, a message being a batch of
    # up to BATCH_MAX), instead of growing with the flood's length.
    queue_bound = mailbox + 2 * hwm * BATCH_MAX + BATCH_MAX
    out.expect(res["max_block_s"] >= per_message / 2, f"tell never waited (max {res['max_block_s'] * 1000:.2f} ms)")
    out.expect(backlog <= queue_bound, f"{backlog} messages queued at the end of the flood > {queue_bound}")
    cell = next(a for a in stats["actors"] if a["name"] == "decoder")
    out.expect(cell["max_depth"] <= cell["capacity"], f"mailbox depth {cell['max_depth']} > {cell['capacity']}")
    budget = rss_budget_mib + (pool / 2**20 if array else (mailbox + 2 * hwm) * size / 2**20)
    delta: dict[str, float | None] = {}
    for k in pids:
        p, b = peak[k], base[k]
        delta[k] = None if p is None or b is None else round(p - b, 2)
    for k, d in delta.items():
        out.expect(d is not None and d <= budget, f"{k} RSS grew {d} MiB > {budget:.1f} MiB")
    rec["delivery"] = {"attempted": res["sent"], "acknowledged": res["sent"] - len(res["failed"]),
                       "ok": len(set(seqs)), "lost": len(fifo.unexplained_gaps), "recovered": 0,
                       "unexpected": len(set(seqs) - set(range(res["sent"]))), "indeterminate": 0,
                       "executed_more_than_once": len(seqs) - len(set(seqs)), "deduped": None}
    rec["errors"] = {"ActorDied": res["errors"].get("ActorDied", 0),
                     "Timeout": res["errors"].get("DeadlineExceeded", 0), "Overloaded": 0,
                     "untyped": 0, "hangs": 0}
    rec["throughput_rps"] = {"producer": round(res["sent"] / res["seconds"], 1),
                             "consumer_capacity": round(1 / per_message, 1),
                             "consumer_overall": round(res["sent"] / (flood_s + drain_s), 1)}
    rec["memory"] = {"max_rss_mib": peak, "baseline_rss_mib": base, "rss_delta_over_baseline_mib": delta,
                     "budget_mib": round(budget, 1)}
    rec["figures"] = {"sent": res["sent"], "max_send_block_ms": ms(res["max_block_s"]),
                      "blocked_ms": ms(res["blocked_s"]), "tells_that_waited": res["tells_that_waited"],
                      "backlog_at_flood_end": backlog, "queue_bound": queue_bound,
                      "max_mailbox_depth": cell["max_depth"], "mailbox_capacity": cell["capacity"],
                      "put_waits": cell.get("put_waits"), "drain_s": round(drain_s, 3), "flood_s": round(flood_s, 3),
                      "silent_drops": len(fifo.unexplained_gaps), "order_violations": len(fifo.violations),
                      "rejected_frames": stats["node"].get("rejected_frames"),
                      "unroutable_replies": stats["node"].get("unroutable_replies")}
    return _finish(out, None, before)


async def r14_batch_within_header_limit(n: int = 10, size: int = 300 << 10) -> Outcome:
    """Messages that are each under the header limit, sent in one loop tick (so the sender
    batches them into one frame), all arrive: tells are not dropped and asks do not wait
    out their deadline because the batch frame went over the receiver's limit."""
    out = Outcome(new_record("R14", f"batch of {n} x {size} B messages (each under the 1 MiB header cap)"))
    rec = out.record
    hist = History()
    before = Resources.take()
    async with cascada.ActorSystem() as system:
        sink = await system.spawn(Consumer, 0.0, name="decoder")
        track_family()
        for i in range(n):  # awaited one by one, but nothing here yields: one tick, one batch
            op = hist.invoke(sink.name, "eat", ("tell", i), target_incarnation=sink.incarnation)
            try:
                await sink.tell("eat", i, b"x" * size, timeout=5)
            except Exception as exc:  # noqa: BLE001 - recorded
                hist.complete(op, exc)
            else:
                hist.complete(op)
        asks = await asyncio.gather(*[hist.call(sink, "eat", n + i, b"y" * size, value=("ask", i), timeout=5,
                                                hang_after=HANG_S) for i in range(n)])
        got = await sink.ask("received", timeout=10)
        stats = await system.stats(sink)
    told = list(range(n))
    lost_tells = [i for i in told if i not in got]
    out.expect(not lost_tells, f"{len(lost_tells)} of {n} accepted tells never arrived")
    bad_asks = [op.error_type for op in asks if op.outcome != "ok"]
    out.expect(not bad_asks, f"{len(bad_asks)} of {n} asks failed: {sorted(set(map(str, bad_asks)))}")
    sets = check_set(hist.ops, {(("tell", i) if i < n else ("ask", i - n)): 1 for i in got})
    rec["delivery"] = sets.counts()
    rec["figures"] = {"rejected_frames": stats["node"]["rejected_frames"], "lost_tells": len(lost_tells),
                      "asks_failed": len(bad_asks),
                      "ask_latency_max_ms": ms(max((op.latency or 0.0) for op in asks))}
    return _finish(out, hist, before)


# -- R16 ---------------------------------------------------------------------------------


async def r16a_last_message(rounds: int = 4, burst: int = 200) -> Outcome:
    """An actor tells its last messages (in a handler, and in on_stop) and is stopped at once,
    or drained by SIGTERM: every message it sent arrives."""
    out = Outcome(new_record("R16", f"a: last messages then exit, {rounds} rounds x {burst}"))
    rec = out.record
    hist = History()
    before = Resources.take()
    expected: list[tuple[str, Any]] = []
    async with cascada.ActorSystem() as system, Nemesis(hist) as nem:
        sink = await system.spawn(Sink, name="verifier")
        for r in range(rounds):
            how = "sigterm" if r % 2 else "stop"
            tag = f"{how}-{r}"
            sender = await system.spawn(LastWords, sink, tag, name=f"decoder-{r}")
            track_family()
            op = await hist.call(sender, "burst", burst, value=tag, hang_after=HANG_S)
            out.expect(op.outcome == "ok", f"burst {tag} ended {op.error_type}")
            expected += [(tag, i) for i in range(burst)] + [(tag, "on_stop")]
            if how == "stop":
                await system.stop(sender)
            else:
                pid = sender.pid
                nem.term(pid)
                alive, _ = await wait_gone([pid], 10.0)
                out.expect(not alive, f"{tag}: SIGTERM did not end the process")
                await system.stop(sender)
        seen = await sink.ask("seen", timeout=30)
        executed = dict((tuple(k), n) for k, n in await sink.ask("executed", timeout=30))
    lost = [m for m in expected if executed.get(m, 0) == 0]
    out.expect(not lost, f"{len(lost)} messages lost on close, e.g. {lost[:4]}")
    dup = {m: n for m, n in executed.items() if n > 1}
    out.expect(not dup, f"delivered twice: {list(dup)[:4]}")
    order = [(tag, i if isinstance(i, int) else burst) for tag, i in seen]
    fifo = check_fifo(order)
    out.expect(fifo.valid, f"order violations: {fifo.violations[:4]}")
    rec["faults"] = nem.faults()
    rec["delivery"] = {"attempted": len(expected), "acknowledged": len(expected), "ok": len(expected) - len(lost),
                       "lost": len(lost), "recovered": 0, "unexpected": len(set(executed) - set(expected)),
                       "indeterminate": 0, "executed_more_than_once": len(dup), "deduped": None}
    rec["figures"] = {"messages_lost_on_close": len(lost), "lost_by_round": dict(Counter(m[0] for m in lost))}
    return _finish(out, hist, before)


async def r16b_shutdown_with_stopped_peer(stop_timeout: float = 1.0) -> Outcome:
    """shutdown() while one actor process is SIGSTOPped ends within its timeouts."""
    out = Outcome(new_record("R16", f"b: shutdown with a SIGSTOPped peer, stop_timeout={stop_timeout}"))
    rec = out.record
    hist = History()
    before = Resources.take()
    system = cascada.ActorSystem(stop_timeout=stop_timeout)
    with Nemesis(hist) as nem:
        async with system:
            refs = [await system.spawn(Bystander, name=n) for n in ("router", "expert", "decoder")]
            pids = [r.pid for r in refs]
            for r in refs:
                await hist.call(r, "ping", r.name, hang_after=HANG_S)
            nem.stop(refs[1].pid)
            pending = asyncio.ensure_future(hist.call(refs[1], "ping", "while stopped", hang_after=30))
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            await system.shutdown()
            took = time.monotonic() - t0
            op = await pending
        alive, _ = await wait_gone(pids, 2.0)
    bound = _stop_bound(stop_timeout)
    out.expect(took <= bound, f"shutdown took {took:.2f}s > {bound:.2f}s")
    out.expect(not alive, f"processes left: {alive}")
    out.expect(op.outcome in ("info", "fail"), f"the call to the stopped peer ended {op.outcome}")
    rec["faults"] = nem.faults()
    rec["figures"] = {"shutdown_s": round(took, 3), "bound_s": bound, "pending_call": op.error_type}
    return _finish(out, hist, before)


# -- R19 ---------------------------------------------------------------------------------


def _fd_links(pid: int) -> list[str]:
    out: list[str] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in names:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


async def r19_no_fork_after_zmq() -> Outcome:
    """Actor processes are not forks of a process that has zmq or an event loop: they are
    forked by a forkserver that was exec'd afresh and holds neither."""
    out = Outcome(new_record("R19", "a: start method of actor processes"))
    rec = out.record
    before = Resources.take()
    me = os.getpid()
    async with cascada.ActorSystem() as system:
        refs = [await system.spawn(Bystander, name=f"expert-{i}") for i in range(2)]
        track_family()
        parents = {ppid_of(r.pid) for r in refs}
        out.expect(me not in parents, "an actor process is a direct fork of the driver (which has zmq and a loop)")
        out.expect(len(parents) == 1, f"actors have several parents: {parents}")
        forkserver = next(iter(parents)) or -1
        out.expect(ppid_of(forkserver) == me, f"the actors' parent {forkserver} is not the system's child")
        with open(f"/proc/{forkserver}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        out.expect("cascada.actors._forkserver" in cmdline, f"the actors' parent runs {cmdline!r}")
        # An exec'd interpreter, not a fork of ours: its executable image was loaded anew.
        out.expect(os.path.realpath(f"/proc/{forkserver}/exe") == os.path.realpath(sys.executable),
                   "the forkserver is not a fresh interpreter")
        fs_links = _fd_links(forkserver)
        eventfds = [t for t in fs_links if t == "anon_inode:[eventfd]"]
        sockets = [t for t in fs_links if t.startswith("socket:")]
        out.expect(not eventfds, f"the forkserver holds eventfds (a zmq context?): {eventfds}")
        out.expect(len(sockets) <= 1, f"the forkserver holds sockets beyond its spawn channel: {sockets}")
        ours = {t for t in _fd_links(me) if t.startswith("socket:")}
        for r in refs:
            shared = ours & {t for t in _fd_links(r.pid) if t.startswith("socket:")}
            out.expect(not shared, f"actor {r.name} shares the driver's sockets {sorted(shared)}")
            out.expect(await r.ask("ping", 1, timeout=10) == 1, f"{r.name} does not serve")
    rec["figures"] = {"forkserver_fds": sorted(set(fs_links)), "eventfds": len(eventfds), "sockets": len(sockets),
                      "start_method": "forkserver (exec'd)"}
    return _finish(out, None, before)


# -- R23 ---------------------------------------------------------------------------------


class _Canary:
    """Unpickling this creates the canary file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _canary_payloads(path: str) -> list[tuple[str, bytes]]:
    return [(f"protocol {p}", pickle.dumps(_Canary(path), protocol=p)) for p in (0, 2, 4, 5)]


async def r23_pickle_canary() -> Outcome:
    """Pickles whose __reduce__ would create a file, sent at a live actor as a raw frame, in a
    msgpack bin field, as ext payloads (every allowlisted code and an unknown one), in a batch
    and as an out-of-band frame: no file appears and the actor keeps serving."""
    out = Outcome(new_record("R23", "pickle canary at a live actor (raw DEALER)"))
    rec = out.record
    before = Resources.take()
    workdir = tempfile.mkdtemp(prefix="rel-r23-")
    canary = os.path.join(workdir, "canary")
    payloads = _canary_payloads(canary)
    # The canary is live: unpickling one here creates the file.
    pickle.loads(payloads[-1][1]).close()
    out.expect(os.path.exists(canary), "the canary does not work")
    os.unlink(canary)
    sent: dict[str, int] = {}
    replies: list[Any] = []
    try:
        async with cascada.ActorSystem() as system:
            victim = await system.spawn(Bystander, name="victim")
            pid = victim.pid
            track_family()
            stats0 = (await system.stats(victim))["node"]
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(victim.endpoint)
            try:
                def req(corr: int, arg: Any) -> bytes:
                    return msgpack.packb([1, 1, corr, "raw", "victim", "ping", None, [[arg], None], None])

                corr = 100
                for label, blob in payloads:
                    frames: list[tuple[str, list[bytes]]] = [
                        ("raw frame", [blob]),
                        ("batch", [b"\xc1" + blob]),
                        ("bin field", [req(corr + 1, blob)]),
                        ("out-of-band frame", [req(corr + 2, "oob"), blob]),
                    ]
                    for code in (1, 2, 3, 99):
                        frames.append((f"ext {code}", [req(corr + 10 + code, msgpack.ExtType(code, blob))]))
                    frames.append(("body", [msgpack.packb([1, 1, corr + 200, "raw", "victim", "ping", None,
                                                           msgpack.ExtType(1, blob), None])]))
                    for what, fr in frames:
                        sock.send_multipart(fr)
                        sent[what] = sent.get(what, 0) + 1
                    corr += 1000
                sock.send_multipart([req(77, "alive")])
                codec = Codec()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if sock.poll(50):
                        envs, _err = codec.decode_all([sock.recv()])
                        replies.extend(envs)
                        if any(e.corr == 77 for e in envs):
                            break
                    else:
                        await asyncio.sleep(0)
            finally:
                sock.close(linger=0)
                ctx.term()
            out.expect(any(e.corr == 77 and e.body == "alive" for e in replies),
                       "no answer to a good request after the canaries")
            bins = [e for e in replies if e.corr % 1000 == 101]
            out.expect(bins and all(e.body == blob for e, (_l, blob) in zip(bins, payloads)),
                       "a pickle in a bin field did not come back as the same bytes")
            stats1 = await system.stats(victim)
            out.expect(stats1["pid"] == pid, "the actor's process changed")
            out.expect(await victim.ask("ping", "still", timeout=10) == "still", "the actor stopped serving")
            rejected = stats1["node"]["rejected_frames"] - stats0["rejected_frames"]
        out.expect(not os.path.exists(canary), "THE CANARY FILE APPEARED: something unpickled wire data")
    finally:
        canary_found = os.path.exists(canary)
        shutil.rmtree(workdir, ignore_errors=True)
    errors = [e for e in replies if e.kind == Kind.ERROR]
    rec["figures"] = {"canary_files": int(canary_found), "frames_sent": sum(sent.values()), "by_kind": sent,
                      "rejected_frames": rejected, "error_replies": len(errors),
                      "error_codes": sorted({str(e.body[0]) for e in errors}), "restarts": 0}
    return _finish(out, None, before)
