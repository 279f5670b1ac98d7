"""V-Zero: a Questioner and a Solver, both from one base model, co-evolve on unlabeled images
(ALGORITHMS.md section 1; arXiv 2601.10094).

Per iteration k (`stages`): train the Questioner against the frozen Solver of iteration k-1, then train the
Solver on questions of the new Questioner, pseudo-labelled by the Solver before its own update.

    questioner stage, per step:                           solver stage:
      images -> Questioner: n questions each                every image -> new Questioner: 1 question
      valid questions -> Solver (no grad): m answers each   valid questions -> Solver: label_votes answers
      vote_count -> a_hat, c -> dual-track reward           vote_count over A-D -> label, share; band filter
      GRPO on the Questioner                                questions-iter<k>.jsonl; GRPO on the Solver
                                                            (reward 1 when the boxed letter == label)

Decisions:
- One process, one device set: the Solver that scores the Questioner is the in-memory `solver` role, sampled
  through its own rollout engine under inference mode. It has not trained yet in iteration k, so it *is* the
  frozen Solver k-1; nothing is written, served or reloaded between stages (the reference code ran an HTTP
  vLLM server, base64 images in JSON files, engine restarts and checkpoint merges).
- Under torchrun (vzero_fast/distributed.py) each rank takes its share of a Questioner step's images (and
  all n samples of each: groups never split), scores its own valid questions with the Solver (all m votes
  of a question on one rank), and trains on its share of a Solver step's questions. The question set is
  built from each rank's share of the image pool and all-gathered in image order, so every rank keeps the
  same questions whatever the number of ranks; rank 0 writes the files. Every rank calls `generate` even
  with nothing to ask (the call gathers the sharded model), and the extra metrics are all-reduced. Seeds
  never depend on how a batch is split, but sharded numerics (reduction order) make a run with several
  ranks deterministic, not bit-identical to one process.
- All valid questions of a step (up to prompts_per_step * n) go to the Solver in ONE generate call with
  n = reward_votes, then ONE `vote_count` over [Q, m]; rewards are computed on tensors.
- Answer ids for the votes: A-D are 0-3. For the Questioner's reward a Solver answer without a usable
  letter is the answer "None" (id 4) and takes part in the vote (ALGORITHMS.md). That covers a missing or
  unclosed \\boxed{} *and* a boxed non-letter (\\boxed{42}): neither answers a four-option question, and
  counting "42" as a real answer would let garbage win the vote and pay 0.5c as "reasoning overturned
  intuition". For the pseudo-label only A-D vote (the rest are -1, ignored) and share = count / label_votes.
- The Solver stage builds its question set up front (batched Questioner calls over the whole image pool,
  batched Solver calls for the votes, in chunks of one rollout's size) and writes it to
  `questions-iter<k>.jsonl` before training. A run
  resumed in the middle of that stage reads the file back instead of regenerating: the Solver has trained
  since, so its votes could not be reproduced. At stage start (step 0) it is always regenerated, from the
  same weights and seeds, hence the same rows.
- Steps per stage: train.max_steps_per_role when > 0, else one epoch: images // prompts_per_step for the
  Questioner, kept questions // prompts_per_step (at least 1) for the Solver. Kept questions are visited in
  a permutation seeded by (seed, iteration, epoch), wrapping into the next epoch when more steps are asked.
- Format warm-up (tiny preset only, vzero.format_warmup_steps > 0): a random tiny model cannot write the
  tags, so every reward would be -1. Before iteration 1 one copy of the base model gets a short supervised
  pass (cross-entropy on the response tokens through forward_hidden + fused_linear_logprob, its own AdamW)
  (vzero_fast/warmup.py, shared with the other recipes) on templated outputs of both roles:
  `<description>/<question>/<answer>` and `<think>..</think> \\boxed{X}`, with random answer letters and
  content templated from the figure kind. It teaches format only: no answer labels exist anywhere. The
  result is saved as `<run>/format-warmup` and becomes the run's base model, so both roles and their
  iteration-1 KL reference start from it; a resumed run finds the directory and does not warm up again.
  Parse rates after warm-up go to `format_warmup.json`. Under torchrun rank 0 alone warms up an unsharded
  copy before any model is sharded; the others wait for the directory, then every rank loads (and shards)
  the roles from it.
- Every sampling seed is `step_seed(seed, purpose, iteration, ...)` of the image's position in the run's
  image stream or its index in the pool (and the sample), never of a position inside a batch: a resumed run
  draws exactly what an uninterrupted one would.
- Metrics, besides Role.grpo_step's: Questioner rows carry valid_question_rate, solver_agree_rate
  (a_hat == a_fast), solver_overturned_rate (a_hat another letter), solver_none_rate, solver_majority_share
  (mean c) and solver_letter_rate, over the step's valid questions; Solver rows carry the stage's questions,
  questions_valid_rate, questions_kept, kept_rate, label_share_mean and the rollouts' solver_letter_rate.
  The stage timers add time_format_warmup, time_questions and time_labels to the first row they precede.
- Not implemented: Solver timeouts (in process there are none; an error raises instead of scoring -1).

Run: `vzero-fast train --recipe vzero --preset tiny --out runs/vzero-tiny --iterations 2` (CPU, minutes),
`vzero-fast train --recipe vzero --preset vzero-7b --model DIR --images DIR --out DIR` (the paper's setting).
Tests: `pytest tests/test_vzero.py tests/test_answers.py`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vzero_fast import distributed as dist
from vzero_fast.answers import LETTERS, Question, extract_choice, parse_question
from vzero_fast.config import Config, VZeroConfig, to_dict
from vzero_fast.data import ImageItem, ImageSource, epoch_picks, open_images, shard_indices, step_items
from vzero_fast.grpo import keep_groups
from vzero_fast.kernels import vote_count
from vzero_fast.model import Policy, image_factor
from vzero_fast.rollout import Request, RolloutOutput, SamplingParams, make_engine
from vzero_fast.trainer import Trainer, step_seed
from vzero_fast.warmup import ensure_warmup, supervised_pass

log = logging.getLogger("vzero_fast.recipes.vzero")

QUESTIONER, SOLVER = "questioner", "solver"
NONE_ID = len(LETTERS)  # the answer "None" in the Questioner's reward vote (A-D are 0-3)

QUESTIONER_PROMPT = (
    "Look at the image. Describe what it shows inside <description></description>. Then ask one "
    "multiple-choice question about the image with four options labelled A) B) C) D), inside "
    "<question></question>. Then answer it without thinking: only the letter, inside <answer></answer>."
)
SOLVER_PROMPT = (
    "{question}\n\nThink step by step inside <think></think>, then put the final answer, a single letter "
    "A, B, C or D, inside \\boxed{{}}."
)


def questioner_text() -> str:
    return QUESTIONER_PROMPT


def solver_text(question: Question) -> str:
    return SOLVER_PROMPT.format(question=question.solver_text())


# ------------------------------------------------------------------------------------- rules (tensors)

def choice_ids(texts: Sequence[str], *, none_id: int) -> list[int]:
    """Solver responses -> answer ids: A-D -> 0-3, no usable letter -> `none_id`."""
    return [LETTERS.index(c) if (c := extract_choice(t)) is not None else none_id for t in texts]


def dual_track_rewards(a_fast: torch.Tensor, answer_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The Questioner's reward (ALGORITHMS.md section 1), vectorised.

    a_fast [Q] int64: the intuitive answer 0-3, or -1 for an invalid output / empty answer.
    answer_ids [Q, m] int64: the Solver's answers, 0-3 or NONE_ID (every id votes; ties: first seen).
    Returns (reward [Q] fp32, a_hat [Q] int64, c [Q] fp32)."""
    m = answer_ids.shape[1]
    a_hat, count, _ = vote_count(answer_ids)  # [Q] each
    c = count.to(torch.float32) / m
    agree = torch.minimum(c, 1 - c)
    overturned = torch.where(a_hat != NONE_ID, 0.5 * c, torch.zeros_like(c))
    reward = torch.where(a_hat == a_fast, agree, overturned)
    return torch.where(a_fast < 0, torch.full_like(c, -1.0), reward), a_hat, c


def pseudo_labels(answer_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """answer_ids [Q, n] (0-3, -1 for no letter) -> (label [Q] int64, -1 when no vote; share [Q] fp64 = count / n).

    fp64 so that share == 3/10 compares equal to band_low = 0.3 as Python writes it (and prints as 0.3)."""
    label, count, _ = vote_count(answer_ids)
    return label, count.to(torch.float64) / answer_ids.shape[1]


def in_band(share: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """[Q] bool: low <= share <= high (the difficulty band)."""
    return keep_groups(share[:, None], share=share, band=(low, high))


# ---------------------------------------------------------------------------------------- the recipe

class VZeroRecipe:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.cfg: Config = trainer.cfg
        self.seed = self.cfg.train.seed
        self.source: ImageSource = open_images(self.cfg.data, seed=self.seed,
                                                factor=image_factor(trainer.model_path))
        log.info("images: %s", self.source.describe())
        dist.check_divisible(self.cfg.questioner.prompts_per_step, "questioner.prompts_per_step")
        if self.cfg.vzero.format_warmup_steps > 0:
            trainer.model_path = ensure_format_warmup(trainer, self.source)
        self.questioner = trainer.add_role(QUESTIONER, self.cfg.questioner)
        self.solver = trainer.add_role(SOLVER, self.cfg.solver)

    def stages(self, iteration: int) -> list[str]:  # noqa: ARG002
        return [QUESTIONER, SOLVER]

    def run_stage(self, trainer: Trainer, iteration: int, role_name: str, *, start_step: int) -> None:
        if role_name == QUESTIONER:
            self._questioner_stage(trainer, iteration, start_step)
        else:
            self._solver_stage(trainer, iteration, start_step)

    # ---------------------------------------------------------------------------------- requests

    def _questioner_request(self, item: ImageItem, *, n: int, temperature: float, repetition_penalty: float,
                            seed: int) -> Request:
        qc = self.cfg.questioner
        params = SamplingParams(n=n, temperature=temperature, top_p=qc.top_p, top_k=qc.top_k,
                                max_new_tokens=qc.max_response_tokens, repetition_penalty=repetition_penalty,
                                seed=seed)
        return Request.from_image_text(item.image, questioner_text(), params, request_id=item.key,
                                       meta={"index": item.index, "key": item.key, "position": item.position})

    @staticmethod
    def _solver_request(image, question: Question, params: SamplingParams, meta: dict[str, Any]) -> Request:
        return Request.from_image_text(image, solver_text(question), params, meta=meta)

    # ---------------------------------------------------------------------------- questioner stage

    def questioner_steps(self) -> int:
        return self.cfg.train.max_steps_per_role or max(1, len(self.source) // self.cfg.questioner.prompts_per_step)

    def _questioner_stage(self, trainer: Trainer, iteration: int, start_step: int) -> None:
        qc, steps = self.cfg.questioner, self.questioner_steps()
        trainer.stage_total(steps)
        for step in range(start_step, steps):
            world = trainer.world  # this rank's images; a rank keeps all n samples of each of its images
            items = step_items(self.source, seed=self.seed, step=(iteration - 1) * steps + step,
                               count=qc.prompts_per_step, rank=world.rank, world_size=world.world_size)
            requests = [self._questioner_request(  # seeded by the image's position in the run's stream
                it, n=qc.rollout_n, temperature=qc.temperature, repetition_penalty=qc.repetition_penalty,
                seed=step_seed(self.seed, QUESTIONER, iteration, it.position)) for it in items]
            extra: dict[str, Any] = {}

            def reward_fn(outputs, _step=step, _extra=extra):
                return self.questioner_rewards(outputs, seed=step_seed(self.seed, "reward", iteration, _step),
                                               stats=_extra)

            metrics = self.questioner.grpo_step(requests, reward_fn, timer=trainer.timer)
            trainer.step_done(self.questioner, {**metrics, **extra})

    def questioner_rewards(self, outputs: list[RolloutOutput], *, seed: int,
                           stats: dict[str, Any] | None = None) -> torch.Tensor:
        """[G, n] dual-track rewards of the Questioner's samples (this rank's groups); the frozen Solver answers
        every valid question reward_votes times in one generate call (on every rank, even with no question:
        the call is collective under FSDP). `stats` are global over the ranks."""
        vz = self.cfg.vzero
        G, n = len(outputs), len(outputs[0].samples) if outputs else 0
        parsed = [parse_question(s.text) for o in outputs for s in o.samples]  # [G * n]
        valid = [i for i, q in enumerate(parsed) if q is not None]
        reward = torch.full((G * n,), -1.0)
        # Seeded by (image position in the run, sample): the same draws however the step is split.
        params = [SamplingParams(n=vz.reward_votes, temperature=vz.reward_temperature, top_k=vz.reward_top_k,
                                 max_new_tokens=vz.reward_max_tokens,
                                 seed=step_seed(seed, outputs[i // n].request.meta.get("position", i // n), i % n))
                  for i in valid]
        requests = [self._solver_request(outputs[i // n].request.images[0], parsed[i], p, {})
                    for i, p in zip(valid, params, strict=True)]
        answers = self.solver.engine.generate(requests) if valid or dist.is_distributed() else []
        # Sums over this rank's questions: samples, valid, agree, overturned, none, sum c, letters, votes.
        sums = torch.zeros(8, dtype=torch.float64)
        sums[0], sums[1] = G * n, len(valid)
        if valid:
            ids = torch.tensor([choice_ids([s.text for s in o.samples], none_id=NONE_ID) for o in answers])  # [Q, m]
            a_fast = torch.tensor([LETTERS.index(parsed[i].answer) for i in valid])  # [Q]
            r, a_hat, c = dual_track_rewards(a_fast, ids)
            reward[valid] = r
            agree = a_hat == a_fast
            sums[2:] = torch.tensor([int(agree.sum()), int((~agree & (a_hat != NONE_ID)).sum()),
                                     int((a_hat == NONE_ID).sum()), float(c.double().sum()),
                                     int((ids != NONE_ID).sum()), ids.numel()], dtype=torch.float64)
        if stats is not None:
            samples, q, agree_n, over_n, none_n, c_sum, letters, votes = dist.all_reduce(sums).tolist()
            stats.update(valid_question_rate=q / max(samples, 1), solver_agree_rate=agree_n / max(q, 1),
                         solver_overturned_rate=over_n / max(q, 1), solver_none_rate=none_n / max(q, 1),
                         solver_majority_share=c_sum / max(q, 1), solver_letter_rate=letters / max(votes, 1))
        return reward.view(G, n)

    # -------------------------------------------------------------------------------- solver stage

    def questions_path(self, iteration: int) -> Path:
        return self.trainer.run_dir / f"questions-iter{iteration}.jsonl"

    def make_questions(self, trainer: Trainer, iteration: int) -> list[dict[str, Any]]:
        """One question per image from the (updated) Questioner, pseudo-labelled by the (not yet updated)
        Solver: the rows of questions-iter<k>.jsonl, in image order.

        The pool goes through in chunks of questioner.prompts_per_step * rollout_n images (as many
        sequences as one GRPO rollout): one Questioner call and one Solver call per chunk. The engine
        encodes a call's images up front, so one call over ~4K real images would hold tens of GB of pixel
        values; every seed is per image, so the chunking does not change what is drawn."""
        qc, world = self.cfg.questioner, trainer.world
        chunk = qc.prompts_per_step * qc.rollout_n
        rows: list[dict[str, Any]] = []
        for lo in range(0, len(self.source), chunk):  # as many chunks (generate calls) on every rank
            mine = shard_indices(list(range(lo, min(lo + chunk, len(self.source)))), world.rank, world.world_size)
            items = [it for i in mine if (it := self.source.load(i)) is not None]
            rows += self._question_rows(trainer, iteration, items)
        # Every rank's rows, in image order: the same question set on every rank, whatever the number of ranks.
        gathered = [r for part in dist.all_gather_object(rows) for r in part]
        return sorted(gathered, key=lambda r: r["image_index"])

    def _question_rows(self, trainer: Trainer, iteration: int, items: list[ImageItem]) -> list[dict[str, Any]]:
        vz, sc = self.cfg.vzero, self.cfg.solver
        with trainer.timer("questions"):
            outs = self.questioner.engine.generate([self._questioner_request(
                it, n=1, temperature=vz.question_temperature, repetition_penalty=vz.question_repetition_penalty,
                seed=step_seed(self.seed, "questions", iteration, it.index)) for it in items])
        texts = [o.samples[0].text for o in outs]
        parsed = [parse_question(t) for t in texts]
        valid = [i for i, q in enumerate(parsed) if q is not None]
        votes: dict[int, list[str | None]] = {}
        label = share = kept = None
        if valid or dist.is_distributed():  # under FSDP every rank calls generate, even with no question
            with trainer.timer("labels"):
                answers = self.solver.engine.generate([self._solver_request(
                    items[i].image, parsed[i],
                    SamplingParams(n=vz.label_votes, temperature=vz.label_temperature, top_p=vz.label_top_p,
                                   max_new_tokens=sc.max_response_tokens,
                                   seed=step_seed(self.seed, "labels", iteration, items[i].index)), {})
                    for i in valid])
        if valid:
            ids = torch.tensor([choice_ids([s.text for s in o.samples], none_id=-1) for o in answers])  # [Q, votes]
            label, share = pseudo_labels(ids)
            kept = in_band(share, vz.band_low, vz.band_high) & (label >= 0)
            votes = {i: [LETTERS[a] if a >= 0 else None for a in row] for i, row in zip(valid, ids.tolist(), strict=True)}
        rows = []
        where = {i: j for j, i in enumerate(valid)}
        for i, (it, q, text) in enumerate(zip(items, parsed, texts, strict=True)):
            j = where.get(i)
            rows.append({
                "image": it.key, "image_index": it.index, "valid": q is not None,
                "description": q.description if q else None, "question": q.question if q else None,
                "options": q.options if q else None, "intuitive_answer": q.answer if q else None,
                "votes": votes.get(i), "label": LETTERS[int(label[j])] if j is not None and label[j] >= 0 else None,
                "share": float(share[j]) if j is not None else None,
                "kept": bool(kept[j]) if j is not None else False, "raw": text})
        return rows

    def _write_rows(self, path: Path, rows: list[dict[str, Any]]) -> None:
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)

    def solver_steps(self, kept: int) -> int:
        if kept == 0:
            return 0
        return self.cfg.train.max_steps_per_role or max(1, kept // self.cfg.solver.prompts_per_step)

    def _solver_batch(self, kept: list[dict[str, Any]], iteration: int, step: int) -> list[dict[str, Any]]:
        """Kept questions of step `step`: positions [step*b, (step+1)*b) of seeded per-epoch permutations."""
        return epoch_picks(kept, step, min(self.cfg.solver.prompts_per_step, len(kept)), key=(self.seed, iteration, 7))

    def _solver_stage(self, trainer: Trainer, iteration: int, start_step: int) -> None:
        sc, path = self.cfg.solver, self.questions_path(iteration)
        if start_step == 0:
            rows = self.make_questions(trainer, iteration)
            if dist.is_main():
                self._write_rows(path, rows)
        elif path.exists():  # resumed mid-stage: the Solver has trained since, its votes can't be redrawn
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            raise FileNotFoundError(f"resuming the solver stage of iteration {iteration} at step {start_step} "
                                    f"needs {path}, written at the stage's start")
        kept = [r for r in rows if r["kept"]]
        valid = [r for r in rows if r["valid"]]
        stage_stats = {
            "questions": float(len(rows)), "questions_valid_rate": len(valid) / max(len(rows), 1),
            "questions_kept": float(len(kept)), "kept_rate": len(kept) / max(len(valid), 1),
            "label_share_mean": float(np.mean([r["share"] for r in valid])) if valid else 0.0,
        }
        log.info("iteration %d: %d questions, %d valid, %d kept in [%.2f, %.2f] -> %s", iteration, len(rows),
                 len(valid), len(kept), self.cfg.vzero.band_low, self.cfg.vzero.band_high, path)
        steps = self.solver_steps(len(kept))
        trainer.stage_total(steps)
        if steps == 0:
            log.warning("iteration %d: no question in the difficulty band; the Solver does not train", iteration)
        world = trainer.world
        for step in range(start_step, steps):
            batch = self._solver_batch(kept, iteration, step)  # the whole step's questions; this rank's below
            mine = shard_indices(list(range(len(batch))), world.rank, world.world_size)
            requests = [self._solver_request(
                self.source.load(r["image_index"]).image,
                Question(description=r["description"], question=r["question"], options=r["options"],
                         answer=r["intuitive_answer"]),
                SamplingParams(n=sc.rollout_n, temperature=sc.temperature, top_p=sc.top_p, top_k=sc.top_k,
                               max_new_tokens=sc.max_response_tokens, repetition_penalty=sc.repetition_penalty,
                               seed=step_seed(self.seed, SOLVER, iteration, step, k)),
                {"label": r["label"], "key": r["image"]}) for k, r in ((k, batch[k]) for k in mine)]
            extra: dict[str, Any] = {}
            metrics = self.solver.grpo_step(requests, lambda outs, _e=extra: self.solver_rewards(outs, _e),
                                            timer=trainer.timer)
            trainer.step_done(self.solver, {**metrics, **stage_stats, **extra})

    @staticmethod
    def solver_rewards(outputs: list[RolloutOutput], stats: dict[str, Any] | None = None) -> torch.Tensor:
        """[G, n] (this rank's groups): 1.0 when the boxed letter equals the question's pseudo-label, else 0.0.
        `stats` are global over the ranks."""
        n = len(outputs[0].samples) if outputs else 0
        ids = torch.tensor([choice_ids([s.text for s in o.samples], none_id=-1) for o in outputs],
                           dtype=torch.long).view(len(outputs), n)  # [G, n]
        label = torch.tensor([LETTERS.index(o.request.meta["label"]) for o in outputs], dtype=torch.long)  # [G]
        if stats is not None:
            letters, votes = dist.all_reduce(torch.tensor([int((ids >= 0).sum()), ids.numel()],
                                                          dtype=torch.float64)).tolist()
            stats["solver_letter_rate"] = letters / max(votes, 1)
        return (ids == label[:, None]).to(torch.float32)


# ------------------------------------------------------------------------------------- format warm-up

# kind -> (description, questions). Short and low in entropy on purpose: the warm-up teaches the tags,
# the four option labels and the answer slot, and a 1.7M-parameter model learns them faster when the
# text between them is predictable (measured: options of 1-2 words/digits, one description per kind).
_KIND_TEXT = {
    "bar_chart": ("A bar chart.", ("Which bar is the tallest?", "How many bars are there?")),
    "line_chart": ("A line chart.", ("Which year is the highest?", "How many points are there?")),
    "pie_chart": ("A pie chart.", ("Which slice is the largest?", "How many slices are there?")),
    "table": ("A table.", ("Who has the highest value?", "How many rows are there?")),
    "geometry": ("A triangle.", ("Which side is the longest?", "What is the perimeter?")),
    "shapes": ("Some shapes.", ("How many circles are there?", "How many shapes are red?")),
    "clock": ("A clock.", ("What hour does the clock show?", "Where does the hour hand point?")),
    "figure": ("A figure.", ("How many objects are there?", "Which object is the largest?")),
}
_WORDS = ("red", "blue", "green", "Mon", "Tue", "Wed", "Ann", "Bob")
_REASONS = ("Compare the options.", "Count them: {a} and {b}.", "The value is {a}.")


def _kind(key: str) -> str:
    parts = key.split(":")
    return parts[1] if len(parts) == 3 and parts[0] == "synthetic" and parts[1] in _KIND_TEXT else "figure"


def template_question(kind: str, rng: np.random.Generator) -> Question:
    """A random, well-formed question of the figure kind with a random answer letter (format only)."""
    description, questions = _KIND_TEXT[kind]
    if rng.random() < 0.5:
        opts = [str(v) for v in rng.choice(np.arange(1, 10), size=4, replace=False).tolist()]
    else:
        opts = [str(_WORDS[j]) for j in rng.choice(len(_WORDS), size=4, replace=False).tolist()]
    return Question(description=description, question=str(questions[int(rng.integers(len(questions)))]),
                    options=dict(zip(LETTERS, opts, strict=True)), answer=LETTERS[int(rng.integers(4))])


def questioner_target(q: Question) -> str:
    opts = " ".join(f"{k}) {q.options[k]}" for k in LETTERS)
    return (f"<description>{q.description}</description> <question>{q.question} {opts}</question> "
            f"<answer>{q.answer}</answer>")


def solver_target(rng: np.random.Generator) -> str:
    a, b = (int(v) for v in rng.integers(1, 10, size=2))
    reason = str(_REASONS[int(rng.integers(len(_REASONS)))]).format(a=a, b=b)
    return f"<think>{reason}</think> \\boxed{{{LETTERS[int(rng.integers(4))]}}}"


def format_warmup(policy: Policy, source: ImageSource, cfg: Config, *, seed: int) -> dict[str, Any]:
    """Supervised format pass on templated outputs of both roles (random answer letters, vzero_fast/warmup.py);
    trains `policy` in place and returns {losses, parse rates, seconds}. Deterministic for a seed."""
    vz: VZeroConfig = cfg.vzero
    start = time.perf_counter()

    def examples(rng: np.random.Generator) -> list[tuple[Any, str, str]]:
        out = []
        for k in range(vz.format_warmup_batch):
            item = source.load(int(rng.integers(len(source))))
            if item is None:
                continue
            q = template_question(_kind(item.key), rng)
            if k % 4 != 3:  # 3 of 4 examples: the Questioner's format is longer and harder to learn
                out.append((item.image, questioner_text(), questioner_target(q)))
            else:
                out.append((item.image, solver_text(q), solver_target(rng)))
        return out

    losses = supervised_pass(policy, examples, steps=vz.format_warmup_steps, lr=vz.format_warmup_lr,
                             budget=max(cfg.questioner.micro_batch_tokens, cfg.solver.micro_batch_tokens), seed=seed)
    report = {"steps": vz.format_warmup_steps, "loss_first": losses[0] if losses else None,
              "loss_last": losses[-1] if losses else None, "train_seconds": time.perf_counter() - start}
    report.update(parse_rates(policy, source, cfg, seed=seed))
    return report


def parse_rates(policy: Policy, source: ImageSource, cfg: Config, *, seed: int, images: int = 8,
                n: int = 4) -> dict[str, float]:
    """Share of sampled outputs that meet each role's format, with the run's sampling settings. The probe
    samples on the native engine whatever rollout.backend says: 8 x 4 short samples do not repay building a
    vLLM engine (seconds, and device memory) for the warm-up alone; both sample the same distribution."""
    engine = make_engine(policy, "native", seed=seed)
    items = [it for i in range(min(images, len(source))) if (it := source.load(i)) is not None]
    qc, vz = cfg.questioner, cfg.vzero
    rng = np.random.default_rng([seed, 13])
    q_out = engine.generate([Request.from_image_text(it.image, questioner_text(), SamplingParams(
        n=n, temperature=qc.temperature, top_p=qc.top_p, top_k=qc.top_k, max_new_tokens=qc.max_response_tokens,
        seed=step_seed(seed, "probe-q", k))) for k, it in enumerate(items)])
    s_out = engine.generate([Request.from_image_text(it.image, solver_text(template_question(_kind(it.key), rng)),
                                                     SamplingParams(n=n, temperature=vz.reward_temperature,
                                                                    top_k=vz.reward_top_k,
                                                                    max_new_tokens=vz.reward_max_tokens,
                                                                    seed=step_seed(seed, "probe-s", k)))
                             for k, it in enumerate(items)])
    q_ok = [parse_question(s.text) is not None for o in q_out for s in o.samples]
    s_ok = [extract_choice(s.text) is not None for o in s_out for s in o.samples]
    return {"questioner_parse_rate": sum(q_ok) / max(len(q_ok), 1),
            "solver_parse_rate": sum(s_ok) / max(len(s_ok), 1), "probe_samples": len(q_ok)}


def warmup_made_with(cfg: Config) -> dict[str, Any]:
    """What decides a format warm-up's weights: the base model, the images, the seed and the warm-up's own
    settings. A warm-up found on disk is reused only when this matches."""
    model = cfg.model.path or f"tiny (seed {cfg.model.tiny_seed})"
    return {"model": model, "dtype": cfg.model.dtype, "seed": cfg.train.seed, "data": to_dict(cfg.data),
            **{k: v for k, v in to_dict(cfg.vzero).items() if k.startswith("format_warmup")},
            "micro_batch_tokens": max(cfg.questioner.micro_batch_tokens, cfg.solver.micro_batch_tokens)}


def ensure_format_warmup(trainer: Trainer, source: ImageSource) -> Path:
    """The run's warmed-up base model directory (`<run>/format-warmup`), built once (vzero_fast/warmup.py)."""
    cfg = trainer.cfg
    return ensure_warmup(trainer, made_with=warmup_made_with(cfg),
                         warm=lambda policy: format_warmup(policy, source, cfg, seed=cfg.train.seed))
