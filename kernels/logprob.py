"""Fused lm_head log-prob and entropy: log_softmax(hidden @ weight.T / T)[target], never building [N, V].

Math, per row n (z = h W^T / T, the temperature-scaled logits; p = softmax(z)):
    lse   = log sum_v exp(z_v)
    logp  = z_target - lse
    H     = lse - sum_v p_v z_v                               (entropy)
    d logp / d z_v = [v == target] - p_v
    d H    / d z_v = -p_v (z_v - E_p[z]) = -p_v (log p_v + H)
    dz     = g_logp ([v == target] - p) - g_H p (log p + H)   (g_*: upstream gradients)
    grad_h = (dz / T) @ W,   grad_W = (dz / T)^T @ h
The forward streams the vocabulary with an online max / log-sum-exp (and, for the entropy, the running
sum of p (z - max)), keeping only per-row statistics; it saves lse (and H) per row. The backward
recomputes z one vocabulary chunk at a time. Peak extra memory is one chunk, never [N, V].

Two implementations behind one autograd Function (kernels/dispatch.py picks one per call):
- Triton (CUDA; CPU tensors under TRITON_INTERPRET=1): `_logprob_fwd_kernel` is a matmul over
  (row block, vocabulary split) that streams its vocabulary range through the online softmax in
  registers; the splits' partial statistics are combined in torch (a few [S, N] vectors).
  `_logprob_bwd_kernel` recomputes a logits tile and writes dz for one vocabulary chunk [N, Vc] in the
  input dtype; cuBLAS then does grad_h += dz @ W_c (fp32 accumulator) and grad_W[c] = dz^T @ h. The
  recompute costs 8NHV FLOPs instead of 6NHV: the price of never storing [N, V].
- torch (CPU): the same two passes in vocabulary chunks of fp32 (bf16/fp16 inputs are upcast per chunk).
Both compute statistics in fp32 (float64 inputs stay float64 on the torch path) and return gradients in
the input dtype. Under the interpreter `tl.dot` upcasts bf16/fp16 operands to fp32 (the interpreter
multiplies raw bf16 bits otherwise; shared/ENVIRONMENT.md).

Test: pytest tests/test_kernels_logprob.py.  Benchmarks: benchmarks/bench_kernels.py (CPU),
benchmarks/gpu_kernels.py (H100).
"""

from __future__ import annotations

import functools

import torch

from .dispatch import interpreting, pick_backend, tl, triton

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NEG_INIT = -1e30  # finite start for the running max: -inf would make (m_old - m_new) * 0 a NaN

# Fixed block sizes for the interpreter (no autotune there); small so the CPU tests stay fast.
_INTERP_META = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_K": 32, "GROUP_N": 2}
_INTERP_BWD_CHUNK = 128  # vocabulary columns per backward chunk under the interpreter
_GPU_SPLIT_ALIGN = 256  # vocabulary splits are multiples of the largest BLOCK_V in the GPU configs
_GPU_MIN_SPLIT_COLS = 4096  # a split narrower than this would not amortise its h reloads
_GPU_BWD_CHUNK = 8192  # backward chunk [N, 8192]: 64 MiB at N=4096 in bf16; naive holds GiBs of [N, V]
_TORCH_CHUNK_ELEMS = 1 << 22  # torch path: [N, C] fp32 chunk of 16 MiB (C = 2048 at N = 2048)


# ----------------------------------------------------------------------------------------- Triton kernels

@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H,
                 stride_hn, stride_hk, stride_wv, stride_wk,
                 DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[i, j] = sum_k h[rows_i, k] * W[cols_j, k] in fp32: one [BLOCK_N, BLOCK_V] tile of h @ W^T."""
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn  # [BLOCK_N, 1] row starts of h
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv  # [1, BLOCK_V] row starts of W
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _logprob_fwd_kernel(
    h_ptr,      # [N, H] hidden states (fp32 / bf16 / fp16)
    w_ptr,      # [V, H] lm_head weight, same dtype
    tgt_ptr,    # [N] int64 target ids
    part_ptr,   # [4, S, N] fp32 out, per vocabulary split: max m, sum e^(z-m), sum e^(z-m)(z-m), z_target
    N, H, V, cols_per_split,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_pq, stride_ps,
    inv_temp,
    WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row block, split): online softmax statistics of z = h W^T / T over the split's columns."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)

    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)  # _NEG_INIT (jit code reads no Python globals)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hk, stride_wv,
                         stride_wk, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K) * inv_temp
        z = tl.where(col_ok[None, :], z, float("-inf"))
        zt += tl.sum(tl.where((cols[None, :] == tgt[:, None]) & col_ok[None, :], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zs = z - m_new[:, None]  # <= 0; -inf on padding columns
        e = tl.exp(zs)  # 0 on padding columns
        if WITH_ENTROPY:
            # sum e^(z-m)(z-m) re-based to the new max: alpha * (t + (m - m_new) * s)
            t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(col_ok[None, :], zs, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    out = part_ptr + pid_s.to(tl.int64) * stride_ps + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + stride_pq, s, mask=row_ok)
    tl.store(out + 2 * stride_pq, t, mask=row_ok)
    tl.store(out + 3 * stride_pq, zt, mask=row_ok)


@triton.jit
def _logprob_bwd_kernel(
    h_ptr,      # [N, H] hidden states
    w_ptr,      # [V, H] lm_head weight
    tgt_ptr,    # [N] int64 target ids
    lse_ptr,    # [N] fp32 log-sum-exp of z (saved by the forward)
    ent_ptr,    # [N] fp32 entropy (read only WITH_ENTROPY)
    glp_ptr,    # [N] fp32 upstream gradient of logp
    gent_ptr,   # [N] fp32 upstream gradient of the entropy (read only WITH_ENTROPY)
    dz_ptr,     # [N, v_hi - v_lo] out (input dtype): d loss / d (h W^T) on the chunk [v_lo, v_hi)
    N, H, v_lo, v_hi,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_dn, stride_dv,
    inv_temp,
    WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_V] tile of dz / T, recomputing its logits."""
    pid = tl.program_id(0)
    n_pid_n = tl.cdiv(N, BLOCK_N)
    n_pid_v = tl.cdiv(v_hi - v_lo, BLOCK_V)
    # Grouped order (Triton matmul tutorial): GROUP_N row blocks sweep the vocabulary tiles together,
    # so each W tile is read from HBM once per group rather than once per row block.
    per_group = GROUP_N * n_pid_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < v_hi
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hk, stride_wv,
                     stride_wk, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K) * inv_temp
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = tl.where(cols[None, :] == tgt[:, None], glp[:, None], 0.0) - glp[:, None] * p
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        dz -= gent[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_temp
    out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dn + (cols - v_lo)[None, :] * stride_dv
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _gpu_configs(bwd: bool):
    # Candidates for an H100 at H=3584 in bf16 (matmul-tutorial shapes); autotune picks per (H, V, dtype).
    shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 256, 64, 8, 4),
              (128, 64, 64, 4, 4)]
    extra = {"GROUP_N": 8} if bwd else {}
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, **extra}, num_warps=w, num_stages=s)
            for bn, bv, bk, w, s in shapes]


@functools.cache
def _tuned(bwd: bool):
    kernel = _logprob_bwd_kernel if bwd else _logprob_fwd_kernel
    return triton.autotune(configs=_gpu_configs(bwd), key=["H", "V"] if not bwd else ["H"])(kernel)


def _launch(bwd: bool, grid, *args, **constexprs):
    """Fixed blocks under the interpreter (autotune cannot run there), autotuned configs on a GPU."""
    if interpreting():
        kernel = _logprob_bwd_kernel if bwd else _logprob_fwd_kernel
        meta = dict(_INTERP_META) if bwd else {k: v for k, v in _INTERP_META.items() if k != "GROUP_N"}
        kernel[grid({**constexprs, **meta})](*args, **constexprs, **meta)
    else:
        _tuned(bwd)[grid](*args, **constexprs)


def _dot_flags(dtype: torch.dtype) -> dict:
    # fp32 operands: exact fp32 products ("ieee"), not TF32, so fp32 results hold to 1e-5.
    # 16-bit operands: tensor cores, except in the interpreter (bf16 dot is wrong there).
    return {"DOT_FP32": dtype == torch.float32 or interpreting(),
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def _triton_fwd(hidden, weight, targets, inv_temp: float, with_entropy: bool):
    N, H = hidden.shape
    V = weight.shape[0]
    if interpreting():  # aim at 4 programs, so the tests' small N also cross vocabulary splits
        align, block_n, programs = _INTERP_META["BLOCK_V"], _INTERP_META["BLOCK_N"], 4
        min_cols = align
    else:
        align, block_n, min_cols = _GPU_SPLIT_ALIGN, 128, _GPU_MIN_SPLIT_COLS
        programs = 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
    # Split the vocabulary across programs when there are too few row blocks to fill the device.
    splits = max(1, min(triton.cdiv(programs, triton.cdiv(N, block_n)), triton.cdiv(V, min_cols)))
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), align) * align
    splits = triton.cdiv(V, cols_per_split)
    part = torch.empty((4, splits, N), dtype=torch.float32, device=hidden.device)  # [4, S, N]
    if N > 0:
        _launch(False, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits),
                hidden, weight, targets, part, N, H, V, cols_per_split,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                part.stride(0), part.stride(1), inv_temp,
                WITH_ENTROPY=with_entropy, **_dot_flags(hidden.dtype))
    m, s, t, zt = part.unbind(0)  # [S, N] each
    m_all = m.amax(0)  # [N]
    scale = torch.exp(m - m_all)  # [S, N]
    s_all = (scale * s).sum(0)
    lse = m_all + s_all.log()
    logp = zt.sum(0) - lse
    ent = None
    if with_entropy:
        ent = s_all.log() - (scale * (t + (m - m_all) * s)).sum(0) / s_all
    return logp, lse, ent


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result; 16-bit CUDA operands stay 16-bit (cuBLAS, fp32 out, torch >= 2.8)."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _triton_bwd(hidden, weight, targets, lse, ent, g_lp, g_ent, inv_temp: float,
                need_h: bool, need_w: bool):
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = min(V, _INTERP_BWD_CHUNK if interpreting() else _GPU_BWD_CHUNK)
    with_entropy = g_ent is not None
    g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
    g_ent = g_ent.float().contiguous() if with_entropy else g_lp
    ent = ent if with_entropy else lse
    dz = torch.empty((N, chunk), dtype=hidden.dtype, device=hidden.device)  # [N, Vc]
    grad_h = torch.zeros((N, H), dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    for lo in range(0, V, chunk):
        hi = min(V, lo + chunk)
        dz_c = dz[:, : hi - lo]  # [N, hi - lo]
        if N > 0:
            def grid(meta, width=hi - lo):
                return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)

            _launch(True, grid, hidden, weight, targets, lse, ent, g_lp, g_ent, dz_c, N, H, lo, hi,
                    hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                    dz_c.stride(0), dz_c.stride(1), inv_temp,
                    WITH_ENTROPY=with_entropy, **_dot_flags(hidden.dtype))
        if need_h:
            grad_h += _mm_fp32(dz_c, weight[lo:hi])
        if need_w:
            torch.mm(dz_c.T, hidden, out=grad_w[lo:hi])
    return (grad_h.to(hidden.dtype) if need_h else None), grad_w


# ------------------------------------------------------------------------------------------- torch path

def _torch_chunk(N: int) -> int:
    return max(256, min(65536, (_TORCH_CHUNK_ELEMS // max(N, 1)) // 256 * 256))


def _chunk_target(z: torch.Tensor, targets: torch.Tensor, lo: int):
    """Column index of each row's target inside the chunk starting at `lo`, and whether it is there."""
    idx = targets - lo
    inside = (idx >= 0) & (idx < z.shape[1])
    return idx.clamp(0, z.shape[1] - 1).unsqueeze(1), inside  # [N, 1], [N]


def _torch_fwd(hidden, weight, targets, inv_temp: float, with_entropy: bool):
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(cdt) * inv_temp  # [N, H]; 1/T folded into h once instead of into every chunk
    N, V = h.shape[0], weight.shape[0]
    m = torch.full((N,), _NEG_INIT, dtype=cdt)
    s = torch.zeros(N, dtype=cdt)
    t = torch.zeros(N, dtype=cdt)
    zt = torch.zeros(N, dtype=cdt)
    chunk = _torch_chunk(N)
    for lo in range(0, V, chunk):
        z = h @ weight[lo:lo + chunk].to(cdt).T  # [N, C]
        idx, inside = _chunk_target(z, targets, lo)
        zt += torch.where(inside, z.gather(1, idx).squeeze(1), 0.0)
        m_new = torch.maximum(m, z.amax(1))
        alpha = torch.exp(m - m_new)
        z.sub_(m_new.unsqueeze(1))  # z - m_new <= 0
        if with_entropy:
            e = torch.exp(z)  # [N, C]
            s_c = e.sum(1)
            t = alpha * (t + (m - m_new) * s) + e.mul_(z).sum(1)
        else:
            s_c = z.exp_().sum(1)
        s = alpha * s + s_c
        m = m_new
    lse = m + s.log()
    ent = s.log() - t / s if with_entropy else None
    return zt - lse, lse, ent


def _torch_bwd(hidden, weight, targets, lse, ent, g_lp, g_ent, inv_temp: float,
               need_h: bool, need_w: bool):
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(cdt) * inv_temp  # [N, H], as in the forward
    N, V = h.shape[0], weight.shape[0]
    g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(cdt)
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    chunk = _torch_chunk(N)
    for lo in range(0, V, chunk):
        w = weight[lo:lo + chunk].to(cdt)  # [C, H]
        z = (h @ w.T).sub_(lse.unsqueeze(1))  # [N, C] log p
        p = torch.exp(z)  # [N, C]
        if g_ent is not None:
            # dz = g_lp onehot - (g_lp p + g_H p (log p + H))
            z.add_(ent.unsqueeze(1)).mul_(p).mul_(g_ent.to(cdt).unsqueeze(1))
            dz = p.mul_(g_lp.unsqueeze(1)).add_(z).neg_()
        else:
            dz = p.mul_(-g_lp.unsqueeze(1))
        idx, inside = _chunk_target(dz, targets, lo)
        dz.scatter_add_(1, idx, torch.where(inside, g_lp, 0.0).unsqueeze(1))
        if need_h:
            grad_h.addmm_(dz, w)
        if need_w:  # d/dW of (h/T) W^T
            if grad_w.dtype == cdt:
                torch.mm(dz.T, h, out=grad_w[lo:lo + chunk])
            else:
                grad_w[lo:lo + chunk] = dz.T @ h
    return (grad_h.mul_(inv_temp).to(hidden.dtype) if need_h else None), grad_w


# -------------------------------------------------------------------------------------- autograd + API

class _LinearLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp: float, with_entropy: bool, backend: str):
        fwd = _triton_fwd if backend == "triton" else _torch_fwd
        logp, lse, ent = fwd(hidden, weight, targets, inv_temp, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_temp, ctx.backend = inv_temp, backend
        # Unused outputs (e.g. an entropy kept only as a metric) arrive as None: skip their term.
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_lp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        bwd = _triton_bwd if ctx.backend == "triton" else _torch_bwd
        grad_h, grad_w = bwd(hidden, weight, targets, lse, ent, g_lp, g_ent, ctx.inv_temp, need_h, need_w)
        return grad_h, grad_w, None, None, None, None


def fused_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         temperature: float = 1.0, return_entropy: bool = False):
    """log_softmax(hidden @ weight.T / temperature)[targets] without building the [N, V] logits.

    hidden [N, H] (or [..., H]) fp32/bf16/fp16; weight [V, H] of the same dtype; targets [N] (or [...])
    int64 in [0, V). Returns logprobs [N] fp32, and (logprobs, entropy) with `return_entropy`.
    Differentiable w.r.t. hidden and weight, through the entropy too.
    """
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden [..., H] and weight [V, H] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    backend = pick_backend("fused_linear_logprob", h2, weight, t1, triton_ok=hidden.dtype in _TRITON_DTYPES)
    logp, ent = _LinearLogprobFunction.apply(h2, weight, t1, 1.0 / temperature, return_entropy, backend)
    if return_entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)


def fused_linear_logprob_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   temperature: float = 1.0, return_entropy: bool = False):
    """The naive path that tests and benchmarks share: builds [N, V] logits in the input dtype, then
    log_softmax in fp32 (float64 inputs stay float64, which is how the tests get exact references)."""
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)  # [N, V]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)
