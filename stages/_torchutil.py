"""What the torch-backed stages share: devices, loading a model, stacking and splitting."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..actors import ConfigurationError
from ._errors import StageInputError

if TYPE_CHECKING:
    import torch

_DEVICE = re.compile(r"^(cpu|cuda)(:\d+)?$")


def resolve_device(device: Any, where: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch.device; ConfigurationError when the
    name is not one of those or CUDA (or that GPU) is not available in this process."""
    import torch

    name = str(device) if isinstance(device, torch.device) else device
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ConfigurationError(f"{where}: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(f"{where}: device {name!r} was asked for but CUDA is not available in this "
                                     "process (no GPU, or a CPU-only torch build): use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigurationError(f"{where}: device {name!r} does not exist; this process sees "
                                     f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_model_args(model: Any, factory: Any, where: str) -> None:
    if (model is None) == (factory is None):
        raise ConfigurationError(f"{where}: give exactly one of model= (a torch module or a callable) and "
                                 "factory= (a callable with no arguments that returns one)")
    if model is not None and not callable(model):
        raise ConfigurationError(f"{where}: model must be a torch module or a callable, got {type(model).__name__}")
    if factory is not None and not callable(factory):
        raise ConfigurationError(f"{where}: factory must be a callable that returns a model, got {factory!r}")


def build_model(model: Any, factory: Callable[[], Any] | None, device: torch.device, where: str) -> Any:
    """The model on ``device`` in eval mode (a plain callable is returned as is)."""
    import torch

    if factory is not None:
        model = factory()
        if not callable(model):
            raise ConfigurationError(f"{where}: the factory returned {type(model).__name__}, not a model")
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
        model.eval()
    return model


def set_threads(threads: int | None, where: str) -> None:
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigurationError(f"{where}: threads must be an integer >= 1 or None, got {threads!r}")
    import torch

    torch.set_num_threads(threads)


def as_tensor(x: Any, where: str) -> torch.Tensor:
    """A torch tensor from a tensor, a numpy array or a (nested) list of numbers."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    try:
        if type(x).__module__ == "numpy":
            return torch.from_numpy(x)
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise StageInputError(f"{where}: cannot make a tensor of {type(x).__name__}: {exc}") from exc


def split_batch(out: Any, n: int, where: str) -> list[Any]:
    """Split a batched output (a tensor, or tuples, lists and dicts of tensors) along dim 0."""
    import torch

    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != n:
            raise StageInputError(f"{where}: the model returned shape {tuple(out.shape)} for a batch of {n}; its "
                                  "output must keep the batch in dim 0")
        return list(out.unbind(0))
    if isinstance(out, (tuple, list)):
        cols = [split_batch(o, n, where) for o in out]
        return [[c[i] for c in cols] for i in range(n)]
    if isinstance(out, dict):
        split = {k: split_batch(v, n, where) for k, v in out.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(n)]
    raise StageInputError(f"{where}: cannot split a model output of type {type(out).__name__} per item: return a "
                          "tensor, or tuples, lists or dicts of tensors")
