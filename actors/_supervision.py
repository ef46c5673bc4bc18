"""Supervision in OTP's terms: the tree's bookkeeping and the Supervisor actor.

A supervisor holds an ordered list of children (actors and other supervisors). When a child
fails, its restart type says whether it comes back (``permanent``: always; ``transient``:
only after an abnormal exit; ``temporary``: never), and the supervisor's strategy says who
comes back with it (``one_for_one``: only it; ``one_for_all``: every child; ``rest_for_one``:
it and the children started after it). Children start in list order and stop in reverse.
More than ``intensity`` restarts within ``period`` seconds and the supervisor gives up: it
stops its children and fails itself, so its own supervisor decides (escalation). The
restarting is done by the ActorSystem, which owns the processes; this module only decides.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

from ._actor import Actor
from ._errors import ConfigurationError, RestartIntensityExceeded

if TYPE_CHECKING:
    from ._system import ActorSystem

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]
STRATEGIES: tuple[Strategy, ...] = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_TYPES: tuple[RestartType, ...] = ("permanent", "transient", "temporary")
MAX_EVENTS = 1000


def check_restart(restart: object) -> RestartType:
    if restart not in RESTART_TYPES:
        raise ConfigurationError(f"restart must be one of {RESTART_TYPES}, got {restart!r}")
    return restart


class SupervisorState:
    """One supervisor's children, restart history and event log."""

    def __init__(self, name: str, strategy: Strategy, intensity: int, period: float,
                 parent: SupervisorState | None, restart: RestartType) -> None:
        if strategy not in STRATEGIES:
            raise ConfigurationError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not (isinstance(intensity, int) and not isinstance(intensity, bool) and intensity >= 0):
            raise ConfigurationError(f"intensity must be a non-negative int (restarts allowed per period), got {intensity!r}")
        if not (isinstance(period, (int, float)) and period > 0):
            raise ConfigurationError(f"period must be a positive number of seconds, got {period!r}")
        self.name = name
        self.strategy = strategy
        self.intensity = intensity
        self.period = float(period)
        self.parent = parent
        self.restart = check_restart(restart)
        self.children: list[str] = []  # start order
        self.restarts: deque[float] = deque()
        self.failed: RestartIntensityExceeded | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)

    def event(self, what: str, child: str | None = None, **details: Any) -> None:
        self.events.append({"t": time.monotonic(), "event": what, "child": child, **details})

    def note_restart(self, child: str) -> RestartIntensityExceeded | None:
        """Count a restart that is about to happen; the error to escalate with when it is one
        too many for the intensity."""
        now = time.monotonic()
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > self.period:
            self.restarts.popleft()
        if len(self.restarts) <= self.intensity:
            return None
        count = len(self.restarts) - 1
        return RestartIntensityExceeded(
            f"supervisor {self.name!r} gave up: actor {child!r} failed again after {count} restart(s) within "
            f"{self.period:g}s (intensity {self.intensity} in {self.period:g}s); it stopped its children and "
            "escalated. Fix the failing actor, or raise the intensity or period.",
            supervisor=self.name, actor=child, count=count, period=self.period,
        )

    def affected(self, child: str) -> list[str]:
        """Who restarts, in start order, when ``child`` failed."""
        if self.strategy == "one_for_one" or child not in self.children:
            return [child]
        if self.strategy == "one_for_all":
            return list(self.children)
        return self.children[self.children.index(child):]


class Supervisor(Actor):
    """The actor face of a supervisor: ask it about its children and what happened to them.
    Made by ``ActorSystem.supervisor``; lives in the system's process."""

    def __init__(self, system: ActorSystem, state: SupervisorState) -> None:
        self._system = system
        self._state = state

    async def children(self) -> list[dict[str, Any]]:
        """Each child in start order: name, kind (actor or supervisor), restart type, pid and
        incarnation (None while it is down)."""
        return self._system._children_of(self._state)

    async def events(self) -> list[dict[str, Any]]:
        """What happened, oldest first: start, stop, exit (with the reason and, for a process, its
        exit status), restart, escalate."""
        return list(self._state.events)

    async def status(self) -> dict[str, Any]:
        """Strategy, intensity and period, restarts within the current period, and the
        escalation error if it gave up."""
        state = self._state
        return {"name": state.name, "strategy": state.strategy, "intensity": state.intensity,
                "period": state.period, "restarts_in_period": len(state.restarts),
                "failed": None if state.failed is None else str(state.failed)}
