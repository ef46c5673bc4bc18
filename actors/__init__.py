"""cascada.actors: actors, refs, mailboxes, the system that spawns them. Knows nothing of
stages or models: it runs any actor."""

from ._actor import Actor, concurrent, idempotent
from ._context import Context, context, current_context
from ._errors import (
    ActorDied,
    ActorInitFailed,
    ActorNotFound,
    CascadaError,
    ConfigurationError,
    DeadlineExceeded,
    HandleNotPortable,
    Overloaded,
    PoolExhausted,
    ProtocolError,
    RemoteError,
    RestartIntensityExceeded,
    SerializationError,
    SystemClosed,
    TensorLost,
    TransportClosed,
)
from ._loop import run
from ._ref import ActorRef
from ._supervision import RestartType, Strategy, Supervisor
from ._system import ActorSystem, CudaCrossHost, OnExhausted, Placement, Transport
from ._tensor_api import TensorPath, empty, via

__all__ = [
    "Actor",
    "ActorDied",
    "ActorInitFailed",
    "ActorNotFound",
    "ActorRef",
    "ActorSystem",
    "CascadaError",
    "ConfigurationError",
    "Context",
    "CudaCrossHost",
    "DeadlineExceeded",
    "HandleNotPortable",
    "OnExhausted",
    "Overloaded",
    "Placement",
    "PoolExhausted",
    "ProtocolError",
    "RemoteError",
    "RestartIntensityExceeded",
    "RestartType",
    "SerializationError",
    "Strategy",
    "Supervisor",
    "SystemClosed",
    "TensorLost",
    "TensorPath",
    "Transport",
    "TransportClosed",
    "concurrent",
    "context",
    "current_context",
    "empty",
    "idempotent",
    "run",
    "via",
]
