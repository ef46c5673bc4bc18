"""Transport and hostile-input scenarios of RELIABILITY.md part (b): R12, R17, R18, R20, R21,
R22. Like reliability/scenarios.py, each scenario is a coroutine that runs the fault, checks
what the contract expects, and returns an :class:`Outcome` (its part (c) record and the
expectations it broke); tests/reliability/test_scenarios_wire.py asserts there are none and
scripts/reliability.py prints the records.

Where a unit or property test already covers a point, the scenario here exercises it against
a live actor process instead of repeating it, and the record says which test covers the rest:

- decoder limits, hostile headers, five-byte bombs: tests/test_wire.py;
- the whole decode path under fuzzing (bytes, batches, out-of-band frames, descriptors):
  tests/test_fuzz_decode.py and scripts/fuzz_decode.py;
- hostile tensor descriptors for both libraries, torch included: tests/test_tensor_units.py;
- malformed frames into a process actor, and forged refs: tests/test_process.py;
- pickles on every wire path (a canary file): R23 in reliability/scenarios.py.

Machine limits: no network namespaces are used. "A peer vanishes" (R12) is SIGKILL of every
process of the peer, or SIGSTOP without a SIGCONT; delay, jitter and resets (R17) come from
an asyncio proxy on 127.0.0.1 (reliability/chaos_proxy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pickle
import random
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.utils.monitor

import cascada
from cascada.transport import Codec, Envelope, Kind
from cascada.transport._endpoints import (
    IPC_PATH_MAX,
    IpcDirectory,
    check_endpoint,
    check_ipc_listener,
    claim_ipc_path,
    listener_pid,
    socket_identity,
    sweep_dead_ipc_dirs,
)
from cascada.transport._errors import EndpointConflict
from cascada.transport._tensors import EXT_TENSOR, ITEMSIZE
from cascada.transport._wire import BATCH_MARKER, DEFAULT_MAX_HEADER_BYTES
from reliability.actors import Bystander, Sink
from reliability.chaos_proxy import ChaosProxy, Schedule
from reliability.scenarios import _finish as finish_outcome
from reliability.harness import (
    History,
    Nemesis,
    Outcome,
    Resources,
    check_fifo,
    leaks_since,
    ms,
    new_record,
    process_gone,
    proc_status,
    track_family,
)

DEATH_DETECT_S = 2.0  # README "Errors": pending calls fail "under two seconds" after a kill
SEND_SLACK_S = 0.5  # how long past its deadline a send may return on 2 noisy cores
RECONNECT_IVL_MAX_S = 2.0  # transport/_socket.py configure(): ZMQ_RECONNECT_IVL_MAX
BOMB_BOUND_MIB = 16.0  # R21: what one hostile message may add to the receiver's peak RSS
AMPLIFICATION = 80  # bytes of objects per header byte, at most (README; containers in big headers are now
# counted, so the (f) bombs stay far under it: see r21_amplification for the 16 MiB bound)
REPLY_WAIT_S = 5.0

# -- shared pieces ------------------------------------------------------------------------


def _finish(out: Outcome, before: Resources | None, hist: History | None = None) -> Outcome:
    return finish_outcome(out, hist, before)


def ask_frame(corr: int, method: str = "ping", args: list[Any] | None = None, *, target: str | None = "victim",
              kwargs: dict[str, Any] | None = None, kind: int = 1, incarnation: Any = None) -> bytes:
    """A request header as a hostile peer writes it by hand (msgpack, no cascada encoder)."""
    head = [1, kind, corr, "raw", target, method, None, [[1] if args is None else args, kwargs], None]
    if incarnation is not None:
        head.append(incarnation)
    packed: bytes = msgpack.packb(head)
    return packed


def readable_corr(frame: bytes) -> int | None:
    """The oracle for "a reply address exists": the correlation id of a request (ASK or
    STREAM) when the first three header fields can be read, whatever follows them. Reads
    only a prefix, tolerates bad UTF-8 and unknown ext types; a batch frame has none."""
    if not frame or frame[:1] == BATCH_MARKER:
        return None
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False, ext_hook=lambda code, data: None,
                                max_buffer_size=64)
    unpacker.feed(bytes(frame[:32]))
    try:
        if unpacker.read_array_header() < 3:
            return None
        version, kind, corr = unpacker.unpack(), unpacker.unpack(), unpacker.unpack()
    except Exception:  # noqa: BLE001 - unreadable prefix: no reply address
        return None
    if version == 1 and type(kind) is int and kind in (1, 3) and type(corr) is int and corr > 0:
        return corr
    return None


class RawPeer:
    """A plain pyzmq DEALER: what a hostile or buggy peer uses. Replies are decoded with a
    cascada Codec (batches included) and kept by correlation id."""

    def __init__(self, endpoint: str, *, monitor: bool = False) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.mon: zmq.Socket[Any] | None = None
        if monitor:
            self.mon = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        self.sock.connect(endpoint)
        self.codec = Codec()
        self.replies: dict[int, Envelope] = {}
        self.undecodable = 0
        self.disconnects = 0

    def send(self, frames: Sequence[bytes]) -> None:
        self.sock.send_multipart(list(frames))

    def _drain(self) -> None:
        while self.sock.poll(0):
            data = self.sock.recv()
            try:
                envs, err = self.codec.decode_all([data])
            except cascada.ProtocolError:
                self.undecodable += 1
                continue
            self.undecodable += err is not None
            for env in envs:
                self.replies[env.corr] = env
        if self.mon is not None:
            while self.mon.poll(0):
                event = zmq.utils.monitor.recv_monitor_message(self.mon)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self.disconnects += 1

    async def wait_for(self, corr: int, timeout: float = REPLY_WAIT_S) -> Envelope | None:
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            env = self.replies.get(corr)
            if env is not None or time.monotonic() >= deadline:
                return env
            await asyncio.sleep(0.002)

    async def sentinel(self, corr: int, timeout: float = REPLY_WAIT_S) -> bool:
        """A good request on this connection, answered: everything sent before it on this
        connection has been handled (a node reads one connection in order)."""
        self.send([ask_frame(corr, "ping", [corr])])
        env = await self.wait_for(corr, timeout)
        return env is not None and env.kind is Kind.REPLY and env.body == corr

    def close(self) -> None:
        if self.mon is not None:
            self.mon.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()


async def _rejected(system: cascada.ActorSystem, ref: cascada.ActorRef) -> int:
    return int((await system.stats(ref, timeout=10))["node"]["rejected_frames"])


def _reset_peak(pid: int) -> bool:
    """Reset pid's VmHWM to its current RSS (Linux >= 4.0, /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- actors --------------------------------------------------------------------------------


class Relay(cascada.Actor):
    """A slow consumer that reports every message it handles to a witness, which outlives it
    (R12: what a killed actor had handled before it died)."""

    def __init__(self, witness: cascada.ActorRef, per_message: float) -> None:
        self.witness = witness
        self.per_message = per_message

    async def eat(self, seq: int, payload: bytes) -> None:
        await self.witness.tell("record", seq)
        await asyncio.sleep(self.per_message)


class Flooder(cascada.Actor):
    """Sends to a target as fast as it lets it, every send with its own deadline, and keeps a
    compact account: which tells were accepted, errors by type, how long sends blocked."""

    async def pid(self) -> int:
        return os.getpid()

    async def flood(self, target: cascada.ActorRef, seconds: float, timeout: float, ask_every: int = 0,
                    size: int = 100) -> dict[str, Any]:
        payload = b"x" * size
        accepted: list[int] = []
        errors: Counter[str] = Counter()
        first_error: dict[str, float] = {}
        slow: list[list[Any]] = []  # [wall start, seconds, kind, outcome] of sends over 50 ms
        max_block = 0.0
        after_error_max = 0.0  # the longest send once the first ActorDied was seen
        seq = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            is_ask = bool(ask_every) and seq % ask_every == 0
            died_seen = "ActorDied" in first_error
            t_wall, t0 = time.time(), time.monotonic()
            outcome = "ok"
            try:
                if is_ask:
                    await target.ask("eat", seq, payload, timeout=timeout)
                else:
                    await target.tell("eat", seq, payload, timeout=timeout)
            except cascada.CascadaError as exc:
                outcome = type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - untyped: the contract forbids it
                outcome = f"untyped:{type(exc).__name__}"
            dt = time.monotonic() - t0
            if outcome == "ok":
                accepted.append(seq)
            else:
                errors[outcome] += 1
                first_error.setdefault(outcome, time.time())  # when it was known
            max_block = max(max_block, dt)
            if died_seen:
                after_error_max = max(after_error_max, dt)
            if dt > 0.05 and len(slow) < 500:
                slow.append([t_wall, dt, "ask" if is_ask else "tell", outcome])
            seq += 1
            if seq % 256 == 0:
                await asyncio.sleep(0)  # a failing send never yields; let the node breathe
        return {"sent": seq, "accepted": accepted, "errors": dict(errors), "first_error": first_error,
                "max_block_s": max_block, "after_died_max_s": after_error_max, "slow": slow}


class SeqReceiver(cascada.Actor):
    """Records (sender tag, sequence number) in arrival order (R17)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []

    async def take(self, tag: str, seq: int) -> int:
        self.log.append((tag, seq))
        return seq

    async def drain_log(self) -> list[Any]:
        log, self.log = self.log, []
        return [list(x) for x in log]


class SeqSender(cascada.Actor):
    """Asks ``take(tag, seq)`` for seq = 0..n-1 in order, up to ``window`` in flight (R17).
    Every ``short_every``-th ask gets a deadline too short to make it (a cancel at a random
    point). Returns the seqs acknowledged and the typed error of each one that failed."""

    async def run(self, target: cascada.ActorRef, tag: str, n: int, window: int, timeout: float,
                  short_every: int = 0) -> dict[str, Any]:
        room = asyncio.Semaphore(window)
        ok: list[int] = []
        errored: dict[int, str] = {}

        async def one(seq: int, t: float) -> None:
            try:
                got = await target.ask("take", tag, seq, timeout=t)
                if got == seq:
                    ok.append(seq)
                else:
                    errored[seq] = f"wrong reply {got!r}"
            except cascada.CascadaError as exc:
                errored[seq] = type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - untyped: the contract forbids it
                errored[seq] = f"untyped:{type(exc).__name__}"
            finally:
                room.release()

        tasks = []
        for seq in range(n):
            await room.acquire()
            t = 0.0005 if short_every and seq % short_every == short_every - 1 else timeout
            tasks.append(asyncio.ensure_future(one(seq, t)))  # tasks start, and send, in order
        await asyncio.gather(*tasks)
        return {"ok": ok, "errored": {str(k): v for k, v in errored.items()}}


class Caller(cascada.Actor):
    """Asks another actor on our behalf, from its own (fresh) process (R18)."""

    async def call(self, target: cascada.ActorRef, method: str, arg: Any, timeout: float) -> list[Any]:
        try:
            return ["ok", await target.ask(method, arg, timeout=timeout)]
        except cascada.CascadaError as exc:
            return ["error", type(exc).__name__, str(exc)]


class Describer(cascada.Actor):
    """Says what it received (R22): for arrays, dtype, shape, bytes and a checksum."""

    def __init__(self) -> None:
        self.described = 0

    async def ping(self, x: Any = None) -> Any:
        return x

    async def calls(self) -> int:
        return self.described

    async def describe(self, *args: Any, **kwargs: Any) -> list[Any]:
        self.described += 1
        out: list[Any] = []
        for x in args:
            if hasattr(x, "dtype") and hasattr(x, "shape") and hasattr(x, "tobytes"):
                data = x.tobytes()
                out.append(["array", str(x.dtype), [int(n) for n in x.shape], int(x.nbytes), len(data),
                            zlib.crc32(data)])
            else:
                out.append(["value", type(x).__name__])
        return out


# =========================================================================================
# R12: a peer vanishes silently and never returns
# =========================================================================================


def _rss_slope(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) samples, in MiB/s."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in samples) / den


async def _sample_rss(pid: int, until: asyncio.Future[Any], every: float = 0.05) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    while not until.done():
        kib = proc_status(pid).get("VmRSS")
        if kib is not None:
            out.append((time.monotonic(), kib / 1024.0))
        await asyncio.sleep(every)
    return out


async def r12_peer_vanishes(how: str, transport: str = "ipc", *, timeout: float = 0.3, per_message: float = 0.002,
                            before_s: float = 0.6, gone_s: float = 1.5, after_kill_s: float = 1.0,
                            rss_flat_mib: float = 2.0) -> Outcome:
    """A sender floods a slow actor (tells, every 8th an ask, each with a ``timeout``
    deadline; mailbox and hwm 16, so the queues fill) when every process of that actor is
    SIGKILLed (``how="kill9"``), or SIGSTOPped and never continued (``"sigstop"``: it is
    SIGKILLed only after ``gone_s``, to clean up).

    Expect: no send blocks past its deadline (+ SEND_SLACK_S); after the kill, sends fail with
    ActorDied within DEATH_DETECT_S and then at once; while the peer is stopped, sends end
    with DeadlineExceeded at their deadline; the sender's RSS stays flat while the peer is
    gone; every error is typed. Messages accepted but never handled (queued to the dead peer)
    are counted here from a witness the victim reported to."""
    out = Outcome(new_record("R12", f"{how}: the peer never returns ({transport}, hwm 16, deadline {timeout:g}s)",
                             transport=transport))
    rec = out.record
    hist = History()
    before = Resources.take()
    flood_s = before_s + (gone_s if how == "sigstop" else 0.0) + after_kill_s
    tcp: Any = transport  # checked by ActorSystem
    async with cascada.ActorSystem(hwm=16, mailbox_size=16, transport=tcp) as system, Nemesis(hist) as nem:
        witness = await system.spawn(Sink, name="verifier")
        target = await system.spawn(Relay, witness, per_message, name="decoder")
        sender = await system.spawn(Flooder, name="router")
        track_family()
        stop_rss = asyncio.get_running_loop().create_future()
        sampler = asyncio.ensure_future(_sample_rss(sender.pid, stop_rss))
        flood = asyncio.ensure_future(sender.ask("flood", target, flood_s, timeout, ask_every=8, timeout=flood_s + 30))
        t0 = time.monotonic()
        await asyncio.sleep(before_s)  # the flood's own length; the fault lands part way
        t_stop: float | None = None
        t_stop_wall: float | None = None
        if how == "sigstop":
            t_stop_wall = time.time()
            t_stop = nem.stop(target.pid)
            await asyncio.sleep(gone_s)
        t_kill_wall = time.time()
        t_kill = nem.kill9(target.pid)
        res = await flood
        stop_rss.set_result(None)
        samples = await sampler
        handled = {k for k, n in await witness.ask("executed", timeout=10) for _ in range(n)}
        alive_after = await sender.ask("pid", timeout=10) == sender.pid
    accepted = set(res["accepted"])
    discarded = sorted(accepted - handled)
    bound = timeout + SEND_SLACK_S
    out.expect(res["max_block_s"] <= bound, f"a send blocked {res['max_block_s']:.3f}s > deadline + slack {bound:.3f}s")
    untyped = {k: v for k, v in res["errors"].items() if k.startswith("untyped:")}
    out.expect(not untyped, f"untyped errors: {untyped}")
    died_at = res["first_error"].get("ActorDied")
    detect = None if died_at is None else died_at - t_kill_wall
    out.expect(detect is None or detect >= 0.0, f"ActorDied came {-(detect or 0):.3f}s before the kill: a false death")
    out.expect(detect is not None and detect <= DEATH_DETECT_S,
               f"no ActorDied within {DEATH_DETECT_S}s of the kill (first after {detect})")
    out.expect(res["after_died_max_s"] <= 0.1 + SEND_SLACK_S,
               f"a send to the known-dead peer took {res['after_died_max_s']:.3f}s (want: fail at once)")
    if how == "sigstop":
        timeouts = res["errors"].get("DeadlineExceeded", 0)
        out.expect(timeouts >= 1, "no send ended with DeadlineExceeded while the peer was stopped")
        # Only sends that ended before the kill: one still waiting for its deadline when the
        # SIGKILL lands ends with ActorDied, and rightly so.
        stopped_ops = [s for s in res["slow"]
                       if t_stop_wall is not None and s[0] >= t_stop_wall and s[0] + s[1] < t_kill_wall]
        wrong = [s for s in stopped_ops if s[3] not in ("ok", "DeadlineExceeded")]
        out.expect(not wrong, "sends to the stopped peer, ended before the kill, ended "
                   + ", ".join(f"{s[3]} (started {s[0] - t_stop_wall:.3f}s after the stop, took {s[1]:.3f}s, "
                               f"kill at {t_kill_wall - t_stop_wall:.3f}s)" for s in wrong[:3] if t_stop_wall))
    out.expect(alive_after, "the sender did not survive its peer's death")
    # Memory while the peer is gone: from shortly after the fault to the end of the flood.
    fault_mono = t_stop if t_stop is not None else t_kill
    gone = [(t - t0, v) for t, v in samples if t >= fault_mono + 0.2]
    slope = _rss_slope(gone)
    rise = (max(v for _, v in gone) - gone[0][1]) if gone else None
    out.expect(rise is not None and rise <= rss_flat_mib,
               f"the sender's RSS rose {rise} MiB while the peer was gone (> {rss_flat_mib} MiB)")
    rec["faults"] = nem.faults()
    rec["errors"] = {"ActorDied": res["errors"].get("ActorDied", 0), "Timeout": res["errors"].get("DeadlineExceeded", 0),
                     "Overloaded": 0, "untyped": sum(untyped.values()), "hangs": 0}
    rec["recovery_ms"] = {"detect_p50": ms(detect), "detect_max": ms(detect), "restart_p50": None,
                          "first_ok_after_fault_p95": None}
    rec["memory"] = {"max_rss_mib": {"router": round(max(v for _, v in samples), 2) if samples else None},
                     "rss_delta_over_baseline_mib": None}
    rec["figures"] = {
        "sent": res["sent"], "accepted": len(accepted), "handled_by_victim": len(handled),
        "queued_then_discarded": len(discarded),
        "max_send_block_ms": ms(res["max_block_s"]), "deadline_ms": ms(timeout),
        "max_send_block_after_death_ms": ms(res["after_died_max_s"]),
        "errors_by_type": res["errors"], "rss_rise_while_gone_mib": None if rise is None else round(rise, 3),
        "rss_slope_mib_per_s": None if slope is None else round(slope, 4), "rss_samples": len(gone),
        "silent_drops_counted_by_runtime": None,
    }
    return _finish(out, before)


async def _immediate_floor(directory: str) -> dict[str, int]:
    """Raw pyzmq, no cascada: a DEALER queues messages for a ROUTER that is not reading; the
    ROUTER goes away; a new one binds the same path. How many queued messages reach the
    newcomer, with ZMQ_IMMEDIATE 0 (libzmq's default, cascada's DEALERs) and 1?"""
    out: dict[str, int] = {}
    for immediate in (0, 1):
        path = f"ipc://{directory}/floor-{immediate}.ipc"
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            old = ctx.socket(zmq.ROUTER)
            old.setsockopt(zmq.LINGER, 0)
            old.setsockopt(zmq.RCVHWM, 4)
            old.bind(path)
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.SNDHWM, 16)
            dealer.setsockopt(zmq.IMMEDIATE, immediate)
            dealer.setsockopt(zmq.RECONNECT_IVL, 50)
            dealer.connect(path)
            deadline = time.monotonic() + 2.0
            while not dealer.poll(0, zmq.POLLOUT) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)  # connected (IMMEDIATE=1 has no pipe before that)
            queued = 0
            blob = b"x" * (64 << 10)  # large, so the kernel's buffers fill and the DEALER's pipe holds some
            while time.monotonic() < deadline:
                try:
                    dealer.send(blob, zmq.NOBLOCK)
                    queued += 1
                except zmq.Again:
                    if dealer.poll(100, zmq.POLLOUT):
                        continue
                    break
            old.close(linger=0)  # the peer vanishes
            await asyncio.sleep(0.2)
            new = ctx.socket(zmq.ROUTER)
            new.setsockopt(zmq.LINGER, 0)
            new.bind(path)
            got = 0
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                if new.poll(0):
                    new.recv_multipart()
                    got += 1
                    end = min(end, time.monotonic() + 0.2)
                else:
                    await asyncio.sleep(0.01)
            out[f"immediate_{immediate}_queued"] = queued
            out[f"immediate_{immediate}_replayed"] = got
            new.close(linger=0)
            dealer.close(linger=0)
        finally:
            ctx.term()
    return out


async def r12_no_replay_to_a_later_listener(per_message: float = 0.002, timeout: float = 0.3,
                                            fill_s: float = 1.0) -> Outcome:
    """Messages queued to a peer that died are discarded (and counted), never delivered to
    whatever listens on that endpoint later: a restart on the same endpoint (R13), a reused
    tcp port. The sender fills its queue to a SIGSTOPped actor, the actor is SIGKILLed, and a
    new listener binds its ipc path; it must receive nothing within the reconnect interval.
    A raw-pyzmq floor shows the same with ZMQ_IMMEDIATE 0 and 1."""
    out = Outcome(new_record("R12", "queued messages are not replayed to a later listener"))
    rec = out.record
    hist = History()
    before = Resources.take()
    replayed: list[Envelope] = []
    scratch = tempfile.mkdtemp(prefix="rel-r12-")
    try:
        floor = await _immediate_floor(scratch)
        async with cascada.ActorSystem(hwm=16, mailbox_size=16) as system, Nemesis(hist) as nem:
            witness = await system.spawn(Sink, name="verifier")
            target = await system.spawn(Relay, witness, per_message, name="decoder")
            sender = await system.spawn(Flooder, name="router")
            track_family()
            endpoint, path = target.endpoint, target.endpoint[len("ipc://"):]
            nem.stop(target.pid)
            res = await sender.ask("flood", target, fill_s, timeout, timeout=fill_s + 30)
            nem.kill9(target.pid)
            deadline = time.monotonic() + DEATH_DETECT_S
            while os.path.exists(path) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            out.expect(not os.path.exists(path), "the dead actor's socket file is still there")
            # The sender must know the peer is dead before the newcomer appears.
            probe = await sender.ask("flood", target, 0.05, timeout, timeout=30)
            out.expect(probe["errors"].get("ActorDied", 0) >= 1, f"the sender does not see the death: {probe['errors']}")
            handled = {k for k, n in await witness.ask("executed", timeout=10) for _ in range(n)}
            later: zmq.Context[Any] = zmq.Context()
            newcomer = later.socket(zmq.ROUTER)
            newcomer.setsockopt(zmq.LINGER, 0)
            try:
                newcomer.bind(endpoint)
                codec = Codec()
                # Watch for a reconnect interval and more; once something came, until it is quiet.
                end = time.monotonic() + RECONNECT_IVL_MAX_S + 1.0
                while time.monotonic() < end:
                    if newcomer.poll(0):
                        frames = newcomer.recv_multipart()
                        envs, _err = codec.decode_all(frames, 1)
                        replayed.extend(envs)
                        end = min(end, time.monotonic() + 0.3)
                    else:
                        await asyncio.sleep(0.01)
            finally:
                newcomer.close(linger=0)
                later.term()
            stats = (await system.stats(sender, timeout=10))["node"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    accepted = set(res["accepted"])
    discarded = accepted - handled
    replayed_seqs = [e.body[0][0] for e in replayed if e.kind is Kind.TELL or e.kind is Kind.ASK]
    failed_but_replayed = [s for s in replayed_seqs if s not in accepted]
    out.expect(not replayed, f"{len(replayed)} messages queued to the dead peer were delivered to the next "
                             f"listener on its endpoint ({len(failed_but_replayed)} of them had failed with "
                             "DeadlineExceeded at the sender)")
    counters = {k: v for k, v in stats.items() if "discard" in k or "drop" in k}
    out.expect(any(v >= 1 for v in counters.values()),
               f"the sender's node counts no discarded messages (stats: {sorted(stats)}); "
               f"{len(discarded)} accepted messages never reached the dead peer")
    rec["faults"] = nem.faults()
    rec["figures"] = {"accepted": len(accepted), "handled_by_victim": len(handled),
                      "queued_then_discarded": len(discarded), "replayed_to_later_listener": len(replayed),
                      "replayed_that_had_failed_at_sender": len(failed_but_replayed),
                      "sender_errors": res["errors"], "runtime_discard_counters": counters,
                      "raw_pyzmq_floor": floor}
    return _finish(out, before)


# =========================================================================================
# R17: per-pair FIFO under delays and reconnects
# =========================================================================================


@dataclass
class R17Example:
    schedule: Schedule
    senders: int
    n: int
    window: int
    short_every: int


@dataclass
class R17Result:
    example: R17Example
    violations: list[Any]
    unexplained_gaps: list[Any]
    gaps: int
    errored: int
    errors: dict[str, int]
    phantom_acks: list[Any]
    resets: int
    connections: int
    seconds: float


class R17Bench:
    """One tcp system, a receiver and up to four senders, reused across examples. Each
    example gets its own chaos proxy (kept open to the end, so no later proxy reuses its
    port while old connections still retry it) and its own sender tags."""

    def __init__(self, max_senders: int = 4, timeout: float = 5.0) -> None:
        self.max_senders = max_senders
        self.timeout = timeout
        self.system = cascada.ActorSystem(transport="tcp")
        self.proxies: list[ChaosProxy] = []
        self.results: list[R17Result] = []
        self._count = 0

    async def __aenter__(self) -> R17Bench:
        await self.system.__aenter__()
        try:
            self.receiver = await self.system.spawn(SeqReceiver, name="verifier")
            self.senders = [await self.system.spawn(SeqSender, name=f"sender-{i}") for i in range(self.max_senders)]
        except BaseException:
            await self.system.__aexit__(None, None, None)
            raise
        track_family()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            for proxy in self.proxies:
                await proxy.close()
        finally:
            await self.system.__aexit__(*exc)

    async def run(self, ex: R17Example) -> R17Result:
        self._count += 1
        rcv = self.receiver
        proxy = await ChaosProxy(rcv.endpoint, ex.schedule).start()
        self.proxies.append(proxy)
        via = cascada.ActorRef(rcv.name, proxy.endpoint, rcv.pid, rcv.host, rcv.incarnation)
        tags = [f"x{self._count}-s{i}" for i in range(ex.senders)]
        t0 = time.monotonic()
        runs = await asyncio.gather(*[
            s.ask("run", via, tag, ex.n, ex.window, self.timeout, ex.short_every, timeout=self.timeout * ex.n + 60)
            for s, tag in zip(self.senders, tags)])
        seconds = time.monotonic() - t0
        log = [(str(t), int(q)) for t, q in await rcv.ask("drain_log", timeout=30)]
        inc = rcv.incarnation
        received = [((t, inc), q) for t, q in log if t in tags]
        sent: dict[Hashable, list[int]] = {(t, inc): list(range(ex.n)) for t in tags}
        errored: dict[Hashable, list[int]] = {(t, inc): [int(k) for k in r["errored"]] for t, r in zip(tags, runs)}
        fifo = check_fifo(received, sent, errored)
        got = {(p, q) for p, q in received}
        phantom = [(t, q) for t, r in zip(tags, runs) for q in r["ok"] if ((t, inc), q) not in got]
        errors = Counter(v for r in runs for v in r["errored"].values())
        result = R17Result(ex, fifo.violations, fifo.unexplained_gaps, len(fifo.gaps),
                           sum(len(r["errored"]) for r in runs), dict(errors), phantom,
                           proxy.stats.resets, proxy.stats.connections, seconds)
        self.results.append(result)
        return result


def r17_examples(seed: int, count: int) -> list[R17Example]:
    """Seeded schedules for runs outside Hypothesis (scripts/reliability.py)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        resets_up = tuple(sorted(rng.randrange(200, 14000) for _ in range(rng.randrange(0, 4))))
        resets_down = tuple(sorted(rng.randrange(100, 6000) for _ in range(rng.randrange(0, 3))))
        stalls = tuple((rng.randrange(200, 14000), rng.uniform(0.01, 0.15)) for _ in range(rng.randrange(0, 2)))
        if i == 0 and not (resets_up or resets_down):
            resets_up = (2000, 6000)
        sched = Schedule(delay=rng.uniform(0, 0.003), jitter=rng.uniform(0, 0.004), resets_up=resets_up,
                         resets_down=resets_down, stalls=stalls, seed=rng.randrange(1 << 30))
        out.append(R17Example(sched, rng.randrange(2, 5), 60, rng.choice([1, 4, 8]), rng.choice([0, 0, 7, 13])))
    return out


def _r17_outcome(out: Outcome, results: list[R17Result]) -> None:
    rec = out.record
    violations = [(i, v) for i, r in enumerate(results) for v in r.violations]
    unexplained = [(i, g) for i, r in enumerate(results) for g in r.unexplained_gaps]
    phantom = [(i, p) for i, r in enumerate(results) for p in r.phantom_acks]
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    untyped = {k: v for k, v in errors.items() if k.startswith(("untyped:", "wrong reply"))}
    out.expect(results, "no example ran")
    out.expect(not violations, f"order violations (example, (pair, previous, seq)): {violations[:5]}")
    out.expect(not unexplained, f"gaps without an error at the sender: {unexplained[:5]}")
    out.expect(not phantom, f"acknowledged but never received: {phantom[:5]}")
    out.expect(not untyped, f"untyped errors or wrong replies: {untyped}")
    out.expect(sum(r.resets for r in results) >= 1, "no example reset a connection: the run proves nothing")
    rec["faults"] = {"kill9": 0, "sigstop": 0, "partition_s": 0, "proxy_resets": sum(r.resets for r in results)}
    rec["errors"] = {"ActorDied": errors.get("ActorDied", 0), "Timeout": errors.get("DeadlineExceeded", 0),
                     "Overloaded": 0, "untyped": sum(untyped.values()), "hangs": 0}
    rec["figures"] = {
        "examples": len(results), "senders_per_example": [r.example.senders for r in results],
        "messages": sum(r.example.senders * r.example.n for r in results),
        "order_violations": len(violations), "gaps": sum(r.gaps for r in results),
        "gaps_with_error": sum(r.gaps for r in results) - len(unexplained), "unexplained_gaps": len(unexplained),
        "errored_calls": sum(r.errored for r in results), "phantom_acks": len(phantom),
        "proxy_connections": sum(r.connections for r in results),
        "examples_with_resets": sum(1 for r in results if r.resets),
        "example_seconds_max": round(max((r.seconds for r in results), default=0.0), 3),
        "schedules": [r.example.schedule.describe() for r in results],
    }


async def r17_fifo_under_chaos(examples: Sequence[R17Example] | None = None, *, seed: int = 17,
                               count: int = 6) -> Outcome:
    """2-4 senders ask one receiver through a chaos proxy (delay, jitter, stalls, resets at
    byte thresholds), transport tcp. Per (sender, receiver incarnation) the receiver sees
    strictly increasing sequence numbers; a number it never saw had an error at its sender;
    nothing acknowledged is missing. Seeded schedules (the pytest test draws them with
    Hypothesis: r17_property)."""
    exs = list(examples) if examples is not None else r17_examples(seed, count)
    out = Outcome(new_record("R17", f"{len(exs)} seeded schedules, seed {seed}", seed=seed, transport="tcp"))
    before = Resources.take()
    async with R17Bench() as bench:
        for ex in exs:
            await bench.run(ex)
    _r17_outcome(out, bench.results)
    return _finish(out, before)


async def run_hypothesis(test: Callable[[], None]) -> BaseException | None:
    """Run a Hypothesis-decorated *sync* test in a worker thread while this event loop keeps
    serving the actor system it drives (each example submits coroutines to this loop with
    :func:`on_loop`). Returns the failure, if any."""
    try:
        await asyncio.to_thread(test)
    except BaseException as exc:  # noqa: BLE001 - the property's failure is the result
        if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
            raise
        return exc
    return None


def on_loop(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any], timeout: float) -> Any:
    """From a worker thread: run ``coro`` on ``loop`` and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)  # type: ignore[arg-type]


async def r17_property(max_examples: int = 6, seed: int = 17) -> Outcome:
    """R17 with Hypothesis drawing the schedules (delay, jitter, stalls, resets up and down,
    2-4 senders, window, deadline-cancelled asks); two explicit schedules with resets run
    first. No shrinking: each example costs real processes and a second or so."""
    from hypothesis import HealthCheck, Phase, example, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    out = Outcome(new_record("R17", f"hypothesis, max_examples={max_examples}, seed {seed}", seed=seed,
                             transport="tcp"))
    before = Resources.take()
    loop = asyncio.get_running_loop()
    schedules = st.builds(
        Schedule,
        delay=st.floats(0, 0.003), jitter=st.floats(0, 0.005),
        resets_up=st.lists(st.integers(100, 14000), max_size=3).map(lambda v: tuple(sorted(v))),
        resets_down=st.lists(st.integers(50, 6000), max_size=3).map(lambda v: tuple(sorted(v))),
        stalls=st.lists(st.tuples(st.integers(100, 14000), st.floats(0.005, 0.15)), max_size=2).map(tuple),
        seed=st.integers(0, 1 << 30))
    examples_ = st.builds(R17Example, schedule=schedules, senders=st.integers(2, 4), n=st.just(60),
                          window=st.sampled_from([1, 4, 8]), short_every=st.sampled_from([0, 0, 7, 13]))
    async with R17Bench() as bench:
        @settings(max_examples=max_examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @hseed(seed)
        @example(R17Example(Schedule(delay=0.001, jitter=0.002, resets_up=(1500, 5000), resets_down=(900,)), 3, 60, 8, 0))
        @example(R17Example(Schedule(jitter=0.004, resets_down=(300, 2500), stalls=((3000, 0.1),)), 4, 60, 4, 7))
        @given(examples_)
        def prop(ex: R17Example) -> None:
            r = on_loop(loop, bench.run(ex), 120)
            assert not r.violations, f"order violations {r.violations[:5]} under {ex}"
            assert not r.unexplained_gaps, f"gaps without an error {r.unexplained_gaps[:5]} under {ex}"
            assert not r.phantom_acks, f"acknowledged but never received {r.phantom_acks[:5]} under {ex}"

        failure = await run_hypothesis(prop)
    out.expect(failure is None, f"property falsified: {failure!r}")
    _r17_outcome(out, bench.results)
    return _finish(out, before)


# =========================================================================================
# R18: ipc endpoint hygiene
# =========================================================================================

_ROGUE = """\
import json, os, sys, msgpack, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.setsockopt(zmq.LINGER, 0)
s.bind(sys.argv[1])
print(json.dumps({"pid": os.getpid()}), flush=True)
while True:
    frames = s.recv_multipart()
    try:
        h = msgpack.unpackb(frames[1], strict_map_key=False)
        if isinstance(h, list) and len(h) > 2 and h[1] in (1, 3):
            s.send_multipart([frames[0], msgpack.packb([1, 4, h[2], None, None, None, None, "forged", None, "rogue"])])
    except Exception:
        pass
"""

_OTHER_USER = """\
import json, os, socket, sys
path = sys.argv[1]
res = {"uid": os.getuid()}
def attempt(name, fn):
    try:
        fn()
        res[name] = "ok"
    except OSError as exc:
        res[name] = __import__("errno").errorcode.get(exc.errno, str(exc.errno))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
attempt("connect", lambda: s.connect(path))
attempt("unlink", lambda: os.unlink(path))
b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
attempt("bind_beside", lambda: b.bind(os.path.join(os.path.dirname(path), "rogue.ipc")))
attempt("list_dir", lambda: os.listdir(os.path.dirname(path)))
attempt("list_base", lambda: os.listdir(os.path.dirname(os.path.dirname(path))))
print(json.dumps(res), flush=True)
"""


async def _start_rogue(endpoint: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _ROGUE, endpoint, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc, int(json.loads(line)["pid"])


async def _end(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


def _system_python() -> str | None:
    """An interpreter another user can run (sys.executable may live under /root)."""
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(cand, os.X_OK):
            return cand
    return None


async def _as_other_user(path: str) -> dict[str, Any] | None:
    """What uid 65534 can do to an ipc socket of ours (None: cannot test here)."""
    python = _system_python()
    if os.geteuid() != 0 or python is None:
        return None
    # In a thread: uvloop's subprocess_exec takes no user/group.
    proc = await asyncio.to_thread(subprocess.run, [python, "-I", "-c", _OTHER_USER, path], capture_output=True,
                                   user=65534, group=65534, extra_groups=[], cwd="/", timeout=30)
    try:
        parsed: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        return None
    return parsed


async def r18a_takeover_detected() -> Outcome:
    """(a) A second process binding an actor's ipc path. Other users cannot (the per-run
    directory is 0700 and the socket 0600; checked as uid 65534 when running as root); two
    systems never share a directory; the sweep of dead systems' directories spares live
    ones. A process of the same user can (libzmq unlinks and rebinds silently): that takeover
    is detected by transport._endpoints -- the kernel's SO_PEERCRED names the listener, so
    check_ipc_listener raises EndpointConflict against the ref's pid, claim_ipc_path refuses
    to bind over it, and socket_identity changes."""
    out = Outcome(new_record("R18", "a: a second process binds the same ipc path"))
    rec = out.record
    before = Resources.take()
    # Reachable by other users (the test session's temp dir is not), so that only cascada's
    # own 0700 directory stands between them and the socket.
    base = tempfile.mkdtemp(prefix="rel-r18-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.chmod(base, 0o755)
    figures: dict[str, Any] = {}
    try:
        async with cascada.ActorSystem(ipc_dir=base) as system:
            victim = await system.spawn(Bystander, name="victim")
            track_family()
            path = victim.endpoint[len("ipc://"):]
            run_dir = os.path.dirname(path)
            dir_mode = stat.S_IMODE(os.stat(run_dir).st_mode)
            sock_mode = stat.S_IMODE(os.stat(path).st_mode)
            out.expect(dir_mode == 0o700, f"the run's ipc directory has mode {dir_mode:o}, want 700")
            out.expect(sock_mode & 0o077 == 0, f"the actor's socket has mode {sock_mode:o}, want no group/other bits")
            other = await _as_other_user(path)
            if other is not None:
                # The base is open to others (list_base works), so what stops them is our 0700 dir.
                out.expect(other.get("list_base") == "ok", f"the probe could not reach the base directory: {other}")
                denied = {k: v for k, v in other.items() if k not in ("uid", "list_base")}
                out.expect(all(v in ("EACCES", "EPERM") for v in denied.values()),
                           f"another user got through: {denied}")
            figures["other_user"] = other if other is not None else "not tested (not root, or no system python)"
            # Two systems on the same base never share a directory, and a sweep spares live ones.
            async with cascada.ActorSystem(ipc_dir=base) as second:
                other_dir = os.path.dirname(second.node.endpoint[len("ipc://"):])
                out.expect(other_dir != run_dir, "two systems got the same ipc directory")
                swept = sweep_dead_ipc_dirs(base)
                out.expect(run_dir not in swept and os.path.isdir(run_dir) and os.path.isdir(other_dir),
                           f"the sweep removed a live system's directory: {swept}")
            ident = socket_identity(path)
            before_pid = listener_pid(path)
            out.expect(before_pid == victim.pid, f"the listener on the actor's path is {before_pid}, not {victim.pid}")
            check_ipc_listener(victim.endpoint, victim.pid)  # passes while the path is the actor's
            out.expect(await victim.ask("ping", "mine", timeout=10) == "mine", "the actor does not answer")
            rogue, rogue_pid = await _start_rogue(victim.endpoint)
            try:
                out.expect(listener_pid(path) == rogue_pid, "SO_PEERCRED does not name the process that took over")
                out.expect(socket_identity(path) != ident, "the socket file did not change when it was taken over")
                conflict: str | None = None
                try:
                    check_ipc_listener(victim.endpoint, victim.pid)
                except EndpointConflict as exc:
                    conflict = str(exc)
                out.expect(conflict is not None and str(rogue_pid) in conflict,
                           f"check_ipc_listener did not detect the takeover: {conflict}")
                refused: str | None = None
                try:
                    claim_ipc_path(path)
                except EndpointConflict as exc:
                    refused = str(exc)
                out.expect(refused is not None, "claim_ipc_path would bind over a live listener")
                out.expect(os.path.exists(path), "claim_ipc_path removed a live listener's socket")
                # A connection made before the takeover stays with the actor (libzmq keeps it).
                kept = await victim.ask("ping", "still mine", timeout=10)
                figures.update({"conflict": conflict, "claim_refused": refused,
                                "existing_connection_after_takeover": kept})
            finally:
                await _end(rogue)
        rec["figures"] = {**figures, "dir_mode": oct(dir_mode), "socket_mode": oct(sock_mode),
                          "takeover_possible_for_same_user": True, "detected_by": "SO_PEERCRED (listener_pid)"}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return _finish(out, before)


async def r18a_client_never_reaches_the_wrong_actor() -> Outcome:
    """(a), end to end: after a process of the same user took an actor's ipc path over, a
    client that connects afresh must get EndpointConflict (or the actor itself), never the
    impostor's answer; and a cascada node asked to bind a path another process listens on
    must refuse (EndpointConflict) instead of taking it over."""
    from cascada.actors._node import Node, NodeConfig

    out = Outcome(new_record("R18", "a: a fresh client after a takeover, and a node binding a live path"))
    rec = out.record
    before = Resources.take()
    async with cascada.ActorSystem() as system:
        victim = await system.spawn(Bystander, name="victim")
        track_family()
        # Our own connection, made before the takeover, stays with the victim (system.stop uses it).
        out.expect(await victim.ask("ping", 1, timeout=10) == 1, "the victim does not answer")
        rogue, rogue_pid = await _start_rogue(victim.endpoint)
        try:
            caller = await system.spawn(Caller, name="client")  # a fresh process: a fresh connection
            track_family()
            got = await caller.ask("call", victim, "ping", "who are you?", 3.0, timeout=30)
            detected = got[0] == "error" and ("EndpointConflict" in got[1] or "EndpointConflict" in got[2]
                                              or "took the path over" in got[2])
            out.expect(got[:2] == ["ok", "who are you?"] or detected,
                       f"a fresh client reached the process that took the path over: {got}")
        finally:
            await _end(rogue)
        # A cascada node asked to bind a path another process (victim2) listens on.
        victim2 = await system.spawn(Bystander, name="victim2")
        track_family()
        out.expect(await victim2.ask("ping", 2, timeout=10) == 2, "the second victim does not answer")
        node = Node("r18-intruder", victim2.endpoint, NodeConfig())
        took: Any = None
        try:
            await node.start()
            took = "bound: took the path over"
        except cascada.CascadaError as exc:
            took = type(exc).__name__
        finally:
            await node.close()
        out.expect(took in ("EndpointConflict", "ConfigurationError"),
                   f"a node binding a path another process listens on: {took}")
    rec["figures"] = {"fresh_client_got": got, "rogue_pid": rogue_pid, "second_node_bind": took}
    return _finish(out, before)


_STALE_BINDER = """\
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1]); print("bound", flush=True)
import time; time.sleep(60)
"""


async def r18b_stale_socket() -> Outcome:
    """(b) A socket file left behind by kill -9. An actor's is removed by its system at once;
    one left by any other process is found stale (nothing listens: listener_pid is None) and
    removed by claim_ipc_path, after which a bind on the same path is clean and a client
    reaches the new listener. A path holding something that is not a socket is refused (a
    bare libzmq bind would delete it). A whole system killed: R09 (the next one sweeps it)."""
    out = Outcome(new_record("R18", "b: stale socket file after kill -9"))
    rec = out.record
    hist = History()
    before = Resources.take()
    scratch = tempfile.mkdtemp(prefix="rel-r18b-")
    figures: dict[str, Any] = {}
    try:
        async with cascada.ActorSystem() as system, Nemesis(hist) as nem:
            victim = await system.spawn(Bystander, name="victim")
            bystander = await system.spawn(Bystander, name="router")
            track_family()
            path = victim.endpoint[len("ipc://"):]
            t_kill = nem.kill9(victim.pid)
            deadline = time.monotonic() + DEATH_DETECT_S
            while os.path.exists(path) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            gone_after = time.monotonic() - t_kill
            out.expect(not os.path.exists(path), f"the killed actor's socket file is still there after {DEATH_DETECT_S}s")
            out.expect(os.path.exists(bystander.endpoint[len("ipc://"):]), "another actor's socket file went too")
            out.expect(await bystander.ask("ping", 1, timeout=10) == 1, "the other actor stopped serving")
            figures["actor_socket_removed_after_ms"] = ms(gone_after)
        # Any other process: its file stays, and is stale.
        stale = os.path.join(scratch, "stale.ipc")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _STALE_BINDER, f"ipc://{stale}",
                                                    stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            await asyncio.wait_for(proc.stdout.readline(), 30)
            track_family()
            out.expect(listener_pid(stale) == proc.pid, "the binder is not the listener")
            nem.kill9(proc.pid)
            await proc.wait()
        finally:
            await _end(proc)
        out.expect(os.path.exists(stale), "kill -9 left no socket file (nothing to test)")
        out.expect(listener_pid(stale) is None, "a dead process's socket file looks live")
        claim_ipc_path(stale)
        out.expect(not os.path.exists(stale), "claim_ipc_path left the stale file")
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            server = ctx.socket(zmq.ROUTER)
            server.setsockopt(zmq.LINGER, 0)
            server.bind(f"ipc://{stale}")
            client = ctx.socket(zmq.DEALER)
            client.setsockopt(zmq.LINGER, 0)
            client.connect(f"ipc://{stale}")
            client.send(b"hello")
            ok = bool(server.poll(5000))
            if ok:
                ident, msg = server.recv_multipart()
                server.send_multipart([ident, msg])
                ok = bool(client.poll(5000)) and client.recv() == b"hello"
            out.expect(ok, "no round trip through the rebound path")
            out.expect(listener_pid(stale) == os.getpid(), "the rebound path is not ours")
            client.close(linger=0)
            server.close(linger=0)
            # libzmq alone also rebinds over a stale file (it unlinks first)...
            again = os.path.join(scratch, "again.ipc")
            s1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s1.bind(again)
            s1.close()  # a socket file nobody listens on
            raw = ctx.socket(zmq.ROUTER)
            raw.setsockopt(zmq.LINGER, 0)
            raw.bind(f"ipc://{again}")
            figures["libzmq_rebinds_over_stale_file"] = listener_pid(again) == os.getpid()
            raw.close(linger=0)
            # ... and over anything else too: it deletes whatever is at the path.
            precious = os.path.join(scratch, "precious.ipc")
            with open(precious, "w") as f:
                f.write("data")
            refused = False
            try:
                claim_ipc_path(precious)
            except EndpointConflict:
                refused = True
            out.expect(refused and os.path.isfile(precious), "claim_ipc_path removed a regular file")
            raw = ctx.socket(zmq.ROUTER)
            raw.setsockopt(zmq.LINGER, 0)
            try:
                raw.bind(f"ipc://{precious}")
                figures["libzmq_bind_deletes_a_regular_file"] = not os.path.isfile(precious)
            except zmq.ZMQError as exc:
                figures["libzmq_bind_deletes_a_regular_file"] = f"no: {exc}"
            raw.close(linger=0)
        finally:
            ctx.term()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rec["faults"] = nem.faults()
    rec["figures"] = {**figures, "stale_detected": True, "whole_system_killed": "R09 (next system sweeps)"}
    return _finish(out, before)


def _dir_of_length(parent: str, length: int) -> str:
    """A directory path under parent of exactly ``length`` characters (not created)."""
    stem = os.path.join(parent, "r18c-")
    pad = length - len(stem)
    if pad < 1:
        raise ValueError(f"{parent!r} is too long to build a {length}-character path under it")
    return stem + "x" * pad


async def r18c_long_path() -> Outcome:
    """(c) ipc paths longer than 107 characters: refused at startup with a ConfigurationError
    that says why (before any directory or process exists), at the exact boundary; a
    user-given endpoint over the limit is refused by check_endpoint, and a ref from the wire
    naming one is a ProtocolError at the receiver. A bare libzmq bind fails with errno text."""
    out = Outcome(new_record("R18", "c: ipc path over 107 characters"))
    rec = out.record
    before = Resources.take()
    parent = tempfile.mkdtemp(prefix="rel-r18c-")
    overhead = IpcDirectory._OVERHEAD
    ok_base = _dir_of_length(parent, IPC_PATH_MAX - overhead)
    long_base = _dir_of_length(parent, IPC_PATH_MAX - overhead + 1)
    figures: dict[str, Any] = {}
    try:
        for d in (ok_base, long_base):
            os.makedirs(d)
        err: BaseException | None = None
        try:
            cascada.ActorSystem(ipc_dir=long_base)
        except Exception as exc:  # noqa: BLE001 - checked below
            err = exc
        out.expect(isinstance(err, cascada.ConfigurationError), f"a too-long ipc_dir raised {err!r}")
        out.expect(err is not None and str(IPC_PATH_MAX) in str(err) and long_base in str(err),
                   f"the error does not say which path and what limit: {err}")
        out.expect(os.listdir(long_base) == [], "something was created under the refused directory")
        figures["too_long_base_error"] = str(err)
        longest = 0
        async with cascada.ActorSystem(ipc_dir=ok_base) as system:
            refs = [await system.spawn(Bystander, name=f"expert-{i}") for i in range(2)]
            track_family()
            for r in refs:
                out.expect(await r.ask("ping", r.name, timeout=10) == r.name, f"{r.name} does not serve")
            longest = max(len(e[len("ipc://"):]) for e in [system.node.endpoint, *(r.endpoint for r in refs)])
            out.expect(longest <= IPC_PATH_MAX, f"a socket path of {longest} characters")
            # A ref from the wire naming an over-long ipc path.
            victim = refs[0]
            peer = RawPeer(victim.endpoint)
            try:
                forged = msgpack.ExtType(2, msgpack.packb(["x", "ipc://" + "/p" * 60, 1, "h", None]))
                peer.send([ask_frame(5, "ping", [forged], target=victim.name)])
                env = await peer.wait_for(5)
            finally:
                peer.close()
            out.expect(env is not None and env.kind is Kind.ERROR and env.body[0] == "protocol",
                       f"a ref naming a 121-character ipc path got {env and (env.kind, env.body)}")
        for n, want in ((IPC_PATH_MAX, True), (IPC_PATH_MAX + 1, False)):
            endpoint = "ipc://" + _dir_of_length(parent, n)
            try:
                check_endpoint(endpoint)
                accepted = True
            except cascada.ConfigurationError:
                accepted = False
            out.expect(accepted is want, f"check_endpoint on a {n}-character path: accepted={accepted}")
        ctx: zmq.Context[Any] = zmq.Context()
        raw = ctx.socket(zmq.ROUTER)
        raw.setsockopt(zmq.LINGER, 0)
        try:
            raw.bind("ipc://" + _dir_of_length(parent, 130))
            figures["raw_libzmq_long_bind"] = "bound (truncated path?)"
        except zmq.ZMQError as exc:
            figures["raw_libzmq_long_bind"] = f"{type(exc).__name__}: {exc}"
        finally:
            raw.close(linger=0)
            ctx.term()
        figures.update({"limit": IPC_PATH_MAX, "base_accepted_len": len(ok_base), "base_refused_len": len(long_base),
                        "longest_socket_path": longest})
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    rec["figures"] = figures
    return _finish(out, before)


# =========================================================================================
# R20: malformed frames into a live actor
# =========================================================================================


def _deep_arrays(n: int) -> bytes:
    return b"\x91" * n + b"\xc0"


def _deep_maps(n: int) -> bytes:
    return b"\x81\x00" * n + b"\xc0"


def _deep_tuples(n: int = 0, *, max_bytes: int | None = None) -> bytes:
    """Tuple exts nested ``n`` deep (or as deep as fits in ``max_bytes``) around a nil, built
    from the inside out in linear time: ext(1, ext(1, ... nil))."""
    heads: list[bytes] = []
    size = 1
    while (len(heads) < n) if max_bytes is None else (size + 6 <= max_bytes):
        if size < 256:
            h = b"\xc7" + struct.pack(">B", size) + b"\x01"
        elif size < 65536:
            h = b"\xc8" + struct.pack(">H", size) + b"\x01"
        else:
            h = b"\xc9" + struct.pack(">I", size) + b"\x01"
        heads.append(h)
        size += len(h)
    return b"".join(reversed(heads)) + b"\xc0"


def _with_args(corr: int, raw_args: bytes) -> bytes:
    """An ASK whose args array is ``raw_args`` (raw msgpack, possibly hostile)."""
    head: bytes = msgpack.packb([1, 1, corr, "raw", "victim", "ping", None])
    return b"\x99" + head[1:] + b"\x92" + raw_args + b"\xc0" + b"\xc0"


@dataclass
class Frames:
    cls: str
    label: str
    frames: list[bytes]


def r20_cases(seed: int = 20) -> list[Frames]:
    """Malformed messages by class (every one of them must be rejected and counted once)."""
    rng = random.Random(seed)
    corr = iter(range(1000, 100000))
    cases: list[Frames] = []

    def add(cls: str, label: str, *frames: bytes) -> None:
        cases.append(Frames(cls, label, list(frames)))

    for i in range(16):
        data = rng.randbytes(rng.randrange(1, 200))
        if data[:1] in (b"\x99", b"\x9a", b"\x9b", b"\xc1"):  # keep it random, not a near-valid header
            data = b"\xc4" + data
        add("random bytes", f"random {i}", data)
    add("random bytes", "empty frame", b"")
    add("random bytes", "empty header, one more frame", b"", b"x")
    good = ask_frame(next(corr), "ping", ["abcdef"])
    for cut in (1, 2, 4, 6, len(good) // 2, len(good) - 1):
        add("truncated", f"cut at {cut}", good[:cut])
    add("trailing data", "one junk byte", ask_frame(next(corr)) + b"\x01")
    add("trailing data", "a second message", ask_frame(next(corr)) + ask_frame(next(corr)))
    add("trailing data", "batch marker after", ask_frame(next(corr)) + BATCH_MARKER)
    bad = b"\xff\xfe\xfd"
    add("invalid utf-8", "method", ask_frame(next(corr), "pin").replace(b"\xa3pin", b"\xa3" + bad))
    add("invalid utf-8", "target", ask_frame(next(corr), target="vic").replace(b"\xa3vic", b"\xa3" + bad))
    add("invalid utf-8", "sender", ask_frame(next(corr)).replace(b"\xa3raw", b"\xa3" + bad))
    add("invalid utf-8", "an argument", ask_frame(next(corr), args=["abc"]).replace(b"\xa3abc", b"\xa3" + bad))
    add("invalid utf-8", "a kwargs key", ask_frame(next(corr), kwargs={"kwx": 1}).replace(b"\xa3kwx", b"\xa3" + bad))
    for code in (0, 4, 15, 42, 127, -1, -2, -128):
        # Raw bytes: msgpack-python will not pack a negative (reserved) code; -1 is its timestamp.
        ext = b"\xd6\xff\x00\x00\x00\x01" if code == -1 else b"\xc7\x07" + struct.pack("b", code) + b"payload"
        add("unknown ext", f"code {code}", ask_frame(next(corr), args=["EXTHERE"]).replace(b"\xa7EXTHERE", ext))
    add("unknown ext", "ext as the correlation id", msgpack.packb([1, 1, msgpack.ExtType(42, b"x"), "raw", "victim",
                                                                    "ping", None, [[1], None], None]))
    add("deep nesting", "arrays 10^4", _with_args(next(corr), b"\x91" + _deep_arrays(10_000)))
    add("deep nesting", "maps 10^4", _with_args(next(corr), b"\x91" + _deep_maps(10_000)))
    add("deep nesting", "tuple ext 10^4", _with_args(next(corr), b"\x91" + _deep_tuples(10_000)))
    add("deep nesting", "a bare 10^5", _deep_arrays(100_000))
    add("wrong kind or version", "version 2", msgpack.packb([2, 1, next(corr), "raw", "victim", "ping", None,
                                                              [[1], None], None]))
    for kind in (4, 5, 6, 7):
        add("wrong kind or version", f"kind {kind} on the ROUTER",
            msgpack.packb([1, kind, next(corr), None, None, None, None,
                           ["remote", "E", "m", None, None] if kind == 5 else None, None]))
    tell = msgpack.packb([1, 2, 0, "raw", "victim", "ping", None, [[1], None], None])
    add("batch", "good tell then garbage", BATCH_MARKER + tell + b"\xc1\xc1")
    add("batch", "a good tell then a second tell cut short", BATCH_MARKER + tell + tell[:-4] + b"\xc1")
    add("batch", "with an extra frame", BATCH_MARKER + tell, b"x")
    add("batch", "empty", BATCH_MARKER)
    add("control", "ask with no method (to the node)", msgpack.packb([1, 1, next(corr), "raw", None, None, None,
                                                                        [[], None], None]))
    add("control", "lease.release with junk", msgpack.packb([1, 2, 0, "raw", None, "lease.release", None,
                                                             [[["x"]], None], None]))
    return cases


async def _r20_run(cases: list[Frames]) -> tuple[Outcome, dict[str, Any]]:
    out = Outcome(new_record("R20", ""))
    async with cascada.ActorSystem() as system:
        victim = await system.spawn(Bystander, name="victim")
        track_family()
        pid = victim.pid
        peer = RawPeer(victim.endpoint)
        by_class: dict[str, dict[str, Any]] = {}
        unanswered: list[str] = []
        wrong_codes: list[str] = []
        sentinel = 900_000
        try:
            classes = list(dict.fromkeys(c.cls for c in cases))
            for cls in classes:
                mine = [c for c in cases if c.cls == cls]
                r0 = await _rejected(system, victim)
                for c in mine:
                    peer.send(c.frames)
                sentinel += 1
                served = await peer.sentinel(sentinel)
                out.expect(served, f"{cls}: the actor stopped answering a good request on the same connection")
                r1 = await _rejected(system, victim)
                expecting = [(c, readable_corr(c.frames[0])) for c in mine]
                answered = 0
                for c, corr in expecting:
                    if corr is None:
                        continue
                    env = peer.replies.get(corr)
                    if env is None:
                        unanswered.append(f"{cls}: {c.label} (corr {corr})")
                        continue
                    answered += 1
                    if env.kind is not Kind.ERROR or env.body[0] != "protocol":
                        wrong_codes.append(f"{cls}: {c.label} -> {env.kind.name} {env.body if env.kind is Kind.ERROR else ''}")
                by_class[cls] = {"sent": len(mine), "rejected": r1 - r0,
                                 "with_reply_address": sum(1 for _, k in expecting if k is not None),
                                 "answered": answered}
                out.expect(r1 - r0 == len(mine), f"{cls}: {len(mine)} malformed messages, {r1 - r0} counted as rejected")
            stats = await system.stats(victim)
            out.expect(stats["pid"] == pid and not process_gone(pid), "the actor's process changed or died")
            out.expect(await victim.ask("ping", "alive", timeout=10) == "alive", "the actor stopped serving")
        finally:
            peer.close()
        out.expect(not wrong_codes, f"malformed requests answered with something but a protocol error: {wrong_codes}")
    fig = {"by_class": by_class, "unanswered_with_reply_address": unanswered, "restarts": 0, "pid_unchanged": True,
           "undecodable_replies": peer.undecodable}
    return out, fig


async def r20_malformed_frames(seed: int = 20) -> Outcome:
    """Malformed frames, by class (random bytes, truncated, trailing data, invalid UTF-8,
    unknown ext codes, nesting 10^4-10^5 deep, wrong kind or version, bad batches, bad control
    messages), from a plain pyzmq DEALER into a live actor's ROUTER (its one inbound socket:
    data and control). Every one is rejected and counted once, anything answered is a
    protocol error, the actor keeps serving the same connection, its pid does not change.
    (Which of them get an error reply: r20_error_replies.)"""
    before = Resources.take()
    cases = r20_cases(seed)
    out, fig = await _r20_run(cases)
    out.record["variant"] = f"{len(cases)} malformed messages in {len(set(c.cls for c in cases))} classes"
    out.record["seed"] = seed
    out.record["figures"] = {**fig, "unit_coverage": "tests/test_wire.py, tests/test_fuzz_decode.py, tests/test_process.py"}
    return _finish(out, before)


async def r20_batch_with_truncated_tail() -> Outcome:
    """A batch frame whose last message is cut short: the messages before it are delivered
    (as the batch format promises), and the cut one is rejected and counted like any other
    malformed message, not dropped without a trace."""
    before = Resources.take()
    tell = msgpack.packb([1, 2, 0, "raw", "victim", "ping", None, [[1], None], None])
    cases = [Frames("batch", "a good ask then a tell cut short", [BATCH_MARKER + ask_frame(77, "ping", [77]) + tell[:-2]]),
             Frames("batch", "a single tell cut short", [BATCH_MARKER + tell[:-2]])]
    out, fig = await _r20_run(cases)
    out.record["variant"] = "a batch whose last message is truncated"
    out.record["figures"] = fig
    return _finish(out, before)


async def r20_error_replies(seed: int = 20) -> Outcome:
    """The malformed requests whose correlation id can be read (a reply address exists: the
    first three header fields parse, whatever follows) are answered with a protocol error,
    so their sender does not wait out its deadline."""
    before = Resources.take()
    cases = [c for c in r20_cases(seed) if readable_corr(c.frames[0]) is not None]
    out, fig = await _r20_run(cases)
    out.record["variant"] = f"error replies for {len(cases)} malformed requests with a reply address"
    out.expect(not fig["unanswered_with_reply_address"],
               f"{len(fig['unanswered_with_reply_address'])} of {len(cases)} malformed requests with a readable "
               f"correlation id got no reply: {fig['unanswered_with_reply_address']}")
    out.record["figures"] = fig
    return _finish(out, before)


# =========================================================================================
# R21: size and amplification bombs
# =========================================================================================


def _tell_header() -> bytes:
    packed: bytes = msgpack.packb([1, 2, 0, "raw", "victim", "ping", None, [[1], None], None])
    return packed


def _map_distinct(n: int) -> bytes:
    return b"\xdf" + struct.pack(">I", n) + b"".join(b"\xce" + struct.pack(">I", i) + b"\xc0" for i in range(n))


def _ask_wrapped(body: bytes) -> bytes:
    """A header [1, ASK, 9, nil, "victim", "ping", nil, body, nil] around a raw body."""
    return b"\x99\x01\x01\x09\xc0\xa6victim\xa4ping\xc0" + body + b"\xc0"


def _empties(n: int, token: bytes = b"\x90") -> bytes:
    """A header just under n bytes whose body is an array of empty arrays: each byte becomes
    one Python object, the most a header can allocate per byte."""
    k = n - 32
    return _ask_wrapped(b"\xdd" + struct.pack(">I", k) + token * k)


@dataclass
class Bomb:
    label: str
    make: Callable[[], list[bytes]]
    bound_mib: float
    disconnects: bool = False  # rejected by libzmq (ZMQ_MAXMSGSIZE), never seen by cascada


def r21_bombs(max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, max_frame_bytes: int = 8 << 20) -> list[Bomb]:
    decoded_bound = BOMB_BOUND_MIB + AMPLIFICATION * max_header_bytes / 2**20
    return [
        Bomb(f"(a) one {4 * max_frame_bytes >> 20} MiB frame over max_frame_bytes",
             lambda: [b"\x00" * (4 * max_frame_bytes)], BOMB_BOUND_MIB, disconnects=True),
        Bomb(f"(a) a {4 * max_header_bytes >> 20} MiB header over max_header_bytes",
             lambda: [b"\x91" + b"\xc0" * (4 * max_header_bytes)], BOMB_BOUND_MIB),
        Bomb("(b) 2000 frames of 1 KiB (over max_frames)", lambda: [_tell_header()] + [b"x" * 1024] * 2000,
             BOMB_BOUND_MIB),
        Bomb("(c) array32 claiming 10^8 elements (5 bytes)", lambda: [b"\xdd" + struct.pack(">I", 100_000_000)],
             BOMB_BOUND_MIB),
        Bomb("(c) array32 claiming 10^8 elements as the args",
             lambda: [_ask_wrapped(b"\x92\xdd" + struct.pack(">I", 100_000_000))], BOMB_BOUND_MIB),
        Bomb("(d) a map with 10^6 distinct keys (6 MB)", lambda: [_ask_wrapped(_map_distinct(1_000_000))],
             BOMB_BOUND_MIB),
        Bomb("(d) map32 claiming 10^6 keys in 64 KiB",
             lambda: [_ask_wrapped(b"\xdf" + struct.pack(">I", 1_000_000) + b"\x00\xc0" * (32 << 10))],
             BOMB_BOUND_MIB),
        Bomb("(e) arrays nested 10^5 deep", lambda: [_deep_arrays(100_000)], BOMB_BOUND_MIB),
        Bomb("(e) tuple ext nested 2x10^4 deep", lambda: [_deep_tuples(20_000)], BOMB_BOUND_MIB),
        Bomb("(f) a header at the cap made of empty arrays (decoded in full)",
             lambda: [_empties(max_header_bytes)], decoded_bound),
        Bomb("(f) a header at the cap of nested tuple exts (each level copies the rest)",
             lambda: [_ask_wrapped(b"\x92\x91" + _deep_tuples(max_bytes=max_header_bytes - 64) + b"\xc0")],
             decoded_bound),
    ]


async def _detonate(system: cascada.ActorSystem, bomb: Bomb, n: int) -> dict[str, Any]:
    """One bomb at a fresh actor process: its VmHWM rise over its RSS just before, the time
    until the actor answered again on the bomb's connection, whether it was rejected."""
    victim = await system.spawn(Bystander, name="victim")  # the previous one is stopped
    track_family()
    peer = RawPeer(victim.endpoint, monitor=True)
    try:
        # Warm the paths the bomb takes (a reply, a rejection, the rate-limited log).
        await peer.sentinel(1)
        peer.send([b"\xc1"])
        await peer.sentinel(2)
        r0 = await _rejected(system, victim)
        rss0 = proc_status(victim.pid).get("VmRSS")
        reset = _reset_peak(victim.pid)
        base = rss0 if reset else proc_status(victim.pid).get("VmHWM")
        frames = bomb.make()
        sent_mib = sum(len(f) for f in frames) / 2**20
        t0 = time.monotonic()
        peer.send(frames)
        del frames
        answered = await peer.sentinel(3, timeout=30)
        took = time.monotonic() - t0
        status = proc_status(victim.pid)
        peak, rss1 = status.get("VmHWM"), status.get("VmRSS")
        r1 = await _rejected(system, victim)
        alive = await victim.ask("ping", "alive", timeout=10) == "alive"
        peer._drain()
        disconnects = peer.disconnects
        errors = sorted(env.body[0] for corr, env in peer.replies.items()
                        if corr not in (1, 2, 3) and env.kind is Kind.ERROR)
    finally:
        peer.close()
    await system.stop(victim)
    delta = None if peak is None or base is None else round((peak - base) / 1024.0, 2)
    after = None if rss1 is None or rss0 is None else round((rss1 - rss0) / 1024.0, 2)
    return {"bomb": bomb.label, "sent_mib": round(sent_mib, 2), "rejected": r1 - r0, "disconnected": disconnects,
            "vmhwm_delta_mib": delta, "vmrss_after_delta_mib": after, "error_replies": errors,
            "bound_mib": round(bomb.bound_mib, 1), "answered_after": answered,
            "time_to_answer_ms": ms(took), "serving": alive, "peak_reset": reset}


async def r21_size_bombs(max_frame_bytes: int = 8 << 20) -> Outcome:
    """Size and amplification bombs, each against a fresh actor process (VmHWM is a peak:
    reset through /proc/PID/clear_refs just before the bomb). (a) a frame over the frame
    limit (ZMQ_MAXMSGSIZE disconnects the peer) and a header over max_header_bytes; (b) more
    frames than max_frames; (c) array32 headers claiming 10^8 elements; (d) a map of 10^6
    keys, and a map32 claiming 10^6 in 64 KiB; (e) nesting 10^5 deep; (f) a header at the cap
    that decodes in full. Each is rejected (counted, or the peer disconnected), the actor
    answers the next request and keeps serving, and its VmHWM rises by at most 16 MiB --
    for (f), the README's bound for a decoded header, 16 MiB + 80 x max_header_bytes.
    max_frame_bytes is lowered to 8 MiB so (a) needs 32 MiB, not 4 GiB; nothing else changes."""
    out = Outcome(new_record("R21", f"size bombs (max_frame_bytes {max_frame_bytes >> 20} MiB, "
                                    f"max_header_bytes {DEFAULT_MAX_HEADER_BYTES >> 10} KiB)"))
    before = Resources.take()
    results = []
    async with cascada.ActorSystem(max_frame_bytes=max_frame_bytes) as system:
        for i, bomb in enumerate(r21_bombs(max_frame_bytes=max_frame_bytes)):
            res = await _detonate(system, bomb, i)
            results.append(res)
            label = bomb.label
            if bomb.disconnects:
                out.expect(res["disconnected"] >= 1 or res["rejected"] >= 1, f"{label}: neither disconnected nor rejected")
            else:
                out.expect(res["rejected"] == 1, f"{label}: rejected {res['rejected']} times, want once")
            out.expect(res["answered_after"] and res["serving"], f"{label}: the actor stopped serving")
            out.expect(res["vmhwm_delta_mib"] is not None and res["vmhwm_delta_mib"] <= bomb.bound_mib,
                       f"{label}: VmHWM rose {res['vmhwm_delta_mib']} MiB > {bomb.bound_mib:.1f} MiB")
    out.record["memory"] = {"max_rss_mib": None, "rss_delta_over_baseline_mib":
                            max((r["vmhwm_delta_mib"] or 0.0) for r in results)}
    out.record["figures"] = {"bombs": results, "unit_coverage": "tests/test_wire.py (five-byte bombs, nesting), "
                             "tests/test_fuzz_decode.py (header bomb in bounded memory)"}
    return _finish(out, before)


async def r21_amplification(max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                            bound_mib: float = BOMB_BOUND_MIB) -> Outcome:
    """The worst headers under the cap: max_header_bytes of empty arrays or maps (decoded in
    full, each byte one Python object), and of tuple exts nested as deep as fit (refused at
    depth 64, but each level holds a copy of the rest). Expect the VmHWM rise within
    ``bound_mib``."""
    out = Outcome(new_record("R21", f"amplification at max_header_bytes {max_header_bytes >> 10} KiB, "
                                    f"bound {bound_mib:g} MiB"))
    before = Resources.take()
    results = []
    cap = max_header_bytes
    bombs = [Bomb(f"{cap >> 10} KiB of empty arrays", lambda: [_empties(cap, b"\x90")], bound_mib),
             Bomb(f"{cap >> 10} KiB of empty maps", lambda: [_empties(cap, b"\x80")], bound_mib),
             Bomb(f"{cap >> 10} KiB of nested tuple exts",
                  lambda: [_ask_wrapped(b"\x92\x91" + _deep_tuples(max_bytes=cap - 64) + b"\xc0")], bound_mib)]
    async with cascada.ActorSystem(max_header_bytes=max_header_bytes) as system:
        for i, bomb in enumerate(bombs):
            res = await _detonate(system, bomb, i)
            results.append(res)
            out.expect(res["rejected"] == 1 and res["serving"], f"{bomb.label}: not rejected once, or not serving")
            out.expect(res["vmhwm_delta_mib"] is not None and res["vmhwm_delta_mib"] <= bound_mib,
                       f"{bomb.label}: VmHWM rose {res['vmhwm_delta_mib']} MiB > {bound_mib:g} MiB "
                       f"({res['vmhwm_delta_mib'] and round(res['vmhwm_delta_mib'] * 2**20 / max_header_bytes)}x the cap)")
    out.record["figures"] = {"bombs": results, "max_header_bytes": max_header_bytes}
    return _finish(out, before)


SCALAR_AMPLIFICATION = 44  # README: scalars cost up to ~42 bytes per header byte (small negative ints)


def _array_of(token: bytes, cap: int) -> list[bytes]:
    k = (cap - 64) // len(token)
    return [_ask_wrapped(b"\xdd" + struct.pack(">I", k) + token * k)]


async def r21_scalar_amplification(max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                                   bound_mib: float | None = None) -> Outcome:
    """The headers containers are not the worst of: scalars, which cascada does not count.
    A header at the cap made of small negative ints (-32..-6: one byte each, a 32-byte int
    and an 8-byte slot decoded), of two-character strings, of int8s; and, for comparison,
    of one-entry and eleven-entry maps (counted). Expect each rejected once, and the VmHWM
    rise within the stated bound: ``SCALAR_AMPLIFICATION`` x the cap, and never less than the
    16 MiB bomb bound."""
    cap = max_header_bytes
    bound = bound_mib if bound_mib is not None else max(BOMB_BOUND_MIB, SCALAR_AMPLIFICATION * cap / 2**20)
    out = Outcome(new_record("R21", f"scalar amplification at max_header_bytes {cap >> 10} KiB, bound {bound:g} MiB"))
    before = Resources.take()
    eleven = b"\x8b" + b"".join(bytes([i]) + b"\xc0" for i in range(11))
    bombs = [Bomb(f"{cap >> 10} KiB of small negative ints", lambda: _array_of(b"\xe0", cap), bound),
             Bomb(f"{cap >> 10} KiB of two-character strings", lambda: _array_of(b"\xa2ab", cap), bound),
             Bomb(f"{cap >> 10} KiB of int8s", lambda: _array_of(b"\xd0\x80", cap), bound),
             Bomb(f"{cap >> 10} KiB of one-entry maps", lambda: _array_of(b"\x81\x00\xc0", cap), bound),
             Bomb(f"{cap >> 10} KiB of eleven-entry maps", lambda: _array_of(eleven, cap), bound)]
    results = []
    async with cascada.ActorSystem(max_header_bytes=max_header_bytes) as system:
        for i, bomb in enumerate(bombs):
            res = await _detonate(system, bomb, i)
            results.append(res)
            out.expect(res["rejected"] == 1 and res["serving"], f"{bomb.label}: not rejected once, or not serving")
            out.expect(res["vmhwm_delta_mib"] is not None and res["vmhwm_delta_mib"] <= bound,
                       f"{bomb.label}: VmHWM rose {res['vmhwm_delta_mib']} MiB > {bound:g} MiB")
    out.record["figures"] = {"bombs": results, "max_header_bytes": max_header_bytes}
    return _finish(out, before)


async def r21_multipart_total_bytes(frames: int = 48, frame_bytes: int = 1 << 20, *,
                                    strict_peak: bool = False) -> Outcome:
    """(b) again, under the frame-count cap: one message of ``frames`` out-of-band frames of
    ``frame_bytes`` each, none of them referenced by the header, sent as a TELL and as an
    ASK. Expect each rejected once (ProtocolError, counted; the ASK answered with a
    ``protocol`` error), its memory released at once (VmRSS back within the bomb bound of
    its level before it), and the transient peak no more than what libzmq received plus the
    bomb bound: libzmq checks ZMQ_MAXMSGSIZE per frame and hands a multipart message over
    whole, so the receiver holds all of it before cascada sees the header. With
    ``strict_peak``, expect the VmHWM rise itself within the bomb bound (it is not: see the
    xfail in test_scenarios_wire.py)."""
    out = Outcome(new_record("R21", f"(b) {frames} unreferenced frames x {frame_bytes >> 10} KiB in one message"))
    before = Resources.take()
    mib = frames * frame_bytes >> 20
    bombs = [Bomb(f"TELL + {frames} x {frame_bytes >> 10} KiB unreferenced frames",
                  lambda: [_tell_header()] + [b"x" * frame_bytes] * frames, BOMB_BOUND_MIB),
             Bomb(f"ASK + {frames} x {frame_bytes >> 10} KiB unreferenced frames",
                  lambda: [ask_frame(9)] + [b"x" * frame_bytes] * frames, BOMB_BOUND_MIB)]
    results = []
    async with cascada.ActorSystem() as system:
        for i, bomb in enumerate(bombs):
            res = await _detonate(system, bomb, i)
            results.append(res)
            label = bomb.label
            out.expect(res["rejected"] == 1, f"{label}: a message carrying {mib} MiB of frames no descriptor "
                                             f"refers to was rejected {res['rejected']} times, want once")
            out.expect(res["answered_after"] and res["serving"], f"{label}: the actor stopped serving")
            want = ["protocol"] if label.startswith("ASK") else []
            out.expect(res["error_replies"] == want, f"{label}: error replies {res['error_replies']}, want {want}")
            out.expect(res["vmrss_after_delta_mib"] is not None and res["vmrss_after_delta_mib"] <= BOMB_BOUND_MIB,
                       f"{label}: VmRSS stayed {res['vmrss_after_delta_mib']} MiB up after the rejection: "
                       "the frames were not released")
            peak_bound = BOMB_BOUND_MIB if strict_peak else res["sent_mib"] + BOMB_BOUND_MIB
            out.expect(res["vmhwm_delta_mib"] is not None and res["vmhwm_delta_mib"] <= peak_bound,
                       f"{label}: VmHWM rose {res['vmhwm_delta_mib']} MiB > {peak_bound:g} MiB "
                       f"({res['sent_mib']} MiB sent; libzmq assembles a multipart message whole, "
                       "checking only each frame against max_frame_bytes)")
    out.record["figures"] = {"bombs": results}
    return _finish(out, before)


# =========================================================================================
# R22: well-formed but hostile envelopes
# =========================================================================================


def _tensor(desc: list[Any]) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_TENSOR, msgpack.packb(desc))


@dataclass
class Hostile:
    cls: str
    label: str
    frames: list[bytes]
    expect: tuple[str, ...]  # error codes that may answer it; () = no reply (none can be addressed)


def r22_cases() -> list[Hostile]:
    corr = iter(range(5000, 100000))
    cases: list[Hostile] = []

    def add(cls: str, label: str, frames: list[bytes], expect: tuple[str, ...] = ("protocol",)) -> None:
        if readable_corr(frames[0]) is None:
            expect = ()  # not recognisably a request with a correlation id: nothing to answer
        cases.append(Hostile(cls, label, frames, expect))

    def head(**over: Any) -> list[bytes]:
        fields = {"version": 1, "kind": 1, "corr": next(corr), "sender": "raw", "target": "victim",
                  "method": "describe", "deadline": None, "body": [[1], None], "opts": None}
        fields.update(over)
        return [msgpack.packb(list(fields.values()))]

    for field_, value in (("version", "1"), ("version", True), ("kind", "ask"), ("kind", 1.0), ("sender", 5),
                          ("target", 5), ("method", 5), ("method", b"describe"), ("deadline", "soon"),
                          ("deadline", True), ("opts", "x"), ("body", {"args": [1]}), ("body", [[1]]),
                          ("body", [{"a": 1}, None]), ("body", [[1], [1]]), ("body", [[1], {1: 2}])):
        add("wrong field types", f"{field_} = {value!r}", head(**{field_: value}))
    add("wrong field types", "incarnation = 5", [ask_frame(next(corr), "describe", incarnation=5)])
    add("wrong field types", "ctx = 't'", [msgpack.packb([1, 1, next(corr), "raw", "victim", "describe", None,
                                                           [[1], None], None, None, "t"])])
    add("wrong field types", "corr = '7' (no reply address)", head(corr="7"), ())
    add("wrong field types", "corr = -1 (no reply address)", head(corr=-1), ())
    c = next(corr)
    add("missing fields", "3 fields", [msgpack.packb([1, 1, c])])
    add("missing fields", "8 fields", [msgpack.packb([1, 1, next(corr), "raw", "victim", "describe", None, [[1], None]])])
    add("missing fields", "empty array", [msgpack.packb([])], ())
    add("missing fields", "request without a method", head(method=None))
    add("unknown actor or method", "unknown actor", head(target="nobody"), ("not_found",))
    for m in ("no_such", "_private", "__init__", "__class__", "on_start", "on_stop"):
        add("unknown actor or method", f"method {m!r}", head(method=m), ("not_found",))
    add("unknown actor or method", "unknown control operation", head(target=None, method="format_disk"),
        ("not_found",))

    def tensor_case(label: str, desc: list[Any], oob: list[bytes], expect: tuple[str, ...] = ("protocol",)) -> None:
        add("bad tensor descriptors", label, head(body=[[_tensor(desc)], None]) + oob, expect)

    f32x4 = struct.pack("4f", 1, 2, 3, 4)
    tensor_case("negative shape", [1, "float32", [-4], [0, 0]], [f32x4])
    tensor_case("huge shape", [1, "float32", [2**40], [0, 0]], [f32x4])
    tensor_case("huge shape, overflowing product", [1, "uint8", [2**32, 2**32], [0, 0]], [f32x4])
    tensor_case("too many dims", [1, "uint8", [1] * 64, [0, 0]], [b"x"])
    for dt in ("object", "float128", "<f4", "V8", "U4"):
        tensor_case(f"dtype {dt!r}", [1, dt, [4], [0, 0]], [f32x4])
    tensor_case("shape x itemsize < buffer", [1, "float32", [3], [0, 0]], [f32x4])
    tensor_case("shape x itemsize > buffer", [1, "float32", [5], [0, 0]], [f32x4])
    tensor_case("buffer index beyond the frames", [1, "float32", [4], [0, 3]], [f32x4])
    tensor_case("buffer index -1", [1, "float32", [4], [0, -1]], [f32x4])
    tensor_case("no buffer at all", [1, "float32", [4], [0, 0]], [])
    tensor_case("unknown library", [7, "float32", [4], [0, 0]], [f32x4])
    tensor_case("shm path traversal", [1, "float32", [4], [1, "../../etc/passwd", 1, 0, 1, os.getpid(), "ipc:///x"]],
                [b""])
    tensor_case("shm segment of pid 1", [1, "float32", [4], [1, "cascada-1-0123abcd-1", 1, 0, 1, 1, "ipc:///x"]],
                [b""], ("protocol", "tensor_lost"))
    pickled = pickle.dumps({"a": 1})
    add("pickle", "ext 99 carrying a pickle", head(body=[[msgpack.ExtType(99, pickled)], None]))
    add("pickle", "tuple ext carrying a pickle", head(body=[[msgpack.ExtType(1, pickled)], None]))
    add("pickle", "ref ext carrying a pickle", head(body=[[msgpack.ExtType(2, pickled)], None]))
    add("pickle", "tensor ext carrying a pickle", head(body=[[msgpack.ExtType(EXT_TENSOR, pickled)], None]))
    for kind in (4, 5, 6, 7):
        body: Any = ["remote", "E", "m", None, None] if kind == 5 else "forged"
        add("forged incarnation", f"kind {kind} with a foreign incarnation on the ROUTER",
            [msgpack.packb([1, kind, next(corr), "raw", "victim", None, None, body, None, "deadbeef"])], ())
    return cases


async def r22_hostile_envelopes() -> Outcome:
    """Well-formed msgpack, hostile envelopes, into a live actor: wrong field types, missing
    fields, unknown actor or method (private, dunder and lifecycle names included), bad
    tensor descriptors (negative, huge and overflowing shapes, dtypes off the allowlist,
    shape x itemsize != buffer, buffer index beyond the frames, forged shm locations),
    pickles in every ext code, replies with a forged incarnation sent to the ROUTER. Every
    addressable one gets an ERROR of the expected code (protocol; not_found for a missing
    actor or method; tensor_lost for a dead producer), no handler runs, every protocol
    error is counted, the actor keeps serving with the same pid. (The property over
    (dtype, shape, buffer length) runs live in r22_descriptor_property; torch descriptors are
    covered by tests/test_tensor_units.py, to keep torch out of this actor.)"""
    out = Outcome(new_record("R22", "hostile envelopes at a live actor"))
    before = Resources.take()
    cases = r22_cases()
    by_class: dict[str, dict[str, int]] = {}
    wrong: list[str] = []
    forged_request: Any = None
    async with cascada.ActorSystem() as system:
        victim = await system.spawn(Describer, name="victim")
        track_family()
        pid = victim.pid
        peer = RawPeer(victim.endpoint)
        try:
            for cls in dict.fromkeys(c.cls for c in cases):
                mine = [c for c in cases if c.cls == cls]
                r0 = await _rejected(system, victim)
                for c in mine:
                    peer.send(c.frames)
                served = await peer.sentinel(700_000 + len(by_class))
                out.expect(served, f"{cls}: the actor stopped answering a good request")
                r1 = await _rejected(system, victim)
                protocol = 0
                for c in mine:
                    corr = readable_corr(c.frames[0])
                    env = peer.replies.get(corr) if corr is not None else None
                    if not c.expect:
                        if env is not None:
                            wrong.append(f"{cls}: {c.label}: answered {env.kind.name} {env.body}")
                        protocol += 1
                        continue
                    if env is None:
                        wrong.append(f"{cls}: {c.label}: no reply")
                        continue
                    if env.kind is not Kind.ERROR or env.body[0] not in c.expect:
                        wrong.append(f"{cls}: {c.label}: {env.kind.name} {env.body}, want {'/'.join(c.expect)}")
                        continue
                    protocol += env.body[0] == "protocol"
                by_class[cls] = {"sent": len(mine), "rejected_frames": r1 - r0, "protocol_expected": protocol}
                out.expect(r1 - r0 == protocol, f"{cls}: {protocol} protocol errors but {r1 - r0} rejections counted")
            # A request with a foreign incarnation: requests do not carry the target's
            # incarnation today (the header field names a reply's source), so it is served.
            peer.send([ask_frame(42, "ping", ["x"], incarnation="deadbeef")])
            env = await peer.wait_for(42)
            forged_request = None if env is None else [env.kind.name, env.body]
            stats = await system.stats(victim)
            out.expect(stats["pid"] == pid and not process_gone(pid), "the actor's process changed or died")
            out.expect(await victim.ask("ping", "alive", timeout=10) == "alive", "the actor stopped serving")
            ran = await victim.ask("calls", timeout=10)
            out.expect(ran == 0, f"the handler ran {ran} times for hostile envelopes")
            handled = next(a for a in stats["actors"] if a["name"] == "victim")
        finally:
            peer.close()
    out.expect(not wrong, f"{len(wrong)} hostile envelopes handled wrongly: {wrong}")
    out.record["figures"] = {"by_class": by_class, "cases": len(cases), "wrongly_handled": wrong,
                             "request_with_foreign_incarnation": forged_request, "actor_counters": handled,
                             "restarts": 0, "unit_coverage": "tests/test_tensor_units.py (torch and numpy "
                             "descriptors, shm fields), tests/test_wire.py (hostile headers)"}
    return _finish(out, before)


async def r22_descriptor_property(max_examples: int = 60, seed: int = 22) -> Outcome:
    """The R22 property, live: for any (dtype, shape, buffer index) and buffer length sent to
    an actor process as a numpy tensor, either its handler gets an array of exactly the
    declared bytes -- prod(shape) x itemsize, all of its frame and nothing else (checked by
    CRC) -- or the caller gets a protocol error. Hypothesis draws the cases; the unit
    versions (every library, and straight into the codec) are in tests/test_fuzz_decode.py
    (test_inline_descriptor_property) and tests/test_tensor_units.py."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    out = Outcome(new_record("R22", f"descriptor property, live, max_examples={max_examples}", seed=seed))
    before = Resources.take()
    loop = asyncio.get_running_loop()
    counts: Counter[str] = Counter()
    corrs = iter(range(10, 1 << 30))
    dims = st.one_of(st.integers(0, 5), st.integers(0, 5), st.sampled_from([-1, 2**31, 2**40, 2**63 - 1]))
    dtypes = st.sampled_from(sorted(ITEMSIZE) + ["object", "float128", "<f4"])
    async with cascada.ActorSystem() as system:
        victim = await system.spawn(Describer, name="victim")
        track_family()
        peer = RawPeer(victim.endpoint)

        async def one(desc: list[Any], frames: list[bytes]) -> Envelope | None:
            corr = next(corrs)
            head = msgpack.packb([1, 1, corr, "raw", "victim", "describe", None, [[_tensor(desc)], None], None])
            peer.send([head, *frames])
            return await peer.wait_for(corr, 10)

        try:
            @settings(max_examples=max_examples, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
            @hseed(seed)
            @given(dtypes, st.lists(dims, max_size=3), st.sampled_from([0, 0, 0, 1, 2]), st.data())
            def prop(dtype: str, shape: list[int], index: int, data: st.DataObject) -> None:
                size = math.prod(shape) * ITEMSIZE.get(dtype, 1)
                exact = [size] if 0 <= size <= 4096 else []
                length = data.draw(st.sampled_from(exact * 4 + [0, 1, 3, max(0, min(size - 1, 4096)),
                                                                 min(size + 1, 4097)]))
                # A second frame only where the index may point past the first: a non-empty
                # frame no descriptor refers to is refused (R21), whatever the descriptor says.
                payload = bytes((i * 7 + 3) % 251 for i in range(length))
                frames = [payload, b"\x01" * 8] if index else [payload]
                env = on_loop(loop, one([1, dtype, shape, [0, index]], frames), 30)
                assert env is not None, "no reply"
                if env.kind is Kind.ERROR:
                    assert env.body[0] == "protocol", f"error {env.body[:3]}"
                    counts["protocol"] += 1
                    return
                assert env.kind is Kind.REPLY, env.kind
                kind, got_dtype, got_shape, nbytes, nraw, crc = env.body[0]
                frame = frames[index] if index < len(frames) else None
                assert frame is not None, "a tensor was built over a frame that does not exist"
                want = math.prod(shape) * ITEMSIZE[dtype]
                assert got_shape == shape and got_dtype == dtype, (got_dtype, got_shape)
                assert nbytes == nraw == want == len(frame), (nbytes, nraw, want, len(frame))
                assert crc == zlib.crc32(frame), "the array's bytes are not its frame's"
                counts["decoded"] += 1

            failure = await run_hypothesis(prop)
            stats = await system.stats(victim)
            out.expect(await victim.ask("ping", "alive", timeout=10) == "alive", "the actor stopped serving")
            out.expect(stats["pid"] == victim.pid, "the actor's process changed")
        finally:
            peer.close()
    out.expect(failure is None, f"property falsified: {failure!r}")
    out.expect(counts["decoded"] >= 1 and counts["protocol"] >= 1, f"the draws never hit both outcomes: {dict(counts)}")
    out.record["figures"] = {"examples": sum(counts.values()), "decoded_exactly": counts["decoded"],
                             "rejected_protocol": counts["protocol"], "rejected_frames": stats["node"]["rejected_frames"]}
    return _finish(out, before)

