"""The Expert actor: a torch module (or any callable) on a device, with dynamic batching and
a compute cost per item."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..actors import Actor, ConfigurationError, concurrent
from ._batching import DynamicBatcher
from ._context import request_deadline
from ._macs import MAC_METHODS, MacMethod, run_counted
from ._torchutil import as_tensor, build_model, check_model_args, resolve_device, set_threads, split_batch

if TYPE_CHECKING:
    import torch


class Expert(Actor):
    """Runs a model on items sent one at a time, batching them dynamically.

    Give exactly one of ``model`` (a ``torch.nn.Module`` or any callable taking a batched
    tensor) and ``factory`` (a callable with no arguments that returns one, called in the
    actor's own process: the weights need not travel).

    **Shapes.** Each item is ONE sample *without* a batch dimension: shape ``[...]``. Items
    of the same shape and dtype are stacked along a new dim 0 into ``[B, ...]``, the model
    runs once, and its output (a tensor, or tuples/lists/dicts of tensors, batch in dim 0) is
    split back, so each caller gets its own sample's output, again without the batch
    dimension. Items of different shapes in one batch run as separate groups. Lists and numpy
    arrays are turned into tensors; outputs stay on the model's device.

    - ``device``: ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``; asking for CUDA where it
      is not available fails the spawn (ConfigurationError).
    - ``max_batch`` / ``max_wait`` / ``deadline_slack``: dynamic batching (see
      ``DynamicBatcher``); the defaults (1, 0.0) compute each item alone, at once. A request's
      deadline (its ask timeout, or ``cascada.current_context().deadline``) counts too.
    - ``macs``: how MACs are counted, once per input shape: "auto" (= "functions"),
      "functions", "hooks", "flops" or "off" (see ``cascada.stages._macs``).
    - ``threads``: ``torch.set_num_threads`` for the actor's process (None leaves it).
    - ``in_thread``: run the model in one worker thread instead of on the actor's event loop.
      Off by default: each batch then pays a hand-over to the thread and back (and the GIL
      between them), which small models cannot afford (the benchmark's MLP, unbatched, ran
      about 9x slower in a thread on a busy 2-core machine). Turn it on for batches that take
      tens of milliseconds or more, so the actor keeps answering (stats, heartbeats) and
      receiving the next batch's requests while one computes.

    Handlers: ``infer(x, with_cost=False, deadline=None)`` (concurrent: many in flight),
    ``stats()``.
    """

    def __init__(self, model: Any = None, *, factory: Callable[[], Any] | None = None, device: str = "cpu",
                 max_batch: int = 1, max_wait: float = 0.0, macs: MacMethod = "auto", threads: int | None = None,
                 in_thread: bool = False, deadline_slack: float = 0.005) -> None:
        where = "Expert"
        check_model_args(model, factory, where)
        if macs not in MAC_METHODS:
            raise ConfigurationError(f"{where}: macs must be one of {MAC_METHODS}, got {macs!r}")
        self._device = resolve_device(device, where)
        set_threads(threads, where)
        self._model = build_model(model, factory, self._device, where)
        self._batcher: DynamicBatcher[Any, tuple[Any, int, float]] = DynamicBatcher(
            self._run_batch, max_batch, max_wait, deadline_slack=deadline_slack, name=f"{where} batcher")
        self._macs_method: MacMethod = macs
        self._macs_per_item: dict[tuple[Any, ...], int] = {}
        self._in_thread = bool(in_thread)
        self._pool: ThreadPoolExecutor | None = None
        self.total_macs = 0
        self.total_seconds = 0.0
        self.groups = 0

    async def on_start(self) -> None:
        if self._in_thread:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascada-expert")

    async def on_stop(self) -> None:
        await self._batcher.aclose(drain=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- compute ---------------------------------------------------------------------------------

    async def _run_batch(self, items: list[Any]) -> list[tuple[Any, int, float]]:
        if self._pool is None:
            return self._compute(items)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._compute, items)

    def _compute(self, items: list[torch.Tensor]) -> list[tuple[Any, int, float]]:
        import torch

        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, x in enumerate(items):
            groups.setdefault((tuple(x.shape), x.dtype), []).append(i)
        results: list[tuple[Any, int, float]] = [(None, 0, 0.0)] * len(items)
        for key, idxs in groups.items():
            x = torch.stack([items[i] for i in idxs]).to(self._device, non_blocking=True)
            t0 = time.perf_counter()
            with torch.no_grad():
                per_item = self._macs_per_item.get(key)
                if per_item is None:
                    out, macs = run_counted(self._model, x, method=self._macs_method)
                    per_item = self._macs_per_item[key] = macs // len(idxs)
                else:
                    out = self._model(x)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            dt = time.perf_counter() - t0
            parts = split_batch(out, len(idxs), "Expert")
            share = dt / len(idxs)
            for i, part in zip(idxs, parts):
                results[i] = (part, per_item, share)
            self.groups += 1
            self.total_seconds += dt
            self.total_macs += per_item * len(idxs)
        return results

    # -- handlers ---------------------------------------------------------------------------------

    @concurrent
    async def infer(self, x: Any, with_cost: bool = False, deadline: float | None = None) -> Any:
        """The model's output for one sample ``x`` (shape ``[...]``, no batch dimension).

        With ``with_cost``: ``{"out": y, "macs": int, "seconds": float}``, where ``macs`` is
        this sample's share of the batch's MACs and ``seconds`` its share of the batch's
        measured time. ``deadline`` (absolute ``time.time()``) and the request's own deadline
        both count: an item whose deadline passes while it waits is not computed
        (DeadlineExceeded), and one close to its deadline is flushed early."""
        t = as_tensor(x, "Expert.infer")
        out, macs, seconds = await self._batcher.submit(t, request_deadline(deadline))
        if with_cost:
            return {"out": out, "macs": macs, "seconds": seconds}
        return out

    async def stats(self) -> dict[str, Any]:
        """Batches formed, items, batch-size histogram and mean, expired items, total MACs and
        total compute seconds (batches of mixed shapes count once per shape group in
        ``groups``), and what waits (``pending``) or computes (``computing``) now."""
        s = self._batcher.stats().as_dict()
        s.update({"groups": self.groups, "total_macs": self.total_macs, "total_seconds": self.total_seconds,
                  "macs_per_item": {str(list(k[0])): v for k, v in self._macs_per_item.items()},
                  "pending": self._batcher.pending, "computing": self._batcher.computing,
                  "device": str(self._device), "max_batch": self._batcher.max_batch,
                  "max_wait": self._batcher.max_wait})
        return s
