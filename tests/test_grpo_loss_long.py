"""The Triton GRPO loss beyond one block: responses longer than kernels/grpo_loss.py's _MAX_BLOCK_T (1024
tokens per step), where the forward loops over blocks and the backward launches several per row. On a CPU
the kernels run in the Triton interpreter (tests/conftest.py). Against the float64 reference of ALGORITHMS.md
section 0 (kernels' grpo_loss_reference), with the plain fp32 computation as the yardstick (tests/tolerances.py).

Run: `pytest tests/test_grpo_loss_long.py` (~10 s on one CPU thread).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import METRIC_ATOL, assert_fp32_close

from vzero_fast.kernels import force_backend, grpo_loss, grpo_loss_reference
from vzero_fast.kernels.grpo_loss import _MAX_BLOCK_T, METRICS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU = the interpreter
LENGTHS = [2500, 1300, 0, 1025]  # 3 blocks, 2 blocks, an empty row, one token into the 2nd block


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    logp = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1.0
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64)  # every clip branch, dual clip included
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)  # per token: both signs in every block
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    return [t.float().double() for t in (logp, old, ref, adv)] + [mask]  # fp32-representable values


def _run(fn, logp, adv, mask, dtype, device, **kw):
    lp = logp.to(device, dtype, copy=True).requires_grad_()
    kw = {k: (v.to(device, dtype) if torch.is_tensor(v) else v) for k, v in kw.items()}
    loss, metrics = fn(lp, adv.to(device, dtype), mask.to(device), **kw)
    (loss * 1.7).backward()  # a non-unit upstream gradient
    return loss, metrics, lp.grad


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_triton_grpo_loss_beyond_one_block(loss_agg):
    assert max(LENGTHS) > 2 * _MAX_BLOCK_T
    logp, old, ref, adv, mask = _inputs(seed=len(loss_agg))
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, kl_type="k3", clip_c=3.0, loss_agg=loss_agg)
    expected = _run(grpo_loss_reference, logp, adv, mask, torch.float64, "cpu", **kw)
    naive = _run(grpo_loss_reference, logp, adv, mask, torch.float32, "cpu", **kw)
    with force_backend("triton"):
        got = _run(grpo_loss, logp, adv, mask, torch.float32, DEVICE, **kw)
    assert expected[1]["clip_frac_dual"] > 0
    assert_fp32_close(got[0], naive[0], expected[0], f"{loss_agg} loss")
    assert_fp32_close(got[2], naive[2], expected[2], f"{loss_agg} grad")
    # Every block of every row has a gradient (a block left out would leave zeros there).
    for b, n in enumerate(LENGTHS):
        for t0 in range(0, n, _MAX_BLOCK_T):
            assert got[2][b, t0: min(n, t0 + _MAX_BLOCK_T)].abs().sum() > 0, (b, t0)
    for k in METRICS:
        if k.startswith("clip_frac"):
            assert abs(got[1][k].item() - expected[1][k].item()) <= METRIC_ATOL, k
        else:
            assert_fp32_close(got[1][k], naive[1][k], expected[1][k], f"{loss_agg} {k}")
