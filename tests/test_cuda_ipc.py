"""CUDA IPC backend: what runs without a GPU (descriptor checks against hostile input, the
lease and torch-count bookkeeping, refusals, imports), and GPU tests that skip without one.

The two-process GPU checks (hand-off, producer and consumer death) live in
scripts/gpu_check.py; test_gpu_check_script runs it where there is a GPU, and checks here
that it skips cleanly where there is none."""

from __future__ import annotations

import gc
import logging
import os
import secrets
import struct
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascada.transport import _cuda_ipc as ipc
from cascada.transport._errors import HandleNotPortable, ProtocolError, SerializationError, TensorLost
from cascada.transport._leases import LeaseTable

REPO = Path(__file__).resolve().parent.parent
HOST = "this-host"
HAS_CUDA = False
try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a dev dependency
    torch = None  # type: ignore[assignment]

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def good_where(**changes: Any) -> list[Any]:
    """A well-formed torch descriptor: 24 float32s at byte 64 of a 256-byte storage."""
    fields = {
        "handle": b"\x03c" + bytes(64), "offset": 64, "storage_nbytes": 256, "device": 0,
        "event": bytes(64), "lease_id": 7, "block_offset": 512,
        "ref_counter": b"/torch_123_456_0", "ref_counter_slot": 3, "device_uuid": bytes(16),
    }
    fields.update(changes)
    return list(fields.values())


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- imports and type checks ----------------------------------------------------------------

def test_imports_without_torch_or_cupy() -> None:
    code = (
        "import sys\n"
        "from cascada.transport import _cuda_ipc as m\n"
        "assert not m.is_cuda(1) and not m.is_cuda([1]) and not m.is_cuda(object())\n"
        "m.CudaIpcBackend.validate(" + repr(good_where()) + ")\n"
        "loaded = [n for n in ('torch', 'cupy') if n in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_is_cuda_on_cpu_values() -> None:
    assert torch is not None
    for value in (1, "x", b"x", [torch.zeros(1)], torch.zeros(3), torch.zeros(0), None):
        assert not ipc.is_cuda(value)


# -- descriptor validation: before any CUDA call ----------------------------------------------

def test_good_descriptor_validates() -> None:
    ipc.CudaIpcBackend.validate(good_where())
    ipc.CudaIpcBackend.validate(tuple(good_where()))
    ipc.CudaIpcBackend.validate(good_where(event=None, device_uuid=None))
    # an empty tensor: nothing exported
    ipc.CudaIpcBackend.validate(good_where(handle=b"", storage_nbytes=0, offset=0, ref_counter=None))


HOSTILE = {
    "not a list": "where",
    "too short": good_where()[:9],
    "too long": good_where() + [0],
    "handle as str": good_where(handle="x" * 66),
    "handle too short": good_where(handle=b"x" * 10),
    "handle too long": good_where(handle=b"x" * 5000),
    "empty handle with bytes": good_where(handle=b""),
    "handle with empty storage": good_where(storage_nbytes=0, offset=0),
    "offset negative": good_where(offset=-1),
    "offset past storage": good_where(offset=257),
    "offset as float": good_where(offset=64.0),
    "offset as bool": good_where(offset=True),
    "storage huge": good_where(storage_nbytes=1 << 60),
    "storage negative": good_where(storage_nbytes=-256),
    "device negative": good_where(device=-1),
    "device past int8": good_where(device=128),
    "device as str": good_where(device="cuda:0"),
    "event too short": good_where(event=b"e" * 63),
    "event as list": good_where(event=[0] * 64),
    "lease zero": good_where(lease_id=0),
    "lease past int64": good_where(lease_id=1 << 63),
    "lease as bool": good_where(lease_id=True),
    "block offset negative": good_where(block_offset=-512),
    "counter path traversal": good_where(ref_counter=b"/../../etc/passwd"),
    "counter other shm file": good_where(ref_counter=b"/psm_1234"),
    "counter with suffix": good_where(ref_counter=b"/torch_1_2_3/x"),
    "counter as str": good_where(ref_counter="/torch_123_456_0"),
    "counter slot out of file": good_where(ref_counter_slot=10000),
    "counter slot negative": good_where(ref_counter_slot=-1),
    "uuid too short": good_where(device_uuid=b"u" * 15),
    "uuid as str": good_where(device_uuid="GPU-0000"),
}


@pytest.mark.parametrize("where", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_descriptor_is_a_protocol_error(where: Any) -> None:
    with pytest.raises(ProtocolError, match="bad CUDA IPC descriptor"):
        ipc.CudaIpcBackend.validate(where)


VIEWS = {
    # (where changes, lib, dtype, shape, nbytes)
    "overruns storage": ({}, 0, "float32", (49,), 196),
    "overruns from offset": ({"offset": 200}, 0, "float32", (24,), 96),
    "shape and nbytes disagree": ({}, 0, "float32", (24,), 95),
    "negative dim": ({}, 0, "float32", (-24,), 96),
    "dim as float": ({}, 0, "float32", (24.0,), 96),
    "too many dims": ({}, 0, "uint8", (1,) * 33, 1),
    "shape as str": ({}, 0, "float32", "24", 96),
    "unknown dtype": ({}, 0, "float128", (6,), 96),
    "dtype as object": ({}, 0, object(), (24,), 96),
    "misaligned offset": ({"offset": 66}, 0, "float32", (24,), 96),
    "misaligned block": ({"block_offset": 514}, 0, "float64", (8,), 64),
    "numpy lib": ({}, 1, "float32", (24,), 96),
    "bool lib": ({}, False, "float32", (24,), 96),
    "torch without counter": ({"ref_counter": None}, 0, "float32", (24,), 96),
    "cupy with counter": ({"handle": bytes(64)}, 2, "float32", (24,), 96),
    "cupy with torch handle": ({"ref_counter": None}, 2, "float32", (24,), 96),
    "cupy bfloat16": ({"handle": bytes(64), "ref_counter": None}, 2, "bfloat16", (48,), 96),
}


@pytest.mark.parametrize("case", VIEWS.values(), ids=VIEWS.keys())
def test_bad_view_is_refused_before_cuda(case: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    changes, lib, dtype, shape, nbytes = case

    def touched() -> None:
        raise AssertionError("CUDA was touched before the descriptor was checked")

    monkeypatch.setattr(ipc, "_torch_for_open", touched)
    monkeypatch.setattr(ipc, "_cupy_for_open", touched)
    released: list[int] = []
    backend = ipc.CudaIpcBackend(LeaseTable(host=HOST))
    with pytest.raises(ProtocolError, match="bad CUDA IPC descriptor"):
        backend.open(good_where(**changes), lib, dtype, shape, nbytes, lambda: released.append(1))
    assert released == []  # the descriptor was never accepted


field = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70), st.floats(),
    st.binary(max_size=80), st.text(max_size=20), st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.lists(field, max_size=12))
def test_fuzzed_descriptor_raises_only_protocol_error(where: list[Any]) -> None:
    try:
        ipc.CudaIpcBackend.validate(where)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=9), field)
def test_one_bad_field_raises_only_protocol_error(index: int, value: Any) -> None:
    where = good_where()
    where[index] = value
    try:
        ipc.CudaIpcBackend.validate(where)
    except ProtocolError:
        pass


# -- the consumer without CUDA ---------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without CUDA")
def test_open_without_cuda_is_tensor_lost_and_releases_once() -> None:
    released: list[int] = []
    backend = ipc.CudaIpcBackend(LeaseTable(host=HOST))
    with pytest.raises(TensorLost, match="CUDA is not available"):
        backend.open(good_where(), 0, "float32", (24,), 96, lambda: released.append(1))
    assert released == [1]
    assert backend.stats.lost == 1


def test_open_cupy_without_cupy_is_tensor_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    released: list[int] = []
    backend = ipc.CudaIpcBackend(LeaseTable(host=HOST))
    where = good_where(handle=bytes(64), ref_counter=None)
    with pytest.raises(TensorLost, match="cupy is not installed"):
        backend.open(where, 2, "float32", (24,), 96, lambda: released.append(1))
    assert released == [1]


# -- the producer's refusals ------------------------------------------------------------------

def test_export_to_another_host_is_refused() -> None:
    backend = ipc.CudaIpcBackend(LeaseTable(host=HOST))
    with pytest.raises(HandleNotPortable, match="one host only"):
        backend.export(object(), 0, ("other-host", 1234))


def test_export_to_this_same_process_is_refused() -> None:
    backend = ipc.CudaIpcBackend(LeaseTable(host=HOST))
    with pytest.raises(SerializationError, match="same process"):
        backend.export(object(), 0, (HOST, os.getpid()))


def test_export_refuses_what_is_not_a_cuda_array(monkeypatch: pytest.MonkeyPatch) -> None:
    assert torch is not None
    leases = LeaseTable(host=HOST)
    backend = ipc.CudaIpcBackend(leases)
    with pytest.raises(SerializationError, match="needs a CUDA torch.Tensor"):
        backend.export(torch.zeros(4), 0, (HOST, 1))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    with pytest.raises(SerializationError, match="needs a cupy.ndarray"):
        backend.export(torch.zeros(4), 2, (HOST, 1))
    with pytest.raises(ValueError, match="lib 1"):
        backend.export(torch.zeros(4), 1, (HOST, 1))
    assert len(leases) == 0


# -- torch's count of each hand-off, and the lease that ends it -------------------------------

@pytest.fixture
def count_file() -> Iterator[bytes]:
    """A counter file laid out as torch's (a 64-byte header, then int64 counts), slot 3 at 1."""
    name = f"/torch_{os.getpid()}_{secrets.randbelow(1 << 30)}_0".encode()
    path = "/dev/shm" + name.decode()
    with open(path, "wb") as f:
        f.write(bytes(64) + struct.pack("=8q", 0, 0, 0, 1, 0, 0, 0, 0))
    yield name
    os.unlink(path)


def count(name: bytes, slot: int = 3) -> int:
    value = ipc._read_counter(name, slot)
    assert value is not None
    return value


class Keep:
    """Stands for the producer's tensor."""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def issue(leases: LeaseTable, backend: ipc.CudaIpcBackend, name: bytes, pid: int) -> tuple[int, Any]:
    keep = Keep()
    export = ipc.CudaExport(keep, (name, 3), pid, backend._ended)
    lease_id = leases.issue(export, (HOST, pid))
    return lease_id, weakref.ref(keep)


def test_dead_consumer_count_is_zeroed_before_the_tensor_goes(count_file: bytes) -> None:
    pid = dead_pid()
    leases = LeaseTable(host=HOST, process_gone=ipc.process_gone)
    backend = ipc.CudaIpcBackend(leases)
    _, kept = issue(leases, backend, count_file, pid)
    assert kept() is not None
    assert leases.sweep() == 1
    assert count(count_file) == 0 and kept() is None
    assert backend.stats.settled == 1 and backend.snapshot()["unsettled"] == 0


def test_live_consumer_count_waits_for_its_own_decrement(count_file: bytes) -> None:
    clock = Clock()
    leases = LeaseTable(host=HOST)
    backend = ipc.CudaIpcBackend(leases, settle_after=10.0, clock=clock)
    lease_id, kept = issue(leases, backend, count_file, os.getpid())
    leases.release([lease_id])  # the release overtook the consumer's decrement
    assert kept() is None  # dropped: torch's limbo keeps the block while the count is 1
    assert count(count_file) == 1 and backend.snapshot()["unsettled"] == 1
    backend.collect()
    assert backend.snapshot()["unsettled"] == 1
    ipc_path = "/dev/shm" + count_file.decode()
    with open(ipc_path, "r+b") as f:  # the consumer's deleter decrements
        f.seek(64 + 8 * 3)
        f.write(struct.pack("=q", 0))
    backend.collect()
    assert backend.snapshot()["unsettled"] == 0 and backend.stats.settled == 0


def test_count_never_decremented_is_zeroed_after_settle_after(count_file: bytes) -> None:
    clock = Clock()
    leases = LeaseTable(host=HOST)
    backend = ipc.CudaIpcBackend(leases, settle_after=10.0, clock=clock)
    lease_id, _ = issue(leases, backend, count_file, os.getpid())
    leases.revoke(lease_id)  # never sent: no consumer will ever decrement it
    clock.now += 9.9
    backend.collect()
    assert count(count_file) == 1
    clock.now += 0.2
    backend.collect()
    assert count(count_file) == 0 and backend.stats.settled == 1
    assert backend.snapshot()["unsettled"] == 0


def test_released_count_is_left_alone(count_file: bytes) -> None:
    leases = LeaseTable(host=HOST)
    backend = ipc.CudaIpcBackend(leases)
    lease_id, kept = issue(leases, backend, count_file, os.getpid())
    path = "/dev/shm" + count_file.decode()
    with open(path, "r+b") as f:
        f.seek(64 + 8 * 3)
        f.write(struct.pack("=q", 0))
    leases.release([lease_id])
    assert kept() is None and backend.snapshot()["unsettled"] == 0 and backend.stats.settled == 0


def test_odd_count_is_counted_and_left_alone(count_file: bytes, caplog: pytest.LogCaptureFixture) -> None:
    leases = LeaseTable(host=HOST, process_gone=ipc.process_gone)
    backend = ipc.CudaIpcBackend(leases)
    pid = dead_pid()
    _, kept = issue(leases, backend, count_file, pid)
    with open("/dev/shm" + count_file.decode(), "r+b") as f:
        f.seek(64 + 8 * 3)
        f.write(struct.pack("=q", 5))
    with caplog.at_level(logging.WARNING, logger=ipc.__name__):
        leases.sweep()
    assert count(count_file) == 5 and backend.stats.odd_counters == 1 and kept() is None
    assert "neither 0 nor 1" in caplog.text


def test_missing_count_file_is_not_an_error() -> None:
    leases = LeaseTable(host=HOST)
    backend = ipc.CudaIpcBackend(leases)
    lease_id, kept = issue(leases, backend, b"/torch_1_1_999999", os.getpid())
    leases.release([lease_id])
    assert kept() is None and backend.snapshot()["unsettled"] == 0


def test_cuda_lease_never_expires_by_ttl() -> None:
    clock = Clock()
    leases = LeaseTable(host=HOST, ttl=1.0, clock=clock)
    keep = Keep()
    leases.issue(ipc.CudaExport(keep), (HOST, os.getpid()))
    clock.now += 3600
    assert leases.sweep() == 0 and len(leases) == 1


def test_export_released_twice_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    export = ipc.CudaExport(Keep())
    export.acquire()
    export.release()
    assert not export.alive
    with caplog.at_level(logging.WARNING, logger=ipc.__name__):
        export.release()
    assert "more often than acquired" in caplog.text


def test_torch_counter_layout_matches() -> None:
    """The count file layout read by _read_counter (a 64-byte header, then int64s, named
    /torch_<pid>_<n>_<n>) is at::RefcountedMapAllocator's, which CPU sharing uses too. In a
    subprocess: sharing by file name starts torch's shm manager."""
    code = (
        "import torch\n"
        "from cascada.transport import _cuda_ipc as m\n"
        "t = torch.tensor([1, 7, 1], dtype=torch.int64)\n"
        "_, name, _ = t.untyped_storage()._share_filename_cpu_()\n"
        "assert m._REF_COUNTER.fullmatch(name), name\n"
        "assert [m._read_counter(name, i) for i in range(3)] == [1, 7, 1]\n"
        "assert m._zero_counter(name, 0) and not m._zero_counter(name, 1)\n"
        "assert t.tolist() == [0, 7, 1], t\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=45)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_count_file_is_checked_before_torch_writes_to_it(count_file: bytes) -> None:
    w = ipc._parse(good_where(ref_counter=count_file))
    with pytest.raises(ProtocolError, match="not a torch count file"):
        ipc._check_counter_file(w)  # the fixture's file is smaller than torch's
    with open("/dev/shm" + count_file.decode(), "r+b") as f:
        f.truncate(64 + 8 * 10000)
    ipc._check_counter_file(w)
    with pytest.raises(TensorLost, match="count file .* is gone"):
        ipc._check_counter_file(w._replace(ref_counter=b"/torch_1_1_999999"))


def test_pid_gone() -> None:
    assert not ipc.process_gone(os.getpid())
    assert ipc.process_gone(dead_pid())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    assert ipc.process_gone(zombie.pid)
    zombie.wait()


def test_collect_without_cuda_initialised_runs_nothing() -> None:
    backend = ipc.CudaIpcBackend(LeaseTable(host=HOST), collect_interval=0.0)
    leases = LeaseTable(host=HOST)
    export = ipc.CudaExport(Keep(), (b"/torch_1_1_999999", 0), os.getpid(), backend._ended)
    leases.release([leases.issue(export, (HOST, os.getpid()))])
    assert not backend.collect(force=True)
    assert backend.snapshot()["ipc_collect_runs"] == 0


# -- the consumer's release: once, after the memory is done with -----------------------------

def test_release_runs_once_when_the_last_view_of_a_storage_dies() -> None:
    """The consumer arms a finalizer on the mapped storage's Python object: torch keeps that
    object alive while any tensor uses the storage (checked here on a CPU storage)."""
    assert torch is not None
    released: list[str] = []
    storage = torch.UntypedStorage(64)
    ptr = storage.data_ptr()
    token = ipc._RECEIVED.add(ptr, ptr + 64)
    ipc._arm(storage, token, None, ipc._Once(lambda: released.append("r")))
    t = torch.empty(0, dtype=torch.float32).set_(storage, 2, (2, 3), ipc._strides((2, 3)))
    del storage
    views = [t[1], t.view(6)[3:], torch.empty(0).set_(t.untyped_storage())]
    del t
    gc.collect()
    assert released == [] and ipc._RECEIVED.contains(views[0].data_ptr())
    views.pop()
    views.pop()
    assert released == []
    views.clear()
    assert released == ["r"]
    assert not ipc._RECEIVED.contains(ptr)


def test_finish_closes_before_releasing_and_survives_errors(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def close() -> None:
        calls.append("close")
        raise RuntimeError("unmap failed")

    release = ipc._Once(lambda: calls.append("release"))
    with caplog.at_level(logging.ERROR, logger=ipc.__name__):
        ipc._finish(ipc._RECEIVED.add(0, 1), close, release)
    release()
    assert calls == ["close", "release"]
    assert "releasing its lease anyway" in caplog.text


def test_strides() -> None:
    assert ipc._strides(()) == ()
    assert ipc._strides((2, 3, 4)) == (12, 4, 1)
    assert ipc._strides((0, 3)) == (3, 1)


def test_mapped_range_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    status = [0]

    def fake(pbase: Any, psize: Any, ptr: Any) -> int:
        ctypes.cast(pbase, ctypes.POINTER(ctypes.c_uint64))[0] = 0x10000
        ctypes.cast(psize, ctypes.POINTER(ctypes.c_size_t))[0] = 4096
        return status[0]

    monkeypatch.setattr(ipc, "_driver", fake)
    w = ipc._parse(good_where(block_offset=512, storage_nbytes=3584, offset=0))
    ipc._check_mapped(0x10000, w)
    w = ipc._parse(good_where(block_offset=512, storage_nbytes=3585, offset=0))
    with pytest.raises(ProtocolError, match="overruns"):
        ipc._check_mapped(0x10000, w)
    ipc._check_mapped(0x10000, w._replace(handle=b"\x03e" + bytes(100)))  # expandable: not checked
    status[0] = 500  # the driver does not know the mapping: not checked
    ipc._check_mapped(0x10000, w)


# -- the check script ----------------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without CUDA")
def test_gpu_check_script_skips_without_cuda() -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--json"],
                         capture_output=True, text=True, timeout=45)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no CUDA device: skipped")
    assert '"skipped"' in out.stdout.splitlines()[-1]


def load_script() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_loads_the_backend_without_pyzmq_or_msgpack() -> None:
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'scripts')!r})\n"
        "import gpu_check\n"
        "m = gpu_check.load_backend()\n"
        "m.CudaIpcBackend.validate(" + repr(good_where()) + ")\n"
        "loaded = [n for n in ('zmq', 'msgpack', 'cascada', 'torch') if n in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_gpu_check_pattern_sum_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    for start, n in ((0, 0), (0, 1), (5, 3000), (1008, 2), (12345, 4096)):
        assert script.pattern_sum(start, n) == sum(i % script.PATTERN for i in range(start, start + n))
    row = {"bytes": 1 << 20, "ipc_ms_p50": 0.2, "ipc_ms_min": 0.1, "export_ms_p50": 0.05,
           "open_ms_p50": 0.1, "reclaim_ms_p50": 0.3, "release_before_count": 0,
           "staged_ms_p50": 1.5, "staged_over_ipc": 7.5}
    report = {"env": {"device": "GPU"}, "runs": 5, "handoff": [row, dict(row, bytes=1 << 30)],
              "producer_death": {"queued_outcomes": {"TensorLost": 10}}, "failures": ["x"], "wall_s": 1.0}
    script.print_table(report)
    out = capsys.readouterr().out
    assert "1 MiB" in out and "1 GiB" in out and "TensorLost" in out and "FAIL" in out


# -- on a GPU ------------------------------------------------------------------------------

@gpu
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_check_script() -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--quick", "--json"],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr


@gpu
def test_gpu_dead_consumer_frees_producer_memory() -> None:
    assert torch is not None
    leases = LeaseTable(host=HOST, process_gone=ipc.process_gone)
    backend = ipc.CudaIpcBackend(leases)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    where = backend.export(x, 0, (HOST, dead_pid()))
    ipc.CudaIpcBackend.validate(where)
    assert len(leases) == 1
    del x
    assert torch.cuda.memory_allocated() > base  # the lease keeps it
    assert leases.sweep() == 1
    backend.collect(force=True)
    assert torch.cuda.memory_allocated() == base
    assert backend.stats.settled == 1


@gpu
def test_gpu_revoked_lease_frees_memory_after_settle() -> None:
    assert torch is not None
    leases = LeaseTable(host=HOST)
    backend = ipc.CudaIpcBackend(leases, settle_after=0.0, collect_interval=0.0)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    x = torch.ones(1 << 20, device="cuda")
    where = backend.export(x, 0, (HOST, os.getppid()))  # a live consumer that never opens it
    del x
    leases.revoke(where[5])
    backend.collect(force=True)
    assert torch.cuda.memory_allocated() == base
    assert backend.snapshot()["unsettled"] == 0


@gpu
def test_gpu_export_refusals_and_empty_tensor() -> None:
    assert torch is not None
    leases = LeaseTable(host=HOST)
    backend = ipc.CudaIpcBackend(leases)
    with pytest.raises(SerializationError, match="non-contiguous"):
        backend.export(torch.zeros(4, 4, device="cuda").t(), 0, (HOST, os.getppid()))
    assert len(leases) == 0
    where = backend.export(torch.zeros(0, 3, device="cuda"), 0, (HOST, os.getppid()))
    ipc.CudaIpcBackend.validate(where)
    released: list[int] = []
    out = backend.open(where, 0, "float32", (0, 3), 0, lambda: released.append(1))
    assert out.is_cuda and tuple(out.shape) == (0, 3) and released == [1]
    leases.release([where[5]])
    assert len(leases) == 0
    assert ipc.is_cuda(out) and not backend.is_received(out)
