"""A pool of pre-faulted, reused POSIX shared-memory segments for large CPU tensors.

Measured on the project's machines: a memcpy into pre-faulted memory runs at 13-15 GB/s,
into a reused shm segment at 12-13 GB/s, but into a fresh segment per transfer at only
1.4-2.2 GB/s (page faults). So segments are created once, faulted in at creation
(MAP_POPULATE), and reused; the pool is bounded in bytes and never grows past its bound.

A segment holds one tensor at a time. Its first 64 bytes are a header with a generation
number that the owner bumps each time the segment is recycled; a descriptor names the
segment *and* the generation, so a consumer that arrives late (its lease expired, or the
owner died and the name was reused) sees a mismatch and fails with TensorLost instead of
reading someone else's data. When the owner evicts or unlinks a segment it first writes a
"dead" magic into the header, so consumers drop their cached mapping of it (and the memory
it pins) instead of keeping it until the cache overflows.

Consumers hold a shared ``flock`` on a segment while any of their views of it is alive. The
owner recycles a segment only when it can take the exclusive lock, so memory is never
reused under a reader, whatever the lease table believes. The kernel drops the locks of a
process that dies. Lifetime rules in full: ``TENSOR_LIFETIMES.md``.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import re
import secrets
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ._errors import ConfigurationError, ProtocolError, TensorLost

SHM_DIR = "/dev/shm"
HEADER = 64  # keeps the data 64-byte aligned
_MAGIC = b"CSCDSHM1"
_DEAD = b"CSCDDEAD"  # written by the owner before it unlinks a segment (evicted, or the pool closed)
_HEADER_FMT = "<8sQ"  # magic, generation
_NAME = re.compile(r"cascada-(\d{1,10})-[0-9a-f]{8}-\d{1,10}")  # always fullmatch
_TORCH_COUNTS = re.compile(r"torch_(\d{1,10})_\d{1,20}_\d{1,20}")
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


_OWNERS: dict[str, int] = {}


def owner_of(name: str) -> int:
    """The owner pid in a segment name; ProtocolError for anything but a pool name."""
    pid = _OWNERS.get(name)
    if pid is None:
        m = _NAME.fullmatch(name)
        if m is None:
            raise ProtocolError(f"bad shm segment name {name!r}")
        pid = int(m.group(1))
        if len(_OWNERS) > 4096:
            _OWNERS.clear()
        _OWNERS[name] = pid
    return pid


def size_class(nbytes: int) -> int:
    """The capacity a tensor of ``nbytes`` gets: rounded up by at most 1/8 (and to 64 KiB),
    so tensors of one shape always reuse the same segments and waste stays under 12.5%."""
    step = max(64 << 10, (1 << max(0, nbytes.bit_length() - 1)) >> 3)
    return -(-nbytes // step) * step


class Segment:
    """One shm segment on the owner's side. Implements the lease Resource protocol."""

    __slots__ = ("pool", "name", "capacity", "fd", "mm", "address", "gen", "refs", "__weakref__")

    def __init__(self, pool: ShmPool, name: str, capacity: int, fd: int, mm: mmap.mmap) -> None:
        self.pool = pool
        self.name = name
        self.capacity = capacity
        self.fd = fd
        self.mm = mm
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(mm)) + HEADER
        self.gen = 1
        self.refs = 0
        self._write_gen()

    def _write_gen(self) -> None:
        struct.pack_into(_HEADER_FMT, self.mm, 0, _MAGIC, self.gen)

    def view(self, nbytes: int) -> Any:
        """A writable buffer over the first ``nbytes`` of data (it keeps the mapping alive)."""
        return (ctypes.c_char * nbytes).from_buffer(self.mm, HEADER)

    # -- Resource protocol ---------------------------------------------------------------

    def acquire(self) -> None:
        with self.pool.lock:
            self.refs += 1

    def release(self) -> None:
        with self.pool.lock:
            self.refs -= 1
            if self.refs == 0:
                self.pool._recycle(self)

    def held_elsewhere(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    # -- recycling -----------------------------------------------------------------------

    def try_fence(self) -> bool:
        """Bump the generation under the exclusive lock, so no late reader can take this
        tensor's data for the next one's. False while a reader still holds it."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            self.gen += 1
            self._write_gen()
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True

    def destroy(self, unlink: bool = True) -> None:
        if self.fd < 0:
            return
        if unlink:
            # Consumers that cached a mapping of this segment see the mark and let it go.
            self.mm[:8] = _DEAD
            try:
                os.unlink(os.path.join(self.pool.directory, self.name))
            except FileNotFoundError:
                pass
        try:
            self.mm.close()
        except BufferError:
            pass  # a local view is still alive; the mapping goes when it does
        os.close(self.fd)
        self.fd = -1


class PoolStats:
    __slots__ = ("created", "reused", "evicted", "exhausted", "fenced_late")

    def __init__(self) -> None:
        self.created = 0
        self.reused = 0
        self.evicted = 0
        self.exhausted = 0
        self.fenced_late = 0  # recycled only on a later sweep: a reader still held the lock

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class ShmPool:
    """The owner's segments: bounded in bytes, reused by size class.

    Thread-safe where it must be: a pool-allocated tensor's finalizer may run on any thread.
    ``on_free`` is called (under the pool lock) whenever a segment becomes free, so senders
    waiting for room can be woken."""

    def __init__(self, *, max_bytes: int, directory: str = SHM_DIR) -> None:
        if type(max_bytes) is not int or max_bytes < 0:
            raise ConfigurationError(f"shm_pool_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.directory = directory
        self.lock = threading.Lock()
        self.stats = PoolStats()
        self.on_free: Callable[[], None] | None = None
        self._prefix = f"cascada-{os.getpid()}-{secrets.token_hex(4)}-"
        self._count = 0
        self._bytes = 0
        self._free: dict[int, list[Segment]] = {}
        self._free_lru: OrderedDict[Segment, None] = OrderedDict()  # oldest first, for eviction
        self._all: dict[str, Segment] = {}
        self._starts: list[int] = []  # data addresses, sorted: which segment holds a pointer
        self._by_start: dict[int, Segment] = {}
        self._fencing: list[Segment] = []  # free but a reader still held the lock
        self.closed = False

    @property
    def bytes_in_use(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._all)

    def allocate(self, nbytes: int) -> Segment | None:
        """A segment with room for ``nbytes``, holding one reference for the caller, or None
        when the pool is at its bound and nothing can be evicted."""
        cap = size_class(max(1, nbytes))
        if cap + HEADER > self.max_bytes:
            return None
        with self.lock:
            if self.closed:
                return None
            self._retry_fencing()
            free = self._free.get(cap)
            if free:
                seg = free.pop()
                del self._free_lru[seg]
                seg.refs = 1
                self.stats.reused += 1
                return seg
            while self._bytes + cap + HEADER > self.max_bytes and self._free_lru:
                victim, _ = self._free_lru.popitem(last=False)
                self._free[victim.capacity].remove(victim)
                self._forget(victim)
                self.stats.evicted += 1
            if self._bytes + cap + HEADER > self.max_bytes:
                self.stats.exhausted += 1
                return None
            seg = self._create(cap)
            seg.refs = 1
            return seg

    def _create(self, cap: int) -> Segment:
        self._count += 1
        name = f"{self._prefix}{self._count}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, cap + HEADER)
            # MAP_POPULATE faults every page in now, once, instead of on each transfer.
            mm = mmap.mmap(fd, cap + HEADER, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        seg = Segment(self, name, cap, fd, mm)
        self._all[name] = seg
        bisect.insort(self._starts, seg.address)
        self._by_start[seg.address] = seg
        self._bytes += cap + HEADER
        self.stats.created += 1
        return seg

    def _forget(self, seg: Segment) -> None:
        del self._all[seg.name]
        self._starts.remove(seg.address)
        del self._by_start[seg.address]
        self._bytes -= seg.capacity + HEADER
        seg.destroy()

    def _recycle(self, seg: Segment) -> None:  # called with the lock held
        if self.closed:
            seg.destroy(unlink=False)
            return
        if not seg.try_fence():
            self._fencing.append(seg)
            return
        self._make_free(seg)

    def _make_free(self, seg: Segment) -> None:
        self._free.setdefault(seg.capacity, []).append(seg)
        self._free_lru[seg] = None
        if self.on_free is not None:
            self.on_free()

    def _retry_fencing(self) -> None:
        if not self._fencing:
            return
        still = []
        for seg in self._fencing:
            if seg.try_fence():
                self.stats.fenced_late += 1
                self._make_free(seg)
            else:
                still.append(seg)
        self._fencing = still

    def sweep(self) -> None:
        with self.lock:
            self._retry_fencing()

    def segment_at(self, address: int, nbytes: int) -> Segment | None:
        """The segment whose data area holds [address, address + nbytes), if any: a tensor
        made with ``cascada.empty`` is handed over without a copy."""
        with self.lock:
            seg = self._by_start.get(address)  # the common case: the whole tensor
            if seg is None:
                starts = self._starts
                i = bisect.bisect_right(starts, address) - 1
                if i < 0:
                    return None
                seg = self._by_start[starts[i]]
            if seg.refs > 0 and address + nbytes <= seg.address + seg.capacity:
                return seg
        return None

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            d = self.stats.to_dict()
            d["segments"] = len(self._all)
            d["free"] = len(self._free_lru)
            d["bytes"] = self._bytes
            d["max_bytes"] = self.max_bytes
        return d

    def close(self) -> None:
        """Unlink every segment. Mappings still viewed by live tensors stay valid until those
        tensors are freed; consumers that have not opened a segment yet get TensorLost."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for seg in list(self._all.values()):
                seg.destroy()
            self._all.clear()
            self._starts.clear()
            self._by_start.clear()
            self._free.clear()
            self._free_lru.clear()
            self._fencing.clear()
            self._bytes = 0


# -- the consumer's side ------------------------------------------------------------------


class _Mapped:
    __slots__ = ("fd", "mm", "size", "holders", "base")

    def __init__(self, fd: int, mm: mmap.mmap, size: int) -> None:
        self.fd = fd
        self.mm = mm
        self.size = size
        self.holders = 0
        probe = ctypes.c_char.from_buffer(mm)  # an export of the mapping, dropped at once
        self.base = ctypes.addressof(probe)  # (held, it would stop the mapping from closing)
        del probe

    def dead(self) -> bool:
        """The owner marked this segment evicted or unlinked (or it was never ours)."""
        return self.mm[:8] != _MAGIC


class _Hold:
    """Hangs off a buffer the reader handed out: when the buffer (and so every tensor over
    it) is freed, the reader lets go of the segment, then ``on_release(*args)`` runs. A
    ``__del__`` costs a fraction of a ``weakref.finalize`` and runs exactly once."""

    __slots__ = ("reader", "name", "mapped", "on_release", "args")

    def __init__(self, reader: ShmReader, name: str, mapped: _Mapped, on_release: Callable[..., None],
                 args: tuple[Any, ...]) -> None:
        self.reader = reader
        self.name = name
        self.mapped = mapped
        self.on_release = on_release
        self.args = args

    def __del__(self) -> None:
        self.reader._released(self.name, self.mapped, self.on_release, self.args)


class ShmReader:
    """Opens segments named in descriptors. Mappings are cached (LRU, bounded) because the
    same segments come back again and again: a hit costs no open, fstat or mmap, only the
    shared lock (a syscall) when no view of the segment is alive. A mapping in use is never
    evicted. A cached mapping goes when its segment is marked dead by its owner (seen on a
    hit, and checked for every idle mapping whenever a new one is made), when its owner's
    process is gone (``forget_owner``), or when the cache is over ``max_cached``."""

    def __init__(self, *, directory: str = SHM_DIR, max_cached: int = 64) -> None:
        self.directory = directory
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._maps: OrderedDict[str, _Mapped] = OrderedDict()

    @staticmethod
    def owner_of(name: str) -> int:
        return owner_of(name)

    def open(self, name: str, gen: int, offset: int, nbytes: int, on_release: Callable[..., None],
             *args: Any) -> Any:
        """A writable buffer over the tensor's bytes. ``on_release(*args)`` runs once, on
        whatever thread frees the last view, after this process has let go of the segment."""
        with self._lock:
            maps = self._maps
            mapped = maps.get(name)
            fresh = mapped is None
            if mapped is None:
                owner_of(name)  # validates the name: no path tricks (a cached name was checked)
                self._drop_dead()
                mapped = self._map(name)
                maps[name] = mapped
            else:
                maps.move_to_end(name)
            if HEADER + offset + nbytes > mapped.size:
                raise ProtocolError(f"descriptor claims bytes {offset}..{offset + nbytes} but segment "
                                    f"{name} holds {mapped.size - HEADER}")
            if mapped.holders == 0:
                try:
                    fcntl.flock(mapped.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    # The owner holds the exclusive lock for a few microseconds while it
                    # recycles this segment: the generation is about to change under us.
                    raise TensorLost(f"shm segment {name} was being recycled: the lease expired "
                                     "before this message was delivered") from None
            mapped.holders += 1
            if fresh:
                self._trim()  # only a new mapping grows the cache; this one is in use now
            try:
                magic, current = struct.unpack_from(_HEADER_FMT, mapped.mm, 0)
                if magic != _MAGIC:
                    if magic == _DEAD:
                        del maps[name]  # unmapped by _let_go below once nothing views it
                        raise TensorLost(f"shm segment {name} is gone: its owner (pid {owner_of(name)}) "
                                         "evicted it or closed its pool before this message was used")
                    raise ProtocolError(f"shm segment {name} is not a cascada segment")
                if current != gen:
                    raise TensorLost(
                        f"shm segment {name} was recycled (generation {current}, the message "
                        f"names {gen}): the producer died or the lease expired before delivery")
                buf = (ctypes.c_char * nbytes).from_buffer(mapped.mm, HEADER + offset)
            except BaseException:
                self._let_go(name, mapped)
                raise
        buf._hold = _Hold(self, name, mapped, on_release, args)  # type: ignore[attr-defined]
        return buf

    def find(self, address: int, nbytes: int) -> tuple[str, int, int] | None:
        """(segment name, generation, offset) of bytes that lie in a segment this process has
        a live view of (a tensor it received), or None. The view keeps the shared lock, so
        the segment cannot be recycled meanwhile: the generation read here stays true."""
        with self._lock:
            for name, mapped in self._maps.items():
                start = mapped.base + HEADER
                if mapped.holders and start <= address and address + nbytes <= mapped.base + mapped.size:
                    gen = struct.unpack_from(_HEADER_FMT, mapped.mm, 0)[1]
                    return name, gen, address - start
        return None

    def _map(self, name: str) -> _Mapped:
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TensorLost(f"shm segment {name} is gone: its owner (pid {self.owner_of(name)}) "
                             "exited or was killed before this message was used") from None
        except OSError as exc:
            raise ProtocolError(f"cannot open shm segment {name}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < HEADER:
                raise ProtocolError(f"{path} is not a segment of this user's cascada pool")
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        except BaseException:
            os.close(fd)
            raise
        return _Mapped(fd, mm, st.st_size)

    def _released(self, name: str, mapped: _Mapped, on_release: Callable[..., None], args: tuple[Any, ...]) -> None:
        with self._lock:
            self._let_go(name, mapped)
            self._trim()
        on_release(*args)

    def _drop_dead(self) -> None:  # with the lock held
        """Unmap idle cached segments their owners have since unlinked: each pins its memory
        for as long as it stays mapped. A read of each header, no syscall."""
        maps = self._maps
        dead = [name for name, m in maps.items() if m.holders == 0 and m.dead()]
        for name in dead:
            _unmap(maps.pop(name))

    def _let_go(self, name: str, mapped: _Mapped) -> None:  # with the lock held
        mapped.holders -= 1
        if mapped.holders == 0:
            # Unlock before the release goes out: the owner recycles on the release.
            fcntl.flock(mapped.fd, fcntl.LOCK_UN)
            if self._maps.get(name) is not mapped:
                _unmap(mapped)

    def _trim(self) -> None:  # with the lock held
        if len(self._maps) <= self.max_cached:
            return
        for name in list(self._maps):
            if len(self._maps) <= self.max_cached:
                break
            mapped = self._maps[name]
            if mapped.holders == 0:
                del self._maps[name]
                _unmap(mapped)

    def forget_owner(self, pid: int) -> None:
        """Drop cached mappings of a dead owner's segments (those not in use)."""
        with self._lock:
            for name in list(self._maps):
                mapped = self._maps[name]
                if mapped.holders == 0 and self.owner_of(name) == pid:
                    del self._maps[name]
                    _unmap(mapped)

    def close(self) -> None:
        with self._lock:
            for name in list(self._maps):
                mapped = self._maps.pop(name)
                if mapped.holders == 0:
                    _unmap(mapped)

    def __len__(self) -> int:
        return len(self._maps)


def _unmap(mapped: _Mapped) -> None:
    try:
        mapped.mm.close()
    except BufferError:
        pass  # still viewed; the mapping goes with the last view
    os.close(mapped.fd)


def sweep_dead_segments(directory: str = SHM_DIR, pids: set[int] | None = None) -> list[str]:
    """Unlink segments whose owner process is gone (SIGKILLed owners cannot clean up).
    With ``pids`` (processes of ours known to be dead), only those owners' files are
    considered, torch's CUDA IPC count files among them. Only this user's files."""
    from ._endpoints import process_gone

    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        m = _NAME.fullmatch(name)
        if m is None and pids is not None:
            # torch's CUDA IPC count files of a process of ours that was SIGKILLed.
            m = _TORCH_COUNTS.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if (pids is not None and pid not in pids) or not process_gone(pid):
            continue
        path = os.path.join(directory, name)
        try:
            if os.lstat(path).st_uid != uid:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed
