"""The grpo recipe: plain GRPO with a verifiable reward on labeled questions -- the baseline V-Zero compares
with ("supervised GRPO on labels"; ALGORITHMS.md section 1, Reported) -- and, with `grpo.mode = maj`, the
label-free majority-vote baseline (the group's majority answer replaces the label).

    per step: items -> Learner: n answers each -> extract the boxed answer -> r = (1 - w) * correct + w * format
              correct = answers_equal(answer, label)        label = the row's answer (mode label)
                                                                  = maj(boxed answers of the group) (mode maj)

Decisions:
- The answer is the content of the last `\\boxed{}` (vzero_fast/answers.py); equality is `answers_equal`:
  letters for multiple choice, by value for numbers, normalised strings for short answers.
- maj: the vote is over the exact stripped boxed strings (`extract_boxed(text, unwrap_text=False)`); a response
  without a box does not vote (ALGORITHMS.md: maj is the most frequent VALID answer; ties: the one seen first).
  A group where no response boxed anything has no label: every reward is 0 (plus the format term). The label
  is then compared with `answers_equal`, so "b" agrees with a majority "B". mode maj never reads `answer`.
- The format term (w = grpo.format_weight, 0 by default) pays `<think>..</think>..\\boxed{..}` from the first
  character (Self-Judge's format, `selfjudge.is_well_formed`).
- The tiny default is the synthetic colour task (vzero_fast/qa.py): one large shape of one of four colours,
  options in a fixed order, answer one letter. A random tiny model first gets a format warm-up (`\\boxed{X}`
  with X a RANDOM letter: format, not answers), so its reward starts at chance (`qa.label_chance`: 1/4 for
  balanced colours) and can only rise by reading the pixels. Measured in tests/test_grpo_recipe.py.
- Metrics besides Role.grpo_step's: accuracy (share of correct answers), boxed_rate (responses with a box),
  well_formed_rate and, in mode maj, maj_share (mean majority share over groups with a vote) and
  label_rate (groups that had a majority answer).

Run: `vzero-fast train --recipe grpo --preset tiny --out runs/grpo-tiny` (CPU, about a minute);
`vzero-fast train --recipe grpo --preset selfjudge-7b --model DIR --images rows.jsonl --out DIR`.
Tests: `pytest tests/test_grpo_recipe.py`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from vzero_fast import distributed as dist
from vzero_fast.answers import LETTERS, answers_equal, extract_boxed
from vzero_fast.recipes.selfjudge import is_well_formed
from vzero_fast.recipes.single import SingleRoleRecipe
from vzero_fast.rollout import RolloutOutput
from vzero_fast.trainer import Trainer

LEARNER = "learner"
PROMPT = "{question}\n\nPut the final answer inside \\boxed{{}}."


def majority_answer(answers: list[str | None]) -> tuple[str | None, float]:
    """(maj, share): the most frequent non-None answer (ties: the one seen first) and its count / n over ALL n
    answers; (None, 0.0) when no answer is valid."""
    votes = Counter(a for a in answers if a is not None)  # Counter keeps first-seen order among equal counts
    if not votes:
        return None, 0.0
    maj, count = max(votes.items(), key=lambda kv: kv[1])
    return maj, count / len(answers)


def grpo_rewards(texts: list[list[str]], labels: list[str | None], *, format_weight: float = 0.0) -> torch.Tensor:
    """[G, n] rewards: (1 - w) * answers_equal(boxed answer, label of the group) + w * well_formed. A group whose
    label is None scores 0 on correctness."""
    correct = torch.tensor([[label is not None and answers_equal(extract_boxed(t), label) for t in row]
                            for row, label in zip(texts, labels, strict=True)], dtype=torch.float32)
    well = torch.tensor([[is_well_formed(t) for t in row] for row in texts], dtype=torch.float32)
    return (1.0 - format_weight) * correct + format_weight * well


class GRPORecipe(SingleRoleRecipe):
    ROLE, TASK, SECTION = LEARNER, "colour", "grpo"

    def __init__(self, trainer: Trainer):
        super().__init__(trainer, require_answer=trainer.cfg.grpo.mode == "label")

    def prompt(self, question: str) -> str:
        return PROMPT.format(question=question)

    def labels(self, outputs: list[RolloutOutput],
               votes: list[list[str | None]]) -> tuple[list[str | None], list[float]]:
        """Each group's label: the row's answer (mode label) or the majority vote (mode maj), and the vote's share."""
        if self.rules.mode == "label":
            return [self.source.answers[o.request.meta["index"]] for o in outputs], [1.0] * len(outputs)
        pairs = [majority_answer(v) for v in votes]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def rewards(self, outputs: list[RolloutOutput], stats: dict[str, Any] | None = None) -> torch.Tensor:
        texts = [[s.text for s in o.samples] for o in outputs]
        votes = [[extract_boxed(t, unwrap_text=False) for t in row] for row in texts]
        labels, shares = self.labels(outputs, votes)
        reward = grpo_rewards(texts, labels, format_weight=self.rules.format_weight)
        if stats is not None:
            correct = grpo_rewards(texts, labels)
            boxed = sum(v is not None for row in votes for v in row)
            well = sum(is_well_formed(t) for row in texts for t in row)
            with_label = [s for s, lab in zip(shares, labels, strict=True) if lab is not None]
            sums = dist.all_reduce(torch.tensor([correct.numel(), float(correct.sum()), boxed, well, len(outputs),
                                                 len(with_label), sum(with_label)], dtype=torch.float64)).tolist()
            n, right, boxed_n, well_n, groups, labelled, share_sum = sums
            stats.update(accuracy=right / max(n, 1), boxed_rate=boxed_n / max(n, 1),
                         well_formed_rate=well_n / max(n, 1))
            if self.rules.mode == "maj":
                stats.update(maj_share=share_sum / max(labelled, 1), label_rate=labelled / max(groups, 1))
        return reward

    def reward_fn(self, iteration: int, stats: dict[str, Any]):  # noqa: ARG002
        return lambda outputs: self.rewards(outputs, stats)

    # --------------------------------------------------------------------------------- format warm-up

    def warmup_examples(self, rng: np.random.Generator) -> list[tuple[Any, str, str]]:
        """`\\boxed{X}` with X a random letter: the answer slot's format, no label (module docstring)."""
        out = []
        for _ in range(self.rules.format_warmup_batch):
            item = self.source.load(int(rng.integers(len(self.source))))
            if item is not None:
                out.append((item.image, self.prompt(self.source.questions[item.index]),
                            f"\\boxed{{{LETTERS[int(rng.integers(len(LETTERS)))]}}}"))
        return out

    def warmup_probe(self, policy) -> dict[str, float]:
        rate = self.probe_rate(policy, [(im, self.prompt(q)) for im, q in self.probe_items()],
                               lambda t: extract_boxed(t) is not None, max_new_tokens=self.rc.max_response_tokens,
                               purpose="probe-learner")
        return {"learner_parse_rate": rate}
