"""F3 moe-dispatch reference: the pieces (route, dispatch, experts, combine) against the
independent reference, capacity drops on constructed examples, and the statistics."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from cascada.workloads import f3  # noqa: E402


def _x(n: int, d: int, seed: int = 1) -> "torch.Tensor":
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pieces_equal_reference_dropless(k: int) -> None:
    params = f3.init_params(32, 8, seed=3)
    x = _x(200, 32)
    idx, w = f3.route(f3.gate_logits(x, params), k)
    plan = f3.dispatch(x, idx, params.n_experts, None)
    outs = [f3.expert_forward(params, b.expert, b.x) for b in plan.batches]
    y = f3.combine(outs, plan, w)
    y_ref, stats = f3.moe_reference(x, params, k, None)
    assert y.shape == (200, 32)
    assert torch.allclose(y, y_ref, atol=1e-6, rtol=0)
    assert stats.dropped == 0 and stats.drop_rate == 0.0 and stats.capacity is None
    assert sum(stats.kept) == 200 * k
    y_layer, stats_layer = f3.moe_layer(x, params, k, None)
    assert torch.equal(y_layer, y) and stats_layer == stats


def test_pieces_equal_reference_with_capacity() -> None:
    params = f3.init_params(16, 4, seed=5)
    x = _x(64, 16, seed=2)
    for cf in (0.5, 1.0, 1.25, 2.0):
        y, st = f3.moe_layer(x, params, 2, cf)
        y_ref, st_ref = f3.moe_reference(x, params, 2, cf)
        assert torch.allclose(y, y_ref, atol=1e-6, rtol=0)
        assert st == st_ref


def _constructed(n: int = 8, e: int = 4) -> "torch.Tensor":
    """Every token prefers expert 0, then expert 1 (experts 2 and 3 get nothing)."""
    logits = torch.zeros(n, e)
    logits[:, 0] = 3.0
    logits[:, 1] = 2.0
    return logits


def test_route_topk_and_renormalised_weights() -> None:
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [5.0, 5.0, 0.0, 0.0]])
    idx, w = f3.route(logits, 2)
    assert idx.tolist() == [[2, 3], [0, 1]]  # the tie in row 2 goes to the lower index first
    assert torch.allclose(w.sum(-1), torch.ones(2))
    p = torch.softmax(logits[0], -1)
    assert torch.allclose(w[0], p[[2, 3]] / p[[2, 3]].sum())
    assert torch.allclose(w[1], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError):
        f3.route(logits, 5)


@pytest.mark.parametrize("cf,capacity,dropped", [(1.0, 4, 8), (1.25, 5, 6), (2.0, 8, 0)])
def test_capacity_drops_first_come_in_token_order(cf: float, capacity: int, dropped: int) -> None:
    n, e, k = 8, 4, 2
    assert f3.capacity_for(n, k, e, cf) == capacity  # ceil(cf * 8 * 2 / 4)
    idx, w = f3.route(_constructed(n, e), k)
    assert idx.tolist() == [[0, 1]] * n
    x = _x(n, 6)
    plan = f3.dispatch(x, idx, e, capacity)
    st = f3.stats_of(plan)
    assert st.requested == [8, 8, 0, 0]
    assert st.kept == [min(8, capacity), min(8, capacity), 0, 0]
    assert st.dropped == dropped and st.drop_rate == dropped / (n * k)
    assert st.tokens_fully_dropped == max(0, n - capacity)
    assert st.imbalance == 2.0  # max 8 over mean 4
    # First come in token order: the first `capacity` tokens are kept by both experts.
    for b in plan.batches[:2]:
        assert b.token_idx.tolist() == list(range(min(8, capacity)))
        assert torch.equal(b.x, x[b.token_idx])
    assert plan.kept[:, 0].tolist() == [i < capacity for i in range(n)]
    # A token dropped everywhere gets y = 0 (its residual carries it in a real model).
    outs = [torch.ones(bt.token_idx.numel(), 6) for bt in plan.batches]
    y = f3.combine(outs, plan, w)
    for t in range(n):
        expected = 1.0 if t < capacity else 0.0
        assert torch.allclose(y[t], torch.full((6,), expected))


def test_capacity_mixed_slots_counts_token_order_not_slot_order() -> None:
    # Token 0 picks (1, 0), token 1 picks (0, 1), token 2 picks (0, 2); capacity 1:
    # expert 0 keeps token 0's second choice (it came first), expert 1 keeps token 0's first.
    idx = torch.tensor([[1, 0], [0, 1], [0, 2]])
    plan = f3.dispatch(_x(3, 4), idx, 3, capacity=1)
    assert plan.kept.tolist() == [[True, True], [False, False], [False, True]]
    assert plan.batches[0].slot.tolist() == [1]
    st = f3.stats_of(plan)
    assert st.dropped == 3 and st.tokens_fully_dropped == 1


def test_stats_imbalance_and_rates() -> None:
    params = f3.init_params(16, 8, seed=0)
    _, st = f3.moe_reference(_x(100, 16), params, 2, 1.0)
    assert sum(st.requested) == 200 and sum(st.kept) == 200 - st.dropped
    assert st.capacity == 25
    assert all(c <= 25 for c in st.kept)
    assert st.imbalance == pytest.approx(max(st.requested) / 25.0)
    assert st.kept_imbalance <= st.imbalance + 1e-12
    assert st.as_dict()["drop_rate"] == st.drop_rate


def test_bytes_moved() -> None:
    idx, _ = f3.route(_constructed(8, 4), 2)
    st = f3.stats_of(f3.dispatch(_x(8, 6), idx, 4, None))
    b = f3.bytes_moved(st, 64, dtype_bytes=2, index_bytes=8)
    assert b["rows"] == 16 and b["to_experts"] == 16 * (64 * 2 + 8)
    assert b["total"] == 2 * b["to_experts"] and b["per_token"] == b["total"] / 8
    local0 = f3.bytes_moved(st, 64, dtype_bytes=2, index_bytes=8, remote_experts=[False, True, True, True])
    assert local0["rows"] == 8
    with pytest.raises(ValueError):
        f3.bytes_moved(st, 64, remote_experts=[True])


def test_load_balancing_loss_is_one_when_uniform() -> None:
    logits = torch.zeros(8, 4)
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    assert float(f3.load_balancing_loss(logits, idx)) == pytest.approx(1.0)
    skewed = f3.load_balancing_loss(_constructed(8, 4), f3.route(_constructed(8, 4), 2)[0])
    assert float(skewed) > 1.0


def test_dispatch_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        f3.dispatch(_x(2, 4), torch.tensor([[0, 5], [1, 2]]), 4)
    with pytest.raises(ValueError):
        f3.dispatch(_x(3, 4), torch.tensor([[0, 1], [1, 2]]), 4)
    with pytest.raises(ValueError):
        f3.capacity_for(8, 2, 4, 0.0)
    assert f3.capacity_for(8, 2, 4, None) is None
    assert f3.capacity_for(10, 2, 8, 1.0) == math.ceil(2.5)


def test_init_is_seeded_and_stack_runs() -> None:
    a, b = f3.init_params(8, 4, seed=7), f3.init_params(8, 4, seed=7)
    assert torch.equal(a.w1, b.w1) and torch.equal(a.gate, b.gate)
    assert not torch.equal(a.w1, f3.init_params(8, 4, seed=8).w1)
    assert (a.d, a.n_experts, a.d_ff) == (8, 4, 32)
    assert f3.expert_macs(64, 256) == 2 * 64 * 256
    stack = f3.init_stack(2, 16, 4, seed=1)
    tokens = f3.domain_tokens("prose", 64, seed=2)
    assert tokens.shape == (64,) and int(tokens.max()) < 128
    assert torch.equal(tokens, f3.domain_tokens("prose", 64, seed=2))
    logits, stats = f3.stack_forward(tokens, stack, 2, None)
    assert logits.shape == (64, 128) and len(stats) == 2
    code = f3.domain_tokens("code", 32, seed=0)
    assert code.shape == (32,)
    rnd = f3.domain_tokens("random", 32, seed=0)
    assert int(rnd.min()) >= 32 and int(rnd.max()) <= 126
