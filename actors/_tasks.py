"""An owner for background tasks: nothing is created and forgotten.

asyncio.TaskGroup cancels every sibling when one task fails, which is the wrong policy for
a runtime that hosts independent actors, and it needs Python 3.11. A TaskSet keeps a strong
reference to each task, routes each failure to a handler (so none ends as "Task exception
was never retrieved") and cancels and awaits what is left when it closes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("cascada")


class TaskSet:
    def __init__(
        self,
        name: str,
        on_error: Callable[[asyncio.Task[Any], BaseException], None] | None = None,
    ) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_error = on_error
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None,
              context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"task set {self._name} is closed")
        loop = asyncio.get_running_loop()
        if context is not None and sys.version_info >= (3, 11):  # create_task(context=) is 3.11+
            task = loop.create_task(coro, name=name, context=context)
        else:
            task = loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if self._on_error is not None:
            self._on_error(task, exc)
        else:
            log.error("task %s in %s failed", task.get_name(), self._name, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """Cancel every task still running and wait for all of them."""
        self._closed = True
        while self._tasks:
            # Take them out here rather than wait for their done-callbacks: gather over tasks
            # that are all finished may return without yielding to the loop (Python 3.13),
            # and then those callbacks would never get the chance to run.
            tasks = list(self._tasks)
            self._tasks.difference_update(tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
