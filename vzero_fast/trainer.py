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
- LoRA (model.lora.rank > 0, vzero_fast/lora.py): the base is loaded once, frozen (`base_policy`), and every
  `load_policy` of a role, a KL reference or a frozen role returns a view of it (`lora_policy`): a fresh
  adapter, an adapter read from a checkpoint directory, or the base itself. Recipes change nothing: `add_role`
  and `load_policy` keep their signatures. A role's iteration-1 reference is the base (a fresh adapter equals
  it); a later one is the base plus the adapter of `checkpoints/<role>/iter-<k-1>`.
- Under torchrun (vzero_fast/distributed.py) every rank runs this same loop on its share of each step's
  prompts (`self.world.rank` / `world_size` for `data.step_items`); models are FSDP2-sharded as they load;
  rank 0 alone writes files (config, metrics, checkpoints); the stop flag is all-reduced at every step so
  that all ranks stop after the same step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vzero_fast import distributed as dist
from vzero_fast import lora
from vzero_fast.checkpoint import CheckpointManager, StopFlag, kill_point, load_weights_into
from vzero_fast.config import Config, RoleConfig, dumps, save_config, to_dict
from vzero_fast.evaluate import eval_during_training
from vzero_fast.grpo import Role
from vzero_fast.metrics import MetricsWriter, StageTimer, progress, read_metrics, truncate_metrics
from vzero_fast.model import Policy, load_policy
from vzero_fast.profiling import StepProfiler
from vzero_fast.rollout import make_engine
from vzero_fast.tracking import Tracking

log = logging.getLogger("vzero_fast.trainer")


class Stopped(Exception):
    """Raised after a signal-triggered checkpoint: the run ends cleanly and `--resume` continues it."""


def step_seed(*keys: int | str) -> int:
    """A 63-bit seed from counters and names, stable across runs and Python processes."""
    ints = [k if isinstance(k, int) else int.from_bytes(k.encode(), "little") % (2**32) for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**32], dtype=np.uint64)) % (2**63))


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False,
                 started: float | None = None):
        self.started = time.perf_counter() if started is None else started  # wall-clock includes set-up
        self.cfg = cfg
        self.world = dist.init(cfg.dist, cfg.train.device)
        self.run_dir = Path(cfg.train.out)
        self._claim_run_dir(resume=resume, overwrite=overwrite)
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
        self._base: Policy | None = None  # the shared frozen base of a LoRA run (base_policy)
        self.stop = StopFlag()
        self.writer: MetricsWriter | None = None
        self.tracking: Tracking | None = None
        self.profiler = StepProfiler(cfg.profile, self.run_dir / "profile", self.device, enabled=self.world.is_main)
        self._bar = None
        self._stage_name, self._stage_total = "", None
        self.summary: dict[str, Any] = {}

    def _claim_run_dir(self, *, resume: bool, overwrite: bool) -> None:
        """A new run needs an empty (or new) run directory: one that holds anything is continued (--resume)
        or replaced (--overwrite), never silently mixed with a new run. Rank 0 decides and deletes."""
        busy = dist.broadcast_object(self.run_dir.is_dir() and any(self.run_dir.iterdir()))
        if busy and not resume:
            if not overwrite:
                raise FileExistsError(f"--out {self.run_dir} is not empty: continue that run with --resume, or "
                                      f"replace it with --overwrite")
            inputs = [Path(p).resolve() for p in (self.cfg.model.path, self.cfg.data.images) if p]
            inside = [str(p) for p in inputs if p.is_relative_to(self.run_dir.resolve())]
            if inside:
                raise FileExistsError(f"--overwrite would delete {inside[0]}, an input of this run inside --out "
                                      f"{self.run_dir}: copy it elsewhere first")
            if self.world.is_main:
                log.warning("--overwrite: deleting the previous run in %s", self.run_dir)
                shutil.rmtree(self.run_dir)
            dist.barrier()
        self.run_dir.mkdir(parents=True, exist_ok=True)

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
                    shard: bool = True, name: str = "") -> Policy:
        """The base model (with the weights of `weights_from` when given), FSDP2-sharded under torchrun
        (unless `shard` is False: a plain copy on this rank alone, e.g. for rank 0's one-off work).

        With model.lora.rank > 0 (and `shard`) it is a view of the one shared frozen base instead (`lora_policy`):
        a fresh trainable adapter, the adapter of `weights_from` (an adapter directory), or the base itself
        for a frozen policy with no adapter. `shard=False` still gives a private full copy (the format warm-up
        trains one and saves it as the run's base)."""
        m = self.cfg.model
        if m.lora.rank > 0 and shard:
            return self.lora_policy(weights_from, trainable=trainable, name=name)
        compute = dist.mixed_precision_dtype(self.world)
        # FSDP2's mixed precision keeps fp32 sharded weights (AdamW updates them) and computes in `compute`;
        # a plain process keeps fp32 masters beside low-precision weights instead (vzero_fast/optim.py).
        dtype = m.dtype
        if compute is not None and trainable and (m.dtype == "auto" or (m.master_weights and m.dtype != "float32")):
            dtype = "float32"
        policy = load_policy(self.model_path, dtype=dtype, attn_implementation=m.attn_implementation,
                             device=str(self.device), name=name)
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

    def base_policy(self) -> Policy:
        """The one frozen base of a LoRA run, in model.dtype (bf16 on CUDA: never updated, so no fp32 copy), loaded
        on first use and again only when the run's base changes (the format warm-up replaces it before any role
        exists). Every role, reference and frozen role is a view of it (vzero_fast/lora.py)."""
        if self._base is None or Path(self._base.path) != Path(self.model_path):
            m = self.cfg.model
            self._base = load_policy(self.model_path, dtype=m.dtype, attn_implementation=m.attn_implementation,
                                     device=str(self.device), name="the shared frozen base")
            for p in self._base.model.parameters():
                p.requires_grad_(False)
            self._base.model.eval()
        return self._base

    def lora_policy(self, weights_from: str | Path | None = None, *, trainable: bool = True,
                    name: str = "") -> Policy:
        """A view of the shared base (`base_policy`): with a fresh adapter (B = 0: equal to the base) when
        `trainable` and no `weights_from`, with the adapter of the directory `weights_from`, or the base itself
        (frozen, no adapter: no view is needed). A trainable view is FSDP2-sharded under torchrun: its adapters
        only; the frozen base is replicated on every rank (vzero_fast/distributed.py)."""
        base = self.base_policy()
        src = None if weights_from is None or str(weights_from) == str(self.model_path) else Path(weights_from)
        if src is None and not trainable:
            return base
        lc = self.cfg.model.lora
        if src is None:
            view = lora.attach(base.model, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout,
                               target_modules=lc.target_modules, vision=lc.vision, trainable=True)
        else:
            view = lora.attach_from(base.model, src, trainable=trainable)
        s = lora.spec(view)
        log.info("%s: LoRA rank %d alpha %g on %d layers%s over the shared base (%.2fM adapter parameters)",
                 name or "view", s.rank, s.alpha, len(s.targets), f" from {src}" if src else "",
                 sum(t.numel() for t in lora.adapter_state(view).values()) / 1e6)
        if self.cfg.model.gradient_checkpointing and trainable:
            view.gradient_checkpointing_enable()
        if self.world.fsdp and trainable:
            dist.shard_model(view, self.world, ignored_params=set(base.model.parameters()))
        if not trainable:
            view.eval()
        return dataclasses.replace(base, model=view)

    def add_role(self, name: str, role_cfg: RoleConfig) -> Role:
        policy = self.load_policy(name=name)
        shared = next(iter(self.roles.values())).engine if self.roles and self.cfg.rollout.share_engine else None
        engine = make_engine(policy, self.cfg.rollout.backend, options=self.cfg.rollout,  # the one place engines come from
                             seed=self.cfg.train.seed, share_with=shared)
        role = Role(name=name, policy=policy, cfg=role_cfg, engine=engine, master_weights=self.cfg.model.master_weights)
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
            what = f"the KL reference of {role.name}" + ("" if src == str(self.model_path) else f" ({Path(src).name})")
            self._refs[src] = self.load_policy(src, trainable=False, name=what).model.eval()
        role.reference = self._refs[src]

    # ------------------------------------------------------------------------------------------- loop

    def run(self, recipe) -> dict[str, Any]:
        """Run every iteration and stage of `recipe`, resuming from the last checkpoint when asked. The state
        returned has `stopped` = the signal's name when a signal ended the run early (None otherwise)."""
        if self.resume:
            self._restore()
        self.writer = MetricsWriter(self.run_dir / "metrics.jsonl" if self.world.is_main else None)
        self.tracking = Tracking(self.cfg.train.report_to, self.run_dir, to_dict(self.cfg), dumps(self.cfg),
                                 enabled=self.world.is_main)
        self.state["stopped"] = None
        self.profiler.advance(self.state["global_step"])
        try:
            with self.stop:
                for it in range(self.state["iteration"], self.cfg.train.iterations + 1):
                    stages = recipe.stages(it)
                    for si in range(self.state["stage"] if it == self.state["iteration"] else 0, len(stages)):
                        name = stages[si]
                        self._stage_name = name
                        self.state.update(iteration=it, stage=si)
                        role = self.roles[name]
                        self.set_reference(role, it)
                        for other in self.roles.values():
                            (other.onload_optimizer if other is role else other.offload_optimizer)()
                        self._stage_total = None  # the recipe says it (stage_total) once it knows
                        try:
                            recipe.run_stage(self, it, name, start_step=self.state["stage_step"])
                        finally:
                            if self._bar is not None:
                                self._bar.close()
                                self._bar = None
                        self.ckpt.save_role(role, tag=f"iter-{it}")
                        last = si + 1 == len(stages)
                        self.state.update(iteration=it + 1 if last else it, stage=0 if last else si + 1,
                                          stage_step=0)
                        self.save()  # every stage end is a resume point, whatever save_every says
                        kill_point("stage_end")
        except Stopped:
            self.state["stopped"] = signal.Signals(self.stop.signum).name
            log.warning("stopped by %s after step %d; checkpoint in %s", self.state["stopped"],
                        self.state["global_step"], self.ckpt.root)
        finally:
            self.profiler.close()
            self.tracking.close()
            self.writer.close()
        self.state["wall_s"] = time.perf_counter() - self.started
        self.summary = self._summary(recipe)
        return dict(self.state)

    def stage_total(self, total: int) -> None:
        """Recipes call this once the current stage's step count is known: the progress bar's total (rank 0,
        on a terminal; resume-aware: it starts at the steps already done) and the step lines' "k/total"."""
        self._stage_total = total
        if self._bar is not None:
            self._bar.close()
        self._bar = progress(total=total, initial=self.state["stage_step"],
                             desc=f"iter {self.state['iteration']} {self._stage_name}",
                             disable=None if self.world.is_main else True)

    def _summary(self, recipe) -> dict[str, Any]:
        """The end-of-run record (also after a stop): `run_summary.json` beside the metrics (rank 0)."""
        rows = read_metrics(self.run_dir / "metrics.jsonl") if self.world.is_main else []
        steps: dict[str, int] = {}
        for r in rows:
            steps[r["role"]] = steps.get(r["role"], 0) + 1
        source = getattr(recipe, "source", None)
        images = None
        if source is not None:
            stats = source.stats.as_dict()
            reasons = {k: v for k, v in stats.items() if k not in ("loaded", "skipped", "ignored_extension") and v}
            images = {"source": f"{source.kind} {source.where}", "candidates": len(source),
                      "loaded": stats["loaded"], "skipped": stats["skipped"], "skipped_by_reason": reasons,
                      "not_read": len(source) - stats["loaded"] - stats["skipped"],
                      "ignored_by_extension": stats["ignored_extension"]}
        latest = self.ckpt.latest() if self.world.is_main else None
        stopped = self.state.get("stopped")
        summary = {
            "status": f"stopped by {stopped}" if stopped else "finished",
            "wall_s": round(self.state["wall_s"], 2),
            "steps": steps, "global_step": self.state["global_step"],
            "images": images,  # counted in this process (a resumed run counts what it read itself)
            "checkpoints_written": [str(p) for p in self.ckpt.written],
            "latest_checkpoint": latest["trainer_state"] if latest else None,
            "resume_command": f"vzero-fast train --resume --out {self.run_dir}" if stopped else None,
        }
        if self.world.is_main:
            (self.run_dir / "run_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def _restore(self) -> None:
        """Load the newest complete checkpoint; without one (a crash before the first stage ended) the run
        starts again from the beginning, which draws exactly what the lost part drew."""
        if dist.broadcast_object(self.ckpt.latest() is not None):
            self.state = self.ckpt.restore(self.roles)
            for role in self.roles.values():  # the engines sample from the restored weights
                role.engine.sync_weights(role.policy)
        else:
            log.warning("--resume: no complete checkpoint in %s yet; starting the run from its beginning",
                        self.ckpt.root)
        if self.world.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.state["metrics_lines"])

    def step_done(self, role: Role, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write one step's metrics; save every `save_every` steps; stop cleanly after a signal."""
        self.state["stage_step"] += 1
        self.state["global_step"] += 1
        metrics = {**metrics, **eval_during_training(self, role)}  # train.eval_every; {} on other steps
        row = {"role": role.name, "iteration": self.state["iteration"], "step": self.state["stage_step"],
               "global_step": self.state["global_step"], "role_step": role.step, **metrics, **self.timer.pop()}
        row = self.writer.write(row)
        self.tracking.log(row)
        self.state["metrics_lines"] += 1
        if self._bar is not None:
            self._bar.update(1)
        total = self._stage_total
        # One line per step, terminal or not (a cluster job's log has no bar); a terminal's bar stays below.
        sync = row.get("weight_sync_gbps")  # engines that hold their own weights (vLLM)
        log.info("%s iter %d step %d/%s: reward %s, loss %s, kl %s, %s s, %s tok/s%s", role.name,
                 self.state["iteration"], self.state["stage_step"], total if total is not None else "?",
                 _fmt(row.get("reward_mean"), ".3f"), _fmt(row.get("loss"), ".4f"), _fmt(row.get("kl"), ".2e"),
                 _fmt(row.get("time_total"), ".1f"), _fmt(row.get("rollout_tokens_per_s"), ".0f"),
                 f", weight sync {row.get('time_weight_sync', 0.0):.2f} s ({sync:.2f} GB/s)" if sync is not None else "")
        self.profiler.advance(self.state["global_step"])
        dist.die_for_test(self.state["global_step"])
        kill_point("step")
        # A signal may reach the ranks during different steps: stop when any rank has seen one.
        if dist.is_distributed():  # the signal's number, 0 where none arrived (SIGTERM wins over SIGINT)
            signum = int(dist.all_reduce(torch.tensor(float(self.stop.signum or 0)), "max"))
            self.stop.requested, self.stop.signum = signum > 0, signum or None
        every = self.cfg.train.save_every
        if (every and self.state["global_step"] % every == 0) or self.stop.requested:
            self.save()
        if self.stop.requested:
            raise Stopped()
        return row

    def save(self) -> Path:
        with self.timer("checkpoint"):
            return self.ckpt.save(self.roles, dict(self.state))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)
