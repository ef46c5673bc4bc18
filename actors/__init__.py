"""cascada.actors: actors, refs, mailboxes, the system that spawns them. Knows nothing of
stages or models: it runs any actor."""

from ._actor import Actor, concurrent
from ._errors import (
    ActorDied,
    ActorInitFailed,
    ActorNotFound,
    CascadaError,
    ConfigurationError,
    DeadlineExceeded,
    ProtocolError,
    RemoteError,
    SerializationError,
    SystemClosed,
    TransportClosed,
)
from ._loop import run
from ._ref import ActorRef
from ._system import ActorSystem, Placement, Transport

__all__ = [
    "Actor",
    "ActorDied",
    "ActorInitFailed",
    "ActorNotFound",
    "ActorRef",
    "ActorSystem",
    "CascadaError",
    "ConfigurationError",
    "DeadlineExceeded",
    "Placement",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "SystemClosed",
    "Transport",
    "TransportClosed",
    "concurrent",
    "run",
]
