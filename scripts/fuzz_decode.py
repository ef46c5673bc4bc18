#!/usr/bin/env python3
"""Fuzz cascada's whole receive path: frames -> Codec.decode_all -> envelopes -> tensors.

The contract (issue #4, RELIABILITY.md R20-R22): whatever bytes arrive, the only exceptions
that leave the decoder, raised or returned as the error of a batch, are ProtocolError and
TensorLost (a shm descriptor naming a segment that is gone). Anything else is a failure,
and so is a crash, a hang, or a large allocation. Every tensor that does decode holds
exactly prod(shape) * itemsize bytes and sits over a buffer of exactly that length.

The receiver is a real, never started ``cascada.actors._node.Node`` (it opens no socket and
no file), so the ref ext (code 2), the tensor ext (code 3) and the limits are exactly a
node's. Its shm reader points at a private temporary directory, as does the shm pool of the
sending codec that makes the seed messages: nothing here touches /dev/shm.

Run it from the repository root:

    .venv/bin/python scripts/fuzz_decode.py --seconds 60             # atheris if installed
    .venv/bin/python scripts/fuzz_decode.py --engine builtin --seconds 60 --seed 1
    .venv/bin/python scripts/fuzz_decode.py -max_total_time=3600     # flags for libFuzzer
    .venv/bin/python scripts/fuzz_decode.py --replay fuzz-crashes/crash-0123abcd.bin
    .venv/bin/python scripts/fuzz_decode.py --write-seeds tests/fuzz_corpus

Engines. ``atheris`` (``pip install atheris``; not a dependency of the project) runs
coverage-guided libFuzzer over the instrumented cascada modules, with the structure-aware
mutator below as its custom mutator half of the time. ``builtin`` needs nothing: random
bytes plus stacked mutations of the corpus (bit flips, truncations, splices, msgpack tokens,
msgpack-aware edits of any value in the header and in the descriptors it carries, and
dropped, added, resized or reordered frames), keeping an input whenever it produces an
outcome not seen before (a cheap stand-in for coverage). Either engine fuzzes in a child
process that this one supervises, so an input that kills the process (a segfault, the OOM
killer) is saved too and, with ``builtin``, fuzzing goes on in a fresh child. Both call
the same :meth:`Harness.check`, which tests/test_fuzz_decode.py uses for its bounded CI run.

An input file is one message: its frames joined by :data:`SEP`. The first frame is the
header (a msgpack array, or a 0xC1 batch); the others are out-of-band tensor frames, handed
to the decoder as zmq.Frame objects, bytes, or misaligned views (``--oob``).

Known bugs (:data:`KNOWN_BUGS`, each with a strict xfail test) are counted as "tolerated"
rather than reported, so that a campaign keeps finding new ones; ``--strict`` reports them.

Exit status: 0 when nothing failed, 1 when a failure was found (saved under --crash-dir),
2 on a usage error.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import itertools
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack
import numpy as np
import torch
import zmq

from cascada.actors._node import Node, NodeConfig, _salvage_corr
from cascada.actors._ref import ActorRef
from cascada.transport._endpoints import host_id
from cascada.transport._errors import CascadaError, ProtocolError, TensorLost
from cascada.transport._shm import ShmPool, ShmReader
from cascada.transport._tensors import ITEMSIZE, Destination, TensorCodec, TensorOptions
from cascada.transport._wire import BATCH_MARKER, EXT_REF, EXT_TUPLE, Codec, Envelope, Kind, error_body

SEP = b"\n\x00=frame=\x00\n"
"""Joins the frames of one message in a corpus or crash file."""

ALLOWED = (ProtocolError, TensorLost)
OWNER_ENDPOINT = "ipc:///tmp/fuzz-owner.ipc"
REF_ENDPOINT = "ipc:///tmp/fuzz-expert.ipc"
MAX_INPUT = 1 << 16  # the longest input the engines make
MAX_CORPUS = 4096  # the builtin engine's in-memory corpus

# Violations the runtime is known to have (reported, with strict xfail tests for each in
# tests/test_fuzz_decode.py). A tolerated one is counted, not raised, so that fuzzing goes
# on finding new ones; ``--strict`` (or Harness(tolerate=())) raises them too. When the
# runtime is fixed, the xfail test passes, fails as strict, and the entry goes.
# "complex128-misaligned" is a segfault, which no process survives: while it is tolerated
# the harness guards the one call that crashes (see Harness._guard_complex128).
KNOWN_BUGS: frozenset[str] = frozenset()
OOB_MODES = ("zmq", "bytes", "offset", "mixed")


class FuzzFailure(AssertionError):
    """The decoder broke its contract on one input. ``kind`` names the violation."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"[{kind}] {message}")
        self.kind = kind


# -- frames <-> one input --------------------------------------------------------------------


def join_frames(frames: Sequence[Any]) -> bytes:
    return SEP.join(bytes(memoryview(f)) for f in frames)


def split_frames(data: bytes) -> list[bytes]:
    return data.split(SEP)


def load_corpus(directory: str) -> list[tuple[str, bytes]]:
    """(file name, contents) of every regular file in directory, sorted by name."""
    out: list[tuple[str, bytes]] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return out
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not name.startswith("."):
            with open(path, "rb") as f:
                out.append((name, f.read()))
    return out


# -- the harness -----------------------------------------------------------------------------


class Harness:
    """A receiving node's codec (never started) and a sending codec, both with their shm in
    one private directory. ``check`` runs one message through the receive path and raises
    FuzzFailure when the contract is broken. Close it (or use ``with``) to unlink the
    segments and close every descriptor."""

    def __init__(self, *, tolerate: Iterable[str] = KNOWN_BUGS, oob: str = "mixed", parent: str | None = None) -> None:
        """``oob``: how out-of-band frames are handed to the decoder. "zmq": zmq.Frame
        objects (what a node's socket gives; malloc-aligned here). "bytes": bytes. "offset":
        writable views 1, 4 or 8 bytes past an aligned address, as zmq hands over small
        frames that sit inside its receive buffer. "mixed": one of those, chosen by the header's checksum."""
        if oob not in OOB_MODES:
            raise ValueError(f"oob is one of {OOB_MODES}")
        self.tolerate = frozenset(tolerate)
        self.oob = oob
        self.tolerated: dict[str, int] = {}
        self.pinned_until_gc = 0  # rejected messages whose shm views outlived the decode
        self.masked: dict[str, int] = {}  # internal errors turned into ProtocolError, by place
        self.directory = tempfile.mkdtemp(prefix="fuzz-shm-", dir=parent)
        # The receiver, exactly as a node builds it (Node.__init__ opens no socket or file).
        self.node = Node("fuzz", "ipc:///tmp/fuzz-x.ipc", NodeConfig())
        self.codec: Codec = self.node.codec
        self.tensors: TensorCodec = self.node.tensors
        self.reader = ShmReader(directory=self.directory)
        self.tensors._reader = self.reader
        # The sender: a small inline limit so that modest tensors take the shm path.
        opts = TensorOptions(inline_max=256, shm_pool_bytes=1 << 20, shm_on_exhausted="error", lease_ttl=None)
        self.sender_tensors = TensorCodec(opts, host=host_id(), owner_endpoint=OWNER_ENDPOINT,
                                          process_gone=lambda pid: False)
        self.sender_tensors._pool = ShmPool(max_bytes=opts.shm_pool_bytes, directory=self.directory)
        self.sender_tensors._reader = ShmReader(directory=self.directory)
        self.sender = Codec(self.codec.limits)
        self.sender.register(ActorRef, self.node._encode_ref, EXT_REF, self.node._decode_ref)
        self.sender.install_tensors(self.sender_tensors)
        self.same_host = Destination(True, (host_id(), 1))
        self.other_host = Destination(False, ("elsewhere", 1))
        self._seeds: list[tuple[str, list[bytes]]] | None = None
        self._unguard: Callable[[], None] | None = None
        if "complex128-misaligned" in self.tolerate:
            self._guard_complex128()
        self.closed = False

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._seeds = None
        if self._unguard is not None:
            self._unguard()
            self._unguard = None
        gc.collect()  # views of received segments hold their mapping and a flock
        self.reader.close()
        self.sender_tensors.close()
        self.node.tensors.on_release = None
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- seeds: one valid message of every kind, with nested values, refs and tensors --------

    def ref(self) -> ActorRef:
        return ActorRef("expert", REF_ENDPOINT, 4242, host_id(), "inc-7")

    def encode(self, kind: Kind, body: Any, *, corr: int = 1, target: str | None = "expert",
               method: str | None = "forward", opts: int | None = None, incarnation: str | None = None,
               shm: bool = False) -> list[bytes]:
        self.sender_tensors.dest = self.same_host if shm else self.other_host
        try:
            frames = self.sender.encode(kind, corr, "client", target, method, 1.9e9, body, opts, incarnation)
        finally:
            self.sender_tensors.dest = self.other_host
        return [bytes(memoryview(f)) for f in frames]

    def seeds(self) -> list[tuple[str, list[bytes]]]:
        """(name, frames) of valid messages: every Kind, tensors inline and in shm (whose
        segments live in this harness's directory), a CUDA descriptor, and a batch."""
        if self._seeds is not None:
            return self._seeds
        ref = self.ref()
        f32 = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        seeds: list[tuple[str, list[bytes]]] = [
            ("ask", self.encode(Kind.ASK, [
                [f32, np.arange(5, dtype=np.int16), ref, (1, (2.5, "x"), b"\x00\xff"),
                 {"nested": [None, True, -7, 2**40, {"deep": (ref, [1.5])}]}],
                {"mask": np.array([[True, False], [False, True]]), "empty": torch.empty(0, 3)}],
                target="router", method="route")),
            ("tell", self.encode(Kind.TELL, [
                [torch.arange(4, dtype=torch.bfloat16), np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
                 torch.tensor(7, dtype=torch.int64), np.zeros((2, 0, 3), dtype=np.uint32)], None],
                method="push")),
            ("stream", self.encode(Kind.STREAM, [["prompt", 16], {"temperature": 0.7, "who": ref}],
                                   target="decoder", method="generate", opts=8)),
            ("reply", self.encode(Kind.REPLY, {"logits": torch.ones(2, 3, dtype=torch.float16), "ref": ref,
                                               "pair": (np.arange(3, dtype=np.uint8), "ok")},
                                  target=None, method=None, incarnation="inc-7")),
            ("error", self.encode(Kind.ERROR, error_body("remote", "ValueError", "boom", "Traceback ...",
                                                         {"actor": "expert"}), target=None, method=None)),
            ("item", self.encode(Kind.ITEM, [np.arange(4, dtype=np.float64).reshape(2, 2), 3,
                                             torch.arange(6, dtype=torch.int8),
                                             torch.tensor([1 + 1j, 2, 3], dtype=torch.complex128)],
                                 target=None, method=None)),
            ("end", self.encode(Kind.END, None, target=None, method=None)),
            ("credit", self.encode(Kind.CREDIT, None, target=None, method=None, opts=4)),
            ("cancel", self.encode(Kind.CANCEL, None, target=None, method=None)),
            ("tell-shm", self.encode(Kind.TELL, [[torch.arange(128, dtype=torch.float32),
                                                  np.arange(100, dtype=np.int32)], None],
                                     method="push", shm=True)),
            ("reply-shm", self.encode(Kind.REPLY, (np.linspace(0, 1, 64), torch.arange(70, dtype=torch.int32)),
                                      target=None, method=None, shm=True)),
            ("tell-cuda", [cuda_header()]),
        ]
        batch = [self.encode(Kind.CREDIT, None, corr=2, target=None, method=None, opts=1)[0],
                 self.encode(Kind.TELL, [[1, "two", (3.0, None)], {"k": ref}], corr=3, method="m")[0],
                 self.encode(Kind.CANCEL, None, corr=4, target=None, method=None)[0],
                 self.encode(Kind.REPLY, [b"bytes", {"x": ref}], corr=5, target=None, method=None)[0],
                 self.encode(Kind.END, None, corr=6, target=None, method=None)[0]]
        seeds.append(("batch", [BATCH_MARKER + b"".join(batch)]))
        self._seeds = seeds
        return seeds

    # -- the checker -----------------------------------------------------------------------

    def received(self, frames: Sequence[Any], oob: str | None = None) -> list[Any]:
        """The frames as a node's socket hands them over: header bytes, then the out-of-band
        frames as ``oob`` (default: the harness's mode) says."""
        mode = oob or self.oob
        if mode == "mixed":  # chosen by the content, so that a failing input fails again
            mode = OOB_MODES[zlib.crc32(bytes(frames[0]) if frames else b"") % 3]
        out: list[Any] = [bytes(frames[0])] if frames else []
        for i, f in enumerate(frames[1:]):
            if mode == "zmq":
                out.append(zmq.Frame(bytes(f), copy=True))
            elif mode == "bytes":
                out.append(bytes(f))
            else:
                shift = (1, 8, 4)[i % 3]
                out.append(memoryview(bytearray(shift) + bytes(f))[shift:])
        return out

    def _guard_complex128(self) -> None:
        """torch segfaults cloning a complex128 tensor whose data is not 16-byte aligned
        (odd element counts), which ``_tensors._build`` does for every misaligned tensor.
        While that bug is tolerated, turn exactly that call into a counted violation."""
        from cascada.transport import _tensors

        build = getattr(_tensors, "_build", None)
        if build is None:
            return

        def guarded(lib: int, dtype: str, dims: list[int], buf: Any, nbytes: int) -> Any:
            if lib == 0 and dtype == "complex128" and nbytes and ctypes.addressof(buf) % 16:
                self._violation("complex128-misaligned", "a complex128 torch tensor over misaligned memory")
                raise ProtocolError("fuzz harness: a known crash was skipped (misaligned complex128)")
            return build(lib, dtype, dims, buf, nbytes)

        _tensors._build = guarded

        def unguard() -> None:
            _tensors._build = build

        self._unguard = unguard

    def check(self, frames: Sequence[Any], *, router: bool = False) -> str:
        """Run one message through the receive path; return a short outcome signature.
        Raises FuzzFailure if the decoder broke its contract. ``router``: with a routing-id
        frame in front, decoded from index 1, as the node's ROUTER does."""
        codec = self.codec
        got = self.received(frames)
        start = 0
        if router:
            got.insert(0, b"1234.1.peer")
            start = 1
        envs: list[Envelope] = []
        err: BaseException | None = None
        try:
            envs, err = codec.decode_all(got, start)
        except ALLOWED as exc:
            err = exc
        except Exception as exc:
            raise FuzzFailure("escaped", f"{type(exc).__name__} escaped decode_all: {exc}") from exc
        if err is not None and not isinstance(err, ALLOWED):
            raise FuzzFailure("returned", f"decode_all returned a {type(err).__name__}: {err}")
        if type(envs) is not list:
            raise FuzzFailure("returned", f"decode_all returned {type(envs).__name__} for the messages")
        ntensors = sum(self._check_envelope(env) for env in envs)
        if err is not None:
            self._check_salvage(got, start)
            self._check_cause(err)
        # No state may leak from one message into the next.
        if codec._depth != 0 or codec._frames != ():
            raise FuzzFailure("state", f"codec left depth={codec._depth}, frames={len(codec._frames)}")
        if self.tensors.owners:
            owners = self.tensors.take_owners()
            self._violation("owners-leak", f"tensor owners {owners} of a rejected message were left in "
                                           "TensorCodec.owners, to be pinned on the next message decoded")
        sig = self._signature(envs, err, ntensors)
        del envs, err, got
        self._check_released()
        return sig

    def _violation(self, kind: str, message: str) -> None:
        if kind in self.tolerate:
            self.tolerated[kind] = self.tolerated.get(kind, 0) + 1
            return
        raise FuzzFailure(kind, message)

    def _check_envelope(self, env: Any) -> int:
        if type(env) is not Envelope or type(env.kind) is not Kind:
            raise FuzzFailure("envelope", f"decode_all produced {env!r}")
        if type(env.corr) is not int or env.corr < 0:
            raise FuzzFailure("envelope", f"corr {env.corr!r}")
        for name in ("sender", "target", "method", "incarnation"):
            if type(getattr(env, name)) not in (str, type(None)):
                raise FuzzFailure("envelope", f"{name} is {type(getattr(env, name)).__name__}")
        if env.owners is not None and not all(type(p) is int for p in env.owners):
            raise FuzzFailure("envelope", f"owners {env.owners!r}")
        return self._check_values(env.body)

    def _check_values(self, value: Any) -> int:
        """Walk a decoded body (iteratively: it may nest thousands deep); check every tensor."""
        n = 0
        stack = [value]
        while stack:
            v = stack.pop()
            t = type(v)
            if t is list or t is tuple:
                stack.extend(v)
            elif t is dict:
                stack.extend(v.keys())
                stack.extend(v.values())
            elif t is np.ndarray:
                check_numpy(v)
                n += 1
            elif t is torch.Tensor:
                check_torch(v)
                n += 1
            elif t is ActorRef:
                if (type(v.name) is not str or type(v.endpoint) is not str or type(v.pid) is not int
                        or type(v.host) is not str or type(v.incarnation) not in (str, type(None))):
                    raise FuzzFailure("ref", f"malformed ActorRef {v!r}")
            elif t is msgpack.Timestamp:
                self._violation("timestamp-ext", "msgpack's timestamp ext (code -1) is decoded to a "
                                                 "msgpack.Timestamp, bypassing the ext allowlist")
            elif t not in (type(None), bool, int, float, str, bytes):
                raise FuzzFailure("value", f"decoded a value of type {t.__module__}.{t.__qualname__}")
        return n

    def _check_salvage(self, got: list[Any], start: int) -> None:
        # The node's reject paths: ROUTER (frames with the identity first) and Peer.
        with_identity = got if start == 1 else [b"id", *got]
        for frames, replies in ((with_identity, False), ([b"", *got[start:]], True)):
            try:
                corr = _salvage_corr(frames, replies=replies)
            except Exception as exc:
                raise FuzzFailure("salvage", f"_salvage_corr raised {type(exc).__name__}: {exc}") from exc
            if corr is not None and (type(corr) is not int or corr <= 0):
                raise FuzzFailure("salvage", f"_salvage_corr returned {corr!r}")

    def _check_released(self) -> None:
        """Every view of a received segment is gone once the message is: no flock is held."""
        self.node._releases.clear()
        if not any(m.holders for m in self.reader._maps.values()):
            return
        self.pinned_until_gc += 1  # held by a reference cycle (an exception's traceback)
        gc.collect()
        self.node._releases.clear()
        held = {name: m.holders for name, m in self.reader._maps.items() if m.holders}
        if held:
            raise FuzzFailure("shm-held", f"segments still held after the message was dropped: {held}")

    @staticmethod
    def _signature(envs: list[Envelope], err: BaseException | None, ntensors: int) -> str:
        """Coarse, so that the builtin engine's corpus grows with new behaviour, not new text."""
        parts = []
        if envs:
            kinds = sorted({e.kind.name for e in envs})
            parts.append(f"ok:{'+'.join(kinds) if len(envs) == 1 else 'batch'}:{bool(ntensors)}")
        if err is not None:
            words = re.sub(r"[^a-z ]+", " ", str(err).lower()).split()[:5]
            parts.append(f"{type(err).__name__}:{' '.join(words)}")
            cause = err.__cause__
            if cause is not None:
                parts.append(type(cause).__name__)
        return "|".join(parts)

    def _check_cause(self, err: BaseException) -> None:
        """A ProtocolError made from an exception that the runtime's own code (or torch,
        numpy) raised, rather than msgpack or a deliberate check, hides a bug: count it."""
        cause = err.__cause__
        if cause is None or isinstance(cause, ALLOWED) or cause.__traceback__ is None:
            return
        last = traceback.extract_tb(cause.__traceback__)[-1]
        line = last.line or ""
        if isinstance(cause, CascadaError) or "msgpack" in last.filename or last.filename.endswith(".pyx") \
                or "unpack" in line:
            return  # msgpack's own errors, and cascada's deliberate ones (a bad endpoint) re-raised
        key = f"{type(cause).__name__} at {os.path.basename(last.filename)}:{last.lineno}"
        self.masked[key] = self.masked.get(key, 0) + 1
        self._violation("masked", f"an internal {key} ({cause}) was turned into a ProtocolError")


def check_numpy(a: np.ndarray) -> None:
    want = math.prod(a.shape) * ITEMSIZE.get(a.dtype.name, -1)
    if a.dtype.name not in ITEMSIZE or a.nbytes != want:
        raise FuzzFailure("tensor", f"numpy {a.dtype}{list(a.shape)} holds {a.nbytes} bytes, wants {want}")
    if not a.flags.c_contiguous:
        raise FuzzFailure("tensor", f"numpy {a.dtype}{list(a.shape)} is not contiguous")
    base: Any = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    length = memoryview(base).nbytes
    if length != want:
        raise FuzzFailure("tensor", f"numpy {a.dtype}{list(a.shape)} ({want} bytes) sits over a buffer of "
                                    f"{length} bytes")
    if len(a.tobytes()) != want:  # touches every byte: a bad mapping faults here
        raise FuzzFailure("tensor", "tobytes length")


def check_torch(t: torch.Tensor) -> None:
    dtype = str(t.dtype).removeprefix("torch.")
    want = math.prod(t.shape) * ITEMSIZE.get(dtype, -1)
    if dtype not in ITEMSIZE or t.numel() * t.element_size() != want:
        raise FuzzFailure("tensor", f"torch {dtype}{list(t.shape)} holds {t.numel() * t.element_size()} "
                                    f"bytes, wants {want}")
    # CPU, or CUDA for a host-staged tensor ("cuda" flag) on a machine with a GPU.
    if t.device.type not in ("cpu", "cuda") or not t.is_contiguous() or t.storage_offset() != 0:
        raise FuzzFailure("tensor", f"torch {dtype}{list(t.shape)} on {t.device}, contiguous "
                                    f"{t.is_contiguous()}, offset {t.storage_offset()}")
    length = t.untyped_storage().nbytes()
    if length != want:
        raise FuzzFailure("tensor", f"torch {dtype}{list(t.shape)} ({want} bytes) sits over a storage of "
                                    f"{length} bytes")
    if want and len(torch_bytes(t)) != want:  # touches every byte: a bad mapping faults here
        raise FuzzFailure("tensor", "byte view length")


def torch_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())


def cuda_header(pid: int = 4242) -> bytes:
    """A TELL carrying a well-formed CUDA IPC descriptor (tag 2) for a producer that does not
    exist: on a machine without CUDA it ends in TensorLost, after every check of the fields."""
    where = [2, b"\x01\x02" + bytes(range(64)), 0, 64, 0, None, 5, 0, b"/torch_123_456_789", 3, None,
             pid, OWNER_ENDPOINT]
    desc = msgpack.packb([0, "float32", [16], where])
    body = [[msgpack.ExtType(3, desc)], None]
    return msgpack.packb([1, int(Kind.TELL), 9, "client", "expert", "push", None, body, None, None])


# -- mutations -------------------------------------------------------------------------------

INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 9, 10, 15, 16, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1023,
                    4096, 4097, 65535, 65536, 2**20, 2**31 - 1, 2**31, -2**31, 2**32 - 1, 2**32, 2**45,
                    2**46, 2**46 + 1, 2**53, 2**62, 2**63 - 1, -2**63, 2**64 - 1]
INTERESTING_STRS = [*ITEMSIZE, "object", "float128", "<f4", "U8", "", "torch", "cuda", "remote", "protocol",
                    "tensor_lost", "ipc:///tmp/x", "tcp://*:1", "tcp://127.0.0.1:1", "inproc://a", "ipc://" + "a" * 200,
                    "cascada-1-deadbeef-1", "../cascada-1-00000000-1", "cascada-99999999-00000000-1",
                    "\udcff", "x" * 600, "__class__", "lease.release"]
INTERESTING_BYTES = [b"", b"\x00" * 64, b"\x01\x02" + bytes(64), bytes(4097), b"/torch_1_2_3", b"/dev/shm/x"]
# Raw msgpack tokens that stress the unpacker's limits and the ext dispatch.
TOKENS = [b"\xdd\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xde\xff\xff",
          b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x03", b"\xc7\xff\x03",
          b"\xc7\x00\x03", b"\xd4\x01\x90", b"\xd4\x02\x90", b"\xd4\x03\x90", b"\xd5\x03\x91\x00", b"\xd4\x63\x00",
          b"\xd6\xff\x00\x00\x00\x01", b"\xd7\xff" + bytes(8), b"\xc7\x0c\xff" + bytes(12),
          b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80" + bytes(7), b"\xcb\x7f\xf8" + bytes(6),
          b"\xc0", b"\xc2", b"\xc3", b"\xc1", b"\x90", b"\x80", b"\xa0", b"\x91" * 64, b"\xd4\x01\x91" * 20,
          b"\xa3\xff\xfe\xfd", b"\x9a", b"\x99", b"\x95\x01\xa7float32\x91\x04\x92\x00\x00"]


class _Ext:
    """An ext value in a parsed tree: its payload parsed too when it is msgpack."""

    __slots__ = ("code", "value", "raw")

    def __init__(self, code: int, value: Any, raw: bytes) -> None:
        self.code = code
        self.value = value
        self.raw = raw


_RAW = object()


def parse_tree(data: bytes, depth: int = 0) -> Any:
    def hook(code: int, payload: bytes) -> _Ext:
        if depth < 8:
            try:
                return _Ext(code, parse_tree(payload, depth + 1), payload)
            except Exception:
                pass
        return _Ext(code, _RAW, payload)

    return msgpack.unpackb(data, ext_hook=hook, strict_map_key=False, raw=False, use_list=True,
                           unicode_errors="surrogateescape")


def pack_tree(tree: Any) -> bytes:
    def default(obj: Any) -> Any:
        if type(obj) is _Ext:
            return msgpack.ExtType(obj.code, obj.raw if obj.value is _RAW else pack_tree(obj.value))
        raise TypeError(type(obj).__name__)

    return msgpack.packb(tree, default=default, unicode_errors="surrogateescape")


def _interesting(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.35:
        return rng.choice(INTERESTING_INTS)
    if r < 0.6:
        return rng.choice(INTERESTING_STRS)
    if r < 0.7:
        return rng.choice(INTERESTING_BYTES)
    return rng.choice([None, True, False, 0.0, -0.0, math.nan, math.inf, 1.5, [], {}, [[]], [0] * 33,
                       [rng.choice(INTERESTING_INTS)], {"k": 1}, {1: 2},
                       _Ext(EXT_TUPLE, [], b"\x90"), _Ext(EXT_REF, _RAW, b""), _Ext(99, _RAW, b""),
                       _Ext(3, [0, "uint8", [0], [0, 0]], b""), _Ext(3, _RAW, b"\x94")])


def _slots(tree: Any) -> list[tuple[Any, Any]]:
    """(container, key) of every value in the tree, the root as (None, None)."""
    out: list[tuple[Any, Any]] = [(None, None)]
    stack = [tree]
    seen = 0
    while stack and seen < 4096:
        node = stack.pop()
        seen += 1
        if type(node) is list:
            for i, v in enumerate(node):
                out.append((node, i))
                stack.append(v)
        elif type(node) is dict:
            for k, v in node.items():
                out.append((node, k))
                stack.append(v)
        elif type(node) is _Ext and node.value is not _RAW:
            out.append((node, "value"))
            stack.append(node.value)
    return out


def _new_value(rng: random.Random, old: Any) -> Any:
    t = type(old)
    r = rng.random()
    if r < 0.4:
        return _interesting(rng)
    if t is int and not isinstance(old, bool):
        return rng.choice([old + 1, old - 1, -old, old * 2, old + rng.choice(INTERESTING_INTS), old ^ (1 << rng.randrange(64))])
    if t is str:
        return rng.choice([old[: rng.randrange(len(old) + 1)], old + rng.choice(INTERESTING_STRS), old.upper(),
                           old.encode("utf-8", "surrogateescape").decode("latin-1")])
    if t is bytes:
        return rng.choice([old[: rng.randrange(len(old) + 1)], old + bytes(rng.randrange(8)), old * 2])
    if t is list:
        return rng.choice([[], old[:-1], old + [_interesting(rng)], [old], old * 2, old[::-1]])
    if t is dict:
        d = dict(old)
        d[rng.choice(["k", 1, "", "self"])] = _interesting(rng)
        return rng.choice([d, {}, list(old.values())])
    if t is _Ext:
        return rng.choice([_Ext(rng.choice([1, 2, 3, 4, 0, 15, 127]), old.value, old.raw), old.value,
                           _Ext(old.code, _RAW, old.raw[: rng.randrange(len(old.raw) + 1)])])
    return _interesting(rng)


def mutate_structure(rng: random.Random, data: bytes, rounds: int = 1) -> bytes | None:
    """A msgpack-aware mutation of one frame: parse it (ext payloads too), change, insert or
    delete a value somewhere in the tree, pack it again. None when the frame is not msgpack."""
    batch = data[:1] == BATCH_MARKER
    try:
        if batch:
            unpacker = msgpack.Unpacker(ext_hook=lambda c, p: _Ext(c, _parse_or_raw(p), p), strict_map_key=False,
                                        raw=False, unicode_errors="surrogateescape")
            unpacker.feed(data[1:])
            trees = list(unpacker)
        else:
            trees = [parse_tree(data)]
    except Exception:
        return None
    if not trees:
        return None
    for _ in range(rounds):
        i = rng.randrange(len(trees))
        slots = _slots(trees[i])
        container, key = rng.choice(slots)
        if container is None:
            trees[i] = _new_value(rng, trees[i])
        elif type(container) is list and rng.random() < 0.25:
            op = rng.randrange(3)
            if op == 0:
                del container[key]
            elif op == 1:
                container.insert(key, _interesting(rng))
            else:
                j = rng.randrange(len(container))
                container[key], container[j] = container[j], container[key]
        elif type(container) is _Ext:
            container.value = _new_value(rng, container.value)
        else:
            container[key] = _new_value(rng, container[key])
        if batch and rng.random() < 0.1:
            trees.insert(rng.randrange(len(trees) + 1), rng.choice(trees))
    try:
        packed = b"".join(pack_tree(t) for t in trees)
    except Exception:
        return None
    return BATCH_MARKER + packed if batch else packed


def _parse_or_raw(payload: bytes) -> Any:
    try:
        return parse_tree(payload, 1)
    except Exception:
        return _RAW


def mutate_bytes(rng: random.Random, data: bytes, other: bytes = b"") -> bytes:
    """One byte-level mutation: bit flip, interesting byte, token overwrite or insert,
    truncation, deletion, insertion, duplication, or a splice with ``other``."""
    b = bytearray(data)
    n = len(b)
    op = rng.randrange(10)
    if op == 0 and n:
        i = rng.randrange(n)
        b[i] ^= 1 << rng.randrange(8)
    elif op == 1 and n:
        b[rng.randrange(n)] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC7, 0xD4, 0xD6, 0xDC, 0xDD,
                                          0xDE, 0xDF, 0x90, 0x9F, 0xA0, 0xBF, 0xCF, 0xD3, 0xCB, 0x03, 0x02])
    elif op == 2:
        i = rng.randrange(n + 1)
        tok = rng.choice(TOKENS)
        b[i : i + (len(tok) if rng.random() < 0.5 else 0)] = tok
    elif op == 3 and n:
        del b[rng.randrange(n) :]
    elif op == 4 and n:
        i = rng.randrange(n)
        del b[i : i + rng.randrange(1, 9)]
    elif op == 5:
        i = rng.randrange(n + 1)
        b[i:i] = rng.randbytes(rng.randrange(1, 9))
    elif op == 6 and n:
        i = rng.randrange(n)
        j = min(n, i + rng.randrange(1, 33))
        b[j:j] = b[i:j]
    elif op == 7 and other:
        b = bytearray(data[: rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1) :])
    elif op == 8 and n >= 2:
        i, j = sorted(rng.sample(range(n), 2))
        b[i], b[j] = b[j], b[i]
    else:
        b += rng.randbytes(rng.randrange(1, 5))
    return bytes(b[:MAX_INPUT])


def mutate_frames(rng: random.Random, frames: list[bytes], pool: Sequence[list[bytes]] = ()) -> list[bytes]:
    """One frame-level mutation: drop, duplicate, add, swap or resize an out-of-band frame;
    batch or unbatch a header; or append another message's header to a batch."""
    f = list(frames)
    op = rng.randrange(9)
    if op == 0 and len(f) > 1:
        del f[rng.randrange(1, len(f))]
    elif op == 1 and f:
        f.insert(rng.randrange(1, len(f) + 1), f[rng.randrange(len(f))])
    elif op == 2:
        f.append(rng.choice([b"", rng.randbytes(rng.randrange(1, 64)), bytes(rng.choice([1, 2, 4, 8, 16, 48, 512]))]))
    elif op == 3 and len(f) > 2:
        i, j = rng.sample(range(1, len(f)), 2)
        f[i], f[j] = f[j], f[i]
    elif op == 4 and len(f) > 1:
        i = rng.randrange(1, len(f))
        delta = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
        f[i] = f[i][:delta] if delta < 0 else f[i] + bytes(delta)
    elif op == 5 and f and f[0][:1] != BATCH_MARKER:
        f = [BATCH_MARKER + f[0], *f[1:]]
    elif op == 6 and f and f[0][:1] == BATCH_MARKER:
        f[0] = f[0][1:]
    elif op == 7 and f and pool:
        other = rng.choice(pool)
        if other:
            head = f[0] if f[0][:1] == BATCH_MARKER else BATCH_MARKER + f[0]
            extra = other[0][1:] if other[0][:1] == BATCH_MARKER else other[0]
            f = [head + extra, *f[1:]]
    elif len(f) > 1:
        i = rng.randrange(1, len(f))
        f[i] = mutate_bytes(rng, f[i])
    else:
        f.append(bytes(rng.randrange(0, 128)))
    return f[:40]


def mutate(rng: random.Random, frames: list[bytes], pool: Sequence[list[bytes]] = ()) -> list[bytes]:
    """1 to 4 stacked mutations of any kind."""
    f = list(frames) or [b""]
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        r = rng.random()
        if r < 0.4:
            i = 0 if len(f) == 1 or rng.random() < 0.8 else rng.randrange(len(f))
            out = mutate_structure(rng, f[i], rounds=rng.choice((1, 1, 2)))
            if out is not None:
                f[i] = out
                continue
            r = 0.5
        if r < 0.8:
            i = 0 if len(f) == 1 or rng.random() < 0.8 else rng.randrange(len(f))
            other = rng.choice(pool)[0] if pool else b""
            f[i] = mutate_bytes(rng, f[i], other)
        else:
            f = mutate_frames(rng, f, pool)
    return f


def random_input(rng: random.Random) -> list[bytes]:
    """Random bytes with a few likely first bytes (an array header, a batch marker)."""
    body = rng.randbytes(rng.randrange(0, 256))
    lead = rng.choice([b"", b"", b"\x99", b"\x9a", b"\xc1", b"\xc1\x99", b"\xdc\x00\x0a", b"\x99\x01"])
    frames = [lead + body]
    while rng.random() < 0.2:
        frames.append(rng.randbytes(rng.randrange(0, 64)))
    return frames


# -- the campaign ----------------------------------------------------------------------------


class _Hang(BaseException):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def _save_crash(crash_dir: str, data: bytes, report: str) -> str:
    os.makedirs(crash_dir, exist_ok=True)
    digest = _digest(data)
    path = os.path.join(crash_dir, f"crash-{digest}.bin")
    with open(path, "wb") as f:
        f.write(data)
    with open(path[:-4] + ".txt", "w") as f:
        f.write(report)
    return path


def _crash_key(exc: BaseException) -> str:
    if isinstance(exc, FuzzFailure):
        cause = exc.__cause__
        where = ""
        if cause is not None and cause.__traceback__ is not None:
            last = traceback.extract_tb(cause.__traceback__)[-1]
            where = f"{os.path.basename(last.filename)}:{last.lineno}"
        return f"{exc.kind}:{type(cause).__name__ if cause else ''}:{where}"
    return type(exc).__name__


def builtin_campaign(harness: Harness, corpus: list[list[bytes]], *, seconds: float, seed: int,
                     crash_dir: str, timeout: float, rss_limit_mb: int, report_every: float = 10.0,
                     last: Any = None) -> dict[str, Any]:
    """Random inputs and stacked mutations of the corpus, for ``seconds``. An input whose
    outcome signature is new joins the corpus. Failures are saved (one per distinct kind and
    place) to crash_dir. ``last``: a writable buffer that gets [execs, length, input] before
    each run, so that a supervisor can save the input that killed the process."""
    rng = random.Random(seed)
    signatures: set[str] = set()

    def note(frames: list[bytes], execs: int) -> None:
        if last is not None:
            data = join_frames(frames)[: len(last) - 12]
            last[12 : 12 + len(data)] = data
            last[:12] = struct.pack("<QI", execs, len(data))

    for frames in corpus:  # warm up (lazy imports), learn the seeds' outcomes
        note(frames, 0)
        try:
            signatures.add(harness.check(frames))
        except FuzzFailure:
            pass
    n_seeds = len(corpus)
    baseline = _peak_rss_mib()
    # Borrow SIGALRM (per-input hang timer), and give back any timer already running
    # (pytest-timeout's, under the test suite) with what is left of it.
    old = signal.signal(signal.SIGALRM, _on_alarm) if timeout > 0 else None
    outer = signal.getitimer(signal.ITIMER_REAL)
    crashes: dict[str, str] = {}
    execs = 0
    t0 = time.monotonic()
    next_report = t0 + report_every
    try:
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            if now >= next_report:
                next_report = now + report_every
                print(f"#{execs} execs, {execs / (now - t0):.0f}/s, corpus {len(corpus)}, crashes {len(crashes)}, "
                      f"peak rss {_peak_rss_mib():.0f} MiB", flush=True)
            if rng.random() < 0.08:
                frames = random_input(rng)
            else:
                frames = mutate(rng, rng.choice(corpus), corpus)
            router = rng.random() < 0.1
            execs += 1
            note(frames, execs)
            failure: BaseException | None = None
            if timeout > 0:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                sig = harness.check(frames, router=router)
            except FuzzFailure as exc:
                failure = exc
            except _Hang:
                failure = FuzzFailure("hang", f"one input took over {timeout} s")
            finally:
                if timeout > 0:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            if failure is None and _peak_rss_mib() - baseline > rss_limit_mb:
                failure = FuzzFailure("memory", f"peak RSS rose by {_peak_rss_mib() - baseline:.0f} MiB "
                                                f"(limit {rss_limit_mb})")
                baseline = _peak_rss_mib()
            if failure is not None:
                key = _crash_key(failure)
                if key not in crashes:
                    report = "".join(traceback.format_exception(failure))
                    crashes[key] = _save_crash(crash_dir, join_frames(frames), report)
                    print(f"CRASH {key}: {failure}\n  saved to {crashes[key]}", flush=True)
                continue
            if sig not in signatures:
                signatures.add(sig)
                if len(corpus) < MAX_CORPUS:
                    corpus.append(frames)
                else:
                    corpus[rng.randrange(n_seeds, MAX_CORPUS)] = frames
    finally:
        if old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            if outer[0] > 0:
                signal.setitimer(signal.ITIMER_REAL, max(0.001, outer[0] - (time.monotonic() - t0)), outer[1])
    return {"execs": execs, "elapsed": time.monotonic() - t0, "corpus": len(corpus),
            "crashes": sorted(crashes.values()), "tolerated": dict(harness.tolerated), "masked": dict(harness.masked),
            "pinned_until_gc": harness.pinned_until_gc, "peak_rss_mb": round(_peak_rss_mib())}


def print_summary(engine: str, stats: dict[str, Any], crash_dir: str, tolerate: Iterable[str]) -> None:
    crashes = stats.get("crashes") or []
    elapsed = stats.get("elapsed") or 0.0
    rate = stats.get("execs_per_s", stats.get("execs", 0) / max(elapsed, 1e-9))
    wall = f", {stats['wall']:.1f} s in all (start-up included)" if "wall" in stats else ""
    print(f"== fuzz_decode ({engine}) ==\n"
          f"execs:        {stats.get('execs', '?')}\n"
          f"time:         {elapsed:.1f} s fuzzing{wall}\n"
          f"execs/s:      {rate if isinstance(rate, str) else f'{rate:.0f}'}\n"
          f"corpus:       {stats.get('corpus', '?')}\n"
          f"crashes:      {len(crashes)}{f' in {crash_dir}: ' + ', '.join(map(os.path.basename, crashes)) if crashes else ''}\n"
          f"tolerated:    {stats.get('tolerated') or 'none'} (known bugs: {', '.join(sorted(tolerate)) or 'none'})\n"
          f"masked:       {stats.get('masked') or 'none'} (internal errors turned into ProtocolError)\n"
          f"pinned-gc:    {stats.get('pinned_until_gc', '?')} (rejected messages whose shm views waited for gc)\n"
          f"peak RSS:     {stats.get('peak_rss_mb', '?')} MiB", flush=True)


LAST_INPUT_BYTES = 1 << 20


def builtin_child(root: str, args: argparse.Namespace) -> int:
    """One supervised run of the builtin engine (see builtin_parent)."""
    import faulthandler
    import json
    import mmap

    fault = open(os.path.join(root, "fault.txt"), "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.enable(fault)
    with open(os.path.join(root, "last-input"), "r+b") as f:
        last = mmap.mmap(f.fileno(), LAST_INPUT_BYTES)
    harness = Harness(tolerate=() if args.strict else KNOWN_BUGS, oob=args.oob, parent=root)
    try:
        corpus = [frames for _, frames in harness.seeds()]
        corpus += [split_frames(data) for _, data in load_corpus(args.corpus)]
        try:
            with open(os.path.join(root, "skip")) as f:
                skip = set(f.read().split())
        except FileNotFoundError:
            skip = set()
        corpus = [frames for frames in corpus if _digest(join_frames(frames)) not in skip]
        stats = builtin_campaign(harness, corpus, seconds=args.seconds, seed=args.seed, crash_dir=args.crash_dir,
                                 timeout=args.timeout, rss_limit_mb=args.rss_limit_mb, last=last)
    finally:
        harness.close()
    with open(os.path.join(root, "result.json"), "w") as f:
        json.dump(stats, f)
    return 1 if stats["crashes"] else 0


def builtin_parent(args: argparse.Namespace, seconds: float) -> int:
    """Run the builtin engine in a child process, so that an input that kills the process
    (a segfault, the OOM killer) is saved and fuzzing goes on in a fresh child."""
    import json
    import subprocess

    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"builtin engine, seed {seed}", flush=True)
    os.makedirs(args.crash_dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="fuzz-decode-")
    total: dict[str, Any] = {"execs": 0, "elapsed": 0.0, "corpus": 0, "crashes": [], "tolerated": {},
                             "masked": {}, "pinned_until_gc": 0}
    t0 = time.monotonic()
    deadline = t0 + seconds
    try:
        for run in itertools.count():
            left = deadline - time.monotonic()
            if run and left < 1:
                break
            with open(os.path.join(root, "last-input"), "wb") as f:
                f.truncate(LAST_INPUT_BYTES)
            for name in ("result.json", "fault.txt"):
                if os.path.exists(os.path.join(root, name)):
                    os.unlink(os.path.join(root, name))
            cmd = [sys.executable, os.path.abspath(__file__), "--engine", "builtin", "--child-root", root,
                   "--seconds", str(max(left, 1)), "--seed", str(seed + run), "--crash-dir", args.crash_dir,
                   "--timeout", str(args.timeout), "--rss-limit-mb", str(args.rss_limit_mb), "--oob", args.oob,
                   "--corpus", args.corpus, *(["--strict"] if args.strict else [])]
            started = time.monotonic()
            rc = subprocess.call(cmd)
            try:
                with open(os.path.join(root, "result.json")) as f:
                    stats = json.load(f)
            except (OSError, ValueError):
                stats = None
            if stats is not None:
                total["execs"] += stats["execs"]
                total["elapsed"] += stats["elapsed"]
                total["corpus"] = max(total["corpus"], stats["corpus"])
                total["crashes"] += stats["crashes"]
                total["pinned_until_gc"] += stats["pinned_until_gc"]
                for key in ("tolerated", "masked"):
                    for k, v in stats[key].items():
                        total[key][k] = total[key].get(k, 0) + v
                break
            # The child died: save the input it was running.
            with open(os.path.join(root, "last-input"), "rb") as f:
                head = f.read(12)
                execs, length = struct.unpack("<QI", head)
                data = f.read(length)
            total["execs"] += execs
            total["elapsed"] += time.monotonic() - started
            try:
                with open(os.path.join(root, "fault.txt")) as f:
                    fault = f.read()
            except OSError:
                fault = ""
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc} without a result"
            path = _save_crash(args.crash_dir, data, f"the fuzzing process was {how} on this input\n\n{fault}")
            if path not in total["crashes"]:
                total["crashes"].append(path)
            # A seed that kills the process would kill every new child: leave it out from now on.
            with open(os.path.join(root, "skip"), "a") as f:
                f.write(_digest(data) + "\n")
            if run >= 50:
                print("CRASH: the fuzzing process keeps dying; giving up", flush=True)
                break
            print(f"CRASH: the fuzzing process was {how}; input saved to {path}; restarting", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total["wall"] = time.monotonic() - t0
    total["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print_summary("builtin", total, args.crash_dir, () if args.strict else KNOWN_BUGS)
    return 1 if total["crashes"] else 0


def _instrument_cascada(atheris: Any) -> None:
    """Coverage for cascada's own Python code (msgpack and torch stay uninstrumented)."""
    import types

    done: set[int] = set()
    for name, mod in list(sys.modules.items()):
        if not name.startswith("cascada") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            funcs: list[Any] = []
            if isinstance(obj, types.FunctionType) and obj.__module__ == name:
                funcs.append(obj)
            elif isinstance(obj, type) and obj.__module__ == name:
                for attr in vars(obj).values():
                    if isinstance(attr, (staticmethod, classmethod)):
                        attr = attr.__func__
                    elif isinstance(attr, property):
                        funcs.extend(f for f in (attr.fget, attr.fset) if f is not None)
                        continue
                    if isinstance(attr, types.FunctionType):
                        funcs.append(attr)
            for fn in funcs:
                if id(fn) not in done:
                    done.add(id(fn))
                    try:
                        atheris.instrument_func(fn)
                    except Exception:
                        pass


def atheris_child(atheris: Any, root: str, libfuzzer_args: list[str], args: argparse.Namespace) -> None:
    """Runs under the parent's watch (see atheris_parent): libFuzzer exits the process
    without running Python's exit hooks, so the parent owns every file this makes."""
    harness = Harness(tolerate=() if args.strict else KNOWN_BUGS, oob=args.oob, parent=root)
    work = os.path.join(root, "corpus")
    os.makedirs(work, exist_ok=True)
    seeds = [frames for _, frames in harness.seeds()] + [split_frames(d) for _, d in load_corpus(args.corpus)]
    for i, frames in enumerate(seeds):
        with open(os.path.join(work, f"seed-{i:03d}"), "wb") as f:
            f.write(join_frames(frames))
    stats_path = os.path.join(root, "stats.json")
    next_write = [0.0]

    def write_stats() -> None:
        import json

        with open(stats_path + ".tmp", "w") as f:
            json.dump({"tolerated": harness.tolerated, "masked": harness.masked,
                       "pinned_until_gc": harness.pinned_until_gc}, f)
        os.replace(stats_path + ".tmp", stats_path)

    def test_one_input(data: bytes) -> None:
        now = time.monotonic()
        if now >= next_write[0]:
            next_write[0] = now + 1.0
            write_stats()
        harness.check(split_frames(data))

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return bytes(atheris.Mutate(data, max_size))
        return join_frames(mutate(rng, split_frames(data), seeds))[:max_size]

    have = {a.split("=", 1)[0] for a in libfuzzer_args}
    argv = [sys.argv[0], *libfuzzer_args]
    for flag, value in (("-timeout", max(1, int(args.timeout))), ("-rss_limit_mb", args.rss_limit_mb + 1024),
                        ("-artifact_prefix", os.path.abspath(args.crash_dir) + "/"), ("-max_len", MAX_INPUT),
                        ("-print_final_stats", 1)):
        if flag not in have:
            argv.append(f"{flag}={value}")
    argv.append(work)
    os.makedirs(args.crash_dir, exist_ok=True)
    write_stats()
    _instrument_cascada(atheris)
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()  # never returns


def atheris_parent(args: argparse.Namespace, libfuzzer_args: list[str]) -> int:
    """Run libFuzzer in a child process, echo its output, then clean up and sum up."""
    import json
    import subprocess

    if args.seconds is not None and not any(a.startswith("-max_total_time=") for a in libfuzzer_args):
        libfuzzer_args = [*libfuzzer_args, f"-max_total_time={max(1, int(args.seconds))}"]
    elif not any(a.startswith(("-max_total_time=", "-runs=")) for a in libfuzzer_args):
        libfuzzer_args = [*libfuzzer_args, "-max_total_time=60"]
    os.makedirs(args.crash_dir, exist_ok=True)
    before = set(os.listdir(args.crash_dir))
    root = tempfile.mkdtemp(prefix="fuzz-decode-")
    cmd = [sys.executable, os.path.abspath(__file__), "--child-root", root, "--crash-dir", args.crash_dir,
           "--timeout", str(args.timeout), "--rss-limit-mb", str(args.rss_limit_mb), "--oob", args.oob,
           "--corpus", args.corpus, *(["--strict"] if args.strict else []), *libfuzzer_args]
    final: dict[str, str] = {}
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            m = re.match(r"#\d+\s+DONE .*corp: (\d+)/", line) or re.match(r"Done \d+ runs in (\d+) second", line)
            if m is not None:
                final["corp" if "DONE" in line else "seconds"] = m.group(1)
            if line.startswith("stat::"):
                key, _, value = line[len("stat::"):].partition(":")
                final[key.strip()] = value.strip()
        rc = proc.wait()
        elapsed = time.monotonic() - t0
        corpus = len(os.listdir(os.path.join(root, "corpus"))) if os.path.isdir(os.path.join(root, "corpus")) else 0
        try:
            with open(os.path.join(root, "stats.json")) as f:
                extra = json.load(f)
        except (OSError, ValueError):
            extra = {}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    crashes = sorted(os.path.join(args.crash_dir, c) for c in set(os.listdir(args.crash_dir)) - before)
    stats = {"execs": int(final.get("number_of_executed_units", 0)), "elapsed": float(final.get("seconds", elapsed)),
             "wall": elapsed, "corpus": f"{final.get('corp', '?')} units ({corpus} files written)",
             "crashes": crashes, "execs_per_s": final.get("average_exec_per_sec", "?"),
             "peak_rss_mb": final.get("peak_rss_mb", "?"), **extra}
    print_summary("atheris", stats, args.crash_dir, () if args.strict else KNOWN_BUGS)
    print(f"libFuzzer exit status {rc}", flush=True)
    return 0 if rc == 0 and not crashes else 1


def replay(harness: Harness, paths: list[str]) -> int:
    bad = 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            sig = harness.check(split_frames(data))
            print(f"{path}: ok ({sig})")
        except FuzzFailure as exc:
            bad += 1
            print(f"{path}: FAILED")
            traceback.print_exception(exc)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Arguments starting with a single dash (-max_total_time=N, -jobs=N, ...) "
                                       "go to libFuzzer under the atheris engine.")
    p.add_argument("--engine", choices=("auto", "atheris", "builtin"), default="auto")
    p.add_argument("--seconds", type=float, default=None, help="run this long (default 60)")
    p.add_argument("--seed", type=int, default=None, help="builtin engine's random seed (default: random)")
    p.add_argument("--corpus", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                     "fuzz_corpus"), help="seed inputs (default tests/fuzz_corpus)")
    p.add_argument("--crash-dir", default="fuzz-crashes", help="where failing inputs go (default ./fuzz-crashes)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds one input may take (a hang)")
    p.add_argument("--rss-limit-mb", type=int, default=512, help="peak RSS growth over the warm baseline "
                   "that counts as a memory failure (builtin); atheris gets this plus 1024 as -rss_limit_mb")
    p.add_argument("--strict", action="store_true", help="fail on known (reported) bugs too")
    p.add_argument("--oob", choices=OOB_MODES, default="mixed", help="how out-of-band frames reach the "
                   "decoder: zmq.Frame, bytes, misaligned views (as zmq gives small frames), or each in turn")
    p.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs once and report")
    p.add_argument("--write-seeds", metavar="DIR", help="write the generated seed messages to DIR and exit")
    p.add_argument("--child-root", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("-") and not a.startswith("--"))]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")

    atheris: Any = None
    if args.engine in ("auto", "atheris") and not (args.replay or args.write_seeds):
        try:
            import atheris  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ImportError:
            if args.engine == "atheris":
                p.error("atheris is not installed (pip install atheris)")
    if atheris is not None and args.child_root:
        atheris_child(atheris, args.child_root, rest, args)
        return 0
    if atheris is not None:
        return atheris_parent(args, rest)

    seconds = args.seconds
    for a in rest:
        if a.startswith("-max_total_time=") and seconds is None:
            seconds = float(a.split("=", 1)[1])
    seconds = 60.0 if seconds is None else seconds
    if args.child_root:
        return builtin_child(args.child_root, argparse.Namespace(**{**vars(args), "seconds": seconds}))
    if not (args.replay or args.write_seeds):
        return builtin_parent(args, seconds)
    harness = Harness(tolerate=() if args.strict else KNOWN_BUGS, oob=args.oob)
    try:
        if args.write_seeds:
            os.makedirs(args.write_seeds, exist_ok=True)
            for name, frames in harness.seeds():
                with open(os.path.join(args.write_seeds, f"seed-{name}.bin"), "wb") as f:
                    f.write(join_frames(frames))
            print(f"wrote {len(harness.seeds())} seeds to {args.write_seeds}")
            return 0
        return replay(harness, args.replay)
    finally:
        harness.close()


if __name__ == "__main__":
    sys.exit(main())
