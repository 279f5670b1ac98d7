"""V-Zero-OPD (ALGORITHMS.md section 4): on-policy distillation from a frozen teacher, gated by visual evidence.

A student samples G responses per (image, question) on the full image. A larger frozen teacher re-scores the
student's own tokens twice (no teacher generation, no answer labels): with [full image, crop of the relevant
region] + question (z+) and with a negative view (z-). Per token t of response i:

    delta_t = log pT(y_t | x, z+) - log pT(y_t | x, z-)
    Delta_t = relu(delta_t) - gamma relu(-delta_t)
    p_i     = sum_t mask Delta_t / max(sum_t mask, 1e-6)            (mean over the response's OWN tokens first)
    w_i     = clamp(1 + alpha (p_i - mean_g p) / (popstd_g p + 1e-6), 0, 2)   (1 for a group of one or flat)
    d_t     = clamp(log pS(y_t) - log pT(y_t | x, z+), -10, 10)     (clamped BEFORE weighting)
    A_t     = -w_i d_t                                              (per-token advantage of the PPO-clip loss)

Decisions:
- The student log-prob in d is the CURRENT one (the reference's choice, and the default; no other is
  offered): the training forward computes it anyway (SampleBatch.token_advantages, vzero_fast/grpo.py), so
  d costs no extra pass, and over several mini-batches or epochs a token the student has already moved to
  the teacher stops being pushed. On the first update of a batch it equals the sampling policy's. It is the
  training log-prob (at student.temperature, 1.0 in every preset); the teacher's are at temperature 1.
- The teacher is any local checkpoint with the student's tokenizer (checked before its weights load: same
  vocabulary, same special ids; a clear error otherwise), loaded frozen in `opd.teacher_dtype` (auto: bf16 on
  CUDA, fp32 on the CPU), FSDP2-sharded under torchrun like the roles. Its log-probs go through the same
  fused lm_head kernel as the student's (`grpo.token_logprobs`): [tokens, vocab] logits are never built.
  Both views of every response are scored in one no-grad pass over token-budget micro-batches.
- No `--opd.teacher` (and `opd.tiny_teacher`, the tiny preset's default): a tiny teacher of the student's
  family is built in the run directory (seed model.tiny_seed + 1, a twice as wide MLP; vzero_fast/tiny.py's
  tokenizer, so it matches a tiny student only). The opd-4b preset turns this off: it needs --model and
  --opd.teacher.
- One stage ("student") per iteration; steps = max_steps_per_role, else `opd.data_epochs` passes over the
  data. No task reward: the metrics are the gate's (mean, std, share of w > 1), mean delta, Delta and d,
  `time_teacher` and the response lengths, beside the loss's.
- Data: vzero_fast/regions.py (JSONL rows with bbox / neg_bbox, or synthetic figures that know their boxes).

Run: `vzero-fast train --recipe opd --preset tiny --iterations 1 --max-steps-per-role 3 --out runs/opd`,
or `vzero-fast train --recipe opd --preset opd-4b --model STUDENT --opd.teacher TEACHER --images rows.jsonl`.
Tests: tests/test_opd_rules.py (the rules against float64 formulas), tests/test_opd.py (data, teacher,
the tiny run, exact resume).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from vzero_fast import distributed as dist
from vzero_fast.config import ConfigError
from vzero_fast.data import step_items
from vzero_fast.grpo import SampleBatch, collate, pack_micro_batches, response_hidden, token_logprobs
from vzero_fast.model import check_model_dir, image_factor, load_policy, load_processor
from vzero_fast.regions import RegionItem, open_regions
from vzero_fast.rollout import Request, RolloutOutput, SamplingParams, encode_requests
from vzero_fast.trainer import Trainer, step_seed

log = logging.getLogger("vzero_fast.recipes.opd")

ROLE = "student"
GATE_EPS = 1e-6
LENGTH_FLOOR = 1e-6


# ---------------------------------------------------------------------------------------------- the rules

def evidence_gate(pos_logp: torch.Tensor, neg_logp: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                  alpha: float = 0.5) -> torch.Tensor:
    """[G, n] detached response weights w from the teacher's log-probs under z+ and z- ([G, n, T] each) and the
    response mask [G, n, T] (ALGORITHMS.md section 4). Masked positions may hold anything."""
    m = mask != 0
    dtype = torch.promote_types(pos_logp.dtype, torch.float32)
    delta = torch.where(m, pos_logp.to(dtype) - neg_logp.to(dtype), 0.0)  # [G, n, T]
    gated = _evidence(delta, gamma)
    p = gated.sum(-1) / m.sum(-1).to(dtype).clamp(min=LENGTH_FLOOR)  # [G, n]: each response's own mean
    a = (p - p.mean(1, keepdim=True)) / (p.std(1, unbiased=False, keepdim=True) + GATE_EPS)
    w = (1.0 + alpha * a).clamp(0.0, 2.0)
    flat = p.amax(1, keepdim=True) == p.amin(1, keepdim=True)  # a group of one, or zero variance
    return torch.where(flat, torch.ones_like(w), w).detach()


def _evidence(delta: torch.Tensor, gamma: float) -> torch.Tensor:
    """Delta_t = relu(delta_t) - gamma relu(-delta_t)."""
    return delta.clamp(min=0) - gamma * (-delta).clamp(min=0)


def distill_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                       w: torch.Tensor, *, clamp: float = 10.0) -> torch.Tensor:
    """[G, n, T] detached per-token advantages A_t = -w_i clamp(log pS - log pT(z+), -clamp, clamp), 0 where
    masked. Any leading shape works ([b, T] with w [b] inside a micro-batch)."""
    m = mask != 0
    d = _distill_gap(student_logp, teacher_logp, clamp)
    return torch.where(m, -w.unsqueeze(-1).to(d.dtype) * d, 0.0).detach()


def _distill_gap(student_logp: torch.Tensor, teacher_logp: torch.Tensor, clamp: float) -> torch.Tensor:
    """d_t, clamped before any weighting."""
    dtype = torch.promote_types(student_logp.dtype, torch.float32)
    return (student_logp.to(dtype) - teacher_logp.to(dtype)).clamp(-clamp, clamp)


# -------------------------------------------------------------------------------------------- the teacher

def check_same_tokenizer(student_dir: str | Path, teacher_dir: str | Path) -> None:
    """ConfigError unless the teacher tokenizes exactly as the student (it scores the student's token ids)."""
    s, t = load_processor(student_dir), load_processor(teacher_dir)
    sv, tv = s.tokenizer.get_vocab(), t.tokenizer.get_vocab()
    problem = None
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:3]
        only_t = sorted(set(tv) - set(sv))[:3]
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])[:3]
        problem = (f"vocabularies differ ({len(sv)} vs {len(tv)} tokens; only the student's: {only_s}, only the "
                   f"teacher's: {only_t}, other ids: {moved})")
    elif (s.image_token_id, s.video_token_id, s.tokenizer.eos_token_id) != (
            t.image_token_id, t.video_token_id, t.tokenizer.eos_token_id):
        problem = "special token ids differ"
    if problem is not None:
        raise ConfigError(f"--opd.teacher {teacher_dir}: its tokenizer is not the student's ({student_dir}): "
                          f"{problem}; the teacher re-scores the student's token ids, so both need one tokenizer")


def build_tiny_teacher(out: str | Path, *, student_dir: str | Path, seed: int) -> Path:
    """A tiny teacher for a tiny student: vzero_fast/tiny.py's model of the student's family with another seed
    and a twice as wide MLP (intermediate size), built from tiny.py's public pieces."""
    from safetensors.torch import save_file

    from vzero_fast.tiny import build_tiny, random_state_dict

    family = json.loads((Path(student_dir) / "config.json").read_text())["model_type"]
    out = build_tiny(out, seed=seed, family=family)
    config = json.loads((out / "config.json").read_text())
    text = config.get("text_config", config)
    text["intermediate_size"] *= 2
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(random_state_dict(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


class Teacher:
    """The frozen teacher: `score(outputs, items)` -> log-probs of the student's tokens under z+ and z-."""

    def __init__(self, trainer: Trainer, path: Path):
        world, m = trainer.world, trainer.cfg.model
        self.policy = load_policy(path, dtype=trainer.cfg.opd.teacher_dtype, attn_implementation=m.attn_implementation,
                                  device=str(trainer.device), name="the OPD teacher")
        for p in self.policy.model.parameters():
            p.requires_grad_(False)
        if world.fsdp:
            dist.shard_model(self.policy.model, world)
            compute = dist.mixed_precision_dtype(world)
            if compute is not None:
                self.policy.dtype = compute
        self.policy.model.eval()
        self.budget = trainer.cfg.student.micro_batch_tokens
        self._dummy = None

    @torch.no_grad()
    def score(self, outputs: list[RolloutOutput], items: list[RegionItem], prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, R], [B, R]) fp32 log-probs of every sample's response tokens (B = all samples in output order,
        R = the longest response) under [full, crop+] + question and the negative view; one batched pass."""
        G = len(outputs)
        views = [it.positive for it in items] + [it.negative for it in items]  # 2G teacher prompts
        texts = [prompt(it.question) for it in items] * 2
        requests = [Request(messages=[{"role": "user", "content": [{"type": "image", "image": im} for im in ims]
                                       + [{"type": "text", "text": text}]}])
                    for ims, text in zip(views, texts, strict=True)]
        responses = [s.token_ids for o in outputs for s in o.samples]
        owner = [g for g, o in enumerate(outputs) for _ in o.samples]  # sample -> its prompt
        B = len(responses)
        if G:
            enc = encode_requests(self.policy, requests)
            prompts = [enc.prompt(b) for b in range(2 * G)]
        else:
            prompts = []
        batch = SampleBatch(prompt_ids=[prompts[v * G + g]["prompt_ids"] for v in (0, 1) for g in owner],
                            response_ids=responses * 2, prompt_of=[v * G + g for v in (0, 1) for g in owner],
                            pixel_values=[p["pixel_values"] for p in prompts],
                            image_grid_thw=[p["image_grid_thw"] for p in prompts],
                            advantages=torch.zeros(2 * B), sample_logprobs=[])
        R = batch.max_response
        model = self.policy.model
        out = torch.zeros(2 * B, R, dtype=torch.float32, device=self.policy.device)
        parts = pack_micro_batches(batch.lengths(), self.budget)
        n_passes = int(dist.all_reduce(torch.tensor(float(len(parts))), "max")) if dist.is_distributed() else len(parts)
        for idx in parts:
            mb = collate(batch, idx, self.policy, R)
            out[mb.rows] = token_logprobs(model, self.policy.lm_head_weight, mb, 1.0)
        for _ in range(len(parts), n_passes):  # FSDP passes are collective: match the busiest rank
            response_hidden(model, self._dummy_micro_batch())
        dist.reshard(model)
        return out[:B], out[B:]

    def _dummy_micro_batch(self):
        if self._dummy is None:
            from PIL import Image

            enc = encode_requests(self.policy, [Request.from_image_text(Image.new("RGB", (56, 56), (128, 128, 128)), ".")])
            p = enc.prompt(0)
            batch = SampleBatch(prompt_ids=[p["prompt_ids"]], response_ids=[torch.tensor([self.policy.eos_token_id])],
                                prompt_of=[0], pixel_values=[p["pixel_values"]], image_grid_thw=[p["image_grid_thw"]],
                                advantages=torch.zeros(1), sample_logprobs=[])
            self._dummy = collate(batch, [0], self.policy, 1)
        return self._dummy


# --------------------------------------------------------------------------------------------- the recipe

class OPDRecipe:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.cfg = cfg = trainer.cfg
        self.seed = cfg.train.seed
        self.rc, self.oc = cfg.student, cfg.opd
        teacher_dir = self._teacher_dir()
        check_same_tokenizer(trainer.model_path, teacher_dir)
        self.source = open_regions(cfg.data, seed=self.seed, negative=self.oc.negative,
                                   factor=image_factor(trainer.model_path), teacher_factor=image_factor(teacher_dir))
        log.info("regions: %s; negative view: %s", self.source.describe(), self.oc.negative)
        dist.check_divisible(self.rc.prompts_per_step, "student.prompts_per_step")
        self.role = trainer.add_role(ROLE, self.rc)
        self.teacher = Teacher(trainer, teacher_dir)

    def _teacher_dir(self) -> Path:
        oc, trainer = self.oc, self.trainer
        if oc.teacher:
            try:
                return check_model_dir(oc.teacher)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"--opd.teacher {oc.teacher}: {e}") from None
        if not oc.tiny_teacher:
            raise ConfigError("--opd.teacher DIR is required (opd.tiny_teacher is off, as in the opd-4b preset, which "
                              "ships no weights: give --model STUDENT and --opd.teacher TEACHER)")
        path = trainer.run_dir / "tiny-teacher"
        if trainer.world.is_main and not (path / "config.json").exists():
            log.info("no --opd.teacher: building a tiny teacher (seed %d, wider MLP) in %s",
                     self.cfg.model.tiny_seed + 1, path)
            tmp = path.with_name(path.name + ".partial")  # a run killed mid-build leaves no half teacher behind
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_teacher(tmp, student_dir=trainer.model_path, seed=self.cfg.model.tiny_seed + 1)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        dist.barrier()
        return path

    def steps_per_stage(self) -> int:
        return self.cfg.train.max_steps_per_role or max(
            1, self.oc.data_epochs * len(self.source) // self.rc.prompts_per_step)

    def stages(self, iteration: int) -> list[str]:  # noqa: ARG002
        return [ROLE]

    @staticmethod
    def prompt(question: str) -> str:
        return question

    def requests(self, iteration: int, step: int) -> list[Request]:
        rc, world, steps = self.rc, self.trainer.world, self.steps_per_stage()
        items = step_items(self.source, seed=self.seed, step=(iteration - 1) * steps + step,
                           count=rc.prompts_per_step, rank=world.rank, world_size=world.world_size)
        return [Request.from_image_text(
            it.image, self.prompt(it.question), request_id=it.key, meta={"item": it},
            params=SamplingParams(n=rc.rollout_n, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                                  max_new_tokens=rc.max_response_tokens, repetition_penalty=rc.repetition_penalty,
                                  seed=step_seed(self.seed, ROLE, iteration, it.position)))
            for it in items]

    def run_stage(self, trainer: Trainer, iteration: int, role_name: str, *, start_step: int) -> None:  # noqa: ARG002
        steps = self.steps_per_stage()
        trainer.stage_total(steps)
        for step in range(start_step, steps):
            trainer.step_done(self.role, self.step(self.requests(iteration, step)))

    def step(self, requests: list[Request]) -> dict:
        """Rollout -> teacher scoring of both views -> gate -> PPO-clip updates on the per-token advantages."""
        role, oc, timer = self.role, self.oc, self.trainer.timer
        with timer("rollout"):
            outputs = role.engine.generate(requests)
        items = [o.request.meta["item"] for o in outputs]
        with timer("teacher"):
            pos, neg = self.teacher.score(outputs, items, self.prompt)  # [B, R] each
        B, R = pos.shape
        lengths = torch.tensor([len(s.token_ids) for o in outputs for s in o.samples], device=pos.device)
        mask = torch.arange(R, device=pos.device)[None, :] < lengths[:, None]  # [B, R]
        G = len(outputs)
        n = B // max(G, 1)
        w = evidence_gate(pos.view(G, n, R), neg.view(G, n, R), mask.view(G, n, R), gamma=oc.gamma,
                          alpha=oc.alpha).reshape(B) if G else pos.new_zeros(0)  # a rank may have no item
        delta = torch.where(mask, pos - neg, 0.0)
        Delta = _evidence(delta, oc.gamma)
        f64 = torch.float64
        sums = torch.stack([w.sum(), (w * w).sum(), (w > 1).sum(), delta.sum(), Delta.sum(), mask.sum(),
                            lengths.sum(), lengths.max() if B else lengths.new_zeros(())]).to("cpu", f64)
        sums = torch.cat([dist.all_reduce(torch.cat([sums[:7], torch.tensor([B, G], dtype=f64)])),
                          dist.all_reduce(sums[7:], "max")])
        w_sum, w_sq, above, d_sum, D_sum, tokens, len_sum, n_b, n_g, longest = sums.tolist()
        metrics: dict = {
            "gate_mean": torch.tensor(w_sum / max(n_b, 1.0)),
            "gate_std": torch.tensor(max(w_sq / max(n_b, 1.0) - (w_sum / max(n_b, 1.0)) ** 2, 0.0) ** 0.5),
            "gate_above_1": torch.tensor(above / max(n_b, 1.0)),
            "delta_mean": torch.tensor(d_sum / max(tokens, 1.0)), "Delta_mean": torch.tensor(D_sum / max(tokens, 1.0)),
            "response_length_mean": torch.tensor(len_sum / max(n_b, 1.0)), "response_length_max": torch.tensor(longest),
            "groups": torch.tensor(n_g), "rollout_tokens_per_s": torch.tensor(role.engine.stats.tokens_per_s),
        }
        if n_g > 0:
            metrics.update(self._train(outputs, pos, w, timer))
        role.step += 1
        return metrics

    def _train(self, outputs: list[RolloutOutput], teacher_pos: torch.Tensor, w: torch.Tensor, timer) -> dict:
        role, clamp = self.role, self.oc.clamp
        B = teacher_pos.shape[0]
        batch = SampleBatch.from_outputs(outputs, torch.zeros(len(outputs), B // max(len(outputs), 1)))
        d_acc = torch.zeros(2, device=role.policy.device)  # sum of d over trained tokens, their count

        def token_advantages(logp: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            teacher = teacher_pos[rows][:, : logp.shape[1]]  # [b, R]
            d_acc.add_(torch.stack([torch.where(mask, _distill_gap(logp, teacher, clamp), 0.0).sum(),
                                    mask.sum().to(d_acc.dtype)]))
            return distill_advantages(logp, teacher, mask, w[rows], clamp=clamp)

        batch.token_advantages = token_advantages
        out = role.update(batch, timer=timer)
        d_sum, d_count = dist.all_reduce(d_acc).unbind(0)
        out["d_mean"] = d_sum / d_count.clamp(min=1.0)
        return out
