"""Self-Judge (ALGORITHMS.md section 3; arXiv 2603.21289): one trained Actor on unlabeled image + question items,
rewarded by a consistency prior over its group's answers, reweighted by a frozen Judge's score, plus a format
term; group-softmax advantages (`grpo.group_advantages(kind="group-softmax")`, actor.advantage).

    per step: items -> Actor: n responses each -> boxed answers -> prior b [G, n] (consistency_prior)
              responses with b > 0 -> Judge (ONE generate call): scores block, overall score in \\boxed{}
              r = clip(b * g(s) + f, 0, 1) (selfjudge_rewards) -> GRPO on the Actor

The names and meanings of `consistency_prior`, `judge_factor`, `selfjudge_rewards` and `parse_judge_score` are
fixed (issue 15); their tests are tests/test_selfjudge_rules.py, the recipe's tests/test_selfjudge.py.

Decisions:
- Answers are compared as exact strings; an answer of None (a response without `\\boxed{}`) votes as the string
  "None", like any other answer, so a group whose majority wrote no box has a "None" majority (the reference
  code's behaviour, kept). The vote reads `extract_boxed(text, unwrap_text=False)`: exact, as the paper's.
- The judge score is never NaN: a boxed "nan" or "inf" is not a number and falls through to the JSON block; a
  non-finite or non-numeric overall_score counts as missing (0). The reference lets NaN through.
- One frozen model for two jobs: the Judge IS the KL reference, the Actor's stage-start weights that the
  trainer loads once per stage (`Trainer.set_reference`); the Judge samples from that very module (a Policy
  view of it, no second copy: one bf16 copy of a 7B is ~15 GiB). With actor.kl_coef = 0 there is no reference
  and the recipe loads the stage-start weights itself, once per stage. The Judge's engine comes from
  `rollout.make_engine` with the run's backend (native, or vLLM with weights synced from the frozen module;
  with rollout.share_engine it is a view of the Actor's engine).
- A response whose prior b is 0 gets reward clip(0 * g + f, 0, 1) = 0 whatever the Judge says (f <= 0), so it
  is not sent to the Judge. Every Judge request is seeded by (seed, iteration, the item's position in the run,
  the sample), never by its place in the batch, so the judged responses get exactly the scores they would get
  if every response were judged (tests/test_selfjudge.py checks the rewards are identical).
- The Judge's prompt is ours; its output contract is ALGORITHMS.md's: `[BEGIN SCORES]{json}[END SCORES]`
  with answer correctness (0.5), reasoning quality (0.3) and visual grounding (0.2), then the overall score
  in `\\boxed{}` (parse_judge_score). The Judge never sees a label (there is none).
- Format warm-up (tiny preset only, selfjudge.format_warmup_steps > 0; vzero_fast/warmup.py): half the
  examples are Actor outputs `<think>..</think> \\boxed{X}` with a RANDOM answer, half Judge outputs
  `[BEGIN SCORES]{"overall_score": s}[END SCORES] \\boxed{s}` with a RANDOM score s (the short form of the
  contract: a 1.7M-parameter model cannot learn the four-key block in a warm-up). Format only.
- Metrics besides Role.grpo_step's, global over the ranks: prior_share (mean majority share p), hard_branch_rate
  (p > threshold), judged / judge_skipped (responses sent to the Judge / skipped for b = 0), judge_parse_rate
  (Judge outputs with a readable score), judge_score_mean / judge_score_std (over judged responses),
  format_rate (well-formed responses) and time_judge (seconds in the Judge's generate call, part of
  time_reward).

Run: `vzero-fast train --recipe selfjudge --preset tiny --out runs/sj-tiny` (CPU),
`vzero-fast train --recipe selfjudge --preset selfjudge-7b --model DIR --images rows.jsonl --out DIR`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vzero_fast import distributed as dist
from vzero_fast.answers import extract_boxed
from vzero_fast.model import Policy
from vzero_fast.recipes.single import SingleRoleRecipe
from vzero_fast.rollout import Request, RolloutOutput, SamplingParams, make_engine
from vzero_fast.trainer import Trainer, step_seed

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
    value = read_judge_score(text)
    return 0.0 if value is None else value


def read_judge_score(text: str) -> float | None:
    """`parse_judge_score` without its default: None when the output holds no readable score (for the parse rate)."""
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
                return None
            try:
                obj, _ = json.JSONDecoder().raw_decode(block[brace:])
            except ValueError:
                return None
            return _finite(obj.get("overall_score")) if isinstance(obj, dict) else None
    return None


def _finite(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------ prompt contracts

ACTOR_PROMPT = ("{question}\n\nThink step by step inside <think></think>, then put the final answer inside "
                "\\boxed{{}}.")
JUDGE_PROMPT = (
    "You are grading another model's response to a question about this image.\n\nQuestion: {question}\n\n"
    "Response: {response}\n\nScore the response from 0 to 1 on answer correctness (weight 0.5), reasoning "
    "quality (weight 0.3) and visual grounding (weight 0.2). Write the scores as [BEGIN SCORES]{{\"answer_"
    "correctness\": x, \"reasoning_quality\": x, \"visual_grounding\": x, \"overall_score\": x}}[END SCORES], "
    "then the overall score inside \\boxed{{}}."
)


def actor_text(question: str) -> str:
    return ACTOR_PROMPT.format(question=question)


def judge_text(question: str, response: str) -> str:
    return JUDGE_PROMPT.format(question=question, response=response)


# ------------------------------------------------------------------------------------------ the recipe

ACTOR = "actor"


class SelfJudgeRecipe(SingleRoleRecipe):
    ROLE, TASK, SECTION = ACTOR, "figures", "selfjudge"

    def __init__(self, trainer: Trainer):
        super().__init__(trainer, require_answer=False)  # no label is ever read
        self.judge: Policy | None = None
        self.judge_engine = None
        self._judge_src = ""

    def prompt(self, question: str) -> str:
        return actor_text(question)

    def stage_start(self, trainer: Trainer, iteration: int) -> None:
        """The Judge of this stage: the Actor's KL reference (its stage-start weights), or those weights loaded
        here when the Actor has no reference (kl_coef 0); an engine is built only when the weights change."""
        frozen, src = self.role.reference, str(trainer.stage_start_dir(ACTOR, iteration))
        if frozen is None:  # no KL reference: the Judge's own copy, loaded once per stage-start directory
            if self.judge is not None and self._judge_src == src:
                return
            frozen = trainer.load_policy(src, trainable=False, name=f"the Judge ({Path(src).name})").model.eval()
        elif self.judge is not None and self.judge.model is frozen:
            return
        self._judge_src = src
        self.judge = dataclasses.replace(self.role.policy, model=frozen)
        shared = self.role.engine if self.cfg.rollout.share_engine else None
        self.judge_engine = make_engine(self.judge, self.cfg.rollout.backend, options=self.cfg.rollout,
                                        seed=self.seed, share_with=shared)
        self.judge_engine.sync_weights(self.judge)  # an engine with its own weights (vLLM) takes the frozen ones

    def judge_requests(self, outputs: list[RolloutOutput], which: list[tuple[int, int]],
                       iteration: int) -> list[Request]:
        """One Judge request per (group, sample) in `which`: image, question and the full response."""
        sj = self.rules
        return [Request.from_image_text(
            outputs[g].request.images[0], judge_text(outputs[g].request.meta["question"], outputs[g].samples[j].text),
            SamplingParams(n=1, temperature=sj.judge_temperature, top_p=sj.judge_top_p,
                           max_new_tokens=sj.judge_max_tokens,
                           seed=step_seed(self.seed, "judge", iteration, outputs[g].request.meta["position"], j)))
            for g, j in which]

    def rewards(self, outputs: list[RolloutOutput], *, iteration: int, stats: dict[str, Any] | None = None,
                judge_all: bool = False) -> torch.Tensor:
        """[G, n] Self-Judge rewards of this rank's groups. Responses with prior 0 are not judged (module
        docstring) unless `judge_all` (the test and benchmark that show it changes nothing)."""
        G = len(outputs)
        n = len(outputs[0].samples) if outputs else 0
        texts = [[s.text for s in o.samples] for o in outputs]
        answers = [[extract_boxed(t, unwrap_text=False) for t in row] for row in texts]
        prior = consistency_prior(answers, self.rules.prior_threshold) if G else torch.zeros(0, n)  # [G, n]
        well = torch.tensor([[is_well_formed(t) for t in row] for row in texts], dtype=torch.bool).view(G, n)
        which = [(g, j) for g in range(G) for j in range(n) if judge_all or prior[g, j] > 0]
        scores = torch.zeros(G, n)  # [G, n]; a skipped response's score never matters (b = 0)
        found: list[float | None] = []
        start = time.perf_counter()
        if which or dist.is_distributed():  # under FSDP every rank calls generate, even with nothing to judge
            judged = self.judge_engine.generate(self.judge_requests(outputs, which, iteration))
            found = [read_judge_score(o.samples[0].text) for o in judged]
            for (g, j), v in zip(which, found, strict=True):
                scores[g, j] = 0.0 if v is None else v
        seconds = time.perf_counter() - start
        reward = selfjudge_rewards(prior, scores, well)
        if stats is not None:
            p = torch.tensor([max(Counter(NONE_ANSWER if a is None else a for a in row).values()) / n
                              for row in answers], dtype=torch.float64)  # [G] majority share
            s = torch.tensor([0.0 if v is None else v for v in found], dtype=torch.float64)
            sums = dist.all_reduce(torch.tensor([
                G, float(p.sum()), float((p > self.rules.prior_threshold).sum()), G * n, len(which),
                sum(v is not None for v in found), float(s.sum()), float((s * s).sum()), float(well.sum())],
                dtype=torch.float64))
            groups, p_sum, hard, responses, judged_n, parsed, s_sum, s_sq, well_n = sums.tolist()
            var = max(s_sq - s_sum * s_sum / judged_n, 0.0) / (judged_n - 1) if judged_n > 1 else 0.0
            stats.update(prior_share=p_sum / max(groups, 1), hard_branch_rate=hard / max(groups, 1),
                         judged=judged_n, judge_skipped=responses - judged_n,
                         judge_parse_rate=parsed / max(judged_n, 1), judge_score_mean=s_sum / max(judged_n, 1),
                         judge_score_std=math.sqrt(var), format_rate=well_n / max(responses, 1),
                         time_judge=float(dist.all_reduce(torch.tensor(seconds, dtype=torch.float64), "max")))
        return reward

    def reward_fn(self, iteration: int, stats: dict[str, Any]):
        return lambda outputs: self.rewards(outputs, iteration=iteration, stats=stats)

    # --------------------------------------------------------------------------------- format warm-up

    def warmup_examples(self, rng: np.random.Generator) -> list[tuple[Any, str, str]]:
        """Half Actor outputs with random answers, half Judge outputs with random scores (module docstring)."""
        out = []
        for k in range(self.rules.format_warmup_batch):
            item = self.source.load(int(rng.integers(len(self.source))))
            if item is None:
                continue
            question = self.source.questions[item.index]
            response = _random_response(rng)
            if k % 2 == 0:
                out.append((item.image, actor_text(question), response))
            else:
                score = f"{int(rng.integers(11)) / 10:.1f}"
                out.append((item.image, judge_text(question, response),
                            f"[BEGIN SCORES]{{\"overall_score\": {score}}}[END SCORES] \\boxed{{{score}}}"))
        return out

    def warmup_probe(self, policy) -> dict[str, float]:
        items = self.probe_items()
        rng = np.random.default_rng([self.seed, 13])
        actor = self.probe_rate(policy, [(im, actor_text(q)) for im, q in items], is_well_formed,
                                max_new_tokens=self.rc.max_response_tokens, purpose="probe-actor")
        judge = self.probe_rate(policy, [(im, judge_text(q, _random_response(rng))) for im, q in items],
                                lambda t: read_judge_score(t) is not None, max_new_tokens=self.rules.judge_max_tokens,
                                purpose="probe-judge")
        return {"actor_parse_rate": actor, "judge_parse_rate": judge}


_REASONS = ("Count them.", "Read the labels.", "Look at the hands.")


def _random_response(rng: np.random.Generator) -> str:
    """A well-formed Actor response with a random answer (a number, or a time)."""
    hour, five = int(rng.integers(1, 13)), int(rng.integers(0, 12)) * 5
    answer = str(hour) if rng.random() < 0.7 else f"{hour}:{five:02d}"
    return f"<think>{_REASONS[int(rng.integers(len(_REASONS)))]}</think> \\boxed{{{answer}}}"
