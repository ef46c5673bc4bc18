"""F1 digits-cascade: data sources, exact MAC counts, committed weights, and the offline
cascade analysis (confidence and window cascades, selective classification)."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from cascada.workloads import f1, f1_cascade, f1_data  # noqa: E402

needs_sklearn = pytest.mark.skipif(not f1_data.have_sklearn(), reason="scikit-learn not installed")

# The committed models' accuracy floors on the fixed test splits (the JSON holds the exact
# figures, which the tests also reproduce).
BIG_ACCURACY_FLOOR = {"glyphs": 0.93, "sklearn": 0.98, "cancer": 0.93}


# --- data -------------------------------------------------------------------------------


def test_glyphs_are_deterministic_and_digit_like() -> None:
    images, labels = f1_data.glyph_images(40, seed=3)
    assert (images, labels) == f1_data.glyph_images.__wrapped__(40, seed=3)
    assert len(images) == 40 and all(len(im) == 64 for im in images)
    assert all(0 <= v <= 16 and isinstance(v, int) for im in images for v in im)
    assert sorted(labels) == sorted(i % 10 for i in range(40))
    assert f1_data.glyph_images.__wrapped__(40, seed=4) != (images, labels)
    # Ink sits in the middle of the 8x8 frame, as in load_digits.
    centre = sum(im[r * 8 + c] for im in images for r in range(2, 6) for c in range(2, 6))
    border = sum(im[r * 8 + c] for im in images for r in (0, 7) for c in range(8))
    assert centre > 2 * border


def test_load_glyphs_split() -> None:
    Xtr, ytr, Xte, yte = f1_data.load("glyphs")
    assert Xtr.shape == (2100, 64) and Xte.shape == (900, 64)
    assert Xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert float(Xtr.min()) >= 0 and float(Xtr.max()) <= 16
    again = f1_data.load("glyphs")
    assert torch.equal(again[0], Xtr) and torch.equal(again[3], yte)
    lists = f1_data.load_lists("glyphs")
    assert lists[1] == ytr.tolist()


@needs_sklearn
def test_load_sklearn_sources() -> None:
    Xtr, ytr, Xte, yte = f1_data.load("sklearn")
    assert Xtr.shape == (1258, 64) and Xte.shape == (539, 64) and int(ytr.max()) == 9
    Xtr, ytr, Xte, yte = f1_data.load("cancer")
    assert Xtr.shape == (398, 30) and Xte.shape == (171, 30) and set(yte.tolist()) == {0, 1}
    assert f1_data.resolve_source("auto") == "sklearn"


def test_source_errors() -> None:
    with pytest.raises(ValueError):
        f1_data.load("mnist")
    assert f1_data.feature_count("cancer") == 30 and f1_data.class_count("glyphs") == 10


def test_perturb() -> None:
    X = f1_data.load("glyphs")[2][:50]
    noisy = f1_data.perturb(X, "noise", 1.0, seed=1)
    assert noisy.shape == X.shape and float(noisy.min()) >= 0 and float(noisy.max()) <= 16
    assert torch.equal(noisy, f1_data.perturb(X, "noise", 1.0, seed=1))
    shifted = f1_data.perturb(X, "shift", 0.5, seed=1)
    assert float(shifted.sum()) <= float(X.sum()) and not torch.equal(shifted, X)
    img = torch.zeros(1, 64)
    img[0, 3 * 8 + 3] = 16.0
    moved = f1_data.perturb(img, "shift", 0.5, seed=0)
    assert float(moved.sum()) == 16.0  # an interior pixel moves by at most one, it is never lost
    with pytest.raises(ValueError):
        f1_data.perturb(X, "blur", 1.0)  # type: ignore[arg-type]


# --- models -----------------------------------------------------------------------------


def _conv_macs(h: int, w: int, cin: int, cout: int, k: int = 3) -> int:
    return h * w * cout * cin * k * k


def test_exact_macs() -> None:
    expected_image = [
        64 * 10,
        64 * 64 + 64 * 10,
        _conv_macs(8, 8, 1, 8) + _conv_macs(4, 4, 8, 16) + 16 * 16 * 32 + 32 * 10,
        _conv_macs(8, 8, 1, 32) + _conv_macs(4, 4, 32, 64) + 64 * 16 * 128 + 128 * 10,
    ]
    got = [f1.macs(f1.build_tier(s, 64, 10)) for s in f1.specs_for("glyphs")]
    assert got == expected_image == [640, 4736, 31552, 445696]
    member = f1.build_tier(f1.member_spec_for("glyphs"), 64, 10)
    assert f1.macs(member) == _conv_macs(8, 8, 1, 16) + _conv_macs(4, 4, 16, 32) + 32 * 16 * 64 + 64 * 10
    got_tab = [f1.macs(f1.build_tier(s, 30, 2)) for s in f1.specs_for("cancer")]
    assert got_tab == [60, 30 * 16 + 16 * 2, 30 * 256 + 256 * 256 + 256 * 2]


def test_training_is_deterministic() -> None:
    X, y = f1_data.load("glyphs")[:2]
    spec = f1.specs_for("glyphs")[1]
    a = f1.train_tier(spec, X[:300], y[:300], n_classes=10, seed=4, epochs=2)
    b = f1.train_tier(spec, X[:300], y[:300], n_classes=10, seed=4, epochs=2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    t = f1.fit_temperature(a, X[300:500], y[300:500])
    assert 0.25 <= t <= 8 and float(a.temperature) == pytest.approx(t)
    p = f1.predict_proba(a, X[:7])
    assert p.shape == (7, 10) and torch.allclose(p.sum(-1), torch.ones(7))


def _sources() -> list[str]:
    return ["glyphs", "sklearn", "cancer"] if f1_data.have_sklearn() else ["glyphs"]


@pytest.mark.parametrize("source", _sources())
def test_committed_weights_reproduce_their_record(source: str) -> None:
    meta = f1.load_meta(source)
    tiers, members = f1.load_tiers(source), f1.load_members(source)
    assert len(members) == f1.N_MEMBERS
    _, _, Xte, yte = f1_data.load(source)
    by_name = {m["name"]: m for m in meta["models"]}
    for role, group in (("tier", tiers), ("member", members)):
        for i, m in enumerate(group):
            rec = by_name[f"{role}{i}"]
            acc = float((f1.predict_proba(m, Xte).argmax(-1) == yte).double().mean())
            assert acc == pytest.approx(rec["test_accuracy"], abs=2e-6)
            assert f1.macs(m) == rec["macs"]
    assert meta["models"][len(tiers) - 1]["test_accuracy"] >= BIG_ACCURACY_FLOOR[source]
    # The biggest tier is materially more expensive than the small ones.
    macs = [f1.macs(m) for m in tiers]
    assert macs == sorted(macs) and macs[-1] > 10 * macs[-2]
    assert {"accuracy", "coverage"} <= set(meta["shape_check"])
    json.dumps(meta)
    # The recorded cascade replays from the committed models and the selected thresholds.
    probs = [f1.predict_proba(m, Xte) for m in tiers]
    res = f1_cascade.confidence_cascade(probs, macs, f1.selected_thresholds(source))
    sel = meta["tiers"]["selected"]
    assert res.accuracy(yte) == pytest.approx(sel["accuracy"], abs=2e-6)
    assert res.macs_per_item == pytest.approx(sel["macs_per_item"], abs=1e-3)


def test_auto_resolves_to_a_committed_source() -> None:
    assert len(f1.load_tiers("auto")) >= 3


# --- offline cascade analysis -------------------------------------------------------------


def _toy(n: int = 400, tiers: int = 3, seed: int = 0) -> "tuple[list[torch.Tensor], torch.Tensor]":
    """Tiers of rising quality on a 5-class problem: tier i adds (i + 1) to the true logit."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    probs = [torch.softmax(torch.randn(n, 5, generator=g) * 1.5 + 1.2 * (i + 1) * torch.nn.functional.one_hot(y, 5), -1)
             for i in range(tiers)]
    return probs, y


def test_confidence_cascade_extremes_and_accounting() -> None:
    probs, y = _toy()
    macs = [10, 100, 1000]
    none = f1_cascade.confidence_cascade(probs, macs, 0.0)
    assert none.fraction_per_tier == [1.0, 0.0, 0.0] and none.macs_per_item == 10
    assert torch.equal(none.pred, probs[0].argmax(-1))
    everyone = f1_cascade.confidence_cascade(probs, macs, 2.0)
    assert everyone.fraction_per_tier == [0.0, 0.0, 1.0] and everyone.macs_per_item == 1110
    assert everyone.accuracy(y) == float((probs[2].argmax(-1) == y).double().mean())
    mid = f1_cascade.confidence_cascade(probs, macs, [0.8, 0.6])
    assert math.isclose(sum(mid.fraction_per_tier), 1.0)
    cum = [10, 110, 1110]
    assert mid.macs_per_item == pytest.approx(sum(f * c for f, c in zip(mid.fraction_per_tier, cum)))
    s0 = probs[0].max(-1).values
    assert torch.equal(mid.exit_tier == 0, s0 >= 0.8)
    with pytest.raises(ValueError):
        f1_cascade.confidence_cascade(probs, macs[:2], 0.5)
    with pytest.raises(ValueError):
        f1_cascade.confidence_cascade(probs, macs, [0.5])


def test_window_cascade() -> None:
    probs, y = _toy()
    macs = [10, 100, 1000]
    assert f1_cascade.window_cascade(probs, macs, 0.7, 0.0).fraction_per_tier == [1.0, 0.0, 0.0]
    assert f1_cascade.window_cascade(probs, macs, 0.7, 5.0).fraction_per_tier == [0.0, 0.0, 1.0]
    res = f1_cascade.window_cascade(probs, macs, [0.7, 0.7], [0.1, 0.1])
    s0 = probs[0].max(-1).values.double()
    assert torch.equal(res.exit_tier > 0, (s0 - 0.7).abs() < 0.1)
    ens = f1_cascade.window_cascade(probs, macs, 0.7, 5.0, combine="mean")
    assert torch.equal(ens.pred, ((probs[0] + probs[1] + probs[2]) / 3).argmax(-1))


def test_risk_coverage_on_a_constructed_example() -> None:
    conf = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])
    correct = torch.tensor([True, True, False, True, True, False])
    cov, risk, thr = f1_cascade.risk_coverage(conf, correct)
    # The tie at 0.8 is accepted or rejected as one group.
    assert cov.tolist() == pytest.approx([1 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert risk.tolist() == pytest.approx([0.0, 1 / 3, 1 / 4, 1 / 5, 2 / 6])
    assert f1_cascade.coverage_at_risk(conf, correct, 0.05) == (pytest.approx(1 / 6), pytest.approx(0.9))
    assert f1_cascade.coverage_at_risk(conf, correct, 0.25)[0] == pytest.approx(5 / 6)
    assert f1_cascade.coverage_at_risk(conf, correct, 0.19)[0] == pytest.approx(1 / 6)
    assert f1_cascade.coverage_at_risk(conf, correct, 0.5)[0] == 1.0
    assert f1_cascade.coverage_at_risk(conf[2:3], correct[2:3], 0.05) == (0.0, math.inf)


def test_vectorised_search_matches_the_cascade() -> None:
    probs, y = _toy(300, 4, seed=1)
    macs = [1, 10, 100, 1000]
    configs = f1_cascade._configs(probs, "maxprob")
    acc, cost, cov = f1_cascade._evaluate_many(probs, y, macs, configs, (0.05, 0.2), "maxprob")
    for i in range(0, configs.shape[0], 97):
        res = f1_cascade.confidence_cascade(probs, macs, configs[i].tolist())
        assert acc[i].item() == res.accuracy(y)
        assert cost[i].item() == pytest.approx(res.macs_per_item)
        assert cov[i, 1].item() == res.coverage_at_risk(y, 0.2)


def test_analyses_are_json_ready() -> None:
    probs, y = _toy(300, 3, seed=2)
    test_probs, y_test = _toy(200, 3, seed=3)
    rep = f1_cascade.analyse_tiers(probs, y, test_probs, y_test, [10, 100, 1000])
    json.dumps(rep)
    assert rep["big"]["macs"] == 1000 and rep["curve"][0]["macs_per_item"] == 10
    assert rep["shape"]["metric"] == "accuracy" and set(rep["coverage_shapes"]) == {"0.05", "0.01"}
    ens = f1_cascade.analyse_ensemble(probs, test_probs, 100, probs[2], test_probs[2], 1000, y, y_test)
    json.dumps(ens)
    assert [e["members"] for e in ens["ensembles"]] == [1, 2, 3]
    assert set(ens["per_risk"]) == {"0.05", "0.01"}
