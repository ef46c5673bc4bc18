"""Errors raised below the actor layer.

The whole vocabulary, drawn as a tree, lives in ``cascada.actors._errors``; this module holds
the part the transport itself can raise, so that ``transport`` never imports ``actors``.
"""

from __future__ import annotations

from typing import Any

# Every CascadaError subclass by its wire name (``module.QualName``), so that an error a
# handler raised in another process can come back as its own type (see
# ``actors._portable_errors``). Filled as classes are defined; a later class of the same
# name replaces an earlier one.
ERROR_TYPES: dict[str, type[CascadaError]] = {}


def wire_name(t: type) -> str:
    """The name an exception type travels under: ``ValueError``, ``pkg.mod.MyError``."""
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class CascadaError(Exception):
    """Base of every error cascada raises on purpose. Catch this to catch them all.

    A CascadaError raised by a handler reaches the caller as its own type, in any process
    that has imported the class: its ``args`` and its public attributes that are
    msgpack-native (None, bool, int, float, str, bytes, lists and maps of those) travel with
    it. Subclass it for errors of your own that callers should catch by type; override
    ``__cascada_fields__`` and ``__cascada_rebuild__`` when the defaults do not fit. Other
    exceptions arrive as ``RemoteError``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ERROR_TYPES[wire_name(cls)] = cls

    def __cascada_fields__(self) -> dict[str, Any]:
        """The fields that travel with this error (checked and trimmed by the sender):
        by default every public instance attribute."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def __cascada_rebuild__(cls, args: list[Any], fields: dict[str, Any]) -> CascadaError:
        """This error again, from its ``args`` and fields, without calling ``__init__``
        (whose signature may differ from ``Exception``'s)."""
        exc = cls.__new__(cls)
        exc.args = tuple(args)
        for k, v in fields.items():
            setattr(exc, k, v)
        return exc


ERROR_TYPES[wire_name(CascadaError)] = CascadaError


class ConfigurationError(CascadaError, ValueError):
    """Raised at once when an argument or setting is invalid (a bad placement, an ipc path that
    is too long, a negative limit). Nothing has been started when it is raised."""


class ProtocolError(CascadaError):
    """Raised when a frame cannot be decoded or breaks a declared limit (bad msgpack, wrong
    field types, an oversize frame, an unknown ext code). The receiving process counts the
    frame, drops it and keeps serving."""


class EndpointConflict(CascadaError):
    """Raised when an ipc endpoint is not, or is no longer, the one a process meant: another
    process listens on the path it is about to bind (binding would silently take the path
    over), something that is not a socket sits there, or the listener behind a path is not
    the process a ref names (the path was taken over). Nothing was bound or sent."""


class SerializationError(CascadaError, TypeError):
    """Raised on the sending side when a value cannot travel: only msgpack-native data
    (None, bool, int, float, str, bytes, list, tuple, dict), actor refs and the tensor types
    may be sent. Nothing was sent when it is raised."""


class DeadlineExceeded(CascadaError, TimeoutError):
    """Raised when a call's deadline passes before its result arrives, or when a message is
    dequeued after its deadline (expired work is dropped, not computed). The work may or may
    not have run: the outcome is indeterminate."""


class TransportClosed(CascadaError):
    """Raised when a socket or node is used after it was closed."""


class TensorLost(CascadaError):
    """Raised when a tensor handed over by reference can no longer be used: its owner process
    died, or its lease expired before the message was delivered. The request that carried it
    did not run. Resend the data from a live producer."""


class PoolExhausted(CascadaError):
    """Raised when the shared-memory pool has no free segment for a tensor before the
    sender's deadline (with ``shm_on_exhausted="wait"``) or at once (``"error"``). Nothing
    was sent. Raise ``shm_pool_bytes``, release received tensors sooner, or choose
    ``shm_on_exhausted="inline"`` to fall back to zmq frames."""


class HandleNotPortable(CascadaError):
    """Raised when a CUDA tensor is addressed to a process on another host and the system
    was configured with ``cuda_cross_host="error"``: a CUDA IPC handle means nothing there.
    Move the tensor to the CPU first, or allow the host-staged copy (``"copy"``)."""
