"""V-Zero-OPD's rules (vzero_fast/recipes/opd.py) against ALGORITHMS.md section 4: hand-computed cases (a group
of one, a zero-variance group, empty responses, ragged lengths where the mean over a response's own tokens
matters, gamma != 1, the gate's clamp at 0 and 2, d clamped at +-10 before weighting) and a plain-Python
float64 transcription of the section on random inputs. The expected values never come from the code under
test. The signatures are pinned: an outside check calls these functions by name and keyword."""

from __future__ import annotations

import inspect
import math
import random

import pytest
import torch

from vzero_fast.recipes.opd import distill_advantages, evidence_gate


def gate_reference(pos, neg, lengths, *, gamma=1.0, alpha=0.5):
    """ALGORITHMS.md section 4 written out with Python floats: pos/neg are [G][n][T] lists, lengths [G][n]."""
    out = []
    for g in range(len(pos)):
        p = []
        for i in range(len(pos[g])):
            L = lengths[g][i]
            total = 0.0
            for t in range(L):
                delta = pos[g][i][t] - neg[g][i][t]
                total += max(delta, 0.0) - gamma * max(-delta, 0.0)
            p.append(total / max(L, 1e-6))
        n = len(p)
        mean = sum(p) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in p) / n)  # population std
        if n == 1 or max(p) == min(p):
            out.append([1.0] * n)
        else:
            out.append([min(max(1 + alpha * (x - mean) / (std + 1e-6), 0.0), 2.0) for x in p])
    return out


def _tensors(pos, neg, lengths, T):
    """[G, n, T] float64 tensors from ragged lists; padding holds NaN (it must never be read)."""
    G, n = len(pos), len(pos[0])
    P = torch.full((G, n, T), float("nan"), dtype=torch.float64)
    N = torch.full((G, n, T), float("nan"), dtype=torch.float64)
    M = torch.zeros(G, n, T, dtype=torch.bool)
    for g in range(G):
        for i in range(n):
            L = lengths[g][i]
            P[g, i, :L] = torch.tensor(pos[g][i][:L], dtype=torch.float64)
            N[g, i, :L] = torch.tensor(neg[g][i][:L], dtype=torch.float64)
            M[g, i, :L] = True
    return P, N, M


def _gate(deltas, *, T=3, **kw):
    """evidence_gate on one group given each response's per-token delta (neg = 0, pos = delta)."""
    lengths = [[len(d) for d in deltas]]
    pos = [[list(d) for d in deltas]]
    neg = [[[0.0] * len(d) for d in deltas]]
    P, N, M = _tensors(pos, neg, lengths, T)
    return evidence_gate(P, N, M, **kw)[0].tolist()


def test_signatures_are_pinned():
    sig = inspect.signature(evidence_gate)
    assert list(sig.parameters) == ["pos_logp", "neg_logp", "mask", "gamma", "alpha"]
    assert sig.parameters["gamma"].kind is inspect.Parameter.KEYWORD_ONLY and sig.parameters["gamma"].default == 1.0
    assert sig.parameters["alpha"].kind is inspect.Parameter.KEYWORD_ONLY and sig.parameters["alpha"].default == 0.5
    sig = inspect.signature(distill_advantages)
    assert list(sig.parameters) == ["student_logp", "teacher_logp", "mask", "w", "clamp"]
    assert sig.parameters["clamp"].kind is inspect.Parameter.KEYWORD_ONLY and sig.parameters["clamp"].default == 10.0


def test_two_responses_by_hand():
    # p = [1, -1]: mean 0, population std 1, a = +-1 / (1 + 1e-6), w = 1 +- 0.5 / (1 + 1e-6).
    w = _gate([[1.0], [-1.0]])
    assert w == pytest.approx([1 + 0.5 / (1 + 1e-6), 1 - 0.5 / (1 + 1e-6)], abs=1e-12)


def test_mean_over_own_tokens_first():
    """Ragged lengths: p = [2, 0, -1] (each response's own mean), not the sums over a padded T or the group's
    pooled tokens. mean 1/3, popstd sqrt(42/27)."""
    w = _gate([[2.0], [0.0, 0.0, 0.0], [-1.0, -1.0]])
    std = math.sqrt(42 / 27)
    want = [1 + 0.5 * (x - 1 / 3) / (std + 1e-6) for x in (2.0, 0.0, -1.0)]
    assert want == pytest.approx([1.668, 0.866, 0.465], abs=1e-3)  # the hand numbers
    assert w == pytest.approx(want, abs=1e-9)


def test_group_of_one_gets_weight_one():
    assert _gate([[3.0, -1.0]]) == [1.0]
    assert _gate([[]]) == [1.0]


def test_zero_variance_group_gets_weight_one():
    """Equal p (0.5 from different token lists, exact in binary; and identical responses): w = 1 exactly."""
    assert _gate([[0.5], [0.25, 0.75], [1.5, -0.5]]) == [1.0, 1.0, 1.0]
    assert _gate([[0.7, 0.2]] * 4, T=2) == [1.0] * 4


def test_empty_responses():
    """An empty response has p = 0 (0 / max(0, 1e-6)) and takes part in the group statistics; an all-empty
    group is flat (w = 1); its distillation advantages are all 0."""
    w = _gate([[1.0, 1.0], [], [-1.0]])
    a = 0.5 * 1.0 / (math.sqrt(2 / 3) + 1e-6)
    assert w == pytest.approx([1 + a, 1.0, 1 - a], abs=1e-9)
    assert w == pytest.approx([1.6124, 1.0, 0.3876], abs=1e-4)
    assert _gate([[], [], []]) == [1.0, 1.0, 1.0]
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    adv = distill_advantages(torch.randn(1, 2, 3), torch.randn(1, 2, 3), mask, torch.tensor([[1.5, 0.5]]))
    assert adv.shape == (1, 2, 3) and torch.all(adv == 0)


def test_gamma_weights_negative_evidence():
    """gamma = 2: Delta of [1, -1] is [1, -2] (p = -0.5), of [-0.2] is -0.4; gamma = 1 would give p = 0 and -0.2."""
    deltas = [[1.0, -1.0], [0.5], [-0.2]]
    p = [-0.5, 0.5, -0.4]
    mean = sum(p) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in p) / 3)
    want = [1 + 0.5 * (x - mean) / (std + 1e-6) for x in p]
    assert want == pytest.approx([0.5923, 1.7042, 0.7035], abs=1e-4)
    assert _gate(deltas, gamma=2.0) == pytest.approx(want, abs=1e-9)
    assert _gate(deltas, gamma=2.0) != pytest.approx(_gate(deltas, gamma=1.0), abs=1e-3)


def test_gate_clamped_to_0_and_2():
    """alpha = 1, one outlier in 5: p = [10, 0, 0, 0, 0] -> a = [2, -0.5, ...] -> w = [3 -> 2, 0.5, ...];
    mirrored: [-10, 0, ...] -> w = [-1 -> 0, 1.5, ...]."""
    hi = _gate([[10.0], [0.0], [0.0], [0.0], [0.0]], T=1, alpha=1.0)
    assert hi == pytest.approx([2.0] + [1 - 0.5 * 4 / (4 + 1e-6)] * 4, abs=1e-9)
    lo = _gate([[-10.0], [0.0], [0.0], [0.0], [0.0]], T=1, alpha=1.0)
    assert lo == pytest.approx([0.0] + [1 + 0.5 * 4 / (4 + 1e-6)] * 4, abs=1e-9)


def test_distill_clamps_before_weighting():
    """gaps [1, -15, 27] clamp to [1, -10, 10] BEFORE the weight: w = 0.5 gives A = [-0.5, 5, -5] (weighting
    first and clamping after would give [-0.5, 7.5, -10]); w = 2 gives [-2, 20, -20] (beyond +-10)."""
    s = torch.tensor([[[-1.0, -20.0, -3.0]], [[-1.0, -20.0, -3.0]]])  # [G=2, n=1, T=3]
    t = torch.tensor([[[-2.0, -5.0, -30.0]], [[-2.0, -5.0, -30.0]]])
    mask = torch.ones(2, 1, 3, dtype=torch.bool)
    adv = distill_advantages(s, t, mask, torch.tensor([[0.5], [2.0]]))
    assert adv.tolist() == [[[-0.5, 5.0, -5.0]], [[-2.0, 20.0, -20.0]]]
    assert not adv.requires_grad
    adv = distill_advantages(s, t, mask, torch.tensor([[1.0], [1.0]]), clamp=3.0)
    assert adv.tolist() == [[[-1.0, 3.0, -3.0]]] * 2


def test_distill_masks_and_detaches():
    s = torch.tensor([[[-1.0, float("nan")], [-2.0, -3.0]]], requires_grad=True)
    t = torch.tensor([[[-1.5, float("inf")], [-1.0, -1.0]]])
    mask = torch.tensor([[[True, False], [True, True]]])
    adv = distill_advantages(s, t, mask, torch.tensor([[1.0, 0.25]]))
    assert adv.tolist() == [[[-0.5, 0.0], [0.25, 0.5]]]
    assert not adv.requires_grad


@pytest.mark.parametrize("gamma,alpha", [(1.0, 0.5), (2.0, 0.5), (0.5, 1.5)])
def test_random_groups_match_the_float64_transcription(gamma, alpha):
    rng = random.Random(int(gamma * 10 + alpha * 100))
    G, n, T = 7, 5, 9
    lengths = [[rng.choice([0, 1, 2, 5, 9]) for _ in range(n)] for _ in range(G)]
    lengths[0] = [4] * n  # one group with equal lengths
    pos = [[[rng.gauss(-2, 1.5) for _ in range(T)] for _ in range(n)] for _ in range(G)]
    neg = [[[x + rng.gauss(0, 1) for x in row] for row in grp] for grp in pos]
    P, N, M = _tensors(pos, neg, lengths, T)
    want = gate_reference(pos, neg, lengths, gamma=gamma, alpha=alpha)
    got64 = evidence_gate(P, N, M, gamma=gamma, alpha=alpha)
    got32 = evidence_gate(P.float(), N.float(), M, gamma=gamma, alpha=alpha)
    assert got64.shape == (G, n)
    for g64, g32, w in zip(got64.tolist(), got32.tolist(), want, strict=True):
        assert g64 == pytest.approx(w, abs=1e-12)
        assert g32 == pytest.approx(w, abs=1e-4)
    assert any(0.0 < x < 1.0 for row in want for x in row) and any(1.0 < x < 2.0 for row in want for x in row)

    # The advantages: A_t = -w_i clamp(student - teacher, -10, 10) on valid tokens, 0 elsewhere.
    student = [[[rng.gauss(-3, 8) for _ in range(T)] for _ in range(n)] for _ in range(G)]
    S, Tt, _ = _tensors(student, pos, lengths, T)
    adv = distill_advantages(S, Tt, M, got64)
    clamped = 0
    for g in range(G):
        for i in range(n):
            for t in range(T):
                if t < lengths[g][i]:
                    gap = student[g][i][t] - pos[g][i][t]
                    clamped += abs(gap) > 10
                    expected = -want[g][i] * min(max(gap, -10.0), 10.0)
                else:
                    expected = 0.0
                assert adv[g, i, t].item() == pytest.approx(expected, abs=1e-9)
    assert clamped > 0
