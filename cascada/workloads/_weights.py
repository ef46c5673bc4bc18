"""Where the committed weights live, and fp16 save / fp32 load of state dicts."""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"


def weights_path(name: str) -> pathlib.Path:
    """Return the path of the committed file ``name`` under ``cascada/workloads/weights``."""
    return WEIGHTS_DIR / name


def save_state(state: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    """Write ``state`` to ``path`` with floating tensors stored as float16 (small files)."""
    import torch

    half = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().clone()
            for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(half, path)


def load_state(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """Return the state dict saved at ``path`` by :func:`save_state`, floats back in float32.
    Raises FileNotFoundError when the file is missing."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}; run the training script under scripts/ to make them")
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()}


def save_json(obj: Any, path: pathlib.Path) -> None:
    """Write ``obj`` to ``path`` as indented JSON with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def load_json(path: pathlib.Path) -> Any:
    """Return the JSON document at ``path``."""
    return json.loads(path.read_text())
