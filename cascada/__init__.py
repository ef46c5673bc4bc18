"""cascada: an asyncio actor runtime for machine-learning cascades.

Every stage of a cascade (router, expert, decoder, verifier, or any user actor) is an actor
with isolated state, in its own process or beside others, talking msgpack over ZeroMQ.

    import cascada

    class Counter(cascada.Actor):
        async def on_start(self) -> None:
            self.n = 0
        async def add(self, k: int) -> int:
            self.n += k
            return self.n

    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Counter, placement="process")
        assert await ref.ask("add", 2) == 2
"""

from __future__ import annotations

from .actors import Actor as Actor
from .actors import ActorDied as ActorDied
from .actors import ActorInitFailed as ActorInitFailed
from .actors import ActorNotFound as ActorNotFound
from .actors import ActorRef as ActorRef
from .actors import ActorSystem as ActorSystem
from .actors import CascadaError as CascadaError
from .actors import ConfigurationError as ConfigurationError
from .actors import Context as Context
from .actors import CudaCrossHost as CudaCrossHost
from .actors import DeadlineExceeded as DeadlineExceeded
from .actors import HandleNotPortable as HandleNotPortable
from .actors import OnExhausted as OnExhausted
from .actors import Overloaded as Overloaded
from .actors import Placement as Placement
from .actors import PoolExhausted as PoolExhausted
from .actors import ProtocolError as ProtocolError
from .actors import RemoteError as RemoteError
from .actors import RestartIntensityExceeded as RestartIntensityExceeded
from .actors import RestartType as RestartType
from .actors import SerializationError as SerializationError
from .actors import Strategy as Strategy
from .actors import Supervisor as Supervisor
from .actors import SystemClosed as SystemClosed
from .actors import TensorLost as TensorLost
from .actors import TensorPath as TensorPath
from .actors import Transport as Transport
from .actors import TransportClosed as TransportClosed
from .actors import concurrent as concurrent
from .actors import context as context
from .actors import current_context as current_context
from .actors import empty as empty
from .actors import idempotent as idempotent
from .actors import run as run
from .actors import via as via

__version__ = "0.1.0"

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
