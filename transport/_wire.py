"""The wire format: one msgpack header frame, then out-of-band payload frames.

Frame 0 is a msgpack array, positional for speed::

    [version, kind, corr, sender, target, method, deadline, body, opts, incarnation(, ctx(, key(, expect(, released))))]

- ``version`` is the format version (1). A receiver rejects versions it does not know.
- ``kind`` is a :class:`Kind`. ``corr`` is the correlation id, unique per sending connection.
- ``sender`` names the sending node, ``target`` the actor (None addresses the node itself,
  for control operations), ``method`` the handler or control operation.
- ``deadline`` is an absolute ``time.time()`` value or None. Expired work is not computed.
- ``body`` depends on the kind: ``[args, kwargs]`` for requests, the value for replies and
  stream items, ``[code, type, message, traceback, details]`` for errors.
- ``opts`` is a small int (the credit window of a stream, the credit granted).
- ``incarnation`` names the incarnation of the actor a reply comes from.
- ``ctx``, present only on requests that carry one, is the request context
  ``[trace_id, budget, depth, path]`` (see cascada's ``Context``): trace_id a string, budget
  a number or nil, depth an int, path an array of at most ``MAX_CTX_PATH`` actor names.
- ``key``, present only on requests that carry one, is an idempotency key (a string of at
  most 128 characters): a retried call carries the key of its first attempt, and a handler
  marked ``@cascada.idempotent`` answers a key it has seen from its reply cache.
- ``expect``, present only on requests whose sender knows it, names the incarnation of the
  actor the request is meant for (a string of at most 128 characters). A receiver hosting
  another incarnation refuses the request unrun (an ActorDied error reply) and the sender
  accepts a reply only from the incarnation it expected. Absent or nil: no check.
- ``released``, present only on a request, REPLY, ITEM or END that carries some, lists ids
  of leases (shared-memory and CUDA IPC tensors, see ``transport/TENSOR_LIFETIMES.md``)
  that the sender has let go of, issued by the process the message goes to: on a reply,
  leases of tensors that came in the requests it answers; on a request, of tensors that
  came in the answers the callee gave. They ride along instead of a message of their own
  (``lease.release``). At most ``MAX_RELEASED`` positive ints; the receiver releases them
  whatever becomes of the message itself (a late reply, a request refused).

A frame may also be a **batch**: the byte 0xC1 (which msgpack never uses, so a decoder that
predates batches rejects it loudly) followed by several headers back to back. Senders batch
the single-frame messages they send to one peer within one event-loop tick; a batch carries
no out-of-band frames.

Schema evolution follows msgspec's rule: new fields are appended with defaults, and a
receiver ignores fields past the ones it knows, so mixed versions talk.

Nothing is ever unpickled. Values other than msgpack's own travel as ext types whose codes
are allowlisted: a receiver rejects any other code. Every length limit given to the
unpacker is derived from the frame's own size (an array cannot have more elements than its
frame has bytes), so a 5-byte header cannot make the decoder allocate 10**8 slots.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgpack

from ._errors import ProtocolError, SerializationError

VERSION = 1


class Kind(enum.IntEnum):
    ASK = 1
    TELL = 2
    STREAM = 3
    REPLY = 4
    ERROR = 5
    ITEM = 6
    END = 7
    CREDIT = 8
    CANCEL = 9


REQUEST_KINDS = frozenset((Kind.ASK, Kind.TELL, Kind.STREAM))
_RELEASING_KINDS = frozenset((Kind.ASK, Kind.TELL, Kind.STREAM, Kind.REPLY, Kind.ITEM, Kind.END))
_KIND_BY_VALUE = {int(k): k for k in Kind}

# Nested ext values recurse through msgpack's C code, where Python's recursion limit does
# not guard the C stack: without a bound, a few KB of nested tuples would crash the process.
MAX_EXT_DEPTH = 64

# What decoding one header may allocate (measured on CPython 3.11). Every header byte
# becomes at most one Python object, and the dear ones are containers: an empty list or
# map costs ~75 bytes for one byte, a map of 1-5 entries ~232, one of 11-21 entries ~640.
# A scalar costs at most ~40 bytes for one byte (a small negative int, -32..-6: a 32-byte
# int and its 8-byte slot); a two-character str or an int8 ~20 for 2-3 bytes, a float ~4.
# So:
# - a header over max_header_bytes is refused before decoding;
# - a header over COUNT_CONTAINERS_ABOVE bytes is surveyed (_survey: bytes.translate
#   passes). If the bytes that could start an array or a map could count more than
#   max_containers, it is decoded with msgpack's list and map hooks, which count its
#   containers in units of about 80 bytes (an array 1, a map 3: a small dict's hash table)
#   against max_containers and refuse it past that. Either way the containers themselves
#   cost at most ~10 MiB at the default, whatever their shape. Smaller headers (every batch
#   frame among them) are decoded as they are, at no cost: they cannot allocate more than
#   ~80 x COUNT_CONTAINERS_ABOVE (~6.5 MiB) anyway;
# - scalars, and the elements of lists and maps (8-byte slots, ~50-byte dict entries), are
#   not counted: a header made of them costs up to ~42 x its size, measured as VmHWM
#   (~42 MiB at the 1 MiB default; 256 KiB keeps every header bomb under ~11 MiB);
# - a tuple ext nested in tuple exts holds a copy of the rest of the payload at each level:
#   the nested payloads over TUPLE_NESTING_FREE alive at once are capped at
#   TUPLE_NESTING_BYTES x the first one's size plus TUPLE_NESTING_SLACK (so tuples of modest
#   size nest as deep as MAX_EXT_DEPTH allows, whatever their shape); smaller ones hold
#   64 x 16 KiB at most, and the outermost tuple one copy of at most the header.
# Tensors travel out of band and count against none of this.
DEFAULT_MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_CONTAINERS = 1 << 17
COUNT_CONTAINERS_ABOVE = 80 << 10  # over every batch frame (<= 64 KiB + the marker)
TUPLE_NESTING_BYTES = 4
TUPLE_NESTING_SLACK = 1 << 20
TUPLE_NESTING_FREE = 16 << 10
# What one message's frames may hold together (the header and its out-of-band frames).
# libzmq receives a multipart message whole before the application sees any of it, and
# checks ZMQ_MAXMSGSIZE (max_frame_bytes) per frame only: this cap makes cascada refuse and
# drop such a message at once, but the transient peak is what libzmq accepted.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30

MAX_CTX_PATH = 256  # actor names a request context's path may hold
MAX_RELEASED = 4096  # lease ids one reply may carry back to their issuer

BATCH_MARKER = b"\xc1"
MAX_BATCH_DECODE = 4096  # messages in one batch frame a receiver accepts

# Ext codes. 1-15 belong to cascada; nothing else is accepted.
EXT_TUPLE = 1
EXT_REF = 2

# Error codes carried in ERROR bodies, mapped to exception types by the actor layer.
ERROR_CODES = frozenset(
    ("remote", "not_found", "deadline", "protocol", "serialization", "died", "init_failed", "closed",
     "tensor_lost", "pool_exhausted", "not_portable")
)

ExtEncoder = Callable[[Any, list[Any]], tuple[int, bytes]]
"""Turns a value into (ext code, payload); may append out-of-band frames to the list."""
ExtDecoder = Callable[[bytes, Sequence[Any]], Any]
"""Rebuilds a value from an ext payload and the message's out-of-band frames."""


class Envelope:
    """One decoded message. Plain attributes, no behaviour."""

    __slots__ = (
        "kind",
        "corr",
        "sender",
        "target",
        "method",
        "deadline",
        "body",
        "opts",
        "incarnation",
        "owners",
        "ctx",
        "key",
        "expect",
        "released",
        "ranges",
    )

    def __init__(
        self,
        kind: Kind,
        corr: int,
        sender: str | None,
        target: str | None,
        method: str | None,
        deadline: float | None,
        body: Any,
        opts: int | None = None,
        incarnation: str | None = None,
        ctx: list[Any] | None = None,
        key: str | None = None,
        expect: str | None = None,
        released: list[int] | None = None,
    ) -> None:
        self.kind = kind
        self.corr = corr
        self.sender = sender
        self.target = target
        self.method = method
        self.deadline = deadline
        self.body = body
        self.opts = opts
        self.incarnation = incarnation
        self.ctx = ctx
        self.key = key
        self.expect = expect  # on a request: the incarnation it is meant for (None: any)
        self.released = released  # on a reply: lease ids its receiver issued, now let go of
        # pids of the processes that own leased tensors in this message (shm, CUDA IPC):
        # if one has died by the time the message is handled, it fails with TensorLost.
        self.owners: list[int] | None = None
        # (address, nbytes) of the shm tensors it brought, as mapped here (set by the node).
        self.ranges: list[tuple[int, int]] | None = None

    def __repr__(self) -> str:
        return (
            f"Envelope({self.kind.name}, corr={self.corr}, sender={self.sender!r}, "
            f"target={self.target!r}, method={self.method!r})"
        )


class Limits:
    """Declared limits on what a receiver accepts."""

    __slots__ = ("max_header_bytes", "max_frames", "max_frame_bytes", "max_message_bytes", "max_containers")

    def __init__(
        self,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_frames: int = 1024,
        max_frame_bytes: int = 1 << 30,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_containers: int = DEFAULT_MAX_CONTAINERS,
    ) -> None:
        if min(max_header_bytes, max_frames, max_frame_bytes, max_message_bytes, max_containers) <= 0:
            raise SerializationError("wire limits must be positive")
        self.max_header_bytes = max_header_bytes
        self.max_frames = max_frames
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes  # all of a message's frames together
        self.max_containers = max_containers  # ~80-byte units of arrays and maps in a big header


class Codec:
    """Encodes and decodes envelopes. One per node; not re-entrant across threads."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        encoders: dict[type, ExtEncoder] | None = None,
        decoders: dict[int, ExtDecoder] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self._encoders: dict[type, ExtEncoder] = dict(encoders or {})
        self._decoders: dict[int, ExtDecoder] = dict(decoders or {})
        self._decoders.setdefault(EXT_TUPLE, self._decode_tuple)
        # strict_types sends tuples and subclasses through _default, so tuples survive the
        # trip and an IntEnum or a str subclass is narrowed on purpose, not by accident.
        self._packer = msgpack.Packer(default=self._default, strict_types=True, autoreset=True)
        self._oob: list[Any] = []
        self._frames: Sequence[Any] = ()
        self._depth = 0
        self.leased = False  # the last message encoded holds leased tensors: send it unbatched
        self.tensors: Any = None  # a TensorCodec, installed by install_tensors
        # Decoding a big header: container units left, and whether the hooks count them.
        self._left = 0
        self._counting = False
        self._nest_live = 0  # bytes of big nested tuple payloads alive now, and their cap
        self._nest_cap = 0

    def register(self, type_: type, encoder: ExtEncoder, code: int, decoder: ExtDecoder) -> None:
        """Teach the codec a new ext type (used by the actor and tensor layers)."""
        if not 1 <= code <= 127 or code == EXT_TUPLE:
            raise SerializationError(f"ext code {code} is reserved or out of range")
        self._encoders[type_] = encoder
        self._decoders[code] = decoder

    def install_tensors(self, tensors: Any) -> None:
        """Send and receive torch, numpy and cupy values through ``tensors`` (a TensorCodec)."""
        from ._tensors import EXT_TENSOR

        self.tensors = tensors
        self._decoders[EXT_TENSOR] = tensors.decode

    # -- encoding ------------------------------------------------------------------------

    def _default(self, obj: Any) -> Any:
        enc = self._encoders.get(type(obj))
        if enc is not None:
            code, data = enc(obj, self._oob)
            return msgpack.ExtType(code, data)
        if isinstance(obj, tuple):
            return msgpack.ExtType(EXT_TUPLE, self._pack_nested(list(obj)))
        # Subclasses of the native types are narrowed to them on purpose.
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, bytes):
            return bytes(obj)
        if isinstance(obj, dict):
            return dict(obj)
        if isinstance(obj, list):
            return list(obj)
        for type_, enc in self._encoders.items():
            if isinstance(obj, type_):
                code, data = enc(obj, self._oob)
                return msgpack.ExtType(code, data)
        if self.tensors is not None:
            found = self.tensors.encode(obj, self._oob)
            if found is not None:
                # Remember the exact type: the next tensor of it skips the checks above.
                self._encoders[type(obj)] = self.tensors.encode
                return msgpack.ExtType(*found)
        raise TypeError(
            f"cannot send a value of type {type(obj).__module__}.{type(obj).__qualname__}: "
            "send msgpack-native data (None, bool, int, float, str, bytes, list, tuple, dict), "
            "actor refs or tensors, or convert it first"
        )

    def _pack_nested(self, value: Any) -> bytes:
        # The outer packer is mid-pack; a nested value needs a packer of its own.
        if self._depth >= MAX_EXT_DEPTH:
            raise ValueError(f"tuples nested deeper than {MAX_EXT_DEPTH} levels")
        self._depth += 1
        try:
            packed: bytes = msgpack.packb(value, default=self._default, strict_types=True)
            return packed
        finally:
            self._depth -= 1

    def encode(
        self,
        kind: Kind,
        corr: int,
        sender: str | None,
        target: str | None,
        method: str | None,
        deadline: float | None,
        body: Any,
        opts: int | None = None,
        incarnation: str | None = None,
        ctx: list[Any] | None = None,
        key: str | None = None,
        expect: str | None = None,
        released: list[int] | None = None,
    ) -> list[Any]:
        """The frames of one message: the header, then any out-of-band buffers."""
        oob: list[Any] = []
        self._oob = oob
        try:
            if released is not None:
                head = self._packer.pack(
                    [VERSION, int(kind), corr, sender, target, method, deadline, body, opts, incarnation, ctx, key,
                     expect, released]
                )
            elif ctx is None and key is None and expect is None:
                head = self._packer.pack(
                    [VERSION, int(kind), corr, sender, target, method, deadline, body, opts, incarnation]
                )
            elif expect is not None:
                head = self._packer.pack(
                    [VERSION, int(kind), corr, sender, target, method, deadline, body, opts, incarnation, ctx, key,
                     expect]
                )
            elif key is None:
                head = self._packer.pack(
                    [VERSION, int(kind), corr, sender, target, method, deadline, body, opts, incarnation, ctx]
                )
            else:
                head = self._packer.pack(
                    [VERSION, int(kind), corr, sender, target, method, deadline, body, opts, incarnation, ctx, key]
                )
        except BaseException as exc:
            self._packer.reset()
            self._depth = 0
            if self.tensors is not None:
                self.tensors.abort()
            if isinstance(exc, (TypeError, ValueError, OverflowError, RecursionError)):
                raise SerializationError(f"{kind.name.lower()} {method or ''}: {exc}") from exc
            raise
        finally:
            self._oob = []
        tensors = self.tensors
        leased = self.leased = False
        if tensors is not None and tensors._issued:
            if len(head) > self.limits.max_header_bytes:
                tensors.abort()
            else:
                tensors._issued.clear()
                leased = self.leased = True
        if len(head) > self.limits.max_header_bytes:
            raise SerializationError(
                f"message header is {len(head)} bytes, over the {self.limits.max_header_bytes} "
                "byte limit: send large data as tensors or arrays, which travel out of band"
            )
        if oob:
            return [head, *oob]
        # A message with leased tensors (``self.leased``) must never be batched: if its
        # tensors are lost on the way, the receiver can answer exactly this message (a batch
        # is decoded as one unit). Its sender passes ``batchable=False`` to the socket. (Senders
        # before this added an empty frame instead; receivers still accept one.)
        return [head]

    # -- decoding ------------------------------------------------------------------------

    def _ext_hook(self, code: int, data: bytes) -> Any:
        dec = self._decoders.get(code)
        if dec is None:
            raise ProtocolError(f"ext code {code} is not on the allowlist")
        return dec(data, self._frames)

    def _unpack(self, data: bytes, **hooks: Any) -> Any:
        n = len(data)
        return msgpack.unpackb(
            data,
            ext_hook=self._ext_hook,
            strict_map_key=False,
            use_list=True,
            raw=False,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=n,
            **hooks,
        )

    def _unpack_counted(self, data: bytes) -> Any:
        """_unpack, counting containers against self._left (a big header: see
        COUNT_CONTAINERS_ABOVE). The hooks cost ~65 ns a container, so only big headers pay."""
        return self._unpack(data, list_hook=self._count_array, object_hook=self._count_map)

    def _count_array(self, value: list[Any]) -> list[Any]:
        self._left -= 1
        if self._left < 0:
            self._over_containers()
        return value

    def _count_map(self, value: dict[Any, Any]) -> dict[Any, Any]:
        self._left -= 3  # a small dict's table: ~232 bytes (its entries count as elements)
        if self._left < 0:
            self._over_containers()
        return value

    def _over_containers(self) -> None:
        raise ProtocolError(
            f"header holds more arrays and maps than the limit of {self.limits.max_containers} units "
            "(an array counts 1, a map 3): send bulk data as tensors, or raise max_header_containers"
        )

    def _decode_tuple(self, data: bytes, frames: Sequence[Any]) -> tuple[Any, ...]:
        depth = self._depth
        if depth >= MAX_EXT_DEPTH:
            raise ProtocolError(f"ext values nested deeper than {MAX_EXT_DEPTH} levels")
        if depth and len(data) > TUPLE_NESTING_FREE:  # the outermost copy is the header's own
            return self._decode_big_tuple(data, len(data))
        self._depth = depth + 1
        try:
            value = self._unpack_counted(data) if self._counting else self._unpack(data)
        finally:
            self._depth = depth
        if type(value) is not list:
            raise ProtocolError("tuple ext does not hold an array")
        return tuple(value)

    def _decode_big_tuple(self, data: bytes, n: int) -> tuple[Any, ...]:
        # msgpack hands each ext payload over as a fresh copy, and a nested tuple's payload is
        # the rest of its parent's: unchecked, 64 levels of a 1 MiB header hold 64 MiB. The
        # big nested payloads alive at once are capped (smaller ones hold at most 64 x 16 KiB,
        # the outermost one at most the header's size).
        live = self._nest_live
        if live == 0:
            self._nest_cap = TUPLE_NESTING_BYTES * n + TUPLE_NESTING_SLACK
        elif live + n > self._nest_cap:
            raise ProtocolError(f"tuple exts nested {self._depth + 1} deep hold more than {TUPLE_NESTING_BYTES}x "
                                "the outermost one's bytes + 1 MiB")
        self._nest_live = live + n
        self._depth += 1
        try:
            value = self._unpack_counted(data) if self._counting else self._unpack(data)
        finally:
            self._depth -= 1
            self._nest_live -= n
        if type(value) is not list:
            raise ProtocolError("tuple ext does not hold an array")
        return tuple(value)

    def decode(self, frames: Sequence[Any], start: int = 0) -> Envelope:
        """Decode and validate one message whose header is ``frames[start]``; anything wrong
        raises ProtocolError."""
        limits = self.limits
        count = len(frames) - start
        if count <= 0:
            raise ProtocolError("empty message")
        if count > limits.max_frames:
            raise ProtocolError(f"{count} frames, over the limit of {limits.max_frames}")
        head = frames[start]
        size = len(head)
        if size > limits.max_header_bytes:
            raise ProtocolError(
                f"header frame of {size} bytes, over the limit of {limits.max_header_bytes}"
            )
        if count > 1 or size > COUNT_CONTAINERS_ABOVE:
            return self._decode_guarded(frames, start, count, head, size)
        # The common case, a small header alone: nothing to count, no frames to account for.
        self._frames = ()
        tensors = self.tensors
        if tensors is not None:
            tensors.owners.clear()
            tensors.ranges.clear()
        try:
            h = self._unpack(head)
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack raises a zoo: FormatError, StackError, ValueError...
            if tensors is not None and isinstance(exc, tensors.passthrough):
                raise
            raise ProtocolError(f"undecodable header: {type(exc).__name__}: {exc}") from exc
        finally:
            self._frames = ()
            self._depth = 0
            owners = tensors.take_owners() if tensors is not None and tensors.owners else None
        if _TIMESTAMP_HINTS[0] in head or _TIMESTAMP_HINTS[1] in head or _TIMESTAMP_HINTS[2] in head:
            _refuse_timestamps(h, 0)
        env = _validate(h)
        env.owners = owners
        return env

    def _decode_guarded(self, frames: Sequence[Any], start: int, count: int, head: Any, size: int) -> Envelope:
        """decode, for a message with out-of-band frames or a big header: the frames are
        capped in total and must each be referenced (see _FrameTable); a big header is
        surveyed, and decoded counting its containers when it could hold many (R21)."""
        limits = self.limits
        table = None
        if count > 1:
            oob = frames[start + 1 :]
            total = size + sum(map(len, oob))
            if total > limits.max_message_bytes:
                raise ProtocolError(
                    f"message of {total} bytes in {count} frames, over the limit of {limits.max_message_bytes}"
                )
            table = _FrameTable(oob)
            self._frames = cast("Sequence[Any]", table)
        big = size > COUNT_CONTAINERS_ABOVE
        counting = hinted = False
        if big:
            counting, hinted = _survey(head, limits.max_containers)
            if counting:
                self._left = limits.max_containers
                self._counting = True
        tensors = self.tensors
        if tensors is not None:
            tensors.owners.clear()
            tensors.ranges.clear()
        try:
            h = self._unpack_counted(head) if counting else self._unpack(head)
        except ProtocolError:
            raise
        except Exception as exc:  # as in decode
            if tensors is not None and isinstance(exc, tensors.passthrough):
                raise
            raise ProtocolError(f"undecodable header: {type(exc).__name__}: {exc}") from exc
        finally:
            self._frames = ()
            self._depth = 0
            self._counting = False
            owners = tensors.take_owners() if tensors is not None and tensors.owners else None
        if table is not None and len(table.used) != count - 1:
            table.check()
        if big:
            if hinted:
                _refuse_timestamps(h, 0)
        elif _TIMESTAMP_HINTS[0] in head or _TIMESTAMP_HINTS[1] in head or _TIMESTAMP_HINTS[2] in head:
            _refuse_timestamps(h, 0)
        env = _validate(h)
        env.owners = owners
        return env

    def decode_all(self, frames: Sequence[Any], start: int = 0) -> tuple[list[Envelope], Exception | None]:
        """Every message in ``frames[start:]``: one, or several when the header is a batch.
        Returns the messages decoded and, if the batch went bad part way, the error that
        ended it (the messages before it are good and are still delivered)."""
        head = frames[start] if len(frames) > start else b""
        if head[:1] != BATCH_MARKER:
            return [self.decode(frames, start)], None
        if len(frames) - start != 1:
            raise ProtocolError("a batch frame carries no out-of-band frames")
        n = len(head)
        if n > self.limits.max_header_bytes:
            raise ProtocolError(f"batch frame of {n} bytes, over the limit of {self.limits.max_header_bytes}")
        if n > COUNT_CONTAINERS_ABOVE:  # never a batch a cascada sender made (<= 64 KiB)
            counting, hinted = _survey(head, self.limits.max_containers)
        else:
            counting, hinted = False, any(hint in head for hint in _TIMESTAMP_HINTS)
        if counting:
            self._left = self.limits.max_containers
            self._counting = True
            unpacker = msgpack.Unpacker(
                ext_hook=self._ext_hook, list_hook=self._count_array, object_hook=self._count_map,
                strict_map_key=False, use_list=True, raw=False, max_buffer_size=n, max_str_len=n,
                max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=n,
            )
        else:
            unpacker = msgpack.Unpacker(
                ext_hook=self._ext_hook, strict_map_key=False, use_list=True, raw=False,
                max_buffer_size=n, max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=n,
            )
        unpacker.feed(memoryview(head)[1:])
        out: list[Envelope] = []
        self._frames = ()
        tensors = self.tensors
        if tensors is not None:
            tensors.owners.clear()
            tensors.ranges.clear()
        end = 0
        try:
            for h in unpacker:
                end = unpacker.tell()  # after the last whole message (tell() runs ahead at a cut one)
                if hinted:
                    _refuse_timestamps(h, 0)
                env = _validate(h)
                if tensors is not None and tensors.owners:
                    env.owners = tensors.take_owners()
                out.append(env)
                if len(out) > MAX_BATCH_DECODE:
                    raise ProtocolError(f"batch of more than {MAX_BATCH_DECODE} messages")
            if end < n - 1:
                # The unpacker stops quietly at a truncated last message: report it, so it is
                # counted (and its sender does not just wait).
                raise ProtocolError(f"batch frame ends in a truncated message ({n - 1 - end} bytes left)")
        except ProtocolError as exc:
            return out, exc
        except Exception as exc:  # msgpack's own errors, as in decode
            if tensors is not None and isinstance(exc, tensors.passthrough):
                return out, exc
            return out, ProtocolError(f"undecodable message in a batch: {type(exc).__name__}: {exc}")
        finally:
            self._depth = 0
            self._counting = False
            if tensors is not None:
                tensors.owners.clear()  # those of a message that failed part way
        if not out:
            raise ProtocolError("empty batch")
        return out, None


class _FrameTable:
    """The out-of-band frames of one message as ext decoders see them (``len`` and
    indexing). It remembers which frames a descriptor took: a frame that none refers to is
    refused, not held (a receiver would otherwise keep max_frames x max_frame_bytes of
    unreferenced data alive for as long as the message lives), and so is a frame two
    descriptors share (two tensors over one buffer). An empty frame may go unreferenced: a
    message whose tensors are all leased carries one, so that it is never batched."""

    __slots__ = ("frames", "used")

    def __init__(self, frames: Sequence[Any]) -> None:
        self.frames = frames
        self.used: set[int] = set()

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> Any:
        frame = self.frames[index]
        if index < 0:
            index += len(self.frames)
        if index in self.used:
            raise ProtocolError(f"out-of-band frame {index} is referenced twice")
        self.used.add(index)
        return frame

    def check(self) -> None:
        for i, frame in enumerate(self.frames):
            if i not in self.used and len(frame):
                raise ProtocolError(
                    f"out-of-band frame {i} of {len(self.frames)} ({len(frame)} bytes) is not referenced by any "
                    "descriptor in the header"
                )


# msgpack decodes its own timestamp ext (code -1) before any ext_hook sees it. Only the
# allowlisted codes may pass, so a header whose bytes could hold one (fixext4/8 or ext8
# with type -1) has its decoded value searched; strings never contain 0xff, so this is rare.
_TIMESTAMP_HINTS = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff")

# Bytes that may start an array or map (fixmap, fixarray, array16/32, map16/32), and those
# with the timestamp hints' bytes: what _survey keeps of a big header.
_CONTAINER_BYTES = frozenset(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF}
_NOT_CONTAINER = bytes(b for b in range(256) if b not in _CONTAINER_BYTES)
_NOT_MARK = bytes(b for b in range(256) if b not in _CONTAINER_BYTES and b not in b"".join(_TIMESTAMP_HINTS))


_NOT_MAP = bytes(b for b in range(256) if not (0x80 <= b <= 0x8F or b in (0xDE, 0xDF)))


def _survey(head: Any, max_containers: int) -> tuple[bool, bool]:
    """One pass over a big header (bytes.translate: ~0.2 ms for 200 KB, where counting with
    the hooks costs ~65-135 ns a container): whether it must be decoded counting its
    containers, and whether it may hold a timestamp ext. Every byte that could start an
    array or a map is charged what such a container counts (1 and 3, as _count_array and
    _count_map do): when that upper bound is within max_containers, the hooks could not
    refuse the header, and are skipped. Deleting bytes keeps adjacent kept bytes adjacent,
    so the hint test is a superset of the one on the whole header."""
    data = head if type(head) is bytes else bytes(head)
    marks = data.translate(None, _NOT_MARK)
    hinted = _TIMESTAMP_HINTS[0] in marks or _TIMESTAMP_HINTS[1] in marks or _TIMESTAMP_HINTS[2] in marks
    boxes = marks.translate(None, _NOT_CONTAINER)
    units = len(boxes)
    if units:
        units += 2 * len(boxes.translate(None, _NOT_MAP))
    return units > max_containers, hinted


def _refuse_timestamps(value: Any, depth: int) -> None:
    t = type(value)
    if t is msgpack.Timestamp:
        raise ProtocolError("ext code -1 (msgpack timestamp) is not on the allowlist")
    if depth > MAX_EXT_DEPTH + 64:
        return
    if t is list or t is tuple:
        for v in value:
            _refuse_timestamps(v, depth + 1)
    elif t is dict:
        for k, v in value.items():
            _refuse_timestamps(k, depth + 1)
            _refuse_timestamps(v, depth + 1)


def show(value: Any, limit: int = 80) -> str:
    """repr() of a value from the wire, cut short: error messages are logged and sent back,
    and must not grow with what a hostile peer put in the frame."""
    text = repr(value) if not isinstance(value, (list, dict)) else f"<{type(value).__name__} of {len(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_STR_OR_NONE = (str, type(None))
_NUMBER_OR_NONE = (float, int, type(None))


def _validate(h: Any) -> Envelope:
    # Exact type checks throughout (``type(x) in (...)``): bool is an int subclass and
    # must not pass for one, and isinstance would let subclasses in.
    if type(h) is not list or len(h) < 9:
        raise ProtocolError("header is not an array of at least 9 fields")
    version, kind, corr, sender, target, method, deadline, body, opts = h[:9]
    incarnation = h[9] if len(h) > 9 else None
    ctx = h[10] if len(h) > 10 else None
    key = h[11] if len(h) > 11 else None
    expect = h[12] if len(h) > 12 else None
    released = h[13] if len(h) > 13 else None
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"wire version {show(version)} is not supported (this side speaks {VERSION})")
    k = _KIND_BY_VALUE.get(kind) if type(kind) is int else None
    if k is None:
        raise ProtocolError(f"unknown message kind {show(kind)}")
    if type(corr) is not int or corr < 0:
        raise ProtocolError("correlation id is not a non-negative int")
    if (type(sender) not in _STR_OR_NONE or type(target) not in _STR_OR_NONE
            or type(method) not in _STR_OR_NONE or type(incarnation) not in _STR_OR_NONE):
        raise ProtocolError("sender, target, method and incarnation must be strings or nil")
    if type(deadline) not in _NUMBER_OR_NONE:
        raise ProtocolError("deadline must be a number or nil")
    if opts is not None and type(opts) is not int:
        raise ProtocolError("opts must be an int or nil")
    if ctx is not None:
        _check_ctx(ctx)
    if key is not None and not (type(key) is str and 0 < len(key) <= 128):
        raise ProtocolError("idempotency key must be a string of 1-128 characters or nil")
    if expect is not None and not (type(expect) is str and 0 < len(expect) <= 128):
        raise ProtocolError("expected incarnation must be a string of 1-128 characters or nil")
    if k in REQUEST_KINDS:
        if method is None:
            raise ProtocolError(f"{k.name} without a method")
        if type(body) is not list or len(body) != 2:
            raise ProtocolError("request body is not [args, kwargs]")
        args, kwargs = body
        if type(args) is not list:
            raise ProtocolError("request args are not an array")
        if kwargs is not None:
            if type(kwargs) is not dict or not all(type(key) is str for key in kwargs):
                raise ProtocolError("request kwargs are not a map with string keys")
    elif k is Kind.ERROR:
        if (
            type(body) is not list
            or len(body) != 5
            or type(body[0]) is not str
            or body[0] not in ERROR_CODES
            or not all(type(x) in _STR_OR_NONE for x in body[1:4])
            or not (body[4] is None or type(body[4]) is dict)
        ):
            raise ProtocolError("error body is not [code, type, message, traceback, details]")
    elif k is Kind.CREDIT:
        if opts is None or opts <= 0:
            raise ProtocolError("credit without a positive amount")
    if released is not None:
        _check_released(k, released)
    return Envelope(k, corr, sender, target, method, deadline, body, opts, incarnation, ctx, key, expect, released)


def _check_released(k: Kind, released: Any) -> None:
    if k not in _RELEASING_KINDS:
        raise ProtocolError(f"a {k.name} cannot carry released leases (only a request, reply, item or end)")
    if (type(released) is not list or not 0 < len(released) <= MAX_RELEASED
            or not all(type(i) is int and 0 < i < 1 << 63 for i in released)):
        raise ProtocolError(f"released leases must be 1-{MAX_RELEASED} positive ints")


def _check_ctx(ctx: Any) -> None:
    if (
        type(ctx) is not list
        or len(ctx) != 4
        or type(ctx[0]) is not str
        or not 0 < len(ctx[0]) <= 128
        or type(ctx[1]) not in _NUMBER_OR_NONE
        or type(ctx[2]) is not int
        or not 0 <= ctx[2] <= 1 << 20
        or type(ctx[3]) is not list
        or len(ctx[3]) > MAX_CTX_PATH
        or not all(type(name) is str and len(name) <= 128 for name in ctx[3])
    ):
        raise ProtocolError(
            f"request context is not [trace_id, budget, depth, path] with a path of at most {MAX_CTX_PATH} names"
        )


def error_body(
    code: str, type_name: str | None, message: str, traceback: str | None, details: dict[str, Any] | None = None
) -> list[Any]:
    assert code in ERROR_CODES, code
    return [code, type_name, message, traceback, details]
