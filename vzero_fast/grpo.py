"""GRPO: rollouts -> rewards -> group advantages -> filters -> micro-batches -> loss -> AdamW.

The step, on one screen (`Role.grpo_step`):
    outputs  = engine.generate(requests)                   # n samples per prompt, sampling log-probs
    rewards  = reward_fn(outputs)                          # [G, n], one call over the whole batch
    adv      = group_advantages(rewards, kind)             # [G, n], vectorised
    keep     = keep_groups(rewards, ...)                   # optional filters
    batch    = SampleBatch.from_outputs(outputs[keep], adv[keep])
    for epoch, mini-batch:                                 # `mini_batches` optimizer steps
        old/ref log-probs (no grad) when needed            # old only when a batch is split, ref only when kl>0
        for micro-batch (token budget):
            hidden = forward_hidden(...)                   # [b, T, H]; logits never built
            loss   = grpo_loss(fused_linear_logprob(...))  # divisor = tokens of the whole MINI-batch
            loss.backward()
        clip grad norm; a non-finite loss or gradient skips the update (never touches the weights)

Decisions:
- Log-probs are response-aligned: hidden state p-1 predicts token p, so we gather the hidden rows that
  predict response tokens into [b, R, H] before the streaming lm_head (`fused_linear_logprob`); prompt
  positions never reach the vocabulary projection.
- Micro-batches are packed by a token budget on padded length (b * T_max), longest first, so each
  forward has similar cost and the padding is small; the loss divisor is the token (or sequence) count
  of the whole mini-batch (`agg_divisor`), so gradient accumulation equals one large batch.
- Old log-probs are recomputed with the training forward (not taken from the sampler) when the rollout
  batch is split into several mini-batches or epochs; with one mini-batch and one epoch the update is
  on-policy (ratio 1, gradient of log p) and no extra forward runs.
- The logprob_diff metric (sampler vs training forward, mean |diff| over response tokens) comes for
  free from the first mini-batch's forward, before any update.
- The engine seam (vzero_fast/rollout.py): the engine sleeps from the end of the reward to the end of the updates,
  and `engine.sync_weights(policy)` follows every optimizer step (a no-op for the native engine, which samples
  with these very weights; an engine holding its own copy, such as vLLM, must receive each update).
- LoRA roles (vzero_fast/lora.py): the policy is a view of a shared frozen base, so the optimizer holds the
  adapters only (the parameters that require grad), the fused log-prob kernel reads the frozen lm_head, and
  `freeze_reference` copies the adapter, never the base.
- Randomness is derived from (seed, role, step) counters, so a resumed run draws exactly what an
  uninterrupted one would (no generator state has to be saved).
- Advantages are per sample [B] (GRPO) or per token [B, R] (the loss takes both); a batch may instead carry
  `token_advantages`, a function of the current log-probs that each micro-batch calls after its forward
  (V-Zero-OPD's distillation advantage, vzero_fast/recipes/opd.py).
- Mini-batches split every group: sample j of each group goes to mini-batch j mod `mini_batches` (the
  old strided split whenever `mini_batches` divides n), a rule that needs no global sample order.
- Data-parallel (torchrun, vzero_fast/distributed.py): each rank holds whole groups (its prompts' n samples),
  so advantages are local. Once per `train_on` the ranks all-reduce each mini-batch's sample and token counts
  (the loss divisor is the GLOBAL count, FSDP sums gradients) and the most micro-batches any rank runs per
  pass (fewer -> zero-weight dummy passes, since every FSDP pass is collective); once per optimizer step
  they all-reduce the metrics, which are per-rank shares that add up. Step metrics are global sums/maxima.
  Every rank must call `grpo_step` / `train_on`, with an empty batch if it kept no group.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vzero_fast import distributed as dist
from vzero_fast import lora
from vzero_fast.config import RoleConfig
from vzero_fast.kernels import fused_linear_logprob, grpo_loss
from vzero_fast.kernels.grpo_loss import METRICS as LOSS_METRICS
from vzero_fast.metrics import StageTimer
from vzero_fast.model import Policy, forward_hidden
from vzero_fast.optim import RoleOptimizer
from vzero_fast.rollout import Request, RolloutEngine, RolloutOutput

log = logging.getLogger("vzero_fast.grpo")

RewardFn = Callable[[list[RolloutOutput]], torch.Tensor]
TokenAdvantageFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------- advantages and filters

def group_advantages(rewards: torch.Tensor, *, kind: str = "grpo", eps: float = 1e-6, beta: float = 1.0) -> torch.Tensor:
    """[G, n] rewards -> [G, n] advantages (ALGORITHMS.md sections 0 and 3).

    grpo: (r - mean) / (std + eps) with the unbiased std; a group of one gets std := 1.
    drgrpo: r - mean. Zero-variance groups give 0 either way.
    group-softmax (Self-Judge): a~ = beta r - logsumexp_j(beta r_j), A = a~ - mean(a~), no std division. The
    logsumexp is one constant per group and cancels in the centring: A = beta (r - mean r), computed so; a
    group of one gets 0.
    """
    rewards = rewards.to(torch.float32)
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [G, n]
    if kind == "group-softmax":
        return beta * centred
    if kind == "drgrpo":
        return centred
    if kind != "grpo":
        raise ValueError(f"advantage kind must be 'grpo', 'drgrpo' or 'group-softmax', got {kind!r}")
    if rewards.shape[1] == 1:
        return centred / (1.0 + eps)
    return centred / (rewards.std(dim=1, unbiased=True, keepdim=True) + eps)


def keep_groups(rewards: torch.Tensor, *, drop_zero_variance: bool = False,
                share: torch.Tensor | None = None, band: tuple[float, float] | None = None) -> torch.Tensor:
    """[G] bool: which groups train. Zero-variance groups carry no GRPO signal; `band` keeps groups
    whose majority `share` [G] lies in [low, high] (V-Zero's difficulty band)."""
    keep = torch.ones(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    if drop_zero_variance:
        keep &= (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0
    if band is not None:
        if share is None:
            raise ValueError("a share band needs the per-group share")
        keep &= (share >= band[0]) & (share <= band[1])
    return keep


def pack_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Split sample indices into micro-batches whose padded size (count * longest) fits the budget.

    Longest first, so a micro-batch's samples have similar lengths; a sample longer than the budget
    gets a micro-batch of its own (it must still be trained on)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and new_longest * (len(current) + 1) > token_budget:
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


# ------------------------------------------------------------------------------------------- the batch

@dataclass
class SampleBatch:
    """Flattened samples of the kept groups; image inputs are stored once per prompt."""

    prompt_ids: list[torch.Tensor]          # per sample, 1-D
    response_ids: list[torch.Tensor]        # per sample, 1-D
    prompt_of: list[int]                    # sample -> prompt index
    pixel_values: list[torch.Tensor | None]  # per prompt
    image_grid_thw: list[torch.Tensor | None]  # per prompt
    advantages: torch.Tensor                # [B] fp32, or [B, R] per token (R = max_response)
    sample_logprobs: list[torch.Tensor]     # per sample, the sampler's log-probs (fp32)
    old_logprobs: torch.Tensor | None = None  # [B, R] response-aligned, when recomputed
    ref_logprobs: torch.Tensor | None = None  # [B, R]
    token_advantages: TokenAdvantageFn | None = None
    """When set, each micro-batch's [b, R] advantages come from (current log-probs [b, R] detached, rows [b],
    mask [b, R]) instead of `advantages` (OPD: its distillation term uses the CURRENT student's log-probs, which
    the training forward computes anyway: no extra pass)."""

    @classmethod
    def from_outputs(cls, outputs: Sequence[RolloutOutput], advantages: torch.Tensor) -> SampleBatch:
        """advantages: [G, n] for the G outputs (n samples each) or already flat [B], or [G, n, R] per token."""
        prompt_ids, response_ids, prompt_of, logps = [], [], [], []
        for g, out in enumerate(outputs):
            for s in out.samples:
                prompt_ids.append(out.prompt_ids)
                response_ids.append(s.token_ids)
                prompt_of.append(g)
                logps.append(s.logprobs)
        return cls(prompt_ids=prompt_ids, response_ids=response_ids, prompt_of=prompt_of,
                   pixel_values=[o.pixel_values for o in outputs],
                   image_grid_thw=[o.image_grid_thw for o in outputs],
                   advantages=(advantages if advantages.dim() == 1 else advantages.flatten(0, 1)).to(torch.float32),
                   sample_logprobs=logps)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def max_response(self) -> int:
        return max((len(r) for r in self.response_ids), default=0)

    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)]

    def response_tokens(self, idx: Sequence[int]) -> int:
        return sum(len(self.response_ids[i]) for i in idx)


@dataclass
class MicroBatch:
    inputs: dict[str, torch.Tensor | None]  # forward_hidden keywords
    gather_index: torch.Tensor  # [b, R] positions whose hidden state predicts response token r
    targets: torch.Tensor       # [b, R] response ids (0 where masked)
    mask: torch.Tensor          # [b, R] bool
    rows: torch.Tensor          # [b] sample indices into the SampleBatch


def collate(batch: SampleBatch, idx: Sequence[int], policy: Policy, response_len: int) -> MicroBatch:
    """Right-padded prompt+response sequences of the samples `idx`, with their images."""
    device = policy.device
    seqs = [torch.cat([batch.prompt_ids[i], batch.response_ids[i]]) for i in idx]
    T = max(len(s) for s in seqs)
    b = len(idx)
    ids = torch.full((b, T), policy.pad_token_id, dtype=torch.long)
    attn = torch.zeros((b, T), dtype=torch.long)
    gather = torch.zeros((b, response_len), dtype=torch.long)
    targets = torch.zeros((b, response_len), dtype=torch.long)
    mask = torch.zeros((b, response_len), dtype=torch.bool)
    for row, (i, s) in enumerate(zip(idx, seqs)):
        p, r = len(batch.prompt_ids[i]), len(batch.response_ids[i])
        ids[row, : len(s)] = s
        attn[row, : len(s)] = 1
        gather[row, :r] = torch.arange(p - 1, p - 1 + r)
        targets[row, :r] = batch.response_ids[i]
        mask[row, :r] = True
    # Images in sample order: a prompt's pixels repeat for each of its samples in this micro-batch
    # (the vision tower trains, so each sequence needs its own activations).
    prompts = [batch.prompt_of[i] for i in idx]
    pixels = [batch.pixel_values[g] for g in prompts if batch.pixel_values[g] is not None]
    grids = [batch.image_grid_thw[g] for g in prompts if batch.image_grid_thw[g] is not None]
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": attn.to(device),
        "mm_token_type_ids": (ids == policy.image_token_id).to(torch.int32).to(device),
        "pixel_values": torch.cat(pixels).to(device, policy.dtype) if pixels else None,
        "image_grid_thw": torch.cat(grids).to(device) if grids else None,
    }
    return MicroBatch(inputs=inputs, gather_index=gather.to(device), targets=targets.to(device),
                      mask=mask.to(device), rows=torch.as_tensor(list(idx), device=device))


def response_hidden(model_or_policy, mb: MicroBatch) -> torch.Tensor:
    """[b, R, H] hidden states that predict the response tokens (the prompt never meets lm_head)."""
    hidden = forward_hidden(model_or_policy, **mb.inputs)  # [b, T, H]
    index = mb.gather_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [b, R, H]
    return hidden.gather(1, index)


def token_logprobs(model_or_policy, lm_head_weight: torch.Tensor, mb: MicroBatch, temperature: float,
                   *, return_entropy: bool = False):
    """Response-aligned log-probs [b, R] (fp32; 0 where masked) and optionally the entropy [b, R].

    Under FSDP2 a weight passed in before the forward is a shard; the gathered one is read after it."""
    h = response_hidden(model_or_policy, mb)  # [b, R, H]
    if dist.is_sharded(_model_of(model_or_policy)):
        lm_head_weight = _lm_head_weight(_model_of(model_or_policy))  # gathered by the forward just run
    b, R, H = h.shape
    flat = mb.mask.reshape(-1)
    out = fused_linear_logprob(h.reshape(b * R, H)[flat], lm_head_weight, mb.targets.reshape(-1)[flat],
                               temperature=temperature, return_entropy=return_entropy)
    logp, ent = (out if return_entropy else (out, None))
    full = torch.zeros(b * R, dtype=torch.float32, device=h.device).masked_scatter(flat, logp).view(b, R)
    if not return_entropy:
        return full
    full_ent = torch.zeros(b * R, dtype=torch.float32, device=h.device).masked_scatter(flat, ent).view(b, R)
    return full, full_ent


# ------------------------------------------------------------------------------------------------ roles

@dataclass
class Role:
    """A named policy with its own weights, optimizer, frozen reference and settings."""

    name: str
    policy: Policy
    cfg: RoleConfig
    engine: RolloutEngine
    master_weights: bool = True
    """fp32 master weights under AdamW when the model's weights are bf16/fp16 (vzero_fast/optim.py)."""
    optimizer: RoleOptimizer = field(init=False)
    reference: torch.nn.Module | None = field(default=None, init=False)
    step: int = 0
    skipped_steps: int = 0
    _dummy: MicroBatch | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.optimizer = RoleOptimizer(self.policy.model, lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                       weight_decay=self.cfg.weight_decay, master_weights=self.master_weights,
                                       name=self.name)

    def freeze_reference(self) -> None:
        """Freeze a copy of the current weights as the KL reference (the trainer instead loads the
        stage-start weights from disk so that a resumed stage gets the same reference)."""
        if self.cfg.kl_coef == 0:
            self.reference = None
            return
        if lora.has_adapters(self.policy.model):  # the shared base plus a frozen copy of the adapter only
            self.reference = lora.frozen_copy(self.policy.model)
            return
        ref = copy.deepcopy(self.policy.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        self.reference = ref

    def offload_optimizer(self) -> None:
        """Move AdamW state (and fp32 masters) to the CPU while another role trains."""
        self.optimizer.move(torch.device("cpu"))

    def onload_optimizer(self) -> None:
        self.optimizer.move(self.policy.device)

    # ----------------------------------------------------------------------------------- the GRPO step

    def grpo_step(self, requests: list[Request], reward_fn: RewardFn, *, timer: StageTimer) -> dict:
        """One rollout batch -> `mini_batches` optimizer steps. Returns device-tensor metrics (global). The engine
        sleeps while the role trains; every optimizer step is followed by `engine.sync_weights`."""
        cfg = self.cfg
        with timer("rollout"):
            outputs = self.engine.generate(requests)
        with timer("reward"):
            rewards = reward_fn(outputs).to(torch.float32)  # [G, n]
        adv = group_advantages(rewards, kind=cfg.advantage)
        keep = keep_groups(rewards, drop_zero_variance=cfg.drop_zero_variance)
        kept = [o for o, k in zip(outputs, keep.tolist(), strict=True) if k]
        r = rewards.detach().double().reshape(-1).cpu()  # [G * n]
        lengths = torch.tensor([len(s.token_ids) for o in outputs for s in o.samples], dtype=torch.float64)
        # Global over the ranks' groups: one SUM and one MAX all-reduce per step (no-ops in one process).
        f64 = torch.tensor([r.numel(), lengths.numel(), len(kept), len(outputs), self.engine.stats.tokens_per_s],
                           dtype=torch.float64)
        sums = dist.all_reduce(torch.cat([torch.stack([r.sum(), (r * r).sum(), lengths.sum()]), f64]))
        longest = dist.all_reduce(lengths.max() if lengths.numel() else torch.zeros((), dtype=torch.float64), "max")
        r_sum, r_sq, len_sum, n_r, n_len, n_kept, n_groups, tok_s = sums.tolist()
        var = max(r_sq - r_sum * r_sum / n_r, 0.0) / (n_r - 1) if n_r > 1 else 0.0
        metrics = {
            "reward_mean": torch.tensor(r_sum / max(n_r, 1.0)), "reward_std": torch.tensor(math.sqrt(var)),
            "response_length_mean": torch.tensor(len_sum / max(n_len, 1.0)), "response_length_max": longest.float(),
            "groups_kept": torch.tensor(n_kept), "groups": torch.tensor(n_groups),
            "rollout_tokens_per_s": torch.tensor(tok_s),  # summed over the ranks
        }
        if n_kept > 0:  # every rank trains (possibly on no local group: FSDP passes are collective)
            metrics.update(self.update(SampleBatch.from_outputs(kept, adv[keep]), timer=timer))
        self.step += 1
        return metrics

    def update(self, batch: SampleBatch, *, timer: StageTimer) -> dict:
        """`train_on` with the engine asleep (the updates get the device memory it held), then its wake, which
        is where an engine holding its own weights loads the step's last sync (`weight_sync_gbps` then)."""
        syncs = self.engine.syncs
        self.engine.sleep()
        try:
            metrics = self.train_on(batch, timer=timer)
        finally:
            with timer("weight_sync"):
                self.engine.wake()
        if self.engine.syncs != syncs:
            metrics["weight_sync_gbps"] = torch.tensor(self.engine.last_sync["gbps"])
        return metrics

    def train_on(self, batch: SampleBatch, *, timer: StageTimer) -> dict:
        """PPO epochs x mini-batches of clipped-GRPO updates on one rollout batch (this rank's groups; every
        rank calls it, with an empty batch when it has none)."""
        cfg, model = self.cfg, self.policy.model
        n_cfg = cfg.mini_batches
        slot = _group_slots(batch.prompt_of)  # sample i is the slot[i]-th of its group
        minis = [[i for i in range(len(batch)) if slot[i] % n_cfg == k] for k in range(n_cfg)]
        budget = cfg.micro_batch_tokens
        lengths = batch.lengths()
        lp_parts = pack_micro_batches(lengths, budget)
        mini_parts = [pack_micro_batches([lengths[i] for i in mini], budget) for mini in minis]
        # The plan, global over the ranks: per mini-batch its samples and tokens (SUM), and per pass the most
        # micro-batches any rank runs (MAX). One host sync: the plan decides the loops.
        counts = dist.all_reduce(torch.tensor([len(m) for m in minis] + [batch.response_tokens(m) for m in minis],
                                              dtype=torch.float64)).tolist()
        passes = dist.all_reduce(torch.tensor([len(lp_parts)] + [len(p) for p in mini_parts])).tolist()
        live = [k for k in range(n_cfg) if counts[k] > 0]  # fewer mini-batches when groups are smaller than n_cfg
        off_policy = len(live) > 1 or cfg.epochs > 1
        R = batch.max_response
        agg_norm = cfg.agg_norm or float(cfg.max_response_tokens)
        with timer("logprob"):
            if off_policy:
                batch.old_logprobs = self._logprobs(model, batch, R, lp_parts, passes[0])
            if self.reference is not None:
                batch.ref_logprobs = self._logprobs(self.reference, batch, R, lp_parts, passes[0])
        sums: dict[str, torch.Tensor] = {}
        updates = 0
        model.train()
        with timer("train"):
            for epoch in range(cfg.epochs):
                for k in live:
                    divisor = counts[k] if cfg.loss_agg != "token-mean" else max(counts[n_cfg + k], 1.0)
                    mb_metrics = self._update(batch, minis[k], R, agg_norm, first=(epoch == 0 and k == live[0]),
                                              plan=(divisor, counts[n_cfg + k], int(passes[1 + k])))
                    for key, v in mb_metrics.items():
                        sums[key] = sums.get(key, 0) + v
                    updates += 1
        out = {k: v / updates for k, v in sums.items() if k not in ("logprob_diff", "tokens", "skipped")}
        out["tokens"] = sums["tokens"]  # response tokens trained on, summed over updates
        out["skipped_updates"] = sums["skipped"]
        out["logprob_diff"] = sums["logprob_diff"]
        out["kl"] = out.pop("kl_mean")
        return out

    @torch.no_grad()
    def _logprobs(self, model, batch: SampleBatch, R: int, parts: list[list[int]] | None = None,
                  n_passes: int = 0) -> torch.Tensor:
        """[B, R] response log-probs of every sample under `model` (the policy or the reference); `parts` are
        the micro-batches, padded with dummy forwards to `n_passes` (the ranks' maximum)."""
        out = torch.zeros(len(batch), R, dtype=torch.float32, device=self.policy.device)
        was_training = model.training
        model.eval()
        parts = pack_micro_batches(batch.lengths(), self.cfg.micro_batch_tokens) if parts is None else parts
        for idx in parts:
            mb = collate(batch, idx, self.policy, R)
            out[mb.rows] = token_logprobs(model, _lm_head_weight(model), mb, self.cfg.temperature)
        for _ in range(len(parts), n_passes):
            response_hidden(model, self._dummy_micro_batch())
        model.train(was_training)
        dist.reshard(model)  # free the gathered root group (a no-grad pass has no backward to do it)
        return out

    def _update(self, batch: SampleBatch, mini: list[int], R: int, agg_norm: float, first: bool,
                plan: tuple[float, float, int] | None = None) -> dict:
        """One optimizer step on the mini-batch `mini` (gradients accumulated over micro-batches); `plan` =
        the global (loss divisor, tokens, micro-batch passes) of the mini-batch (train_on)."""
        divisor, tokens, n_micro = plan if plan is not None else (None, None, 0)
        totals = self.accumulate(batch, mini, R, agg_norm, first, divisor=divisor, total_tokens=tokens,
                                 n_micro=n_micro)
        keys = sorted(totals)
        totals = dict(zip(keys, dist.all_reduce(torch.stack([totals[k] for k in keys])).unbind(0), strict=True))
        model = self.policy.model
        dist.reshard(model)
        grad_norm = dist.clip_grad_norm_(self.optimizer.params, max_norm=self.cfg.grad_clip or math.inf)  # global under FSDP
        # One host sync per optimizer step: a non-finite loss or gradient must never reach the weights (the
        # loss and the norm are global, so every rank takes the same branch).
        if bool(torch.isfinite(grad_norm) & torch.isfinite(totals["loss"])):
            self.optimizer.step()
            self.engine.sync_weights(self.policy)  # the next rollout samples from the updated weights
            totals["skipped"] = torch.zeros((), device=self.policy.device)
        else:
            log.warning("%s step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped",
                        self.name, self.step, totals["loss"].item(), grad_norm.item())
            self.skipped_steps += 1
            totals["skipped"] = torch.ones((), device=self.policy.device)
        self.optimizer.zero_grad()
        totals["grad_norm"] = grad_norm.detach()
        return totals

    def accumulate(self, batch: SampleBatch, mini: list[int], R: int, agg_norm: float,
                   first: bool = False, *, divisor: float | None = None, total_tokens: float | None = None,
                   n_micro: int = 0) -> dict:
        """Backward over the micro-batches of `mini`; the gradients sum to the whole mini-batch's.

        Data-parallel: `divisor` (the loss's) and `total_tokens` are the mini-batch's counts over all ranks, and
        `n_micro` the most micro-batches a rank runs (this one pads with zero-weight passes). The returned
        values are this rank's shares: summed over the ranks they are the mini-batch's metrics."""
        cfg, policy = self.cfg, self.policy
        seq_agg = cfg.loss_agg != "token-mean"
        if divisor is None:
            divisor = float(len(mini)) if seq_agg else float(max(batch.response_tokens(mini), 1))
        denom = max(batch.response_tokens(mini) if total_tokens is None else total_tokens, 1)
        self.optimizer.zero_grad()
        dev = policy.device
        totals: dict[str, torch.Tensor] = {k: torch.zeros((), device=dev) for k in
                                           ("loss", "entropy", "tokens", "logprob_abs_diff", *LOSS_METRICS)}
        all_lengths = batch.lengths()
        parts = pack_micro_batches([all_lengths[i] for i in mini], cfg.micro_batch_tokens)
        for part in parts:
            idx = [mini[j] for j in part]
            mb = collate(batch, idx, policy, R)
            logp, ent = token_logprobs(policy, policy.lm_head_weight, mb, cfg.temperature, return_entropy=True)
            old = batch.old_logprobs[mb.rows] if batch.old_logprobs is not None else None
            ref = batch.ref_logprobs[mb.rows] if batch.ref_logprobs is not None else None
            if batch.token_advantages is not None:
                adv = batch.token_advantages(logp.detach(), mb.rows, mb.mask)  # [b, R]
            else:
                adv = batch.advantages.to(dev)[mb.rows]  # [b] or [b, R]
            loss, m = grpo_loss(logp, adv, mb.mask, old_logprobs=old,
                                ref_logprobs=ref, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                clip_c=cfg.clip_c or None, kl_coef=cfg.kl_coef if ref is not None else 0.0,
                                kl_type=cfg.kl_type, loss_agg=cfg.loss_agg, agg_norm=agg_norm,
                                agg_divisor=divisor)
            loss.backward()
            # The kernel's metrics are means over this micro-batch's tokens: weight them by token share.
            tokens = mb.mask.sum()
            share = tokens / denom
            for k, v in m.items():
                totals[k] = totals[k] + v.detach() * share
            totals["loss"] += loss.detach()
            totals["entropy"] += (ent.detach() * mb.mask).sum() / denom
            totals["tokens"] += tokens.float()
            if first:
                sampled = torch.nn.utils.rnn.pad_sequence(
                    [batch.sample_logprobs[i] for i in idx], batch_first=True).to(dev)  # [b, r<=R]
                diff = (logp.detach()[:, : sampled.shape[1]] - sampled).abs() * mb.mask[:, : sampled.shape[1]]
                totals["logprob_abs_diff"] += diff.sum()
        for _ in range(len(parts), n_micro):  # as many FSDP passes as the busiest rank, contributing nothing
            mb = self._dummy_micro_batch()
            (token_logprobs(policy, policy.lm_head_weight, mb, cfg.temperature).sum() * 0.0).backward()
        if first:
            totals["logprob_diff"] = totals["logprob_abs_diff"] / denom
        del totals["logprob_abs_diff"]
        return totals

    def _dummy_micro_batch(self) -> MicroBatch:
        """One tiny sample (a grey 56x56 image and one response token) for the zero-weight passes a rank runs
        to match the other ranks' FSDP collectives; it goes through the vision tower like real samples."""
        if self._dummy is None:
            from PIL import Image

            from vzero_fast.model import encode_prompts

            enc = encode_prompts(self.policy, [Image.new("RGB", (56, 56), (128, 128, 128))], ["."])
            ids = enc["input_ids"][0].cpu()
            batch = SampleBatch(prompt_ids=[ids], response_ids=[torch.tensor([self.policy.eos_token_id])],
                                prompt_of=[0], pixel_values=[enc["pixel_values"].cpu()],
                                image_grid_thw=[enc["image_grid_thw"].cpu()], advantages=torch.zeros(1),
                                sample_logprobs=[torch.zeros(1)])
            self._dummy = collate(batch, [0], self.policy, 1)
        return self._dummy


def _group_slots(prompt_of: Sequence[int]) -> list[int]:
    """Sample i -> its index within its group (the samples of a prompt in batch order)."""
    seen: dict[int, int] = {}
    slots = []
    for g in prompt_of:
        slots.append(seen.get(g, 0))
        seen[g] = slots[-1] + 1
    return slots


def _model_of(model_or_policy) -> torch.nn.Module:
    return model_or_policy.model if isinstance(model_or_policy, Policy) else model_or_policy


def _lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight
