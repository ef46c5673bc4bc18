"""F2 spec-decode models: the tokenizer, the KV-cache protocol (cached equals uncached),
deterministic greedy generation, and the committed weights."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cascada.workloads import f2  # noqa: E402

SMALL = f2.LMConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, context_len=48)


@pytest.fixture(scope="module")
def committed() -> "tuple[f2.CharLM, f2.CharLM, f2.Tokenizer]":
    return f2.load_models()


def _random_model(config: f2.LMConfig = SMALL, seed: int = 0) -> f2.CharLM:
    torch.manual_seed(seed)
    m = f2.CharLM(config)
    # Random init is near-uniform; scale the weights so that the check compares real numbers.
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(20.0 if p.dim() >= 2 else 1.0)
    return m.eval()


def test_tokenizer_round_trip_and_folding() -> None:
    tok = f2.Tokenizer()
    text = "def f(x):\n\treturn x ** 2  # ok!"
    assert tok.encode(text) == [ord(c) for c in text]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("\u2018a\u2019 \u201cb\u201d \u2014 \u2026") == tok.encode("'a' \"b\" -- ...")
    assert tok.encode("\u00df\u00b0") == [f2.SUB, f2.SUB]
    assert tok.vocab_size == 128 and tok.eos_id == 0
    with pytest.raises(ValueError):
        tok.decode([128])


def test_corpus_split() -> None:
    train, val, full = f2.corpus_text("train"), f2.corpus_text("val"), f2.corpus_text("all")
    assert train + val == full
    assert len(val) == len(full) - int(len(full) * 0.9)
    assert chr(f2.EOS) in full
    ids = f2.corpus_tokens("val")
    assert ids.dtype == torch.int64 and int(ids.max()) < 128 and ids.numel() >= len(val)  # folding may lengthen


@pytest.mark.parametrize("chunks", [[20, 1, 1, 5, 13], [1] * 10, [40]])
def test_cached_equals_uncached(chunks: list[int]) -> None:
    model = _random_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (2, sum(chunks)), generator=g)
    with torch.no_grad():
        full, _ = model(tokens)
        past, pieces, at = None, [], 0
        for c in chunks:
            logits, past = model(tokens[:, at:at + c], past)
            pieces.append(logits)
            at += c
    assert f2.past_length(past) == sum(chunks)
    assert full.abs().max() > 1.0
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_committed_target_cached_equals_uncached(committed: tuple) -> None:
    _, target, tok = committed
    tokens = torch.tensor([tok.encode("for x in range(10):\n    print(x)  # a loop over ten numbers, " * 3)[:200]])
    with torch.no_grad():
        full, _ = target(tokens)
        past, pieces = None, []
        for a, b in ((0, 150), (150, 151), (151, 156), (156, 200)):
            logits, past = target(tokens[:, a:b], past)
            pieces.append(logits)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_past_is_not_modified_and_truncation_rolls_back() -> None:
    model = _random_model()
    tokens = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, past = model(tokens[:, :20])
        snapshot = [(k.clone(), v.clone()) for k, v in past]
        _, longer = model(tokens[:, 20:25], past)  # a draft block, later rejected
        for (k, v), (k0, v0) in zip(past, snapshot):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        rolled = f2.truncate_past(longer, 22)  # keep 2 of the 5 drafted positions
        tail, _ = model(tokens[:, 22:30], rolled)
        full, _ = model(tokens)
    assert torch.allclose(tail, full[:, 22:30], atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        f2.truncate_past(past, 21)


def test_context_length_is_enforced() -> None:
    model = _random_model()
    with torch.no_grad():
        _, past = model(torch.zeros(1, 40, dtype=torch.int64))
        with pytest.raises(ValueError):
            model(torch.zeros(1, 9, dtype=torch.int64), past)
        with pytest.raises(ValueError):
            model(torch.zeros(1, 49, dtype=torch.int64))
        with pytest.raises(ValueError):
            model(torch.zeros(4, dtype=torch.int64))


def test_greedy_generation_is_deterministic_and_matches_uncached_argmax(committed: tuple) -> None:
    draft, target, tok = committed
    prompt = tok.encode("The return statement ")
    a = f2.generate(target, prompt, 40)
    assert a == f2.generate(target, prompt, 40)
    assert len(a) == 40 or a[-1] == f2.EOS
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(len(a)):
            logits, _ = target(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    assert seq[len(prompt):] == a
    s1 = f2.generate(draft, prompt, 30, greedy=False, seed=5)
    assert s1 == f2.generate(draft, prompt, 30, greedy=False, seed=5)


def test_generation_stops_at_the_context_length() -> None:
    model = _random_model()
    out = f2.generate(model, [65] * 40, 100, stop_at_eos=False)
    assert len(out) == 48 - 40 + 1  # the last token needs no further forward pass


def test_macs_per_token() -> None:
    c = f2.TARGET_CONFIG
    assert f2.macs_per_token(c, context=0) == 4 * (4 * 128 * 128 + 2 * 128 * 512 + 2 * 128) + 128 * 128
    assert f2.macs_per_token(f2.DRAFT_CONFIG) < f2.macs_per_token(c) / 10


def test_committed_weights_load_and_reach_stated_loss(committed: tuple) -> None:
    draft, target, _ = committed
    meta = f2.load_meta()
    assert draft.config == f2.DRAFT_CONFIG and target.config == f2.TARGET_CONFIG
    assert meta["target"]["params"] == f2.param_count(target)
    val = f2.corpus_tokens("val")
    d = f2.evaluate(draft, val)["bpc"]
    t = f2.evaluate(target, val)["bpc"]
    assert t == pytest.approx(meta["target"]["val_bpc"], abs=1e-3)
    assert t < TARGET_BPC_BOUND and d < DRAFT_BPC_BOUND
    assert t < d - 0.2  # the target is clearly better than the draft
    assert meta["target"]["val_bpc"] < meta["draft"]["val_bpc"]
    assert 0 < meta["cost_ratio_measured"] < 1


TARGET_BPC_BOUND = 2.3
DRAFT_BPC_BOUND = 2.7
