"""Self-Judge's reward rules (ALGORITHMS.md section 3; arXiv 2603.21289): a consistency prior over the group's
answers, reweighted by a frozen Judge's score, plus a format term; group-softmax advantages live in
`grpo.group_advantages(kind="group-softmax")`.

The names and meanings of `consistency_prior`, `judge_factor`, `selfjudge_rewards` and `parse_judge_score` are
fixed (issue 15). The recipe that samples the Actor and the Judge and trains with these rules (`--recipe
selfjudge`) is not implemented yet: this module holds the rules, tested on hand-built groups
(tests/test_selfjudge_rules.py).

Decisions:
- Answers are compared as exact strings; an answer of None (a response without `\\boxed{}`) votes as the string
  "None", like any other answer, so a group whose majority wrote no box has a "None" majority (the reference
  code's behaviour, kept).
- The judge score is never NaN: a boxed "nan" or "inf" is not a number and falls through to the JSON block; a
  non-finite or non-numeric overall_score counts as missing (0). The reference lets NaN through.
"""

from __future__ import annotations

import json
import math
import re

import torch

from vzero_fast.answers import extract_boxed

NONE_ANSWER = "None"
"""The answer of a response without `\\boxed{}`: it votes like any other answer."""
WELL_FORMED = re.compile(r"<think>.*</think>.*\\boxed\{.*\}", re.DOTALL)
"""The format Self-Judge rewards, matched from the response's first character."""
FORMAT_PENALTY = -0.5
"""f_i for a response that does not match WELL_FORMED (0 when it does)."""


def consistency_prior(answers: list[list[str | None]], threshold: float = 0.85) -> torch.Tensor:
    """[G, n] prior b of each response. Per group: maj = the most frequent answer (ties: the one seen first),
    p = count(maj) / n over all n responses; if p > threshold (strict), b_i = 1 where a_i == maj else 0;
    otherwise b_i = count(a_i) / n. None votes as "None"."""
    if not answers:
        return torch.zeros(0, 0)
    n = len(answers[0])
    if n == 0 or any(len(group) != n for group in answers):
        raise ValueError(f"every group needs the same number (>= 1) of answers, got {[len(g) for g in answers]}")
    prior = torch.empty(len(answers), n, dtype=torch.float32)
    for g, group in enumerate(answers):
        votes = [NONE_ANSWER if a is None else a for a in group]
        counts: dict[str, int] = {}
        for a in votes:  # dicts keep insertion order: max() returns the first answer seen among the tied
            counts[a] = counts.get(a, 0) + 1
        maj = max(counts, key=counts.__getitem__)
        if counts[maj] / n > threshold:
            prior[g] = torch.tensor([1.0 if a == maj else 0.0 for a in votes])
        else:
            prior[g] = torch.tensor([counts[a] / n for a in votes])
    return prior


def judge_factor(scores: torch.Tensor) -> torch.Tensor:
    """g(s) = clamp(1 + 0.2 sigmoid((s - 0.95) / 0.02) - 0.2 sigmoid((0.40 - s) / 0.05), 0.8, 1.2),
    elementwise: a score near 1 raises the prior by up to 20%, a score below ~0.4 lowers it by up to 20%."""
    s = scores.to(torch.float32)
    g = 1.0 + 0.2 * torch.sigmoid((s - 0.95) / 0.02) - 0.2 * torch.sigmoid((0.40 - s) / 0.05)
    return g.clamp(0.8, 1.2)


def selfjudge_rewards(prior: torch.Tensor, scores: torch.Tensor, well_formed: torch.Tensor) -> torch.Tensor:
    """r = clip(b * g(s) + f, 0, 1) with f = 0 for a well-formed response, -0.5 otherwise (all [G, n])."""
    f = torch.where(well_formed.bool(), 0.0, FORMAT_PENALTY)
    return (prior.to(torch.float32) * judge_factor(scores) + f).clamp(0.0, 1.0)


def is_well_formed(text: str) -> bool:
    """`<think>...</think>...\\boxed{...}` from the first character (a leading space fails)."""
    return WELL_FORMED.match(text) is not None


def parse_judge_score(text: str) -> float:
    """The Judge's overall score: the last `\\boxed{}` if its content is a finite number (clamped to [0, 1]);
    else the first JSON object after `[BEGIN SCORES]` (or `[SCORES]`), read up to `[END SCORES]` or the end,
    and its `overall_score` (missing, non-numeric or non-finite: 0); else 0. Never NaN."""
    boxed = extract_boxed(text, unwrap_text=False)
    if boxed is not None:
        value = _finite(boxed)
        if value is not None:
            return min(max(value, 0.0), 1.0)
    for marker in ("[BEGIN SCORES]", "[SCORES]"):
        start = text.find(marker)
        if start >= 0:
            block = text[start + len(marker):]
            end = block.find("[END SCORES]")
            block = block if end < 0 else block[:end]
            brace = block.find("{")
            if brace < 0:
                return 0.0
            try:
                obj, _ = json.JSONDecoder().raw_decode(block[brace:])
            except ValueError:
                return 0.0
            value = _finite(obj.get("overall_score")) if isinstance(obj, dict) else None
            return value if value is not None else 0.0
    return 0.0


def _finite(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
