"""Toy recipe: one role learns a verifiable reward, to check that the GRPO engine learns at all.

Reward 1 when the response starts with one of the target tokens, else 0. The targets are the untrained
policy's most likely first tokens (after the chat prompt) whose probabilities add up to `toy.target_mass`
(0.1 by default), so the reward starts near 0.1 on any checkpoint, random or real, and a working trainer
drives it towards 1 within tens of steps. The targets are written to `toy_targets.json` in the run
directory (and read back on --resume, since the weights have moved by then).

Under torchrun each rank generates and trains on its share of every step's prompts (prompts_per_step must
divide by the number of ranks); the targets come from all of step 0's prompts on every rank.

Run: `vzero-fast train --recipe toy --preset tiny --out runs/toy`
  or `torchrun --standalone --nproc_per_node=2 -m vzero_fast train --recipe toy --preset tiny --out runs/toy`.
"""

from __future__ import annotations

import json
import logging

import torch

from vzero_fast import distributed as dist
from vzero_fast.data import open_images, step_items
from vzero_fast.model import encode_prompts, forward_hidden, image_factor
from vzero_fast.rollout import Request, RolloutOutput, SamplingParams
from vzero_fast.trainer import Trainer, step_seed

log = logging.getLogger("vzero_fast.recipes.toy")

ROLE = "policy"


class ToyRecipe:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        self.cfg = cfg
        self.source = open_images(cfg.data, seed=cfg.train.seed, factor=image_factor(trainer.model_path))
        log.info("images: %s", self.source.describe())
        dist.check_divisible(cfg.policy.prompts_per_step, "policy.prompts_per_step")
        self.role = trainer.add_role(ROLE, cfg.policy)
        self.targets_path = trainer.run_dir / "toy_targets.json"
        self.targets: torch.Tensor | None = None

    def steps_per_stage(self) -> int:
        """max_steps_per_role, else one epoch over the images."""
        return self.cfg.train.max_steps_per_role or max(1, len(self.source) // self.cfg.policy.prompts_per_step)

    def stages(self, iteration: int) -> list[str]:  # noqa: ARG002
        return [ROLE]

    def requests(self, iteration: int, step: int, *, all_ranks: bool = False) -> list[Request]:
        """This rank's prompts of the step (all of them with `all_ranks`); prompt k of the step is seeded by k."""
        rc = self.cfg.policy
        index = (iteration - 1) * self.steps_per_stage() + step
        first = index * rc.prompts_per_step  # position of the step's prompt 0
        world = self.trainer.world
        items = step_items(self.source, seed=self.cfg.train.seed, step=index,
                           count=rc.prompts_per_step, rank=0 if all_ranks else world.rank,
                           world_size=1 if all_ranks else world.world_size)
        return [Request.from_image_text(
            it.image, self.cfg.toy.prompt, request_id=it.key,
            params=SamplingParams(n=rc.rollout_n, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                                  max_new_tokens=rc.max_response_tokens, repetition_penalty=rc.repetition_penalty,
                                  seed=step_seed(self.cfg.train.seed, ROLE, iteration, step, it.position - first)))
            for it in items]

    def choose_targets(self, requests: list[Request]) -> torch.Tensor:
        """The most likely first tokens (mean over the prompts) covering `target_mass` of probability."""
        if dist.broadcast_object(self.targets_path.exists()):  # rank 0's view: all ranks take one branch
            return torch.tensor(json.loads(self.targets_path.read_text())["token_ids"])
        policy = self.role.policy
        batch = encode_prompts(policy, [r.images[0] for r in requests], [self.cfg.toy.prompt] * len(requests))
        with torch.no_grad():
            hidden = forward_hidden(policy, **batch)[:, -1]  # [B, H]; left padding: last = next token
            probs = torch.softmax(hidden.float() @ policy.lm_head_weight.float().T, dim=-1).mean(0)  # [V]
        dist.reshard(policy.model)
        probs[list(policy.vision_token_ids)] = 0  # never sampled
        order = torch.argsort(probs, descending=True)
        k = int(torch.searchsorted(torch.cumsum(probs[order], 0), self.cfg.toy.target_mass).item()) + 1
        targets = order[:k].sort().values
        if dist.is_main():
            self.targets_path.write_text(json.dumps({"token_ids": targets.tolist(),
                                                     "mass": float(probs[targets].sum())}))
        log.info("toy targets: %d tokens with %.3f of the first-token probability", k, float(probs[targets].sum()))
        return targets

    def reward(self, outputs: list[RolloutOutput]) -> torch.Tensor:
        first = torch.tensor([[s.token_ids[0].item() if len(s.token_ids) else -1 for s in o.samples]
                              for o in outputs])  # [G, n]
        return torch.isin(first, self.targets).to(torch.float32)

    def run_stage(self, trainer: Trainer, iteration: int, role_name: str, *, start_step: int) -> None:  # noqa: ARG002
        trainer.stage_total(self.steps_per_stage())
        for step in range(start_step, self.steps_per_stage()):
            requests = self.requests(iteration, step)
            if self.targets is None:  # from the whole step (every rank computes the same targets)
                self.targets = self.choose_targets(self.requests(iteration, step, all_ranks=True))
            metrics = self.role.grpo_step(requests, self.reward, timer=trainer.timer)
            trainer.step_done(self.role, metrics)
