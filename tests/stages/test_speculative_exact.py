"""Speculative sampling is exact, proven by enumeration (no Monte Carlo).

The draft and the target are explicit probability tables over a vocabulary of 5 that depend
on the whole prefix (with zeros, so drafted tokens the target never emits, and tokens only
the target emits, both occur). They speak the decoder protocol (log-probabilities as logits,
no cache), so the library's own code runs: ``draft_tokens`` draws the proposal, the target
scores it in one pass, ``accept_reject`` accepts or resamples, ``speculative_decode`` runs the
rounds. Every random choice goes through a Sampler; the enumerating sampler here explores
every branch of that tree with its exact probability, in float64.

One round is enumerated exactly; rounds compose (each starts afresh from the prefix), so the
distribution of the first k + 1 tokens is the round distributions chained by the library's
own round loop (``max_rounds=1`` per step, ``max_new`` counting down as it does). It must
equal the target's own distribution of k + 1 tokens, prod_i p(x_i | prefix, x_<i), to 1e-12,
jointly and therefore in every marginal.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import torch

from cascada.stages import accept_reject, draft_tokens, speculative_decode, verify_drafted

torch.set_num_threads(1)  # tiny tensors: threads only add wake-ups (and the machine is shared)

V = 5
Table = Callable[[tuple[int, ...]], list[float]]


def make_table(salt: str, dense: bool = False) -> Table:
    """p(. | prefix): small integer weights drawn per prefix, about a third of them zero
    unless ``dense``."""
    weights = [1, 2, 3, 5, 8] if dense else [0, 0, 1, 2, 3, 5, 8]

    @functools.lru_cache(maxsize=None)
    def table(prefix: tuple[int, ...]) -> list[float]:
        rng = random.Random(f"{salt}:{prefix}")
        w = [rng.choice(weights) for _ in range(V)]
        if sum(w) == 0:
            w[rng.randrange(V)] = 1
        return [x / sum(w) for x in w]

    return table


class TableLM:
    """A decoder-protocol model over a table: logits = log p, float64, no cache."""

    vocab = V

    def __init__(self, table: Table) -> None:
        self.table = table

    def __call__(self, tokens: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, None]:
        seq = tokens[0].tolist()
        rows = [[math.log(p) if p > 0 else -math.inf for p in self.table(tuple(seq[: t + 1]))]
                for t in range(len(seq))]
        return torch.tensor([rows], dtype=torch.float64), None


class _Branch(BaseException):
    """Raised when a run reaches a choice its script does not cover (BaseException so no
    library ``except Exception`` can swallow it)."""

    def __init__(self, n: int) -> None:
        self.n = n


class ScriptedSampler:
    """Makes the choices in ``script``, multiplying their probabilities; raises _Branch at the
    first choice beyond it, naming how many branches it has (those of nonzero probability)."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.i = 0
        self.prob = 1.0

    def _choose(self, options: list[tuple[Any, float]]) -> Any:
        if self.i == len(self.script):
            raise _Branch(len(options))
        value, p = options[self.script[self.i]]
        self.i += 1
        self.prob *= p
        return value

    def bernoulli(self, p: float) -> bool:
        assert 0.0 < p < 1.0
        return bool(self._choose([(True, p), (False, 1.0 - p)]))

    def categorical(self, probs: torch.Tensor) -> int:
        assert probs.dtype == torch.float64 and abs(float(probs.sum()) - 1.0) < 1e-12
        return int(self._choose([(i, p) for i, p in enumerate(probs.tolist()) if p > 0.0]))


def enumerate_runs(run: Callable[[ScriptedSampler], tuple[int, ...]]) -> dict[tuple[int, ...], float]:
    """The exact distribution of run's output over every branch of its choices."""
    out: dict[tuple[int, ...], float] = defaultdict(float)
    todo: list[list[int]] = [[]]
    while todo:
        script = todo.pop()
        sampler = ScriptedSampler(script)
        try:
            result = run(sampler)
        except _Branch as b:
            todo.extend(script + [j] for j in range(b.n))
            continue
        out[result] += sampler.prob
    return dict(out)


def target_joint(p: Table, prefix: tuple[int, ...], n: int) -> dict[tuple[int, ...], float]:
    out = {}
    for seq in itertools.product(range(V), repeat=n):
        prob = 1.0
        for i, x in enumerate(seq):
            prob *= p(prefix + seq[:i])[x]
        if prob > 0:
            out[seq] = prob
    return out


def speculative_joint(draft: TableLM, target: TableLM, prompt: tuple[int, ...], n: int, k: int,
                      rounds: list[int] | None = None) -> dict[tuple[int, ...], float]:
    """Distribution of the first n tokens of speculative sampling, chaining exactly
    enumerated rounds. ``rounds`` counts the rounds enumerated."""
    memo: dict[tuple[tuple[int, ...], int], dict[tuple[int, ...], float]] = {}

    def dist(prefix: tuple[int, ...], left: int) -> dict[tuple[int, ...], float]:
        if left == 0:
            return {(): 1.0}
        if (prefix, left) in memo:
            return memo[(prefix, left)]

        def one_round(s: ScriptedSampler) -> tuple[int, ...]:
            r = speculative_decode(draft, target, list(prefix), left, k, mode="sample", max_rounds=1,
                                   samplers=lambda _r: (s, s))
            return tuple(r.tokens)

        first = enumerate_runs(one_round)
        if rounds is not None:
            rounds.append(len(first))
        out: dict[tuple[int, ...], float] = defaultdict(float)
        for seq, pr in first.items():
            assert 1 <= len(seq) <= min(k + 1, left)
            for tail, pt in dist(prefix + seq, left - len(seq)).items():
                out[seq + tail] += pr * pt
        memo[(prefix, left)] = dict(out)
        return memo[(prefix, left)]

    return dist(prompt, n)


def assert_same(got: dict[tuple[int, ...], float], want: dict[tuple[int, ...], float], tol: float = 1e-12) -> None:
    keys = set(got) | set(want)
    worst = max(abs(got.get(x, 0.0) - want.get(x, 0.0)) for x in keys)
    assert worst < tol, f"largest difference {worst:.3g}"


def marginals(joint: dict[tuple[int, ...], float], n: int) -> list[list[float]]:
    m = [[0.0] * V for _ in range(n)]
    for seq, p in joint.items():
        for i, x in enumerate(seq):
            m[i][x] += p
    return m


@pytest.mark.parametrize("k, prompt, salt, dense", [
    (2, (0, 3), "a", False), (2, (2,), "d", False), (2, (1, 1), "e", True),
    (3, (1,), "b", False), (3, (4, 4, 2), "c", False), (3, (3,), "f", True),
])
def test_speculative_sampling_output_is_exactly_the_targets_distribution(
        k: int, prompt: tuple[int, ...], salt: str, dense: bool) -> None:
    p_table, q_table = make_table(f"target-{salt}", dense), make_table(f"draft-{salt}", dense)
    target, draft = TableLM(p_table), TableLM(q_table)
    rounds: list[int] = []
    got = speculative_joint(draft, target, prompt, k + 1, k, rounds)
    want = target_joint(p_table, prompt, k + 1)
    assert abs(sum(got.values()) - 1.0) < 1e-12
    assert_same(got, want)
    for gm, wm in zip(marginals(got, k + 1), marginals(want, k + 1)):
        assert max(abs(a - b) for a, b in zip(gm, wm)) < 1e-12
    # The draft really differs from the target, and the tree was really explored: rejections
    # and bonus tokens both happened (rounds emitted 1 token and k + 1 tokens).
    assert any(p_table(prompt)[x] != q_table(prompt)[x] for x in range(V))
    assert sum(rounds) > 50
    first = enumerate_runs(lambda s: tuple(speculative_decode(draft, target, list(prompt), k + 1, k, mode="sample",
                                                              max_rounds=1, samplers=lambda _r: (s, s)).tokens))
    assert {len(seq) for seq in first} == set(range(1, k + 2))


def test_one_round_first_token_marginal_is_the_targets() -> None:
    # accept_reject on its own, on explicit rows: the round's first token ~ p_1 exactly.
    p_rows = torch.tensor([[0.1, 0.0, 0.4, 0.2, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0, 0.0]],
                          dtype=torch.float64)
    q_rows = torch.tensor([[0.3, 0.3, 0.0, 0.2, 0.2], [0.0, 0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)

    def run(s: ScriptedSampler) -> tuple[int, ...]:
        x1 = s.categorical(q_rows[0])
        x2 = s.categorical(q_rows[1])
        n, nxt = accept_reject(p_rows, q_rows, [x1, x2], s)
        return tuple([x1, x2][:n] + [nxt])

    dist = enumerate_runs(run)
    first = [0.0] * V
    for seq, pr in dist.items():
        first[seq[0]] += pr
    assert max(abs(a - b) for a, b in zip(first, p_rows[0].tolist())) < 1e-15


def test_wrong_q_rows_break_exactness() -> None:
    # The negative control: verify with q rows that are not what the draft sampled from
    # (uniform rows), and the first token is no longer distributed as the target's. So the
    # enumeration above has the power to see a mistake.
    p_table, q_table = make_table("target-a"), make_table("draft-a")
    target, draft = TableLM(p_table), TableLM(q_table)
    prompt = [0, 3]

    def run(s: ScriptedSampler) -> tuple[int, ...]:
        tokens, q = draft_tokens(draft, prompt, 2, mode="sample", sampler=s)
        wrong_q = torch.full_like(q, 1.0 / V)
        return tuple(verify_drafted(target, prompt, tokens, wrong_q, mode="sample", sampler=s).tokens[:1])

    got = enumerate_runs(run)
    want = p_table(tuple(prompt))
    assert abs(sum(got.values()) - 1.0) < 1e-12
    assert max(abs(got.get((x,), 0.0) - want[x]) for x in range(V)) > 1e-3


def test_greedy_enumeration_has_one_branch_equal_to_target_argmax() -> None:
    p_table, q_table = make_table("target-g"), make_table("draft-g")
    target, draft = TableLM(p_table), TableLM(q_table)
    out = enumerate_runs(lambda s: tuple(speculative_decode(draft, target, [2], 6, 3, mode="greedy",
                                                            samplers=lambda _r: (s, s)).tokens))
    seq: list[int] = []
    for _ in range(6):
        row = p_table(tuple([2] + seq))
        seq.append(max(range(V), key=lambda x: (row[x], -x)))
    assert out == {tuple(seq): 1.0}
