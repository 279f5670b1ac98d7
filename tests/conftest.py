"""Shared test set-up.

TRITON_INTERPRET must be set before any module defining a @triton.jit kernel is imported, so that the
Triton kernels run on CPU tensors here (shared/ENVIRONMENT.md). It is set only when no GPU is present.

Under pytest-xdist (`-n 2`) each worker gets its share of the cores as torch threads (and so do the runs it
starts), unless OMP_NUM_THREADS is set: torch's default of one thread per core would put 4 threads on 2 cores
(docs/LOG.md, 2026-11-30, issue 13).
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_share)  # inherited by the runs the tests start
    if "torch" in globals():
        torch.set_num_threads(_share)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory):
    """A format-warmed tiny model (the tiny preset's V-Zero warm-up, made once per test module that asks): V-Zero
    rewards are all -1 on a random model, which would leave nothing to train and make every comparison of two
    runs trivially equal (tests/test_resume.py, tests/test_lora_train.py)."""
    from _runs import train

    run = tmp_path_factory.mktemp("warmup") / "run"
    train(["--recipe", "vzero", "--preset", "tiny", "--iterations", "1", "--max-steps-per-role", "1",
           "--out", str(run)])
    return run / "format-warmup"
