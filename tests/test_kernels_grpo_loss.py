"""grpo_loss and fused_grpo_loss vs the literal float64 reference (one sequence at a time): loss, metrics
and the gradient under a random upstream gradient, on both paths (Triton in the interpreter on CPU), for
every loss_agg x kl_type x clip setting (incl. dual clip), ragged masks with an all-masked row, garbage
in masked positions, extreme log-ratios, and the global divisor of gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from tolerances import METRIC_ATOL, assert_fp32_close

from vzero_fast.kernels import (
    force_backend,
    fused_grpo_loss,
    fused_grpo_loss_reference,
    fused_linear_logprob_reference,
    grpo_loss,
    grpo_loss_reference,
)
from vzero_fast.kernels.grpo_loss import KL_TYPES, LOSS_AGGS, METRICS

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU = the interpreter (tests/conftest.py)
BACKENDS = ["triton", "torch"]
CLIPS = {"symmetric": {"clip_low": 0.2, "clip_high": 0.2},
         "clip-higher": {"clip_low": 0.2, "clip_high": 0.28},
         "dual-clip": {"clip_low": 0.2, "clip_high": 0.2, "clip_c": 3.0}}
LENGTHS = [37, 20, 0, 5]  # ragged, one all-masked row; T = 37 is no power of two
PLANTED_ERROR = 1e-4  # relative gradient error that the fp32 bound must reject


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _batch(seed=0, lengths=LENGTHS, adv_2d=False, spread=0.3):
    """logp, old, ref [B, T] (log-ratios of std `spread`, many outside the clip range), advantages, mask
    with the given lengths. Values are fp32-rounded (held in float64): the float64 truth of what an fp32
    run sees, so that only the computation's error is measured."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    logp = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1.0
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(*((B, T) if adv_2d else (B,)), generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return (*(t.float().double() for t in (logp, old, ref, adv)), mask)


def _run(fn, logp, adv, mask, *, dtype, device="cpu", upstream=1.7, planted=False, **kw):
    """loss, metrics and d(upstream * loss)/d logp; tensors in `kw` are moved to dtype/device. `planted`:
    the gradient comes out 1e-4 relative too large (a bug the tolerance must catch)."""
    lp = logp.to(device, dtype, copy=True).requires_grad_()
    if planted:
        lp.register_hook(lambda g: g * (1 + PLANTED_ERROR))
    kw = {k: (v.to(device, dtype) if torch.is_tensor(v) else v) for k, v in kw.items()}
    loss, metrics = fn(lp, adv.to(device, dtype), mask.to(device), **kw)
    (loss * upstream).backward()
    return loss, metrics, lp.grad


def _compare(got, naive, ref, what):
    """`got` (ours in fp32) against float64 `ref`, no worse than `naive` (the reference run in fp32)."""
    loss, metrics, grad = got
    assert loss.dim() == 0
    assert_fp32_close(loss, naive[0], ref[0], f"{what} loss")
    assert_fp32_close(grad, naive[2], ref[2], f"{what} grad")
    assert set(metrics) >= set(METRICS)
    for k in METRICS:
        m = metrics[k]
        assert m.dim() == 0 and not m.requires_grad and m.device == loss.device, k
        if k.startswith("clip_frac"):  # a ratio of counts
            assert abs(m.item() - ref[1][k].item()) <= METRIC_ATOL, (what, k, m.item(), ref[1][k].item())
        else:  # a mean of fp32 values
            assert_fp32_close(m, naive[1][k], ref[1][k], f"{what} {k}")


def _check_fp32(backend, loss_agg, kl_type, clip, planted=False):
    # Per-token advantages of both signs and log-ratios of std 1: every branch (unclipped, low, high, dual).
    logp, old, ref, adv, mask = _batch(seed=len(loss_agg) + len(clip), adv_2d=True, spread=1.0)
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, kl_type=kl_type, loss_agg=loss_agg,
              agg_norm=50.0, **CLIPS[clip])
    expected = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float64, **kw)
    naive = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float32, device=_device(backend), **kw)
    with force_backend(backend):
        got = _run(grpo_loss, logp, adv, mask, dtype=torch.float32, device=_device(backend), planted=planted, **kw)
    assert expected[1]["clip_frac_low"] > 0 and expected[1]["clip_frac_high"] > 0  # clipping is exercised
    if "clip_c" in kw:
        assert expected[1]["clip_frac_dual"] > 0
    _compare(got, naive, expected, f"{backend} {loss_agg} {kl_type} {clip}")


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, loss_agg, kl_type, clip):
    _check_fp32(backend, loss_agg, kl_type, clip)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_bound_rejects_a_1e4_gradient_error(backend, loss_agg):
    """The fp32 bound has teeth: a gradient 1e-4 relative off (a hook scales it) fails it."""
    with pytest.raises(AssertionError, match=f"{backend} {loss_agg} k3 dual-clip grad: error"):
        _check_fp32(backend, loss_agg, "k3", "dual-clip", planted=True)


@pytest.mark.parametrize("adv_2d", [False, True])
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_and_advantage_shapes(backend, on_policy, adv_2d):
    """old=None: ratio 1 with the gradient of logp; advantages per sequence [B] or per token [B, T]."""
    logp, old, ref, adv, mask = _batch(seed=7, adv_2d=adv_2d, spread=2.0)
    kw = dict(old_logprobs=None if on_policy else old, ref_logprobs=ref, kl_coef=0.05, clip_c=3.0)
    expected = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float64, **kw)
    naive = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float32, device=_device(backend), **kw)
    with force_backend(backend):
        got = _run(grpo_loss, logp, adv, mask, dtype=torch.float32, device=_device(backend), **kw)
    if on_policy:
        assert got[1]["ratio_mean"].item() == 1.0 and got[1]["clip_frac_high"].item() == 0.0
    _compare(got, naive, expected, f"{backend} on_policy={on_policy} adv_2d={adv_2d}")


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_per_token_advantages_broadcast_parity(backend, loss_agg):
    """A [B] advantage and the same values materialised as a contiguous [B, T] tensor (V-Zero-OPD's per-token
    advantages) give the same loss, metrics and gradient, in every backend; the masked tail of the [B, T]
    copy holds garbage that must not matter. Then a [B, T] advantage that differs from its row's value at
    ONE token changes that token's gradient and no other: the kernel reads advantages per token."""
    logp, old, ref, adv, mask = _batch(seed=11, spread=1.0)
    B, T = mask.shape
    adv_bt = adv[:, None].expand(B, T).clone()  # [B, T] contiguous, stride (T, 1)
    adv_bt[~mask] = float("nan")
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, clip_c=3.0, loss_agg=loss_agg, agg_norm=40.0)
    fn = grpo_loss_reference if backend == "reference" else grpo_loss
    dtype = torch.float64 if backend == "reference" else torch.float32
    device = "cpu" if backend == "reference" else _device(backend)
    with force_backend(None if backend == "reference" else backend):
        per_seq = _run(fn, logp, adv, mask, dtype=dtype, device=device, **kw)
        per_tok = _run(fn, logp, torch.where(mask, adv_bt, 0.0) if backend == "reference" else adv_bt, mask,
                       dtype=dtype, device=device, **kw)
        bumped = adv_bt.clone()
        bumped[1, 3] += 2.0  # row 1 has 20 tokens: token 3 is valid
        one = _run(fn, logp, torch.where(mask, bumped, 0.0) if backend == "reference" else bumped, mask,
                   dtype=dtype, device=device, **kw)
    torch.testing.assert_close(per_tok[0], per_seq[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_tok[2], per_seq[2], rtol=1e-6, atol=1e-7)
    for k in METRICS:
        torch.testing.assert_close(per_tok[1][k].double(), per_seq[1][k].double(), rtol=1e-6, atol=1e-7)
    changed = (one[2] != per_seq[2]).nonzero().tolist()
    assert changed == [[1, 3]], changed


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_and_empty_batch(backend, loss_agg):
    """An all-masked row contributes nothing; an all-masked batch gives loss 0 and zero gradients."""
    logp, old, ref, adv, mask = _batch(seed=3, lengths=[0, 9, 0])
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, loss_agg=loss_agg)
    with force_backend(backend):
        loss, _, grad = _run(grpo_loss, logp, adv, mask, dtype=torch.float32, device=_device(backend), **kw)
        assert torch.isfinite(loss) and torch.all(grad[0] == 0) and torch.all(grad[2] == 0)
        assert grad[1].abs().sum() > 0
        loss, metrics, grad = _run(grpo_loss, logp, adv, torch.zeros_like(mask), dtype=torch.float32,
                                   device=_device(backend), **kw)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    assert all(v.item() == 0.0 for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_garbage_is_ignored(backend):
    """Padding may hold NaN / inf in any input: identical loss and gradient to zeros there."""
    logp, old, ref, adv, mask = _batch(seed=4, adv_2d=True)
    dirty = [x.clone() for x in (logp, old, ref, adv)]
    for x, bad in zip(dirty, (float("nan"), float("inf"), float("-inf"), float("nan")), strict=True):
        x[~mask] = bad
    kw = dict(kl_coef=0.1, clip_c=3.0, loss_agg="seq-mean-token-mean")
    with force_backend(backend):
        clean = _run(grpo_loss, logp, adv, mask, dtype=torch.float32, device=_device(backend),
                     old_logprobs=old, ref_logprobs=ref, **kw)
        noisy = _run(grpo_loss, dirty[0], dirty[3], mask, dtype=torch.float32, device=_device(backend),
                     old_logprobs=dirty[1], ref_logprobs=dirty[2], **kw)
    assert torch.equal(clean[0], noisy[0]) and torch.equal(clean[2], noisy[2])


@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_log_ratios(backend, kl_type):
    """|logp - old| and |logp - ref| up to ~60: the ratio's log is clamped to +-20, k3 to [-10, 10];
    everything stays finite and matches the reference."""
    logp, old, ref, adv, mask = _batch(seed=5, spread=30.0)
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.01, kl_type=kl_type)
    expected = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float64, **kw)
    naive = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float32, device=_device(backend), **kw)
    with force_backend(backend):
        got = _run(grpo_loss, logp, adv, mask, dtype=torch.float32, device=_device(backend), **kw)
    assert ((logp - old).abs()[mask] > 20).any()
    _compare(got, naive, expected, f"{backend} extreme {kl_type}")


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_agg_divisor_sums_micro_batches_to_the_batch(backend, loss_agg):
    """Gradient accumulation: micro-batch losses with the mini-batch's divisor sum to the mini-batch loss,
    and so do their gradients."""
    logp, old, ref, adv, mask = _batch(seed=6)
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, loss_agg=loss_agg, agg_norm=40.0)
    divisor = mask.sum() if loss_agg == "token-mean" else (mask.sum(1) > 0).sum()
    expected = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float64, **kw)
    naive = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float32, device=_device(backend), **kw)
    with force_backend(backend):
        parts = [_run(grpo_loss, logp[rows], adv[rows], mask[rows], dtype=torch.float32,
                      device=_device(backend), agg_divisor=divisor.to(_device(backend)),
                      **{**kw, "old_logprobs": old[rows], "ref_logprobs": ref[rows]})
                 for rows in (slice(0, 1), slice(1, 4))]
    assert_fp32_close(parts[0][0] + parts[1][0], naive[0], expected[0], "loss")
    assert_fp32_close(torch.cat([parts[0][2], parts[1][2]]), naive[2], expected[2], "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_off_when_coef_zero_or_no_ref(backend):
    logp, old, ref, adv, mask = _batch(seed=8)
    with force_backend(backend):
        base = _run(grpo_loss, logp, adv, mask, dtype=torch.float32, device=_device(backend), old_logprobs=old)
        zero = _run(grpo_loss, logp, adv, mask, dtype=torch.float32, device=_device(backend),
                    old_logprobs=old, ref_logprobs=ref, kl_coef=0.0)
        with_kl = _run(grpo_loss, logp, adv, mask, dtype=torch.float32, device=_device(backend),
                       old_logprobs=old, ref_logprobs=ref, kl_coef=0.5)
    assert torch.equal(base[0], zero[0]) and torch.equal(base[2], zero[2])
    assert base[1]["kl_mean"].item() == 0.0 and zero[1]["kl_mean"].item() > 0  # reported, not added
    assert with_kl[0].item() != base[0].item()


def test_argument_errors():
    logp, old, ref, adv, mask = _batch()
    for bad in ({"loss_agg": "mean"}, {"kl_type": "k4"}, {"clip_c": 0.5}, {"agg_norm": 0.0}):
        with pytest.raises(ValueError):
            grpo_loss(logp, adv, mask, **bad)
    with pytest.raises(ValueError):
        grpo_loss(logp, adv[:2], mask)
    with pytest.raises(ValueError):
        grpo_loss(logp, adv, mask, old_logprobs=old[:, :5])


# ------------------------------------------------------------------------------------- fused_grpo_loss

@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("backend,B,T,H,V", [("triton", 3, 7, 48, 131), ("torch", 2, 5, 48, 152064)])
def test_fused_grpo_loss_matches_reference(backend, B, T, H, V, return_entropy):
    g = torch.Generator().manual_seed(9)
    scale = (3.0 / H ** 0.5) ** 0.5
    # fp32-rounded values held in float64 (see _batch)
    hidden = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale).float().double()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * scale).float().double()
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor([T, T - 3, 0][:B])[:, None]
    targets[~mask] = -100  # padding ids outside the vocabulary must not matter
    logp0 = fused_linear_logprob_reference(hidden, weight, targets.clamp(min=0), temperature=0.8)
    old = (logp0 + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).float().double()
    ref = (logp0 + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).float().double()
    adv = torch.randn(B, generator=g, dtype=torch.float64).float().double()
    kw = dict(temperature=0.8, return_entropy=return_entropy, old_logprobs=old, ref_logprobs=ref,
              kl_coef=0.1, clip_c=3.0, loss_agg="seq-mean-token-mean")

    def run(fn, dtype, device):
        h = hidden.to(device, dtype, copy=True).requires_grad_()
        w = weight.to(device, dtype, copy=True).requires_grad_()
        kw_d = {k: (v.to(device, dtype) if torch.is_tensor(v) else v) for k, v in kw.items()}
        loss, metrics = fn(h, w, targets.to(device), mask.to(device), adv.to(device, dtype), **kw_d)
        (loss * 1.3).backward()
        return loss, metrics, h.grad, w.grad

    expected = run(fused_grpo_loss_reference, torch.float64, "cpu")
    naive = run(fused_grpo_loss_reference, torch.float32, _device(backend))
    with force_backend(backend):
        got = run(fused_grpo_loss, torch.float32, _device(backend))
    for i, name in ((0, "loss"), (2, "grad_hidden"), (3, "grad_weight")):
        assert_fp32_close(got[i], naive[i], expected[i], f"{backend} {name}")
    keys = METRICS + (("entropy",) if return_entropy else ())
    assert set(got[1]) == set(keys)
    for k in keys:
        if k.startswith("clip_frac"):
            assert abs(got[1][k].item() - expected[1][k].item()) <= METRIC_ATOL, k
        else:
            assert_fp32_close(got[1][k], naive[1][k], expected[1][k], f"{backend} {k}")


@pytest.mark.gpu
def test_grpo_loss_cuda_matches_torch():
    logp, old, ref, adv, mask = _batch(seed=10, lengths=[1000, 513, 0, 77])
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, clip_c=3.0, loss_agg="seq-mean-token-sum-norm")
    expected = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float64, **kw)
    naive = _run(grpo_loss_reference, logp, adv, mask, dtype=torch.float32, device="cuda", **kw)
    got = _run(grpo_loss, logp, adv, mask, dtype=torch.float32, device="cuda", **kw)
    _compare(got, naive, expected, "cuda")
