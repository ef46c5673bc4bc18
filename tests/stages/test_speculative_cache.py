"""Speculative decoding with KV caches carried across rounds (KVSession, actor sessions).

Cached and uncached runs give the same tokens for the same seed, in one process and across
processes; the target runs only its last emitted token plus the drafted ones per round; both
sides roll back after rejections; models that keep no cache still work; sessions are
bounded (LRU) and ended by the driver."""

from __future__ import annotations

import asyncio
import functools
import random
from typing import Any

import pytest
import torch

import cascada
from support import noisy_copy
from cascada.stages import (
    Decoder,
    TinyCausalLM,
    Verifier,
    draft_tokens,
    generate_tokens,
    speculative_decode,
    speculative_generate,
    tiny_lm,
    verify_drafted,
)
from cascada.stages._decoder import KVSession, SessionCache, truncate_cache

torch.set_num_threads(1)

V = 32
make_target = functools.partial(tiny_lm, V, 32, 2, 4, 128, seed=1, dtype="float64")
make_draft = functools.partial(tiny_lm, V, 16, 1, 2, 128, seed=2, dtype="float64")


def make_close_draft() -> TinyCausalLM:
    """A draft that agrees with the target often, so rounds both accept and reject."""
    return noisy_copy(make_target(), 0.15, 11)


class Counting:
    """Wraps a decoder-protocol model: counts positions fed per call; ``no_cache`` makes it
    return None as its past (a model that keeps no cache)."""

    def __init__(self, model: TinyCausalLM, no_cache: bool = False) -> None:
        self.model = model
        self.vocab = model.vocab
        self.no_cache = no_cache
        self.fed: list[int] = []

    def __call__(self, tokens: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, Any]:
        self.fed.append(int(tokens.shape[1]))
        logits, new_past = self.model(tokens, None if self.no_cache else past)
        return logits, None if self.no_cache else new_past


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(rng.randint(1, 8))] for _ in range(n)]


@pytest.fixture(scope="module")
def target() -> TinyCausalLM:
    return make_target()


@pytest.fixture(scope="module")
def draft() -> TinyCausalLM:
    return make_close_draft()


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_cached_and_uncached_give_identical_tokens_in_one_process(target: TinyCausalLM, draft: TinyCausalLM,
                                                                  mode: str) -> None:
    rejected = 0
    for i, p in enumerate(prompts(8, seed=1)):
        k = 1 + i % 4
        kw: dict[str, Any] = {"mode": mode, "seed": 40 + i, "temperature": 0.9, "top_k": 16 if i % 2 else None}
        cached = speculative_decode(draft, target, p, 40, k, use_cache=True, **kw)
        plain = speculative_decode(draft, target, p, 40, k, use_cache=False, **kw)
        assert cached.tokens == plain.tokens, (mode, p, k)
        assert cached.stats == plain.stats
        rejected += cached.stats.drafted - cached.stats.accepted
        if mode == "greedy":
            assert cached.tokens == list(generate_tokens(target, p, 40))
    assert rejected > 0  # rollbacks really happened


def test_the_target_runs_only_its_last_token_and_the_drafted_ones(target: TinyCausalLM,
                                                                   draft: TinyCausalLM) -> None:
    t, d = Counting(target), Counting(draft)
    prompt = [3, 1, 4, 1, 5]
    r = speculative_decode(d, t, prompt, 40, 4, mode="sample", seed=5)
    assert r.tokens == speculative_decode(draft, target, prompt, 40, 4, mode="sample", seed=5, use_cache=False).tokens
    # Round 1 scores the prompt; after that each target pass is 1 + (tokens drafted that round).
    assert len(t.fed) == r.stats.rounds
    assert t.fed[0] == len(prompt) + 4
    assert sum(t.fed[1:]) == (r.stats.rounds - 1) + r.stats.drafted - 4
    assert max(t.fed[1:]) <= 5
    # The draft: the prompt once, then per round at most the tokens emitted since its cache
    # (rolled back to the common prefix) plus one position per further drafted token.
    assert d.fed[0] == len(prompt)
    assert sum(d.fed) <= len(prompt) + r.stats.emitted + r.stats.drafted


def test_models_without_a_cache_re_score_the_prefix(target: TinyCausalLM, draft: TinyCausalLM) -> None:
    t, d = Counting(target, no_cache=True), Counting(draft, no_cache=True)
    prompt = [7, 7, 2]
    r = speculative_decode(d, t, prompt, 24, 3, mode="sample", seed=9)
    ref = speculative_decode(draft, target, prompt, 24, 3, mode="sample", seed=9)
    assert r.tokens == ref.tokens and r.stats == ref.stats
    assert t.fed[0] == len(prompt) + 3 and t.fed[-1] > len(prompt) + 10  # the whole prefix, every round


def test_kv_session_rolls_back_to_the_common_prefix(target: TinyCausalLM) -> None:
    s = KVSession(target)
    seq = [1, 2, 3, 4, 5, 6]
    full = target(torch.tensor([seq + [7, 8]]))[0][0]
    rows = s.score(seq, [7, 8])
    assert torch.allclose(rows, full[-2:], atol=1e-12) and s.cached == 8
    # A different continuation after [1, 2, 3, 4]: the cache keeps 4 positions, runs 3.
    rows = s.score([1, 2, 3, 4], [9, 9, 9])
    assert torch.allclose(rows, target(torch.tensor([[1, 2, 3, 4, 9, 9, 9]]))[0][0, -3:], atol=1e-12)
    assert s.positions_run == 8 + 3 and s.tokens == [1, 2, 3, 4, 9, 9, 9]
    s.rollback(2)
    assert s.cached == 2 and s.past[0][0].shape[2] == 2
    s.rollback(0)
    assert s.cached == 0 and s.past is None
    # truncate_cache: a model's own truncate_past wins; an unknown past gives None.
    assert truncate_cache(target, object(), 3) is None
    assert truncate_cache(target, None, 3) is None


def test_kv_session_matches_charlm_truncate_past() -> None:
    from cascada.workloads import f2

    model = f2.CharLM(f2.LMConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, d_ff=64, context_len=64)).double()
    _, past = model(torch.tensor([[1, 2, 3, 4, 5]]))
    mine, theirs = truncate_cache(model, past, 3), f2.truncate_past(past, 3)
    assert all(torch.equal(a, b) for la, lb in zip(mine, theirs) for a, b in zip(la, lb))
    assert type(mine) is type(past)


def test_verify_and_draft_with_a_session_equal_without(target: TinyCausalLM, draft: TinyCausalLM) -> None:
    kv_t, kv_d = KVSession(target), KVSession(draft)
    seq = [2, 4, 6]
    for r in range(6):
        d1, q1 = draft_tokens(draft, seq, 3, mode="sample", seed=r, session=kv_d)
        d2, q2 = draft_tokens(draft, seq, 3, mode="sample", seed=r)
        assert d1 == d2 and torch.allclose(q1, q2, atol=1e-12)
        v1 = verify_drafted(target, seq, d1, q1, mode="sample", seed=100 + r, session=kv_t)
        v2 = verify_drafted(target, seq, d1, q1, mode="sample", seed=100 + r)
        assert v1 == v2
        assert kv_t.tokens == seq + d1[: v1.accepted]  # rolled back to the accepted length
        seq = seq + v1.tokens


def test_session_cache_is_lru_bounded(target: TinyCausalLM) -> None:
    c = SessionCache(target, 2)
    a, b = c.get("a"), c.get("b")
    assert c.get("a") is a  # touch a: b is now the least recently used
    c.get("c")
    assert "b" not in c and "a" in c and len(c) == 2 and c.stats()["evicted"] == 1
    assert c.end("a") and not c.end("a") and len(c) == 1
    assert b is not None
    with pytest.raises(cascada.ConfigurationError, match="max_sessions"):
        SessionCache(target, 0)
    with pytest.raises(cascada.stages.StageInputError, match="session ids"):
        c.get(3)


async def _settled(ref: cascada.ActorRef, key: str, want: int) -> dict[str, Any]:
    for _ in range(100):
        st: dict[str, Any] = await ref.ask("stats")
        if st[key] == want:
            return st
        await asyncio.sleep(0.01)
    return st


async def test_cached_and_uncached_agree_across_processes(target: TinyCausalLM, draft: TinyCausalLM) -> None:
    async with cascada.ActorSystem(preload=("torch",)) as system:
        draft_ref = await system.spawn(Decoder, factory=make_close_draft, threads=1, name="draft",
                                       placement="process")
        target_ref = await system.spawn(Verifier, factory=make_target, threads=1, name="target",
                                        placement="process", max_sessions=1)
        for i, p in enumerate(prompts(4, seed=5)):
            k = 2 + i % 3
            for mode in ("greedy", "sample"):
                kw: dict[str, Any] = {"mode": mode, "seed": 7 + i, "top_k": 20}
                cached = await speculative_generate(draft_ref, target_ref, p, 30, k, cache=True, **kw)
                plain = await speculative_generate(draft_ref, target_ref, p, 30, k, cache=False, **kw)
                local = speculative_decode(draft, target, p, 30, k, **kw)
                assert cached.tokens == plain.tokens == local.tokens, (p, k, mode)
                assert cached.stats == plain.stats == local.stats
        # Sessions are ended when a run ends.
        assert (await _settled(target_ref, "sessions", 0))["sessions"] == 0
        assert (await _settled(draft_ref, "sessions", 0))["sessions"] == 0
        # Two runs at once on a target that holds one session: they evict each other every
        # round and still give the right tokens (an evicted session re-scores its prefix).
        a, b = await asyncio.gather(
            speculative_generate(draft_ref, target_ref, [1, 2], 30, 3, mode="sample", seed=1),
            speculative_generate(draft_ref, target_ref, [5], 30, 3, mode="sample", seed=2))
        assert a.tokens == speculative_decode(draft, target, [1, 2], 30, 3, mode="sample", seed=1).tokens
        assert b.tokens == speculative_decode(draft, target, [5], 30, 3, mode="sample", seed=2).tokens
        st = await target_ref.ask("stats")
        assert st["evicted"] > 0 and st["max_sessions"] == 1
        assert await target_ref.ask("end_session", "nope") is False
