"""Helpers shared by the tests. (Tests import these from here, never from conftest: a test
module that imports conftest executes it a second time as another module.)"""

from __future__ import annotations

import glob
from typing import Any

import cascada


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, grandchildren, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, "rb") as f:
                data = f.read()
        except OSError:
            continue
        after = data[data.rfind(b")") + 2 :].split()
        if after[0] in (b"Z", b"X"):
            continue
        parents.setdefault(int(after[1]), []).append(int(stat.split("/")[2]))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def system_kwargs(placement: str) -> dict[str, Any]:
    return {"transport": "tcp"} if placement == "process-tcp" else {}


def spawn_placement(placement: str) -> cascada.Placement:
    return "local" if placement == "local" else "process"


def noisy_copy(model: Any, scale: float, seed: int) -> Any:
    """A float64 TinyCausalLM that mostly agrees with ``model``: its weights plus noise (a
    draft for the speculative-decoding tests)."""
    import torch

    from cascada.stages import tiny_lm

    out = tiny_lm(model.vocab, model.d, len(model.blocks), model.blocks[0].heads, model.max_len, dtype="float64")
    out.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return out
