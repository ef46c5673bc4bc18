"""cascada.transport: envelopes and buffers between endpoints. Knows nothing of actors."""

from ._endpoints import IPC_PATH_MAX, IpcDirectory, check_endpoint, host_id, ipc_path
from ._errors import (
    CascadaError,
    ConfigurationError,
    DeadlineExceeded,
    ProtocolError,
    SerializationError,
    TransportClosed,
)
from ._socket import AsyncSocket, configure
from ._wire import VERSION, Codec, Envelope, Kind, Limits

__all__ = [
    "IPC_PATH_MAX",
    "VERSION",
    "AsyncSocket",
    "CascadaError",
    "Codec",
    "ConfigurationError",
    "DeadlineExceeded",
    "Envelope",
    "IpcDirectory",
    "Kind",
    "Limits",
    "ProtocolError",
    "SerializationError",
    "TransportClosed",
    "check_endpoint",
    "configure",
    "host_id",
    "ipc_path",
]
