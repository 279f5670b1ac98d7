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
- Triton (CUDA, bf16/fp16; CPU tensors under TRITON_INTERPRET=1): `_logprob_fwd_kernel` is a matmul
  over (row block, vocabulary split) that streams its vocabulary range through the online softmax in
  registers (base 2: exp2); the splits' partial statistics are combined in torch (a few [S, N] vectors),
  and the target logit is one row-wise dot product in torch (`_target_logits`).
  `_logprob_bwd_kernel` recomputes a logits tile and writes dz for one vocabulary chunk [N, Vc] in the
  input dtype; cuBLAS then does grad_h += dz @ W_c (fp32 accumulator) and grad_W[c] = dz^T @ h. The
  recompute costs 8NHV FLOPs instead of 6NHV: the price of never storing [N, V].
  sm_90 shape of the kernels (checked on the CPU by benchmarks/kernel_report.py, no GPU needed): operands
  arrive through host-side TMA descriptors (no per-element pointers or masks in registers; the copy
  engine zero-fills out of bounds), so the K loop pipelines 3-4 shared-memory stages into wgmma, and no
  autotune config spills. Two measured register hogs were removed from the tile epilogues: the forward's
  per-tile target compare (moved out) and the backward's int64 column compare (int32, tile-local).
- torch (CPU; fp32 on CUDA): the same two passes in vocabulary chunks of fp32 (bf16/fp16 inputs are
  upcast per chunk).
Both compute statistics in fp32 (float64 inputs stay float64 on the torch path) and return gradients in
the input dtype. Under the interpreter `tl.dot` upcasts bf16/fp16 operands to fp32 (the interpreter
multiplies raw bf16 bits otherwise; shared/ENVIRONMENT.md).

Test: pytest tests/test_kernels_logprob.py.  Benchmarks: benchmarks/bench_kernels.py (CPU),
benchmarks/gpu_suite.py (H100/H200), benchmarks/kernel_report.py (sm_90 compile report, CPU).
"""

from __future__ import annotations

import functools
import os

import torch

from .dispatch import TensorDescriptor, interpreting, pick_backend, tl, triton

# The automatic choice runs Triton for 16-bit inputs only: fp32 needs exact products, which have no
# tensor-core path (the kernel's fp32 dot spills ~10-100 KB per thread on sm_90, benchmarks/RESULTS.md);
# fp32 on CUDA takes the torch path (cuBLAS fp32 GEMMs, chunked). Forcing "triton" still runs fp32.
_TRITON_AUTO_DTYPES = (torch.bfloat16, torch.float16)
_NEG_INIT = -1e30  # finite start for the running max: -inf would make (m_old - m_new) * 0 a NaN

# Fixed block sizes for the interpreter (no autotune there); small so the CPU tests stay fast.
_INTERP_META = {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_K": 32, "GROUP_N": 2}
_INTERP_BWD_CHUNK = 128  # vocabulary columns per backward chunk under the interpreter
_GPU_SPLIT_ALIGN = 256  # vocabulary splits are multiples of the largest BLOCK_V in the GPU configs
_GPU_MIN_SPLIT_COLS = 4096  # a split narrower than this would not amortise its h reloads
_GPU_BWD_CHUNK = 8192  # backward chunk [N, 8192]: 64 MiB at N=4096 in bf16; naive holds GiBs of [N, V]
_TARGET_ROWS = 1024  # rows per chunk of the target-logit gather (`_target_logits`)
_TORCH_CHUNK_ELEMS = 1 << 22  # torch path: [N, C] fp32 chunk of 16 MiB (C = 2048 at N = 2048)


# ----------------------------------------------------------------------------------------- Triton kernels

@triton.jit
def _logits_tile(h_desc, w_desc, row0, col0, H,
                 DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[i, j] = sum_k h[row0 + i, k] * W[col0 + j, k] in fp32: one [BLOCK_N, BLOCK_V] tile of h @ W^T.

    The operands arrive through TMA descriptors: rows >= N, columns >= V and k >= H read as 0 (the copy
    engine's bounds), so no masks and no per-element pointers occupy registers, and the loop pipelines."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        a = h_desc.load([row0, k0])  # [BLOCK_N, BLOCK_K]
        b = w_desc.load([col0, k0])  # [BLOCK_V, BLOCK_K]
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _logprob_fwd_kernel(
    h_desc,     # [N, H] hidden states (fp32 / bf16 / fp16), TMA descriptor of [BLOCK_N, BLOCK_K] blocks
    w_desc,     # [V, H] lm_head weight, same dtype, TMA descriptor of [BLOCK_V, BLOCK_K] blocks
    part_ptr,   # [3, S, N] fp32 out, per vocabulary split: max m, sum e^(z-m), sum e^(z-m)(z-m)
    N, H, V, cols_per_split, stride_pq, stride_ps,
    inv_temp,
    WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row block, split): online softmax statistics of z = h W^T / T over the split's columns.

    Base-2 inside (z2 = z log2(e), exp2 is one instruction); the stored statistics are natural-log ones.
    The target logit is not picked out here (a compare and a reduction over every tile): the launcher
    computes it as one row-wise dot product."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    scale = inv_temp * 1.4426950408889634  # 1/T * log2(e)

    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)  # running max of z2 (_NEG_INIT; jit reads no globals)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum 2^(z2 - m)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum 2^(z2 - m) (z2 - m)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logits_tile(h_desc, w_desc, row0, v0, H, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K) * scale
        z = tl.where(col_ok[None, :], z, float("-inf"))  # the next split's columns, or columns >= V
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp2(m - m_new)
        zs = z - m_new[:, None]  # <= 0; -inf on masked columns
        e = tl.exp2(zs)  # 0 on masked columns
        if WITH_ENTROPY:
            # sum 2^(z2-m)(z2-m) re-based to the new max: alpha * (t + (m - m_new) * s)
            t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(col_ok[None, :], zs, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    ln2 = 0.6931471805599453
    out = part_ptr + pid_s.to(tl.int64) * stride_ps + rows
    tl.store(out, m * ln2, mask=row_ok)
    tl.store(out + stride_pq, s, mask=row_ok)
    tl.store(out + 2 * stride_pq, t * ln2, mask=row_ok)


@triton.jit
def _logprob_bwd_kernel(
    h_desc,     # [N, H] hidden states, TMA descriptor of [BLOCK_N, BLOCK_K] blocks
    w_desc,     # [V, H] lm_head weight, TMA descriptor of [BLOCK_V, BLOCK_K] blocks
    dz_desc,    # [N, v_hi - v_lo] out (input dtype), TMA descriptor of [BLOCK_N, BLOCK_V] blocks:
                # d loss / d (h W^T) on the chunk [v_lo, v_hi)
    tgt_ptr,    # [N] int64 target ids
    lse_ptr,    # [N] fp32 log-sum-exp of z (saved by the forward)
    ent_ptr,    # [N] fp32 entropy (read only WITH_ENTROPY)
    glp_ptr,    # [N] fp32 upstream gradient of logp
    gent_ptr,   # [N] fp32 upstream gradient of the entropy (read only WITH_ENTROPY)
    N, H, v_lo, v_hi,
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

    row0 = pid_n * BLOCK_N
    col0 = pid_v * BLOCK_V  # within the chunk
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    z = _logits_tile(h_desc, w_desc, row0, v_lo + col0, H, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V,
                     BLOCK_K) * inv_temp
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    # The target's column inside this tile, in int32 (an int64 compare per element costs registers).
    tgt = (tl.load(tgt_ptr + rows, mask=row_ok, other=-1) - (v_lo + col0)).to(tl.int32)
    logp = z - lse[:, None]
    p = tl.exp2(logp * 1.4426950408889634)
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        coef = glp[:, None] + gent[:, None] * (logp + ent[:, None])  # dz = onehot g_lp - p (g_lp + g_H (log p + H))
    else:
        coef = glp[:, None]
    dz = tl.where(tl.arange(0, BLOCK_V)[None, :] == tgt[:, None], glp[:, None], 0.0) - p * coef
    # The copy engine clips the store at row N and column v_hi - v_lo: no store masks.
    dz_desc.store([row0, col0], (dz * inv_temp).to(dz_desc.dtype))


def _set_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: the TMA descriptors' block shapes follow the config's blocks."""
    nargs["h_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_V"], nargs["BLOCK_K"]]
    if "dz_desc" in nargs:
        nargs["dz_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_V"]]


def _gpu_configs(bwd: bool):
    # Candidates for an H100 at H=3584 in bf16 (matmul-tutorial shapes); autotune picks per (H, V, dtype).
    shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 256, 64, 8, 4),
              (128, 64, 64, 4, 4)]
    extra = {"GROUP_N": 8} if bwd else {}
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, **extra}, num_warps=w, num_stages=s,
                          pre_hook=_set_block_shapes)
            for bn, bv, bk, w, s in shapes]


def _prune_fp32(configs, named_args, **kwargs):
    """Forced fp32 (exact products: no tensor cores) gets the smallest tile only: the others spill tens of
    KB per thread or exceed shared memory (benchmarks/RESULTS.md), and each takes ~10 s to compile."""
    if kwargs.get("PRECISION") == "ieee":
        return [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"])]
    return configs


@functools.cache
def _tuned(bwd: bool, autotune: bool = True):
    kernel = _logprob_bwd_kernel if bwd else _logprob_fwd_kernel
    # The descriptors carry no dtype for the autotune key: PRECISION tells fp32 from 16-bit inputs.
    key = ["H", "WITH_ENTROPY", "PRECISION"] if bwd else ["H", "V", "WITH_ENTROPY", "PRECISION"]
    configs = _gpu_configs(bwd)
    if not autotune:  # one fixed config: 128 x 128 tiles, 8 warps, 4 stages
        configs = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.num_warps) == (128, 128, 8)]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune_fp32})(kernel)


def _launch(bwd: bool, grid, *args, **constexprs):
    """Fixed blocks under the interpreter (autotune cannot run there), autotuned configs on a GPU."""
    if interpreting():
        kernel = _logprob_bwd_kernel if bwd else _logprob_fwd_kernel
        meta = dict(_INTERP_META) if bwd else {k: v for k, v in _INTERP_META.items() if k != "GROUP_N"}
        names = kernel.arg_names
        _set_block_shapes({**dict(zip(names, args)), **meta})
        kernel[grid({**constexprs, **meta})](*args, **constexprs, **meta)
    else:
        # VZERO_AUTOTUNE=0: one config, no autotuning (each config costs a compile of 2-10 s per new
        # specialization: checks that need the kernels right, not fast, skip it; benchmarks/gpu_suite.py).
        _tuned(bwd, os.environ.get("VZERO_AUTOTUNE", "1") != "0")[grid](*args, **constexprs)


def _tma_operand(x: torch.Tensor) -> torch.Tensor:
    """x [R, H] as TMA accepts it: last stride 1, row stride and base 16-byte aligned. Otherwise a copy with
    H zero-padded to a multiple of 16 bytes (zeros add nothing to the dot products)."""
    size = x.element_size()
    if x.stride(-1) == 1 and (x.stride(0) * size) % 16 == 0 and x.data_ptr() % 16 == 0:
        return x
    pad = -x.shape[1] % (16 // size)
    return torch.nn.functional.pad(x, (0, pad))  # [R, H + pad], contiguous


def _desc(x: torch.Tensor):
    """A TMA descriptor of a 2-D tensor; its block shape is set per config (`_set_block_shapes`)."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [16, 16])


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
    part = torch.empty((3, splits, N), dtype=torch.float32, device=hidden.device)  # [3, S, N]
    if N > 0:
        h_op, w_op = _tma_operand(hidden), _tma_operand(weight)
        _launch(False, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits),
                _desc(h_op), _desc(w_op), part, N, h_op.shape[1], V, cols_per_split,
                part.stride(0), part.stride(1), inv_temp,
                WITH_ENTROPY=with_entropy, **_dot_flags(hidden.dtype))
    m, s, t = part.unbind(0)  # [S, N] each
    m_all = m.amax(0)  # [N]
    scale = torch.exp(m - m_all)  # [S, N]
    s_all = (scale * s).sum(0)
    lse = m_all + s_all.log()
    logp = _target_logits(hidden, weight, targets, inv_temp) - lse
    ent = None
    if with_entropy:
        ent = s_all.log() - (scale * (t + (m - m_all) * s)).sum(0) / s_all
    return logp, lse, ent


def _target_logits(hidden, weight, targets, inv_temp: float) -> torch.Tensor:
    """[N] fp32 z[n, targets[n]] = h_n . W[targets[n]] / T: N row-wise dot products in fp32 over a gather of
    N rows of W, in row chunks of bounded memory ([R, H] fp32: 14 MiB at R = 1024, H = 3584)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [N]
    for lo in range(0, hidden.shape[0], _TARGET_ROWS):
        h = hidden[lo:lo + _TARGET_ROWS].float()  # [R, H]
        w = weight[targets[lo:lo + _TARGET_ROWS]].float()  # [R, H]
        out[lo:lo + _TARGET_ROWS] = torch.linalg.vecdot(h, w) * inv_temp
    return out


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
    # [N, Vc]; rows padded to 16 bytes, as the TMA store needs
    dz = torch.empty((N, chunk + -chunk % 16), dtype=hidden.dtype, device=hidden.device)[:, :chunk]
    grad_h = torch.zeros((N, H), dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    if N > 0:
        h_op, w_op = _tma_operand(hidden), _tma_operand(weight)
        h_desc, w_desc = _desc(h_op), _desc(w_op)
    for lo in range(0, V, chunk):
        hi = min(V, lo + chunk)
        dz_c = dz[:, : hi - lo]  # [N, hi - lo]
        if N > 0:
            def grid(meta, width=hi - lo):
                return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)

            _launch(True, grid, h_desc, w_desc, _desc(dz_c), targets, lse, ent, g_lp, g_ent, N, h_op.shape[1],
                    lo, hi, inv_temp, WITH_ENTROPY=with_entropy, **_dot_flags(hidden.dtype))
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
    m = torch.full((N,), _NEG_INIT, dtype=cdt, device=h.device)  # [N] running max
    s = torch.zeros(N, dtype=cdt, device=h.device)  # [N] sum e^(z - m)
    t = torch.zeros(N, dtype=cdt, device=h.device)  # [N] sum e^(z - m) (z - m)
    zt = torch.zeros(N, dtype=cdt, device=h.device)  # [N] target logit
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
    backend = pick_backend("fused_linear_logprob", h2, weight, t1, triton_ok=hidden.dtype in _TRITON_AUTO_DTYPES)
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
