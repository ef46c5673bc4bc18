"""CUDA IPC: a GPU tensor handed to another process on this host by handle, under a lease.

The producer exports the ``cudaMalloc`` block that holds the tensor (torch's storage
sharing, or ``cudaIpcGetMemHandle`` for CuPy), records an event after its writes, and issues
a lease; the consumer maps the block, waits on the event, and sends the release when its
last view of the tensor dies. The rules, and why, are in ``transport/TENSOR_LIFETIMES.md``
(section "CUDA IPC"). torch and cupy are imported only inside the functions that need them:
this module imports on a machine with neither.

The ``where`` list of a CUDA descriptor (after the tag 2), every field msgpack-native::

    0 handle           bytes      the exported allocation (torch: its versioned handle string)
    1 offset_bytes     int        first byte of the tensor, from the start of the storage
    2 storage_nbytes   int        bytes of the storage (0 only for an empty tensor)
    3 device           int        the producer's device index
    4 event_handle     bytes|None IPC handle of an event recorded after the producer's writes
    5 lease_id         int        the producer's lease, named in the release
    6 block_offset     int        start of the storage, from the base of the allocation
    7 ref_counter      bytes|None torch's shared-memory counter file for this hand-off
    8 ref_counter_slot int        the counter's index in that file
    9 device_uuid      bytes|None the GPU's 16-byte UUID, so device numbering may differ
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

from ._errors import HandleNotPortable, ProtocolError, SerializationError, TensorLost
from ._endpoints import process_gone
from ._leases import Consumer, LeaseTable

__all__ = ["LIB_CUPY", "LIB_TORCH", "CudaExport", "CudaIpcBackend", "is_cuda"]

LIB_TORCH, LIB_CUPY = 0, 2

ITEMSIZE: dict[str, int] = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex64": 8, "complex128": 16,
}

_HANDLE_MIN, _HANDLE_MAX = 64, 4096  # torch's handle is 2 + 64 bytes for a cudaMalloc block,
                                     # longer for an expandable segment
_EVENT_HANDLE = 64  # sizeof(cudaIpcEventHandle_t)
_MAX_BYTES = 1 << 46  # the codec's MAX_TENSOR_BYTES
_MAX_DEVICE = 127  # c10::DeviceIndex is an int8
_MAX_DIMS = 32
_LEASE_MAX = (1 << 63) - 1
# torch names its counter files "/torch_<pid>_<random>_<n>" (at::NewProcessWideShmHandle);
# anything else could point the consumer's decrement at an unrelated file.
_REF_COUNTER = re.compile(rb"/torch_[0-9]{1,10}_[0-9]{1,20}_[0-9]{1,20}")
_REF_COUNTER_SLOTS = 10000  # torch::CUDA_IPC_REF_COUNTER_FILE_SIZE
_SHM_HEADER = 64  # at::RefcountedMapAllocator keeps its own refcount in the first 64 bytes
_SHM_DIR = "/dev/shm"

_log = logging.getLogger(__name__)


# -- what is a CUDA tensor -----------------------------------------------------------------

def is_cuda(obj: object) -> bool:
    """True for a CUDA torch.Tensor or a cupy.ndarray. Never imports torch or cupy: a value of
    their types can only exist once they are imported."""
    module = type(obj).__module__
    if module == "builtins" or module.startswith("numpy"):
        return False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return bool(obj.is_cuda)
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(obj, cupy.ndarray)


# -- the descriptor ------------------------------------------------------------------------

class _Where(NamedTuple):
    handle: bytes
    offset: int
    storage_nbytes: int
    device: int
    event: bytes | None
    lease_id: int
    block_offset: int
    ref_counter: bytes | None
    ref_counter_slot: int
    device_uuid: bytes | None


def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"bad CUDA IPC descriptor: {what}; the frame is dropped")


def _int(name: str, value: object, low: int, high: int) -> int:
    # bool is an int to Python but never a valid field here
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{name} must be an int in [{low}, {high}], got {_show(value)}")
    return value


def _bytes(name: str, value: object, low: int, high: int) -> bytes:
    if type(value) is not bytes or not low <= len(value) <= high:
        raise _bad(f"{name} must be {low}..{high} bytes, got {_show(value)}")
    return value


def _show(value: object) -> str:
    if isinstance(value, (bytes, str, list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    return repr(value)[:40]


def _parse(where: object) -> _Where:
    n = len(_Where._fields)
    if not isinstance(where, (list, tuple)) or len(where) != n:
        raise _bad(f"expected {n} fields after the tag, got {_show(where)}")
    f: list[object] = list(where)
    storage_nbytes = _int("storage_nbytes", f[2], 0, _MAX_BYTES)
    if storage_nbytes == 0:
        # an empty tensor: nothing was exported
        if f[0] != b"":
            raise _bad("an empty storage comes with an empty handle")
        handle = b""
    else:
        handle = _bytes("handle", f[0], _HANDLE_MIN, _HANDLE_MAX)
    event = None if f[4] is None else _bytes("event_handle", f[4], _EVENT_HANDLE, _EVENT_HANDLE)
    counter = f[7]
    if counter is not None and (type(counter) is not bytes or not _REF_COUNTER.fullmatch(counter)):
        raise _bad(f"ref_counter must be None or a torch counter name, got {_show(counter)}")
    uuid = None if f[9] is None else _bytes("device_uuid", f[9], 16, 16)
    return _Where(
        handle=handle,
        offset=_int("offset_bytes", f[1], 0, storage_nbytes),
        storage_nbytes=storage_nbytes,
        device=_int("device", f[3], 0, _MAX_DEVICE),
        event=event,
        lease_id=_int("lease_id", f[5], 1, _LEASE_MAX),
        block_offset=_int("block_offset", f[6], 0, _MAX_BYTES),
        ref_counter=counter,
        ref_counter_slot=_int("ref_counter_slot", f[8], 0, _REF_COUNTER_SLOTS - 1),
        device_uuid=uuid,
    )


def _check_view(w: _Where, lib: object, dtype: object, shape: object, nbytes: object) -> tuple[int, ...]:
    """The tensor the descriptor describes fits in what was exported, and lib can hold it."""
    if lib not in (LIB_TORCH, LIB_CUPY) or type(lib) is not int:
        raise _bad(f"lib {lib!r} has no CUDA arrays (0 torch, 2 cupy)")
    if type(dtype) is not str or dtype not in ITEMSIZE:
        raise _bad(f"dtype {dtype!r} is not on the allowlist")
    if lib == LIB_CUPY and dtype == "bfloat16":
        raise _bad("cupy has no bfloat16; the sender must send a torch tensor or a uint16 view")
    if not isinstance(shape, (list, tuple)) or len(shape) > _MAX_DIMS:
        raise _bad(f"shape must be a list of at most {_MAX_DIMS} ints, got {_show(shape)}")
    dims = tuple(_int("a dimension", d, 0, _MAX_BYTES) for d in shape)
    itemsize = ITEMSIZE[dtype]
    size = _int("nbytes", nbytes, 0, _MAX_BYTES)
    if math.prod(dims) * itemsize != size:
        raise _bad(f"{dtype}{list(dims)} is {math.prod(dims) * itemsize} bytes, the descriptor says {size}")
    if w.offset + size > w.storage_nbytes:
        raise _bad(f"bytes {w.offset}..{w.offset + size} lie outside the {w.storage_nbytes}-byte storage")
    if size and (w.block_offset % itemsize or w.offset % itemsize):
        raise _bad(f"{dtype} data at byte {w.offset} of a storage at byte {w.block_offset} of its "
                   "allocation is misaligned")
    if w.storage_nbytes and lib == LIB_TORCH and w.ref_counter is None:
        raise _bad("a torch handle comes with torch's ref counter")
    if lib == LIB_CUPY and (w.ref_counter is not None or (w.storage_nbytes and len(w.handle) != 64)):
        raise _bad("a cupy handle is a bare 64-byte cudaIpcMemHandle_t with no ref counter")
    return dims


# -- process-wide state ----------------------------------------------------------------------
#
# These two tables describe this process's CUDA contexts, not any one backend: a handle may be
# opened once per context, whichever backend asks, and a received mapping stays received.

class _Received:
    """Address ranges of tensors this process received by handle, so that sending one on
    copies it instead of exporting memory this process does not own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: dict[int, tuple[int, int]] = {}
        self._ids = 0

    def add(self, start: int, end: int) -> int:
        with self._lock:
            self._ids += 1
            self._ranges[self._ids] = (start, end)
            return self._ids

    def discard(self, token: int) -> None:
        with self._lock:
            self._ranges.pop(token, None)

    def contains(self, address: int) -> bool:
        with self._lock:
            return any(start <= address < end for start, end in self._ranges.values())

    def __len__(self) -> int:
        return len(self._ranges)


class _CupyHandles:
    """cudaIpcOpenMemHandle may map a handle once per context: one mapping per handle, counted,
    closed when the last array over it is gone. (torch keeps the same cache in C++.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[bytes, int], list[int]] = {}  # -> [base pointer, users]

    def open(self, cp: Any, handle: bytes, device: int) -> int:
        key = (handle, device)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                with cp.cuda.Device(device):
                    base = int(cp.cuda.runtime.ipcOpenMemHandle(handle))
                entry = self._open[key] = [base, 0]
            entry[1] += 1
            return entry[0]

    def close(self, cp: Any, handle: bytes, device: int) -> None:
        key = (handle, device)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._open[key]
        with cp.cuda.Device(device):
            cp.cuda.runtime.ipcCloseMemHandle(entry[0])

    def __len__(self) -> int:
        return len(self._open)


_RECEIVED = _Received()
_CUPY_HANDLES = _CupyHandles()


# -- the CUDA driver, for what neither library exposes ------------------------------------

_CUDA_SUCCESS, _CUDA_ERROR_INVALID_VALUE, _CUDA_ERROR_NOT_FOUND = 0, 1, 500
_driver: Any = None


def _address_range(ptr: int) -> tuple[int, int] | None:
    """(base, size) of the allocation that holds device pointer ptr; None when the driver
    cannot say (no libcuda). Raises LookupError when ptr is in no allocation."""
    global _driver
    if _driver is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuMemGetAddressRange_v2
        except (OSError, AttributeError):
            _driver = False
            return None
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        fn.restype = ctypes.c_int
        _driver = fn
    if _driver is False:
        return None
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    status = int(_driver(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)))
    if status in (_CUDA_ERROR_NOT_FOUND, _CUDA_ERROR_INVALID_VALUE):
        raise LookupError(f"0x{ptr:x} is in no CUDA allocation (CUresult {status})")
    if status != _CUDA_SUCCESS:
        return None
    return int(base.value), int(size.value)


def _check_mapped(base: int, w: _Where) -> None:
    """The storage lies inside the allocation the handle mapped at ``base``: a sender that
    lied about block_offset or storage_nbytes would otherwise make this process read out of
    bounds, which kills its CUDA context. Only for plain cudaMalloc handles (torch's type
    'c', CuPy's bare ones); where the driver cannot say, the check is skipped."""
    if len(w.handle) != 64 and w.handle[1:2] != b"c":
        return  # an expandable segment is mapped piecewise; its pieces are not the bound
    try:
        found = _address_range(base)
    except LookupError:
        found = None  # this driver does not track the mapping
    if found is None:
        return
    end = found[0] + found[1]
    if base + w.block_offset + w.storage_nbytes > end:
        raise _bad(f"a {w.storage_nbytes}-byte storage at byte {w.block_offset} overruns the "
                   f"{end - base}-byte allocation its handle maps")


# -- torch's count of each hand-off ----------------------------------------------------------
#
# torch counts every _share_cuda_ in a shared-memory file: 1 from the send, 0 once the
# consumer's storage is freed (its deleter syncs the consumer's stream first). A producer
# block freed while its count is above 0 waits in torch's "limbo" until the count is 0.
# The count of a consumer that died, or never mapped the handle, stays 1 for the producer's
# whole life: the leak PyTorch documents. The backend zeroes such counts (see _ended).

def _read_counter(name: bytes, slot: int) -> int | None:
    """The count, or None when its file is gone (or unreadable)."""
    try:
        fd = os.open(_SHM_DIR + name.decode("ascii"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 8, _SHM_HEADER + 8 * slot)
    finally:
        os.close(fd)
    return struct.unpack("=q", raw)[0] if len(raw) == 8 else None


def _zero_counter(name: bytes, slot: int) -> bool:
    """Set a count of 1 to 0; False (and no write) if it was anything else."""
    try:
        fd = os.open(_SHM_DIR + name.decode("ascii"), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        where = _SHM_HEADER + 8 * slot
        if os.pread(fd, 8, where) != struct.pack("=q", 1):
            return False
        os.pwrite(fd, struct.pack("=q", 0), where)
        return True
    finally:
        os.close(fd)


def _check_counter_file(w: _Where) -> None:
    """torch's deleter maps the named file at the size of a counter file and decrements one
    slot; a smaller file (another process's shared tensor, say) would be grown and written.
    A missing one means its producer has gone."""
    assert w.ref_counter is not None
    try:
        size = os.stat(_SHM_DIR + w.ref_counter.decode("ascii")).st_size
    except FileNotFoundError as exc:
        raise TensorLost(f"the producer's count file {w.ref_counter.decode('ascii')} is gone: it has "
                         "most likely exited; resend from a live producer") from exc
    if size < _SHM_HEADER + 8 * _REF_COUNTER_SLOTS:
        raise _bad(f"ref_counter {w.ref_counter.decode('ascii')} is a {size}-byte file, not a "
                   "torch count file")


class _IpcCollector:
    """torch.cuda.ipc_collect(): frees limbo blocks whose count reached 0 and closes an idle
    counter file. At most once per interval, since it walks the limbo under a lock."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self._clock = clock
        self._last = -math.inf
        self.pending = False
        self.runs = 0

    def collect(self, force: bool = False) -> bool:
        if not self.pending:
            return False
        now = self._clock()
        if not force and now - self._last < self.interval:
            return False
        self.pending = False
        self._last = now
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return False  # a process that never touched CUDA shared nothing through torch
        torch.cuda.ipc_collect()
        self.runs += 1
        return True


# -- the producer's side -------------------------------------------------------------------

class CudaExport:
    """One hand-off, kept alive while its lease is out (a Resource of ``_leases``).

    Holds the producer's tensor, so its block cannot return to the caching allocator (or the
    CuPy pool) while a consumer may have it mapped, and the event the consumer waits on."""

    __slots__ = ("_keep", "counter", "consumer_pid", "_on_end", "_holders")

    def __init__(self, keep: object, counter: tuple[bytes, int] | None = None, consumer_pid: int = 0,
                 on_end: Callable[[CudaExport], None] | None = None) -> None:
        self._keep: object = keep
        self.counter = counter  # torch's (file, slot) for this hand-off
        self.consumer_pid = consumer_pid
        self._on_end = on_end
        self._holders = 0

    def acquire(self) -> None:
        self._holders += 1

    def release(self) -> None:
        if self._holders <= 0:
            _log.warning("a CudaExport was released more often than acquired; ignored")
            return
        self._holders -= 1
        if self._holders == 0:
            if self._on_end is not None:
                self._on_end(self)
            else:
                self.drop()

    def drop(self) -> None:
        self._keep = None

    def held_elsewhere(self) -> bool:
        # A mapping in another process cannot be seen from here: never expire by ttl.
        return True

    @property
    def alive(self) -> bool:
        return self._keep is not None


class CudaStats:
    __slots__ = ("exported", "opened", "copied", "lost", "settled", "odd_counters")

    def __init__(self) -> None:
        self.exported = 0
        self.opened = 0
        self.copied = 0  # copies exported instead: received tensors, memory without a handle
        self.lost = 0  # opens that failed with TensorLost
        self.settled = 0  # torch counts we zeroed for consumers that never did
        self.odd_counters = 0  # counts that were neither 0 nor 1 when a lease ended

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


# -- the consumer's side -------------------------------------------------------------------

class _Once:
    """on_release, callable any number of times from any thread, calls through once."""

    __slots__ = ("_fn", "_lock")

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class _Owner:
    """The owner of a received cupy array's memory; its views keep it alive."""

    __slots__ = ("__weakref__",)


def _finish(token: int, close: Callable[[], None] | None, release: _Once) -> None:
    """The last view of a received tensor is gone. Runs in whatever thread freed it."""
    _RECEIVED.discard(token)
    try:
        if close is not None:
            close()
    except Exception:
        _log.exception("unmapping a received CUDA tensor failed; releasing its lease anyway")
    try:
        release()
    except Exception:
        _log.exception("releasing the lease of a received CUDA tensor failed")


def _arm(obj: object, token: int, close: Callable[[], None] | None, release: _Once) -> None:
    fin = weakref.finalize(obj, _finish, token, close, release)
    # at interpreter exit the process's death ends its leases; no messages then
    fin.atexit = False


def _strides(dims: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for d in reversed(dims):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def _lost(w: _Where, device: int, exc: BaseException) -> TensorLost:
    return TensorLost(
        f"could not map the CUDA IPC handle of lease {w.lease_id} on cuda:{device} in process "
        f"{os.getpid()}: {exc}. Its producer has most likely exited; resend from a live producer")


class CudaIpcBackend:
    """Exports CUDA tensors under leases of ``leases``, and opens the ones others export.

    Owned by the event loop, like the lease table; only the release callbacks of opened
    tensors run elsewhere (in whatever thread frees the tensor). Call :meth:`collect` from the
    node's periodic lease sweep."""

    def __init__(self, leases: LeaseTable, *, settle_after: float = 10.0, collect_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._leases = leases
        self.settle_after = settle_after
        self._clock = clock
        self._collector = _IpcCollector(collect_interval, clock)
        # torch counts still at 1 when their lease ended, while the consumer lived: (due, file, slot)
        self._unsettled: list[tuple[float, bytes, int]] = []
        self._uuids: dict[tuple[int, int], bytes | None] = {}
        self.stats = CudaStats()

    # -- producer ----------------------------------------------------------------------

    def export(self, obj: Any, lib: int, consumer: Consumer) -> list[Any]:
        """The ``where`` fields for obj, a contiguous CUDA tensor (lib 0) or cupy array
        (lib 2), handed to ``consumer`` under a new lease of this backend's table."""
        if consumer[0] != self._leases.host:
            raise HandleNotPortable(
                f"a CUDA IPC handle was about to go to host {consumer[0]!r} from host "
                f"{self._leases.host!r}: handles work on one host only. Copy the tensor through "
                "host memory (cuda_cross_host='copy'), or move it to the CPU before sending")
        if consumer[1] == os.getpid():
            # CUDA cannot open a handle in the process that made it
            raise SerializationError(
                "a CUDA tensor for this same process must be passed as the object itself, "
                "not by IPC handle")
        if lib == LIB_TORCH:
            fields, resource = self._export_torch(obj, consumer[1])
        elif lib == LIB_CUPY:
            fields, resource = self._export_cupy(obj)
        else:
            raise ValueError(f"lib {lib} has no CUDA arrays (0 torch, 2 cupy)")
        fields[5] = self._leases.issue(resource, consumer)
        self.stats.exported += 1
        if self._unsettled:
            self.collect()
        return fields

    def _export_torch(self, obj: Any, consumer_pid: int) -> tuple[list[Any], CudaExport]:
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(obj, torch.Tensor) or not obj.is_cuda:
            raise SerializationError(f"lib 0 (torch) needs a CUDA torch.Tensor, got {type(obj).__name__}")
        t = obj.detach().resolve_conj().resolve_neg()
        if not t.is_contiguous():
            raise SerializationError("non-contiguous CUDA tensor: call .contiguous() before sending")
        device = int(t.device.index)
        uuid = self._uuid(LIB_TORCH, device)
        if t.numel() == 0:
            return [b"", 0, 0, device, None, 0, 0, None, 0, uuid], CudaExport(None)
        copied = _RECEIVED.contains(int(t.data_ptr()))
        if copied:
            t = self._copy(t)
        try:
            shared = t.untyped_storage()._share_cuda_()
        except RuntimeError as exc:
            # Memory that torch's caching allocator did not hand out (from_blob, another
            # library's pool, a tensor received from elsewhere) has no handle; a copy has.
            if copied:
                raise SerializationError(f"cannot export a CUDA tensor by IPC: {exc}") from exc
            t = self._copy(t)
            try:
                shared = t.untyped_storage()._share_cuda_()
            except RuntimeError as exc2:
                raise SerializationError(
                    f"cannot export a CUDA tensor by IPC, not even a fresh copy: {exc2}. With "
                    "PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync nothing can be; send it "
                    "through host memory instead") from exc2
        _dev, handle, storage_nbytes, block_offset, counter, slot, event, sync = shared
        fields = [bytes(handle), int(t.storage_offset()) * int(t.element_size()), int(storage_nbytes),
                  device, bytes(event) if sync else None, 0, int(block_offset), bytes(counter), int(slot),
                  uuid]
        return fields, CudaExport(t, (bytes(counter), int(slot)), consumer_pid, self._ended)

    def _export_cupy(self, obj: Any) -> tuple[list[Any], CudaExport]:
        cp = sys.modules.get("cupy")
        if cp is None or not isinstance(obj, cp.ndarray):
            raise SerializationError(f"lib 2 (cupy) needs a cupy.ndarray, got {type(obj).__name__}")
        if not obj.flags.c_contiguous:
            raise SerializationError("non-contiguous cupy array: call cupy.ascontiguousarray() before sending")
        a = obj
        device = int(a.device.id)
        uuid = self._uuid(LIB_CUPY, device)
        if a.nbytes == 0:
            return [b"", 0, 0, device, None, 0, 0, None, 0, uuid], CudaExport(None)
        with cp.cuda.Device(device):
            if _RECEIVED.contains(int(a.data.ptr)):
                a = self._copy(a)
            ptr = int(a.data.ptr)
            try:
                found = _address_range(ptr)
                if found is None:
                    raise LookupError("libcuda.so.1 could not be loaded to find the allocation")
                base, size = found
                # a handle names a whole cudaMalloc allocation: export its base, send the offset
                handle = bytes(cp.cuda.runtime.ipcGetMemHandle(base))
            except (LookupError, cp.cuda.runtime.CUDARuntimeError) as exc:
                raise SerializationError(
                    f"cannot export a cupy array by IPC ({exc}); memory from a stream-ordered pool "
                    "(cupy.cuda.MemoryAsyncPool) cannot be: send it through host memory") from exc
            event = cp.cuda.Event(block=False, disable_timing=True, interprocess=True)
            event.record()  # on the current stream, after the producer's writes
            event_handle = bytes(cp.cuda.runtime.ipcGetEventHandle(event.ptr))
        fields = [handle, ptr - base, int(size), device, event_handle, 0, 0, None, 0, uuid]
        return fields, CudaExport((a, event))

    def _copy(self, x: Any) -> Any:
        # A received handle is never passed on: the owner's lease covers only its consumer.
        self.stats.copied += 1
        return x.clone() if hasattr(x, "clone") else x.copy()

    def _ended(self, export: CudaExport) -> None:
        """The last lease on a torch hand-off ended (released, expired or revoked)."""
        assert export.counter is not None
        name, slot = export.counter
        self._settle(export, name, slot)
        export.drop()
        self._collector.pending = True
        self._collector.collect()

    def _settle(self, export: CudaExport, name: bytes, slot: int) -> None:
        count = _read_counter(name, slot)
        if count == 1:
            if export.consumer_pid and process_gone(export.consumer_pid):
                # Nobody will decrement it. Zeroed before the tensor goes, the block is freed
                # at once instead of waiting in limbo.
                if _zero_counter(name, slot):
                    self.stats.settled += 1
            else:
                # The consumer lives: it may be freeing its storage right now (its release can
                # overtake the decrement, which waits for its stream), or it never mapped the
                # handle (a revoked lease). Limbo keeps the block until the count is 0.
                self._unsettled.append((self._clock() + self.settle_after, name, slot))
        elif count not in (0, None):
            self.stats.odd_counters += 1
            _log.warning("torch's IPC count %s[%d] is %d, neither 0 nor 1, when its lease ended; "
                         "left alone", name.decode("ascii", "replace"), slot, count)

    def collect(self, force: bool = False) -> bool:
        """Housekeeping for the node's periodic sweep (every second or so): zero torch counts
        that outlived their lease by ``settle_after``, and run torch.cuda.ipc_collect() when a
        lease ended since the last run and the interval has passed (at once with force).
        Returns whether ipc_collect ran."""
        if self._unsettled:
            now = self._clock()
            waiting = []
            for due, name, slot in self._unsettled:
                if now < due and _read_counter(name, slot) == 1:
                    waiting.append((due, name, slot))
                    continue
                if _zero_counter(name, slot):
                    self.stats.settled += 1
                self._collector.pending = True  # its block can leave limbo now
            self._unsettled = waiting
        return self._collector.collect(force)

    def is_received(self, obj: Any) -> bool:
        """True when obj's memory was mapped from another process (sending it copies it)."""
        if not is_cuda(obj):
            return False
        ptr = obj.data_ptr() if hasattr(obj, "data_ptr") else obj.data.ptr
        return _RECEIVED.contains(int(ptr))

    def snapshot(self) -> dict[str, int]:
        d = self.stats.to_dict()
        d["unsettled"] = len(self._unsettled)
        d["received_live"] = len(_RECEIVED)
        d["ipc_collect_runs"] = self._collector.runs
        return d

    # -- consumer ----------------------------------------------------------------------

    @staticmethod
    def validate(where: list[Any]) -> None:
        """Raise ProtocolError unless where is a well-formed CUDA location. Touches no CUDA."""
        _parse(where)

    def open(self, where: list[Any], lib: int, dtype: str, shape: tuple[int, ...], nbytes: int,
             on_release: Callable[[], None]) -> Any:
        """The tensor (lib 0) or cupy array (lib 2) the producer exported, mapped here.

        ``on_release`` is called exactly once, from whichever thread frees the last view of the
        result. If open raises ProtocolError from the checks of the descriptor, which come
        before anything else, on_release is not called; after them, any failure (TensorLost
        when the handle cannot be mapped) calls it before open raises."""
        w = _parse(where)
        dims = _check_view(w, lib, dtype, shape, nbytes)
        release = _Once(on_release)
        try:
            if lib == LIB_TORCH:
                out = self._open_torch(w, dtype, dims, nbytes, release)
            else:
                out = self._open_cupy(w, dtype, dims, nbytes, release)
        except BaseException as exc:
            release()
            if isinstance(exc, TensorLost):
                self.stats.lost += 1
            raise
        self.stats.opened += 1
        return out

    def _local_device(self, lib: int, w: _Where, count: int) -> int:
        """This process's index of the producer's GPU (CUDA_VISIBLE_DEVICES may differ)."""
        if w.device_uuid is not None:
            uuids = [self._uuid(lib, i) for i in range(count)]
            if w.device_uuid in uuids:
                return uuids.index(w.device_uuid)
            if any(u is not None for u in uuids):
                raise TensorLost(
                    f"the GPU holding the tensor (uuid {w.device_uuid.hex()}) is not visible in "
                    f"process {os.getpid()}: check CUDA_VISIBLE_DEVICES of producer and consumer")
        if w.device >= count:
            raise TensorLost(f"the tensor is on cuda:{w.device} of its producer, and process "
                             f"{os.getpid()} sees {count} CUDA device(s)")
        return w.device

    def _uuid(self, lib: int, device: int) -> bytes | None:
        key = (lib, device)
        if key not in self._uuids:
            self._uuids[key] = _device_uuid(lib, device)
        return self._uuids[key]

    def _open_torch(self, w: _Where, dtype: str, dims: tuple[int, ...], nbytes: int, release: _Once) -> Any:
        torch = _torch_for_open()
        device = self._local_device(LIB_TORCH, w, int(torch.cuda.device_count()))
        tdtype = getattr(torch, dtype)
        if nbytes == 0:
            out = torch.empty(dims, dtype=tdtype, device=f"cuda:{device}")
            release()  # nothing was mapped, nothing to hold
            return out
        _check_counter_file(w)
        try:
            with torch.cuda.device(device):
                # torch maps each handle once per process and keeps the mapping while any
                # storage over it lives; the storage's deleter syncs this stream and
                # decrements the producer's count.
                storage = torch.UntypedStorage._new_shared_cuda(
                    device, w.handle, w.storage_nbytes, w.block_offset, w.ref_counter,
                    w.ref_counter_slot, bytes(_EVENT_HANDLE), False)
                _check_mapped(int(storage.data_ptr()) - w.block_offset, w)
                if w.event is not None:
                    # Our reads queue behind the producer's writes, without blocking this
                    # thread. After the mapping: a dead producer's handle fails there, before
                    # our stream could wait on an event that will never fire.
                    event = torch.cuda.Event.from_ipc_handle(torch.device("cuda", device), w.event)
                    event.wait(torch.cuda.current_stream(device))
        except RuntimeError as exc:
            raise _lost(w, device, exc) from exc
        base = int(storage.data_ptr())
        out = torch.empty(0, dtype=tdtype, device=f"cuda:{device}")
        out.set_(storage, w.offset // ITEMSIZE[dtype], dims, _strides(dims))
        # torch keeps a storage's Python object alive as long as any tensor uses the storage,
        # so its finalizer runs when the last view, of whatever kind, is gone.
        _arm(storage, _RECEIVED.add(base, base + w.storage_nbytes), None, release)
        return out

    def _open_cupy(self, w: _Where, dtype: str, dims: tuple[int, ...], nbytes: int, release: _Once) -> Any:
        cp = _cupy_for_open()
        device = self._local_device(LIB_CUPY, w, int(cp.cuda.runtime.getDeviceCount()))
        if nbytes == 0:
            with cp.cuda.Device(device):
                out = cp.empty(dims, dtype=dtype)
            release()
            return out
        try:
            base = _CUPY_HANDLES.open(cp, w.handle, device)
        except cp.cuda.runtime.CUDARuntimeError as exc:
            raise _lost(w, device, exc) from exc

        def close() -> None:
            with cp.cuda.Device(device):
                # the producer may reuse the memory once released: finish our reads first
                cp.cuda.get_current_stream().synchronize()
            _CUPY_HANDLES.close(cp, w.handle, device)

        try:
            with cp.cuda.Device(device):
                _check_mapped(base, w)
                if w.event is not None:
                    event = cp.cuda.runtime.ipcOpenEventHandle(w.event)
                    try:
                        cp.cuda.runtime.streamWaitEvent(cp.cuda.get_current_stream().ptr, event)
                    finally:
                        cp.cuda.runtime.eventDestroy(event)
                ptr = base + w.block_offset + w.offset
                owner = _Owner()
                mem = cp.cuda.UnownedMemory(ptr, nbytes, owner, device)
                out = cp.ndarray(dims, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))
        except BaseException as exc:
            _CUPY_HANDLES.close(cp, w.handle, device)
            if isinstance(exc, cp.cuda.runtime.CUDARuntimeError):
                raise _lost(w, device, exc) from exc
            raise
        _arm(owner, _RECEIVED.add(ptr, ptr + nbytes), close, release)
        return out


# -- lazy imports ---------------------------------------------------------------------------

def _torch_for_open() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise TensorLost(f"a torch CUDA tensor arrived, and torch is not installed in process "
                         f"{os.getpid()}: install torch with CUDA, or send it to the CPU first") from exc
    if not torch.cuda.is_available():
        raise TensorLost(f"a CUDA tensor arrived, and CUDA is not available in process {os.getpid()}: "
                         "place the consumer on a GPU host, or move the tensor to the CPU before sending")
    torch.cuda.init()  # type: ignore[no-untyped-call]
    return torch


def _cupy_for_open() -> Any:
    try:
        import cupy  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise TensorLost(f"a cupy array arrived, and cupy is not installed in process {os.getpid()}: "
                         "install cupy, or send a torch tensor") from exc
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise cupy.cuda.runtime.CUDARuntimeError(100)
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise TensorLost(f"a cupy array arrived, and CUDA is not available in process {os.getpid()}: "
                         "place the consumer on a GPU host") from exc
    return cupy


def _device_uuid(lib: int, device: int) -> bytes | None:
    """The GPU's 16-byte UUID, or None when the library cannot tell."""
    try:
        if lib == LIB_TORCH:
            torch = sys.modules["torch"]
            raw = torch.cuda.get_device_properties(device).uuid
            data = bytes(raw.bytes) if hasattr(raw, "bytes") else None
        else:
            cp = sys.modules["cupy"]
            data = bytes(cp.cuda.runtime.getDeviceProperties(device)["uuid"])
    except Exception:  # an old library without UUIDs: fall back to the index
        return None
    return data if data is not None and len(data) == 16 else None
