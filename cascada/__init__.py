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
from .actors import EndpointConflict as EndpointConflict
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
from .actors import WrongThread as WrongThread
from .actors import concurrent as concurrent
from .actors import context as context
from .actors import current_context as current_context
from .actors import empty as empty
from .actors import idempotent as idempotent
from .actors import run as run
from .actors import BudgetExhausted as BudgetExhausted
from .actors import Cascade as Cascade
from .actors import FanOut as FanOut
from .actors import Flow as Flow
from .actors import FlowDepthExceeded as FlowDepthExceeded
from .actors import FlowError as FlowError
from .actors import InvalidDecision as InvalidDecision
from .actors import LoopUntil as LoopUntil
from .actors import Route as Route
from .actors import RoundLimitExceeded as RoundLimitExceeded
from .actors import SELF as SELF
from .actors import Sequential as Sequential
from .actors import StageFailed as StageFailed
from .actors import Step as Step
from .actors import ask_flow as ask_flow
from .actors import flow_error as flow_error
from .actors import stream_flow as stream_flow
from ._topology import Topology as Topology
from ._topology import build_topology as build_topology
from ._topology import load_topology as load_topology
from .actors import via as via

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "ActorDied",
    "ActorInitFailed",
    "ActorNotFound",
    "ActorRef",
    "ActorSystem",
    "BudgetExhausted",
    "CascadaError",
    "Cascade",
    "ConfigurationError",
    "Context",
    "CudaCrossHost",
    "DeadlineExceeded",
    "EndpointConflict",
    "FanOut",
    "Flow",
    "FlowDepthExceeded",
    "FlowError",
    "HandleNotPortable",
    "InvalidDecision",
    "LoopUntil",
    "OnExhausted",
    "Overloaded",
    "Placement",
    "PoolExhausted",
    "ProtocolError",
    "RemoteError",
    "RestartIntensityExceeded",
    "RestartType",
    "RoundLimitExceeded",
    "Route",
    "SELF",
    "Sequential",
    "SerializationError",
    "StageFailed",
    "Step",
    "Strategy",
    "Supervisor",
    "SystemClosed",
    "TensorLost",
    "TensorPath",
    "Topology",
    "Transport",
    "TransportClosed",
    "WrongThread",
    "ask_flow",
    "build_topology",
    "concurrent",
    "context",
    "current_context",
    "empty",
    "flow_error",
    "idempotent",
    "load_topology",
    "run",
    "stream_flow",
    "via",
]
