"""What users reach for around a run (issue 18): a profile of chosen steps, TensorBoard / W&B tracking, the
`vzero-fast bench` command and the one-launch kernel script for ncu. One tiny toy run (3 steps, steps 2-3
profiled, every tracker on) is shared by the module.

References: metrics.jsonl (what the trackers must repeat, read back with TensorBoard's own reader), the trace
file itself (JSON, read independently of torch), the benchmarks' own last JSON line.
"""

import json
import subprocess
import sys

import pytest

from vzero_fast.cli import main
from vzero_fast.metrics import read_metrics

pytest_plugins = ["_tiny_fixture"]

STAGES = ("rollout", "reward", "logprob", "train", "weight_sync")  # the toy recipe's timed stages


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    out = tmp_path_factory.mktemp("tools") / "run"
    code = main(["train", "--recipe", "toy", "--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(out),
                 "--iterations", "1", "--max-steps-per-role", "3", "--profile.steps", "2:3",
                 "--train.report_to", "jsonl,tensorboard,wandb"])
    assert code == 0
    return out


def test_profile_holds_every_stage_of_the_chosen_steps(run_dir):
    trace = run_dir / "profile" / "trace-steps-2-3.json"
    data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = [e.get("name", "") for e in events]
    for stage in STAGES:  # steps 2 and 3 only: each stage range twice, not 3 times
        assert names.count(f"stage/{stage}") == 2, (stage, names.count(f"stage/{stage}"))
    summary = (run_dir / "profile" / "summary.md").read_text()
    for stage in STAGES:
        assert f"| {stage} | 2 |" in summary
    assert "| operator |" in summary and "aten::" in summary


def test_tensorboard_repeats_the_metrics(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    rows = read_metrics(run_dir)
    assert len(rows) == 3
    for key in ("reward_mean", "loss", "kl", "time_rollout"):
        events = acc.Scalars(f"policy/{key}")
        assert [e.step for e in events] == [r["global_step"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 storage
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_wandb_offline_run_in_the_run_dir(run_dir):
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0


def test_missing_tracker_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = main(["train", "--recipe", "toy", "--preset", "tiny", "--out", str(tmp_path / "r"),
                 "--train.report_to", "wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install wandb" in err[0]
    assert not (tmp_path / "r").exists()


def test_report_to_and_profile_steps_are_validated(tmp_path, capsys):
    for flag, value in (("--train.report_to", "jsonl,mlflow"), ("--profile.steps", "3:1"), ("--profile.steps", "x")):
        assert main(["train", "--recipe", "toy", "--preset", "tiny", "--out", str(tmp_path / "r"), flag, value]) == 2
        assert flag.removeprefix("--") in capsys.readouterr().err


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("what", ["kernels", "step", "rollout"])
def test_bench_runs_on_the_cpu(what, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "vzero_fast", "bench", what, "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = _last_json(proc.stdout)
    assert last == json.loads(out.read_text())
    assert "| " in proc.stdout  # the table before the JSON line
    if what == "kernels":  # ours and the naive baseline, measured in this run
        assert last["logprob"]["fused_s"] > 0 and last["logprob"]["naive_s"] > 0
        assert last["grpo_loss"]["reference_s"] > 0 and last["vote_count"]["reference_s"] > 0
    elif what == "step":
        assert last["step"]["time_train"] > 0 and last["rollout"]["hf_generate_tokens_per_s"] > 0
    else:
        best = last["results"][0]["best"]
        assert best["native_tokens_per_s"] > 0 and best["hf_generate_tokens_per_s"] > 0


def test_bench_sync_without_vllm_is_one_line(capsys):
    from vzero_fast.rollout_vllm import vllm_unavailable

    if vllm_unavailable() is None:
        pytest.skip("vLLM imports here: bench sync would run")
    assert main(["bench", "sync", "--smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs vLLM" in err[0]


@pytest.mark.parametrize("kernel", ["logprob_fwd", "logprob_fwd_bwd", "grpo_loss_fwd_bwd", "vote_count"])
def test_kernel_once_launches_on_the_cpu(kernel):
    proc = subprocess.run([sys.executable, "benchmarks/kernel_once.py", kernel, "--smoke"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = _last_json(proc.stdout)
    assert last["kernel"] == kernel and last["backend"] == "triton" and last["note"] == "not measured on GPU"
