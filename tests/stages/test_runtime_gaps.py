"""Runtime behaviour the stage library ran into (once strict xfails; kept as regression tests now the
runtime handles it)."""

from __future__ import annotations

import pytest

import cascada
from cascada.stages import ContentKey, Router


def key_of(item: dict[str, str]) -> str:  # module level in a module the child cannot import
    return item["user"]


async def test_a_module_level_function_from_an_unimportable_module_travels_as_an_argument() -> None:
    async with cascada.ActorSystem() as system:
        router = await system.spawn(Router, ContentKey(["a", "b"], key=key_of), placement="process")
        assert (await router.ask("route", {"user": "x"}))[0][0] in ("a", "b")
