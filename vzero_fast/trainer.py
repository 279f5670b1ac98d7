"""The trainer: roles in one process, iterations of stages, metrics, checkpoints, exact resume.

A recipe (vzero_fast/recipes/) names its roles and, per iteration, the order in which they train; for
each stage it runs GRPO steps through `Trainer.step_done`, which writes the step's metrics, saves every
`save_every` steps and stops cleanly on SIGTERM/SIGINT. The trainer owns everything a resume needs:

    state = {iteration, stage, stage_step, global_step, metrics_lines}

Decisions:
- Every random draw of a step is seeded from (seed, role, iteration, step) (`step_seed`), and the data
  a step sees is a pure function of the same counters, so restoring the counters restores the run:
  a resumed run writes exactly the metrics an uninterrupted one would.
- The KL reference of a role's stage is the role at the start of that stage (as in V-Zero's reference
  code, which restarts each stage from the previous checkpoint with ref = actor). It is loaded from
  that stage's starting directory (the base model, or `checkpoints/<role>/iter-<k-1>`), so a resumed
  stage gets the same reference; roles starting from the same directory share one frozen copy.
- A role's weights are written at the end of each of its stages as `iter-<k>` (kept always).
- Under torchrun (vzero_fast/distributed.py) every rank runs this same loop on its share of each step's
  prompts (`self.world.rank` / `world_size` for `data.step_items`); models are FSDP2-sharded as they load;
  rank 0 alone writes files (config, metrics, checkpoints); the stop flag is all-reduced at every step so
  that all ranks stop after the same step.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vzero_fast import distributed as dist
from vzero_fast.checkpoint import CheckpointManager, StopFlag, load_weights_into
from vzero_fast.config import Config, RoleConfig, save_config
from vzero_fast.grpo import Role
from vzero_fast.metrics import MetricsWriter, StageTimer, progress, truncate_metrics
from vzero_fast.model import Policy, load_policy
from vzero_fast.rollout import NativeEngine

log = logging.getLogger("vzero_fast.trainer")


class Stopped(Exception):
    """Raised after a signal-triggered checkpoint: the run ends cleanly and `--resume` continues it."""


def step_seed(*keys: int | str) -> int:
    """A 63-bit seed from counters and names, stable across runs and Python processes."""
    ints = [k if isinstance(k, int) else int.from_bytes(k.encode(), "little") % (2**32) for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**32], dtype=np.uint64)) % (2**63))


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False):
        self.cfg = cfg
        self.world = dist.init(cfg.dist, cfg.train.device)
        self.run_dir = Path(cfg.train.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = self.world.device
        torch.manual_seed(cfg.train.seed)
        if cfg.train.cpu_threads:  # see TrainConfig.cpu_threads (tiny models on shared CPUs)
            torch.set_num_threads(cfg.train.cpu_threads)
        self.model_path = self._model_path()
        if self.world.is_main:
            save_config(cfg, self.run_dir / "config.toml")
        self.timer = StageTimer(self.device)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.train.keep_last)
        self.resume = resume
        if not resume and self.world.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", 0)
        self.roles: dict[str, Role] = {}
        self.state: dict[str, Any] = {"iteration": 1, "stage": 0, "stage_step": 0, "global_step": 0,
                                      "metrics_lines": 0}
        self._refs: dict[str, torch.nn.Module] = {}
        self.stop = StopFlag()
        self.writer: MetricsWriter | None = None
        self._bar = None

    def _model_path(self) -> Path:
        if self.cfg.model.path:
            return Path(self.cfg.model.path)
        from vzero_fast.tiny import build_tiny

        path = self.run_dir / "tiny-model"
        if self.world.is_main and not (path / "config.json").exists():
            log.info("no --model given: building the offline tiny Qwen2.5-VL in %s", path)
            build_tiny(path, seed=self.cfg.model.tiny_seed)
        dist.barrier()  # the other ranks load it
        return path

    # ------------------------------------------------------------------------------------------ roles

    def load_policy(self, weights_from: str | Path | None = None, *, trainable: bool = True,
                    shard: bool = True) -> Policy:
        """The base model (with the weights of `weights_from` when given), FSDP2-sharded under torchrun
        (unless `shard` is False: a plain copy on this rank alone, e.g. for rank 0's one-off work)."""
        m = self.cfg.model
        compute = dist.mixed_precision_dtype(self.world)
        # Mixed precision keeps fp32 master weights (AdamW updates them) and computes in `compute`.
        dtype = "float32" if compute is not None and m.dtype == "auto" else m.dtype
        policy = load_policy(self.model_path, dtype=dtype, attn_implementation=m.attn_implementation,
                             device=str(self.device))
        if weights_from is not None and str(weights_from) != str(self.model_path):
            load_weights_into(policy.model, weights_from)
        for p in policy.model.parameters():
            p.requires_grad_(trainable)
        if m.gradient_checkpointing and trainable:
            policy.model.gradient_checkpointing_enable()
        if self.world.fsdp and shard:
            dist.shard_model(policy.model, self.world)
            if compute is not None:
                policy.dtype = compute  # what inputs (pixel values) are cast to
        return policy

    def add_role(self, name: str, role_cfg: RoleConfig) -> Role:
        policy = self.load_policy()
        role = Role(name=name, policy=policy, cfg=role_cfg, engine=NativeEngine(policy))
        self.roles[name] = role
        return role

    def stage_start_dir(self, role: str, iteration: int) -> Path:
        return self.model_path if iteration == 1 else self.ckpt.root / role / f"iter-{iteration - 1}"

    def set_reference(self, role: Role, iteration: int) -> None:
        """Freeze the role's stage-start weights as its KL reference (shared between roles per dir)."""
        if role.cfg.kl_coef == 0:
            role.reference = None
            return
        src = str(self.stage_start_dir(role.name, iteration))
        needed = {src} | {str(self.stage_start_dir(r, iteration)) for r in self.roles if r != role.name}
        self._refs = {k: v for k, v in self._refs.items() if k in needed}  # free stale references
        if src not in self._refs:
            self._refs[src] = self.load_policy(src, trainable=False).model.eval()
        role.reference = self._refs[src]

    # ------------------------------------------------------------------------------------------- loop

    def run(self, recipe) -> dict[str, Any]:
        """Run every iteration and stage of `recipe`, resuming from the last checkpoint when asked."""
        if self.resume:
            self.state = self.ckpt.restore(self.roles)
            if self.world.is_main:
                truncate_metrics(self.run_dir / "metrics.jsonl", self.state["metrics_lines"])
        self.writer = MetricsWriter(self.run_dir / "metrics.jsonl" if self.world.is_main else None)
        start = time.perf_counter()
        try:
            with self.stop:
                for it in range(self.state["iteration"], self.cfg.train.iterations + 1):
                    stages = recipe.stages(it)
                    for si in range(self.state["stage"] if it == self.state["iteration"] else 0, len(stages)):
                        name = stages[si]
                        self.state.update(iteration=it, stage=si)
                        role = self.roles[name]
                        self.set_reference(role, it)
                        for other in self.roles.values():
                            (other.onload_optimizer if other is role else other.offload_optimizer)()
                        # One bar per stage on a terminal (rank 0): steps, rate, the last step's reward/time.
                        self._bar = progress(desc=f"iter {it} {name}", disable=None if self.world.is_main else True)
                        try:
                            recipe.run_stage(self, it, name, start_step=self.state["stage_step"])
                        finally:
                            self._bar.close()
                        self.ckpt.save_role(role, tag=f"iter-{it}")
                        self.state.update(stage=si + 1, stage_step=0)
                    self.state.update(iteration=it + 1, stage=0)
                self.save()
        except Stopped:
            log.warning("stopped; continue with --resume (checkpoint in %s)", self.ckpt.root)
        finally:
            self.writer.close()
        self.state["wall_s"] = time.perf_counter() - start
        return self.state

    def step_done(self, role: Role, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write one step's metrics; save every `save_every` steps; stop cleanly after a signal."""
        self.state["stage_step"] += 1
        self.state["global_step"] += 1
        row = {"role": role.name, "iteration": self.state["iteration"], "step": self.state["stage_step"],
               "global_step": self.state["global_step"], "role_step": role.step, **metrics, **self.timer.pop()}
        row = self.writer.write(row)
        self.state["metrics_lines"] += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(reward=f"{row.get('reward_mean') or 0:.3f}", loss=f"{row.get('loss') or 0:.4f}",
                                  step_s=f"{row.get('time_total') or 0:.1f}")
        dist.die_for_test(self.state["global_step"])
        # A signal may reach the ranks during different steps: stop when any rank has seen one.
        if dist.is_distributed():
            self.stop.requested = bool(dist.all_reduce(torch.tensor(float(self.stop.requested)), "max") > 0)
        every = self.cfg.train.save_every
        if (every and self.state["global_step"] % every == 0) or self.stop.requested:
            self.save()
        if self.stop.requested:
            raise Stopped()
        return row

    def save(self) -> Path:
        with self.timer("checkpoint"):
            return self.ckpt.save(self.roles, dict(self.state))
