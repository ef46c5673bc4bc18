"""The main of an actor process, run in a child forked by the forkserver."""

from __future__ import annotations

import asyncio
import os
import pickle
import resource
import signal
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

from ..transport._endpoints import host_id
from ._actor import Actor
from ._cell import ActorCell
from ._errors import CascadaError, ConfigurationError
from ._heartbeat import send_beats
from ._loop import run
from ._messages import Message
from ._node import Node, NodeConfig
from ._ref import ActorRef, current_node

EXIT_MEMORY_ERROR = 87
"""Exit status of an actor process spawned with a memory limit (``rlimits`` with ``AS`` or
``DATA``) whose handler raised MemoryError: the process ends, as Erlang's ``max_heap_size``
kills a process, and its supervisor sees an abnormal exit whose reason says so."""

MEMORY_LIMITS = ("AS", "DATA")


def normalize_rlimits(rlimits: Mapping[str, int | tuple[int, int]] | None) -> dict[str, list[int]]:
    """Check ``spawn(..., rlimits=...)``: resource names (those of ``resource.RLIMIT_*``,
    with or without the prefix: ``"AS"``, ``"DATA"``, ``"NOFILE"``, ``"CPU"``) to a limit
    (soft and hard alike) or a ``(soft, hard)`` pair; ``resource.RLIM_INFINITY`` for none."""
    if rlimits is None:
        return {}
    if not isinstance(rlimits, Mapping):
        raise ConfigurationError(f"rlimits must be a mapping of resource names to limits, got {rlimits!r}")
    out: dict[str, list[int]] = {}
    for key, value in rlimits.items():
        name = key.upper().removeprefix("RLIMIT_") if isinstance(key, str) else ""
        if not name or not isinstance(getattr(resource, "RLIMIT_" + name, None), int):
            raise ConfigurationError(f"unknown resource limit {key!r}: use a name of resource.RLIMIT_*, "
                                     "such as 'AS', 'DATA', 'NOFILE' or 'CPU'")
        pair = (value, value) if isinstance(value, int) else value
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool)
                        and (v >= 0 or v == resource.RLIM_INFINITY) for v in pair)):
            raise ConfigurationError(f"rlimits[{key!r}] must be a limit or a (soft, hard) pair of "
                                     f"non-negative ints (or resource.RLIM_INFINITY), got {value!r}")
        soft, hard = int(pair[0]), int(pair[1])
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            raise ConfigurationError(f"rlimits[{key!r}]: the soft limit {soft} is above the hard limit {hard}")
        out[name] = [soft, hard]
    return out


def _cpu_list(path: str) -> set[int] | None:
    """A kernel CPU list file ("0-3,6") as a set; None where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read().strip()
        out: set[int] = set()
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
        return out or None
    except (OSError, ValueError):
        return None


def usable_cpus() -> set[int]:
    """The CPUs an actor process may be pinned to: those online, within this cgroup's
    cpuset where it has one. Not this thread's mask: a driver pinned to one CPU may still
    place an actor on another."""
    cpus = _cpu_list("/sys/devices/system/cpu/online") or set(range(os.cpu_count() or 1))
    cpuset = _cpu_list("/sys/fs/cgroup/cpuset.cpus.effective")
    return cpus & cpuset if cpuset else cpus


def normalize_cpus(cpus: Iterable[int] | None) -> list[int] | None:
    """Check ``spawn(..., cpus=...)``: CPU numbers the actor's process may run on, each one
    of ``usable_cpus()``. Returns them sorted, or None for no pinning."""
    if cpus is None:
        return None
    if isinstance(cpus, (str, bytes, int)) or not isinstance(cpus, Iterable):
        raise ConfigurationError(f"cpus must be a set of CPU numbers such as {{0}} or [0, 1], got {cpus!r}")
    chosen = list(cpus)
    if not chosen or not all(type(c) is int and c >= 0 for c in chosen):
        raise ConfigurationError(f"cpus must be a non-empty set of non-negative ints, got {cpus!r}")
    usable = usable_cpus()
    outside = sorted(set(chosen) - usable)
    if outside:
        raise ConfigurationError(f"cpus {outside} are not among this machine's usable CPUs "
                                 f"({sorted(usable)}): pick from those")
    return sorted(set(chosen))


def _pin_process(cpus: list[int]) -> None:
    """Every thread of this process (zmq's among them) onto ``cpus``; threads made later
    inherit the mask of the thread that makes them."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass  # the thread ended meanwhile


def _apply_rlimits(limits: dict[str, list[int]]) -> None:
    for name, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))


class _MemoryLimitedCell(ActorCell):
    """The cell of an actor process with a memory limit: a handler that runs out of memory
    ends the process (exit status EXIT_MEMORY_ERROR) instead of answering with the error and
    serving on at its limit. Its calls in flight then fail with ActorDied, like any death."""

    def _fail(self, msg: Message, exc: BaseException, code: str) -> None:
        if isinstance(exc, MemoryError):
            try:
                os.write(2, f"cascada: actor {self.name!r} ran out of memory in {msg.method} (MemoryError under "
                            f"its memory limit); its process exits\n".encode())
            except BaseException:  # noqa: BLE001 - no memory even for that: exit all the same
                pass
            os._exit(EXIT_MEMORY_ERROR)
        super()._fail(msg, exc, code)


def run_child(header: dict[str, Any], blob: bytes) -> int:
    return run(_serve(header, blob))


async def _serve(header: dict[str, Any], blob: bytes) -> int:
    name: str = header["name"]
    incarnation: str = header["incarnation"]
    node = Node(header["node_id"], header["endpoint"], NodeConfig.from_dict(header["config"]))
    node.incarnation = incarnation
    for moved_endpoint, moved_pid, moved_incarnation in header.get("moved") or ():
        if moved_endpoint != node.endpoint:  # actors restarted so far: refs to them reach the new ones
            node.update_peer(moved_endpoint, moved_pid, moved_incarnation)
    current_node.set(node)
    await node.start()
    heartbeat = header.get("heartbeat")
    if heartbeat is not None:
        # From this loop, so a loop that stops turning stops the beats too.
        node.tasks.spawn(send_beats(heartbeat[0], heartbeat[1]), name="heartbeat")
    parent = node.peer(header["parent"], header["parent_pid"], host_id())
    loop = asyncio.get_running_loop()
    exit_now = loop.create_future()
    cell: ActorCell | None = None

    async def stop(env: Any) -> None:
        if cell is not None:
            await cell.stop()

    async def exit_(env: Any) -> None:
        if not exit_now.done():
            exit_now.set_result(None)

    async def stats(env: Any) -> dict[str, Any]:
        return {"node": node.stats_snapshot(), "pid": os.getpid(),
                "actors": [c.snapshot() for c in node.cells.values()]}

    async def tensor_stats(env: Any) -> dict[str, Any]:
        return node.tensor_stats()

    node.control.update({"stop": stop, "exit": exit_, "stats": stats, "tensor_stats": tensor_stats})

    try:
        # The trusted spawn channel: these bytes came from our own system through the
        # forkserver's private socketpair, never from a socket anyone else can reach.
        limits: dict[str, list[int]] = header.get("rlimits") or {}
        _apply_rlimits(limits)  # the constructor, on_start and every handler run under them
        if header.get("cpus"):
            _pin_process(header["cpus"])  # before the constructor: its threads inherit the mask
        cls, args, kwargs = pickle.loads(blob)
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"{cls!r} is not a subclass of cascada.Actor")
        instance = cls(*args, **kwargs)
        instance.name = name
        instance.ref = ActorRef(name, node.endpoint, os.getpid(), node.host, incarnation, node=node)
        cell_cls = _MemoryLimitedCell if any(k in limits for k in MEMORY_LIMITS) else ActorCell
        cell = cell_cls(node, name, instance, incarnation)
        await cell.start()
    except Exception as exc:
        tb = "".join(traceback.format_exception(exc))
        try:
            await node.call(parent, None, "spawn_failed",
                            [header["token"], f"{type(exc).__qualname__}: {exc}", tb], timeout=10.0)
        except CascadaError:
            pass  # the system is gone or will see us exit; either way it learns we failed
        await node.close()
        return 1

    def on_sigterm() -> None:
        # SIGTERM drains: finish what was accepted, run on_stop, then leave.
        async def drain() -> None:
            if cell is not None:
                await cell.stop()
            if not exit_now.done():
                exit_now.set_result(None)
        node.tasks.spawn(drain(), name="sigterm drain")

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        await node.call(parent, None, "spawn_ready", [header["token"], os.getpid(), node.endpoint],
                        timeout=30.0)
        await exit_now
    except CascadaError:
        pass  # the system went away: fate-share
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if cell is not None and cell.running:
            await cell.stop()
        await node.close()
    return 0
