"""Format warm-up: a short supervised pass that teaches a random (tiny) model a recipe's output formats, with
random answers, before GRPO starts. Every recipe with a warm-up (vzero, grpo, selfjudge) calls this module.

    ensure_warmup(trainer, made_with=..., warm=fn) -> <run>/format-warmup   (built once, reused on --resume)
    supervised_pass(policy, next_examples, steps=, lr=, budget=)           -> the loss of every step

Decisions:
- A warm-up teaches format only: the examples are templated outputs with random answers (letters, numbers,
  scores), never labels, so a recipe's starting reward stays at chance. The recipe supplies the examples
  (`next_examples(rng) -> [(image, user text, target response)]`); this module owns the loop.
- Cross-entropy on the response tokens through forward_hidden + fused_linear_logprob (never the [T, V]
  logits), its own AdamW (discarded afterwards), linear decay to 0 (a short run at a high rate ends with a
  lower loss than a constant rate), gradient-norm clip 1.0.
- The result is saved as `<run>/format-warmup` and becomes the run's base model, so every role and its
  iteration-1 KL reference start from it. `format_warmup.json` is written after the directory and records the
  settings that made it (`made_with`): a directory without it is an interrupted warm-up and is made again;
  one made with other settings is an error rather than a silent reuse.
- Under torchrun rank 0 alone warms up a plain (unsharded) copy, before any model is sharded, and writes the
  directory (atomically); the other ranks wait for the report file by polling the file system (a warm-up
  may last longer than dist.timeout_s, which bounds a barrier), then all meet at a barrier and load from it.

Tests: tests/test_vzero.py, tests/test_selfjudge.py and tests/test_grpo_recipe.py run it end to end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vzero_fast import distributed as dist
from vzero_fast.config import ConfigError
from vzero_fast.grpo import SampleBatch, collate, pack_micro_batches, token_logprobs
from vzero_fast.metrics import progress
from vzero_fast.model import Policy
from vzero_fast.rollout import Request, render_messages

log = logging.getLogger("vzero_fast.warmup")

Example = tuple[Any, str, str]
"""(image or None for a text-only prompt, user text, target response)."""


def encode_examples(policy: Policy, examples: list[Example]) -> SampleBatch:
    """Examples -> a SampleBatch whose responses are the targets + <|im_end|>."""
    prompt_ids, response_ids, pixels, grids = [], [], [], []
    for image, text, target in examples:
        req = Request.from_image_text(image, text)  # image None: a text-only prompt
        enc = policy.processor(text=[render_messages(policy, req.messages)],
                               images=[image] if image is not None else None)
        prompt_ids.append(enc["input_ids"][0])
        pixels.append(enc.get("pixel_values"))
        grids.append(enc.get("image_grid_thw"))
        ids = policy.tokenizer(target, add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
        response_ids.append(torch.tensor(ids, dtype=torch.long))
    B = len(examples)
    return SampleBatch(prompt_ids=prompt_ids, response_ids=response_ids, prompt_of=list(range(B)),
                       pixel_values=pixels, image_grid_thw=grids, advantages=torch.zeros(B),
                       sample_logprobs=[torch.zeros(len(r)) for r in response_ids])


def supervised_pass(policy: Policy, next_examples: Callable[[np.random.Generator], list[Example]], *, steps: int,
                    lr: float, budget: int, seed: int) -> list[float]:
    """`steps` AdamW steps of response-token cross-entropy on `next_examples(rng)`; trains `policy` in place and
    returns the loss of every step. Deterministic for a seed."""
    model = policy.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    rng = np.random.default_rng([seed, 11])
    losses = []
    model.train()
    for _ in progress(range(steps), desc="format warm-up"):
        examples = next_examples(rng)
        if not examples:
            raise RuntimeError("format warm-up: no image of the source could be loaded")
        batch = encode_examples(policy, examples)
        R, total = batch.max_response, batch.response_tokens(range(len(batch)))
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(())
        for idx in pack_micro_batches(batch.lengths(), budget):
            mb = collate(batch, idx, policy, R)
            logp = token_logprobs(policy, policy.lm_head_weight, mb, 1.0)  # [b, R], 0 where masked
            loss = -(logp * mb.mask).sum() / total
            loss.backward()
            loss_sum += loss.detach().cpu()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss_sum))
    opt.zero_grad(set_to_none=True)
    model.eval()
    return losses


def ensure_warmup(trainer, *, made_with: dict[str, Any], warm: Callable[[Policy], dict[str, Any]],
                  poll_s: float = 0.5) -> Path:
    """The run's warmed-up base model directory, built once (`<run>/format-warmup`) by `warm(policy)` (which
    trains the policy in place and returns its report); returns its path (module docstring)."""
    out, report = trainer.run_dir / "format-warmup", trainer.run_dir / "format_warmup.json"
    want = json.loads(json.dumps(made_with))  # as it reads back from JSON
    found = None
    if dist.is_main() and (out / "config.json").exists() and report.exists():
        found = json.loads(report.read_text()).get("made_with")
    found = dist.broadcast_object(found)  # rank 0's view: every rank takes one branch
    if found is not None:
        if found != want:
            diff = sorted(k for k in set(found) | set(want) if found.get(k) != want.get(k))
            raise ConfigError(f"{out} was made with other settings ({', '.join(diff)}: "
                              f"{[found.get(k) for k in diff]} now {[want.get(k) for k in diff]}); delete it "
                              f"to warm up again, or use another --out")
        log.info("format warm-up: reusing %s", out)
        return out
    if dist.is_main():
        _warmup_to(trainer, out, made_with=want, warm=warm)
    else:
        while not report.exists():
            time.sleep(poll_s)
    dist.barrier()
    return out


def _warmup_to(trainer, out: Path, *, made_with: dict[str, Any], warm: Callable[[Policy], dict[str, Any]]) -> None:
    from vzero_fast.checkpoint import save_model_dir

    cfg = trainer.cfg
    if cfg.model.path:
        log.warning("format warm-up on --model %s: it is meant for a model that cannot write the formats yet "
                    "(the random tiny one); set the recipe's format_warmup_steps to 0 for a trained checkpoint",
                    cfg.model.path)
    with trainer.timer("format_warmup"):
        policy = trainer.load_policy(shard=False, name="the format warm-up's copy")
        start = time.perf_counter()
        report = warm(policy)
        report["seconds"] = time.perf_counter() - start
        save_model_dir(policy.model, policy.path, out)
    (trainer.run_dir / "format_warmup.json").unlink(missing_ok=True)
    tmp = trainer.run_dir / ".tmp-format_warmup.json"
    tmp.write_text(json.dumps({**report, "made_with": made_with}, indent=1) + "\n")
    os.replace(tmp, trainer.run_dir / "format_warmup.json")  # written last: the warm-up is complete
    rates = ", ".join(f"{k} {v:.2f}" for k, v in report.items() if k.endswith("parse_rate"))
    log.info("format warm-up: %d steps, loss %.3f -> %.3f, parse rates after: %s (%.1f s) -> %s", report["steps"],
             report["loss_first"], report["loss_last"], rates, report["seconds"], out)
