"""The system's side of the forkserver: start it, ask it to fork actors, hear their exits."""

from __future__ import annotations

import asyncio
import importlib.machinery
import io
import os
import socket
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from ..transport._errors import ConfigurationError, SerializationError
from . import _frames
from ._errors import SystemClosed
from ._tasks import TaskSet


def _importable_in_child(module: types.ModuleType) -> bool:
    """Can a fresh interpreter with our sys.path import this module by name, to the same file?

    Classes from ``__main__``, notebooks and test modules loaded by path (pytest's importlib
    mode) cannot be; those travel by value instead."""
    name = module.__name__
    if name == "__main__":
        return False
    if name == "cascada" or name.startswith("cascada."):
        return True  # the installed package: its subpackages live in other folders (package-dir)
    if name in sys.builtin_module_names:
        return True
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.exists(origin):
        return False
    parts = name.split(".")
    search: Sequence[str] | None = sys.path
    found = None
    for i in range(len(parts)):
        found = importlib.machinery.PathFinder.find_spec(parts[i], search)
        if found is None:
            return False
        search = found.submodule_search_locations
        if i < len(parts) - 1 and search is None:
            return False
    return found is not None and found.origin is not None and os.path.realpath(found.origin) == os.path.realpath(origin)


class _SpecPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """Sends by value every class and function whose module the child could not import by
    name (a test module, a helper beside the user's script), and by reference the rest."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.registered: list[types.ModuleType] = []
        self._checked: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)):
            name = getattr(obj, "__module__", None)
            if isinstance(name, str) and name not in self._checked:
                self._checked.add(name)
                module = sys.modules.get(name)
                if module is not None and name != "__main__" and not _importable_in_child(module):
                    cloudpickle.register_pickle_by_value(module)
                    self.registered.append(module)
        return super().reducer_override(obj)


def pickle_spec(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle (class, args, kwargs) for the trusted spawn channel."""
    buf = io.BytesIO()
    pickler = _SpecPickler(buf)
    try:
        pickler.dump((cls, args, kwargs))
        return buf.getvalue()
    except Exception as exc:
        raise SerializationError(
            f"cannot send the class or constructor arguments of {cls.__qualname__} to its process: {exc}"
        ) from exc
    finally:
        for module in pickler.registered:
            cloudpickle.unregister_pickle_by_value(module)


class Spawner:
    """One forkserver per system, started on the first process spawn."""

    def __init__(self, preload: Sequence[str], on_exit: Callable[[int, int], None]) -> None:
        self._preload = list(preload)
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._spawned: dict[str, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._tasks = TaskSet("forkserver reader")
        self._lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self.pid: int | None = None

    async def ensure_started(self) -> None:
        async with self._lock:
            if self._started:
                return
            if self._closed:
                raise SystemClosed("the system is closing; no more actors can be spawned")
            await self._start()
            self._started = True

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c",
                "import sys; from cascada.actors._forkserver import main; main(int(sys.argv[1]))",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.pid = self._proc.pid
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._writer.write(_frames.pack({"sys_path": sys.path, "preload": self._preload}))
        hello = await self._read()
        if hello is None or hello[0] != "hello":
            raise ConfigurationError("the forkserver did not start; see its output above")
        failures = hello[2]
        if failures:
            await self.close()
            detail = "; ".join(f"{m}: {e}" for m, e in failures.items())
            raise ConfigurationError(f"preload failed in the forkserver: {detail}")
        self._tasks.spawn(self._read_loop(), name="forkserver reader")

    async def _read(self) -> Any | None:
        assert self._reader is not None
        try:
            head = await self._reader.readexactly(_frames.HEADER.size)
            (n,) = _frames.HEADER.unpack(head)
            return _frames.unpack_body(await self._reader.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def _read_loop(self) -> None:
        while True:
            msg = await self._read()
            if msg is None:
                break
            if msg[0] == "spawned":
                fut = self._spawned.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[2])
            elif msg[0] == "exited":
                pid, code = msg[1], msg[2]
                fut = self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
                if not fut.done():
                    fut.set_result(code)
                self._on_exit(pid, code)
        # The forkserver is gone: every actor it forked died with it.
        for fut in self._spawned.values():
            if not fut.done():
                fut.set_exception(SystemClosed("the forkserver exited"))
        for pid, fut in self._exits.items():
            if not fut.done():
                fut.set_result(-9)
                self._on_exit(pid, -9)

    async def spawn(self, token: str, header: dict[str, Any], blob: bytes) -> int:
        await self.ensure_started()
        assert self._writer is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._spawned[token] = fut
        self._writer.write(_frames.pack(["spawn", token, header, blob]))
        await self._writer.drain()
        pid = await fut
        self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
        return pid

    def exit_future(self, pid: int) -> asyncio.Future[int]:
        return self._exits.setdefault(pid, asyncio.get_running_loop().create_future())

    def forget(self, pid: int) -> None:
        self._exits.pop(pid, None)

    async def close(self, timeout: float = 5.0) -> None:
        """EOF on the socketpair: the forkserver kills what is left and exits."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass  # the forkserver already left
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), timeout)
            except asyncio.TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        await self._tasks.aclose()
