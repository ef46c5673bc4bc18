"""Decoding of zmq socket-monitor events, which tell us when a peer's connection drops."""

from __future__ import annotations

import struct
from typing import Any

import zmq

CONNECTED = zmq.EVENT_CONNECTED
DISCONNECTED = zmq.EVENT_DISCONNECTED
CONNECT_RETRIED = zmq.EVENT_CONNECT_RETRIED
CLOSED = zmq.EVENT_CLOSED
WATCHED = CONNECTED | DISCONNECTED | CONNECT_RETRIED

_HEAD = struct.Struct("=HI")


def parse(frames: list[Any]) -> tuple[int, int, str]:
    """(event, value, endpoint) from a monitor message."""
    event, value = _HEAD.unpack_from(frames[0])
    endpoint = bytes(frames[1]).decode("utf-8", "replace") if len(frames) > 1 else ""
    return event, value, endpoint
