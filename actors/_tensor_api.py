"""Tensor helpers of the public API: allocate in the shared-memory pool, choose a path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from ..transport._tensors import Via
from ._errors import SystemClosed
from ._ref import current_node

TensorPath = Literal["auto", "inline", "shm"]


def empty(shape: int | Sequence[int], dtype: Any = "float32", *, lib: Literal["torch", "numpy"] = "torch") -> Any:
    """A new, uninitialised tensor (``lib="numpy"``: array) whose memory is a segment of this
    process's shared-memory pool. Sending it to an actor in another process on this host
    hands the segment over without copying, in the same time whatever its size.

    The receiver sees the very same memory: write the data first, send it, and do not change
    it while a receiver may still be reading (as with torch.multiprocessing's shared tensors).
    So does every process it is passed on to: a receiver that sends it on while handling the
    request it came in (a flow passing its input to a stage) sends the same segment, without
    a copy, at every level. The segment returns to the pool when this tensor and every
    receiver's view are freed.
    Raises PoolExhausted when the pool has no room, SystemClosed outside a running system.
    """
    node = current_node.get(None)
    if node is None or node.closed:
        raise SystemClosed("cascada.empty needs a running ActorSystem (or an actor): the pool belongs to "
                           "the process's node")
    if lib not in ("torch", "numpy"):
        from ._errors import ConfigurationError

        raise ConfigurationError(f"lib must be 'torch' or 'numpy', got {lib!r}")
    return node.tensors.empty([shape] if isinstance(shape, int) else list(shape), dtype, lib)


def via(tensor: Any, path: TensorPath) -> Any:
    """Wrap a tensor to choose its path for one send: ``"inline"`` (a zmq frame), ``"shm"``
    (the shared-memory pool; this host only) or ``"auto"``. The receiver gets the tensor."""
    return Via(tensor, path)
