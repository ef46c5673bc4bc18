"""cascada's error vocabulary, in one place.

::

    CascadaError                      base of everything cascada raises on purpose
    ├── ConfigurationError (ValueError)   bad argument or setting; nothing was started
    ├── SerializationError (TypeError)    a value cannot travel; nothing was sent
    ├── ProtocolError                     a frame broke the wire format or a limit
    ├── EndpointConflict                  another process holds (or would be bound over) an
    │                                     actor's ipc path; nothing was sent to it
    ├── DeadlineExceeded (TimeoutError)   the deadline passed; the work may have run
    │   └── Overloaded                    ... while the call waited for room in a full mailbox
    │                                     or transport: it did not run (safe to retry)
    ├── TransportClosed                   a socket or node was used after close
    ├── SystemClosed                      the ActorSystem is closed or was never entered
    ├── ActorNotFound (LookupError)       no such actor, or no such public method on it
    ├── ActorInitFailed                   the constructor or on_start raised; nothing is left running
    ├── ActorDied                         the callee died or stopped while the call was pending;
    │                                     the work may have run (indeterminate)
    ├── TensorLost                        a tensor's owner died, or its lease expired, before
    │                                     the message that carried it ran; it did not run
    ├── PoolExhausted                     no room in the shared-memory pool before the deadline
    ├── HandleNotPortable                 a CUDA tensor addressed to another host, copying off
    ├── RestartIntensityExceeded          a supervisor restarted too often and escalated
    ├── WrongThread                       a ref used from a thread other than its loop's
    └── RemoteError                       the handler raised; carries the remote type, message
                                          and traceback text

Errors from libraries underneath (zmq, msgpack) are translated where they cross into
cascada, most specific first, with the original kept as ``__cause__``.
"""

from __future__ import annotations

from typing import Any

from ..transport._errors import (
    CascadaError,
    ConfigurationError,
    DeadlineExceeded,
    EndpointConflict,
    HandleNotPortable,
    PoolExhausted,
    ProtocolError,
    SerializationError,
    TensorLost,
    TransportClosed,
)

__all__ = [
    "ActorDied",
    "ActorInitFailed",
    "ActorNotFound",
    "CascadaError",
    "ConfigurationError",
    "DeadlineExceeded",
    "EndpointConflict",
    "HandleNotPortable",
    "PoolExhausted",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "RestartIntensityExceeded",
    "SerializationError",
    "SystemClosed",
    "TensorLost",
    "TransportClosed",
    "WrongThread",
]


class SystemClosed(CascadaError):
    """Raised when an ActorSystem is used before ``async with`` entered it or after it closed,
    or when a ref is used in a process that runs no system."""


class ActorNotFound(CascadaError, LookupError):
    """Raised when a message names an actor that is not there, or a method that is not a
    public handler of the actor's class (names starting with ``_`` are never handlers)."""


class ActorDied(CascadaError):
    """Raised for every call pending on an actor whose process died (or that was stopped)
    before it replied. Delivery is at-most-once: the call may or may not have run, so the
    outcome is indeterminate; retry only what is safe to repeat."""

    def __init__(self, message: str, *, actor: str | None = None, exitcode: int | None = None):
        super().__init__(message)
        self.actor = actor
        self.exitcode = exitcode


class RemoteError(CascadaError):
    """Raised when the callee's handler raised. ``remote_type`` is the qualified name of the
    exception it raised, ``remote_traceback`` the formatted traceback from the callee's
    process. For local actors the original exception is also the ``__cause__``."""

    # The details of a typed error this process could not rebuild, passed on when it is
    # raised again (see _portable_errors).
    _remote_details: dict[str, Any] | None = None

    def __init__(
        self,
        message: str,
        *,
        remote_type: str,
        remote_traceback: str | None,
        actor: str | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        self.actor = actor
        self.method = method

    def __str__(self) -> str:
        where = f" in {self.actor}.{self.method}" if self.actor else ""
        text = f"{self.remote_type}{where}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class ActorInitFailed(CascadaError):
    """Raised by ``spawn`` when the actor's constructor or ``on_start`` raised, or its process
    exited before it was ready. The process and its socket file are gone when it is raised."""

    def __init__(self, message: str, *, actor: str, remote_traceback: str | None = None):
        super().__init__(message)
        self.actor = actor
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class RestartIntensityExceeded(CascadaError):
    """A supervisor saw more restarts than its intensity allows within its period. It stopped
    its children (in reverse start order) and escalated to its own supervisor; at the top,
    the children stay stopped and calls to them fail with ActorDied naming this error."""

    def __init__(self, message: str, *, supervisor: str, actor: str, count: int, period: float) -> None:
        super().__init__(message)
        self.supervisor = supervisor
        self.actor = actor
        self.count = count
        self.period = period


class Overloaded(DeadlineExceeded):
    """The callee's mailbox (or the way to it) stayed full until the call's deadline. The
    message did not run and will not (a receiver drops expired work unrun): it is safe to
    retry later. A DeadlineExceeded, so code that handles deadlines handles this too."""


class WrongThread(CascadaError):
    """A ref (or system) was used from a thread other than the one running its event loop.
    cascada's sockets belong to that loop; hand the call to it instead, e.g.
    ``asyncio.run_coroutine_threadsafe(ref.ask("m"), loop).result()``."""
