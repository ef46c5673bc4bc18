"""Linux PR_SET_PDEATHSIG: a process asks to be signalled when its parent dies."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int) -> bool:
    """Best effort; False where the platform has no prctl (then EOF on the spawn channel is
    the only fate-sharing signal)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except OSError:
        return False
