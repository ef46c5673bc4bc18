"""The shared reliability harness (RELIABILITY.md, "Shared harness"): a nemesis that injects
process faults by PID, a Jepsen-style history of calls, checkers over histories, a resource
checker over procfs, and the JSON record of part (c).

Used by tests/reliability (pytest) and scripts/reliability.py; imported as
``from reliability.harness import ...`` with tests/ on sys.path."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import math
import os
import platform
import re
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cascada
from support import descendants as _descendants

#: Every pid this process has seen below it. A shm segment or ipc directory whose owner is
#: gone counts as ours only when its owner is in here: another test session on the same
#: machine leaves dead owners' files too, and they are not this run's leaks.
TRACKED: set[int] = set()


def descendants(pid: int) -> list[int]:
    """support.descendants, remembering what it saw below this process."""
    found = _descendants(pid)
    if pid == os.getpid() or pid in TRACKED:
        TRACKED.update(found)
    return found


def track_family() -> list[int]:
    """Note every live descendant now (call after spawning, before faults)."""
    return descendants(os.getpid())

# -- outcome classification ----------------------------------------------------------------

OK, FAIL, INFO = "ok", "fail", "info"

#: Typed errors that mean "the work did not run" (Jepsen's :fail).
KNOWN_NOT_RUN: tuple[type[BaseException], ...] = (
    cascada.ActorNotFound,
    cascada.SerializationError,
    cascada.ConfigurationError,
    cascada.ProtocolError,
    cascada.SystemClosed,
    cascada.TensorLost,
    cascada.PoolExhausted,
    cascada.TransportClosed,
    cascada.HandleNotPortable,
    cascada.ActorInitFailed,
)
#: Typed errors that mean "the work may or may not have run" (Jepsen's :info).
INDETERMINATE: tuple[type[BaseException], ...] = (cascada.ActorDied, cascada.DeadlineExceeded)


def classify(exc: BaseException | None) -> tuple[str, str | None, bool]:
    """(outcome, error_type, untyped) for a call that returned (exc None) or raised exc.

    A RemoteError (the handler ran and raised) is indeterminate for the checkers: what the
    handler did before raising is the application's business. Any other CascadaError not
    listed is indeterminate too; an exception that is not a CascadaError is indeterminate
    *and* counted as untyped, which the contract forbids."""
    if exc is None:
        return OK, None, False
    name = type(exc).__name__
    if isinstance(exc, KNOWN_NOT_RUN):
        return FAIL, name, False
    if isinstance(exc, INDETERMINATE):
        return INFO, name, False
    if isinstance(exc, cascada.CascadaError):
        return INFO, name, False
    return INFO, name, True


# -- history -----------------------------------------------------------------------------


@dataclass
class Op:
    """One call, Jepsen style: invoked at t_invoke, completed at t_complete with an outcome."""

    req_id: int
    idem_key: Any
    sender: str
    target: str
    target_incarnation: str | None
    method: str
    value: Any
    t_invoke: float
    t_complete: float | None = None
    outcome: str | None = None  # ok | fail | info; None while pending
    error_type: str | None = None
    untyped: bool = False
    hang: bool = False
    result: Any = None

    @property
    def latency(self) -> float | None:
        return None if self.t_complete is None else self.t_complete - self.t_invoke


@dataclass
class Event:
    """A nemesis action or a scenario mark, on the same monotonic clock as the ops."""

    t: float
    op: str
    pid: int | None = None
    detail: str | None = None


class History:
    """Every call and every fault of a run, on time.monotonic()."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.events: list[Event] = []
        self._ids = itertools.count(1)

    def mark(self, op: str, pid: int | None = None, detail: str | None = None) -> float:
        t = time.monotonic()
        self.events.append(Event(t, op, pid, detail))
        return t

    def invoke(self, target: str, method: str, value: Any = None, *, sender: str = "driver",
               idem_key: Any = None, target_incarnation: str | None = None) -> Op:
        op = Op(next(self._ids), idem_key, sender, target, target_incarnation, method, value, time.monotonic())
        self.ops.append(op)
        return op

    @staticmethod
    def complete(op: Op, exc: BaseException | None = None, result: Any = None, *, hang: bool = False) -> Op:
        op.t_complete = time.monotonic()
        if hang:
            op.outcome, op.error_type, op.untyped, op.hang = INFO, "hang", False, True
        else:
            op.outcome, op.error_type, op.untyped = classify(exc)
            op.result = result
        return op

    async def call(self, ref: cascada.ActorRef, method: str, *args: Any, tell: bool = False,
                   value: Any = None, idem_key: Any = None, sender: str = "driver",
                   hang_after: float | None = None, **kwargs: Any) -> Op:
        """ask (or tell) and record the outcome; never raises for the call's own errors.

        ``value`` is what the set checker sees for this op (default: the first argument).
        ``hang_after`` seconds without an outcome count the call as a hang (it is cancelled):
        the contract says no call hangs, so a hang is a failure of its own."""
        op = self.invoke(ref.name, method, args[0] if value is None and args else value, sender=sender,
                         idem_key=idem_key, target_incarnation=getattr(ref, "incarnation", None))
        coro = ref.tell(method, *args, **kwargs) if tell else ref.ask(method, *args, **kwargs)
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task}, timeout=hang_after)
        except asyncio.CancelledError:
            task.cancel()
            self.complete(op, hang=True)
            raise
        if not done:  # the watchdog, not the call, gave up: a hang
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return self.complete(op, hang=True)
        if task.cancelled():  # cancelled from below: no typed outcome
            op.t_complete, op.outcome, op.error_type, op.untyped = time.monotonic(), INFO, "CancelledError", True
            return op
        exc = task.exception()
        if exc is not None:
            return self.complete(op, exc)
        return self.complete(op, None, task.result())

    # -- summaries ---------------------------------------------------------------------------

    def errors(self) -> dict[str, int]:
        """Counts by error type, plus untyped and hangs (part (c) "errors")."""
        counts = Counter(op.error_type for op in self.ops if op.error_type and not op.hang)
        out: dict[str, int] = {"ActorDied": 0, "Timeout": 0, "Overloaded": 0}
        for name, n in counts.items():
            out["Timeout" if name == "DeadlineExceeded" else name] = n
        out["untyped"] = sum(op.untyped for op in self.ops)
        out["hangs"] = sum(op.hang for op in self.ops) + sum(op.outcome is None for op in self.ops)
        return out

    def outcomes(self) -> dict[str, int]:
        c = Counter(op.outcome or "pending" for op in self.ops)
        return {k: c.get(k, 0) for k in (OK, FAIL, INFO, "pending")}


# -- nemesis ---------------------------------------------------------------------------------


class NotOurProcess(RuntimeError):
    """The nemesis refused a pid that is not a descendant of this test process."""


class Nemesis:
    """Process faults by PID only, and only at descendants of this process.

    ``with Nemesis(history) as nem:`` -- every pid stopped with ``nem.stop`` is sent SIGCONT
    in the ``finally`` (if it is still ours), so no test leaves a stopped process behind."""

    def __init__(self, history: History | None = None) -> None:
        self.history = history if history is not None else History()
        self.stopped: set[int] = set()
        self.counts: Counter[str] = Counter()

    @staticmethod
    def _check(pid: int) -> None:
        if not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
            raise NotOurProcess(f"refusing to signal pid {pid!r}")
        if pid not in descendants(os.getpid()):
            raise NotOurProcess(f"pid {pid} is not a descendant of the test process {os.getpid()}")

    def _signal(self, pid: int, sig: signal.Signals, op: str) -> float:
        self._check(pid)
        t = self.history.mark(op, pid)
        os.kill(pid, sig)
        self.counts[op] += 1
        return t

    def kill9(self, pid: int) -> float:
        """SIGKILL pid; returns the monotonic time of the fault."""
        self.stopped.discard(pid)
        return self._signal(pid, signal.SIGKILL, "kill9")

    def term(self, pid: int) -> float:
        """SIGTERM pid (cascada drains an actor process on SIGTERM)."""
        return self._signal(pid, signal.SIGTERM, "sigterm")

    def stop(self, pid: int) -> float:
        t = self._signal(pid, signal.SIGSTOP, "sigstop")
        self.stopped.add(pid)
        return t

    def cont(self, pid: int) -> float:
        t = self._signal(pid, signal.SIGCONT, "sigcont")
        self.stopped.discard(pid)
        return t

    def heal(self) -> None:
        """SIGCONT every pid still stopped that is still ours (a dead one is skipped: its pid
        may belong to someone else by now)."""
        for pid in sorted(self.stopped):
            try:
                self.cont(pid)
            except (NotOurProcess, ProcessLookupError):
                self.stopped.discard(pid)

    def __enter__(self) -> Nemesis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()

    async def __aenter__(self) -> Nemesis:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.heal()

    def faults(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kill9": self.counts["kill9"], "sigstop": self.counts["sigstop"], "partition_s": 0}
        if self.counts["sigterm"]:
            out["sigterm"] = self.counts["sigterm"]
        return out


# -- checkers ------------------------------------------------------------------------------


@dataclass
class SetResult:
    attempted: int
    acknowledged: int
    ok: int
    lost: list[Any]
    recovered: list[Any]
    unexpected: list[Any]
    duplicated: dict[Any, int]
    indeterminate: int
    failed_but_present: list[Any]
    valid: bool

    def counts(self) -> dict[str, int | None]:
        """The part (c) "delivery" block."""
        return {
            "attempted": self.attempted, "acknowledged": self.acknowledged, "ok": self.ok,
            "lost": len(self.lost), "recovered": len(self.recovered), "unexpected": len(self.unexpected),
            "indeterminate": self.indeterminate, "executed_more_than_once": len(self.duplicated),
            "deduped": None,
        }


def check_set(ops: Iterable[Op], executed: Mapping[Any, int], *, allow_duplicates: bool = False) -> SetResult:
    """Jepsen's set checker. ``ops`` are add operations whose ``value`` is the element;
    ``executed`` is the sink's count of executions per element (the final read).

    - attempted: elements some op tried to add; acknowledged: those with an ``ok`` op.
    - ok: attempted elements present in the sink.
    - lost: acknowledged but absent. recovered: indeterminate (no ``ok``) but present.
    - unexpected: present but never attempted.
    - duplicated: executed more than once. failed_but_present: an op said "did not run"
      (``fail``) and no other op for it ended ``ok``/``info``, yet the sink has it.
    Valid when nothing is lost, unexpected or failed-but-present (and, unless
    ``allow_duplicates``, nothing ran twice)."""
    by_value: dict[Any, list[Op]] = {}
    for op in ops:
        by_value.setdefault(op.value, []).append(op)
    present = {k for k, n in executed.items() if n > 0}
    attempted = set(by_value)
    acknowledged = {k for k, os_ in by_value.items() if any(o.outcome == OK for o in os_)}
    indeterminate = {k for k, os_ in by_value.items() if k not in acknowledged
                     and any(o.outcome in (INFO, None) for o in os_)}
    failed_only = {k for k, os_ in by_value.items() if all(o.outcome == FAIL for o in os_)}
    lost = sorted(acknowledged - present, key=repr)
    recovered = sorted(indeterminate & present, key=repr)
    unexpected = sorted(present - attempted, key=repr)
    failed_but_present = sorted(failed_only & present, key=repr)
    duplicated = {k: n for k, n in executed.items() if n > 1}
    valid = not lost and not unexpected and not failed_but_present and (allow_duplicates or not duplicated)
    return SetResult(len(attempted), len(acknowledged), len(attempted & present), lost, recovered, unexpected,
                     duplicated, len(indeterminate), failed_but_present, valid)


@dataclass
class FifoResult:
    pairs: int
    received: int
    violations: list[tuple[Any, Any, Any]]  # (pair, previous seq, seq) where seq <= previous
    gaps: list[tuple[Any, Any]]  # (pair, missing seq)
    unexplained_gaps: list[tuple[Any, Any]]  # gaps with no error on the sender's side
    valid: bool


def check_fifo(received: Iterable[tuple[Hashable, int]],
               sent: Mapping[Hashable, Sequence[int]] | None = None,
               errored: Mapping[Hashable, Iterable[int]] | None = None) -> FifoResult:
    """Per-pair FIFO (A2): for each pair (sender, receiver incarnation), the sequence numbers
    seen by the receiver, in the order it saw them, must strictly increase. Gaps (numbers the
    sender sent, per ``sent``, that never arrived) are allowed only where the sender got an
    error for that number (``errored``); other gaps are unexplained, which is a loss."""
    last: dict[Hashable, int] = {}
    seen: dict[Hashable, set[int]] = {}
    violations: list[tuple[Any, Any, Any]] = []
    n = 0
    for pair, seq in received:
        n += 1
        prev = last.get(pair)
        if prev is not None and seq <= prev:
            violations.append((pair, prev, seq))
        else:
            last[pair] = seq
        seen.setdefault(pair, set()).add(seq)
    gaps: list[tuple[Any, Any]] = []
    unexplained: list[tuple[Any, Any]] = []
    if sent is not None:
        for pair, seqs in sent.items():
            got = seen.get(pair, set())
            bad = set(errored.get(pair, ())) if errored else set()
            for seq in seqs:
                if seq not in got:
                    gaps.append((pair, seq))
                    if seq not in bad:
                        unexplained.append((pair, seq))
    pairs = set(seen) | set(sent or {})
    return FifoResult(len(pairs), n, violations, gaps, unexplained, not violations and not unexplained)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def latency_summary(values_s: Sequence[float]) -> dict[str, Any]:
    """count, p50, p95, p99 and max in milliseconds."""
    ms = [v * 1000.0 for v in values_s]

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {"count": len(ms), "p50": r(percentile(ms, 50)), "p95": r(percentile(ms, 95)),
            "p99": r(percentile(ms, 99)), "max": r(max(ms) if ms else None)}


def latency_by_phase(ops: Iterable[Op], phases: Sequence[tuple[str, float, float]], *,
                     outcomes: tuple[str, ...] = (OK,)) -> dict[str, dict[str, Any]]:
    """Latency per phase: ``phases`` are (name, start, end) on the monotonic clock (for
    example before the fault, during it, after recovery). An op belongs to the phase its
    invocation falls in; only completed ops with one of ``outcomes`` count."""
    out: dict[str, list[float]] = {name: [] for name, _s, _e in phases}
    for op in ops:
        if op.t_complete is None or op.outcome not in outcomes:
            continue
        for name, start, end in phases:
            if start <= op.t_invoke < end:
                out[name].append(op.t_complete - op.t_invoke)
                break
    return {name: latency_summary(v) for name, v in out.items()}


# -- resources -----------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of pid in KiB (empty when it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def max_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of pid in MiB, None when it is gone."""
    kib = proc_status(pid).get("VmHWM")
    return None if kib is None else round(kib / 1024.0, 2)


def rss_mib(pid: int) -> float | None:
    kib = proc_status(pid).get("VmRSS")
    return None if kib is None else round(kib / 1024.0, 2)


def fd_targets(pid: int | None = None) -> dict[int, str]:
    base = f"/proc/{pid if pid is not None else 'self'}/fd"
    out: dict[int, str] = {}
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for fd in names:
        try:
            out[int(fd)] = os.readlink(f"{base}/{fd}")
        except OSError:
            pass
    return out


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def shm_segments() -> set[str]:
    return set(glob.glob("/dev/shm/cascada-*"))


def shm_segments_of(pid: int) -> set[str]:
    return set(glob.glob(f"/dev/shm/cascada-{pid}-*"))


_IPC_DIR = re.compile(r"^cascada-(\d+)-[A-Za-z0-9_]+$")  # IpcDirectory's names: cascada-<owner pid>-...


def ipc_files(tmpdir: str | None = None, *, owners: Iterable[int] | None = None) -> set[str]:
    """cascada's private ipc directories under the temp dir, and every file in them.

    Only directories of ``owners`` (default: this process, or a process it saw below it; see
    TRACKED): another test session's systems are not ours."""
    base = tmpdir or tempfile.gettempdir()
    wanted = set(owners) if owners is not None else None
    out: set[str] = set()
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        m = _IPC_DIR.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if wanted is not None and pid not in wanted:
            continue
        if wanted is None and pid != os.getpid() and pid not in TRACKED:
            continue
        d = os.path.join(base, name)
        out.add(d)
        out.update(glob.glob(os.path.join(d, "*")))
    return out


def process_gone(pid: int) -> bool:
    """True when pid no longer runs (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rfind(b")") + 2:][:1] in (b"Z", b"X")


def ppid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rfind(b")") + 2:].split()[1])


async def wait_gone(pids: Iterable[int], bound: float) -> tuple[list[int], float]:
    """Wait up to ``bound`` seconds for every pid to be gone: (still alive, seconds waited)."""
    pids = list(pids)
    t0 = time.monotonic()
    alive = [p for p in pids if not process_gone(p)]
    while alive and time.monotonic() - t0 < bound:
        await asyncio.sleep(0.01)
        alive = [p for p in alive if not process_gone(p)]
    return alive, time.monotonic() - t0


@dataclass
class Resources:
    """What this process and its family hold at one moment."""

    t: float
    descendants: list[int]
    fds: dict[int, str]
    shm: set[str]
    ipc: set[str]
    rss_mib: dict[int, float | None] = field(default_factory=dict)
    max_rss_mib: dict[int, float | None] = field(default_factory=dict)
    fd_counts: dict[int, int | None] = field(default_factory=dict)

    @classmethod
    def take(cls, pids: Iterable[int] = ()) -> Resources:
        pids = list(pids)
        return cls(time.monotonic(), descendants(os.getpid()), fd_targets(), shm_segments(), ipc_files(),
                   {p: rss_mib(p) for p in pids}, {p: max_rss_mib(p) for p in pids},
                   {p: fd_count(p) for p in pids})


def _leaked_fd(target: str) -> bool:
    return target.startswith(("socket:", "anon_inode:")) or "cascada-" in target


def leaks_since(before: Resources, after: Resources | None = None, *,
                settle: float = 3.0) -> dict[str, Any]:
    """The part (c) "leaks_after" block: what is left now that was not there before.

    Descendants get ``settle`` seconds to exit. Segments count only when their owner is
    this process or a dead process that was seen below it (TRACKED)."""
    if after is None:
        deadline = time.monotonic() + settle
        after = Resources.take()
        while set(after.descendants) - set(before.descendants) and time.monotonic() < deadline:
            time.sleep(0.02)
            after = Resources.take()
    procs = sorted(set(after.descendants) - set(before.descendants))
    fds = {fd: t for fd, t in after.fds.items() if before.fds.get(fd) != t and _leaked_fd(t)}

    def ours(seg: str) -> bool:
        try:
            owner = int(os.path.basename(seg).split("-")[1])
        except (IndexError, ValueError):
            return False
        return owner == os.getpid() or (owner in TRACKED and process_gone(owner))

    shm = sorted(s for s in after.shm - before.shm if ours(s))
    ipc = sorted(after.ipc - before.ipc)
    return {"processes": len(procs), "fds": len(fds), "shm_segments": len(shm), "ipc_files": len(ipc),
            "leases": None, "gpu_bytes": None,
            "detail": {"processes": procs, "fds": sorted(fds.values()), "shm_segments": shm, "ipc_files": ipc}}


# -- records (part c) ----------------------------------------------------------------------


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


_COMMIT: list[str | None] = []


def commit() -> str | None:
    if not _COMMIT:
        _COMMIT.append(_git_commit())
    return _COMMIT[0]


def env_block(transport: str = "ipc") -> dict[str, Any]:
    import msgpack
    import zmq

    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "msgpack": ".".join(map(str, msgpack.version)), "transport": transport, "H_ms": None, "L": None}


def new_record(scenario: str, variant: str | None = None, *, seed: int | None = None,
               mode: str = "at_most_once", transport: str = "ipc") -> dict[str, Any]:
    """A part (c) record with every figure null; the scenario fills what applies."""
    return {
        "scenario": scenario, "variant": variant, "commit": commit(), "seed": seed, "mode": mode,
        "env": env_block(transport),
        "faults": {"kill9": 0, "sigstop": 0, "partition_s": 0},
        "delivery": None,
        "errors": {"ActorDied": 0, "Timeout": 0, "Overloaded": 0, "untyped": 0, "hangs": 0},
        "recovery_ms": None,
        "latency_ms": None,
        "throughput_rps": None,
        "memory": None,
        "leaks_after": None,
        "figures": {},
        "violations": [],
        "pass": None,
    }


class Outcome:
    """What a scenario run produced: its record, and the expectations it broke."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.violations: list[str] = record["violations"]

    def expect(self, condition: Any, message: str) -> bool:
        """Note a broken expectation (the run continues, so the record stays complete)."""
        if not condition:
            self.violations.append(message)
        return bool(condition)

    def finish(self) -> Outcome:
        self.record["pass"] = not self.violations
        return self

    def assert_ok(self) -> None:
        assert not self.violations, "; ".join(self.violations)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then t[0] is the elapsed seconds."""
    box: list[float] = []
    t0 = time.monotonic()
    try:
        yield box
    finally:
        box.append(time.monotonic() - t0)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def jsonable(value: Any) -> Any:
    """Make a record JSON-safe (sets, tuples and dataclasses inside figures)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if hasattr(value, "__dataclass_fields__"):
        return jsonable(asdict(value))
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
