"""The wire format on its own: round trips, limits, and hostile input (property tests)."""

from __future__ import annotations

import enum
import pathlib
import re
import struct
import time
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascada.transport import Codec, Kind, Limits, ProtocolError, SerializationError
from cascada.transport._wire import error_body

REPO = pathlib.Path(__file__).resolve().parent.parent


def request(codec: Codec, args: list[Any], kwargs: dict[str, Any] | None = None) -> list[Any]:
    return codec.encode(Kind.ASK, 7, "sender", "target", "method", 123.5, [args, kwargs])


def test_request_round_trip() -> None:
    codec = Codec()
    env = codec.decode(request(codec, [1, (2, (3,)), {"a": [b"x"]}], {"k": None}))
    assert (env.kind, env.corr, env.sender, env.target, env.method, env.deadline) == (
        Kind.ASK, 7, "sender", "target", "method", 123.5)
    assert env.body == [[1, (2, (3,)), {"a": [b"x"]}], {"k": None}]
    assert isinstance(env.body[0][1], tuple)


def test_every_kind_round_trips() -> None:
    codec = Codec()
    for kind, body, opts in [
        (Kind.TELL, [[1], None], None), (Kind.STREAM, [[], None], 8), (Kind.REPLY, {"v": 1}, None),
        (Kind.ITEM, 3, None), (Kind.END, None, None), (Kind.CREDIT, None, 4), (Kind.CANCEL, None, None),
        (Kind.ERROR, error_body("remote", "ValueError", "m", "tb"), None),
    ]:
        method = "m" if kind in (Kind.TELL, Kind.STREAM) else None
        env = codec.decode(codec.encode(kind, 1, None, None, method, None, body, opts))
        assert env.kind is kind and env.body == body and env.opts == opts


def test_subclasses_are_narrowed_on_purpose() -> None:
    class Color(enum.IntEnum):
        RED = 2

    class Name(str):
        pass

    codec = Codec()
    env = codec.decode(request(codec, [Color.RED, Name("n"), True]))
    assert env.body[0] == [2, "n", True]
    assert type(env.body[0][0]) is int and type(env.body[0][1]) is str and env.body[0][2] is True


def test_unsendable_values() -> None:
    codec = Codec()
    with pytest.raises(SerializationError, match="cannot send a value of type"):
        request(codec, [object()])
    with pytest.raises(SerializationError):
        request(codec, [2**70])
    # The codec is still usable after a failed encode.
    assert codec.decode(request(codec, [1])).body == [[1], None]


def test_header_size_limit_on_both_sides() -> None:
    small = Codec(Limits(max_header_bytes=1024))
    with pytest.raises(SerializationError, match="over the 1024 byte limit"):
        request(small, ["x" * 2000])
    frames = request(Codec(), ["x" * 2000])
    with pytest.raises(ProtocolError, match="over the limit"):
        small.decode(frames)


def test_frame_count_limit() -> None:
    codec = Codec(Limits(max_frames=3))
    with pytest.raises(ProtocolError, match="frames"):
        codec.decode(request(codec, [1]) + [b"a", b"b", b"c"])
    with pytest.raises(ProtocolError, match="empty"):
        codec.decode([])


@pytest.mark.parametrize("head", [
    b"\xdd" + struct.pack(">I", 100_000_000),          # array32 claiming 10^8 elements
    b"\xdf" + struct.pack(">I", 100_000_000),          # map32 claiming 10^8 pairs
    b"\xdb" + struct.pack(">I", 1_000_000_000),        # str32 claiming 1 GB
    b"\xc6" + struct.pack(">I", 1_000_000_000),        # bin32 claiming 1 GB
    b"\xc9" + struct.pack(">I", 1_000_000_000) + b"\x01",  # ext32 claiming 1 GB
])
def test_five_byte_bombs_allocate_nothing(head: bytes) -> None:
    codec = Codec()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ProtocolError):
            codec.decode([head])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 0.5
    assert peak < 1 << 20


def test_deep_nesting_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        Codec().decode([b"\x91" * 200_000 + b"\xc0"])
    nested_tuple = msgpack.packb(None)
    for _ in range(5000):
        nested_tuple = msgpack.packb(msgpack.ExtType(1, nested_tuple))
    with pytest.raises(ProtocolError, match="nested deeper"):
        Codec().decode([nested_tuple])
    deep: Any = ()
    for _ in range(5000):
        deep = (deep,)
    with pytest.raises(SerializationError, match="nested deeper"):
        request(Codec(), [deep])
    ok: Any = ()
    for _ in range(60):
        ok = (ok,)
    codec = Codec()
    assert codec.decode(request(codec, [ok])).body[0][0] == ok


@pytest.mark.parametrize("header", [
    [1, 1, 5, None, "t", None, None, [[1], None], None],            # request without a method
    [1, 1, 5, None, "t", "m", None, [[1]], None],                    # body not [args, kwargs]
    [1, 1, 5, None, "t", "m", None, [{"a": 1}, None], None],         # args not an array
    [1, 1, 5, None, "t", "m", None, [[1], {1: 2}], None],            # kwargs with a non-str key
    [1, 1, -5, None, "t", "m", None, [[1], None], None],             # negative corr
    [1, 1, 5, None, "t", "m", "soon", [[1], None], None],            # deadline not a number
    [1, 1, 5, None, "t", "m", None, [[1], None], "x"],               # opts not an int
    [1, 42, 5, None, "t", "m", None, [[1], None], None],             # unknown kind
    [True, 1, 5, None, "t", "m", None, [[1], None], None],           # version is a bool
    [1, 5, 5, None, None, None, None, [["x"], 1, 2, 3, 4], None],    # error code unhashable
    [1, 5, 5, None, None, None, None, ["nope", "T", "m", None, None], None],  # unknown error code
    [1, 8, 5, None, None, None, None, None, 0],                      # credit of zero
    [1, 1, 5],                                                       # too short
])
def test_hostile_headers(header: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        Codec().decode([msgpack.packb(header)])


def test_unknown_ext_code_is_refused() -> None:
    head = msgpack.packb([1, 1, 5, None, "t", "m", None, [[msgpack.ExtType(42, b"x")], None], None])
    with pytest.raises(ProtocolError, match="allowlist"):
        Codec().decode([head])


def test_newer_senders_may_append_fields() -> None:
    head = msgpack.packb([1, 2, 5, "s", "t", "m", None, [[1], None], None, "inc", None, "a future field", 3])
    env = Codec().decode([head])
    assert env.body == [[1], None] and env.incarnation == "inc" and env.ctx is None


def test_a_request_context_round_trips_and_bad_ones_are_refused() -> None:
    codec = Codec()
    ctx = ["trace", 2.5, 3, ["flow", "tier0", "expert"]]
    env = codec.decode(codec.encode(Kind.ASK, 1, "s", "t", "m", None, [[], None], ctx=ctx))
    assert env.ctx == ctx
    assert codec.decode(codec.encode(Kind.ASK, 1, "s", "t", "m", None, [[], None])).ctx is None
    for bad in ([], ["", None, 0, []], ["t", "budget", 0, []], ["t", None, -1, []], ["t", None, True, []],
                ["t", None, 0, ["x"] * 257], ["t", None, 0, [1]], ["t", None, 0, ["n" * 129]], "t"):
        head = msgpack.packb([1, 1, 5, "s", "t", "m", None, [[], None], None, None, bad])
        with pytest.raises(ProtocolError, match="request context"):
            codec.decode([head])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    try:
        Codec().decode([data])
    except ProtocolError:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(msgpack_values, st.integers(0, 2**32), st.one_of(st.none(), st.floats(0, 2e9)))
def test_valid_requests_round_trip(value: Any, corr: int, deadline: float | None) -> None:
    codec = Codec()
    env = codec.decode(codec.encode(Kind.ASK, corr, "s", "t", "m", deadline, [[value], None]))
    assert env.body[0][0] == value and env.corr == corr and env.deadline == deadline


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6), st.integers(0, 400))
def test_mutated_valid_frames_only_raise_protocol_error(noise: list[bytes], cut: int) -> None:
    codec = Codec()
    head = request(codec, [1, "two", (3,)])[0]
    mutated = head[: cut % (len(head) + 1)] + b"".join(noise)
    try:
        codec.decode([mutated])
    except ProtocolError:
        pass


def test_no_pickle_on_any_wire_path() -> None:
    """Static check: nothing that reads sockets may unpickle. The one allowed pickle.loads is
    the trusted spawn channel in the actor process's main."""
    sinks = re.compile(r"pickle\.loads|recv_pyobj|marshal\.loads|cloudpickle\.loads|torch\.load\(")
    allowed = {REPO / "actors" / "_child.py"}
    # The shipped model weights load through torch's restricted unpickler (weights_only=True):
    # files from our own package, never bytes from a socket.
    weights = REPO / "cascada" / "workloads" / "_weights.py"
    hits = []
    for package in ("cascada", "actors", "transport", "stages", "cudakernels"):
        for path in (REPO / package).rglob("*.py"):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if path == weights and "torch.load(" in line and "weights_only=True" in line:
                    continue
                if sinks.search(line) and path not in allowed:
                    hits.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert hits == []
    child = (REPO / "actors" / "_child.py").read_text()
    assert child.count("pickle.loads") == 1 and "trusted spawn channel" in child
