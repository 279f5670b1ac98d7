"""LoRA under torchrun + FSDP2 (2 gloo ranks on CPU): the adapters are sharded, the shared base is replicated
(vzero_fast/distributed.py, `ignored_params`), and 2 ranks equal one process, step by step and in the saved
adapters; a 1-process LoRA checkpoint resumes on 2 ranks to the same end. ~1 min on 2 cores.

Tolerances are tests/test_distributed.py's reasoning: fp32 sums in another order (micro-batches, ranks). The
adapters are compared to 1e-3 of one AdamW step (lr): a lost or doubled rank contribution moves them by O(lr).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vzero_fast.metrics import read_metrics

LR = 1e-3
TOY = ["--preset", "tiny", "--recipe", "toy", "--max-steps-per-role", "2", "--policy.mini_batches", "2",
       "--policy.rollout_n", "4", "--policy.max_response_tokens", "6", "--policy.micro_batch_tokens", "120",
       "--policy.lr", str(LR), "--dist.timeout_s", "60", "--model.lora.rank", "4"]
RTOL = 1e-4
ADAPTER_ATOL = 1e-3 * LR


def _env():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(args, *, ranks=0, timeout=300):
    if ranks:
        exe = Path(sys.executable).with_name("torchrun")
        launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
        cmd = [*launcher, "--standalone", f"--nproc_per_node={ranks}", "-m", "vzero_fast", "train", *args]
    else:
        cmd = [sys.executable, "-m", "vzero_fast", "train", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc.stderr + proc.stdout


def _assert_same(run_a: Path, run_b: Path):
    rows_a, rows_b = read_metrics(run_a), read_metrics(run_b)
    assert len(rows_a) == len(rows_b) == 4
    for a, b in zip(rows_a, rows_b, strict=True):
        for k in ("reward_mean", "tokens", "groups_kept"):
            assert a[k] == b[k], (k, a[k], b[k])
        for k in ("loss", "grad_norm", "kl"):
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=1e-9), (k, a[k], b[k])
    for it in (1, 2):
        wa = load_file(run_a / "checkpoints" / "policy" / f"iter-{it}" / "adapter_model.safetensors")
        wb = load_file(run_b / "checkpoints" / "policy" / f"iter-{it}" / "adapter_model.safetensors")
        assert wa.keys() == wb.keys()
        assert max(wb[k].abs().max().item() for k in wb if "lora_B" in k) > 2 * LR  # trained (4 AdamW steps of ~lr)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=ADAPTER_ATOL)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    _run([*TOY, "--out", str(out)])
    return out


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_adapters(one_process, tmp_path):
    out = tmp_path / "two"
    log = _run([*TOY, "--out", str(out)], ranks=2)
    assert "loaded the shared frozen base" in log
    # The adapters (4 x 7 layers, rank 4) are sharded; the 1.68M-parameter base is replicated, not sharded.
    assert "0.04M parameters sharded, 1.68M replicated (ignored)" in log, log[-3000:]
    _assert_same(out, one_process)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_ranks(one_process, tmp_path):
    out = tmp_path / "a"
    _run([*TOY, "--iterations", "1", "--out", str(out)])
    log = _run(["--resume", "--out", str(out), "--iterations", "2"], ranks=2)
    assert "saved by 1 rank(s), now 2" in log
    _assert_same(out, one_process)
