"""A CascadaError raised by a handler reaches its caller as its own type, across processes and
through several hops; anything else arrives as RemoteError; hostile details never build
anything but a registered CascadaError."""

from __future__ import annotations

import pytest

import cascada
from cascada.actors._node import error_from_body
from cascada.actors._portable_errors import MAX_DETAILS_BYTES, error_details, rebuild_error
from cascada.transport._errors import ERROR_TYPES, wire_name
from cascada.transport._wire import error_body



class QuotaExceeded(cascada.CascadaError):
    """A user's own error with fields and an __init__ that is not Exception's."""

    def __init__(self, tenant: str, *, used: int, limit: int) -> None:
        super().__init__(f"tenant {tenant} used {used} of {limit}")
        self.tenant = tenant
        self.used = used
        self.limit = limit
        self.window = (0, 60)  # tuples come back as tuples
        self.handle = object()  # not plain data: does not travel
        self._secret = "stays here"


class Leaf(cascada.Actor):
    async def quota(self, tenant: str) -> None:
        raise QuotaExceeded(tenant, used=11, limit=10)

    async def plain(self) -> None:
        raise KeyError("k")

    async def hang(self) -> None:
        import asyncio

        await asyncio.sleep(60)


class Middle(cascada.Actor):
    def __init__(self, leaf: cascada.ActorRef) -> None:
        self.leaf = leaf

    async def call(self, method: str, *args: object, timeout: float | None = None) -> object:
        return await self.leaf.ask(method, *args, timeout=timeout)


@pytest.mark.parametrize("placement", ["local", "process"])
async def test_a_users_cascada_error_arrives_as_itself_through_two_hops(placement: cascada.Placement) -> None:
    async with cascada.ActorSystem() as system:
        leaf = await system.spawn(Leaf, name="leaf", placement=placement)
        mid = await system.spawn(Middle, leaf, name="mid", placement=placement)
        with pytest.raises(QuotaExceeded) as info:
            await mid.ask("call", "quota", "acme")
        err = info.value
        assert (err.tenant, err.used, err.limit, err.window) == ("acme", 11, 10, (0, 60))
        assert str(err) == "tenant acme used 11 of 10"
        assert not hasattr(err, "handle") and not hasattr(err, "_secret")
        if placement == "process":
            notes = err.__notes__
            assert [n.split("\n", 1)[0] for n in notes] == ["Remote traceback (leaf.quota):",
                                                            "Remote traceback (mid.call):"]
            assert "in quota" in notes[0] and "QuotaExceeded: tenant acme" in notes[0]
        else:
            assert isinstance(err.__cause__, QuotaExceeded)  # the local original is kept

        # Anything that is not a CascadaError is a RemoteError; one raised two hops down keeps
        # naming the handler that raised the original.
        with pytest.raises(cascada.RemoteError) as plain:
            await mid.ask("call", "plain")
        assert (plain.value.remote_type, plain.value.actor, plain.value.method) == ("KeyError", "leaf", "plain")


async def test_a_deadline_and_a_death_two_stages_down_arrive_typed() -> None:
    async with cascada.ActorSystem() as system:
        leaf = await system.spawn(Leaf, name="leaf", placement="process")
        mid = await system.spawn(Middle, leaf, name="mid", placement="process")
        with pytest.raises(cascada.DeadlineExceeded):
            await mid.ask("call", "hang", timeout=0.3)  # mid's own call times out first

        import asyncio

        pending = asyncio.ensure_future(mid.ask("call", "hang", timeout=30))
        await asyncio.sleep(0.3)
        await system.kill(leaf)
        with pytest.raises(cascada.ActorDied) as died:
            await pending
        assert died.value.actor == "leaf"


def test_hostile_or_unknown_details_fall_back_to_remote_error() -> None:
    good = error_details(QuotaExceeded("t", used=1, limit=0))
    assert good is not None
    name = wire_name(QuotaExceeded)
    assert ERROR_TYPES[name] is QuotaExceeded
    rebuilt = error_from_body(error_body("remote", name, "m", "tb", good), "a", "m")
    assert isinstance(rebuilt, QuotaExceeded) and rebuilt.used == 1

    cases: list[tuple[str | None, object]] = [
        ("builtins.ValueError", good),                       # not a CascadaError
        ("no.such.Error", good),                             # not registered here
        (name, None),                                        # no details: an old peer
        (name, {"args": "x", "fields": {}}),                 # args not a list
        (name, {"args": [], "fields": {"_secret": 1}}),      # private names are never set
        (name, {"args": [], "fields": {"__class__": 1}}),
        (name, {"args": [], "fields": [], "notes": []}),     # fields not a map
        (wire_name(cascada.StageFailed), {"args": [], "fields": {"detail": 1, "path": []}}),  # rebuild refuses
    ]
    for type_name, details in cases:
        body = error_body("remote", type_name, "msg", None, details)  # type: ignore[arg-type]
        err = error_from_body(body, "a", "m")
        assert type(err) is cascada.RemoteError, (type_name, details, err)
        assert err.remote_message == "msg"


def test_details_that_are_too_large_or_broken_are_dropped() -> None:
    big = QuotaExceeded("t", used=1, limit=0)
    big.blob = b"x" * (MAX_DETAILS_BYTES + 1)  # type: ignore[attr-defined]
    assert error_details(big) is None

    class Broken(cascada.CascadaError):
        def __cascada_fields__(self) -> dict[str, object]:
            raise RuntimeError("no")

    assert error_details(Broken("x")) is None
    assert error_details(ValueError("x")) is None
    assert rebuild_error(None, {"args": [], "fields": {}}, None, None) is None
