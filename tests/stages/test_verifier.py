"""Checks and verdicts: confidence with abstention, agreement, predicates, the wire form, and
the Verifier actor answering them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cascada
import cascada.stages
from cascada.stages import (
    Abstain,
    Accept,
    AgreementCheck,
    ConfidenceCheck,
    PredicateCheck,
    Reject,
    StageInputError,
    Verdict,
    Verifier,
    verdict_from_wire,
)


def test_confidence_check_accepts_rejects_and_abstains() -> None:
    c = ConfidenceCheck(0.8, abstain_below=0.4)
    v = c.check([0.1, 0.85, 0.05])
    assert isinstance(v, Accept) and v.value == 1 and v.score == pytest.approx(0.85) and v.accepted
    assert isinstance(c.check([0.3, 0.6, 0.1]), Reject)
    abstained = c.check([0.35, 0.33, 0.32])
    assert isinstance(abstained, Abstain) and not abstained.accepted and "0.35" in abstained.reason
    assert isinstance(ConfidenceCheck(0.8).check([0.35, 0.33, 0.32]), Reject)  # no band: reject
    assert isinstance(c.check(torch.tensor([0.9, 0.1])), Accept)
    assert isinstance(c.check(0.2), Abstain)  # a scalar confidence


def test_confidence_check_bad_config_and_input() -> None:
    with pytest.raises(cascada.ConfigurationError, match=r"threshold must be a number in \[0, 1\]"):
        ConfidenceCheck(2.0)
    with pytest.raises(cascada.ConfigurationError, match="must not exceed threshold"):
        ConfidenceCheck(0.5, abstain_below=0.6)
    with pytest.raises(StageInputError, match="not logits"):
        ConfidenceCheck(0.5).check([2.0, -1.0])


def test_agreement_check() -> None:
    exact = AgreementCheck()
    v = exact.check([[1, 2, 3], (1, 2, 3), torch.tensor([1, 2, 3])])  # lists, tuples, tensors alike
    assert isinstance(v, Accept) and v.score == 1.0 and v.value == [1, 2, 3]
    split = exact.check(["cat", "dog"])
    assert isinstance(split, Abstain) and split.score == 0.5 and "only 1 of 2" in split.reason
    assert isinstance(AgreementCheck(on_disagree="reject").check(["cat", "dog"]), Reject)
    majority = AgreementCheck(2).check(["cat", "dog", "cat"])
    assert isinstance(majority, Accept) and majority.value == "cat" and majority.score == pytest.approx(2 / 3)
    by_class = AgreementCheck(compare="argmax").check([[0.2, 0.8], [0.4, 0.6]])
    assert isinstance(by_class, Accept) and by_class.value == 1
    keyed = AgreementCheck(key=lambda out: out["label"]).check([{"label": 3, "p": 0.9}, {"label": 3, "p": 0.6}])
    assert isinstance(keyed, Accept) and keyed.value == 3


def test_agreement_check_errors() -> None:
    with pytest.raises(cascada.ConfigurationError, match="quorum"):
        AgreementCheck(1)
    with pytest.raises(cascada.ConfigurationError, match="compare"):
        AgreementCheck(compare="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(StageInputError, match="at least two outputs"):
        AgreementCheck().check(["only one"])
    with pytest.raises(StageInputError, match="quorum 3 but only 2"):
        AgreementCheck(3).check(["a", "a"])


def test_predicate_check() -> None:
    def compiles(src: str) -> bool | None:
        if not src.strip():
            return None
        try:
            compile(src, "<artifact>", "exec")
        except SyntaxError:
            return False
        return True

    check = PredicateCheck(compiles)
    assert isinstance(check.check("x = 1"), Accept)
    assert isinstance(check.check("x = ("), Reject)
    assert isinstance(check.check("   "), Abstain)
    assert isinstance(PredicateCheck(lambda x: torch.tensor(x > 0)).check(3), Accept)
    assert PredicateCheck(lambda x: Reject(x, 0.1, "custom")).check(1).reason == "custom"
    with pytest.raises(StageInputError, match="must return a bool, None"):
        PredicateCheck(lambda x: "yes").check(1)
    with pytest.raises(cascada.ConfigurationError, match="callable"):
        PredicateCheck(3)  # type: ignore[arg-type]


def test_verdicts_on_the_wire() -> None:
    for v in (Accept(2, 0.9, "ok"), Reject(None, None, ""), Abstain([1, 2], 0.5, "split")):
        wire = v.to_wire()
        assert wire["verdict"] == v.kind
        back = verdict_from_wire(wire)
        assert back == v and type(back) is type(v) and isinstance(back, Verdict)
    with pytest.raises(StageInputError, match="accept/reject/abstain"):
        verdict_from_wire({"verdict": "maybe"})


async def test_verifier_actor_answers_checks_across_processes() -> None:
    async with cascada.ActorSystem() as system:
        ref = await system.spawn(Verifier, check=ConfidenceCheck(0.7, abstain_below=0.6), placement="process")
        answers = [await ref.ask("check", probs) for probs in ([0.9, 0.1], [0.35, 0.65], [0.45, 0.55])]
        assert [a["verdict"] for a in answers] == ["accept", "reject", "abstain"]
        assert answers[0]["value"] == 0 and answers[0]["score"] == pytest.approx(0.9)
        assert (await ref.ask("stats"))["checked"] == {"accept": 1, "reject": 1, "abstain": 1}
        with pytest.raises(StageInputError, match="no target model"):
            await ref.ask("verify", [1], [2])
        with pytest.raises(cascada.ActorInitFailed, match="give a check=, a model="):
            await system.spawn(Verifier, placement="local")
        with pytest.raises(cascada.ActorInitFailed, match="check"):
            await system.spawn(Verifier, check=42, placement="local")


def test_the_package_loads_names_lazily_and_every_public_name_resolves() -> None:
    code = ("import sys, cascada.stages as s; assert 'torch' not in sys.modules; s.Router; s.TopK; s.DynamicBatcher; "
            "assert 'torch' not in sys.modules, 'routing and batching must not need torch'; s.TinyCausalLM; "
            "assert 'torch' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in cascada.stages.__all__:
        assert getattr(cascada.stages, name) is not None
    assert set(cascada.stages.__all__) <= set(dir(cascada.stages))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        cascada.stages.Nope  # noqa: B018
