"""The errors the stage library adds to cascada's vocabulary.

::

    CascadaError
    ├── ConfigurationError (ValueError)   a stage was built with a bad argument (from cascada.actors)
    ├── StageInputError (ValueError)      a stage was handed an input it cannot use: wrong length or
    │   │                                 shape, NaN, a negative probability; nothing was computed
    │   └── RoutingError                  a router cannot decide on its input (unknown key, unknown
    │                                     edge in an override or a release)
    └── BatcherClosed                     the batcher was closed while the item waited; not computed

Inside an actor these reach the caller as ``RemoteError`` with ``remote_type`` naming them.
"""

from __future__ import annotations

from ..actors import CascadaError


class StageInputError(CascadaError, ValueError):
    """Raised when a stage is handed an input it cannot use (a score vector of the wrong
    length, NaN, negative probabilities, mismatched shapes). Nothing was computed."""


class RoutingError(StageInputError):
    """Raised when a router cannot decide on its input: a key with no mapping and no edges to
    hash onto, an override or a release naming an edge the router does not have."""


class BatcherClosed(CascadaError):
    """Raised for an item submitted to, or still waiting in, a DynamicBatcher that was
    closed. The item was not computed."""
