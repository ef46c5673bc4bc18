"""The lean socket layer, run once per transport (inproc, ipc, tcp): delivery, order,
high-water-mark pushback, and close."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq

from cascada.transport import AsyncSocket, ConfigurationError, IpcDirectory, TransportClosed, check_endpoint, configure


@pytest.fixture(params=["inproc", "ipc", "tcp"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, ...]]:
    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    directory = IpcDirectory()
    endpoint = {"inproc": "inproc://t", "ipc": directory.endpoint("t"), "tcp": "tcp://127.0.0.1:*"}[request.param]
    inbox: list[list[bytes]] = []
    arrived = asyncio.Event()

    def on_router(frames: list[bytes]) -> None:
        inbox.append(frames)
        arrived.set()

    router = ctx.socket(zmq.ROUTER)
    configure(router, hwm=50, max_frame_bytes=1 << 20, router=True)
    router.bind(endpoint)
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    dealer = ctx.socket(zmq.DEALER)
    configure(dealer, hwm=50, max_frame_bytes=1 << 20)
    dealer.connect(endpoint)
    replies: list[list[bytes]] = []
    r = AsyncSocket(router, on_router, loop, router=True, batching=False)
    d = AsyncSocket(dealer, replies.append, loop, batching=False)
    try:
        yield r, d, inbox, arrived, replies
    finally:
        r.close()
        d.close()
        ctx.term()
        directory.remove()


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


async def test_delivery_order_and_reply(pair: tuple[Any, ...]) -> None:
    router, dealer, inbox, _arrived, replies = pair
    for i in range(1000):
        pending = dealer.send([str(i).encode()])
        if pending is not None:
            await pending
    await wait_for(lambda: len(inbox) == 1000)
    assert [int(f[1]) for f in inbox] == list(range(1000))
    identity = inbox[0][0]
    assert router.send([identity, b"reply", b"x" * 100_000]) is None  # multipart, large part zero-copy
    await wait_for(lambda: len(replies) == 1)
    assert replies[0][0] == b"reply" and len(replies[0][1]) == 100_000


async def test_high_water_mark_pushes_back(pair: tuple[Any, ...]) -> None:
    router, dealer, inbox, _arrived, _replies = pair
    router.pause_reading()
    futures = []
    pad = b"." * 10_000  # big enough to fill tcp's kernel buffers too, not only zmq's queues
    for i in range(2000):
        pending = dealer.send([b"%d" % i, pad])
        if pending is not None:
            futures.append(pending)
    assert futures, "a paused receiver must make the sender wait, not grow without bound"
    assert dealer.backlog == len(futures)
    router.resume_reading()
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    await wait_for(lambda: len(inbox) == 2000)
    assert [int(f[1]) for f in inbox] == list(range(2000))


async def test_unroutable_reply_is_reported(pair: tuple[Any, ...]) -> None:
    from cascada.transport._socket import Unroutable

    router, _dealer, _inbox, _arrived, _replies = pair
    with pytest.raises(Unroutable):
        router.send([b"nobody", b"x"])


async def test_close_fails_pending_sends(pair: tuple[Any, ...]) -> None:
    router, dealer, _inbox, _arrived, _replies = pair
    router.pause_reading()
    pending = None
    for _ in range(5000):
        pending = dealer.send([b"x" * 10_000]) or pending
    assert pending is not None
    dealer.close()
    with pytest.raises(TransportClosed):
        await pending
    with pytest.raises(TransportClosed):
        dealer.send([b"y"])


def test_endpoint_validation() -> None:
    assert check_endpoint("tcp://127.0.0.1:5555")
    with pytest.raises(ConfigurationError, match="every interface"):
        check_endpoint("tcp://*:5555")
    with pytest.raises(ConfigurationError):
        check_endpoint("udp://x")
    with pytest.raises(ConfigurationError, match="107"):
        check_endpoint("ipc:///" + "x" * 120)
    d = IpcDirectory()
    try:
        assert oct(os.stat(d.path).st_mode & 0o777) == "0o700"
    finally:
        d.remove()


def test_long_tmpdir_falls_back_to_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import tempfile

    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    d = IpcDirectory()
    try:
        assert d.path.startswith("/tmp/cascada-")
        assert len(d.endpoint()) - len("ipc://") <= 107
    finally:
        d.remove()
    with pytest.raises(ConfigurationError, match="too long"):
        IpcDirectory(str(long_dir))


async def test_batching_coalesces_a_tick_and_keeps_order() -> None:
    """Messages sent in one loop tick travel as few frames; decode_all restores each, in order."""
    from cascada.transport import Codec, Kind

    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    codec = Codec()
    got: list[int] = []
    alone: list[int] = []  # messages that came in a frame of their own
    frames_seen = 0

    def on_router(frames: list[bytes]) -> None:
        nonlocal frames_seen
        frames_seen += 1
        envs, err = codec.decode_all(frames, 1)
        assert err is None
        got.extend(env.body[0][0] for env in envs)
        if len(envs) == 1:
            alone.append(envs[0].body[0][0])

    router = ctx.socket(zmq.ROUTER)
    configure(router, hwm=1000, max_frame_bytes=1 << 20, router=True)
    router.bind("inproc://batch")
    dealer = ctx.socket(zmq.DEALER)
    configure(dealer, hwm=1000, max_frame_bytes=1 << 20)
    dealer.connect("inproc://batch")
    r = AsyncSocket(router, on_router, loop, router=True)
    d = AsyncSocket(dealer, lambda f: None, loop)
    try:
        for i in range(1000):  # one tick: no await in between
            # 500 travels unbatched (as a message of leased tensors does), in its place.
            pending = d.send(codec.encode(Kind.TELL, i, "s", "t", "m", None, [[i], None]), i != 500)
            assert pending is None
        # A second, empty frame (as a message of leased tensors carries): a non-empty frame
        # that no tensor descriptor refers to would be refused.
        big = codec.encode(Kind.TELL, 1000, "s", "t", "m", None, [[1000], None]) + [b""]
        await (d.send(big) or asyncio.sleep(0))  # a multi-frame message flushes the batch first
        try:
            await wait_for(lambda: len(got) == 1001)
        except asyncio.TimeoutError as exc:
            raise AssertionError(f"got {len(got)} in {frames_seen} frames: {got[:5]}...{got[-5:]}") from exc
        assert got == list(range(1001))
        assert frames_seen < 100
        assert 500 in alone and 1000 in alone
    finally:
        r.close()
        d.close()
        ctx.term()


def test_a_bad_message_inside_a_batch_keeps_the_good_ones_before_it() -> None:
    from cascada.transport import Codec, Kind, ProtocolError
    from cascada.transport._wire import BATCH_MARKER

    codec = Codec()
    good = [codec.encode(Kind.TELL, i, "s", "t", "m", None, [[i], None])[0] for i in range(3)]
    envs, err = codec.decode_all([BATCH_MARKER + good[0] + good[1] + b"\xc1garbage" + good[2]])
    assert [e.corr for e in envs] == [0, 1] and isinstance(err, ProtocolError)
    with pytest.raises(ProtocolError, match="out-of-band"):
        codec.decode_all([BATCH_MARKER + good[0], b"extra"])
    with pytest.raises(ProtocolError, match="empty batch"):
        codec.decode_all([BATCH_MARKER])
