"""The main of an actor process, run in a child forked by the forkserver."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import traceback
from typing import Any

from ..transport._endpoints import host_id
from ._actor import Actor
from ._cell import ActorCell
from ._errors import CascadaError
from ._heartbeat import send_beats
from ._loop import run
from ._node import Node, NodeConfig
from ._ref import ActorRef, current_node


def run_child(header: dict[str, Any], blob: bytes) -> int:
    return run(_serve(header, blob))


async def _serve(header: dict[str, Any], blob: bytes) -> int:
    name: str = header["name"]
    incarnation: str = header["incarnation"]
    node = Node(header["node_id"], header["endpoint"], NodeConfig.from_dict(header["config"]))
    node.incarnation = incarnation
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
        cls, args, kwargs = pickle.loads(blob)
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"{cls!r} is not a subclass of cascada.Actor")
        instance = cls(*args, **kwargs)
        instance.name = name
        instance.ref = ActorRef(name, node.endpoint, os.getpid(), node.host, incarnation, node=node)
        cell = ActorCell(node, name, instance, incarnation)
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
