"""Tensors between actors, across real processes: every dtype and shape class, the three
paths (zmq frames, the shared-memory pool, pool hand-off), mutation after send, pool
exhaustion, and leases when a consumer or a producer is killed."""

from __future__ import annotations

import asyncio
import gc
import glob
import hashlib
import os
import signal
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq

import cascada
from cascada.transport._tensors import ITEMSIZE

MiB = 1 << 20


def digest(x: Any) -> list[Any]:
    """(library, dtype, shape, sha256 of the bytes) of a tensor or array, as the receiver sees it."""
    if isinstance(x, torch.Tensor):
        raw = x.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return ["torch", str(x.dtype).removeprefix("torch."), list(x.shape), hashlib.sha256(raw).hexdigest()]
    raw = np.ascontiguousarray(x).tobytes()
    return ["numpy", x.dtype.name, list(x.shape), hashlib.sha256(raw).hexdigest()]


class Sink(cascada.Actor):
    """Receives tensors; reports what it got, keeps some, stalls on request."""

    def __init__(self) -> None:
        self.kept: list[Any] = []
        self.ran: list[int] = []

    async def echo(self, x: Any) -> Any:
        return x

    async def digests(self, xs: list[Any]) -> list[Any]:
        return [digest(x) for x in xs]

    async def keep(self, x: Any, hold_for: float | None = None) -> str:
        self.kept.append(x)
        if hold_for is not None:
            asyncio.get_running_loop().call_later(hold_for, self.kept.clear)
        return digest(x)[3]

    async def drop(self) -> int:
        n = len(self.kept)
        self.kept.clear()
        return n

    async def record(self, i: int, x: Any) -> None:
        self.ran.append(i)
        self.kept.append(digest(x)[3])

    async def stall(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def stall_until(self, path: str) -> None:
        while not os.path.exists(path):
            await asyncio.sleep(0.01)

    async def log(self) -> tuple[list[int], list[str]]:
        return self.ran, self.kept

    async def total(self, x: Any) -> float:
        return float(x.double().sum())

    async def make(self, n: int) -> Any:
        return torch.arange(n, dtype=torch.float32)

    def make_shared(self, n: int) -> Any:
        out = cascada.empty((n,), "float32")
        out.fill_(1.0)
        return out

    def total_now(self, x: Any) -> float:
        return float(x.double().sum())

    async def total_later(self, x: Any, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return float(x.double().sum())

    def total_blocking(self, x: Any, seconds: float) -> float:
        time.sleep(seconds)  # not cancellable: its caller, gone by then, gets a late reply
        return float(x.double().sum())

    def scale_in_place(self, x: Any) -> float:
        x.mul_(3.0)
        return float(x.double().sum())

    async def total_with(self, x: Any, other: cascada.ActorRef, n: int) -> float:
        y = await other.ask("make", n)  # a tensor leased by other's process
        return float(x.double().sum()) + float(y.double().sum())

    async def items(self, x: Any, n: int) -> Any:
        for i in range(n):
            yield float(x[i])


class Producer(cascada.Actor):
    """Sends large tensors to a consumer from its own process (it owns their leases)."""

    async def feed(self, consumer: cascada.ActorRef, n: int, size: int) -> list[str]:
        sent = []
        for i in range(n):
            t = torch.full((size // 4,), float(i))
            sent.append(digest(t)[3])
            await consumer.tell("record", i, t)
        return sent

    async def give(self, consumer: cascada.ActorRef, n: int, size: int) -> int:
        for i in range(n):
            await consumer.ask("keep", torch.full((size // 4,), float(i)))
        return n

    async def make(self, n: int) -> Any:
        return torch.arange(n, dtype=torch.float32)


class Forwarder(cascada.Actor):
    """Sends what it gets on to another actor: within the request, or later."""

    def __init__(self) -> None:
        self.held: Any = None

    async def via(self, stage: cascada.ActorRef, method: str, x: Any, *rest: Any) -> Any:
        return await stage.ask(method, x, *rest)

    async def via_then_sum(self, stage: cascada.ActorRef, method: str, x: Any) -> list[Any]:
        out = await stage.ask(method, x)
        return [out, float(x.double().sum())]  # what this process sees after the stage ran

    async def hold(self, x: Any) -> bool:
        self.held = x
        return True

    async def send_held(self, stage: cascada.ActorRef, method: str) -> Any:
        return await stage.ask(method, self.held)

    async def forget(self) -> None:
        self.held = None


def _cases() -> list[Any]:
    out: list[Any] = []
    for name in ITEMSIZE:
        dt = getattr(torch, name)
        base = torch.arange(24).reshape(2, 3, 4)
        t = base.to(dt) if name != "bool" else base % 3 == 0
        out += [t, t[0, 0, 0].clone(), torch.empty(0, dtype=dt), torch.empty(0, 3, dtype=dt),
                t.transpose(0, 2), t[:, ::2]]
        if name != "bfloat16":
            a = np.arange(24).reshape(2, 3, 4).astype(name)
            out += [a, np.array(a[1, 1, 1]), np.empty((0,), dtype=name), a.T, a[:, ::2]]
    out.append(torch.randn(4, 5, dtype=torch.complex64).conj())  # a lazily conjugated view
    out.append(torch.ones(3, requires_grad=True))
    return out


async def test_every_dtype_and_shape_class_round_trips(system: cascada.ActorSystem, spawn: Any,
                                                       placement: str) -> None:
    """Between processes the receiver gets its own contiguous, detached tensor; a local actor
    gets the sender's object itself (nothing is copied inside one process)."""
    ref = await spawn(Sink)
    cases = _cases()
    # What the receiver sees, byte for byte.
    got = await ref.ask("digests", cases)
    assert got == [digest(c.resolve_conj() if isinstance(c, torch.Tensor) else c) for c in cases]
    # And what comes back: same library, dtype, shape and values.
    back = await ref.ask("echo", cases)
    for sent, ret in zip(cases, back):
        assert type(ret) is type(sent) or isinstance(sent, torch.nn.Parameter)
        assert digest(ret) == digest(sent.resolve_conj() if isinstance(sent, torch.Tensor) else sent)
        if placement == "local":
            assert ret is sent
        elif isinstance(ret, torch.Tensor):
            assert not ret.requires_grad and ret.is_contiguous()


@pytest.mark.parametrize("size", [100 << 10, 3 * MiB, 20 * MiB])
async def test_large_tensors_between_processes(size: int) -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Sink)
        t = torch.randn(size // 4)
        a = np.random.default_rng(1).integers(0, 1 << 30, size // 8)
        assert await ref.ask("digests", [t, a]) == [digest(t), digest(a)]
        back = await ref.ask("echo", {"t": t, "nested": [(a,)]})
        assert torch.equal(back["t"], t) and np.array_equal(back["nested"][0][0], a)
        stats = await system.tensor_stats()
        if size >= cascada.ActorSystem().config.tensors.inline_max:
            assert stats["shm"] >= 2 and stats["pool"]["segments"] >= 2
        else:
            assert stats["shm"] == 0 and stats["inline"] >= 4


async def test_streams_carry_tensors() -> None:
    class Gen(cascada.Actor):
        async def chunks(self, n: int, size: int):  # type: ignore[no-untyped-def]
            for i in range(n):
                yield torch.full((size // 4,), float(i))

    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Gen)
        got = [float(t[0]) async for t in ref.stream("chunks", 6, 2 * MiB)]
        assert got == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("path,size", [("auto", 256 << 10), ("auto", 4 * MiB), ("inline", 4 * MiB)])
async def test_changing_a_tensor_after_send_never_changes_what_arrives(path: str, size: int) -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Sink)
        sent = []
        t = torch.zeros(size // 4)
        for i in range(20):
            t.fill_(float(i))
            sent.append(digest(t)[3])
            await ref.tell("record", i, cascada.via(t, path))  # type: ignore[arg-type]
            t.fill_(-1.0)  # at once, while zmq may still be reading
        ran, seen = await ref.ask("log")
        assert ran == list(range(20)) and seen == sent


async def test_a_pool_tensor_is_handed_over_without_a_copy() -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Sink)
        t = cascada.empty((4 * MiB // 4,), "float32")
        t.fill_(2.0)
        a = cascada.empty((3, 1000), np.int64, lib="numpy")
        a[:] = 7
        assert await ref.ask("total", t) == 2.0 * (4 * MiB // 4)
        assert await ref.ask("digests", [a]) == [digest(a)]
        stats = await system.tensor_stats()
        assert stats["shm_handoff"] == 2 and stats["shm"] == 0
        # A slice of a pool tensor goes by the same segment, at its offset.
        assert await ref.ask("total", t[1000:2000]) == 2000.0
        assert (await system.tensor_stats())["shm_handoff"] == 3
        del t, a


async def test_a_reply_brings_back_the_leases_of_the_tensors_its_request_took() -> None:
    """A handler done with a leased tensor before it answers: the release rides on the reply
    (no lease.release message of its own), so the lease has ended by the time the caller
    has its answer. Sync and async handlers, answering at once or after an await, asks and
    streams."""
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Sink)
        t = cascada.empty((MiB // 4,), "float32")
        t.fill_(1.0)
        await ref.ask("total", t)  # connects: the first releases may go either way
        await _until(lambda: _outstanding(system, 0))
        before = (await system.tensor_stats())["leases"]
        calls = [("total", ()), ("total_now", ()), ("total_later", (0.01,))]
        for i in range(30):
            method, extra = calls[i % 3]
            assert await ref.ask(method, t, *extra) == float(MiB // 4)
            # Checked before the loop runs again: nothing else could have released it.
            leases = (await system.tensor_stats())["leases"]
            assert leases["outstanding"] == 0, (i, method, leases)
        assert [x async for x in ref.stream("items", t, 3)] == [1.0, 1.0, 1.0]
        leases = (await system.tensor_stats())["leases"]
        assert leases["outstanding"] == 0
        assert leases["released_on_replies"] - before["released_on_replies"] == 31
        assert leases["release_messages"] == before["release_messages"]
        assert leases["released"] - before["released"] == 31 and leases["unknown_releases"] == 0
        del t


async def test_a_request_brings_back_the_leases_of_the_answers_its_caller_let_go_of() -> None:
    """The other way: a stage answers with a shared tensor; the caller lets go of it and asks
    again; the release rides on that request."""
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Sink)
        n = MiB // 4
        await ref.ask("make_shared", n)  # connects
        await _until(lambda: _outstanding(system, 0, ref))
        before = (await system.tensor_stats(ref))["leases"]
        for _ in range(10):
            y = await ref.ask("make_shared", n)
            assert float(y[0]) == 1.0 and float(y[-1]) == 1.0
            del y  # its release goes with the next request
        leases = (await system.tensor_stats(ref))["leases"]  # a request too
        assert leases["outstanding"] == 0
        assert leases["released_on_requests"] - before["released_on_requests"] == 10
        assert leases["release_messages"] == before["release_messages"]


async def test_a_tensor_kept_past_the_reply_is_released_by_a_message_later() -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Sink)
        t = cascada.empty((MiB // 4,), "float32")
        t.fill_(3.0)
        await ref.ask("keep", t)
        messages = (await system.tensor_stats())["leases"]["release_messages"]
        await ref.ask("keep", t, 1.0)  # kept, then let go of by a timer: no reply to ride on
        assert (await system.tensor_stats())["leases"]["outstanding"] == 2  # the actor holds both
        await _until(lambda: _outstanding(system, 0))
        assert (await system.tensor_stats())["leases"]["release_messages"] == messages + 1
        del t


async def test_a_late_reply_still_brings_back_its_leases() -> None:
    """The caller gave up (its deadline passed); the handler could not be stopped and answers
    after all. Nobody waits for that reply, but the leases it carries end."""
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Sink)
        t = cascada.empty((MiB // 4,), "float32")
        t.fill_(1.0)
        await ref.ask("total", t)
        await _until(lambda: _outstanding(system, 0))
        before = (await system.tensor_stats())["leases"]
        with pytest.raises(cascada.DeadlineExceeded):
            await ref.ask("total_blocking", t, 0.3, timeout=0.05)
        await _until(lambda: _outstanding(system, 0))
        after = (await system.tensor_stats())["leases"]
        assert after["released_on_replies"] - before["released_on_replies"] == 1
        assert after["release_messages"] == before["release_messages"]
        assert (await system.stats(ref))["actors"][0]["handled"] >= 2
        del t
        gc.collect()  # the DeadlineExceeded's traceback, a cycle, holds frames that saw t


async def test_releases_ride_only_on_replies_to_the_node_that_issued_the_leases() -> None:
    """The middle process gets a tensor from the driver and one from a third process in the
    same call: the driver's release comes back on the answer, the third's in a message to
    the third, and nobody is handed a lease id it never issued."""
    async with cascada.ActorSystem() as system:
        middle = await system.spawn(Sink)
        third = await system.spawn(Producer)
        t = cascada.empty((MiB // 4,), "float32")
        t.fill_(1.0)
        n = MiB // 4
        for _ in range(5):
            assert await middle.ask("total_with", t, third, n) == float(n) + float(n * (n - 1) // 2)
            assert (await system.tensor_stats())["leases"]["outstanding"] == 0
        await _until(lambda: _outstanding(system, 0, third))
        ours, theirs = (await system.tensor_stats())["leases"], (await system.tensor_stats(third))["leases"]
        assert ours["unknown_releases"] == 0 and theirs["unknown_releases"] == 0
        assert ours["released_on_replies"] >= 4 and theirs["released"] == theirs["issued"] == 5
        # The middle's releases of the third's tensors go in messages, or on a request to the
        # third when one leaves in the same moment; never on a reply to the driver.
        assert theirs["released_on_replies"] == 0
        assert theirs["release_messages"] + theirs["released_on_requests"] >= 1
        del t


# -- passing a shared tensor on -----------------------------------------------------------


async def test_a_shared_tensor_passed_on_within_its_request_goes_without_a_copy() -> None:
    """A cascada.empty tensor through a forwarding actor and through two levels of process
    flows: every process on the way hands on the same segment, and every lease comes home."""
    from cascada.actors._flow import Sequential, Step

    async with cascada.ActorSystem() as system:
        stage = await system.spawn(Sink)
        fwd = await system.spawn(Forwarder)
        inner = await system.spawn(Sequential, Step(stage, "total"), name="inner")
        outer = await system.spawn(Sequential, Step(inner, "run"), name="outer")
        t = cascada.empty((MiB // 4,), "float32")
        t.fill_(2.0)
        for _ in range(3):
            assert await fwd.ask("via", stage, "total", t) == 2.0 * (MiB // 4)
            assert await outer.ask("run", t) == 2.0 * (MiB // 4)
        for ref in (fwd, inner, outer):
            await _until(lambda: _outstanding(system, 0, ref))
            s = await system.tensor_stats(ref)
            assert s["shm"] == 0 and s["inline"] == 0 and s["shm_passed_on"] == 3, s
            assert s["leases"]["unknown_releases"] == 0
        assert (await system.tensor_stats())["leases"]["outstanding"] == 0
        assert (await system.tensor_stats())["shm_handoff"] == 6
        del t


async def test_a_tensor_that_came_by_copy_is_copied_again_when_sent_on() -> None:
    """Value semantics: a stage that writes to its input must not change what the process
    that sent it on sees, unless the tensor was made to be shared (cascada.empty)."""
    async with cascada.ActorSystem(tensor_inline_max=64 << 10) as system:
        stage = await system.spawn(Sink)
        fwd = await system.spawn(Forwarder)
        n = MiB // 4
        out, seen = await fwd.ask("via_then_sum", stage, "scale_in_place", torch.ones(n))
        assert out == 3.0 * n and seen == float(n)  # fwd's copy is its own
        s = await system.tensor_stats(fwd)
        assert s["shm"] == 1 and s["shm_passed_on"] == 0
        shared = cascada.empty((n,), "float32")
        shared.fill_(1.0)
        out, seen = await fwd.ask("via_then_sum", stage, "scale_in_place", shared)
        assert out == 3.0 * n and seen == 3.0 * n  # one memory, as cascada.empty promises
        assert float(shared.double().sum()) == 3.0 * n
        assert (await system.tensor_stats(fwd))["shm_passed_on"] == 1
        del shared


async def test_a_shared_tensor_sent_on_after_its_request_is_copied() -> None:
    async with cascada.ActorSystem() as system:
        stage = await system.spawn(Sink)
        fwd = await system.spawn(Forwarder)
        t = cascada.empty((MiB // 4,), "float32")
        t.fill_(1.0)
        await fwd.ask("hold", t)
        assert await fwd.ask("send_held", stage, "total") == float(MiB // 4)
        s = await system.tensor_stats(fwd)
        assert s["shm"] == 1 and s["shm_passed_on"] == 0  # no longer its request's: it must outlive its owner
        await fwd.ask("forget")
        await _until(lambda: _outstanding(system, 0))
        del t


async def test_a_passed_on_tensor_stays_leased_down_the_chain_until_the_last_holder_lets_go() -> None:
    async with cascada.ActorSystem() as system:
        stage = await system.spawn(Sink)
        keeper = await system.spawn(Sink)
        fwd = await system.spawn(Forwarder)
        t = cascada.empty((MiB // 4,), "float32")
        t.fill_(1.0)
        await fwd.ask("via", stage, "keep", t)
        await fwd.ask("via", keeper, "keep", t)
        await asyncio.sleep(0.1)
        # Each holder keeps the chain: the forwarder's view (one lease of the driver's) and
        # its lease to each holder.
        assert (await system.tensor_stats(fwd))["leases"]["outstanding"] == 2
        assert (await system.tensor_stats())["leases"]["outstanding"] == 2
        assert await stage.ask("drop") == 1
        await _until(lambda: _outstanding(system, 1, fwd))
        await _until(lambda: _outstanding(system, 1))
        # A holder that dies: the forwarder expires its lease, and lets go of its view.
        os.kill(keeper.pid, signal.SIGKILL)
        await _until(lambda: _outstanding(system, 0, fwd))
        await _until(lambda: _outstanding(system, 0))
        assert (await system.tensor_stats(fwd))["leases"]["expired_dead"] == 1
        del t


async def _outstanding(system: cascada.ActorSystem, n: int, ref: cascada.ActorRef | None = None) -> bool:
    return bool((await system.tensor_stats(ref))["leases"]["outstanding"] == n)


async def test_empty_outside_a_system_and_bad_arguments() -> None:
    with pytest.raises(cascada.SystemClosed):
        cascada.empty((4,))
    async with cascada.ActorSystem():
        with pytest.raises(cascada.ConfigurationError, match="dtype"):
            cascada.empty((4,), "object")
        with pytest.raises(cascada.ProtocolError, match="dimension"):
            cascada.empty((-1,))
        with pytest.raises(cascada.ConfigurationError, match="path"):
            cascada.via(torch.ones(1), "carrier-pigeon")  # type: ignore[arg-type]
    async with cascada.ActorSystem(shm_pool_bytes=0):
        with pytest.raises(cascada.PoolExhausted):
            cascada.empty((4,))


def test_tensor_settings_are_checked() -> None:
    for bad in ({"tensor_inline_max": -1}, {"shm_pool_bytes": "big"}, {"shm_on_exhausted": "drop"},
                {"lease_ttl": 0}, {"cuda_cross_host": "teleport"}):
        with pytest.raises(cascada.ConfigurationError):
            cascada.ActorSystem(**bad)  # type: ignore[arg-type]


async def test_a_non_contiguous_tensor_is_refused_when_asked_to() -> None:
    from cascada.transport._tensors import TensorOptions

    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Sink)
        system.node.tensors.options = TensorOptions(make_contiguous=False)
        with pytest.raises(cascada.SerializationError, match="non-contiguous"):
            await ref.ask("echo", torch.ones(4, 4).t())
        assert torch.equal(await ref.ask("echo", torch.ones(4, 4)), torch.ones(4, 4))


# -- the pool's bound ---------------------------------------------------------------------

POOL = 3 * MiB  # room for two 1 MiB segments (with their headers), not three


async def test_pool_exhaustion_waits_for_room_then_fails_at_the_deadline() -> None:
    async with cascada.ActorSystem(shm_pool_bytes=POOL, tensor_inline_max=64 << 10) as system:
        ref = await system.spawn(Sink)
        one = torch.ones(MiB // 4)
        await ref.ask("keep", one)
        await ref.ask("keep", one)
        t0 = time.monotonic()
        with pytest.raises(cascada.PoolExhausted, match="deadline"):
            await ref.ask("keep", one, timeout=0.5)
        assert 0.4 < time.monotonic() - t0 < 3.0
        # Room comes back when the receiver lets go: a waiting send then goes through, and
        # what was sent after it on the same connection arrives after it (per-pair order).
        await _drop_from_elsewhere(system, ref)
        await ref.ask("keep", one, 0.3)
        await ref.ask("keep", one, 0.3)
        big = asyncio.ensure_future(ref.tell("record", 1, one))  # waits for room
        await asyncio.sleep(0.05)
        small = asyncio.ensure_future(ref.tell("record", 2, torch.ones(4)))
        await asyncio.wait_for(asyncio.gather(big, small), 10)
        ran, _ = await ref.ask("log")
        assert ran == [1, 2]
        stats = await system.tensor_stats()
        assert stats["pool"]["exhausted"] >= 1 and stats["pool"]["bytes"] <= POOL


async def _drop_from_elsewhere(system: cascada.ActorSystem, ref: cascada.ActorRef) -> None:
    # A message from another process: the driver's own connection may be queued behind a
    # send that waits for room.
    class Dropper(cascada.Actor):
        async def drop(self, target: cascada.ActorRef) -> int:
            n: int = await target.ask("drop")
            return n

    helper = await system.spawn(Dropper)
    await helper.ask("drop", ref)
    await system.stop(helper)


async def test_pool_exhaustion_falls_back_to_frames_or_fails_at_once() -> None:
    async with cascada.ActorSystem(shm_pool_bytes=POOL, tensor_inline_max=64 << 10,
                                   shm_on_exhausted="inline") as system:
        ref = await system.spawn(Sink)
        one = torch.ones(MiB // 4)
        for _ in range(4):
            await ref.ask("keep", one)
        stats = await system.tensor_stats()
        assert stats["inline_fallbacks"] == 2 and stats["shm"] == 2
    async with cascada.ActorSystem(shm_pool_bytes=POOL, tensor_inline_max=64 << 10,
                                   shm_on_exhausted="error") as system:
        ref = await system.spawn(Sink)
        await ref.ask("keep", one)
        await ref.ask("keep", one)
        t0 = time.monotonic()
        with pytest.raises(cascada.PoolExhausted, match="shm_on_exhausted='error'"):
            await ref.ask("keep", one)
        assert time.monotonic() - t0 < 1.0
        assert await ref.ask("drop") == 2  # nothing half-sent is left behind

        async def released() -> bool:
            return bool((await system.tensor_stats())["leases"]["outstanding"] == 0)

        await _until(released)


async def test_a_reply_that_waits_for_room_still_arrives() -> None:
    class Maker(cascada.Actor):
        async def make(self, n: int) -> Any:
            return torch.full((n,), 3.0)

    async with cascada.ActorSystem(shm_pool_bytes=POOL, tensor_inline_max=64 << 10) as system:
        ref = await system.spawn(Maker)
        held = [await ref.ask("make", MiB // 4), await ref.ask("make", MiB // 4)]
        third = asyncio.ensure_future(ref.ask("make", MiB // 4))
        await asyncio.sleep(0.3)
        assert not third.done()  # the maker's pool is full until we let go
        held.clear()
        t = await asyncio.wait_for(third, 10)
        assert float(t.sum()) == 3.0 * (MiB // 4)


# -- leases when processes die ------------------------------------------------------------

async def _until(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_leases_of_a_killed_consumer_are_reclaimed() -> None:
    async with cascada.ActorSystem(tensor_inline_max=64 << 10) as system:
        # The driver is the producer ...
        consumer = await system.spawn(Sink)
        for _ in range(5):
            await consumer.ask("keep", torch.ones(MiB // 4))
        assert (await system.tensor_stats())["leases"]["outstanding"] == 5
        t0 = time.monotonic()
        os.kill(consumer.pid, signal.SIGKILL)

        async def reclaimed() -> bool:
            s = await system.tensor_stats()
            return bool(s["leases"]["outstanding"] == 0 and s["pool"]["free"] == s["pool"]["segments"])

        await _until(reclaimed)
        assert time.monotonic() - t0 < 2.0
        # ... and so is an actor process.
        producer = await system.spawn(Producer)
        consumer2 = await system.spawn(Sink)
        await producer.ask("give", consumer2, 4, MiB)
        assert (await system.tensor_stats(producer))["leases"]["outstanding"] == 4
        os.kill(consumer2.pid, signal.SIGKILL)

        async def reclaimed_by_actor() -> bool:
            s = await system.tensor_stats(producer)
            return bool(s["leases"]["outstanding"] == 0 and s["leases"]["expired_dead"] == 4)

        await _until(reclaimed_by_actor)


async def test_a_killed_producer_fails_queued_messages_with_tensor_lost(tmp_path: Any) -> None:
    gate = str(tmp_path / "gate")
    async with cascada.ActorSystem(tensor_inline_max=64 << 10) as system:
        producer = await system.spawn(Producer)
        consumer = await system.spawn(Sink)
        await consumer.tell("stall_until", gate)  # busy: what follows waits in its mailbox
        sent = await producer.ask("feed", consumer, 6, MiB)
        assert len(sent) == 6 and len(glob.glob(f"/dev/shm/cascada-{producer.pid}-*")) >= 1
        await _until(lambda: _depth(system, consumer, 6), 5)
        os.kill(producer.pid, signal.SIGKILL)
        await _until(lambda: _gone(producer.pid), 5)
        open(gate, "w").close()
        ran, _ = await consumer.ask("log")
        assert ran == []  # none of them ran on a dead owner's memory
        stats = await system.tensor_stats(consumer)
        assert stats["lost"] == 6

        async def swept() -> bool:  # by the system, when it reaps the dead child
            return not glob.glob(f"/dev/shm/cascada-{producer.pid}-*")

        await _until(swept, 5)
        # The consumer serves on; a new producer works.
        producer2 = await system.spawn(Producer)
        assert len(await producer2.ask("feed", consumer, 2, MiB)) == 2

        async def ran_both() -> bool:  # tells from another sender: no order against our ask
            return bool((await consumer.ask("log"))[0] == [0, 1])

        await _until(ran_both)


async def _depth(system: cascada.ActorSystem, ref: cascada.ActorRef, n: int) -> bool:
    s = await system.stats(ref)
    return bool(s["actors"][0]["depth"] >= n)


async def _gone(pid: int) -> bool:
    from cascada.transport._endpoints import process_gone

    return process_gone(pid)


async def test_a_received_tensor_sent_on_is_copied_so_it_outlives_its_producer() -> None:
    async with cascada.ActorSystem(tensor_inline_max=64 << 10) as system:
        producer = await system.spawn(Producer)
        consumer = await system.spawn(Sink)
        t = await producer.ask("make", MiB)  # lives in the producer's pool
        await consumer.ask("keep", t)  # re-sent by the driver: copied into the driver's pool
        os.kill(producer.pid, signal.SIGKILL)
        await _until(lambda: _gone(producer.pid), 5)
        assert await consumer.ask("total", t) == float(t.double().sum())
        _, kept = await consumer.ask("log")
        assert len(kept) == 1 and torch.equal(kept[0], t)  # intact, though its first owner died
        del t, kept


async def test_hostile_tensor_descriptors_leave_the_actor_serving() -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Sink, name="victim")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ref.endpoint)

        def req(corr: int, desc: Any, *frames: bytes) -> list[bytes]:
            ext = msgpack.ExtType(3, msgpack.packb(desc))
            return [msgpack.packb([1, 1, corr, "raw", "victim", "echo", None, [[ext], None], None]), *frames]

        hostile = [
            req(1, [0, "float32", [4], [0, 0]], b"\x00" * 15),  # one byte short
            req(2, [0, "float32", [4], [0, 3]], b"\x00" * 16),  # frame index out of range
            req(3, [0, "object", [1], [0, 0]], b"\x00" * 8),  # dtype off the allowlist
            req(4, [0, "float32", [-4], [0, 0]], b""),  # negative dimension
            req(5, [0, "float32", [1 << 40, 1 << 40], [0, 0]], b"\x00" * 16),  # overflowing shape
            req(6, [0, "float32", [4], [1, "../../etc/passwd", 1, 0, 1, 1, "ipc:///x"]]),  # foreign path
            req(7, [0, "float32", [4], [1, f"cascada-{os.getpid()}-deadbeef-1", 1, 0, 1, os.getpid(),
                                                "ipc:///nowhere/x.ipc"]]),  # segment gone
            req(10, [0, "float32", [4], [1, "cascada-1-deadbeef-1", 1, 0, 1, 2, "ipc:///x.ipc"]]),  # owner mismatch
            req(11, [0, "float32", [4], [1, "cascada-1-deadbeef-1", 1, 0, 1, 1, "tcp://*:1"]]),  # bad owner
            req(8, [7, "float32", [4], [0, 0]], b"\x00" * 16),  # unknown library
            req(9, "not a descriptor"),
        ]
        try:
            for frames in hostile:
                sock.send_multipart(frames)
            codes: dict[int, str] = {}
            deadline = time.monotonic() + 10
            while len(codes) < len(hostile) and time.monotonic() < deadline:
                if sock.poll(100):
                    envs, err = cascada.transport.Codec().decode_all(sock.recv_multipart())
                    assert err is None
                    for env in envs:
                        codes[env.corr] = env.body[0]
        finally:
            sock.close(linger=0)
            ctx.term()
        assert codes == {1: "protocol", 2: "protocol", 3: "protocol", 4: "protocol", 5: "protocol",
                         6: "protocol", 7: "tensor_lost", 8: "protocol", 9: "protocol", 10: "protocol",
                         11: "protocol"}
        assert await ref.ask("total", torch.ones(3)) == 3.0  # same process, still serving
        assert (await system.stats(ref))["pid"] == ref.pid


async def test_via_chooses_the_path_and_is_invisible_to_the_receiver(system: cascada.ActorSystem, spawn: Any,
                                                                     placement: str) -> None:
    ref = await spawn(Sink)
    t = torch.arange(3 * MiB // 4, dtype=torch.float32)
    got = await ref.ask("echo", {"a": [cascada.via(t, "inline")], "b": (cascada.via(t[:4], "shm"),)})
    assert torch.equal(got["a"][0], t) and torch.equal(got["b"][0], t[:4])
    if placement != "local":
        stats = await system.tensor_stats()
        assert stats["inline"] >= 1 and stats["shm"] >= 1  # 3 MiB inline, 16 bytes through the pool
