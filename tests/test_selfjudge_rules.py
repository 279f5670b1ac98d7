"""Self-Judge's rules (vzero_fast/recipes/selfjudge.py, grpo.group_advantages "group-softmax") against
ALGORITHMS.md section 3 on hand-built groups; expected values are worked out by hand or with Python's math in
float64, never with the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from vzero_fast.grpo import group_advantages
from vzero_fast.recipes.selfjudge import (
    consistency_prior,
    is_well_formed,
    judge_factor,
    parse_judge_score,
    selfjudge_rewards,
)


def test_prior_strict_threshold():
    seven = ["4"] * 7 + ["5"]  # p = 7/8 = 0.875 > 0.85: the majority gets 1, the rest 0
    six = ["4"] * 6 + ["5", "6"]  # p = 6/8 = 0.75: b_i = count(a_i) / n
    prior = consistency_prior([seven, six])
    assert prior[0].tolist() == [1.0] * 7 + [0.0]
    assert prior[1].tolist() == [0.75] * 6 + [0.125, 0.125]
    # The threshold is strict: at exactly p = 0.85 the soft branch applies (20 answers, 17 agree).
    exact = consistency_prior([["x"] * 17 + ["y"] * 3])
    assert exact[0].tolist() == pytest.approx([0.85] * 17 + [0.15] * 3)


def test_prior_none_votes_like_an_answer():
    """No \\boxed{} = the answer "None", which can win the vote (the reference's behaviour)."""
    prior = consistency_prior([[None] * 7 + ["3"], [None, None, "3", "3", "3", "2", "2", "2"]])
    assert prior[0].tolist() == [1.0] * 7 + [0.0]
    assert prior[1].tolist() == [0.25, 0.25] + [0.375] * 3 + [0.375] * 3
    assert consistency_prior([["None", None]]).tolist() == [[1.0, 1.0]]  # the string and no box are one answer


def test_prior_ties_and_exact_strings():
    # A 4-4 tie: soft branch either way; answers are exact, case-sensitive strings.
    assert consistency_prior([["a"] * 4 + ["b"] * 4]).tolist() == [[0.5] * 8]
    assert consistency_prior([["A", "a", "A", "a"]]).tolist() == [[0.5] * 4]
    assert consistency_prior([["1/2", "0.5", "1/2"]]).tolist() == [pytest.approx([2 / 3, 1 / 3, 2 / 3])]
    # Ties resolve to the answer seen first; with a lower threshold the hard branch shows which.
    assert consistency_prior([["b", "a", "a", "b"]], threshold=0.4).tolist() == [[1.0, 0.0, 0.0, 1.0]]
    with pytest.raises(ValueError):
        consistency_prior([["a", "b"], ["a"]])


def _g(s: float) -> float:
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    return min(max(1 + 0.2 * sig((s - 0.95) / 0.02) - 0.2 * sig((0.40 - s) / 0.05), 0.8), 1.2)


def test_judge_factor_formula_and_range():
    s = torch.linspace(0, 1, 201)
    got = judge_factor(s)
    want = torch.tensor([_g(x) for x in s.double().tolist()], dtype=torch.float64)
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-6)
    assert 0.8 <= got.min() and got.max() <= 1.2
    # s = 1: 1 + 0.2 sigmoid(2.5) - 0.2 sigmoid(-12) = 1.1848 (the cap 1.2 is not reached on [0, 1]);
    # s = 0: 1 + 0.2 sigmoid(-47.5) - 0.2 sigmoid(8) = 0.8001.
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    assert got[-1] == pytest.approx(1 + 0.2 * sig(2.5) - 0.2 * sig(-12), abs=1e-6)
    assert got[0] == pytest.approx(1 + 0.2 * sig(-47.5) - 0.2 * sig(8), abs=1e-6)
    assert judge_factor(torch.tensor(0.7)) == pytest.approx(1.0, abs=1e-3)  # mid scores leave the prior alone
    assert bool((got[1:] >= got[:-1]).all())  # monotone


def test_rewards_and_format_term():
    prior = torch.tensor([[1.0, 1.0, 0.0, 0.75]])
    scores = torch.tensor([[1.0, 0.2, 1.0, 0.7]])
    well = torch.tensor([[True, True, True, False]])
    r = selfjudge_rewards(prior, scores, well)
    want = [min(max(b * _g(s) + f, 0.0), 1.0)
            for b, s, f in zip([1.0, 1.0, 0.0, 0.75], [1.0, 0.2, 1.0, 0.7], [0, 0, 0, -0.5], strict=True)]
    assert r[0].tolist() == pytest.approx(want, abs=1e-6)
    assert r[0, 0] == 1.0  # b g > 1 is clipped
    assert r[0, 2] == 0.0


def test_well_formed_from_the_first_character():
    assert is_well_formed("<think>count the bars</think> so \\boxed{4}")
    assert is_well_formed("<think>a\nb</think>\n\\boxed{x}")  # across lines
    assert not is_well_formed(" <think>a</think> \\boxed{4}")  # a leading space
    assert not is_well_formed("<think>a</think> 4")  # no box
    assert not is_well_formed("\\boxed{4} <think>a</think>")  # box before the thinking


@pytest.mark.parametrize("text,want", [
    ("[BEGIN SCORES]{\"overall_score\": 0.3}[END SCORES] overall \\boxed{0.9}", 0.9),  # the last box wins
    ("\\boxed{0.2} then \\boxed{0.6}", 0.6),
    ("\\boxed{1.7}", 1.0), ("\\boxed{-2}", 0.0),  # clamped
    ("[BEGIN SCORES]{\"answer\": 1, \"overall_score\": 0.42}[END SCORES] \\boxed{high}", 0.42),  # non-numeric box
    ("[SCORES]{\"overall_score\": 0.55}", 0.55),  # the short marker, no end marker
    ("[BEGIN SCORES] {\"answer\": 0.9} [END SCORES] \\boxed{ok}", 0.0),  # JSON without overall_score
    ("\\boxed{nan}", 0.0), ("\\boxed{inf}", 0.0),  # not numbers: fall through to (absent) JSON
    ("[BEGIN SCORES]{\"overall_score\": NaN}[END SCORES]", 0.0),
    ("[BEGIN SCORES]{\"overall_score\": \"0.8\"}", 0.8),
    ("[BEGIN SCORES]{broken json[END SCORES]", 0.0),
    ("[BEGIN SCORES] no object [END SCORES] {\"overall_score\": 0.9}", 0.0),  # the object must be in the block
    ("nothing at all", 0.0), ("", 0.0), ("\\boxed{0.5", 0.0),  # unclosed box
])
def test_parse_judge_score(text, want):
    got = parse_judge_score(text)
    assert isinstance(got, float) and not math.isnan(got)
    assert got == pytest.approx(want)


def test_group_softmax_advantages():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    for beta in (1.0, 2.5):
        adv = group_advantages(r, kind="group-softmax", beta=beta)
        for g in range(2):
            rows = r[g].double().tolist()
            lse = math.log(sum(math.exp(beta * x) for x in rows))
            a = [beta * x - lse for x in rows]
            want = [x - sum(a) / len(a) for x in a]
            assert adv[g].tolist() == pytest.approx(want, abs=1e-6)
            assert adv[g].tolist() == pytest.approx([beta * (x - sum(rows) / len(rows)) for x in rows], abs=1e-6)
    assert group_advantages(torch.tensor([[0.7]]), kind="group-softmax").tolist() == [[0.0]]  # a group of one
