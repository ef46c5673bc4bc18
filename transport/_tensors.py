"""Tensors on the wire: torch tensors, numpy arrays and CuPy arrays, out of band.

A tensor is an ext value (code 3) whose payload is a small msgpack *descriptor*::

    [lib, dtype, shape, where]            lib: 0 torch, 1 numpy, 2 cupy
                                          dtype: a name on the allowlist below
                                          shape: a list of non-negative ints

and ``where`` says where the bytes are:

- ``[0, frame]``: an out-of-band zmq frame of this message (small tensors, and any tensor
  for a process on another host). Frames of 64 KiB and more are sent without a copy and the
  sender is held until zmq is done with them, so changing a tensor after ``tell`` returns
  never changes what was sent. The receiver wraps the frame's memory without a copy.
- ``[1, segment, generation, offset, lease, owner_pid, owner_endpoint]``: a segment of the
  owner's shared-memory pool (large CPU tensors on one host; see ``_shm``), copied there for
  this receiver alone.
- ``[1, segment, generation, offset, lease, owner_pid, owner_endpoint, issuer_pid,
  issuer_endpoint]``: a shared tensor (``cascada.empty``) in its owner's pool; the lease is
  the issuer's (nil: the owner's), and its release goes there. A process that received one
  passes it on this way (see ``TensorCodec._pass_on``).
- ``[2, ...]``: a CUDA IPC handle (CUDA tensors on one host; see ``_cuda_ipc``).

Nothing in a descriptor is trusted: the dtype must be on the allowlist, the byte length is
computed from dtype and shape and must match the buffer exactly, frame indexes must be in
range, segment names must match the pool's pattern. Anything else is a ProtocolError, raised
before any allocation. torch, numpy and cupy are imported only when a tensor is met.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from ._errors import ConfigurationError, HandleNotPortable, PoolExhausted, ProtocolError, TensorLost
from ._leases import Consumer, LeaseTable
from ._memcpy import ParallelCopy
from ._wire import show

EXT_TENSOR = 3

LIB_TORCH, LIB_NUMPY, LIB_CUPY = 0, 1, 2
_LIB_NAMES = ("torch", "numpy", "cupy")
WHERE_INLINE, WHERE_SHM, WHERE_CUDA = 0, 1, 2

# Every dtype torch, numpy and cupy share, plus bfloat16 (torch only).
ITEMSIZE: dict[str, int] = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex64": 8, "complex128": 16,
}
MAX_DIMS = 32  # numpy's own limit is 64; nobody sends more than a handful
MAX_TENSOR_BYTES = 1 << 46
# Below this, a zmq frame beats the pool (measured by scripts/bench_tensors.py --crossover:
# the pool wins from 64 KiB in two runs of 2026-11-28, one of them from 32 KiB; 256 KiB
# before the hand-off path got cheaper).
DEFAULT_INLINE_MAX = 1 << 16
# Copies into the pool from this size use several threads (see _memcpy): measured here, two
# threads win from 4 MiB (1.1x; 1.6x at 16 MiB, 2x and more from 64 MiB) and lose below 2 MiB.
DEFAULT_PARALLEL_COPY_MIN = 4 << 20
DEFAULT_COPY_THREADS = 2

PATHS = ("auto", "inline", "shm")
ON_EXHAUSTED = ("wait", "inline", "error")
CUDA_CROSS_HOST = ("copy", "error")


class TensorOptions:
    """How tensors travel. Set through ``ActorSystem(...)``; sent to every actor process."""

    __slots__ = ("inline_max", "shm_pool_bytes", "shm_on_exhausted", "lease_ttl", "cuda_cross_host",
                 "make_contiguous", "copy_threads", "parallel_copy_min")

    def __init__(
        self,
        *,
        inline_max: int = DEFAULT_INLINE_MAX,
        shm_pool_bytes: int = 1 << 30,
        shm_on_exhausted: str = "wait",
        lease_ttl: float | None = 60.0,
        cuda_cross_host: str = "copy",
        make_contiguous: bool = True,
        copy_threads: int | None = None,
        parallel_copy_min: int = DEFAULT_PARALLEL_COPY_MIN,
    ) -> None:
        if type(inline_max) is not int or inline_max < 0:
            raise ConfigurationError(f"tensor_inline_max must be a non-negative int, got {inline_max!r}")
        if type(shm_pool_bytes) is not int or shm_pool_bytes < 0:
            raise ConfigurationError(f"shm_pool_bytes must be a non-negative int (0 turns the pool off), got {shm_pool_bytes!r}")
        if shm_on_exhausted not in ON_EXHAUSTED:
            raise ConfigurationError(f"shm_on_exhausted must be one of {ON_EXHAUSTED}, got {shm_on_exhausted!r}")
        if lease_ttl is not None and not (isinstance(lease_ttl, (int, float)) and lease_ttl > 0):
            raise ConfigurationError(f"lease_ttl must be a positive number of seconds or None, got {lease_ttl!r}")
        if cuda_cross_host not in CUDA_CROSS_HOST:
            raise ConfigurationError(f"cuda_cross_host must be one of {CUDA_CROSS_HOST}, got {cuda_cross_host!r}")
        if type(make_contiguous) is not bool:
            raise ConfigurationError("make_contiguous must be a bool")
        if copy_threads is None:
            copy_threads = min(DEFAULT_COPY_THREADS, os.cpu_count() or 1)
        if type(copy_threads) is not int or not 1 <= copy_threads <= 64:
            raise ConfigurationError(f"tensor_copy_threads must be an int from 1 to 64 or None, got {copy_threads!r}")
        if type(parallel_copy_min) is not int or parallel_copy_min < 0:
            raise ConfigurationError(f"parallel_copy_min must be a non-negative int, got {parallel_copy_min!r}")
        self.copy_threads = copy_threads
        self.parallel_copy_min = parallel_copy_min
        self.inline_max = inline_max
        self.shm_pool_bytes = shm_pool_bytes
        self.shm_on_exhausted = shm_on_exhausted
        self.lease_ttl = None if lease_ttl is None else float(lease_ttl)
        self.cuda_cross_host = cuda_cross_host
        self.make_contiguous = make_contiguous

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorOptions:
        return cls(**d)


class Destination:
    """Who will decode the message being encoded: decides the path a tensor takes."""

    __slots__ = ("same_host", "consumer")

    def __init__(self, same_host: bool, consumer: Consumer) -> None:
        self.same_host = same_host
        self.consumer = consumer


UNKNOWN = Destination(False, ("", 0))


class Via:
    """A tensor with its path chosen by the caller: ``cascada.via(t, "inline")``. The
    receiver gets the tensor itself; inside one process the wrapper is simply removed."""

    __slots__ = ("tensor", "path")
    live = 0  # how many exist: while none do, local delivery skips looking for them

    def __init__(self, tensor: Any, path: str) -> None:
        if path not in PATHS:
            raise ConfigurationError(f"path must be one of {PATHS}, got {path!r}")
        if lib_of(tensor) is None:
            raise ConfigurationError(f"cascada.via() takes a torch tensor, numpy array or cupy array, not {type(tensor).__name__}")
        self.tensor = tensor
        self.path = path
        Via.live += 1

    def __del__(self) -> None:
        Via.live -= 1


def unwrap_via(value: Any, depth: int = 0) -> Any:
    """``value`` with every Via replaced by its tensor (for delivery inside one process)."""
    t = type(value)
    if t is Via:
        return value.tensor
    if depth > 64:
        return value
    if t is list:
        return [unwrap_via(v, depth + 1) for v in value]
    if t is tuple:
        return tuple(unwrap_via(v, depth + 1) for v in value)
    if t is dict:
        return {k: unwrap_via(v, depth + 1) for k, v in value.items()}
    return value


class PoolBusy(Exception):
    """Private: the pool is full and the policy is to wait. The async send path catches it,
    waits for a segment to come free (up to the message's deadline) and encodes again."""


def lib_of(obj: Any) -> int | None:
    """Which library's tensor ``obj`` is, without importing any library."""
    mod = type(obj).__module__
    if mod.startswith("torch"):
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return LIB_TORCH
    elif mod.startswith("numpy"):
        np = sys.modules.get("numpy")
        if np is not None and isinstance(obj, np.ndarray):
            return LIB_NUMPY
    elif mod.startswith("cupy"):
        cp = sys.modules.get("cupy")
        if cp is not None and isinstance(obj, cp.ndarray):
            return LIB_CUPY
    return None


_LIB_BY_TYPE: dict[type, int] = {}  # tensor types met before (torch.Tensor, ...) -> LIB_*


def _torch() -> Any:
    import torch

    return torch


_TORCH_DTYPES: dict[Any, str] = {}  # torch.dtype -> its name on the allowlist
_TORCH_BY_NAME: dict[str, Any] = {}


def _torch_dtype_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise TypeError(f"tensors of dtype {dtype} cannot travel; allowed: {', '.join(ITEMSIZE)}")
    _TORCH_DTYPES[dtype] = name
    return name


def _strided() -> Any:
    return sys.modules["torch"].strided


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise ProtocolError("received a numpy array, but numpy is not installed in this process") from None
    return numpy


def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise TensorLost("received a cupy array, but cupy is not installed in this process") from None
    return cupy


def _view_of(address: int, nbytes: int, keep: Any) -> Any:
    """A buffer over ``nbytes`` at ``address`` that keeps ``keep`` (the tensor) alive."""
    buf = (ctypes.c_char * nbytes).from_address(address)
    buf._keep = keep  # type: ignore[attr-defined]
    return buf


class TensorStats:
    __slots__ = ("inline", "shm", "shm_handoff", "shm_passed_on", "cuda", "contiguous_copies", "host_staged",
                 "received", "lost", "inline_fallbacks", "export_fallbacks")

    def __init__(self) -> None:
        self.inline = 0  # sent as zmq frames
        self.shm = 0  # copied into a pool segment
        self.shm_handoff = 0  # pool tensors (cascada.empty) handed over without a copy
        self.shm_passed_on = 0  # received shm tensors sent on, by the same segment, under a lease of ours
        self.cuda = 0  # sent by CUDA IPC handle
        self.contiguous_copies = 0  # non-contiguous tensors made contiguous to travel
        self.host_staged = 0  # CUDA tensors copied through host memory to another host
        self.received = 0
        self.lost = 0  # received messages failed with TensorLost
        self.inline_fallbacks = 0  # pool full with shm_on_exhausted="inline"
        self.export_fallbacks = 0  # CUDA memory IPC could not export, staged through the host

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class TensorCodec:
    """Encodes and decodes tensors for one node. Owned by the event loop, except the
    release path, which finalizers may enter from any thread."""

    def __init__(
        self,
        options: TensorOptions,
        *,
        host: str,
        owner_endpoint: str,
        process_gone: Callable[[int], bool],
        on_release: Callable[[str, int, int], None] | None = None,
    ) -> None:
        import os

        self.options = options
        self._copier = ParallelCopy(options.copy_threads, options.parallel_copy_min)
        self.host = host
        self.pid = os.getpid()
        self.owner_endpoint = owner_endpoint
        self.leases = LeaseTable(ttl=options.lease_ttl, host=host, process_gone=process_gone)
        self.dest = UNKNOWN
        self.stats = TensorStats()
        # (owner endpoint, owner pid, lease id) for each received tensor that was freed.
        self.on_release = on_release
        self._pool: Any = None
        self._reader: Any = None
        self._cuda: Any = None
        self._issued: list[int] = []
        self.owners: list[int] = []  # owner pids of leased tensors in the message being decoded
        self.owners_seen: str | None = None  # endpoint of the last leased tensor's owner decoded (the node reads it)
        # (address, nbytes) of each shared shm tensor decoded since the node last took them
        # (see take_ranges), and which of them may be sent on without a copy (see _pass_on).
        self.ranges: list[tuple[int, int]] = []
        self.may_pass_on: Callable[[int, int], bool] | None = None
        self._shared: dict[tuple[str, int], str] = {}  # shared segments received ((name, generation) -> owner)
        self.passthrough = (TensorLost,)  # decode errors the codec lets through untranslated
        self.pool_waker: Callable[[], None] | None = None
        self._lock = threading.Lock()
        # Descriptors are packed on the loop thread only; one packer saves making one each time.
        self._pack_desc = msgpack.Packer().pack
        self._copy: tuple[int, int, int, Any] | None = None  # (to, from, nbytes, keep): see encode

    # -- lazily built parts --------------------------------------------------------------

    @property
    def pool(self) -> Any:
        if self._pool is None:
            from ._shm import ShmPool

            self._pool = ShmPool(max_bytes=self.options.shm_pool_bytes)
            self._pool.on_free = self.pool_waker
        return self._pool

    @property
    def reader(self) -> Any:
        if self._reader is None:
            from ._shm import ShmReader

            self._reader = ShmReader()
        return self._reader

    @property
    def cuda(self) -> Any:
        if self._cuda is None:
            from ._cuda_ipc import CudaIpcBackend

            self._cuda = CudaIpcBackend(self.leases)
        return self._cuda

    def close(self) -> None:
        self._copier.close()
        if self._pool is not None:
            self._pool.close()
        if self._reader is not None:
            self._reader.close()

    def snapshot(self) -> dict[str, Any]:
        d: dict[str, Any] = self.stats.to_dict()
        d["leases"] = self.leases.snapshot()
        if self._pool is not None:
            d["pool"] = self._pool.snapshot()
        if self._reader is not None:
            d["mapped_segments"] = len(self._reader)
        if self._cuda is not None:
            d["cuda_ipc"] = self._cuda.snapshot()
        return d

    def take_owners(self) -> list[int]:
        owners, self.owners = self.owners, []
        return owners

    def take_ranges(self) -> list[tuple[int, int]]:
        ranges, self.ranges = self.ranges, []
        return ranges

    # -- the codec's encode hooks ---------------------------------------------------------

    def begin(self) -> None:
        self._issued.clear()
        self._copy = None

    def abort(self) -> None:
        """The message was not sent: take back the leases its tensors got."""
        self._copy = None
        for lease_id in self._issued:
            self.leases.revoke(lease_id)
        self._issued.clear()

    # -- encoding ------------------------------------------------------------------------

    def encode(self, obj: Any, oob: list[Any]) -> tuple[int, bytes] | None:
        """The ext payload for ``obj`` if it is a tensor (appending its frames), else None."""
        path = "auto"
        lib = _LIB_BY_TYPE.get(type(obj))
        if lib is None:
            if type(obj) is Via:
                path, obj = obj.path, obj.tensor
            lib = lib_of(obj)
            if lib is None:
                return None
            if path == "auto" and len(_LIB_BY_TYPE) < 64:
                _LIB_BY_TYPE[type(obj)] = lib  # lib_of looks at the type alone
        if lib == LIB_TORCH:
            desc = self._encode_torch(obj, path, oob)
        elif lib == LIB_NUMPY:
            desc = self._encode_numpy(obj, path, oob)
        else:
            desc = self._encode_cupy(obj, oob)
        copy, self._copy = self._copy, None
        packed = self._pack_desc(desc)
        if copy is not None:
            # The copy into the segment goes last: a large memcpy evicts the caches, and
            # the bookkeeping before it (lease, descriptor) runs several times slower after.
            self._copier.copy(copy[0], copy[1], copy[2])  # releases the GIL (one or more threads)
        return EXT_TENSOR, packed

    def _encode_torch(self, t: Any, path: str, oob: list[Any]) -> list[Any]:
        dtype = _TORCH_DTYPES.get(t.dtype)
        if dtype is None:
            dtype = _torch_dtype_name(t.dtype)
        if not t.is_cpu:
            if t.is_cuda:
                return self._encode_torch_cuda(t, dtype, oob)
            raise TypeError(f"cannot send a tensor on device {t.device}: move it to the CPU or CUDA first")
        # (A quantized tensor never gets here: no quantized dtype is on the allowlist.)
        if t.layout is not _strided():
            raise TypeError(f"cannot send a {t.layout} or quantized tensor: send a dense tensor "
                            "(for example t.to_dense())")
        if t.requires_grad:
            t = t.detach()
        if (dtype[0] == "c" and t.is_conj()) or t.is_neg():  # only complex tensors have a conj bit
            t = t.resolve_conj().resolve_neg()
        if not t.is_contiguous():
            t = self._contiguous(t, lambda x: x.contiguous())
        return [LIB_TORCH, dtype, list(t.shape), self._place(t.data_ptr(), t.nbytes, t, path, oob)]

    def _encode_torch_cuda(self, t: Any, dtype: str, oob: list[Any]) -> list[Any]:
        t = t.detach().resolve_conj().resolve_neg()
        if not t.is_contiguous():
            t = self._contiguous(t, lambda x: x.contiguous())
        shape = list(t.shape)
        nbytes = t.nbytes
        if self.dest.same_host and nbytes:
            where = self._export_cuda(t, LIB_TORCH)
            if where is not None:
                return [LIB_TORCH, dtype, shape, where]
        else:
            self._check_cross_host(t)
        # Another host, an empty tensor, or memory CUDA IPC cannot export: through host
        # memory, and back onto a GPU at the receiver.
        self.stats.host_staged += 1
        t = t.cpu()
        return [LIB_TORCH, dtype, shape, self._place(t.data_ptr(), nbytes, t, "inline", oob), "cuda"]

    def _encode_numpy(self, a: Any, path: str, oob: list[Any]) -> list[Any]:
        np = sys.modules["numpy"]
        dtype = a.dtype.name
        if dtype not in ITEMSIZE or a.dtype.fields is not None:
            raise TypeError(f"arrays of dtype {a.dtype} cannot travel; allowed: {', '.join(k for k in ITEMSIZE if k != 'bfloat16')}")
        if not a.dtype.isnative:
            a = self._contiguous(a, lambda x: x.astype(x.dtype.newbyteorder("=")))
        if not a.flags.c_contiguous:
            a = self._contiguous(a, np.ascontiguousarray)
        address = a.__array_interface__["data"][0]
        return [LIB_NUMPY, dtype, list(a.shape), self._place(address, a.nbytes, a, path, oob)]

    def _encode_cupy(self, a: Any, oob: list[Any]) -> list[Any]:
        cp = sys.modules["cupy"]
        dtype = a.dtype.name
        if dtype not in ITEMSIZE or dtype == "bfloat16":
            raise TypeError(f"cupy arrays of dtype {a.dtype} cannot travel")
        if not a.flags.c_contiguous:
            a = self._contiguous(a, cp.ascontiguousarray)
        if self.dest.same_host and a.nbytes:
            where = self._export_cuda(a, LIB_CUPY)
            if where is not None:
                return [LIB_CUPY, dtype, list(a.shape), where]
        else:
            self._check_cross_host(a)
        self.stats.host_staged += 1
        host = cp.asnumpy(a)
        address = host.__array_interface__["data"][0]
        return [LIB_CUPY, dtype, list(a.shape), self._place(address, host.nbytes, host, "inline", oob)]

    def _contiguous(self, x: Any, fix: Callable[[Any], Any]) -> Any:
        if not self.options.make_contiguous:
            raise TypeError("cannot send a non-contiguous (or non-native byte order) tensor with "
                            "make_contiguous=False: call .contiguous() first")
        self.stats.contiguous_copies += 1
        return fix(x)

    def _check_cross_host(self, t: Any) -> None:
        if self.options.cuda_cross_host == "error":
            raise HandleNotPortable(
                "a CUDA tensor is addressed to a process on another host, and cuda_cross_host='error': "
                "a CUDA IPC handle is meaningless there. Move it to the CPU first, or set cuda_cross_host='copy'")

    def _export_cuda(self, t: Any, lib: int) -> list[Any] | None:
        """The CUDA IPC location, or None when this memory cannot be exported (an async
        allocator's pool): the caller then stages it through host memory."""
        from ._errors import SerializationError

        try:
            fields = self.cuda.export(t, lib, self.dest.consumer)
        except SerializationError as exc:
            if "same process" in str(exc):
                raise
            self.stats.export_fallbacks += 1
            return None
        self.stats.cuda += 1
        where = [WHERE_CUDA, *fields, self.pid, self.owner_endpoint]
        self._issued.append(where[6])
        return where

    def _place(self, address: int, nbytes: int, keep: Any, path: str, oob: list[Any]) -> list[Any]:
        opts = self.options
        if nbytes and path == "auto" and self._pool is not None and self.dest.same_host:
            # A tensor made in the pool (cascada.empty) is handed over whatever its size.
            seg = self._pool.segment_at(address, nbytes)
            if seg is not None:
                return self._hand_off(seg, address)
        if (nbytes >= opts.inline_max and path == "auto" and self.dest.same_host and self._reader is not None
                and self.may_pass_on is not None and self.may_pass_on(address, nbytes)):
            where = self._pass_on(address, nbytes, keep)
            if where is not None:
                return where
        if nbytes and (path == "shm" or (path == "auto" and nbytes >= opts.inline_max and opts.shm_pool_bytes > 0)):
            if not self.dest.same_host:
                if path == "shm":
                    raise TypeError("via(t, 'shm') to a process on another host: shared memory only "
                                    "works on one host")
            else:
                where = self._place_shm(address, nbytes, keep)
                if where is not None:
                    return where
                self.stats.inline_fallbacks += 1
        self.stats.inline += 1
        oob.append(_view_of(address, nbytes, keep) if nbytes else b"")
        return [WHERE_INLINE, len(oob) - 1]

    def _place_shm(self, address: int, nbytes: int, keep: Any) -> list[Any] | None:
        pool = self.pool
        seg = pool.segment_at(address, nbytes)
        if seg is not None:
            return self._hand_off(seg, address)
        else:
            seg = pool.allocate(nbytes)
            if seg is None:
                policy = self.options.shm_on_exhausted
                if policy == "inline":
                    return None
                if policy == "wait":
                    raise PoolBusy()
                raise PoolExhausted(f"the shared-memory pool ({pool.max_bytes} bytes) has no room for "
                                    f"a {nbytes}-byte tensor and shm_on_exhausted='error'")
            try:
                lease_id = self.leases.issue(seg, self.dest.consumer)
            finally:
                seg.release()  # the allocation's own reference; the lease holds it now
            self._issued.append(lease_id)
            self.stats.shm += 1
            # encode makes the copy once the descriptor is packed (one memmove, GIL released);
            # ``keep`` keeps the source alive until then. A failure before it revokes the lease.
            self._copy = (seg.address, address, nbytes, keep)
            return [WHERE_SHM, seg.name, seg.gen, 0, lease_id, self.pid, self.owner_endpoint]

    def _pass_on(self, address: int, nbytes: int, keep: Any) -> list[Any] | None:
        """A shared tensor (made by cascada.empty, so every process it reaches sees the same
        memory) received by shm and sent on while handling the request it came in (a flow
        passing its input to a stage): the same segment goes on, no copy. This node leases it
        to the consumer and keeps its own view alive (and with it the lease it holds from
        whoever sent it here) until the consumer releases; the descriptor names the segment's
        owner, for the name's check and liveness, and this node, for the release. Only the
        request's own tensors go this way: should their owner die, the request has no caller
        left to answer. Any other received tensor is copied, so it outlives its producer, and
        a private copy (a tensor that came by copy) is copied again, so no two processes share
        memory that nobody chose to share."""
        found = self._reader.find(address, nbytes)
        if found is None:
            return None
        name, gen, offset = found
        owner_endpoint = self._shared.get((name, gen))
        if owner_endpoint is None:
            return None  # a private copy: sent on, it is copied again (value semantics)
        lease_id = self.leases.issue(_KeptView(keep), self.dest.consumer)
        self._issued.append(lease_id)
        self.stats.shm_passed_on += 1
        return [WHERE_SHM, name, gen, offset, lease_id, self._reader.owner_of(name), owner_endpoint, self.pid,
                self.owner_endpoint]

    def _hand_off(self, seg: Any, address: int) -> list[Any]:
        """Made with cascada.empty: lease the segment itself, no copy."""
        self.stats.shm_handoff += 1
        lease_id = self.leases.issue(seg, self.dest.consumer)
        self._issued.append(lease_id)
        # Nine fields: shared by reference (the issuer, nil here, is the owner itself).
        return [WHERE_SHM, seg.name, seg.gen, address - seg.address, lease_id, self.pid, self.owner_endpoint, None,
                None]

    # -- allocation in the pool ----------------------------------------------------------

    def empty(self, shape: Sequence[int], dtype: Any, lib: str) -> Any:
        """A tensor whose memory is a pool segment: sending it to a process on this host
        hands the segment over in O(1), without a copy."""
        dims = _check_shape(list(shape) if not isinstance(shape, int) else [shape])
        name = _dtype_name(dtype)
        nbytes = math.prod(dims) * ITEMSIZE[name]
        if self.options.shm_pool_bytes == 0:
            raise PoolExhausted("cascada.empty needs the shared-memory pool, and shm_pool_bytes is 0")
        seg = self.pool.allocate(max(1, nbytes))
        if seg is None:
            raise PoolExhausted(f"the shared-memory pool ({self.pool.max_bytes} bytes) has no room for "
                                f"{nbytes} bytes: free pool tensors, or raise shm_pool_bytes")
        import weakref

        buf = seg.view(max(1, nbytes))
        weakref.finalize(buf, seg.release)
        return _build(LIB_NUMPY if lib == "numpy" else LIB_TORCH, name, dims, buf, nbytes)

    # -- decoding ------------------------------------------------------------------------

    def decode(self, data: bytes, frames: Sequence[Any]) -> Any:
        try:
            d = msgpack.unpackb(data, max_array_len=MAX_DIMS + 8, max_map_len=0, max_str_len=512,
                                max_bin_len=4096, max_ext_len=0, use_list=True, raw=False)
        except Exception as exc:
            raise ProtocolError(f"bad tensor descriptor: {type(exc).__name__}: {exc}") from exc
        if type(d) is not list or len(d) not in (4, 5):
            raise ProtocolError("bad tensor descriptor: expected [lib, dtype, shape, where]")
        lib, dtype, shape, where = d[:4]
        if type(lib) is not int or not 0 <= lib <= 2:
            raise ProtocolError(f"bad tensor descriptor: unknown library {show(lib)}")
        if type(dtype) is not str or dtype not in ITEMSIZE or (lib != LIB_TORCH and dtype == "bfloat16"):
            raise ProtocolError(f"bad tensor descriptor: dtype {show(dtype)} is not on the allowlist")
        if type(shape) is not list:
            raise ProtocolError("bad tensor descriptor: shape is not an array")
        dims = _check_shape(shape)
        nbytes = math.prod(dims) * ITEMSIZE[dtype]
        # Zero dimensions make nbytes 0 whatever the others say; bound those too, or the
        # library's own size arithmetic overflows on an empty tensor.
        if (nbytes if nbytes else math.prod(n for n in dims if n) * ITEMSIZE[dtype]) > MAX_TENSOR_BYTES:
            raise ProtocolError(f"bad tensor descriptor: shape {show(dims)} is too large")
        if type(where) is not list or not where or type(where[0]) is not int:
            raise ProtocolError("bad tensor descriptor: where is not [tag, ...]")
        staged = len(d) == 5
        if staged and d[4] != "cuda":
            raise ProtocolError("bad tensor descriptor: unknown flag")
        tag = where[0]
        if tag == WHERE_INLINE:
            if len(where) != 2 or type(where[1]) is not int or not 0 <= where[1] < len(frames):
                raise ProtocolError("bad tensor descriptor: frame index out of range")
            frame = frames[where[1]]
            if len(frame) != nbytes:
                raise ProtocolError(f"bad tensor descriptor: {dtype}{dims} needs {nbytes} bytes, "
                                    f"the frame holds {len(frame)}")
            buf = _writable(frame) if nbytes else None
            self.stats.received += 1
            if lib == LIB_CUPY:
                host = _build(LIB_NUMPY, dtype, dims, buf, nbytes)
                return _cupy().asarray(host)
            out = _build(lib, dtype, dims, buf, nbytes)
            if staged:
                torch = _torch()
                if torch.cuda.is_available():
                    out = out.cuda()
            return out
        if tag == WHERE_SHM:
            return self._decode_shm(lib, dtype, dims, nbytes, where)
        if tag == WHERE_CUDA:
            return self._decode_cuda(lib, dtype, dims, nbytes, where)
        raise ProtocolError(f"bad tensor descriptor: unknown location tag {show(tag)}")

    def _decode_shm(self, lib: int, dtype: str, dims: list[int], nbytes: int, where: list[Any]) -> Any:
        shared = len(where) == 9
        if (len(where) not in (7, 9) or type(where[1]) is not str or type(where[2]) is not int
                or type(where[3]) is not int or type(where[4]) is not int or type(where[5]) is not int
                or type(where[6]) is not str or where[2] < 0 or where[3] < 0 or where[4] <= 0 or where[5] <= 0
                or (shared and not ((where[7] is None and where[8] is None)
                                    or (type(where[7]) is int and where[7] > 0 and type(where[8]) is str)))):
            raise ProtocolError("bad tensor descriptor: shm location is not [1, segment, generation, offset, "
                                "lease, owner_pid, owner_endpoint(, issuer_pid, issuer_endpoint)]")
        if lib == LIB_CUPY:
            raise ProtocolError("bad tensor descriptor: a cupy array never travels through shm")
        _, name, gen, offset, lease_id, owner_pid, owner_endpoint = where[:7]
        reader = self._reader or self.reader
        if reader.owner_of(name) != owner_pid:
            raise ProtocolError(f"bad tensor descriptor: segment {name} does not belong to pid {owner_pid}")
        _check_owner(owner_endpoint)
        # Nine fields: a shared tensor (cascada.empty), whose lease is the issuer's: the
        # segment's owner (nil), or a process that passed on what it received (see _pass_on).
        # The release goes to the issuer.
        issuer_pid, issuer_endpoint = owner_pid, owner_endpoint
        if shared and where[7] is not None:
            issuer_pid, issuer_endpoint = where[7], where[8]
            _check_owner(issuer_endpoint)
        self.owners.append(owner_pid)
        self.owners_seen = issuer_endpoint
        if shared:
            if len(self._shared) > 4096:
                self._shared.clear()
            # By generation: a recycled segment may come back holding a private copy.
            self._shared[(name, gen)] = owner_endpoint
        # If the open fails, no release is sent: the segment is gone or recycled (the lease
        # has ended), or the descriptor was bad; the issuer expires what is left. Otherwise
        # the reader calls _release_shm exactly once, when the buffer is freed.
        buf = reader.open(name, gen, offset, nbytes, self._release_shm, issuer_endpoint, issuer_pid, lease_id)
        if shared:
            self.ranges.append((ctypes.addressof(buf), nbytes))
        self.stats.received += 1
        return _build(lib, dtype, dims, buf, nbytes)

    def _release_shm(self, owner_endpoint: str, owner_pid: int, lease_id: int) -> None:
        sink = self.on_release
        if sink is not None:
            sink(owner_endpoint, owner_pid, lease_id)

    def _decode_cuda(self, lib: int, dtype: str, dims: list[int], nbytes: int, where: list[Any]) -> Any:
        if len(where) < 4 or type(where[-2]) is not int or type(where[-1]) is not str or where[-2] <= 0:
            raise ProtocolError("bad tensor descriptor: CUDA location without its owner")
        from ._cuda_ipc import CudaIpcBackend

        inner = where[1:-2]
        CudaIpcBackend.validate(inner)
        owner_pid, owner_endpoint = where[-2], where[-1]
        _check_owner(owner_endpoint)
        lease_id = inner[5]
        self.owners.append(owner_pid)
        self.owners_seen = owner_endpoint
        release = self._releaser(owner_endpoint, owner_pid, lease_id)
        try:
            out = self.cuda.open(inner, lib, dtype, tuple(dims), nbytes, release)
        except BaseException:
            release()
            raise
        self.stats.received += 1
        return out

    def _releaser(self, owner_endpoint: str, owner_pid: int, lease_id: int) -> Callable[[], None]:
        done = [False]

        def release() -> None:
            with self._lock:
                if done[0]:
                    return
                done[0] = True
            sink = self.on_release
            if sink is not None:
                sink(owner_endpoint, owner_pid, lease_id)

        return release


class _KeptView:
    """What a lease on a passed-on tensor holds (see TensorCodec._pass_on): this process's
    own view of it, let go of when the last lease on it ends."""

    __slots__ = ("view", "holders")

    def __init__(self, view: Any) -> None:
        self.view = view
        self.holders = 0

    def acquire(self) -> None:
        self.holders += 1

    def release(self) -> None:
        self.holders -= 1
        if self.holders <= 0:
            self.view = None

    def held_elsewhere(self) -> bool:
        return True  # cannot tell: ttl expiry must never drop a view a consumer may still read


_GOOD_OWNERS: set[str] = set()


def _check_owner(endpoint: str) -> None:
    if endpoint in _GOOD_OWNERS:
        return
    from ._endpoints import check_endpoint

    try:
        check_endpoint(endpoint)
    except ConfigurationError as exc:
        raise ProtocolError(f"bad tensor descriptor: owner endpoint: {exc}") from exc
    if len(_GOOD_OWNERS) > 4096:
        _GOOD_OWNERS.clear()
    _GOOD_OWNERS.add(endpoint)


def _check_shape(shape: list[Any]) -> list[int]:
    if len(shape) > MAX_DIMS:
        raise ProtocolError(f"bad tensor descriptor: {len(shape)} dimensions, over {MAX_DIMS}")
    for n in shape:
        if type(n) is not int or n < 0 or n > MAX_TENSOR_BYTES:
            raise ProtocolError(f"bad tensor descriptor: dimension {show(n)} is not a non-negative int")
    return shape


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__.startswith("torch"):
        name = str(dtype).removeprefix("torch.")
    else:
        name = _numpy().dtype(dtype).name
    if name not in ITEMSIZE:
        raise ConfigurationError(f"dtype {dtype!r} is not one cascada can send; allowed: {', '.join(ITEMSIZE)}")
    return name


def _writable(frame: Any) -> Any:
    """A writable ctypes view of a received zmq frame, without a copy (it keeps the frame
    alive). A received frame belongs to this process alone, so writing to it is safe."""
    if isinstance(frame, bytes):
        return (ctypes.c_char * len(frame)).from_buffer_copy(frame)
    return (ctypes.c_char * len(frame)).from_buffer(frame)


def _build(lib: int, dtype: str, dims: list[int], buf: Any, nbytes: int) -> Any:
    if lib == LIB_NUMPY:
        np = _numpy()
        if nbytes == 0:
            return np.empty(dims, dtype=dtype)
        a = np.frombuffer(buf, dtype=dtype, count=nbytes // ITEMSIZE[dtype]).reshape(dims)
        return a if a.flags.aligned else a.copy()
    tdtype = _TORCH_BY_NAME.get(dtype)
    if tdtype is None:
        tdtype = _TORCH_BY_NAME[dtype] = getattr(_torch(), dtype)
    torch = sys.modules["torch"]
    if nbytes == 0:
        return torch.empty(dims, dtype=tdtype)
    if ctypes.addressof(buf) % ITEMSIZE[dtype]:
        # zmq may hand back a small frame at any offset of its receive buffer. A tensor
        # whose elements are not naturally aligned is copied once, byte for byte: torch
        # itself must never touch it (cloning misaligned complex128 crashes torch).
        out = torch.empty(dims, dtype=tdtype)
        ctypes.memmove(out.data_ptr(), ctypes.addressof(buf), nbytes)
        return out
    # The buffer holds exactly nbytes (checked by the caller), so frombuffer needs no count
    # (it costs ~2 us more with one), and a 1-d tensor needs no view.
    out = torch.frombuffer(buf, dtype=tdtype)
    return out if len(dims) == 1 else out.view(dims)
