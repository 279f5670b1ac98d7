"""What the single-role recipes on question items (`grpo`, `selfjudge`) share: the items of a step, their
requests, the stage loop and the format warm-up's plumbing. Each recipe supplies its prompt, its reward and
its warm-up examples.

Decisions:
- A step's items are `data.step_items` of the question source (vzero_fast/qa.py): a pure function of (seed,
  step), this rank's share under torchrun; the prompt k of the step is seeded by the item's position in the
  run's stream, so a resumed run (or another number of ranks) draws exactly the same samples.
- Steps per stage: train.max_steps_per_role when > 0, else one epoch (items // prompts_per_step, at least 1).
- A request carries its item's index, position and question in `meta` (never its answer: a reward that needs
  the label reads it from the source, so a label cannot leak into a recipe that must not see it).
- The format warm-up (recipe's format_warmup_steps > 0) runs through vzero_fast/warmup.py before the role is
  loaded, so the role and its iteration-1 KL reference (and Self-Judge's Judge) start from the warmed model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vzero_fast import distributed as dist
from vzero_fast.config import RoleConfig, to_dict
from vzero_fast.data import step_items
from vzero_fast.model import image_factor
from vzero_fast.qa import QASource, open_qa
from vzero_fast.rollout import Request, RolloutOutput, SamplingParams, make_engine
from vzero_fast.trainer import Trainer, step_seed
from vzero_fast.warmup import Example, ensure_warmup, supervised_pass

log = logging.getLogger("vzero_fast.recipes")


class SingleRoleRecipe:
    """One trained role (`ROLE`, config section `ROLE`) on the question items of `TASK` (the synthetic default)."""

    ROLE: str
    TASK: str
    SECTION: str  # the recipe's own config section (format warm-up settings)

    def __init__(self, trainer: Trainer, *, require_answer: bool):
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.seed = self.cfg.train.seed
        self.rc: RoleConfig = getattr(self.cfg, self.ROLE)
        self.rules = getattr(self.cfg, self.SECTION)
        self.source: QASource = open_qa(self.cfg.data, seed=self.seed, task=self.TASK, require_answer=require_answer,
                                        factor=image_factor(trainer.model_path))
        log.info("questions: %s", self.source.describe())
        dist.check_divisible(self.rc.prompts_per_step, f"{self.ROLE}.prompts_per_step")
        if self.rules.format_warmup_steps > 0:
            trainer.model_path = ensure_warmup(trainer, made_with=self.warmup_made_with(), warm=self.warm)
        self.role = trainer.add_role(self.ROLE, self.rc)

    # ------------------------------------------------------------------------------- recipe interface

    def prompt(self, question: str) -> str:
        raise NotImplementedError

    def warmup_examples(self, rng: np.random.Generator) -> list[Example]:
        raise NotImplementedError

    def warmup_probe(self, policy) -> dict[str, float]:
        raise NotImplementedError

    def steps_per_stage(self) -> int:
        return self.cfg.train.max_steps_per_role or max(1, len(self.source) // self.rc.prompts_per_step)

    def stages(self, iteration: int) -> list[str]:  # noqa: ARG002
        return [self.ROLE]

    # ----------------------------------------------------------------------------------------- steps

    def requests(self, iteration: int, step: int) -> list[Request]:
        """This rank's prompts of the step, each with n = rollout_n, seeded by its position in the run."""
        rc, world, steps = self.rc, self.trainer.world, self.steps_per_stage()
        items = step_items(self.source, seed=self.seed, step=(iteration - 1) * steps + step,
                           count=rc.prompts_per_step, rank=world.rank, world_size=world.world_size)
        return [Request.from_image_text(
            it.image, self.prompt(self.source.questions[it.index]), request_id=it.key,
            meta={"index": it.index, "position": it.position, "question": self.source.questions[it.index]},
            params=SamplingParams(n=rc.rollout_n, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                                  max_new_tokens=rc.max_response_tokens, repetition_penalty=rc.repetition_penalty,
                                  seed=step_seed(self.seed, self.ROLE, iteration, it.position)))
            for it in items]

    def run_stage(self, trainer: Trainer, iteration: int, role_name: str, *, start_step: int) -> None:  # noqa: ARG002
        steps = self.steps_per_stage()
        trainer.stage_total(steps)
        self.stage_start(trainer, iteration)
        for step in range(start_step, steps):
            extra: dict[str, Any] = {}
            reward_fn = self.reward_fn(iteration, extra)
            metrics = self.role.grpo_step(self.requests(iteration, step), reward_fn, timer=trainer.timer)
            trainer.step_done(self.role, {**metrics, **extra})

    def stage_start(self, trainer: Trainer, iteration: int) -> None:
        """Hook before a stage's first step (Self-Judge sets up its Judge here)."""

    def reward_fn(self, iteration: int, stats: dict[str, Any]) -> Callable[[list[RolloutOutput]], Any]:
        raise NotImplementedError

    # --------------------------------------------------------------------------------- format warm-up

    def warmup_made_with(self) -> dict[str, Any]:
        """What decides the warm-up's weights; a warm-up found on disk is reused only when this matches."""
        cfg = self.cfg
        return {"model": cfg.model.path or f"tiny (seed {cfg.model.tiny_seed})", "dtype": cfg.model.dtype,
                "seed": self.seed, "data": to_dict(cfg.data), "recipe": cfg.train.recipe,
                **{k: v for k, v in to_dict(self.rules).items() if k.startswith("format_warmup")},
                "micro_batch_tokens": self.rc.micro_batch_tokens}

    def warm(self, policy) -> dict[str, Any]:
        start = time.perf_counter()
        losses = supervised_pass(policy, self.warmup_examples, steps=self.rules.format_warmup_steps,
                                 lr=self.rules.format_warmup_lr, budget=self.rc.micro_batch_tokens, seed=self.seed)
        report = {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
                  "train_seconds": time.perf_counter() - start}
        report.update(self.warmup_probe(policy))
        return report

    def probe_rate(self, policy, texts: list[tuple[Any, str]], ok: Callable[[str], bool], *, max_new_tokens: int,
                   purpose: str, n: int = 4) -> float:
        """Share of n samples per (image, prompt) that pass `ok`, with the role's sampling settings, on the
        native engine (a handful of short samples does not repay building a vLLM engine)."""
        engine = make_engine(policy, "native", seed=self.seed)
        rc = self.rc
        outs = engine.generate([Request.from_image_text(image, text, SamplingParams(
            n=n, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k, max_new_tokens=max_new_tokens,
            seed=step_seed(self.seed, purpose, k))) for k, (image, text) in enumerate(texts)])
        flags = [ok(s.text) for o in outs for s in o.samples]
        return sum(flags) / max(len(flags), 1)

    def probe_items(self, count: int = 8) -> list[tuple[Any, str]]:
        """(image, question) of the source's first `count` loadable items."""
        return [(it.image, self.source.questions[it.index]) for i in range(min(count, len(self.source)))
                if (it := self.source.load(i)) is not None]
