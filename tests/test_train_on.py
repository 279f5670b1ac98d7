"""Role.train_on / Role.accumulate against an independent reference (tiny model, CPU, fp32).

The reference never touches grpo.collate: each sample runs alone through transformers' own forward (prompt +
response, no padding), and the log-prob of response token t is read at position p - 1 + t, with p the length of
that sample's own prompt. The aggregation weights are written from ALGORITHMS.md section 0:
token-mean 1 / (tokens of the mini-batch), seq-mean-token-mean 1 / (own tokens x sequences),
seq-mean-token-sum-norm 1 / (agg_norm x sequences).

- On-policy (one epoch, ratio 1) the loss VALUE is -sum_i A_i r_i w_i: lengths and advantages only, so a wrong
  divisor shows in the loss (measured for a swapped divisor: 8x), and the gradient norm catches a wrong gather.
- Dual clip, clip-low/high and a k3 KL all active (each asserted by its fraction): the gradient of every
  parameter and the dual-clip fraction against the reference.

Run: `OMP_NUM_THREADS=1 pytest tests/test_train_on.py` (~20 s; with torch's 2 threads on 2 busy shared cores, 100 s).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vzero_fast.config import PolicyConfig
from vzero_fast.grpo import Role, SampleBatch, pack_micro_batches
from vzero_fast.metrics import StageTimer
from vzero_fast.model import load_policy
from vzero_fast.rollout import NativeEngine, Request, SamplingParams

pytest_plugins = ["_tiny_fixture"]

MAX_RESPONSE = 8  # cfg.max_response_tokens: the divisor of seq-mean-token-sum-norm (agg_norm 0)
LENGTHS = [6, 2, 5, 1, 4, 6, 3, 6, 2]  # ragged responses (prefixes of the samples): 3 groups x 3
BUDGET = 60  # micro-batch token budget: several micro-batches per mini-batch


@pytest.fixture(scope="module")
def batch(tiny_policy) -> SampleBatch:
    """3 prompts (two image sizes: different prompt lengths) x 3 samples, cut to LENGTHS, random advantages."""
    from vzero_fast.data import synthetic_figure

    reqs = [Request.from_image_text(synthetic_figure(i, size=56 + 28 * (i % 2)), "Describe the figure.",
                                    SamplingParams(n=3, max_new_tokens=6, temperature=1.0, seed=i))
            for i in range(3)]
    outputs = NativeEngine(tiny_policy).generate(reqs)
    g = torch.Generator().manual_seed(0)
    out = SampleBatch.from_outputs(outputs, torch.randn(3, 3, generator=g))
    assert all(len(r) == 6 for r in out.response_ids), "the tiny model stopped early: pick other seeds"
    out.response_ids = [r[:k] for r, k in zip(out.response_ids, LENGTHS, strict=True)]
    out.sample_logprobs = [s[:k] for s, k in zip(out.sample_logprobs, LENGTHS, strict=True)]
    assert len({len(p) for p in out.prompt_ids}) == 2  # padding and per-sample offsets are exercised
    return out


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    policy.model.train()
    return policy


def _fresh(batch: SampleBatch) -> SampleBatch:
    return dataclasses.replace(batch, old_logprobs=None, ref_logprobs=None)


def _hf_logprobs(policy, batch: SampleBatch, i: int) -> torch.Tensor:
    """[r_i] float64 log-probs of sample i's response tokens: the sample alone through transformers' forward,
    token t read at position p - 1 + t of the logits (p = this sample's prompt length)."""
    prompt, response = batch.prompt_ids[i], batch.response_ids[i]
    p, r = len(prompt), len(response)
    ids = torch.cat([prompt, response])[None]  # [1, p + r]
    g = batch.prompt_of[i]
    logits = policy.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                          pixel_values=batch.pixel_values[g], image_grid_thw=batch.image_grid_thw[g],
                          mm_token_type_ids=(ids == policy.model.config.image_token_id).long()).logits[0]  # [p+r, V]
    logp = torch.log_softmax(logits[p - 1: p - 1 + r].double(), dim=-1)  # [r, V]
    return logp.gather(1, response[:, None]).squeeze(1)


def _weights(lengths: list[int], loss_agg: str) -> list[float]:
    """Per-token weight of each sequence of one mini-batch (ALGORITHMS.md section 0)."""
    if loss_agg == "token-mean":
        return [1.0 / sum(lengths)] * len(lengths)
    if loss_agg == "seq-mean-token-mean":
        return [1.0 / (r * len(lengths)) for r in lengths]
    return [1.0 / (MAX_RESPONSE * len(lengths))] * len(lengths)


def _grad_norm(model) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))


@pytest.mark.parametrize("mini_batches", [1, 2])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_train_on_loss_and_gradient_norm(tiny_model_dir, batch, reference_model, loss_agg, mini_batches):
    """train_on's reported loss and gradient norm (mean over its updates) equal the reference, with several
    micro-batches per mini-batch. lr 1e-30: the first update leaves the weights as they were (to fp32), so
    the second mini-batch's reference is computed at the same weights."""
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    cfg = PolicyConfig(loss_agg=loss_agg, mini_batches=mini_batches, kl_coef=0.0, lr=1e-30, grad_clip=0.0,
                       max_response_tokens=MAX_RESPONSE, micro_batch_tokens=BUDGET)
    role = Role(name="policy", policy=policy, cfg=cfg, engine=NativeEngine(policy))
    out = role.train_on(_fresh(batch), timer=StageTimer())

    # Mini-batch k: sample j of every group with j % mini_batches == k (grpo.py's rule, written out here).
    minis = [[g * 3 + j for g in range(3) for j in range(3) if j % mini_batches == k] for k in range(mini_batches)]
    losses, norms = [], []
    for mini in minis:
        lengths = [LENGTHS[i] for i in mini]
        assert len(pack_micro_batches([len(batch.prompt_ids[i]) + LENGTHS[i] for i in mini], BUDGET)) > 1
        w = _weights(lengths, loss_agg)
        adv = [float(batch.advantages[i]) for i in mini]
        # Ratio 1 on-policy: each token contributes -A (value) and -A d log p (gradient).
        losses.append(sum(-a * r * wi for a, r, wi in zip(adv, lengths, w, strict=True)))
        reference_model.model.zero_grad(set_to_none=True)
        loss = sum(-a * wi * _hf_logprobs(reference_model, batch, i).sum() for i, a, wi in zip(mini, adv, w, strict=True))
        loss.backward()
        norms.append(_grad_norm(reference_model.model))
    assert float(out["loss"]) == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-7)
    assert float(out["grad_norm"]) == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    assert float(out["tokens"]) == sum(LENGTHS)
    assert float(out["skipped_updates"]) == 0


def test_accumulate_dual_clip_kl_gradients(tiny_model_dir, batch, reference_model):
    """Off-policy old log-probs far enough from the current ones that the dual clip (c = 3), both clip sides
    and the k3 KL are all active; every parameter's gradient and the clip fractions against the reference."""
    c, eps, beta = 3.0, 0.2, 0.05
    work = _fresh(batch)
    R = work.max_response
    g = torch.Generator().manual_seed(7)
    work.old_logprobs = torch.zeros(len(work), R)
    work.ref_logprobs = torch.zeros(len(work), R)
    for i, s in enumerate(work.sample_logprobs):
        work.old_logprobs[i, : len(s)] = s + 1.2 * torch.randn(len(s), generator=g)  # ratios e^(+-2.4) at 2 sigma
        work.ref_logprobs[i, : len(s)] = s + 0.3 * torch.randn(len(s), generator=g)
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    policy.model.train()
    cfg = PolicyConfig(clip_c=c, clip_low=eps, clip_high=eps, kl_coef=beta, kl_type="k3", mini_batches=1,
                       max_response_tokens=MAX_RESPONSE, micro_batch_tokens=BUDGET)
    role = Role(name="policy", policy=policy, cfg=cfg, engine=NativeEngine(policy))
    totals = role.accumulate(work, list(range(len(work))), R, float(MAX_RESPONSE))

    # The reference: ALGORITHMS.md section 0 per token, token-mean over the whole batch.
    reference_model.model.zero_grad(set_to_none=True)
    n_tokens = sum(LENGTHS)
    loss = torch.zeros((), dtype=torch.float64)
    dual = low = high = 0
    for i in range(len(work)):
        lp = _hf_logprobs(reference_model, work, i)  # [r]
        r = len(lp)
        old, ref = work.old_logprobs[i, :r].double(), work.ref_logprobs[i, :r].double()
        a = float(work.advantages[i])
        ratio = torch.exp(lp - old)
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
        if a < 0:
            dual += int((pg > -c * a).sum())
            pg = torch.minimum(pg, torch.full_like(pg, -c * a))
            low += int((ratio.detach() < 1 - eps).sum())
        else:
            high += int((ratio.detach() > 1 + eps).sum())
        x = ref - lp
        loss = loss + (pg + beta * (torch.exp(x) - x - 1)).sum() / n_tokens
    loss.backward()
    assert dual / n_tokens > 0.05 and low > 0 and high > 0, (dual, low, high)  # every branch is exercised
    assert float(totals["clip_frac_dual"]) == pytest.approx(dual / n_tokens, abs=1e-6)
    assert float(totals["clip_frac_low"]) == pytest.approx(low / n_tokens, abs=1e-6)
    assert float(totals["clip_frac_high"]) == pytest.approx(high / n_tokens, abs=1e-6)
    assert float(totals["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    want = {n: p.grad for n, p in reference_model.model.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in policy.model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=1e-4, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["per-token", "current-logp"])
def test_per_token_advantages_gradients(tiny_model_dir, batch, reference_model, mode):
    """Advantages per token: a [B, R] tensor in the batch, or (V-Zero-OPD) a function of the CURRENT log-probs
    that each micro-batch calls (`token_advantages`; the sampler's log-probs are shifted by 1 so that reading
    them instead shows). On-policy token-mean: the loss is -sum_t A_t / tokens and the gradient
    -sum_t A_t d log p_t / tokens, against the reference's own forward (A_t from its log-probs)."""
    work = _fresh(batch)
    R = work.max_response
    g = torch.Generator().manual_seed(11)
    n_tokens = sum(LENGTHS)
    if mode == "per-token":
        work.advantages = torch.randn(len(work), R, generator=g)  # [B, R]; masked tail included, never read
    else:
        teacher = torch.randn(len(work), R, generator=g) * 8.0 - 6.0  # far enough that some gaps clamp at +-4
        w = torch.rand(len(work), generator=g) * 2.0
        seen = []

        def token_advantages(logp, rows, mask):
            seen.append(int(mask.sum()))
            d = (logp - teacher[rows]).clamp(-4.0, 4.0)
            return torch.where(mask, -w[rows, None] * d, 0.0)

        work.token_advantages = token_advantages
        # The sampler's log-probs as after an update (the policy moved since it sampled): d must not read them.
        work.sample_logprobs = [s + 1.0 for s in work.sample_logprobs]
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    policy.model.train()
    cfg = PolicyConfig(mini_batches=1, kl_coef=0.0, max_response_tokens=MAX_RESPONSE, micro_batch_tokens=BUDGET)
    role = Role(name="policy", policy=policy, cfg=cfg, engine=NativeEngine(policy))
    totals = role.accumulate(work, list(range(len(work))), R, float(MAX_RESPONSE))

    reference_model.model.zero_grad(set_to_none=True)
    loss = torch.zeros((), dtype=torch.float64)
    clamped = 0
    for i in range(len(work)):
        lp = _hf_logprobs(reference_model, work, i)  # [r] float64
        r = len(lp)
        if mode == "per-token":
            a = work.advantages[i, :r].double()
        else:
            gap = lp.detach() - teacher[i, :r].double()
            clamped += int((gap.abs() > 4.0).sum())
            a = -float(w[i]) * gap.clamp(-4.0, 4.0)
        loss = loss + (-a * torch.exp(lp - lp.detach())).sum() / n_tokens
    loss.backward()
    if mode == "current-logp":
        assert sum(seen) == n_tokens and len(seen) > 1  # called once per micro-batch, on every token
        assert 0 < clamped < n_tokens
    assert float(totals["loss"]) == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    want = {n: p.grad for n, p in reference_model.model.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in policy.model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name in want:  # norm-wise: advantages up to 8 scale the gradients and fp32's absolute rounding with them
        err = (got[name].double() - want[name].double()).abs().max().item()
        assert err <= 1e-4 * want[name].abs().max().item() + 1e-7, (name, err)
