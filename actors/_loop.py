"""Running a coroutine on uvloop when it is installed."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed; ``CASCADA_LOOP=asyncio`` forces the standard loop (for
    debugging, and for comparing the two)."""
    if os.environ.get("CASCADA_LOOP") == "asyncio":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Like ``asyncio.run``, on uvloop where it is installed.

    Ctrl-C cancels the main task only, which then leaves its ``async with ActorSystem``
    normally (actors are stopped in order); the runtime's own tasks are cancelled after."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(coro)
    try:  # pragma: no cover - Python 3.10
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    return asyncio.run(coro)
