"""Kernels (shipped as `vzero_fast.kernels`): fused lm_head log-prob/entropy, GRPO loss, vote counting.

Each op has a Triton implementation (CUDA, or CPU tensors under TRITON_INTERPRET=1), a torch
implementation (what CPU runs) and a naive `*_reference` shared by tests and benchmarks. Which one runs
is decided in `dispatch.py`; force it with `force_backend("triton" | "torch" | None)` or the environment
variable VZERO_KERNEL_BACKEND.
"""

from .dispatch import force_backend
from .grpo_loss import fused_grpo_loss, fused_grpo_loss_reference, grpo_loss, grpo_loss_reference
from .logprob import fused_linear_logprob, fused_linear_logprob_reference
from .vote import vote_count, vote_count_reference

__all__ = [
    "force_backend",
    "fused_grpo_loss",
    "fused_grpo_loss_reference",
    "fused_linear_logprob",
    "fused_linear_logprob_reference",
    "grpo_loss",
    "grpo_loss_reference",
    "vote_count",
    "vote_count_reference",
]
