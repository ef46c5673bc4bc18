"""Model-based test of the runtime's guarantees (RELIABILITY.md, "Shared harness" item 4).

A hypothesis ``RuleBasedStateMachine`` drives colocated actors (``placement="local"``, one
``ActorSystem(heartbeat_interval=None)`` per example) through a real event loop that the
machine owns: one uvloop loop per example, made in ``__init__`` and closed in ``teardown``;
every rule runs one coroutine on it with ``run_until_complete``. Calls are started as
background tasks (so they are in flight across rules, while kills, crashes and stalls
happen) and recorded in the shared harness's ``History``.

The cast: 2-3 ``Worker`` actors under one supervisor (strategy, intensity and the
supervisor's own restart type drawn per example), and a ``Sink`` under the root supervisor
that is never killed. Two clients (logical senders, ``c0``/``c1``) send.

Rules:
  send_plain     an at-most-once ask to a worker (the handler logs (client, incarnation, seq))
  send_alo       an at-least-once ask, ``retries=-1`` and an idempotency key, to the
                 ``@cascada.idempotent`` ``work`` handler, which forwards to the sink's
                 ``@cascada.idempotent`` ``record`` with the same key
  resend_alo     the same key again (a client that lost an ack retries), maybe to another worker
  send_boom      a handler that raises: RemoteError, and the actor does NOT crash
  stall          a handler that sleeps far past the call's deadline: the caller gets
                 DeadlineExceeded by its deadline and the cancellation reaches the handler
  kill           ``await system.kill(ref)``: the local actor is torn down, pending calls fail
                 ActorDied, the supervisor restarts it (or escalates)
  crash_on_next  the worker's next handler call crashes its incarnation (the handler starts
                 ``system.kill`` of itself on a task and waits to be torn down), before or
                 after its effect (for ``work``: after the sink recorded the key, so the
                 reply is lost and the retry meets a fresh incarnation with an empty cache)
  kill_mid_alo   an at-least-once call whose worker is killed while the sink runs it
  advance        let real time pass (0-60 ms)
  settle         wait for every call in flight to end, then check the end-to-end properties

Time: the runtime's deadlines are wall-clock (``time.time()``, carried in the message and
compared by the receiver), so no virtual clock can drive them. The machine uses small real
timeouts instead (50 ms stalls, 0.4-0.6 s calls). Between rules the loop does not run, so a
deadline can pass while hypothesis is choosing the next step: every lateness check subtracts
the time the loop was idle (``Machine.busy``), and allows ``TOL`` on top.

Invariants (after every step, and again after the final drain in ``teardown``):
  - every error is a typed cascada error, of a type the call kind allows (ActorDied,
    DeadlineExceeded/Overloaded, RemoteError for the raising handler); no hang
  - no call ends (or stays pending) later than its deadline + TOL of loop time
  - no acknowledged at-least-once key is missing from the sink; no key took effect twice
    (the sink counts executions of its idempotent handler per key); nothing unexpected
  - an at-least-once call is acknowledged unless a supervisor escalated (liveness)
  - FIFO per (client, worker incarnation) for plain asks, and every acknowledged plain ask
    was handled by the incarnation that answered it (``check_fifo`` with ``sent``)
  - a call pending on an incarnation when it was killed, whose handler had not finished,
    fails with ActorDied (not a deadline), and so does the call whose handler crashed it
  - restarts between escalations never exceed the supervisor's intensity within its period;
    every exit the supervisor saw was one of our kills (a handler exception crashes nothing)
  - every stall handler that started was cancelled, within TOL of its caller's deadline

Bugs it found (BUG-1: a local actor killed in the tick its handler started left the call to
its deadline; BUG-2: a local sibling stopped for a restart answered ActorNotFound, which
at-least-once calls do not retry) are fixed in the runtime; their reproductions at the end of
the file are now regression tests.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
import os
import time
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import cascada
from reliability.harness import OK, History, Op, check_fifo, check_set

PLAIN_TIMEOUT = 0.4
ALO_TIMEOUT = 0.6
BOOM_TIMEOUT = 0.4
STALL_TIMEOUT = 0.05
STALL_SLEEP = 30.0
TOL = 0.1  # seconds of loop time (with the CPU) a call may end after its deadline
HANG_SLACK = 2.0  # the History watchdog: a call still pending deadline + this is a hang
CLIENTS = ("c0", "c1")
PERIOD = 5.0

ALLOWED: dict[str, set[str]] = {
    "plain": {"ActorDied", "DeadlineExceeded", "Overloaded"},
    "alo": {"ActorDied", "DeadlineExceeded", "Overloaded"},
    "boom": {"RemoteError", "ActorDied", "DeadlineExceeded", "Overloaded"},
    "stall": {"ActorDied", "DeadlineExceeded", "Overloaded"},
}
#: BUG-2 (test_a_sibling_stopped_for_a_restart_* below): while a supervisor stops local children
#: to restart them (one_for_all, rest_for_one) or to escalate, a child already stopped and not
#: yet started again answers ActorNotFound, which at-least-once calls do not retry. Until that is
#: fixed the machine tolerates ActorNotFound (counted in STATS["bug2_actor_not_found"]) and
#: excuses an at-least-once call that ended with it; every other check still applies.
TOLERATE_BUG2 = False  # fixed: stopped local siblings are tombstoned (ActorDied)
if TOLERATE_BUG2:
    for _allowed in ALLOWED.values():
        _allowed.add("ActorNotFound")

#: What the runs did, for the report (printed by the tests with -s).
STATS: Counter[str] = Counter()


# -- actors ------------------------------------------------------------------------------------


class Shared:
    """State the test and its local actors share (local placement passes arguments as they
    are). It outlives every incarnation, so it is where the oracles live."""

    def __init__(self) -> None:
        self.system: cascada.ActorSystem | None = None
        self.log: list[tuple[tuple[str, str, str], int]] = []  # ((client, worker, incarnation), seq), handling order
        self.effects: dict[str, int] = {}  # sink executions per key
        self.crash: dict[str, tuple[str, str]] = {}  # worker -> (before|after, task|inline): crash its next call
        self.crashed_tags: set[str] = set()  # calls whose handler crashed its incarnation
        self.started: dict[str, str] = {}  # tag -> incarnation whose handler started it
        self.finished: set[str] = set()  # tags whose handler returned or raised
        self.stall_started: dict[str, float] = {}
        self.stall_cancelled: dict[str, float] = {}
        self.bg: set[asyncio.Task[Any]] = set()
        self.bg_errors: list[BaseException] = []

    def spawn_bg(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.bg.add(task)
        task.add_done_callback(self._bg_done)

    def _bg_done(self, task: asyncio.Task[Any]) -> None:
        self.bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.bg_errors.append(task.exception())  # type: ignore[arg-type]


class Sink(cascada.Actor):
    """Never killed: its count per key is the oracle of what took effect."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    @cascada.idempotent
    async def record(self, key: str, worker: str, delay: float) -> str:
        if delay:
            # A cancellation here abandons the key before the effect: a retry may run it.
            await asyncio.sleep(delay)
        self.shared.effects[key] = self.shared.effects.get(key, 0) + 1  # the effect, after the last await
        return key


class Worker(cascada.Actor):
    def __init__(self, shared: Shared, sink: cascada.ActorRef) -> None:
        self.shared = shared
        self.sink = sink

    async def _crash_here(self, where: str, tag: str) -> bool:
        """Crash this incarnation if the test asked for it at this point: a task kills it
        (as a SIGKILL would, from outside the handler) and the handler waits to be torn down."""
        want = self.shared.crash.get(self.name)
        if want is None or want[0] != where:
            return False
        how = want[1]
        del self.shared.crash[self.name]
        self.shared.crashed_tags.add(tag)
        assert self.shared.system is not None
        # Avoid BUG-1 (test_kill_right_after_an_eager_start_fails_the_call below): a handler
        # started eagerly runs its first step in the caller's task and continues in a task of
        # its own; a kill before that task's first step leaves the call waiting for its deadline.
        # One tick here lets that task start before the kill.
        await asyncio.sleep(0)
        if how == "inline":
            await self.shared.system.kill(self.ref)  # the handler kills its own incarnation
        else:
            self.shared.spawn_bg(self.shared.system.kill(self.ref))  # killed from outside, like a SIGKILL
        await asyncio.Event().wait()  # cancelled by the kill
        raise AssertionError("not reached: the kill cancels this handler")

    def _start(self, tag: str) -> str:
        inc = self.ref.incarnation
        assert inc is not None
        self.shared.started[tag] = inc
        return inc

    async def plain(self, client: str, seq: int, delay: float, tag: str) -> str:
        await self._crash_here("before", tag)
        inc = self._start(tag)
        self.shared.log.append(((client, self.name, inc), seq))
        await self._crash_here("after", tag)
        if delay:
            await asyncio.sleep(delay)
        self.shared.finished.add(tag)
        return inc

    @cascada.idempotent
    async def work(self, key: str, delay: float, tag: str) -> str:
        await self._crash_here("before", tag)
        self._start(tag)
        out = await self.sink.ask("record", key, self.name, delay, retries=-1, idempotency_key=key)
        await self._crash_here("after", tag)
        self.shared.finished.add(tag)
        return str(out)

    async def boom(self, tag: str) -> None:
        await self._crash_here("before", tag)
        await self._crash_here("after", tag)
        self._start(tag)
        self.shared.finished.add(tag)
        raise ValueError(f"boom {tag}")

    async def stall(self, tag: str, seconds: float) -> None:
        await self._crash_here("before", tag)
        await self._crash_here("after", tag)
        self._start(tag)
        self.shared.stall_started[tag] = time.monotonic()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.shared.stall_cancelled[tag] = time.monotonic()
            raise
        self.shared.finished.add(tag)


# -- the machine -------------------------------------------------------------------------------


@dataclass
class Call:
    kind: str  # plain | alo | boom | stall
    client: str
    worker: str
    tag: str
    timeout: float
    op: Op
    task: asyncio.Task[Any]
    key: str | None = None
    must_die: bool = False  # pending on an incarnation that was killed under its running handler
    checked: bool = False

    @property
    def deadline(self) -> float:
        return self.op.t_invoke + self.timeout

    @property
    def done(self) -> bool:
        return self.op.outcome is not None


class Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = uvloop.new_event_loop()
        self.idle: list[tuple[float, float]] = []  # when the loop did not run
        self.idle_since = time.monotonic()
        self.samples: list[list[tuple[float, float]]] = []  # per run(): (monotonic, thread CPU time)
        self.ticker: asyncio.Task[None] | None = None
        self.max_late = 0.0
        self.shared = Shared()
        self.history = History()
        self.calls: list[Call] = []
        self.tags = itertools.count()
        self.seqs = {c: itertools.count() for c in CLIENTS}
        self.keys: list[str] = []
        self.seq_of: dict[str, int] = {}
        self.kills: dict[str, int] = {}  # worker -> kills and crashes asked for
        self.system: cascada.ActorSystem | None = None
        self.workers: dict[str, cascada.ActorRef] = {}
        self.sup: cascada.ActorRef | None = None
        self.sink: cascada.ActorRef | None = None
        self.strategy = "one_for_one"
        self.intensity = 0
        self.sup_events: list[dict[str, Any]] = []
        STATS["examples"] += 1

    # -- the loop ----------------------------------------------------------------------------

    def run(self, coro: Any, limit: float = 15.0) -> Any:
        t = time.monotonic()
        self.idle.append((self.idle_since, t))
        self.samples.append([(t, time.thread_time())])
        try:
            return self.loop.run_until_complete(asyncio.wait_for(coro, limit))
        finally:
            self.idle_since = time.monotonic()
            self.samples[-1].append((self.idle_since, time.thread_time()))

    async def _tick(self) -> None:
        """Samples (wall, this thread's CPU time) every 2 ms while the loop runs: a gap in
        which the thread got no CPU is the machine's doing (2 noisy cores), not the runtime's."""
        while True:
            await asyncio.sleep(0.002)
            if self.samples:
                self.samples[-1].append((time.monotonic(), time.thread_time()))

    def busy(self, a: float, b: float) -> float:
        """Seconds within [a, b] during which the loop ran and had the CPU (so the runtime
        could act): wall time less the time between rules, less the time the thread waited
        for a core (wall minus thread CPU time between two samples)."""
        if b <= a:
            return 0.0
        idle = 0.0
        for s, e in [*self.idle, (self.idle_since, max(self.idle_since, time.monotonic()))]:
            lo, hi = max(a, s), min(b, e)
            if hi > lo:
                idle += hi - lo
        for seg in self.samples:
            if not seg or seg[-1][0] < a or seg[0][0] > b:
                continue
            for (w1, c1), (w2, c2) in zip(seg, seg[1:]):
                lo, hi = max(a, w1), min(b, w2)
                if hi <= lo or w2 <= w1:
                    continue
                waited = max(0.0, (w2 - w1) - (c2 - c1))
                idle += waited * (hi - lo) / (w2 - w1)
        return max(0.0, (b - a) - idle)

    @initialize(strategy=st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
                intensity=st.integers(1, 5), sup_restart=st.sampled_from(["temporary", "permanent"]),
                n_workers=st.integers(2, 3))
    def setup(self, strategy: str, intensity: int, sup_restart: str, n_workers: int) -> None:
        self.strategy, self.intensity = strategy, intensity
        self.run(self._setup(strategy, intensity, sup_restart, n_workers))

    async def _setup(self, strategy: str, intensity: int, sup_restart: str, n_workers: int) -> None:
        # The root restarts the workers' supervisor after it escalates (when permanent); its own
        # intensity is high so that it never escalates itself (that would stop the sink).
        system = cascada.ActorSystem(heartbeat_interval=None, restart_intensity=1000, restart_period=PERIOD)
        self.ticker = asyncio.get_running_loop().create_task(self._tick())
        await system.__aenter__()
        self.system = self.shared.system = system
        self.sink = await system.spawn(Sink, self.shared, name="sink", placement="local")
        self.sup = await system.supervisor("workers", strategy=strategy, intensity=intensity,  # type: ignore[arg-type]
                                           period=PERIOD, restart=sup_restart)  # type: ignore[arg-type]
        for i in range(n_workers):
            name = f"w{i}"
            self.workers[name] = await system.spawn(Worker, self.shared, self.sink, name=name, placement="local",
                                                    supervisor=self.sup, restart="permanent")
            self.kills[name] = 0

    # -- sending -------------------------------------------------------------------------------

    def _start_call(self, kind: str, client: str, worker: str, method: str, args: tuple[Any, ...], timeout: float,
                    tag: str, key: str | None = None, **kwargs: Any) -> None:
        ref = self.workers[worker]

        async def go() -> None:
            coro = self.history.call(ref, method, *args, value=key if key is not None else tag, idem_key=key,
                                     sender=client, hang_after=timeout + HANG_SLACK, timeout=timeout, **kwargs)
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(0)  # History.call logs its invoke in its first step
            op = self.history.ops[-1]
            assert op.value == (key if key is not None else tag)
            self.calls.append(Call(kind, client, worker, tag, timeout, op, task, key))
            # A few ticks: the call reaches the mailbox (or runs) before the next rule.
            for _ in range(3):
                await asyncio.sleep(0)

        STATS["calls"] += 1
        self.run(go())

    def workers_names(self) -> list[str]:
        return sorted(self.workers)

    @rule(client=st.sampled_from(CLIENTS), w=st.integers(0, 2), delay=st.sampled_from([0.0, 0.0, 0.002, 0.01]))
    def send_plain(self, client: str, w: int, delay: float) -> None:
        worker = self.workers_names()[w % len(self.workers)]
        seq = next(self.seqs[client])
        tag = f"p{next(self.tags)}"
        self.seq_of[tag] = seq
        self._start_call("plain", client, worker, "plain", (client, seq, delay, tag), PLAIN_TIMEOUT, tag)

    @rule(client=st.sampled_from(CLIENTS), w=st.integers(0, 2), delay=st.sampled_from([0.0, 0.002, 0.05]))
    def send_alo(self, client: str, w: int, delay: float) -> None:
        worker = self.workers_names()[w % len(self.workers)]
        tag = f"a{next(self.tags)}"
        key = f"k-{tag}"
        self.keys.append(key)
        self._start_call("alo", client, worker, "work", (key, delay, tag), ALO_TIMEOUT, tag, key=key,
                         retries=-1, idempotency_key=key)

    @rule(client=st.sampled_from(CLIENTS), w=st.integers(0, 2), where=st.sampled_from([0.0, 0.01]))
    def kill_mid_alo(self, client: str, w: int, where: float) -> None:
        """An at-least-once call whose worker is killed while the sink runs it (the sink sleeps
        50 ms before its effect): the sink's attempt is cancelled and its key forgotten, the
        client retries on a fresh incarnation, and the key must still take effect once."""
        self.send_alo(client, w, 0.05)
        if where:
            self.run(asyncio.sleep(where))
        self.kill(w, False)

    @precondition(lambda self: bool(self.keys))
    @rule(client=st.sampled_from(CLIENTS), w=st.integers(0, 2), which=st.integers(0, 1000))
    def resend_alo(self, client: str, w: int, which: int) -> None:
        worker = self.workers_names()[w % len(self.workers)]
        key = self.keys[which % len(self.keys)]
        tag = f"r{next(self.tags)}"
        self._start_call("alo", client, worker, "work", (key, 0.0, tag), ALO_TIMEOUT, tag, key=key,
                         retries=-1, idempotency_key=key)

    @rule(client=st.sampled_from(CLIENTS), w=st.integers(0, 2))
    def send_boom(self, client: str, w: int) -> None:
        worker = self.workers_names()[w % len(self.workers)]
        tag = f"b{next(self.tags)}"
        self._start_call("boom", client, worker, "boom", (tag,), BOOM_TIMEOUT, tag)

    @rule(client=st.sampled_from(CLIENTS), w=st.integers(0, 2))
    def stall(self, client: str, w: int) -> None:
        worker = self.workers_names()[w % len(self.workers)]
        tag = f"s{next(self.tags)}"
        self._start_call("stall", client, worker, "stall", (tag, STALL_SLEEP), STALL_TIMEOUT, tag)

    # -- faults ------------------------------------------------------------------------------

    @rule(w=st.integers(0, 2), wait=st.booleans())
    def kill(self, w: int, wait: bool) -> None:
        worker = self.workers_names()[w % len(self.workers)]
        self.run(self._kill(worker, wait))

    async def _kill(self, worker: str, wait: bool) -> None:
        assert self.system is not None and self.sup is not None
        cell = self.system.node.cells.get(worker)
        inc = None if cell is None else cell.incarnation
        if inc is not None:
            # Every non-retrying call pending on this incarnation whose handler has not finished
            # (queued or running) must now fail with ActorDied.
            for c in self.calls:
                # (Only calls still well within their deadline: one whose deadline passed may
                # rightly end DeadlineExceeded, its timer racing the kill in this loop tick.)
                if (c.worker == worker and c.kind != "alo" and not c.done and c.tag not in self.shared.finished
                        and self.shared.started.get(c.tag, inc) == inc and time.monotonic() < c.deadline - 0.01):
                    c.must_die = True
        self.kills[worker] += 1
        STATS["kills"] += 1
        self.history.mark("kill", detail=worker)
        escalations = len(self.system.escalations)
        try:
            await self.system.kill(self.workers[worker])
        except cascada.ActorNotFound:
            pass
        if wait and inc is not None:
            # The supervisor restarts it (a new incarnation), unless it escalated.
            t0 = time.monotonic()
            while True:
                now = self.system.node.cells.get(worker)
                if now is not None and now.incarnation != inc:
                    break
                if len(self.system.escalations) > escalations:
                    break
                assert time.monotonic() - t0 < 2.0, f"{worker} was neither restarted nor escalated within 2 s"
                await asyncio.sleep(0.001)

    @rule(w=st.integers(0, 2), where=st.sampled_from(["before", "after"]), how=st.sampled_from(["task", "inline"]))
    def crash_on_next(self, w: int, where: str, how: str) -> None:
        worker = self.workers_names()[w % len(self.workers)]
        if worker not in self.shared.crash:
            self.shared.crash[worker] = (where, how)
            self.kills[worker] += 1  # counted up front: the exit it causes is ours
            STATS["crashes"] += 1

    @rule(ms=st.sampled_from([0, 1, 5, 20, 60]))
    def advance(self, ms: int) -> None:
        self.run(asyncio.sleep(ms / 1000.0))

    @rule()
    def settle(self) -> None:
        self.run(self._drain())
        self.check_all(final=True)

    async def _drain(self) -> None:
        tasks = [c.task for c in self.calls if not c.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=ALO_TIMEOUT + HANG_SLACK + 1.0)
        await asyncio.sleep(0.005)  # cancellations reach the handlers

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def every_step(self) -> None:
        STATS["steps"] += 1
        if self.system is not None:
            self.check_all(final=False)

    def check_all(self, final: bool) -> None:
        now = time.monotonic()
        escalated = bool(self.system is not None and self.system.escalations)
        for c in self.calls:
            op = c.op
            if not c.done:
                late = self.busy(c.deadline, now)
                assert late <= TOL, \
                    f"{c.kind} {c.tag} to {c.worker} still pending {late:.3f}s of loop time past its deadline"
                assert not final, f"{c.kind} {c.tag} to {c.worker} still pending after the drain"
                continue
            assert not op.hang, f"{c.kind} {c.tag} to {c.worker} hung (no outcome by deadline + {HANG_SLACK}s)"
            assert not op.untyped, f"{c.kind} {c.tag} to {c.worker} failed with an untyped {op.error_type}"
            if op.error_type is not None:
                assert op.error_type in ALLOWED[c.kind], f"{c.kind} {c.tag} failed with {op.error_type}"
            assert op.t_complete is not None
            late = self.busy(c.deadline, op.t_complete)
            self.max_late = max(self.max_late, late)
            assert late <= TOL, f"{c.kind} {c.tag} ended {late:.3f}s of loop time past its deadline ({op.error_type})"
            if c.kind == "stall":
                assert op.outcome != OK, f"stall {c.tag} answered although it sleeps {STALL_SLEEP}s"
            if op.error_type == "ActorNotFound":
                continue  # BUG-2, tolerated (see TOLERATE_BUG2)
            if c.kind == "alo" and op.outcome != OK:
                assert escalated, f"at-least-once {c.tag} ({c.key}) to {c.worker} ended {op.error_type} without any escalation"
            if c.kind == "alo" and op.outcome == OK:
                assert op.result == c.key, f"at-least-once {c.tag} answered {op.result!r}, not its key {c.key!r}"
            if c.kind == "plain" and op.outcome == OK:
                assert self.shared.started.get(c.tag) == op.result, \
                    f"plain {c.tag} was answered by incarnation {op.result} but handled by {self.shared.started.get(c.tag)}"
            if (c.must_die or c.tag in self.shared.crashed_tags) and c.kind != "alo":
                assert op.error_type == "ActorDied", \
                    f"{c.kind} {c.tag} was pending on a killed incarnation but ended {op.outcome}/{op.error_type}"
        self._check_delivery()
        self._check_fifo()
        self._check_supervision()
        if final:
            self._check_stalls()
        assert not self.shared.bg_errors, f"kill tasks failed: {self.shared.bg_errors!r}"

    def _check_delivery(self) -> None:
        alo = [c.op for c in self.calls if c.kind == "alo" and c.done]
        res = check_set(alo, self.shared.effects)
        assert not res.lost, f"acknowledged keys missing from the sink: {res.lost}"
        assert not res.duplicated, f"keys that took effect more than once: {res.duplicated}"
        attempted = {c.key for c in self.calls if c.kind == "alo"}
        stray = set(self.shared.effects) - attempted
        assert not stray, f"the sink holds keys nobody sent: {stray}"

    def _check_fifo(self) -> None:
        sent: dict[tuple[str, str, str], list[int]] = {}
        for c in self.calls:
            if c.kind == "plain" and c.done and c.op.outcome == OK:
                sent.setdefault((c.client, c.worker, c.op.result), []).append(self.seq_of[c.tag])
        res = check_fifo(self.shared.log, sent)
        assert not res.violations, f"FIFO broken per (client, worker, incarnation): {res.violations}"
        assert not res.unexplained_gaps, f"acknowledged plain asks never handled: {res.unexplained_gaps}"

    def _check_supervision(self) -> None:
        assert self.system is not None and self.sup is not None

        async def events() -> list[dict[str, Any]]:
            assert self.sup is not None
            return list(await self.sup.ask("events", timeout=2.0))

        self.sup_events = evs = self.run(events())
        workers = self.workers_names()
        # Every exit the supervisor saw is one of our kills or crashes.
        for w in workers:
            exits = sum(1 for e in evs if e["event"] == "exit" and e["child"] == w)
            assert exits <= self.kills[w], f"{w} exited {exits} times but was killed {self.kills[w]} times"
        # Restarts between escalations: at most `intensity` decisions within any period.
        segments: list[list[float]] = [[]]
        group_open = False
        last = workers[-1]
        for e in evs:
            if e["event"] == "escalate":
                segments.append([])
                group_open = False
            elif e["event"] == "restart":
                if self.strategy == "one_for_one" or not group_open:
                    segments[-1].append(e["t"])
                group_open = self.strategy != "one_for_one" and e["child"] != last
        for seg in segments:
            for i, t in enumerate(seg):
                within = sum(1 for u in seg[: i + 1] if u > t - PERIOD + 0.05)
                assert within <= self.intensity, \
                    f"{within} restarts within {PERIOD}s > intensity {self.intensity} with no escalation between"
        escalations = self.system.escalations
        for err in escalations:
            assert isinstance(err, cascada.RestartIntensityExceeded)
            assert err.supervisor == "workers" and err.count == self.intensity and err.period == PERIOD, str(err)

    def _check_stalls(self) -> None:
        by_tag = {c.tag: c for c in self.calls if c.kind == "stall"}
        for tag, t in self.shared.stall_started.items():
            assert tag in self.shared.stall_cancelled, f"stall {tag} started at {t} and was never cancelled"
            c = by_tag[tag]
            late = self.busy(c.deadline, self.shared.stall_cancelled[tag])
            assert late <= TOL, f"stall {tag}'s handler was cancelled {late:.3f}s of loop time after the deadline"

    # -- teardown ------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.system is not None:
                self.run(self._drain())
                self.check_all(final=True)
        finally:
            try:
                if self.system is not None:
                    STATS["escalations"] += len(self.system.escalations)
                    STATS["restarts"] += sum(1 for e in self.sup_events if e["event"] == "restart")
                    for c in self.calls:
                        STATS[f"{c.kind}:{c.op.error_type or c.op.outcome}"] += 1
                        STATS["must_die"] += c.must_die or c.tag in self.shared.crashed_tags
                        STATS["bug2_actor_not_found"] += c.op.error_type == "ActorNotFound"
                    STATS["stalls_cancelled"] += len(self.shared.stall_cancelled)
                    STATS["sink_effects"] += len(self.shared.effects)
                    STATS["max_late_ms"] = max(STATS["max_late_ms"], round(self.max_late * 1000))
                    self.run(self._close())
            finally:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

    async def _close(self) -> None:
        for c in self.calls:
            if not c.task.done():
                c.task.cancel()
        await asyncio.gather(*(c.task for c in self.calls), return_exceptions=True)
        assert self.system is not None
        await self.system.shutdown()
        for t in list(self.shared.bg):
            t.cancel()
        await asyncio.gather(*self.shared.bg, return_exceptions=True)
        if self.ticker is not None:
            self.ticker.cancel()
            await asyncio.gather(self.ticker, return_exceptions=True)


# -- the tests ---------------------------------------------------------------------------------

FAST = settings(max_examples=50, stateful_step_count=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], print_blob=False)


def _report(label: str, t0: float) -> None:
    print(f"\n{label}: {dict(sorted(STATS.items()))} in {time.monotonic() - t0:.1f}s")


@pytest.mark.timeout(600)
def test_state_machine() -> None:
    STATS.clear()
    t0 = time.monotonic()
    run_state_machine_as_test(Machine, settings=FAST)
    _report("state machine", t0)


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("CASCADA_SOAK"), reason="soak")
@pytest.mark.timeout(3600)
def test_state_machine_soak() -> None:
    """Many more (random) examples and longer runs; set CASCADA_SOAK_EXAMPLES to size it."""
    STATS.clear()
    t0 = time.monotonic()
    n = int(os.environ.get("CASCADA_SOAK_EXAMPLES", "500"))
    run_state_machine_as_test(Machine, settings=settings(FAST, max_examples=n, stateful_step_count=40,
                                                         derandomize=False))
    _report("state machine soak", t0)


# -- bugs the machine found, kept as minimal reproductions -------------------------------------


class _Hangs(cascada.Actor):
    async def hang(self) -> None:
        await asyncio.Event().wait()


@pytest.mark.timeout(30)
async def test_kill_right_after_an_eager_start_fails_the_call_with_actor_died() -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        ref = await system.spawn(_Hangs, name="w", placement="local", restart="permanent")
        call = asyncio.ensure_future(ref.ask("hang", timeout=2.0))
        await asyncio.sleep(0)  # the ask runs: offer() -> eager first step -> suspended
        await system.kill(ref)  # same tick: _current has not started
        t0 = time.monotonic()
        with pytest.raises(cascada.ActorDied):
            await call  # today: DeadlineExceeded after 2 s
        assert time.monotonic() - t0 < 0.5


class _Busy(cascada.Actor):
    async def busy(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @cascada.idempotent
    async def ping(self) -> str:
        return "pong"


@pytest.mark.timeout(30)
async def test_a_sibling_stopped_for_a_restart_answers_actor_died_and_alo_calls_get_through() -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        sup = await system.supervisor("sup", strategy="one_for_all", intensity=5)
        w = [await system.spawn(_Busy, name=f"w{i}", placement="local", supervisor=sup, restart="permanent")
             for i in range(3)]
        slow = asyncio.ensure_future(w[1].ask("busy", 0.3, timeout=5))
        await asyncio.sleep(0.01)
        await system.kill(w[0])  # one_for_all: stops w2, then w1 (waits ~0.3 s for its handler)
        await asyncio.sleep(0.05)
        # At-least-once: retried through the restart, answered once w2 is back.
        assert await w[2].ask("ping", timeout=2, retries=-1, idempotency_key="k") == "pong"  # today: ActorNotFound
        await slow
