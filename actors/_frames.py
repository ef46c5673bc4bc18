"""Length-prefixed msgpack frames for the forkserver's private socketpair."""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

_LEN = struct.Struct("!I")
MAX_FRAME = 1 << 30


def pack(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def read_blocking(sock: socket.socket) -> Any | None:
    """One frame, or None at EOF."""
    head = _read_exact(sock, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"forkserver frame of {n} bytes")
    body = _read_exact(sock, n)
    if body is None:
        return None
    return msgpack.unpackb(body, raw=False)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def unpack_body(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False)


HEADER = _LEN
