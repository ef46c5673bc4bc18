"""Logging that cannot flood: at most one line per key per interval, with a count of the rest."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("cascada")


class RateLimitedLog:
    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            log.warning(msg + " (%d more like this suppressed)", *args, n)
        else:
            log.warning(msg, *args)
