"""The deadline of the request being handled, for stages that plan around it (the dynamic
batcher flushes early for it)."""

from __future__ import annotations

from ..actors import current_context


def request_deadline(explicit: float | None = None) -> float | None:
    """The earlier of ``explicit`` (an absolute ``time.time()``) and the deadline of the
    request being handled (``cascada.current_context()``); None when neither is set."""
    ctx_deadline = current_context().deadline
    if ctx_deadline is not None and (explicit is None or ctx_deadline < explicit):
        return ctx_deadline
    return explicit
