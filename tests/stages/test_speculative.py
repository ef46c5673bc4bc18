"""Speculative decoding with real models: greedy speculative output is token for token the
target's greedy output (in one process and across processes), the actor driver and the
single-process version agree under sampling, acceptance statistics, and errors."""

from __future__ import annotations

import functools
import random

import pytest
import torch

import cascada
from support import noisy_copy
from cascada.stages import (
    Decoder,
    StageInputError,
    TinyCausalLM,
    Verifier,
    generate_tokens,
    greedy_accept,
    speculative_decode,
    speculative_generate,
    tiny_lm,
    verify_drafted,
)
from cascada.stages._speculative import expected_tokens_per_round

torch.set_num_threads(1)

V = 32
# float64: the target's one-pass scores and its step-by-step scores then agree to ~1e-15, so
# no argmax can flip between them (in float32 a near-tie could, legitimately).
make_target = functools.partial(tiny_lm, V, 32, 2, 4, 96, seed=1, dtype="float64")
make_draft = functools.partial(tiny_lm, V, 16, 1, 2, 96, seed=2, dtype="float64")


@pytest.fixture(scope="module")
def target() -> TinyCausalLM:
    return make_target()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(rng.randint(1, 8))] for _ in range(n)]


def test_greedy_speculative_equals_target_greedy_in_one_process(target: TinyCausalLM) -> None:
    drafts = {"random": make_draft(), "noisy": noisy_copy(target, 0.05, 7)}
    accepted = {}
    for name, draft in drafts.items():
        total = 0
        for i, p in enumerate(prompts(20)):
            k = 1 + i % 4
            spec = speculative_decode(draft, target, p, 20, k)
            assert spec.tokens == list(generate_tokens(target, p, 20)), (name, p, k)
            assert spec.stats.emitted == 20
            total += spec.stats.accepted
        accepted[name] = total
    assert accepted["noisy"] > accepted["random"]  # a draft that agrees more gets more accepted


def test_a_draft_equal_to_the_target_is_always_accepted(target: TinyCausalLM) -> None:
    r = speculative_decode(target, target, [1, 2, 3], 21, 4)
    assert r.stats.acceptance_rate == 1.0 and r.stats.position_rates == [1.0] * 4
    assert r.stats.rounds == 5 and r.stats.tokens_per_round == pytest.approx(21 / 5)
    assert r.tokens == list(generate_tokens(target, [1, 2, 3], 21))


def test_acceptance_statistics_per_position(target: TinyCausalLM) -> None:
    draft = noisy_copy(target, 0.3, 3)
    r = speculative_decode(draft, target, [4, 5], 60, 3, mode="sample", seed=1)
    s = r.stats
    assert len(r.tokens) == 60 and s.emitted == 60
    assert s.rounds - 1 <= s.offered_at[0] <= s.rounds  # every round drafts, unless 1 token is left
    assert s.offered_at[0] >= s.offered_at[1] >= s.offered_at[2]
    assert all(a <= o for a, o in zip(s.accepted_at, s.offered_at))
    assert s.accepted == sum(s.accepted_at) and s.emitted == s.accepted + s.rounds
    d = s.as_dict()
    assert d["position_rates"] == s.position_rates and 0.0 <= d["acceptance_rate"] <= 1.0
    assert expected_tokens_per_round(0.0, 3) == 1.0 and expected_tokens_per_round(1.0, 3) == 4.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)


def test_sampled_speculative_runs_are_reproducible(target: TinyCausalLM) -> None:
    draft = noisy_copy(target, 0.1, 5)
    a = speculative_decode(draft, target, [9], 30, 3, mode="sample", seed=123, temperature=0.8, top_k=8)
    b = speculative_decode(draft, target, [9], 30, 3, mode="sample", seed=123, temperature=0.8, top_k=8)
    assert a.tokens == b.tokens and a.stats == b.stats
    c = speculative_decode(draft, target, [9], 30, 3, mode="sample", seed=124, temperature=0.8, top_k=8)
    assert c.tokens != a.tokens


def test_greedy_accept_and_verify_by_hand(target: TinyCausalLM) -> None:
    rows = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert greedy_accept(rows, [1, 0]) == (2, 1)
    assert greedy_accept(rows, [1, 1]) == (1, 0)
    assert greedy_accept(rows, [0, 0]) == (0, 1)
    greedy = list(generate_tokens(target, [3, 1], 4))
    v = verify_drafted(target, [3, 1], greedy[:3])
    assert (v.accepted, v.tokens) == (3, greedy)
    with pytest.raises(StageInputError, match="needs q_rows"):
        verify_drafted(target, [3, 1], greedy[:3], mode="sample")
    with pytest.raises(StageInputError, match=r"q_rows must be \[2, 32\]"):
        verify_drafted(target, [3, 1], greedy[:2], torch.full((2, 7), 1 / 7), mode="sample")
    with pytest.raises(StageInputError, match="probability 0.0"):
        verify_drafted(target, [3, 1], [5], torch.zeros(1, V).index_fill_(1, torch.tensor([6]), 1.0),
                       mode="sample")


def test_bad_run_config(target: TinyCausalLM) -> None:
    with pytest.raises(cascada.ConfigurationError, match="k .* must be an integer >= 1"):
        speculative_decode(target, target, [1], 5, 0)
    with pytest.raises(cascada.ConfigurationError, match="max_rounds"):
        speculative_decode(target, target, [1], 5, 2, max_rounds=0)
    with pytest.raises(cascada.ConfigurationError, match="mode"):
        speculative_decode(target, target, [1], 5, 2, mode="nucleus")  # type: ignore[arg-type]


async def test_speculative_decoding_across_processes(target: TinyCausalLM) -> None:
    async with cascada.ActorSystem(preload=("torch",)) as system:
        draft_ref = await system.spawn(Decoder, factory=make_draft, threads=1, name="draft", placement="process")
        target_ref = await system.spawn(Verifier, factory=make_target, threads=1, name="target",
                                        placement="process")
        for i, p in enumerate(prompts(8, seed=3)):
            k = 1 + i % 4
            r = await speculative_generate(draft_ref, target_ref, p, 16, k)
            assert r.tokens == list(generate_tokens(target, p, 16)), (p, k)
            assert r.stats.emitted == 16 and len(r.stats.position_rates) == k
        # Sampling over actors gives the tokens and statistics of the single-process run with
        # the same seed (the same per-round seeds reach the same code).
        local = speculative_decode(make_draft(), target, [7, 7], 24, 3, mode="sample", seed=99, top_k=12)
        remote = await speculative_generate(draft_ref, target_ref, [7, 7], 24, 3, mode="sample", seed=99, top_k=12)
        assert remote.tokens == local.tokens and remote.stats == local.stats
        assert remote.stats.drafted > 0
        stats = await target_ref.ask("stats")
        assert stats["rounds"] > 8 and stats["accepted"] >= 0
        with pytest.raises(cascada.DeadlineExceeded):
            await speculative_generate(draft_ref, target_ref, [1], 80, 3, timeout=0.001)
        with pytest.raises(StageInputError, match="no check"):
            await target_ref.ask("check", [0.5, 0.5])


async def test_sampling_verification_refuses_a_draft_of_another_vocabulary() -> None:
    async with cascada.ActorSystem() as system:
        small = functools.partial(tiny_lm, 8, 16, 1, 2, 32, seed=3, dtype="float64")
        draft_ref = await system.spawn(Decoder, factory=small, placement="local")
        target_ref = await system.spawn(Verifier, factory=make_target, placement="local")
        with pytest.raises(StageInputError, match=r"q_rows must be \[2, 32\]"):
            await speculative_generate(draft_ref, target_ref, [1], 5, 2, mode="sample", seed=1)
