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
VOLATILE = ("time_", "rollout_tokens_per_s")


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def stable_metrics(run_dir: Path) -> list[dict]:
    return [stable(r) for r in read_metrics(run_dir)]


def train(args: list[str], *, timeout: float = 900) -> None:
    subprocess.run([*TRAIN, *args], check=True, env=ENV, capture_output=True, timeout=timeout)


def train_until_sigterm(args: list[str], out: Path, *, after_rows: int, timeout: float = 900) -> tuple[int, bytes]:
    """Start a run, send SIGTERM once `after_rows` metrics rows exist; returns (rows at exit, its output).
    The run must exit 0 (it saves a checkpoint and stops cleanly)."""
    proc = subprocess.Popen([*TRAIN, *args, "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while len(read_metrics(out)) < after_rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output.decode()[-3000:]
    return len(read_metrics(out)), output


def assert_same_weights(dir_a: Path, dir_b: Path) -> None:
    a = load_file(next(dir_a.glob("*.safetensors")))
    b = load_file(next(dir_b.glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (dir_a, dir_b)
