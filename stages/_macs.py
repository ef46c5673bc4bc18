"""Counting multiply-accumulates (MACs) of one forward pass.

The convention: one MAC per multiply-add of a weight (or the other matrix) with an input;
biases, activations and normalisation are not counted. Three counters:

- ``"functions"`` (what ``"auto"`` uses): a ``TorchFunctionMode`` that sees the torch-level
  calls ``F.linear`` (every ``nn.Linear``), ``matmul`` / ``@`` / ``mm`` / ``bmm`` /
  ``addmm`` / ``baddbmm``, ``conv1d/2d/3d``, ``conv_transpose1d/2d/3d`` and
  ``scaled_dot_product_attention``, from modules or bare code alike. Cheap to start.
- ``"hooks"``: forward hooks on ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
  ``nn.ConvTranspose1d/2d/3d`` only (a bare matmul inside ``forward`` is not seen).
- ``"flops"``: torch's ``FlopCounterMode`` at the aten level (MACs = FLOPs / 2). The most
  complete, but its first use in a process imports sympy and takes about a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

MacMethod = Literal["auto", "functions", "hooks", "flops", "off"]
MAC_METHODS = ("auto", "functions", "hooks", "flops", "off")

# -- forward hooks ---------------------------------------------------------------------------------------


def _hooked_macs(module: Any, inputs: tuple[Any, ...], output: Any) -> int:
    import torch

    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(module, torch.nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor):
            return 0
        return x.numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    return 0


def _run_hooked(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, int]:
    import torch

    total = [0]
    handles = []
    if isinstance(fn, torch.nn.Module):
        counted = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                   torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)

        def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            total[0] += _hooked_macs(module, inputs, output)

        handles = [m.register_forward_hook(hook) for m in fn.modules() if isinstance(m, counted)]
    try:
        out = fn(*args)
    finally:
        for h in handles:
            h.remove()
    return out, total[0]


# -- torch function mode --------------------------------------------------------------------------------


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _function_macs(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    import torch

    if not isinstance(out, torch.Tensor):
        return 0
    if name == "linear":
        w = _arg(args, kwargs, 1, "weight")
        return out.numel() * int(w.shape[-1]) if isinstance(w, torch.Tensor) else 0
    if name in ("matmul", "__matmul__", "mm", "bmm"):
        a = args[0] if args else kwargs.get("input")
        return out.numel() * int(a.shape[-1]) if isinstance(a, torch.Tensor) and a.dim() else 0
    if name == "__rmatmul__":
        a = args[1] if len(args) > 1 else None
        return out.numel() * int(a.shape[-1]) if isinstance(a, torch.Tensor) and a.dim() else 0
    if name in ("addmm", "baddbmm"):
        a = _arg(args, kwargs, 1, "mat1" if name == "addmm" else "batch1")
        return out.numel() * int(a.shape[-1]) if isinstance(a, torch.Tensor) else 0
    if name in ("conv1d", "conv2d", "conv3d"):
        w = _arg(args, kwargs, 1, "weight")
        return out.numel() * math.prod(w.shape[1:]) if isinstance(w, torch.Tensor) else 0
    if name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
        if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor):
            return x.numel() * math.prod(w.shape[1:])
        return 0
    if name == "scaled_dot_product_attention":
        q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
        if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            rows = int(q.numel()) // int(q.shape[-1])  # batch * heads * L
            return rows * int(k.shape[-2]) * (int(q.shape[-1]) + int(v.shape[-1]))
    return 0


def _run_functions(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, int]:
    from torch.overrides import TorchFunctionMode

    total = [0]

    class _Count(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, a: tuple[Any, ...] = (),
                               kw: dict[str, Any] | None = None) -> Any:
            kw = kw or {}
            out = func(*a, **kw)
            total[0] += _function_macs(getattr(func, "__name__", ""), a, kw, out)
            return out

    with _Count():
        out = fn(*args)
    return out, total[0]


# -- aten flop counter ---------------------------------------------------------------------------------


def _run_flops(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, int]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args)
    return out, int(counter.get_total_flops()) // 2


def run_counted(fn: Callable[..., Any], *args: Any, method: MacMethod = "auto") -> tuple[Any, int]:
    """Call ``fn(*args)`` once and return ``(output, MACs of that call)``."""
    if method == "off":
        return fn(*args), 0
    if method == "hooks":
        return _run_hooked(fn, args)
    if method == "flops":
        return _run_flops(fn, args)
    return _run_functions(fn, args)


def count_macs(fn: Callable[..., Any], *args: Any, method: MacMethod = "auto") -> int:
    """MACs of one call ``fn(*args)`` (runs it once, without gradients)."""
    import torch

    with torch.no_grad():
        return run_counted(fn, *args, method=method)[1]
