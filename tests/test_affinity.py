"""spawn(..., cpus=...) pins every thread of an actor's process, from before it starts and
again after a restart; what it cannot do is refused with a clear error."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import cascada

pytestmark = pytest.mark.timeout(60)

ALLOWED = sorted(os.sched_getaffinity(0))


class Where(cascada.Actor):
    """Reports the CPU mask of every thread of its process."""

    def masks(self) -> dict[str, list[int]]:
        out = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            out[f"{tid} {name}"] = sorted(os.sched_getaffinity(int(tid)))
        return out

    def pid(self) -> int:
        return os.getpid()


async def test_every_thread_of_the_process_runs_on_the_cpus_asked_for() -> None:
    one = ALLOWED[-1:]
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        ref = await system.spawn(Where, name="pinned", cpus=set(one))
        free = await system.spawn(Where, name="free")
        masks = await ref.ask("masks")
        assert any("ZMQbg/IO" in t for t in masks), masks  # zmq's I/O thread is among them
        assert all(cpus == one for cpus in masks.values()), masks
        assert all(cpus == ALLOWED for cpus in (await free.ask("masks")).values())
    assert os.sched_getaffinity(0) == set(ALLOWED)  # the driver is left as it was


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs")
async def test_a_driver_pinned_to_one_cpu_places_actors_on_others() -> None:
    """Actors inherit the driver's mask (through the forkserver, started at the first
    process spawn); cpus= may move one outside it."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {ALLOWED[0]})
    try:
        async with cascada.ActorSystem(heartbeat_interval=None) as system:
            elsewhere = await system.spawn(Where, name="elsewhere", cpus={ALLOWED[1]})
            inherited = await system.spawn(Where, name="inherited")
            assert all(cpus == [ALLOWED[1]] for cpus in (await elsewhere.ask("masks")).values())
            assert all(cpus == [ALLOWED[0]] for cpus in (await inherited.ask("masks")).values())
    finally:
        os.sched_setaffinity(0, before)


async def test_a_restarted_process_is_pinned_again() -> None:
    one = ALLOWED[:1]
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        ref = await system.spawn(Where, name="w", cpus=one, restart="permanent")
        old = ref.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if await ref.ask("pid", timeout=1) != old:
                    break
            except cascada.ActorDied:
                pass
            assert time.monotonic() < deadline, "the actor was not restarted"
            await asyncio.sleep(0.05)
        assert all(cpus == one for cpus in (await ref.ask("masks")).values())


@pytest.mark.parametrize("bad, match", [
    (set(), "non-empty"),
    ([0, -1], "non-negative"),
    ("0", "set of CPU numbers"),
    (0, "set of CPU numbers"),
    ([True], "non-negative ints"),
    ([max(ALLOWED) + 1000], "not among this machine's usable CPUs"),
])
async def test_cpus_it_cannot_use_are_refused(bad: object, match: str) -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        with pytest.raises(cascada.ConfigurationError, match=match):
            await system.spawn(Where, name="w", cpus=bad)  # type: ignore[arg-type]
        with pytest.raises(cascada.ActorNotFound):
            system.lookup("w")  # nothing was started


async def test_a_local_actor_cannot_be_pinned() -> None:
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        with pytest.raises(cascada.ConfigurationError, match="placement='process'"):
            await system.spawn(Where, name="w", placement="local", cpus=ALLOWED[:1])


async def test_a_topology_pins_what_it_names() -> None:
    one = ALLOWED[-1:]
    spec = {"actors": {"a": {"class": f"{__name__}:Where", "cpus": one}},
            "flows": {"top": {"kind": "sequence", "steps": ["a.pid"], "cpus": one}}}
    async with cascada.ActorSystem(heartbeat_interval=None) as system:
        built = await cascada.build_topology(system, spec)
        assert all(cpus == one for cpus in (await built.refs["a"].ask("masks")).values())
        top_pid = built.top.pid
        assert top_pid is not None
        with open(f"/proc/{top_pid}/status") as f:
            allowed = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))
        assert allowed == str(one[0])
    with pytest.raises(cascada.ConfigurationError, match=r"actors\.a\.cpus"):
        cascada.load_topology({"actors": {"a": {"class": f"{__name__}:Where", "cpus": "0"}}})
    with pytest.raises(cascada.ConfigurationError, match="placement = 'process'"):
        cascada.load_topology({"actors": {"a": {"class": f"{__name__}:Where", "cpus": [0], "placement": "local"}}})
