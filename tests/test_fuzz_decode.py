"""Fuzzing the whole receive path: bytes -> envelope -> tensor descriptor (issue #4;
RELIABILITY.md "Shared harness" item 5, R20-R22).

The contract: whatever frames arrive, only ProtocolError, or TensorLost for a shm descriptor
naming a segment that is gone, leaves ``Codec.decode_all``, raised or returned as a batch's
error; every tensor that decodes holds exactly prod(shape) * itemsize bytes over a buffer of
exactly that length; no state carries over from one message to the next. The checker and
the mutators live in scripts/fuzz_decode.py (the long-campaign fuzzer), so that this bounded
CI run and a campaign check exactly the same things. A failing input found by a campaign
goes into tests/fuzz_corpus/, which test_corpus_replay runs on every CI run.

Each test builds a Harness (a never-started Node's codec, and a sending codec, with their
shared memory in a private temporary directory: /dev/shm is never touched) and closes it
before the leak check runs.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import pathlib
import random
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascada.transport._errors import ProtocolError, TensorLost
from cascada.transport._shm import HEADER
from cascada.transport._tensors import ITEMSIZE
from cascada.transport._wire import BATCH_MARKER, Kind

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz_corpus"


def _load_fuzzer() -> Any:
    name = "cascada_fuzz_decode"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "fuzz_decode.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fz = _load_fuzzer()

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=150)


@contextmanager
def harness(**kwargs: Any) -> Iterator[Any]:
    with fz.Harness(**kwargs) as h:
        yield h


def _corpus_files() -> list[pathlib.Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file() and not p.name.startswith("."))


def _single_frame_headers(h: Any) -> list[bytes]:
    """Headers of the seeds that can ride in a batch (shm seeds' headers included: hostile
    in a batch, since a sender never batches leased tensors)."""
    return [frames[0] for _, frames in h.seeds() if frames[0][:1] != BATCH_MARKER]


# -- the seeds themselves ---------------------------------------------------------------------


def test_seeds_cover_every_kind_and_decode() -> None:
    # bytes frames: ctypes copies them to aligned memory, out of reach of the complex128 bug
    with harness(tolerate=(), oob="bytes") as h:
        seeds = dict(h.seeds())
        kinds: set[Kind] = set()
        for name, frames in seeds.items():
            h.check(frames)
            try:
                envs, err = h.codec.decode_all(h.received(frames))
            except TensorLost:
                assert name == "tell-cuda"  # no CUDA here, or no such producer
                continue
            assert err is None, (name, err)
            kinds.update(e.kind for e in envs)
            del envs
        assert kinds == set(Kind)
        # Values survive the trip: nested tuples, refs, inline and shm tensors of both libraries.
        env = h.codec.decode(h.received(seeds["ask"]))
        args, kwargs = env.body
        assert torch.equal(args[0], torch.arange(12, dtype=torch.float32).reshape(3, 4))
        assert np.array_equal(args[1], np.arange(5, dtype=np.int16))
        assert args[2] == h.ref() and args[3] == (1, (2.5, "x"), b"\x00\xff")
        assert kwargs["empty"].shape == (0, 3)
        env = h.codec.decode(h.received(seeds["tell-shm"]))
        assert set(env.owners) == {os.getpid()}
        assert torch.equal(env.body[0][0], torch.arange(128, dtype=torch.float32))
        assert np.array_equal(env.body[0][1], np.arange(100, dtype=np.int32))
        del env, args, kwargs


# -- (a) hypothesis-driven fuzzing --------------------------------------------------------------


def test_random_bytes_as_header() -> None:
    with harness() as h:
        @FUZZ
        @given(st.binary(max_size=600), st.booleans())
        def run(data: bytes, router: bool) -> None:
            h.check([data], router=router)

        run()


def test_random_bytes_as_batch() -> None:
    with harness() as h:
        @FUZZ
        @given(st.binary(max_size=600))
        def run(data: bytes) -> None:
            h.check([BATCH_MARKER + data])

        run()


def test_random_multiframe_messages() -> None:
    with harness() as h:
        @FUZZ
        @given(st.lists(st.binary(max_size=80), min_size=1, max_size=8))
        def run(frames: list[bytes]) -> None:
            h.check(frames)

        run()


# A byte mutation, drawn explicitly so that hypothesis can shrink it.
_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 16)),
    st.tuples(st.just("token"), st.integers(0, 1 << 16), st.sampled_from(fz.TOKENS), st.booleans()),
    st.tuples(st.just("splice"), st.integers(0, 1 << 16), st.integers(0, 63), st.integers(0, 1 << 16)),
)


def _apply(data: bytes, op: tuple[Any, ...], others: list[bytes]) -> bytes:
    n = len(data)
    pos = op[1] % (n + 1)
    kind = op[0]
    if kind == "flip":
        if not n:
            return data
        i = op[1] % n
        return data[:i] + bytes([data[i] ^ (1 << op[2])]) + data[i + 1 :]
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + op[2] + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + op[2] :]
    if kind == "token":
        tok = op[2]
        return data[:pos] + tok + data[pos + (len(tok) if op[3] else 0) :]
    other = others[op[2] % len(others)]
    return data[:pos] + other[op[3] % (len(other) + 1) :]


def test_byte_mutations_of_every_kind() -> None:
    """Bit flips, truncations, insertions, deletions, msgpack tokens and splices, applied
    to any frame of a valid message of any kind (tensors inline, in shm, over CUDA IPC)."""
    with harness() as h:
        seeds = [frames for _, frames in h.seeds()]
        heads = [frames[0] for frames in seeds]

        @FUZZ
        @given(st.integers(0, len(seeds) - 1), st.integers(0, 7), st.lists(_MUTATION, min_size=1, max_size=4))
        def run(which: int, frame: int, ops: list[tuple[Any, ...]]) -> None:
            frames = list(seeds[which])
            i = frame % len(frames)
            for op in ops:
                frames[i] = _apply(frames[i], op, heads)
            h.check(frames)

        run()


def test_structural_mutations_of_every_kind() -> None:
    """msgpack-aware mutations: a value anywhere in the header, the descriptors and refs
    inside it included, replaced by an edge case (R22: wrong types, huge or negative
    shapes, dtypes off the allowlist, frame indexes out of range, forged segment names)."""
    with harness() as h:
        seeds = [frames for _, frames in h.seeds()]

        @FUZZ
        @given(st.integers(0, len(seeds) - 1), st.randoms(use_true_random=False), st.integers(1, 3))
        def run(which: int, rng: random.Random, rounds: int) -> None:
            frames = list(seeds[which])
            out = fz.mutate_structure(rng, frames[0], rounds=rounds)
            if out is not None:
                frames[0] = out
            h.check(frames)

        run()


def test_stacked_mutations() -> None:
    """What the campaign does: 1-4 mutations of any kind, stacked, sometimes on a ROUTER."""
    with harness() as h:
        seeds = [frames for _, frames in h.seeds()]

        @FUZZ
        @given(st.integers(0, len(seeds) - 1), st.randoms(use_true_random=False), st.booleans())
        def run(which: int, rng: random.Random, router: bool) -> None:
            h.check(fz.mutate(rng, seeds[which], seeds), router=router)

        run()


def test_batch_mutations() -> None:
    with harness() as h:
        heads = _single_frame_headers(h)

        @FUZZ
        @given(st.lists(st.integers(0, len(heads) - 1), min_size=1, max_size=6), st.randoms(use_true_random=False),
               st.sampled_from(["none", "bytes", "structure", "extra-frame"]))
        def run(picks: list[int], rng: random.Random, how: str) -> None:
            frames = [BATCH_MARKER + b"".join(heads[i] for i in picks)]
            if how == "bytes":
                frames[0] = fz.mutate_bytes(rng, frames[0], rng.choice(heads))
            elif how == "structure":
                frames[0] = fz.mutate_structure(rng, frames[0]) or frames[0]
            elif how == "extra-frame":
                frames.append(rng.randbytes(rng.randrange(16)))
            h.check(frames)

        run()


_FRAME_OP = st.one_of(
    st.tuples(st.just("drop"), st.integers(1, 64)),
    st.tuples(st.just("duplicate"), st.integers(0, 64)),
    st.tuples(st.just("append"), st.binary(max_size=64)),
    st.tuples(st.just("resize"), st.integers(1, 64), st.integers(-9, 9)),
    st.tuples(st.just("swap"), st.integers(1, 64), st.integers(1, 64)),
    st.tuples(st.just("replace"), st.integers(1, 64), st.binary(max_size=64)),
)


@pytest.mark.parametrize("oob", ["zmq", "bytes", "offset"])
def test_out_of_band_frame_mutations(oob: str) -> None:
    """Missing, extra, resized, swapped and replaced tensor frames, handed over as zmq.Frame
    (what the socket gives a node), as bytes, or at misaligned addresses (as zmq hands over
    small frames inside its receive buffer)."""
    with harness(oob=oob) as h:
        multi = [frames for _, frames in h.seeds() if len(frames) > 1]

        @FEW
        @given(st.integers(0, len(multi) - 1), st.lists(_FRAME_OP, min_size=1, max_size=4))
        def run(which: int, ops: list[tuple[Any, ...]]) -> None:
            frames = list(multi[which])
            for op in ops:
                n = len(frames)
                if op[0] == "drop" and n > 1:
                    del frames[1 + op[1] % (n - 1)]
                elif op[0] == "duplicate":
                    frames.insert(1 + op[1] % n, frames[op[1] % n])
                elif op[0] == "append":
                    frames.append(op[1])
                elif op[0] == "resize" and n > 1:
                    i = 1 + op[1] % (n - 1)
                    frames[i] = frames[i][: op[2]] if op[2] < 0 else frames[i] + bytes(op[2])
                elif op[0] == "swap" and n > 2:
                    i, j = 1 + op[1] % (n - 1), 1 + op[2] % (n - 1)
                    frames[i], frames[j] = frames[j], frames[i]
                elif op[0] == "replace" and n > 1:
                    frames[1 + op[1] % (n - 1)] = op[2]
            h.check(frames)

        run()


def _tell(body_values: list[Any]) -> bytes:
    return msgpack.packb([1, int(Kind.TELL), 1, "client", "expert", "push", None, [body_values, None], None, None])


_DIM = st.one_of(st.integers(0, 6), st.integers(0, 6), st.integers(-3, 2**47), st.sampled_from(fz.INTERESTING_INTS))
_DTYPE = st.sampled_from([*sorted(ITEMSIZE), *sorted(ITEMSIZE), "object", "float128", "<f4", "", "U8"])


def test_inline_descriptor_property() -> None:
    """R22's property: for any (lib, dtype, shape, frame index) and any frame length,
    either the tensor holds exactly the declared bytes, all of its frame, or the message is
    rejected with ProtocolError (TensorLost only for a cupy array without cupy)."""
    with harness() as h:
        @FUZZ
        @given(st.sampled_from([0, 0, 1, 1, 2, 3, -1]), _DTYPE, st.lists(_DIM, max_size=4),
               st.sampled_from([0, 0, 0, 1, 2, -1]), st.booleans(), st.data())
        def run(lib: int, dtype: str, shape: list[int], index: int, staged: bool, data: st.DataObject) -> None:
            size = math.prod(shape) * ITEMSIZE.get(dtype, 1)
            exact = [size] if 0 <= size <= 4096 else []
            length = data.draw(st.sampled_from(exact * 3 + [0, 1, 7, 8, min(max(0, size - 1), 4097), min(size + 1, 4097)]))
            desc = [lib, dtype, shape, [0, index]] + (["cuda"] if staged else [])
            head = _tell([msgpack.ExtType(3, msgpack.packb(desc))])
            frames = [head, bytes(i % 251 for i in range(length)), b"\x01" * 8]
            h.check(frames)
            try:
                env = h.codec.decode(h.received(frames))
            except TensorLost:
                assert lib == 2
                return
            except ProtocolError:
                return
            t = env.body[0][0]
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            frame = frames[1 + index]
            assert nbytes == len(frame)
            assert list(t.shape) == shape
            raw = t.tobytes() if isinstance(t, np.ndarray) else fz.torch_bytes(t)
            assert raw == frame  # exactly the frame's bytes, none from anywhere else

        run()


def test_shm_descriptor_property() -> None:
    """Edge cases of a shm location over real segments: any generation, offset, lease,
    pid and shape either fails (ProtocolError, or TensorLost for a missing segment or a
    recycled generation) or gives a tensor lying wholly inside the segment's data area."""
    with harness() as h:
        seed = dict(h.seeds())["tell-shm"]
        tree = fz.parse_tree(seed[0])
        where = fz.parse_tree(tree[7][0][0].raw)[3]  # [1, name, gen, offset, lease, pid, endpoint]
        name, gen, pid = where[1], where[2], where[5]
        alt = name[: name.rindex("-")] + "-999"

        @FUZZ
        @given(st.sampled_from([name] * 6 + [alt, name + "x", "cascada-1-00000000-1"]),
               st.sampled_from([gen] * 6 + [gen + 1, 0, -1]),
               st.one_of(st.integers(0, 64), st.integers(0, 1 << 17), st.sampled_from([-1, 1 << 16, (1 << 16) - 1])),
               st.sampled_from([pid] * 6 + [pid + 1, 0, -1]), st.lists(st.integers(0, 300), max_size=3),
               st.sampled_from(["uint8", "float32", "complex128", "bfloat16"]), st.integers(0, 1))
        def run(seg: str, g: int, offset: int, owner: int, shape: list[int], dtype: str, lib: int) -> None:
            desc = [lib, dtype, shape, [1, seg, g, offset, 1, owner, fz.OWNER_ENDPOINT]]
            frames = [_tell([msgpack.ExtType(3, msgpack.packb(desc))]), b""]
            h.check(frames)
            try:
                env = h.codec.decode(h.received(frames))
            except (ProtocolError, TensorLost):
                return
            t = env.body[0][0]
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            if not nbytes:
                return
            mapped = h.reader._maps[seg]
            base = ctypes.addressof(ctypes.c_char.from_buffer(mapped.mm))
            ptr = t.__array_interface__["data"][0] if isinstance(t, np.ndarray) else t.data_ptr()
            if isinstance(t, torch.Tensor) and ptr != base + HEADER + offset:
                # torch copied an unaligned view (offset not a multiple of the itemsize)
                assert (base + HEADER + offset) % ITEMSIZE[dtype]
            elif isinstance(t, np.ndarray) and not t.flags.owndata:
                assert ptr == base + HEADER + offset
            assert HEADER + offset + nbytes <= mapped.size
            del t, env

        run()


# -- (b) the corpus ----------------------------------------------------------------------------


def test_corpus_is_small_and_covers_every_kind() -> None:
    files = _corpus_files()
    assert sum(p.stat().st_size for p in files) < 32 << 10
    names = {p.name for p in files}
    for kind in Kind:
        assert f"seed-{kind.name.lower()}.bin" in names


@pytest.mark.parametrize("path", _corpus_files(), ids=lambda p: p.name)
def test_corpus_replay(path: pathlib.Path) -> None:
    data = path.read_bytes()
    with harness() as h:
        h.check(fz.split_frames(data))
        h.check(fz.split_frames(data), router=True)


# -- (c) memory -------------------------------------------------------------------------------


def test_corpus_decodes_in_bounded_memory() -> None:
    """Decoding any corpus input, or any live seed, peaks below 8 MiB of Python heap."""
    with harness() as h:
        inputs = [(p.name, fz.split_frames(p.read_bytes())) for p in _corpus_files()]
        inputs += [(f"live-{name}", frames) for name, frames in h.seeds()]
        for _, frames in inputs:  # lazy imports and first-use caches are not the input's doing
            h.check(frames)
        peaks = {}
        tracemalloc.start()
        try:
            for name, frames in inputs:
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                h.check(frames)
                peaks[name] = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        worst = max(peaks, key=lambda k: peaks[k])
        assert peaks[worst] < 8 << 20, f"{worst} peaked at {peaks[worst] / 2**20:.1f} MiB"


# -- the checker catches what it should (a fuzzer whose checker never fails finds nothing) ------


def test_checker_flags_contract_breaches(monkeypatch: pytest.MonkeyPatch) -> None:
    with harness(tolerate=()) as h:
        tell = dict(h.seeds())["tell"]

        def raising(*a: Any, **k: Any) -> Any:
            raise KeyError("boom")

        with monkeypatch.context() as m:
            m.setattr(h.codec, "decode_all", raising)
            with pytest.raises(fz.FuzzFailure, match="escaped"):
                h.check(tell)
        with monkeypatch.context() as m:
            m.setattr(h.codec, "decode_all", lambda *a: ([], ValueError("x")))
            with pytest.raises(fz.FuzzFailure, match="returned"):
                h.check(tell)
        with pytest.raises(fz.FuzzFailure, match="tensor"):
            fz.check_numpy(np.frombuffer(bytearray(16), dtype=np.uint8)[:8])
        with pytest.raises(fz.FuzzFailure, match="tensor"):
            fz.check_torch(torch.zeros(16)[4:])
        with pytest.raises(fz.FuzzFailure, match="value"):
            h._check_values([1, {2: object()}])
        with monkeypatch.context() as m:
            m.setattr(h.codec, "decode_all", lambda *a: ([], ProtocolError("x")))
            h.tensors.owners.append(1)
            with pytest.raises(fz.FuzzFailure, match="owners-leak"):
                h.check(tell)


def test_builtin_campaign_smoke(tmp_path: pathlib.Path) -> None:
    """The campaign loop itself: two seconds find nothing, and the figures add up."""
    crash_dir = tmp_path / "crashes"
    with harness() as h:
        corpus = [frames for _, frames in h.seeds()]
        corpus += [fz.split_frames(p.read_bytes()) for p in _corpus_files()]
        stats = fz.builtin_campaign(h, corpus, seconds=2, seed=1, crash_dir=str(crash_dir), timeout=5,
                                    rss_limit_mb=256)
    assert stats["crashes"] == [], stats
    assert stats["execs"] > 1000 and stats["corpus"] > len(_corpus_files())
    assert not crash_dir.exists()


# -- bugs the fuzzing found, kept as regression tests -----------------------------------------


def _shm_batch(pid: int = 999999) -> bytes:
    """A batch whose one message names a shm segment of a (dead) process that is gone."""
    desc = [0, "uint8", [8], [1, f"cascada-{pid}-00000000-1", 1, 0, 1, pid, fz.OWNER_ENDPOINT]]
    return BATCH_MARKER + _tell([msgpack.ExtType(3, msgpack.packb(desc))])


def test_failed_batch_leaves_no_tensor_owners() -> None:
    """Found by this fuzzer: a batch that failed after a shm descriptor left its owner pid in
    TensorCodec.owners, so the next message decoded, from any peer, failed with TensorLost
    when that pid was dead (corpus: crash-owners-leak.bin)."""
    with harness(tolerate=()) as h:
        envs, err = h.codec.decode_all([_shm_batch()])
        assert envs == [] and isinstance(err, TensorLost)
        innocent = h.codec.decode(dict(h.seeds())["credit"])
        assert innocent.owners is None


def test_timestamp_ext_is_rejected() -> None:
    with harness() as h:
        head = b"\x99\x01\x04\x01\xc0\xc0\xc0\xc0\xd6\xff\x00\x00\x00\x01\xc0"  # REPLY, body = fixext4 -1
        with pytest.raises(ProtocolError):
            h.codec.decode([head])


def _peak_decoding(h: Any, head: bytes) -> int:
    tracemalloc.start()
    try:
        try:
            h.codec.decode([head])
        except ProtocolError:
            pass
        return int(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def test_header_bomb_decodes_in_bounded_memory() -> None:
    """R21: each header byte can become one Python object (~70 bytes for an empty map), so
    the header cap (DEFAULT_MAX_HEADER_BYTES, 1 MiB) bounds what one message can cost: a
    header over it is refused before decoding; one just under it stays under ~80x."""
    from cascada.transport._wire import DEFAULT_MAX_HEADER_BYTES

    def bomb(n: int) -> bytes:
        return b"\x99\x01\x04\x01\xc0\xc0\xc0\xc0" + b"\xdd" + struct.pack(">I", n) + b"\x80" * n + b"\xc0"

    with harness() as h:
        over = _peak_decoding(h, bomb(DEFAULT_MAX_HEADER_BYTES))
        at = _peak_decoding(h, bomb(DEFAULT_MAX_HEADER_BYTES - 64))
    assert over < 1 << 20, f"a header over the cap peaked at {over / 2**20:.1f} MiB before being refused"
    assert at < 80 * DEFAULT_MAX_HEADER_BYTES, f"a header at the cap peaked at {at / 2**20:.0f} MiB"


def test_rejection_message_is_bounded() -> None:
    n = 1 << 16
    head = b"\x99" + b"\xdd" + struct.pack(">I", n) + b"\x90" * n + b"\x04\x01\xc0\xc0\xc0\xc0\xc0\xc0"
    with harness() as h, pytest.raises(ProtocolError) as info:
        h.codec.decode([head])
    assert len(str(info.value)) <= 1024, f"{len(str(info.value))} characters"


def test_misaligned_complex128_does_not_crash(tmp_path: pathlib.Path) -> None:
    """In a child process: the crash kills the process. Without the harness's guard
    (--strict), a 3-element complex128 tensor in a frame one byte off alignment."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_decode.py"), "--strict", "--oob", "offset",
                           "--replay", str(CORPUS / "crash-complex128-misaligned.bin")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
