"""The Expert actor: MACs against a hand count, dynamic batching across real processes
(batches form, a lone request waits at most max_wait, expired items are not computed, each
caller gets its own result), mixed shapes, and bad configuration."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import cascada
from cascada.stages import StageInputError
from cascada.stages import Expert, count_macs

torch.set_num_threads(1)

D_IN, D_HID, D_OUT = 16, 32, 4
MLP_MACS = D_IN * D_HID + D_HID * D_OUT  # per sample: two Linear layers, biases not counted


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.ReLU(),
                               torch.nn.Linear(D_HID, D_OUT)).double()


# What travels to an actor's process must be importable there or picklable by value: the
# runtime sends only the actor class's own module by value (see test_runtime_gaps.py), so
# factories and models from this module are closures (cloudpickle sends those by value).


def mlp_factory(seed: int) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.ReLU(),
                                   torch.nn.Linear(D_HID, D_OUT)).double()

    return build


def slow_double(seconds: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable model that takes ``seconds`` per batch (busy compute, as a model would)."""

    def model(x: torch.Tensor) -> torch.Tensor:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return x * 2

    return model


def test_macs_of_a_small_mlp_equal_the_hand_count() -> None:
    mlp = make_mlp()
    x = torch.randn(5, D_IN, dtype=torch.float64)
    for method in ("auto", "functions", "hooks", "flops"):
        assert count_macs(mlp, x, method=method) == 5 * MLP_MACS, method
    assert count_macs(mlp, x, method="off") == 0


def test_macs_of_convolutions_and_bare_matmuls() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, groups=2),
                               torch.nn.ConvTranspose2d(8, 4, 2, stride=2))
    x = torch.randn(2, 3, 10, 10)
    hand = 2 * (8 * 10 * 10 * 3 * 9 + 8 * 8 * 8 * 4 * 9 + (8 * 8 * 8) * 4 * 4)
    assert count_macs(conv, x, method="functions") == count_macs(conv, x, method="hooks") == hand

    def attention(q: torch.Tensor) -> torch.Tensor:  # no modules: hooks see nothing
        return F.scaled_dot_product_attention(q, q, q) + (q @ q.transpose(-1, -2)) @ q

    q = torch.randn(2, 5, 4)
    hand = 2 * 5 * 5 * (4 + 4) + 2 * (5 * 5 * 4) + 2 * (5 * 4 * 5)
    assert count_macs(attention, q, method="functions") == hand == count_macs(attention, q, method="flops")
    assert count_macs(attention, q, method="hooks") == 0


async def test_expert_batches_across_processes_and_answers_each_caller() -> None:
    reference = make_mlp(3)
    async with cascada.ActorSystem(preload=("torch",)) as system:
        expert = await system.spawn(Expert, factory=mlp_factory(3), max_batch=8, max_wait=0.05,
                                    threads=1, placement="process")
        xs = [torch.randn(D_IN, dtype=torch.float64) for _ in range(24)]
        outs = await asyncio.gather(*[expert.ask("infer", x, with_cost=(i % 2 == 0)) for i, x in enumerate(xs)])
        for i, (x, out) in enumerate(zip(xs, outs)):
            y = out["out"] if i % 2 == 0 else out
            assert y.shape == (D_OUT,)
            torch.testing.assert_close(y, reference(x[None])[0], rtol=1e-12, atol=1e-12)
            if i % 2 == 0:
                assert out["macs"] == MLP_MACS and out["seconds"] > 0
        stats = await expert.ask("stats")
        assert stats["items"] == 24 and stats["total_macs"] == 24 * MLP_MACS
        assert stats["batches"] < 24 and stats["mean_batch_size"] > 1
        assert max(int(k) for k in stats["sizes"]) > 1 and max(int(k) for k in stats["sizes"]) <= 8
        assert sum(int(k) * v for k, v in stats["sizes"].items()) == 24
        assert stats["total_seconds"] > 0 and stats["macs_per_item"] == {f"[{D_IN}]": MLP_MACS}

        # A lone request waits for company at most max_wait (plus generous slack for 2 cores).
        t0 = time.perf_counter()
        await expert.ask("infer", xs[0])
        assert time.perf_counter() - t0 < 0.05 + 0.3


async def test_expired_items_are_dropped_not_computed_across_processes() -> None:
    async with cascada.ActorSystem(preload=("torch",)) as system:
        expert = await system.spawn(Expert, slow_double(0.3), max_batch=4, max_wait=0.0, threads=1,
                                    in_thread=True, placement="process")
        busy = asyncio.ensure_future(expert.ask("infer", torch.ones(2)))
        end = time.monotonic() + 10
        while not (await expert.ask("stats"))["computing"]:  # the model runs in a thread: stats answer
            assert time.monotonic() < end and not busy.done()
        late = expert.ask("infer", torch.ones(2) * 5, deadline=time.time() + 0.05, timeout=5)
        with pytest.raises(cascada.DeadlineExceeded, match="not computed"):
            await late
        torch.testing.assert_close(await busy, torch.full((2,), 2.0))
        stats = await expert.ask("stats")
        assert stats["items"] == 1 and stats["expired"] == 1

        # The ask's own deadline (the request context) flushes a batch early: max_wait would
        # hold this lone item 30 s; its 1 s timeout, less the slack, sends it after ~0.8 s.
        patient = await system.spawn(Expert, slow_double(0.0), max_batch=4, max_wait=30.0, deadline_slack=0.2,
                                     placement="process")
        t0 = time.perf_counter()
        torch.testing.assert_close(await patient.ask("infer", torch.ones(2), timeout=1.0), torch.full((2,), 2.0))
        assert 0.5 < time.perf_counter() - t0 < 1.0


async def test_mixed_shapes_run_as_groups_and_lists_become_tensors() -> None:
    async with cascada.ActorSystem() as system:
        expert = await system.spawn(Expert, lambda x: x.sum(dim=-1), max_batch=8, max_wait=0.05,
                                    placement="local")
        outs = await asyncio.gather(expert.ask("infer", [1.0, 2.0]), expert.ask("infer", [1.0, 2.0, 3.0]),
                                    expert.ask("infer", [4.0, 4.0]))
        assert [float(o) for o in outs] == [3.0, 6.0, 8.0]
        stats = await expert.ask("stats")
        assert stats["batches"] == 1 and stats["groups"] == 2


async def test_outputs_that_do_not_keep_the_batch_dimension_are_an_error() -> None:
    async with cascada.ActorSystem() as system:
        expert = await system.spawn(Expert, lambda x: x.sum(), placement="local")
        with pytest.raises(StageInputError, match="keep the batch in dim 0"):
            await expert.ask("infer", [1.0, 2.0])


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"max_wait": -1}, "max_wait"),
    ({"macs": "guess"}, "macs must be one of"),
    ({"threads": 0}, "threads"),
    ({"factory": make_mlp}, "exactly one of model= .* and factory="),
])
async def test_bad_expert_config_fails_the_spawn(kwargs: dict[str, Any], match: str) -> None:
    async with cascada.ActorSystem() as system:
        with pytest.raises(cascada.ActorInitFailed, match=match):
            await system.spawn(Expert, make_mlp(), placement="local", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
async def test_asking_for_cuda_without_it_is_a_configuration_error() -> None:
    async with cascada.ActorSystem() as system:
        with pytest.raises(cascada.ActorInitFailed, match="CUDA is not available"):
            await system.spawn(Expert, make_mlp(), device="cuda", placement="local")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_expert_on_cuda_batches_and_returns_cuda_tensors() -> None:
    reference = make_mlp(1)
    async with cascada.ActorSystem() as system:
        expert = await system.spawn(Expert, make_mlp(1), device="cuda", max_batch=4, max_wait=0.02,
                                    placement="local")
        xs = [torch.randn(D_IN, dtype=torch.float64) for _ in range(8)]
        outs = await asyncio.gather(*[expert.ask("infer", x) for x in xs])
        for x, y in zip(xs, outs):
            assert y.is_cuda
            torch.testing.assert_close(y.cpu(), reference(x[None])[0], rtol=1e-9, atol=1e-9)
