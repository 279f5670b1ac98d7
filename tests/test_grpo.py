"""GRPO engine: advantages, filters and micro-batching against direct formulas; gradient accumulation
equals one large batch computed through transformers' own logits; non-finite updates are skipped."""

import math

import pytest
import torch

from vzero_fast.config import PolicyConfig
from vzero_fast.grpo import Role, SampleBatch, group_advantages, keep_groups, pack_micro_batches
from vzero_fast.kernels import grpo_loss_reference
from vzero_fast.model import load_policy
from vzero_fast.rollout import NativeEngine, Request, SamplingParams

pytest_plugins = ["_tiny_fixture"]


def _adv_direct(rows, kind):
    out = []
    for r in rows:
        n = len(r)
        mean = sum(r) / n
        if kind == "drgrpo":
            out.append([x - mean for x in r])
            continue
        std = 1.0 if n == 1 else math.sqrt(sum((x - mean) ** 2 for x in r) / (n - 1))
        out.append([(x - mean) / (std + 1e-6) for x in r])
    return out


@pytest.mark.parametrize("kind", ["grpo", "drgrpo"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 1), (1, 10)])
def test_group_advantages_match_formula(kind, shape):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, shape, generator=g).float() + torch.rand(shape, generator=g) * (shape[0] > 2)
    got = group_advantages(rewards, kind=kind)
    want = torch.tensor(_adv_direct(rewards.double().tolist(), kind), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_zero_variance_groups_get_zero_advantage():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    adv = group_advantages(rewards)
    assert torch.equal(adv[0], torch.zeros(3))
    assert adv[1, 1] > 0 > adv[1, 0]


def test_keep_groups_filters():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.0]])
    assert keep_groups(rewards).tolist() == [True] * 4
    assert keep_groups(rewards, drop_zero_variance=True).tolist() == [False, True, False, True]
    share = torch.tensor([0.2, 0.3, 0.8, 0.9])
    assert keep_groups(rewards, share=share, band=(0.3, 0.8)).tolist() == [False, True, True, False]
    assert keep_groups(rewards, drop_zero_variance=True, share=share, band=(0.3, 0.8)).tolist() == [
        False, True, False, False]
    with pytest.raises(ValueError):
        keep_groups(rewards, band=(0.3, 0.8))


@pytest.mark.parametrize("budget", [1, 10, 40, 1000])
def test_pack_micro_batches(budget):
    g = torch.Generator().manual_seed(budget)
    lengths = torch.randint(1, 30, (23,), generator=g).tolist()
    batches = pack_micro_batches(lengths, budget)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))  # every sample exactly once
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= budget or len(b) == 1
    if budget >= 30 * 23:
        assert len(batches) == 1


# ------------------------------------------------------------------------------------- model-level tests

def _rollouts(policy, n_prompts=3, n=3, max_new=6, seed=0):
    from vzero_fast.data import synthetic_figure

    engine = NativeEngine(policy)
    reqs = [Request.from_image_text(synthetic_figure(seed + i, size=56 + 28 * (i % 2)), "Describe the figure.",
                                    SamplingParams(n=n, max_new_tokens=max_new, temperature=1.0, seed=seed + i))
            for i in range(n_prompts)]
    return engine.generate(reqs)


def _batch(outputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(len(outputs), len(outputs[0].samples), generator=g)
    return SampleBatch.from_outputs(outputs, adv)


def _role(policy, **cfg):
    return Role(name="policy", policy=policy, cfg=PolicyConfig(**cfg), engine=NativeEngine(policy))


def _reference_grads(model_dir, batch, cfg, R, old=None, ref=None):
    """The whole batch at once through transformers' own logits -> float64 log_softmax -> reference loss."""
    policy = load_policy(model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    policy.model.train()
    role = _role(policy, **cfg)
    from vzero_fast.grpo import collate

    mb = collate(batch, list(range(len(batch))), policy, R)
    logits = policy.model(**mb.inputs).logits.double() / role.cfg.temperature  # [B, T, V]
    logp_all = torch.log_softmax(logits, -1)
    pos = mb.gather_index  # hidden p-1 predicts token p
    logp = logp_all.gather(1, pos.unsqueeze(-1).expand(-1, -1, logp_all.shape[-1])).gather(
        2, mb.targets.unsqueeze(-1)).squeeze(-1)
    loss, _ = grpo_loss_reference(logp, batch.advantages.double(), mb.mask, old_logprobs=old, ref_logprobs=ref,
                                  clip_low=role.cfg.clip_low, clip_high=role.cfg.clip_high,
                                  clip_c=role.cfg.clip_c or None, kl_coef=role.cfg.kl_coef if ref is not None else 0.0,
                                  kl_type=role.cfg.kl_type, loss_agg=role.cfg.loss_agg,
                                  agg_norm=role.cfg.agg_norm or float(role.cfg.max_response_tokens))
    loss.backward()
    return {n: p.grad.double() for n, p in policy.model.named_parameters() if p.grad is not None}, loss


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batched_gradients_equal_one_large_batch(tiny_model_dir, tiny_policy, loss_agg):
    outputs = _rollouts(tiny_policy)
    batch = _batch(outputs)
    R = batch.max_response
    cfg = dict(loss_agg=loss_agg, kl_coef=0.0, max_response_tokens=8, micro_batch_tokens=40)
    want, want_loss = _reference_grads(tiny_model_dir, batch, cfg, R)

    for budget in (40, 10_000):  # several micro-batches, then one
        policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
        policy.model.train()
        role = _role(policy, **{**cfg, "micro_batch_tokens": budget})
        n_micro = len(pack_micro_batches(batch.lengths(), budget))
        assert (n_micro > 1) == (budget == 40)
        totals = role.accumulate(batch, list(range(len(batch))), R, agg_norm=8.0)
        torch.testing.assert_close(totals["loss"].double(), want_loss.detach(), rtol=1e-5, atol=1e-6)
        got = {n: p.grad for n, p in policy.model.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_off_policy_and_kl_gradients_match_reference(tiny_model_dir, tiny_policy):
    """Two mini-batches -> recomputed old log-probs; kl > 0 -> a frozen reference; dual clip on (and active:
    its fraction is asserted). tests/test_train_on.py checks the same against an independent gather."""
    outputs = _rollouts(tiny_policy, seed=5)
    batch = _batch(outputs, seed=1)
    R = batch.max_response
    g = torch.Generator().manual_seed(3)
    batch.old_logprobs = torch.zeros(len(batch), R)
    for i, s in enumerate(batch.sample_logprobs):  # perturbed so that ratios leave the clip range, past c = 3 too
        batch.old_logprobs[i, : len(s)] = s + 1.2 * torch.randn(len(s), generator=g)
    batch.ref_logprobs = batch.old_logprobs - 0.1
    cfg = dict(kl_coef=0.05, kl_type="k3", clip_c=3.0, max_response_tokens=8, micro_batch_tokens=40)
    want, _ = _reference_grads(tiny_model_dir, batch, cfg, R, old=batch.old_logprobs.double(),
                               ref=batch.ref_logprobs.double())
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    policy.model.train()
    role = _role(policy, **cfg)
    totals = role.accumulate(batch, list(range(len(batch))), R, agg_norm=8.0)
    assert totals["clip_frac_dual"] > 0.02, totals["clip_frac_dual"]
    for name, p in policy.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad.double(), want[name], rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_grpo_step_updates_and_reports(tiny_model_dir):
    from vzero_fast.metrics import StageTimer, to_host

    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    role = _role(policy, lr=1e-3, max_response_tokens=6, mini_batches=2, kl_coef=0.01)
    role.freeze_reference()
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    from vzero_fast.data import synthetic_figure

    reqs = [Request.from_image_text(synthetic_figure(i, size=56), "Describe the figure.",
                                    SamplingParams(n=4, max_new_tokens=6, seed=i)) for i in range(2)]
    # Sample j of each group earns j % 2: every group has reward variance, so the update must happen.
    reward = lambda outs: torch.tensor([[float(j % 2) for j in range(len(o.samples))] for o in outs])  # noqa: E731
    timer = StageTimer()
    m = to_host(role.grpo_step(reqs, reward, timer=timer))
    for key in ("reward_mean", "reward_std", "loss", "kl", "clip_frac_low", "clip_frac_high", "entropy",
                "response_length_mean", "response_length_max", "tokens", "rollout_tokens_per_s", "logprob_diff"):
        assert key in m and math.isfinite(m[key]), key
    # The sampler and the training forward agree on the sampled tokens (fp32 CPU).
    assert m["logprob_diff"] < 1e-4
    assert {"time_rollout", "time_reward", "time_logprob", "time_train"} <= set(timer.pop())
    assert m["reward_mean"] == pytest.approx(0.5) and m["reward_std"] == pytest.approx(math.sqrt(2 / 7))
    assert m["groups_kept"] == m["groups"] == 2 and m["skipped_updates"] == 0
    assert m["tokens"] == pytest.approx(8 * m["response_length_mean"])  # every response token, once per epoch
    changed = [n for n, p in policy.model.named_parameters() if not torch.equal(before[n], p)]
    assert changed and role.step == 1
    # One AdamW step per mini-batch.
    assert {float(s["step"]) for s in role.optimizer.optimizer.state.values()} == {2.0}


def test_drop_zero_variance_trains_only_groups_with_signal(tiny_model_dir):
    from vzero_fast.data import synthetic_figure
    from vzero_fast.metrics import StageTimer, to_host

    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    role = _role(policy, lr=1e-3, max_response_tokens=6, mini_batches=1, kl_coef=0.0, drop_zero_variance=True)
    reqs = [Request.from_image_text(synthetic_figure(i, size=56), "Describe the figure.",
                                    SamplingParams(n=4, max_new_tokens=6, seed=i)) for i in range(2)]
    lengths = []

    def reward(outs):  # group 0: all equal (no signal); group 1: two different rewards
        lengths.extend(len(s.token_ids) for s in outs[1].samples)
        return torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])

    m = to_host(role.grpo_step(reqs, reward, timer=StageTimer()))
    assert m["groups"] == 2 and m["groups_kept"] == 1
    assert m["tokens"] == sum(lengths)  # group 1's tokens only


def test_non_finite_update_is_skipped(tiny_model_dir, tiny_policy):
    outputs = _rollouts(tiny_policy, n_prompts=2)
    batch = _batch(outputs)
    batch.advantages[0] = float("nan")
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    role = _role(policy, lr=1e-2, kl_coef=0.0, max_response_tokens=8, mini_batches=1)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    from vzero_fast.metrics import StageTimer

    out = role.train_on(batch, timer=StageTimer())
    assert out["skipped_updates"].item() == 1 and role.skipped_steps == 1
    for n, p in policy.model.named_parameters():
        assert torch.equal(before[n], p), n


def test_optimizer_offload_round_trip(tiny_model_dir, tiny_policy):
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    role = _role(policy, lr=1e-3, kl_coef=0.0, max_response_tokens=8)
    from vzero_fast.metrics import StageTimer

    role.train_on(_batch(_rollouts(tiny_policy, n_prompts=2)), timer=StageTimer())
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in role.optimizer.optimizer.state.items()}
    role.offload_optimizer()
    assert all(v.device.type == "cpu" for s in role.optimizer.optimizer.state.values() for v in s.values())
    role.onload_optimizer()
    for k, s in role.optimizer.optimizer.state.items():
        for n, v in s.items():
            assert torch.equal(v, state[k][n])
