"""The one place that picks an implementation for each kernel op: "triton" or "torch".

Rule: an op runs its Triton kernel when all its tensors are on CUDA and `triton` imports; otherwise it
runs the torch implementation (chunked over the vocabulary where memory matters; what CPU training uses).

Override, for tests and debugging, in order of precedence:
  1. `with force_backend("torch"):` / `with force_backend("triton"):` (None = automatic), per thread;
  2. the environment variable VZERO_KERNEL_BACKEND=triton|torch (read at every call).
Forcing "triton" on CPU tensors is honoured only under TRITON_INTERPRET=1 (the Triton interpreter runs
the kernels on CPU tensors); otherwise it raises instead of silently running something else.

Each op logs once per backend, on logger "vzero_fast.kernels", which path ran.

`triton` / `tl` / `TensorDescriptor` (host-side TMA descriptors) are re-exported from here: pyproject installs triton on Linux only, and elsewhere a stub
keeps the kernel modules importable (only their torch paths can run then).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TRITON = True
except ImportError:  # pragma: no cover - non-Linux installs
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so `@triton.jit` files still import."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton  # type: ignore[assignment]
    TensorDescriptor = None  # type: ignore[assignment,misc]

log = logging.getLogger("vzero_fast.kernels")

BACKENDS = ("triton", "torch")
ENV_VAR = "VZERO_KERNEL_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("vzero_kernel_backend", default=None)
_logged: set[tuple[str, str]] = set()


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(name: str | None, source: str) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{source}: kernel backend must be one of {BACKENDS} or None, got {name!r}")
    return name


@contextlib.contextmanager
def force_backend(name: str | None):
    """Force every kernel op to `name` ("triton" | "torch") inside the block; None restores auto."""
    token = _forced.set(_check(name, "force_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The override in effect (context manager first, then VZERO_KERNEL_BACKEND), or None."""
    name = _forced.get()
    if name is not None:
        return name
    return _check(os.environ.get(ENV_VAR) or None, ENV_VAR)


def pick_backend(op: str, *tensors: torch.Tensor, triton_ok: bool = True) -> str:
    """Backend for one call of `op` on `tensors`; `triton_ok=False` when the op's Triton kernel does
    not cover these inputs (e.g. float64), so the automatic choice falls back to torch."""
    name = forced_backend()
    on_cuda = all(t.is_cuda for t in tensors)
    if name is None:
        name = "triton" if (HAS_TRITON and on_cuda and triton_ok) else "torch"
    elif name == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend 'triton' forced but triton is not installed")
        if not on_cuda and not interpreting():
            raise RuntimeError(f"{op}: backend 'triton' forced on CPU tensors; set TRITON_INTERPRET=1 "
                               "before importing vzero_fast.kernels to run the kernels in the interpreter")
    if (op, name) not in _logged:
        _logged.add((op, name))
        where = "interpreter" if name == "triton" and not on_cuda else str(tensors[0].device)
        log.info("kernel %s: %s path (%s)", op, name, where)
    return name
