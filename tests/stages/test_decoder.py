"""Decoding: TinyCausalLM's KV cache, greedy and seeded sampling, drafts with their q rows,
models without a cache, bad inputs, and the Decoder actor streaming across processes."""

from __future__ import annotations

import functools
import random
from typing import Any

import pytest
import torch

import cascada
from cascada.stages import (
    Decoder,
    StageInputError,
    TinyCausalLM,
    draft_tokens,
    generate_tokens,
    sampling_probs,
    tiny_lm,
)

torch.set_num_threads(1)

V = 24
make_target = functools.partial(tiny_lm, V, 32, 2, 4, 64, seed=11, dtype="float64")


@pytest.fixture(scope="module")
def lm() -> TinyCausalLM:
    return make_target()


class NoCache(torch.nn.Module):
    """The same model, but it keeps no cache: returns None as its past."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.vocab = V

    def forward(self, tokens: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, None]:
        return self.inner(tokens)[0], None


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(rng.randint(1, 6))] for _ in range(n)]


def test_kv_cache_gives_the_same_logits_as_the_full_prefix(lm: TinyCausalLM) -> None:
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    full, _ = lm(tokens)
    assert full.shape == (1, 8, V) and full.dtype == torch.float64
    logits, past = lm(tokens[:, :3])
    torch.testing.assert_close(logits, full[:, :3], rtol=0, atol=1e-12)
    for t in range(3, 5):  # one position at a time
        step, past = lm(tokens[:, t:t + 1], past)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-12)
    chunk, past = lm(tokens[:, 5:], past)  # several new positions at once
    torch.testing.assert_close(chunk, full[:, 5:], rtol=0, atol=1e-12)
    assert past[0][0].shape == (1, 4, 8, 8)


def test_cached_generation_equals_uncached_generation(lm: TinyCausalLM) -> None:
    for p in prompts(12):
        greedy = list(generate_tokens(lm, p, 16))
        assert greedy == list(generate_tokens(lm, p, 16, use_cache=False))
        assert greedy == list(generate_tokens(NoCache(lm), p, 16))
        sampled = list(generate_tokens(lm, p, 16, mode="sample", seed=5, temperature=0.9, top_k=10))
        assert sampled == list(generate_tokens(lm, p, 16, mode="sample", seed=5, temperature=0.9, top_k=10,
                                               use_cache=False))
    assert len(greedy) == 16 and all(0 <= t < V for t in greedy)


def test_seeded_sampling_is_reproducible_and_seeds_matter(lm: TinyCausalLM) -> None:
    runs = {s: list(generate_tokens(lm, [1, 2], 24, mode="sample", seed=s)) for s in range(4)}
    assert runs[0] == list(generate_tokens(lm, [1, 2], 24, mode="sample", seed=0))
    assert len({tuple(r) for r in runs.values()}) > 1


def test_generation_stops_after_eos(lm: TinyCausalLM) -> None:
    full = list(generate_tokens(lm, [5], 20))
    eos = full[3]
    cut = list(generate_tokens(lm, [5], 20, eos=eos))
    assert cut == full[: full.index(eos) + 1]


def test_sampling_probs_temperature_and_top_k() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = sampling_probs(logits)
    assert p.dtype == torch.float64 and float(p.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(p, torch.softmax(logits.double(), -1))
    torch.testing.assert_close(sampling_probs(logits, 0.5), torch.softmax(logits.double() / 0.5, -1))
    top2 = sampling_probs(logits, top_k=2)
    assert top2[2:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(top2[:2], torch.softmax(logits[:2].double(), -1))


def test_draft_returns_tokens_and_the_rows_they_were_drawn_from(lm: TinyCausalLM) -> None:
    prefix = [7, 3, 2]
    tokens, q = draft_tokens(lm, prefix, 4, mode="sample", seed=3, temperature=0.8, top_k=6)
    assert len(tokens) == 4 and q.shape == (4, V) and q.dtype == torch.float64
    for i, tok in enumerate(tokens):
        logits, _ = lm(torch.tensor([prefix + tokens[:i]]))
        torch.testing.assert_close(q[i], sampling_probs(logits[0, -1], 0.8, 6), rtol=0, atol=1e-12)
        assert q[i, tok] > 0
    assert tokens == list(generate_tokens(lm, prefix, 4, mode="sample", seed=3, temperature=0.8, top_k=6))
    greedy, onehot = draft_tokens(lm, prefix, 3)
    assert greedy == list(generate_tokens(lm, prefix, 3))
    assert onehot.sum(dim=1).tolist() == [1.0] * 3 and [int(r.argmax()) for r in onehot] == greedy
    assert draft_tokens(lm, prefix, 0)[0] == []


@pytest.mark.parametrize("kwargs, error, match", [
    ({"prompt": []}, StageInputError, "prompt is empty"),
    ({"prompt": [1, -2]}, StageInputError, "token 1 is -2"),
    ({"prompt": [1, V]}, StageInputError, rf"\[0, {V}\)"),
    ({"prompt": [1.5]}, StageInputError, "token 0"),
    ({"prompt": torch.zeros(2, 3, dtype=torch.long)}, StageInputError, "1-D integer tensor"),
    ({"mode": "beam"}, cascada.ConfigurationError, "mode must be 'greedy' or 'sample'"),
    ({"temperature": 0.0}, cascada.ConfigurationError, "temperature"),
    ({"top_k": 0}, cascada.ConfigurationError, "top_k"),
    ({"seed": "x"}, cascada.ConfigurationError, "seed"),
    ({"max_new": -1}, cascada.ConfigurationError, "max_new"),
])
def test_bad_generation_arguments(lm: TinyCausalLM, kwargs: dict[str, Any], error: type, match: str) -> None:
    args: dict[str, Any] = {"prompt": [1, 2], "max_new": 3, **kwargs}
    with pytest.raises(error, match=match):
        generate_tokens(lm, args.pop("prompt"), args.pop("max_new"), **args)


def test_running_past_max_len_is_an_input_error() -> None:
    short = tiny_lm(V, 16, 1, 2, 8, seed=1)
    with pytest.raises(StageInputError, match="exceed max_len 8"):
        list(generate_tokens(short, [1, 2, 3], 10))


def test_bad_model_config() -> None:
    with pytest.raises(cascada.ConfigurationError, match="multiple of heads"):
        TinyCausalLM(V, 30, 1, 4, 16)
    with pytest.raises(cascada.ConfigurationError, match="vocab must be a positive integer"):
        TinyCausalLM(0, 16, 1, 2, 16)


async def test_decoder_actor_streams_the_same_tokens_across_processes(lm: TinyCausalLM) -> None:
    async with cascada.ActorSystem(preload=("torch",)) as system:
        dec = await system.spawn(Decoder, factory=make_target, threads=1, placement="process")
        for p in prompts(3, seed=4):
            streamed = [t async for t in dec.stream("generate", p, 12)]
            assert streamed == list(generate_tokens(lm, p, 12))
        sampled = await dec.ask("complete", [1, 2], 12, "sample", 1.0, None, 42)
        assert sampled == list(generate_tokens(lm, [1, 2], 12, mode="sample", seed=42))
        assert sampled == await dec.ask("complete", [1, 2], 12, mode="sample", seed=42)
        proposal = await dec.ask("draft", [1, 2], 3, mode="sample", seed=9)
        tokens, q = draft_tokens(lm, [1, 2], 3, mode="sample", seed=9)
        assert proposal["tokens"] == tokens
        torch.testing.assert_close(proposal["q"], q, rtol=0, atol=1e-12)
        assert (await dec.ask("draft", [1, 2], 3, with_q=False))["q"] is None
        with pytest.raises(StageInputError, match="prompt is empty"):
            await dec.ask("complete", [], 3)
        stats = await dec.ask("stats")
        assert stats["generated"] == 3 * 12 + 2 * 12 and stats["drafted"] == 6
