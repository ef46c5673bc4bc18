"""The multi-threaded copy into pool segments (transport/_memcpy.py)."""

from __future__ import annotations

import ctypes
import os
import threading

import pytest

from cascada.transport._errors import ConfigurationError
from cascada.transport._memcpy import ParallelCopy
from cascada.transport._tensors import TensorOptions

pytestmark = pytest.mark.timeout(60)


def _buffers(n: int) -> tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]:
    src = (ctypes.c_char * n).from_buffer_copy(os.urandom(n))
    dst = (ctypes.c_char * n)()
    return src, dst


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, (1 << 20) + 12345])
def test_copy_is_exact_at_every_split(threads: int, n: int) -> None:
    pc = ParallelCopy(threads, 0)
    try:
        src, dst = _buffers(max(n, 1))
        pc.copy(ctypes.addressof(dst), ctypes.addressof(src), n)
        assert dst.raw[:n] == src.raw[:n]
        assert dst.raw[n:] == b"\0" * (len(dst) - n)  # nothing past n was written
    finally:
        pc.close()


def test_overlapping_ranges_copy_like_memmove() -> None:
    pc = ParallelCopy(2, 0)
    n = 1 << 16
    buf = (ctypes.c_char * (n + 4096)).from_buffer_copy(os.urandom(n + 4096))
    want = bytearray(buf.raw)
    want[4096 : 4096 + n] = want[:n]  # memmove's result: as if through a temporary
    pc.copy(ctypes.addressof(buf) + 4096, ctypes.addressof(buf), n)
    assert buf.raw == bytes(want)
    pc.close()


def test_below_min_bytes_no_worker_starts() -> None:
    pc = ParallelCopy(2, 1 << 20)
    before = {t.ident for t in threading.enumerate() if t.name == "cascada-memcpy"}
    src, dst = _buffers(1000)
    pc.copy(ctypes.addressof(dst), ctypes.addressof(src), 1000)
    after = {t.ident for t in threading.enumerate() if t.name == "cascada-memcpy"}
    assert dst.raw == src.raw and after == before
    pc.close()


def test_workers_are_made_once_and_let_go() -> None:
    pc = ParallelCopy(3, 0)
    src, dst = _buffers(1 << 16)
    for _ in range(5):
        pc.copy(ctypes.addressof(dst), ctypes.addressof(src), 1 << 16)
    assert pc._workers == 2
    mine = [t for t in threading.enumerate() if t.name == "cascada-memcpy"]
    assert len(mine) >= 2
    pc.close()
    for t in mine:
        t.join(timeout=5)
    assert dst.raw == src.raw


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_its_own_workers() -> None:
    pc = ParallelCopy(2, 0)
    src, dst = _buffers(1 << 16)
    pc.copy(ctypes.addressof(dst), ctypes.addressof(src), 1 << 16)  # the parent's worker exists
    pid = os.fork()
    if pid == 0:  # the child: the parent's worker thread is not here; a copy must not hang
        ok = False
        try:
            s2, d2 = _buffers(1 << 16)
            pc.copy(ctypes.addressof(d2), ctypes.addressof(s2), 1 << 16)
            ok = d2.raw == s2.raw and pc._pid == os.getpid()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    pc.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_options_check_copy_threads() -> None:
    assert 1 <= TensorOptions().copy_threads <= 2
    assert TensorOptions(copy_threads=4).copy_threads == 4
    for bad in (0, -1, 65, 2.0, "2", True):
        with pytest.raises(ConfigurationError, match="copy_threads"):
            TensorOptions(copy_threads=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="parallel_copy_min"):
        TensorOptions(parallel_copy_min=-1)
    assert TensorOptions.from_dict(TensorOptions(copy_threads=3).to_dict()).copy_threads == 3
