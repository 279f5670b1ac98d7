"""Helpers for tests that run `python -m vzero_fast train` as a user would: whole runs, a SIGTERM mid-run,
and comparisons of metrics and checkpoints between runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vzero_fast.metrics import read_metrics

TRAIN = [sys.executable, "-m", "vzero_fast", "train"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# Wall-clock and throughput differ between any two runs; everything else must be identical.
VOLATILE = ("time_", "rollout_tokens_per_s", "weight_sync_gbps")


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def stable_metrics(run_dir: Path) -> list[dict]:
    return [stable(r) for r in read_metrics(run_dir)]


def train(args: list[str], *, timeout: float = 900) -> None:
    subprocess.run([*TRAIN, *args], check=True, env=ENV, capture_output=True, timeout=timeout)


def train_until_signal(args: list[str], out: Path, *, after_rows: int, sig: int = signal.SIGTERM,
                      timeout: float = 900) -> tuple[int, bytes]:
    """Start a run, send `sig` once `after_rows` metrics rows exist; returns (rows at exit, its output).
    The run must save a checkpoint, stop cleanly and exit with the shell's code for the signal (128 + sig)."""
    proc = subprocess.Popen([*TRAIN, *args, "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while len(read_metrics(out)) < after_rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 128 + sig, (proc.returncode, output.decode()[-3000:])
    return len(read_metrics(out)), output


def train_until_killed(args: list[str], out: Path, *, at: str, timeout: float = 900) -> int:
    """Run until the test hook VZERO_TEST_KILL_AT=`at` (vzero_fast/checkpoint.py `kill_point`) SIGKILLs it;
    returns the metrics rows on disk."""
    proc = subprocess.run([*TRAIN, *args, "--out", str(out)], env={**ENV, "VZERO_TEST_KILL_AT": at},
                          capture_output=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.decode()[-3000:])
    return len(read_metrics(out))


def assert_same_weights(dir_a: Path, dir_b: Path) -> None:
    a = load_file(next(dir_a.glob("*.safetensors")))
    b = load_file(next(dir_b.glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (dir_a, dir_b)
