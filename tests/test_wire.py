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
from cascada.transport._wire import MAX_RELEASED, error_body

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


class Blob:
    """A value that travels as an out-of-band frame, referenced by index (as tensors do)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def _blob_codec(**limits: Any) -> Codec:
    codec = Codec(Limits(**limits))

    def encode(blob: Blob, oob: list[Any]) -> tuple[int, bytes]:
        oob.append(blob.data)
        return 5, msgpack.packb(len(oob) - 1)

    def decode(data: bytes, frames: Any) -> bytes:
        index = msgpack.unpackb(data)
        if type(index) is not int or not 0 <= index < len(frames):
            raise ProtocolError("bad index")
        return bytes(frames[index])

    codec.register(Blob, encode, 5, decode)
    return codec


def test_out_of_band_frames_must_each_be_referenced() -> None:
    """R21 (b): a frame no descriptor refers to, or one two descriptors share, is refused;
    an empty one may go unreferenced (a message of leased tensors carries one)."""
    codec = _blob_codec()
    frames = request(codec, [Blob(b"a" * 100), Blob(b"b")])
    assert codec.decode(frames).body[0] == [b"a" * 100, b"b"]
    assert codec.decode([*frames, b""]).body[0] == [b"a" * 100, b"b"]
    with pytest.raises(ProtocolError, match="frame 2 of 3 .* not referenced"):
        codec.decode([*frames, b"x"])
    head_only = request(codec, [1])
    with pytest.raises(ProtocolError, match="not referenced"):
        codec.decode([*head_only, b"x" * (1 << 20)])
    assert codec.decode([*head_only, b""]).body[0] == [1]
    twice = codec.encode(Kind.ASK, 7, "s", "t", "m", None,
                         [[msgpack.ExtType(5, msgpack.packb(0)), msgpack.ExtType(5, msgpack.packb(0))], None])
    with pytest.raises(ProtocolError, match="referenced twice"):
        codec.decode([*twice, b"x"])
    # The codec is clean afterwards.
    assert codec.decode(frames).body[0] == [b"a" * 100, b"b"]


def test_total_message_bytes_limit() -> None:
    codec = _blob_codec(max_message_bytes=4096)
    assert codec.decode(request(codec, [Blob(b"x" * 3000)])).body[0] == [b"x" * 3000]
    with pytest.raises(ProtocolError, match=r"message of \d+ bytes in 3 frames, over the limit of 4096"):
        codec.decode(request(codec, [Blob(b"x" * 3000), Blob(b"y" * 3000)]))
    with pytest.raises(SerializationError):
        Limits(max_message_bytes=0)


def _peak(fn: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        try:
            out = fn()
        except ProtocolError as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _ask_around(body: bytes) -> bytes:
    return b"\x99\x01\x01\x09\xc0\xa6victim\xa4ping\xc0" + body + b"\xc0"


@pytest.mark.parametrize("token", [b"\x90", b"\x80", b"\x91\xc0", b"\x81\x00\xc0",
                                   b"\x85" + b"".join(bytes([i]) + b"\xc0" for i in range(5))])
def test_a_header_of_containers_decodes_in_bounded_memory(token: bytes) -> None:
    """R21 (f): at the default 1 MiB cap, a header of empty (or tiny: up to five entries)
    arrays or maps used to make ~75 MiB of objects; its containers are now counted and it
    is refused near 10 MiB. (Bigger maps cost like their entries: see the README.)"""
    from cascada.transport._wire import DEFAULT_MAX_HEADER_BYTES

    k = (DEFAULT_MAX_HEADER_BYTES - 64) // len(token)
    head = _ask_around(b"\xdd" + struct.pack(">I", k) + token * k)
    assert len(head) <= DEFAULT_MAX_HEADER_BYTES
    out, peak = _peak(lambda: Codec().decode([head]))
    assert isinstance(out, ProtocolError) and "arrays and maps" in str(out)
    assert peak < 12 << 20, f"peaked at {peak / 2**20:.1f} MiB"


def test_nested_tuples_hold_bounded_copies() -> None:
    """Each tuple ext level gets a fresh copy of the rest of the payload from msgpack: 64
    levels of a 1 MiB header held 64 MiB. At most 4x the outermost payload now."""
    size, heads = 1, []
    while size + 6 <= (1 << 20) - 64:
        h = (b"\xc7" + struct.pack(">B", size) if size < 256 else b"\xc8" + struct.pack(">H", size)
             if size < 65536 else b"\xc9" + struct.pack(">I", size)) + b"\x01"
        heads.append(h)
        size += len(h)
    head = _ask_around(b"\x92\x91" + b"".join(reversed(heads)) + b"\xc0" + b"\xc0")
    out, peak = _peak(lambda: Codec().decode([head]))
    assert isinstance(out, ProtocolError) and "nested" in str(out)
    assert peak < 8 << 20, f"peaked at {peak / 2**20:.1f} MiB"
    # Nesting a legitimate program makes still works, big or small.
    codec = Codec()
    value = (1, (2, (3, list(range(50_000)))), ("x" * 200_000,))
    assert codec.decode(request(codec, [value])).body[0] == [value]


def test_big_legitimate_payloads_still_decode() -> None:
    codec = Codec()
    for value in (list(range(100_000)), "x" * 900_000, [[i, i] for i in range(30_000)],
                  [{"a": i, "b": "x"} for i in range(20_000)], [b"y" * 100] * 5000):
        assert codec.decode(request(codec, [value])).body[0] == [value]
    # Past the container limit the refusal names the setting to raise.
    many = request(codec, [[[i] for i in range(40_000)]])
    with pytest.raises(ProtocolError, match="max_header_containers"):
        Codec(Limits(max_containers=30_000)).decode(many)
    assert Codec(Limits(max_containers=50_000)).decode(many).body[0][0][-1] == [39_999]
    # Small headers are never counted (they cannot hold enough to matter), nor are batches.
    small = request(codec, [[[i] for i in range(1000)]])
    assert Codec(Limits(max_containers=1)).decode(small).body[0][0][-1] == [999]


def test_big_headers_are_surveyed_for_timestamps_and_containers() -> None:
    """Headers over COUNT_CONTAINERS_ABOVE take the surveyed path: a timestamp ext is still
    refused there, and a hostile batch frame that big has its containers counted too."""
    from cascada.transport._wire import BATCH_MARKER, COUNT_CONTAINERS_ABOVE

    codec = Codec()
    for ts in (b"\xd6\xff\x00\x00\x00\x01", b"\xd7\xff" + b"\x00" * 8, b"\xc7\x0c\xff" + b"\x00" * 12):
        head = _ask_around(b"\x92\x92\xdb" + struct.pack(">I", 200_000) + b"x" * 200_000 + ts + b"\xc0")
        assert len(head) > COUNT_CONTAINERS_ABOVE
        with pytest.raises(ProtocolError, match="timestamp"):
            codec.decode([head])
    k = 200_000
    batch = BATCH_MARKER + _ask_around(b"\xdd" + struct.pack(">I", k) + b"\x90" * k)
    envs, err = codec.decode_all([batch])
    assert envs == [] and isinstance(err, ProtocolError) and "arrays and maps" in str(err)


def test_the_survey_never_skips_counting_a_header_the_hooks_would_refuse() -> None:
    """_survey lets a big header skip the counting hooks only when an upper bound of what
    they would count is within the limit: the result must never depend on which path ran."""
    import random

    from cascada.transport._wire import _survey

    rng = random.Random(21)

    def value(depth: int = 0) -> Any:
        r = rng.random()
        if depth > 3 or r < 0.4:
            return rng.choice([1, -20, "ab", 1.5, None, b"\x80\xde\xdf", 300, "\u00e9t\u00e9"])
        if r < 0.7:
            return [value(depth + 1) for _ in range(rng.randrange(0, 5))]
        return {str(i): value(depth + 1) for i in range(rng.randrange(0, 20))}

    for _ in range(200):
        limit = rng.choice([50, 200, 1000, 5000])
        codec = Codec(Limits(max_containers=limit))
        head = request(codec, [value() for _ in range(rng.randrange(1, 300))])[0]
        counting, _ = _survey(head, limit)
        codec._left, codec._counting = limit, True
        try:
            codec._unpack_counted(head)
        except ProtocolError:
            assert counting, "the survey skipped counting a header the hooks refuse"
        finally:
            codec._counting = False


def test_node_config_validates_the_new_limits() -> None:
    from cascada.actors._node import NodeConfig
    from cascada.transport import ConfigurationError

    config = NodeConfig()
    assert config.max_message_bytes == 1 << 30 and config.max_header_containers == 1 << 17
    assert NodeConfig.from_dict(NodeConfig(max_message_bytes=8 << 20, max_header_containers=10).to_dict()
                                ).max_header_containers == 10
    for bad in ({"max_message_bytes": 0}, {"max_message_bytes": 1.5}, {"max_header_containers": -1},
                {"max_message_bytes": 100_000}):
        with pytest.raises(ConfigurationError):
            NodeConfig(**bad)


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
    # Refused by depth (64) or, here first, by the copies its levels hold (see R21).
    with pytest.raises(ProtocolError, match=r"nested (deeper|\d+ deep)"):
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
    ok = ("x" * 10_000,)
    for _ in range(60):
        ok = (ok,)
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
    head = msgpack.packb([1, 2, 5, "s", "t", "m", None, [[1], None], None, "inc", None, "key", "want", None,
                          "a future field", 3])
    env = Codec().decode([head])
    assert env.body == [[1], None] and env.incarnation == "inc" and env.ctx is None
    assert env.key == "key" and env.expect == "want"


def test_a_request_stamped_with_the_incarnation_it_is_meant_for_round_trips() -> None:
    codec = Codec()
    env = codec.decode(codec.encode(Kind.ASK, 1, "s", "t", "m", None, [[], None], expect="inc-1"))
    assert env.expect == "inc-1" and env.ctx is None and env.key is None
    # Absent (an older sender): no expectation, and the header stays as short as before.
    plain = codec.encode(Kind.ASK, 1, "s", "t", "m", None, [[], None])
    assert codec.decode(plain).expect is None and len(msgpack.unpackb(plain[0])) == 10
    for bad in ("", "x" * 129, 7, True, ["inc"], b"inc"):
        head = msgpack.packb([1, 1, 5, "s", "t", "m", None, [[], None], None, None, None, None, bad])
        with pytest.raises(ProtocolError, match="expected incarnation"):
            codec.decode([head])


def test_released_leases_ride_on_requests_and_replies_and_nowhere_else() -> None:
    codec = Codec()
    for kind in (Kind.REPLY, Kind.ITEM, Kind.END):
        env = codec.decode(codec.encode(kind, 7, None, None, None, None, 1.5, released=[3, 1, 2]))
        assert env.released == [3, 1, 2] and env.body == 1.5 and env.kind is kind
    for kind in (Kind.ASK, Kind.TELL, Kind.STREAM):
        env = codec.decode(codec.encode(kind, 7, "s", "t", "m", None, [[1], None], ctx=["tr", None, 0, []],
                                        released=[9]))
        assert env.released == [9] and env.body == [[1], None] and env.ctx == ["tr", None, 0, []]
    plain = codec.encode(Kind.REPLY, 7, None, None, None, None, 1.5)
    assert codec.decode(plain).released is None and len(msgpack.unpackb(plain[0])) == 10
    for kind in (Kind.ERROR, Kind.CANCEL, Kind.CREDIT):
        body = ["remote", "E", "m", None, None] if kind is Kind.ERROR else None
        head = msgpack.packb([1, int(kind), 5, "s", "t", "m", None, body, 1, None, None, None, None, [1]])
        with pytest.raises(ProtocolError, match="cannot carry released leases"):
            codec.decode([head])
    for bad in ([], [0], [-1], [1.0], ["1"], [True], [1 << 63], 5, "x", {"a": 1}, [1] * (MAX_RELEASED + 1)):
        head = msgpack.packb([1, int(Kind.REPLY), 5, None, None, None, None, 1, None, None, None, None, None, bad])
        with pytest.raises(ProtocolError, match="released leases"):
            codec.decode([head])


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
