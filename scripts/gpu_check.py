#!/usr/bin/env python3
"""Every GPU check of cascada's CUDA IPC path, in one short run (gives up after --budget, 240 s).

    python scripts/gpu_check.py [--quick] [--json] [--runs N]

Two worker processes (multiprocessing, "spawn") hand tensors to each other through
``transport/_cuda_ipc.py`` alone, with a lease table each, over a Pipe: no pyzmq, msgpack or
installed cascada needed. It measures and checks:

- hand-off: export on the producer -> a usable tensor on the consumer (event wait included),
  for 1 MiB .. 1 GiB float32 tensors, median of N runs, every run's data verified;
- the host-staged copy for comparison (producer .copy_() into pinned shared memory,
  consumer .to("cuda")), same sizes;
- release: the consumer drops its tensor, the producer's lease count is back to 0 (time to
  reclaim), and its GPU memory is back to where it was;
- every dtype, a view at a storage offset, an empty tensor, and a received tensor sent on
  (it must be copied, never re-exported);
- producer death (R28): 10 tensors held by the consumer and 10 more not yet opened when the
  producer is SIGKILLed: the 10 must fail with TensorLost, the consumer must not crash;
- consumer death (R29): the consumer holds 10 leases and is SIGKILLed; the producer's sweep
  reclaims the leases and its memory comes back (time to reclaim);
- with cupy installed, a cupy round trip; with cascada importable, one ask between two
  process actors that returns a CUDA tensor.

On a bare GPU machine nothing needs installing but pyzmq, msgpack and uvloop, for the actor
ask alone (wheels on PYTHONPATH are enough): cascada itself is imported from this checkout.

Prints a table (and with --json one JSON record); exits 1 if any check fails, 0 when all
pass, and 0 with "no CUDA device: skipped" where there is no GPU.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SIZES = [1 * MIB, 16 * MIB, 256 * MIB, 1024 * MIB]
QUICK_SIZES = [1 * MIB, 16 * MIB, 256 * MIB]
PATTERN = 1009  # tensors hold (i % PATTERN) as floats: exact in float32, checkable anywhere
RELEASE_BOUND_S = 1.0  # a dropped tensor's lease must be back within this
SWEEP_BOUND_S = 5.0  # a dead consumer's leases and memory must be back within this
REPLY_TIMEOUT_S = 120.0
DEATH_TENSORS = 10
DEATH_NELEM = 4 * MIB  # 16 MiB float32 each


def load_backend() -> types.ModuleType:
    """transport/_cuda_ipc.py as a module, without transport/__init__.py (which needs pyzmq
    and msgpack): a bare package over the directory, importing only what the backend uses."""
    name = "_gpu_check_transport"
    mod = sys.modules.get(name + "._cuda_ipc")
    if mod is not None:
        return mod
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(REPO / "transport")]
    sys.modules[name] = pkg
    return importlib.import_module(name + "._cuda_ipc")


def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return platform.node()


def pattern_sum(start: int, n: int) -> int:
    """sum(i % PATTERN for i in range(start, start + n)), exactly."""
    def upto(m: int) -> int:
        q, r = divmod(m, PATTERN)
        return q * (PATTERN * (PATTERN - 1) // 2) + r * (r - 1) // 2
    return upto(start + n) - upto(start)


# -- the worker (both roles) --------------------------------------------------------------

class Worker:
    """One process: exports to its peer, opens what its peer exports, answers the parent."""

    def __init__(self, role: str, ctl: Connection, data: Connection) -> None:
        import torch

        self.torch = torch
        self.role = role
        self.ctl, self.data = ctl, data
        self.ipc = load_backend()
        from _gpu_check_transport._leases import LeaseTable

        self.host = host_id()
        self.leases = LeaseTable(ttl=None, host=self.host, process_gone=self.ipc.process_gone)
        self.backend = self.ipc.CudaIpcBackend(self.leases, collect_interval=0.0)
        self.peer: tuple[str, int] = (self.host, 0)
        self.held: dict[int, Any] = {}
        self.released_at: dict[int, float] = {}
        self.staged_host: tuple[Any, bool] | None = None
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # a context, so the first measured run does not pay for it

    # messages from the peer that may arrive while we wait for something else
    def _note(self, msg: tuple[Any, ...]) -> bool:
        if msg[0] == "released":
            self.leases.release([msg[1]])
            self.released_at[msg[1]] = time.perf_counter()
            return True
        return False

    def await_peer(self, kind: str, timeout: float = REPLY_TIMEOUT_S) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.data.poll(left):
                raise TimeoutError(f"{self.role}: no {kind!r} from the peer within {timeout} s")
            msg = self.data.recv()
            if not self._note(msg):
                if msg[0] == "error":
                    raise RuntimeError(f"{self.role}: the peer failed: {msg[1]}")
                if msg[0] != kind:
                    raise RuntimeError(f"{self.role}: expected {kind!r} from the peer, got {msg[0]!r}")
                return msg

    def releaser(self, lease_id: int) -> Any:
        def release() -> None:
            try:
                self.data.send(("released", lease_id))
            except (BrokenPipeError, OSError):
                pass  # the owner is gone; nothing to tell
        return release

    def pattern(self, start: int, n: int, dtype: Any = None) -> Any:
        torch = self.torch
        x = (torch.arange(start, start + n, device="cuda", dtype=torch.int64) % PATTERN)
        return x.to(dtype or torch.float32)

    def verify(self, t: Any, start: int, n: int) -> str:
        """'' when t holds the pattern from start, else what is wrong."""
        torch = self.torch
        if not t.is_cuda or t.numel() != n:
            return f"got {tuple(t.shape)} on {t.device}"
        flat = t.reshape(-1)
        total = int(flat.sum(dtype=torch.float64).item())
        if total != pattern_sum(start, n):
            return f"sum {total} != {pattern_sum(start, n)}"
        k = min(n, 4096)
        for lo in (0, n - k, (n - k) // 2):
            if not torch.equal(flat[lo:lo + k], self.pattern(start + lo, k)):
                return f"elements {lo}..{lo + k} differ"
        return ""

    def run(self) -> None:
        props = self.torch.cuda.get_device_properties(0)
        self.ctl.send(("ready", os.getpid(), {
            "device": props.name, "torch": self.torch.__version__, "cuda": self.torch.version.cuda,
            "memory_gib": round(props.total_memory / 2**30, 1)}))
        conns: list[Any] = [self.ctl, self.data]
        while True:
            for ready in wait(conns):
                conn: Any = ready
                try:
                    msg = conn.recv()
                except EOFError:
                    if conn is self.ctl:
                        return
                    conns.remove(conn)  # the peer died; keep answering the parent
                    self.data = _Closed()  # type: ignore[assignment]
                    continue
                if self._note(msg):
                    continue
                if msg[0] == "exit":
                    return
                try:
                    reply = getattr(self, "do_" + msg[0])(*msg[1:])
                except Exception as exc:
                    reply = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
                conn.send(reply)

    # -- commands -------------------------------------------------------------------------

    def do_peer(self, pid: int) -> tuple[Any, ...]:
        self.peer = (self.host, pid)
        return ("ok",)

    def do_open(self, where: list[Any], lib: int, dtype: str, shape: list[int], nbytes: int,
                start: int | None) -> tuple[Any, ...]:
        t_in = time.perf_counter()
        t = self.backend.open(where, lib, dtype, tuple(shape), nbytes, self.releaser(where[5]))
        self.torch.cuda.current_stream().synchronize()
        t_ready = time.perf_counter()
        problem = self.verify(t, start, int(math.prod(shape))) if start is not None else ""
        self.held[where[5]] = t
        return ("opened", t_in, t_ready, problem)

    def do_drop(self, lease_id: int) -> tuple[Any, ...]:
        t_drop = time.perf_counter()
        del self.held[lease_id]  # the finalizer sends "released" before we answer
        return ("dropped", t_drop)

    def do_open_many(self, items: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        outcomes = []
        for where, lib, dtype, shape, nbytes in items:
            try:
                t = self.backend.open(where, lib, dtype, tuple(shape), nbytes, self.releaser(where[5]))
                self.held[where[5]] = t
                outcomes.append("opened")
            except Exception as exc:
                outcomes.append(type(exc).__name__)
        return ("outcomes", outcomes)

    def do_drop_all(self) -> tuple[Any, ...]:
        n = len(self.held)
        self.held.clear()
        gc.collect()
        self.torch.cuda.synchronize()
        return ("dropped_all", n)

    def do_mem(self) -> tuple[Any, ...]:
        free, total = self.torch.cuda.mem_get_info()
        return ("mem", self.torch.cuda.memory_allocated(), free, total)

    def do_handoff(self, sizes: list[int], runs: int) -> tuple[Any, ...]:
        torch = self.torch
        rows = []
        for size in sizes:
            n = size // 4
            base = torch.cuda.memory_allocated()
            x = self.pattern(0, n)
            torch.cuda.synchronize()
            total, export, opening, reclaim, problems, late = [], [], [], [], [], 0
            for _ in range(runs):
                t0 = time.perf_counter()
                where = self.backend.export(x, 0, self.peer)
                t1 = time.perf_counter()
                self.data.send(("open", where, 0, "float32", [n], size, 0))
                _, t_in, t_ready, problem = self.await_peer("opened")
                total.append(t_ready - t0)
                export.append(t1 - t0)
                opening.append(t_ready - t_in)
                if problem:
                    problems.append(problem)
                self.data.send(("drop", where[5]))
                unsettled = self.backend.snapshot()["unsettled"]
                _, t_drop = self.await_peer("dropped")
                if where[5] in self.released_at:
                    reclaim.append(self.released_at.pop(where[5]) - t_drop)
                else:
                    problems.append(f"lease {where[5]} not released when the consumer dropped it")
                late += self.backend.snapshot()["unsettled"] > unsettled
            del x
            self.backend.collect(force=True)
            torch.cuda.synchronize()
            rows.append({
                "bytes": size, "runs": runs,
                "ipc_ms_p50": _ms(statistics.median(total)), "ipc_ms_min": _ms(min(total)),
                "export_ms_p50": _ms(statistics.median(export)), "open_ms_p50": _ms(statistics.median(opening)),
                "reclaim_ms_p50": _ms(statistics.median(reclaim)) if reclaim else None,
                "reclaim_ms_max": _ms(max(reclaim)) if reclaim else None,
                "release_before_count": late,  # releases that overtook the consumer's decrement
                "leases_left": len(self.leases), "bytes_not_returned": torch.cuda.memory_allocated() - base,
                "problems": problems[:3]})
        return ("handoff", rows, self.backend.snapshot())

    def do_staged(self, path: str, sizes: list[int], runs: int) -> tuple[Any, ...]:
        torch = self.torch
        host, pinned = self.map_host(path, max(sizes))
        rows = []
        for size in sizes:
            n = size // 4
            x = self.pattern(0, n)
            torch.cuda.synchronize()
            total, problems = [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                host[:n].copy_(x, non_blocking=pinned)
                torch.cuda.current_stream().synchronize()
                self.data.send(("staged_in", path, n))
                _, t_ready, problem = self.await_peer("staged_ready")
                total.append(t_ready - t0)
                if problem:
                    problems.append(problem)
            del x
            rows.append({"bytes": size, "staged_ms_p50": _ms(statistics.median(total)),
                         "staged_ms_min": _ms(min(total)), "pinned": pinned, "problems": problems[:3]})
        self.unmap_host(host, pinned)
        return ("staged", rows)

    def do_staged_in(self, path: str, n: int) -> tuple[Any, ...]:
        torch = self.torch
        if self.staged_host is None:
            self.staged_host = self.map_host(path, None)
        host, pinned = self.staged_host
        y = host[:n].to("cuda", non_blocking=pinned)
        torch.cuda.current_stream().synchronize()
        t_ready = time.perf_counter()
        problem = self.verify(y, 0, n)
        return ("staged_ready", t_ready, problem)

    def do_staged_done(self) -> tuple[Any, ...]:
        if self.staged_host is not None:
            self.unmap_host(*self.staged_host)
            self.staged_host = None
        return ("ok",)

    def map_host(self, path: str, size: int | None) -> tuple[Any, bool]:
        torch = self.torch
        nbytes = os.path.getsize(path) if size is None else size
        host = torch.from_file(path, shared=True, size=nbytes // 4, dtype=torch.float32)
        try:
            # page-locked, so copies go by DMA as from a pinned buffer
            err = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0))
        except Exception:
            err = -1
        return host, err == 0

    def unmap_host(self, host: Any, pinned: bool) -> None:
        if pinned:
            self.torch.cuda.cudart().cudaHostUnregister(host.data_ptr())

    def do_dtypes(self) -> tuple[Any, ...]:
        """Every dtype, a view at a storage offset, an empty tensor, and a received tensor sent
        back: each opened by the peer and compared."""
        torch = self.torch
        problems = []
        for name in self.ipc.ITEMSIZE:
            dtype = getattr(torch, name)
            big = self.pattern(0, 1000, torch.int64)
            big = (big % 2).to(dtype) if name == "bool" else (big % 100).to(dtype)
            x = big[17:17 + 105].view(3, 5, 7)  # storage offset 17 elements
            where = self.backend.export(x, 0, self.peer)
            self.data.send(("check", where, name, [3, 5, 7], 105 * x.element_size(), 17))
            _, problem = self.await_peer("checked")
            if problem:
                problems.append(f"{name}: {problem}")
        empty = torch.empty(0, 3, device="cuda")
        where = self.backend.export(empty, 0, self.peer)
        self.data.send(("check", where, "float32", [0, 3], 0, 0))
        _, problem = self.await_peer("checked")
        if problem:
            problems.append(f"empty: {problem}")
        # forwarding: the peer holds one of ours, sends it back; it must arrive as a copy
        x = self.pattern(0, 1 << 16)
        where = self.backend.export(x, 0, self.peer)
        self.data.send(("open", where, 0, "float32", [1 << 16], 1 << 18, 0))
        self.await_peer("opened")
        self.data.send(("forward", where[5]))
        _, back, copied = self.await_peer("forwarded")
        same_block = back[0] == where[0] and back[6] == where[6]
        y = self.backend.open(back, 0, "float32", (1 << 16,), 1 << 18, self.releaser(back[5]))
        problem = self.verify(y, 0, 1 << 16)
        if problem or not copied or same_block:
            problems.append(f"forwarded: copied={copied} same_block={same_block} {problem}")
        del y
        self.data.send(("drop", where[5]))
        self.await_peer("dropped")
        time.sleep(0.05)
        while self.data.poll(0):
            self._note(self.data.recv())
        return ("dtypes", problems, len(self.leases))

    def do_check(self, where: list[Any], dtype: str, shape: list[int], nbytes: int, start: int) -> tuple[Any, ...]:
        torch = self.torch
        try:
            t = self.backend.open(where, 0, dtype, tuple(shape), nbytes, self.releaser(where[5]))
        except Exception as exc:
            return ("checked", f"{type(exc).__name__}: {exc}")
        n = int(math.prod(shape))
        want = self.pattern(start, n, torch.int64)
        want = (want % 2).to(t.dtype) if dtype == "bool" else (want % 100).to(t.dtype)
        # compared as bytes: eq is not implemented for every dtype (uint16, uint32) on CUDA
        ok = t.shape == tuple(shape) and torch.equal(t.reshape(-1).view(torch.uint8), want.view(torch.uint8))
        return ("checked", "" if ok else f"data or shape differ ({tuple(t.shape)})")

    def do_forward(self, lease_id: int) -> tuple[Any, ...]:
        t = self.held[lease_id]
        before = self.backend.stats.copied
        where = self.backend.export(t, 0, self.peer)
        return ("forwarded", where, self.backend.stats.copied - before)

    def do_export_many(self, n: int, nelem: int) -> tuple[Any, ...]:
        """n tensors for the peer; our own references dropped at once (the leases keep them)."""
        torch = self.torch
        base = torch.cuda.memory_allocated()
        items = []
        for i in range(n):
            x = self.pattern(i, nelem)
            items.append((self.backend.export(x, 0, self.peer), 0, "float32", [nelem], nelem * 4))
        torch.cuda.synchronize()
        return ("exported", items, base)

    def do_sweep_until_empty(self, t_kill: float, base: int, bound: float) -> tuple[Any, ...]:
        torch = self.torch
        deadline = time.monotonic() + bound
        t_leases = t_memory = None
        while time.monotonic() < deadline:
            self.leases.sweep()
            if t_leases is None and len(self.leases) == 0:
                t_leases = time.perf_counter()
            if t_leases is not None:
                self.backend.collect(force=True)
                if torch.cuda.memory_allocated() <= base:
                    t_memory = time.perf_counter()
                    break
            time.sleep(0.005)
        return ("swept", None if t_leases is None else t_leases - t_kill,
                None if t_memory is None else t_memory - t_kill, len(self.leases),
                torch.cuda.memory_allocated() - base, self.backend.snapshot())

    def do_cupy(self) -> tuple[Any, ...]:
        try:
            import cupy
        except ImportError:
            return ("cupy", "skipped: cupy not installed")
        x = cupy.arange(1 << 20, dtype=cupy.float32) % PATTERN
        where = self.backend.export(x, 2, self.peer)
        self.data.send(("cupy_in", where))
        _, problem = self.await_peer("cupy_checked")
        self.data.send(("drop", where[5]))
        self.await_peer("dropped")
        time.sleep(0.05)
        while self.data.poll(0):
            self._note(self.data.recv())
        return ("cupy", problem or "ok", len(self.leases))

    def do_cupy_in(self, where: list[Any]) -> tuple[Any, ...]:
        import cupy

        a = self.backend.open(where, 2, "float32", (1 << 20,), 1 << 22, self.releaser(where[5]))
        ok = int(a.sum(dtype=cupy.float64).item()) == pattern_sum(0, 1 << 20)
        self.held[where[5]] = a
        return ("cupy_checked", "" if ok else "cupy data differ")


class _Closed:
    """The peer's end after it died: sends vanish, nothing arrives."""

    def send(self, msg: Any) -> None:
        raise BrokenPipeError

    def poll(self, timeout: float = 0) -> bool:
        return False


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def worker_main(role: str, ctl: Connection, data: Connection) -> None:
    Worker(role, ctl, data).run()


# -- the parent ---------------------------------------------------------------------------

class Pair:
    """A producer and a consumer, with a control pipe to each and a data pipe between them."""

    def __init__(self, ctx: Any) -> None:
        p_data, c_data = ctx.Pipe()
        self.p_ctl, p_ctl_child = ctx.Pipe()
        self.c_ctl, c_ctl_child = ctx.Pipe()
        self.producer = ctx.Process(target=worker_main, args=("producer", p_ctl_child, p_data), daemon=True)
        self.consumer = ctx.Process(target=worker_main, args=("consumer", c_ctl_child, c_data), daemon=True)
        self.producer.start()
        self.consumer.start()
        for end in (p_data, c_data, p_ctl_child, c_ctl_child):
            end.close()
        _, self.p_pid, self.info = call(self.p_ctl, None, "ready")
        _, self.c_pid, _ = call(self.c_ctl, None, "ready")
        call(self.p_ctl, ("peer", self.c_pid), "ok")
        call(self.c_ctl, ("peer", self.p_pid), "ok")

    def close(self) -> None:
        for conn, proc in ((self.p_ctl, self.producer), (self.c_ctl, self.consumer)):
            try:
                if proc.is_alive():
                    conn.send(("exit",))
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()


def call(conn: Connection, msg: tuple[Any, ...] | None, kind: str, timeout: float = REPLY_TIMEOUT_S) -> tuple[Any, ...]:
    if msg is not None:
        conn.send(msg)
    if not conn.poll(timeout):
        raise TimeoutError(f"no {kind!r} reply within {timeout} s")
    reply = conn.recv()
    if reply[0] == "error":
        raise RuntimeError(f"worker failed: {reply[1]}\n{reply[2]}")
    if reply[0] != kind:
        raise RuntimeError(f"expected {kind!r}, got {reply!r:.200}")
    return reply


def kill_and_reap(proc: Any) -> float:
    """SIGKILL proc; returns the perf_counter time of the kill."""
    t = time.perf_counter()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    return t


def shm_files_of(pid: int) -> list[str]:
    return sorted(str(p) for p in Path("/dev/shm").glob(f"torch_{pid}_*"))


def staging_file(nbytes: int) -> str:
    """A file both workers map for the host-staged copy: in /dev/shm if it has room."""
    for d in ("/dev/shm", tempfile.gettempdir()):
        try:
            st = os.statvfs(d)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize > 2 * nbytes:
            fd, path = tempfile.mkstemp(prefix="cascada-gpu-check-", dir=d)
            os.ftruncate(fd, nbytes)
            os.close(fd)
            return path
    raise RuntimeError(f"no room for a {nbytes}-byte staging file in /dev/shm or {tempfile.gettempdir()}")


def phase_transfer(ctx: Any, sizes: list[int], runs: int, report: dict[str, Any], failures: list[str]) -> None:
    pair = Pair(ctx)
    path = None
    try:
        report["env"].update(pair.info)
        _, rows, snap = call(pair.p_ctl, ("handoff", sizes, runs), "handoff")
        report["handoff"] = rows
        report["producer_backend"] = snap
        for row in rows:
            for problem in row["problems"]:
                failures.append(f"hand-off {row['bytes']} B: {problem}")
            if row["leases_left"]:
                failures.append(f"hand-off {row['bytes']} B: {row['leases_left']} leases left")
            if row["reclaim_ms_max"] is not None and row["reclaim_ms_max"] > RELEASE_BOUND_S * 1e3:
                failures.append(f"hand-off {row['bytes']} B: reclaim took {row['reclaim_ms_max']} ms")
            if row["bytes_not_returned"] > 0:
                failures.append(f"hand-off {row['bytes']} B: {row['bytes_not_returned']} bytes not returned")
        path = staging_file(max(sizes))
        _, staged = call(pair.p_ctl, ("staged", path, sizes, runs), "staged")
        call(pair.c_ctl, ("staged_done",), "ok")
        for row, s in zip(report["handoff"], staged):
            row.update({k: v for k, v in s.items() if k != "problems"})
            row["staged_over_ipc"] = round(s["staged_ms_p50"] / row["ipc_ms_p50"], 1) if row["ipc_ms_p50"] else None
            failures.extend(f"staged {s['bytes']} B: {p}" for p in s["problems"])
        _, problems, left = call(pair.p_ctl, ("dtypes",), "dtypes")
        report["dtypes"] = {"problems": problems, "leases_left": left}
        failures.extend(f"dtypes: {p}" for p in problems)
        reply = call(pair.p_ctl, ("cupy",), "cupy")
        report["cupy"] = reply[1]
        if reply[1] not in ("ok",) and not reply[1].startswith("skipped"):
            failures.append(f"cupy: {reply[1]}")
    finally:
        pair.close()
        if path is not None:
            os.unlink(path)


def phase_producer_death(ctx: Any, report: dict[str, Any], failures: list[str]) -> None:
    pair = Pair(ctx)
    try:
        _, used_before, _, _ = call(pair.c_ctl, ("mem",), "mem")
        _, held, _ = call(pair.p_ctl, ("export_many", DEATH_TENSORS, DEATH_NELEM), "exported")
        _, queued, _ = call(pair.p_ctl, ("export_many", DEATH_TENSORS, DEATH_NELEM), "exported")
        _, opened = call(pair.c_ctl, ("open_many", held), "outcomes")
        kill_and_reap(pair.producer)
        _, outcomes = call(pair.c_ctl, ("open_many", queued), "outcomes")
        _, dropped = call(pair.c_ctl, ("drop_all",), "dropped_all")
        _, used_after, _, _ = call(pair.c_ctl, ("mem",), "mem")
        left = shm_files_of(pair.p_pid)
        for f in left:
            os.unlink(f)
        alive = pair.consumer.is_alive()
        counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
        report["producer_death"] = {
            "held_before_kill": opened.count("opened"), "queued": len(queued), "queued_outcomes": counts,
            "held_dropped_after_kill": dropped, "consumer_alive": alive,
            "consumer_bytes_still_allocated": used_after - used_before,
            "dead_producer_shm_files_removed": len(left)}
        if counts != {"TensorLost": len(queued)}:
            failures.append(f"producer death: queued tensors gave {counts}, not all TensorLost")
        if not alive:
            failures.append(f"producer death: the consumer died (exit code {pair.consumer.exitcode})")
    finally:
        pair.close()
        if pair.consumer.exitcode not in (0, None):
            failures.append(f"producer death: consumer exit code {pair.consumer.exitcode}")


def phase_consumer_death(ctx: Any, report: dict[str, Any], failures: list[str]) -> None:
    pair = Pair(ctx)
    try:
        _, items, base = call(pair.p_ctl, ("export_many", DEATH_TENSORS, DEATH_NELEM), "exported")
        _, opened = call(pair.c_ctl, ("open_many", items), "outcomes")
        t_kill = kill_and_reap(pair.consumer)
        _, t_leases, t_memory, left, not_returned, snap = call(
            pair.p_ctl, ("sweep_until_empty", t_kill, base, SWEEP_BOUND_S), "swept")
        report["consumer_death"] = {
            "leases_held": opened.count("opened"), "leases_left": left,
            "leases_back_ms": None if t_leases is None else _ms(t_leases),
            "memory_back_ms": None if t_memory is None else _ms(t_memory),
            "bytes_not_returned": not_returned, "counts_settled": snap["settled"],
            "odd_counts": snap["odd_counters"]}
        if left or t_leases is None:
            failures.append(f"consumer death: {left} leases left after {SWEEP_BOUND_S} s")
        if t_memory is None:
            failures.append(f"consumer death: {not_returned} bytes not returned after {SWEEP_BOUND_S} s")
    finally:
        pair.close()


def actor_main(conn: Connection) -> None:
    """One ask between two cascada process actors, carrying a CUDA tensor. Runs in its own
    spawned process: the actor system forks its actors, which must find CUDA untouched."""
    try:
        sys.path.insert(0, str(REPO / "scripts"))
        from from_source import import_cascada_from_source

        cascada = import_cascada_from_source()
    except ImportError as exc:
        conn.send(f"skipped: cascada not importable ({exc})")
        return
    import torch

    class GpuSource(cascada.Actor):  # travels to its process by value
        async def make(self, n: int) -> Any:
            import torch

            return (torch.arange(n, device="cuda", dtype=torch.int64) % PATTERN).float()

    async def main() -> str:
        async with cascada.ActorSystem() as system:
            ref = await system.spawn(GpuSource, placement="process")
            t0 = time.perf_counter()
            x = await ref.ask("make", 1 << 20, timeout=60)
            dt = time.perf_counter() - t0
            ok = x.is_cuda and int(x.sum(dtype=torch.float64).item()) == pattern_sum(0, 1 << 20)
            return f"{'ok' if ok else 'data differ'} ({_ms(dt)} ms, cuda={x.is_cuda})"

    try:
        conn.send(cascada.run(main()))
    except Exception as exc:
        conn.send(f"failed: {type(exc).__name__}: {exc}")


def phase_actor(ctx: Any, report: dict[str, Any], failures: list[str]) -> None:
    here, there = ctx.Pipe()
    proc = ctx.Process(target=actor_main, args=(there,), daemon=True)
    proc.start()
    there.close()
    try:
        report["actor_ask"] = here.recv() if here.poll(90) else "failed: no answer in 90 s"
    except EOFError:
        report["actor_ask"] = f"failed: the driver process died (exit code {proc.exitcode})"
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    if "data differ" in report["actor_ask"]:
        failures.append(f"actor ask: {report['actor_ask']}")


def print_table(report: dict[str, Any]) -> None:
    env = report["env"]
    print(f"cascada gpu_check on {env.get('device')} ({env.get('memory_gib')} GiB), torch {env.get('torch')}, "
          f"CUDA {env.get('cuda')}, {report['runs']} runs per size")
    print(f"  {'size':>9} {'ipc p50':>9} {'ipc min':>9} {'export':>8} {'open':>8} {'staged':>9} "
          f"{'ratio':>6} {'reclaim':>9} {'late':>5}")
    for row in report.get("handoff", []):
        print(f"  {_size(row['bytes']):>9} {row['ipc_ms_p50']:>7.3f}ms {row['ipc_ms_min']:>7.3f}ms "
              f"{row['export_ms_p50']:>6.3f}ms {row['open_ms_p50']:>6.3f}ms "
              f"{row.get('staged_ms_p50', math.nan):>7.3f}ms {row.get('staged_over_ipc') or math.nan:>5.1f}x "
              f"{row['reclaim_ms_p50'] or math.nan:>7.3f}ms {row['release_before_count']:>5}")
    print("  (ipc: export -> usable on the consumer; staged: through pinned host memory; ratio: staged/ipc;")
    print("   reclaim: consumer drops -> producer's lease back; late: releases that overtook torch's count)")
    for key in ("dtypes", "cupy", "producer_death", "consumer_death", "actor_ask"):
        if key in report:
            print(f"  {key:<15} {json.dumps(report[key])}")
    print(f"  {'result':<15} {'PASS' if not report['failures'] else 'FAIL'} in {report['wall_s']} s")
    for f in report["failures"]:
        print(f"    - {f}")


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n < 1 << 30 else f"{n >> 30} GiB"


def cuda_available() -> tuple[bool, str]:
    # NVML answers without initializing CUDA in this process, which forks nothing but should
    # stay clean for the spawned workers anyway
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, ""


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 256 MiB, 5 runs each")
    parser.add_argument("--json", action="store_true", help="also print one JSON record")
    parser.add_argument("--runs", type=int, default=None, help="runs per size (default 20, 5 with --quick)")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds before the run gives up")
    args = parser.parse_args(argv)

    ok, why = cuda_available()
    if not ok:
        print(f"no CUDA device: skipped ({why})")
        if args.json:
            print(json.dumps({"scenario": "gpu_check", "skipped": why}))
        return 0

    runs = args.runs or (5 if args.quick else 20)
    sizes = QUICK_SIZES if args.quick else SIZES
    report: dict[str, Any] = {
        "scenario": "gpu_check", "commit": git_commit(), "runs": runs,
        "env": {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count()}}
    failures: list[str] = []
    ctx = mp.get_context("spawn")
    started = time.monotonic()

    def out_of_time(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the whole run passed its budget of {args.budget} s")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(max(1, int(args.budget)))
    try:
        for name, phase in (("transfer", lambda: phase_transfer(ctx, sizes, runs, report, failures)),
                            ("producer death", lambda: phase_producer_death(ctx, report, failures)),
                            ("consumer death", lambda: phase_consumer_death(ctx, report, failures)),
                            ("actor", lambda: phase_actor(ctx, report, failures))):
            try:
                phase()
            except Exception as exc:
                failures.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
                report.setdefault("tracebacks", {})[name] = traceback.format_exc()
                if isinstance(exc, TimeoutError) and "budget" in str(exc):
                    break
    finally:
        signal.alarm(0)
        for child in mp.active_children():
            child.kill()
    report["failures"] = failures
    report["ok"] = not failures
    report["wall_s"] = round(time.monotonic() - started, 1)
    print_table(report)
    for name, tb in report.get("tracebacks", {}).items():
        print(f"\n--- {name} ---\n{tb}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "tracebacks"}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
