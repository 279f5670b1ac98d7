"""The one tolerance table for the kernel tests (tests/test_kernels_*.py).

Errors are norm-wise: max |actual - expected| / max |expected|, against a float64 reference computed
from the same (rounded) inputs. Element-wise relative error is meaningless for gradients with entries
near zero; the norm-wise error is what bounds a training step.

- fp32 inputs: within FP32_RTOL of the float64 reference (the issue's "fp32 within 1e-5 relative").
- bf16 / fp16 inputs: no worse than LOWP_FACTOR times the error of the plain torch computation in that
  dtype (the naive reference run on the low-precision inputs), measured in the same test.
- Clip fractions (ratios of counts): METRIC_ATOL absolute; a count flips only at a clip boundary. Other
  metrics (mean ratio, KL, entropy) are fp32 values: FP32_RTOL.
"""

from __future__ import annotations

import torch

FP32_RTOL = 1e-5
LOWP_FACTOR = 2.0
METRIC_ATOL = 1e-6
_TINY = 1e-12  # an all-zero reference (e.g. the gradient of an all-masked batch) must be matched to this


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (absolute when expected is all zero)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    if a.numel() == 0:
        return 0.0
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - e).abs().max() / e.abs().max().clamp_min(_TINY)).item()


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= FP32_RTOL, f"{what}: relative error {err:.3e} > {FP32_RTOL:.0e}"


def assert_lowp_close(actual: torch.Tensor, naive: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """`actual` (our low-precision result) vs `naive` (torch in the same dtype), both against float64."""
    ours, theirs = rel_err(actual, expected), rel_err(naive, expected)
    assert ours <= LOWP_FACTOR * theirs + _TINY, (
        f"{what}: error {ours:.3e} > {LOWP_FACTOR} x naive low-precision error {theirs:.3e}")
