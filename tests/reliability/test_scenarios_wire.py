"""Transport and hostile-input scenarios (RELIABILITY.md R12, R17, R18, R20, R21, R22), and
the pieces they are built on (the chaos proxy, the ipc endpoint checks).

The scenario bodies live in reliability/scenarios_wire.py, shared with scripts/reliability.py;
each returns its part (c) record and the expectations it broke, and these tests assert there
are none. A scenario that shows a gap in the runtime outside the transport is marked
xfail(strict=True) with the reason; when the runtime is fixed it passes and the mark must go.
Set CASCADA_RELIABILITY_RECORDS=path to append every record to a JSON-lines file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq

from cascada.transport._endpoints import (
    check_ipc_listener,
    claim_ipc_path,
    listener_pid,
    socket_identity,
)
from cascada.transport._errors import CascadaError, EndpointConflict
from reliability import scenarios_wire as W
from reliability.chaos_proxy import ChaosProxy, Schedule, parse_tcp
from reliability.harness import Outcome, jsonable


def _check(outcome: Outcome, record_property: Any) -> None:
    record = jsonable(outcome.record)
    record_property("reliability_record", json.dumps(record))
    path = os.environ.get("CASCADA_RELIABILITY_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    outcome.assert_ok()


# -- the chaos proxy itself ------------------------------------------------------------------


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_chaos_proxy_delays_keeps_order_and_resets() -> None:
    server, port = await _echo_server()
    try:
        async with ChaosProxy(("127.0.0.1", port), Schedule(delay=0.02, jitter=0.01, resets_up=(3000,))) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            t0 = time.monotonic()
            payload = bytes(range(256)) * 8  # 2 KiB, under the reset threshold
            writer.write(payload)
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
            assert got == payload  # jitter never reorders bytes
            assert time.monotonic() - t0 >= 0.04  # delayed both ways
            writer.write(b"x" * 2000)  # crosses 3000 bytes up: the proxy resets the connection
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(2000), 10)
            writer.close()
            assert proxy.stats.resets == 1 and proxy.stats.aborted == 1
            # A new connection works again (no thresholds left).
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"again")
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"again"
            proxy.stall(0.1)
            t0 = time.monotonic()
            writer.write(b"late")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"late"
            assert time.monotonic() - t0 >= 0.09
            assert proxy.reset_all() == 1
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_chaos_proxy_refuses_non_loopback() -> None:
    with pytest.raises(ValueError):
        ChaosProxy(("10.0.0.1", 80))
    assert parse_tcp("tcp://127.0.0.1:5555") == ("127.0.0.1", 5555)


# -- ipc endpoint checks (R18, transport/_endpoints.py) ---------------------------------------


async def test_listener_pid_claim_and_takeover_detection(tmp_path: Any) -> None:
    path = str(tmp_path / "a.ipc")
    assert listener_pid(path) is None and socket_identity(path) is None
    claim_ipc_path(path)  # nothing there: fine
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        mine = ctx.socket(zmq.ROUTER)
        mine.setsockopt(zmq.LINGER, 0)
        mine.bind(f"ipc://{path}")
        ident = socket_identity(path)
        assert ident is not None and listener_pid(path) == os.getpid()
        check_ipc_listener(f"ipc://{path}", os.getpid())
        check_ipc_listener("tcp://127.0.0.1:1", 1)  # other transports pass unchecked
        with pytest.raises(EndpointConflict, match="already listens"):
            claim_ipc_path(path)
        with pytest.raises(EndpointConflict, match="took the path over"):
            check_ipc_listener(f"ipc://{path}", os.getpid() + 1)
        assert issubclass(EndpointConflict, CascadaError)
        mine.close(linger=0)  # libzmq's I/O thread closes the listener (its file may stay)
        deadline = time.monotonic() + 5
        while listener_pid(path) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert listener_pid(path) is None
        # A socket file nobody listens on is stale: claim removes it.
        if not os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            s.close()
        assert os.path.exists(path) and listener_pid(path) is None
        check_ipc_listener(f"ipc://{path}", 12345)  # nothing listens: passes (it fails as a dead peer does)
        claim_ipc_path(path)
        assert not os.path.exists(path)
        # Anything else is refused and left alone.
        os.mkdir(path)
        with pytest.raises(EndpointConflict, match="not a socket"):
            claim_ipc_path(path)
        assert os.path.isdir(path)
    finally:
        ctx.term()


async def test_a_peer_that_reconnects_to_another_process_fails_with_endpoint_conflict(tmp_path: Any) -> None:
    """The Peer's checks (actors/_node.py): nothing listens when it connects (the check passes,
    libzmq retries); another process binds the path while the one the ref names is alive; on
    the CONNECTED event the peer is marked dead with EndpointConflict, its pending call fails
    with it, and so does every later one (at once, nothing sent)."""
    import subprocess
    import sys

    from cascada.actors._node import Node, NodeConfig

    node = Node("r18-peer", f"ipc://{tmp_path / 'me.ipc'}", NodeConfig())
    await node.start()
    named = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        endpoint = f"ipc://{tmp_path / 'actor.ipc'}"
        peer = node.peer(endpoint, named.pid, node.host)  # nothing there yet: it connects
        assert peer.dead is None
        call = asyncio.ensure_future(node.call(peer, "actor", "ping", [], timeout=10))
        await asyncio.sleep(0.05)
        rogue = ctx.socket(zmq.ROUTER)  # this process, not the one the ref names
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.bind(endpoint)
        with pytest.raises(EndpointConflict, match="took the path over"):
            await asyncio.wait_for(call, 5)
        assert isinstance(peer.dead, EndpointConflict) and node.stats.endpoint_conflicts == 1
        with pytest.raises(EndpointConflict):
            await node.call(peer, "actor", "ping", [], timeout=10)
        rogue.close(linger=0)
        # A node refuses to bind where a live process listens (here: this one's own node).
        other = Node("r18-binder", node.endpoint, NodeConfig())
        with pytest.raises(EndpointConflict, match="already listens"):
            await other.start()
        await other.close()
    finally:
        named.kill()
        named.wait()
        await node.close()
        ctx.term()


_VICTIM = """\
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.setsockopt(zmq.LINGER, 0); s.bind(sys.argv[1])
print("bound", flush=True); sys.stdin.readline(); s.close(linger=0); print("closed", flush=True)
import time; time.sleep(60)
"""

def _end(proc: Any) -> None:
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


@contextlib.asynccontextmanager
async def _dropped_victim(tmp_path: Any, name: str,
                          script: str = "") -> AsyncIterator[tuple[Any, Any, Any, str, float, Any]]:
    """A node whose Peer connected to a victim process's ipc path; the victim then closed its
    listener (alive, not listening: the peer's pid check still names it). Yields the node,
    the peer, an unbound ROUTER to take the path over with, the path, the connect deadline and
    the victim process (``script``, _VICTIM by default, prints "bound" and, told, "closed")."""
    import subprocess
    import sys

    from cascada.actors._node import Node, NodeConfig

    endpoint = f"ipc://{tmp_path / 'actor.ipc'}"
    node = Node(name, f"ipc://{tmp_path / 'me.ipc'}", NodeConfig())
    await node.start()
    victim = subprocess.Popen([sys.executable, "-c", script or _VICTIM, endpoint], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    ctx: zmq.Context[Any] = zmq.Context()
    rogue = ctx.socket(zmq.ROUTER)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        assert victim.stdout is not None and victim.stdin is not None
        assert victim.stdout.readline().strip() == "bound"
        peer = node.peer(endpoint, victim.pid, node.host)
        deadline = time.monotonic() + 5
        while not peer.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert peer.connected
        victim.stdin.write("close\n")
        victim.stdin.flush()
        assert victim.stdout.readline().strip() == "closed"  # alive, no longer listening; the loop has not run since
        yield node, peer, rogue, endpoint, deadline, victim
    finally:
        rogue.close(linger=0)
        _end(victim)
        await node.close()
        ctx.term()



@pytest.mark.timeout(30)
async def test_a_request_sent_while_disconnected_never_reaches_a_process_that_took_the_path_over(
        tmp_path: Any) -> None:
    """libzmq reconnects on its own threads, and would send what it queued as soon as the new
    connection's handshake completes, before the event loop sees CONNECTED and checks the
    listener. So a Peer holds requests itself while an ipc connection is down, and releases
    them only once the check passes; here it fails, and the held request fails with
    EndpointConflict without ever reaching the process that took the path over."""
    async with _dropped_victim(tmp_path, "r18-queued") as (node, peer, rogue, endpoint, deadline, _):
        while peer.connected and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.005)
        call = asyncio.ensure_future(node.call(peer, "actor", "secret", [], timeout=10))
        await asyncio.sleep(0.01)  # sent: it waits in libzmq for the reconnect
        rogue.bind(endpoint)
        time.sleep(2.5)  # the loop is busy; libzmq reconnects (backoff up to 2 s) on its own threads
        reached = bool(rogue.poll(0))
        with pytest.raises(EndpointConflict):
            await asyncio.wait_for(call, 5)
        assert not reached, "a request sent while disconnected reached the process that took the path over"


@pytest.mark.timeout(30)
async def test_a_first_request_on_a_fresh_connection_never_reaches_a_process_that_took_the_path_over(
        tmp_path: Any) -> None:
    """Nothing listens when the Peer connects (the check before connecting passes, libzmq
    retries); a request made then is held until the check on CONNECTED, so when another
    process binds the path first, it never sees the request."""
    import subprocess
    import sys

    from cascada.actors._node import Node, NodeConfig

    node = Node("r18-fresh", f"ipc://{tmp_path / 'me.ipc'}", NodeConfig())
    await node.start()
    named = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ctx: zmq.Context[Any] = zmq.Context()
    rogue = ctx.socket(zmq.ROUTER)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        endpoint = f"ipc://{tmp_path / 'actor.ipc'}"
        peer = node.peer(endpoint, named.pid, node.host)
        call = asyncio.ensure_future(node.call(peer, "actor", "secret", [], timeout=10))
        await asyncio.sleep(0.01)
        rogue.bind(endpoint)
        time.sleep(1.0)  # the loop is busy; libzmq connects (retry interval 50 ms) on its own
        reached = bool(rogue.poll(0))
        with pytest.raises(EndpointConflict):
            await asyncio.wait_for(call, 5)
        assert not reached, "a request made before the first CONNECTED reached the process that took the path over"
    finally:
        rogue.close(linger=0)
        named.kill()
        named.wait()
        await node.close()
        ctx.term()


@pytest.mark.timeout(30)
@pytest.mark.xfail(strict=False, reason=(
    "a race, so it fails in most runs, not all; residual window (actors/_node.py Peer): a request sent after the connection really dropped "
    "but before the event loop has seen DISCONNECTED goes to zmq (the Peer still believes it is "
    "connected); the Peer replaces that socket as soon as it sees the drop, but if the loop stays "
    "blocked past libzmq's reconnect interval (50 ms) and the path is taken over meanwhile, "
    "libzmq's own reconnect delivers it first. Closing it needs a check libzmq makes itself before "
    "it sends (an identity handshake: CURVE with the actor's server key), not one the loop makes."))
async def test_a_request_sent_before_the_loop_sees_the_drop_never_reaches_a_process_that_took_the_path_over(
        tmp_path: Any) -> None:
    from cascada.transport._wire import Kind

    async with _dropped_victim(tmp_path, "r18-window") as (node, peer, rogue, endpoint, _, _):
        peer.send(Kind.TELL, next(node.corr), "actor", "secret", None, [[], None])
        rogue.bind(endpoint)
        time.sleep(1.0)  # the loop stays blocked; libzmq reconnects on its own threads
        assert not rogue.poll(0), "a request sent before the loop saw the drop reached the process that took the path over"


_REBINDS = """\
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.setsockopt(zmq.LINGER, 0); s.bind(sys.argv[1])
print("bound", flush=True); sys.stdin.readline(); s.close(linger=0); print("closed", flush=True)
sys.stdin.readline(); s = ctx.socket(zmq.ROUTER); s.setsockopt(zmq.LINGER, 0); s.bind(sys.argv[1])
print("rebound", flush=True)
while s.poll(3000):
    frames = s.recv_multipart()
    print(" ".join(m for m in ("expired", "cancelled", "first", "second") if m.encode() in b"".join(frames)), flush=True)
print("done", flush=True)
"""


@pytest.mark.timeout(30)
async def test_requests_held_while_disconnected_keep_deadlines_and_order(tmp_path: Any) -> None:
    """While an ipc connection is down the Peer holds requests: one whose deadline passes
    fails with Overloaded (a DeadlineExceeded: it did not run) and one cancelled by its caller
    is dropped, neither is ever sent; the rest go, in order, once the same process listens
    again and the reconnect is checked."""
    from cascada.actors import Overloaded
    from cascada.transport._wire import Kind

    async with _dropped_victim(tmp_path, "r18-held", _REBINDS) as (node, peer, _, _, deadline, victim):
        while peer.connected and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        with pytest.raises(Overloaded):
            await node.call(peer, "actor", "expired", [], timeout=0.2)
        assert time.monotonic() - t0 < 1.0
        cancelled = asyncio.ensure_future(node.call(peer, "actor", "cancelled", [], timeout=10))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        first = peer.send(Kind.TELL, next(node.corr), "actor", "first", None, [[], None])
        second = peer.send(Kind.TELL, next(node.corr), "actor", "second", None, [[], None])
        assert first is not None and second is not None and not first.done()
        victim.stdin.write("rebind\n")
        victim.stdin.flush()
        assert victim.stdout.readline().strip() == "rebound"
        await asyncio.wait_for(asyncio.gather(peer.wait_sent(first, None, "first"),
                                              peer.wait_sent(second, None, "second")), 5)
        assert peer.connected and peer.dead is None
        got = []
        while (line := (await asyncio.to_thread(victim.stdout.readline)).strip()) != "done":
            got.append(line)
        assert got == ["first", "second"] or got == ["first second"], got


async def test_abstract_namespace_and_tcp_endpoints_are_not_checked(monkeypatch: Any) -> None:
    """No socket file, no SO_PEERCRED check: an abstract-namespace ipc endpoint and a tcp one
    bind and connect as before, whatever pid a ref names."""
    import secrets

    import cascada.actors._node as N
    from cascada.actors import ActorNotFound

    checked: list[Any] = []
    monkeypatch.setattr(N, "check_ipc_listener", lambda *a, **k: checked.append(a))
    monkeypatch.setattr(N, "claim_ipc_path", lambda *a: checked.append(a))
    a = N.Node("abstract", f"ipc://@cascada-test-{secrets.token_hex(6)}", N.NodeConfig())
    b = N.Node("tcp", "tcp://127.0.0.1:*", N.NodeConfig())
    await a.start()
    await b.start()
    try:
        for caller, callee in ((b, a), (a, b)):
            peer = caller.peer(callee.endpoint, 1, caller.host)  # pid 1 is not the listener
            with pytest.raises(ActorNotFound):
                await caller.call(peer, None, "no-such-op", [], timeout=10)
        assert checked == []
    finally:
        await a.close()
        await b.close()


# -- R12 ------------------------------------------------------------------------------------


@pytest.mark.timeout(40)
@pytest.mark.parametrize("how, transport", [("kill9", "ipc"), ("sigstop", "ipc"), ("kill9", "tcp")])
async def test_r12_peer_vanishes_and_never_returns(how: str, transport: str, record_property: Any) -> None:
    """A sender flooding a slow actor (hwm 16, deadline 0.3 s) when the actor is SIGKILLed, or
    SIGSTOPped for good: no send blocks past its deadline, ActorDied comes within 2 s of the
    kill and then at once, the sender's RSS stays flat while the peer is gone."""
    _check(await W.r12_peer_vanishes(how, transport), record_property)


@pytest.mark.timeout(40)
async def test_r12_queued_messages_are_not_replayed_to_a_later_listener(record_property: Any) -> None:
    _check(await W.r12_no_replay_to_a_later_listener(), record_property)


# -- R17 ------------------------------------------------------------------------------------


@pytest.mark.timeout(55)
async def test_r17_per_pair_fifo_under_delay_jitter_and_resets(record_property: Any) -> None:
    """Hypothesis draws chaos-proxy schedules (delay, jitter, stalls, resets both ways), 2-4
    senders and their windows; tcp through the proxy. Per (sender, receiver incarnation):
    strictly increasing, every gap has an error at its sender, no phantom acknowledgement."""
    _check(await W.r17_property(max_examples=10), record_property)


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("CASCADA_SOAK"), reason="soak")
@pytest.mark.timeout(900)
async def test_r17_soak(record_property: Any) -> None:
    _check(await W.r17_property(max_examples=200, seed=int(os.environ.get("CASCADA_SEED", "17"))), record_property)


# -- R18 ------------------------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_r18a_takeover_is_impossible_for_others_and_detected_for_the_same_user(record_property: Any) -> None:
    _check(await W.r18a_takeover_detected(), record_property)


@pytest.mark.timeout(40)
async def test_r18a_a_fresh_client_never_reaches_the_wrong_actor(record_property: Any) -> None:
    _check(await W.r18a_client_never_reaches_the_wrong_actor(), record_property)


@pytest.mark.timeout(40)
async def test_r18b_stale_socket_after_kill9_is_cleaned_or_safely_rebound(record_property: Any) -> None:
    _check(await W.r18b_stale_socket(), record_property)


@pytest.mark.timeout(40)
async def test_r18c_ipc_path_over_107_characters_is_a_clear_configuration_error(record_property: Any) -> None:
    _check(await W.r18c_long_path(), record_property)


# -- R20 ------------------------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_r20_malformed_frames_rejected_counted_actor_keeps_serving(record_property: Any) -> None:
    _check(await W.r20_malformed_frames(), record_property)


@pytest.mark.timeout(40)
async def test_r20_every_malformed_request_with_a_reply_address_is_answered(record_property: Any) -> None:
    _check(await W.r20_error_replies(), record_property)


@pytest.mark.timeout(40)
async def test_r20_batch_with_a_truncated_last_message_is_counted(record_property: Any) -> None:
    _check(await W.r20_batch_with_truncated_tail(), record_property)


def test_r20_reply_address_oracle() -> None:
    assert W.readable_corr(W.ask_frame(7)) == 7
    assert W.readable_corr(W.ask_frame(7)[:5]) == 7  # [9-array, 1, 1, 7 ...: enough to answer
    assert W.readable_corr(W.ask_frame(7, kind=2)) is None  # a tell has nobody to answer
    assert W.readable_corr(W.ask_frame(7).replace(b"\xa3raw", b"\xa3\xff\xfe\xfd")) == 7
    assert W.readable_corr(b"\xc1" + W.ask_frame(7)) is None
    assert W.readable_corr(b"") is None and W.readable_corr(b"\x93\x01") is None


# -- R21 ------------------------------------------------------------------------------------


@pytest.mark.timeout(50)
async def test_r21_size_bombs_rejected_within_the_memory_bound(record_property: Any) -> None:
    _check(await W.r21_size_bombs(), record_property)


@pytest.mark.timeout(40)
async def test_r21_amplification_within_16_mib_at_a_128_kib_header_cap(record_property: Any) -> None:
    _check(await W.r21_amplification(max_header_bytes=128 << 10), record_property)


@pytest.mark.timeout(40)
async def test_r21_amplification_within_16_mib_at_the_default_header_cap(record_property: Any) -> None:
    _check(await W.r21_amplification(), record_property)


@pytest.mark.timeout(60)
async def test_r21_scalar_headers_within_the_stated_bound_at_the_default_header_cap(record_property: Any) -> None:
    _check(await W.r21_scalar_amplification(), record_property)


@pytest.mark.timeout(60)
async def test_r21_every_header_bomb_within_16_mib_at_a_256_kib_header_cap(record_property: Any) -> None:
    _check(await W.r21_scalar_amplification(max_header_bytes=256 << 10, bound_mib=W.BOMB_BOUND_MIB), record_property)


@pytest.mark.timeout(60)
async def test_r21_many_unreferenced_frames_in_one_message(record_property: Any) -> None:
    _check(await W.r21_multipart_total_bytes(), record_property)


@pytest.mark.timeout(60)
@pytest.mark.xfail(strict=True, reason=(
    "libzmq limit: a message of 48 x 1 MiB unreferenced frames is now refused and dropped at once "
    "(VmRSS back to its level), but libzmq assembles a multipart message whole before the "
    "application sees its first frame, and checks ZMQ_MAXMSGSIZE (max_frame_bytes) per frame "
    "only, so the receiver's VmHWM still rises by the 48 MiB sent (up to max_frames x "
    "max_frame_bytes). Only a per-message byte limit inside libzmq (it has none), defaults low "
    "enough that max_frames x max_frame_bytes <= 16 MiB (which would stop tensors travelling "
    "inline), or authenticated peers would bound it."))
async def test_r21_unreferenced_frames_transient_peak_within_16_mib(record_property: Any) -> None:
    _check(await W.r21_multipart_total_bytes(strict_peak=True), record_property)


# -- R22 ------------------------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_r22_hostile_envelopes_get_typed_errors_and_no_handler_runs(record_property: Any) -> None:
    _check(await W.r22_hostile_envelopes(), record_property)


@pytest.mark.timeout(50)
async def test_r22_descriptor_property_against_a_live_actor(record_property: Any) -> None:
    _check(await W.r22_descriptor_property(max_examples=150), record_property)

