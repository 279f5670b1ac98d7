"""GRPO policy loss (ALGORITHMS.md section 0) and its composition with the fused lm_head log-prob.

Math, per response token (b, t) with mask 1; A = advantage, c = clip_c (dual clip), beta = kl_coef:
    r    = exp(clamp(logp - old, -20, 20))       on-policy (old=None): exp(logp - sg(logp)) = 1, dr/dlogp = 1
    pg   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    pg   = min(pg, -c A)  where A < 0            (dual clip; only when clip_c is given)
    kl   = k1: logp - ref | k2: (logp - ref)^2 / 2 | k3: clamp(e^x - x - 1, -10, 10), x = clamp(ref - logp, -20, 20)
    l    = pg + beta kl                          (kl only when beta != 0 and ref is given)
    loss = sum_{b,t} w_b mask_bt l_bt, with the per-sequence weight w_b of `loss_agg`:
        token-mean               w = 1 / D,                 D = agg_divisor or the number of tokens
        seq-mean-token-mean      w_b = 1 / (n_b S),         S = agg_divisor or the number of sequences
                                                            with at least one token (n_b tokens)
        seq-mean-token-sum-norm  w = 1 / (agg_norm S)       agg_norm defaults to T (Dr.GRPO's constant)
    d loss / d logp = w_b mask_bt (d pg / d logp + beta d kl / d logp); d pg / d logp = -A dr/dlogp on the
    unclipped branch and 0 where a clip (or the dual cap) is active.
Decisions:
- `agg_divisor` (a number or a 0-dim tensor) is the global divisor for gradient accumulation: the token
  count (token-mean) or the sequence count (seq-mean variants) of the whole mini-batch, so the micro-batch
  losses sum to the mini-batch loss. Divisors below 1 count as 1: an empty batch gives loss 0, not NaN.
- Masked positions may hold anything (padding, NaN, inf): they are replaced before any arithmetic, get
  zero gradient, and an all-masked row contributes nothing.
- old, ref and advantages are constants (no gradient). The x clamp inside k3 does not change its value
  (|x| >= 20 is clamped to 10 anyway) but keeps exp finite, so the gradient never sees inf * 0.
- Metrics are means over the micro-batch's masked tokens, 0-dim device tensors (no host sync):
  clip_frac_low (A < 0, r < 1 - clip_low), clip_frac_high (A > 0, r > 1 + clip_high), clip_frac_dual
  (the dual cap is active), ratio_mean, kl_mean (0 without ref; reported even when kl_coef = 0).
- Triton: `_grpo_loss_fwd_kernel` (one program per sequence: weighted loss and metric sums),
  `_grpo_loss_bwd_kernel` (recomputes d loss / d logp elementwise); torch: vectorised autograd code.
- fused_grpo_loss composes fused_linear_logprob with grpo_loss (see its docstring for why).

Test: pytest tests/test_kernels_grpo_loss.py.
"""

from __future__ import annotations

import torch

from .dispatch import pick_backend, tl, triton
from .logprob import fused_linear_logprob, fused_linear_logprob_reference

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean", "kl_mean")
_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0
_MAX_BLOCK_T = 1024  # tokens per step: a whole response of up to 1024 tokens in one step


# ----------------------------------------------------------------------------------------- Triton kernels

@triton.jit
def _grpo_token(lp, old, ref, adv, clip_low, clip_high, clip_c, kl_coef,
                ON_POLICY: tl.constexpr, HAS_REF: tl.constexpr, DUAL_CLIP: tl.constexpr,
                KL_TYPE: tl.constexpr):
    """Per-token loss l, d l / d logp, the ratio, the KL estimate and the three clip indicators."""
    if ON_POLICY:
        ratio = tl.full(lp.shape, 1.0, tl.float32)
        d_ratio = ratio
    else:
        raw = lp - old
        log_ratio = tl.minimum(tl.maximum(raw, -20.0), 20.0)  # _LOG_RATIO_CLAMP
        ratio = tl.exp(log_ratio)
        d_ratio = tl.where((raw >= -20.0) & (raw <= 20.0), ratio, 0.0)
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    pg_raw = -adv * ratio
    pg_clip = -adv * clipped
    unclipped = pg_raw >= pg_clip
    pg = tl.where(unclipped, pg_raw, pg_clip)
    d_loss = tl.where(unclipped, -adv * d_ratio, 0.0)
    low = (adv < 0) & (ratio < 1.0 - clip_low)
    high = (adv > 0) & (ratio > 1.0 + clip_high)
    dual = tl.zeros(lp.shape, tl.int1)
    if DUAL_CLIP:
        cap = -clip_c * adv
        dual = (adv < 0) & (pg > cap)
        pg = tl.where(dual, cap, pg)
        d_loss = tl.where(dual, 0.0, d_loss)
    kl = tl.zeros(lp.shape, tl.float32)
    if HAS_REF:
        diff = lp - ref
        if KL_TYPE == 1:
            kl = diff
            d_kl = tl.full(lp.shape, 1.0, tl.float32)
        elif KL_TYPE == 2:
            kl = 0.5 * diff * diff
            d_kl = diff
        else:
            x = tl.minimum(tl.maximum(-diff, -20.0), 20.0)
            ex = tl.exp(x)
            k3 = ex - x - 1.0
            kl = tl.minimum(tl.maximum(k3, -10.0), 10.0)  # _K3_CLAMP
            live = (k3 <= 10.0) & (diff <= 20.0) & (diff >= -20.0)
            d_kl = tl.where(live, 1.0 - ex, 0.0)
        pg = pg + kl_coef * kl
        d_loss = d_loss + kl_coef * d_kl
    return pg, d_loss, ratio, kl, low, high, dual


@triton.jit
def _load_token(lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, b, ts, T, stride_row, stride_ab, stride_at,
                ON_POLICY: tl.constexpr, HAS_REF: tl.constexpr):
    """Row b, columns ts: inputs with masked positions replaced by 0 (padding may hold NaN or inf)."""
    in_row = ts < T
    offs = b.to(tl.int64) * stride_row + ts
    valid = (tl.load(mask_ptr + offs, mask=in_row, other=0) != 0) & in_row
    lp = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(tl.float32)  # masked lanes read as 0
    old = lp
    ref = lp
    if not ON_POLICY:
        old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + b.to(tl.int64) * stride_ab + ts * stride_at, mask=valid, other=0.0).to(tl.float32)
    return lp, old, ref, adv, valid


@triton.jit
def _grpo_loss_fwd_kernel(
    lp_ptr,     # [B, T] log-probs of the current policy (contiguous rows of stride_row)
    old_ptr,    # [B, T] behaviour log-probs (unused ON_POLICY)
    ref_ptr,    # [B, T] reference log-probs (read only HAS_REF)
    adv_ptr,    # advantages, [B, T] or [B] (stride_at = 0)
    mask_ptr,   # [B, T] uint8 response mask
    scale_ptr,  # [B] fp32 aggregation weight w_b of each sequence's tokens
    out_ptr,    # [6, B] fp32 out: per-sequence weighted loss, n_low, n_high, n_dual, sum ratio, sum kl
    T, stride_row, stride_ab, stride_at, stride_out,
    clip_low, clip_high, clip_c, kl_coef,
    ON_POLICY: tl.constexpr, HAS_REF: tl.constexpr, DUAL_CLIP: tl.constexpr, KL_TYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    acc_loss = tl.zeros((BLOCK_T,), tl.float32)
    acc_low = tl.zeros((BLOCK_T,), tl.float32)
    acc_high = tl.zeros((BLOCK_T,), tl.float32)
    acc_dual = tl.zeros((BLOCK_T,), tl.float32)
    acc_ratio = tl.zeros((BLOCK_T,), tl.float32)
    acc_kl = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        lp, old, ref, adv, valid = _load_token(lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, b, ts, T,
                                               stride_row, stride_ab, stride_at, ON_POLICY, HAS_REF)
        loss, _, ratio, kl, low, high, dual = _grpo_token(lp, old, ref, adv, clip_low, clip_high, clip_c,
                                                          kl_coef, ON_POLICY, HAS_REF, DUAL_CLIP, KL_TYPE)
        acc_loss += tl.where(valid, loss, 0.0)
        acc_low += (valid & low).to(tl.float32)
        acc_high += (valid & high).to(tl.float32)
        acc_dual += (valid & dual).to(tl.float32)
        acc_ratio += tl.where(valid, ratio, 0.0)
        acc_kl += tl.where(valid, kl, 0.0)
    scale = tl.load(scale_ptr + b)
    tl.store(out_ptr + b, tl.sum(acc_loss, axis=0) * scale)
    tl.store(out_ptr + stride_out + b, tl.sum(acc_low, axis=0))
    tl.store(out_ptr + 2 * stride_out + b, tl.sum(acc_high, axis=0))
    tl.store(out_ptr + 3 * stride_out + b, tl.sum(acc_dual, axis=0))
    tl.store(out_ptr + 4 * stride_out + b, tl.sum(acc_ratio, axis=0))
    tl.store(out_ptr + 5 * stride_out + b, tl.sum(acc_kl, axis=0))


@triton.jit
def _grpo_loss_bwd_kernel(
    lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr,  # as in the forward
    scale_ptr,  # [B] fp32 aggregation weights
    gout_ptr,   # [] fp32 upstream gradient of the loss (read on the device: no host sync)
    grad_ptr,   # [B, T] out: d loss / d logp, same layout as lp
    T, stride_row, stride_ab, stride_at,
    clip_low, clip_high, clip_c, kl_coef,
    ON_POLICY: tl.constexpr, HAS_REF: tl.constexpr, DUAL_CLIP: tl.constexpr, KL_TYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    lp, old, ref, adv, valid = _load_token(lp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, b, ts, T,
                                           stride_row, stride_ab, stride_at, ON_POLICY, HAS_REF)
    _, d_loss, _, _, _, _, _ = _grpo_token(lp, old, ref, adv, clip_low, clip_high, clip_c, kl_coef,
                                           ON_POLICY, HAS_REF, DUAL_CLIP, KL_TYPE)
    g = tl.load(gout_ptr) * tl.load(scale_ptr + b)
    grad = tl.where(valid, d_loss * g, 0.0)
    tl.store(grad_ptr + b.to(tl.int64) * stride_row + ts, grad.to(grad_ptr.dtype.element_ty), mask=ts < T)


class _GrpoLossTriton(torch.autograd.Function):
    """Triton forward/backward; `cfg` holds the Python scalars and flags of one call."""

    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, scale, cfg: dict):
        B, T = logp.shape
        old_ = logp if old is None else old  # any valid pointer when ON_POLICY
        ref_ = logp if ref is None else ref
        out = torch.empty((6, B), dtype=torch.float32, device=logp.device)  # [6, B]
        args = _triton_args(cfg, old is None, ref is not None)
        args["flags"]["BLOCK_T"] = min(_MAX_BLOCK_T, triton.next_power_of_2(max(T, 1)))
        if B > 0:
            _grpo_loss_fwd_kernel[(B,)](logp, old_, ref_, adv, mask, scale, out, T, logp.stride(0),
                                        adv.stride(0), adv.stride(1), out.stride(0), *args["scalars"],
                                        **args["flags"])
        ctx.save_for_backward(logp, old_, ref_, adv, mask, scale)
        ctx.args = args
        sums = out.sum(1)  # [6]
        metric_sums = sums[1:]
        ctx.mark_non_differentiable(metric_sums)
        return sums[0], metric_sums

    @staticmethod
    def backward(ctx, g_loss, _g_sums):
        logp, old, ref, adv, mask, scale = ctx.saved_tensors
        B, T = logp.shape
        grad = torch.empty_like(logp)
        if B > 0 and T > 0:
            gout = g_loss.to(torch.float32).reshape(())
            _grpo_loss_bwd_kernel[(B, triton.cdiv(T, ctx.args["flags"]["BLOCK_T"]))](
                logp, old, ref, adv, mask, scale, gout, grad, T, logp.stride(0), adv.stride(0), adv.stride(1),
                *ctx.args["scalars"], **ctx.args["flags"])
        return grad, None, None, None, None, None, None


def _triton_args(cfg: dict, on_policy: bool, has_ref: bool) -> dict:
    clip_c = cfg["clip_c"]
    return {"scalars": (float(cfg["clip_low"]), float(cfg["clip_high"]),
                        float(clip_c) if clip_c is not None else 0.0, float(cfg["kl_coef"])),
            "flags": {"ON_POLICY": on_policy, "HAS_REF": has_ref, "DUAL_CLIP": clip_c is not None,
                      "KL_TYPE": int(cfg["kl_type"][1])}}


def _triton_grpo(logp, old, ref, adv, mask, scale, cfg):
    B, T = logp.shape
    logp = logp.contiguous()
    old = old.contiguous() if old is not None else None
    ref = ref.contiguous() if ref is not None else None
    adv = adv.to(torch.float32)
    adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(B, T)  # stride 0 along T for [B]
    mask = mask.to(torch.uint8).contiguous()
    return _GrpoLossTriton.apply(logp, old, ref, adv, mask, scale, cfg)


# ------------------------------------------------------------------------------------------- torch path

def _kl(logp, ref, kl_type: str):
    diff = logp - ref
    if kl_type == "k1":
        return diff
    if kl_type == "k2":
        return 0.5 * diff * diff
    x = (-diff).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (torch.exp(x) - x - 1.0).clamp(-_K3_CLAMP, _K3_CLAMP)


def _torch_grpo(logp, old, ref, adv, mask, scale, cfg):
    cdt = torch.promote_types(logp.dtype, torch.float32)
    zero = torch.zeros((), dtype=cdt, device=logp.device)
    lp = torch.where(mask, logp.to(cdt), zero)  # [B, T]
    base = lp.detach() if old is None else torch.where(mask, old.to(cdt), zero)
    a = adv.to(cdt)
    a = torch.where(mask, a.unsqueeze(1) if a.dim() == 1 else a, zero)  # [B, T]
    ratio = torch.exp((lp - base).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1.0 - cfg["clip_low"], 1.0 + cfg["clip_high"]))
    dual = torch.zeros_like(mask)
    if cfg["clip_c"] is not None:
        cap = -cfg["clip_c"] * a
        dual = (a < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
    kl = torch.zeros_like(lp)
    if ref is not None:
        kl = _kl(lp, torch.where(mask, ref.to(cdt), zero), cfg["kl_type"])
        if cfg["kl_coef"] != 0:
            pg = pg + cfg["kl_coef"] * kl
    loss = torch.where(mask, pg * scale.to(cdt).unsqueeze(1), zero).sum()
    with torch.no_grad():
        r = ratio.detach()
        sums = torch.stack([((a < 0) & (r < 1.0 - cfg["clip_low"]) & mask).sum(),
                            ((a > 0) & (r > 1.0 + cfg["clip_high"]) & mask).sum(),
                            (dual & mask).sum(),
                            torch.where(mask, r, zero).sum(),
                            torch.where(mask, kl.detach(), zero).sum()]).to(torch.float32)
    return loss, sums


# -------------------------------------------------------------------------------------------- public API

def _row_scale(mask: torch.Tensor, loss_agg: str, agg_norm, agg_divisor) -> torch.Tensor:
    """[B] fp32 weight of each sequence's tokens in the loss sum (see the module docstring)."""
    B, T = mask.shape
    counts = mask.sum(1, dtype=torch.float32)  # [B]

    def divisor(default: torch.Tensor) -> torch.Tensor:
        d = default if agg_divisor is None else torch.as_tensor(agg_divisor, dtype=torch.float32,
                                                                 device=mask.device)
        return d.clamp(min=1.0)

    if loss_agg == "token-mean":
        return (1.0 / divisor(counts.sum())).expand(B).contiguous()
    n_seq = divisor((counts > 0).sum().to(torch.float32))
    if loss_agg == "seq-mean-token-mean":
        return 1.0 / (counts.clamp(min=1.0) * n_seq)
    norm = float(T if agg_norm is None else agg_norm)
    return (1.0 / (norm * n_seq)).expand(B).contiguous()


def _check(logprobs, advantages, mask, old, ref, clip_low, clip_high, clip_c, kl_type, loss_agg, agg_norm):
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs and mask must be [B, T]; got {tuple(logprobs.shape)}, {tuple(mask.shape)}")
    for name, x in (("old_logprobs", old), ("ref_logprobs", ref)):
        if x is not None and x.shape != logprobs.shape:
            raise ValueError(f"{name} must be [B, T] {tuple(logprobs.shape)}, got {tuple(x.shape)}")
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be [B] or [B, T]; got {tuple(advantages.shape)}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low/clip_high must be >= 0, got {clip_low}, {clip_high}")
    if clip_c is not None and clip_c <= 1:
        raise ValueError(f"clip_c (dual clip) must be > 1, got {clip_c}")
    if agg_norm is not None and agg_norm <= 0:
        raise ValueError(f"agg_norm must be > 0, got {agg_norm}")


def grpo_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              old_logprobs: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
              clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float | None = None,
              kl_coef: float = 0.0, kl_type: str = "k3", loss_agg: str = "token-mean",
              agg_norm: float | None = None, agg_divisor: float | torch.Tensor | None = None):
    """GRPO loss over the masked tokens of [B, T] log-probs -> (loss 0-dim, metrics dict of 0-dim tensors).

    advantages [B] or [B, T]; mask [B, T] (bool or 0/1); old_logprobs None = on-policy; ref_logprobs
    enables the KL term (kl_coef, kl_type in k1/k2/k3); loss_agg, agg_norm, agg_divisor and clip_c as in
    the module docstring. Only `logprobs` receives a gradient.
    """
    _check(logprobs, advantages, mask, old_logprobs, ref_logprobs, clip_low, clip_high, clip_c, kl_type,
           loss_agg, agg_norm)
    mask = mask != 0
    cfg = {"clip_low": clip_low, "clip_high": clip_high, "clip_c": clip_c, "kl_coef": kl_coef,
           "kl_type": kl_type}
    scale = _row_scale(mask, loss_agg, agg_norm, agg_divisor)
    tensors = [t for t in (logprobs, advantages, mask, old_logprobs, ref_logprobs) if t is not None]
    backend = pick_backend("grpo_loss", *tensors, triton_ok=logprobs.dtype != torch.float64)
    impl = _triton_grpo if backend == "triton" else _torch_grpo
    loss, sums = impl(logprobs, old_logprobs, ref_logprobs, advantages.detach(), mask, scale, cfg)
    n_tokens = mask.sum().to(torch.float32).clamp(min=1.0)
    metrics = dict(zip(METRICS, (sums / n_tokens).unbind(0), strict=True))
    return loss, metrics


def grpo_loss_reference(logprobs, advantages, mask, *, old_logprobs=None, ref_logprobs=None, clip_low=0.2,
                        clip_high=0.2, clip_c=None, kl_coef=0.0, kl_type="k3", loss_agg="token-mean",
                        agg_norm=None, agg_divisor=None):
    """ALGORITHMS.md section 0 written out literally, one sequence at a time (tests and benchmarks)."""
    B, T = logprobs.shape
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand(B, T)
    seq_sums, seq_counts = [], []
    low = high = dual = ratio_sum = kl_sum = 0.0
    for b in range(B):
        m = mask[b] != 0
        lp, a = logprobs[b][m], adv[b][m]
        old = lp.detach() if old_logprobs is None else old_logprobs[b][m]
        ratio = torch.exp(torch.clamp(lp - old, -20, 20))
        pg = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
        if clip_c is not None:
            capped = torch.where(a < 0, torch.min(pg, -clip_c * a), pg)
            dual = dual + ((a < 0) & (pg > -clip_c * a)).sum()
            pg = capped
        if ref_logprobs is not None:
            ref = ref_logprobs[b][m]
            if kl_type == "k1":
                kl = lp - ref
            elif kl_type == "k2":
                kl = 0.5 * (lp - ref) ** 2
            else:
                x = torch.clamp(ref - lp, -20, 20)
                kl = torch.clamp(torch.exp(x) - x - 1, -10, 10)
            kl_sum = kl_sum + kl.detach().sum()
            if kl_coef != 0:
                pg = pg + kl_coef * kl
        low = low + ((a < 0) & (ratio < 1 - clip_low)).sum()
        high = high + ((a > 0) & (ratio > 1 + clip_high)).sum()
        ratio_sum = ratio_sum + ratio.detach().sum()
        seq_sums.append(pg.sum())
        seq_counts.append(int(m.sum()))
    total = sum(seq_counts)
    zero = logprobs.new_zeros(())
    if loss_agg == "token-mean":
        loss = sum(seq_sums, zero) / max(float(agg_divisor if agg_divisor is not None else total), 1.0)
    else:
        kept = [(s, n) for s, n in zip(seq_sums, seq_counts, strict=True) if n > 0]
        n_seq = max(float(agg_divisor if agg_divisor is not None else len(kept)), 1.0)
        norm = T if agg_norm is None else agg_norm
        per_seq = [s / n if loss_agg == "seq-mean-token-mean" else s / norm for s, n in kept]
        loss = sum(per_seq, zero) / n_seq
    n = max(total, 1)
    metrics = {"clip_frac_low": low / n, "clip_frac_high": high / n, "clip_frac_dual": dual / n,
               "ratio_mean": ratio_sum / n, "kl_mean": kl_sum / n}
    return loss, {k: torch.as_tensor(v, dtype=torch.float64) for k, v in metrics.items()}


# ------------------------------------------------------------------------------- fused lm_head + loss

def fused_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    advantages: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False,
                    **loss_kwargs):
    """grpo_loss(fused_linear_logprob(hidden, weight, targets), ...) for hidden [B, T, H], targets and
    mask [B, T]; never builds [B, T, V]. `loss_kwargs` are grpo_loss's keywords. With `return_entropy`,
    metrics["entropy"] is the mean entropy over the masked tokens (a metric: no gradient).

    A composition rather than one kernel that also writes the gradients during the forward: measured
    on CPU (benchmarks/RESULTS.md) the composition's recompute costs less than holding a [rows, V] block
    of gradients, and it keeps one implementation of each piece. Masked positions are computed too
    (their targets replaced by 0): gathering only valid rows would need a host sync for the count.
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and targets [B, T]; got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}")
    valid = mask != 0
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    out = fused_linear_logprob(hidden, weight, safe_targets, temperature=temperature,
                               return_entropy=return_entropy)
    logp, ent = out if return_entropy else (out, None)
    loss, metrics = grpo_loss(logp, advantages, mask, **loss_kwargs)
    if return_entropy:
        n_tokens = valid.sum().to(torch.float32).clamp(min=1.0)
        metrics["entropy"] = torch.where(valid, ent.detach(), 0.0).sum() / n_tokens
    return loss, metrics


def fused_grpo_loss_reference(hidden, weight, targets, mask, advantages, *, temperature=1.0,
                              return_entropy=False, **loss_kwargs):
    """The naive composition (builds [B, T, V]) that tests and benchmarks share."""
    valid = mask != 0
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    out = fused_linear_logprob_reference(hidden, weight, safe_targets, temperature=temperature,
                                         return_entropy=return_entropy)
    logp, ent = out if return_entropy else (out, None)
    loss, metrics = grpo_loss_reference(logp, advantages, mask, **loss_kwargs)
    if return_entropy:
        metrics["entropy"] = ent.detach()[valid].sum() / max(int(valid.sum()), 1)
    return loss, metrics
