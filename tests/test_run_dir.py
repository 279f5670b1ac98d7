"""A run directory is never destroyed or mixed by accident: `train` into a non-empty --out refuses unless
--resume or --overwrite says what to do; a reused format warm-up must match the settings that made it; a
crash before the first checkpoint resumes from the beginning (toy recipe, tiny model, CPU)."""

import json
import shutil
import subprocess

import pytest
from _runs import ENV, TRAIN, stable_metrics, train, train_until_killed

pytest_plugins = ["_tiny_fixture"]


def _toy(model_dir, *extra):
    return ["--recipe", "toy", "--preset", "tiny", "--model", str(model_dir), "--iterations", "1",
            "--max-steps-per-role", "2", *extra]


def _fails(args, *, alone=True):
    """Exit 2 with the reason as the last line of stderr, no traceback (and nothing else when `alone`)."""
    proc = subprocess.run([*TRAIN, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 or not alone, proc.stderr[-3000:]
    return lines[-1]


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_nonempty_out_refuses_without_resume_or_overwrite(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"old": 1}\n')
    line = _fails([*_toy(tiny_model_dir), "--out", str(out)])
    assert "--resume" in line and "--overwrite" in line and str(out) in line
    assert _listing(out) == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == '{"old": 1}\n'

    line = _fails([*_toy(tiny_model_dir), "--out", str(out), "--resume", "--overwrite"])
    assert "--resume" in line and "--overwrite" in line
    assert _listing(out) == ["metrics.jsonl"]


def test_overwrite_replaces_the_whole_run(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    (out / "checkpoints" / "policy" / "iter-7").mkdir(parents=True)  # debris of an older, longer run
    (out / "metrics.jsonl").write_text('{"old": 1}\n')
    train([*_toy(tiny_model_dir), "--out", str(out), "--overwrite"])
    assert not (out / "checkpoints" / "policy" / "iter-7").exists()
    rows = stable_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all("old" not in r for r in rows)


def test_overwrite_never_deletes_an_input(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out / "model")
    line = _fails([*_toy(out / "model"), "--out", str(out), "--overwrite"])
    assert "--overwrite" in line and "model" in line
    assert (out / "model" / "config.json").exists()


def test_crash_before_the_first_checkpoint_resumes_from_the_start(tmp_path, tiny_model_dir):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train([*_toy(tiny_model_dir), "--out", str(full)])
    assert train_until_killed(_toy(tiny_model_dir), cut, at="step:1") == 1  # no checkpoint yet
    assert not (cut / "checkpoints" / "latest.json").exists()
    train(["--resume", "--out", str(cut)])
    assert stable_metrics(cut) == stable_metrics(full)


@pytest.mark.slow
def test_reused_format_warmup_must_match_its_settings(tmp_path, tiny_model_dir):
    """A run directory whose format warm-up was made with other settings (here: another warm-up lr) is not
    silently reused on --resume."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(tiny_model_dir, out / "format-warmup")
    made_with = {"model": str(tiny_model_dir), "format_warmup_lr": 1.0}
    (out / "format_warmup.json").write_text(json.dumps({"steps": 150, "made_with": made_with}))
    line = _fails(["--recipe", "vzero", "--preset", "tiny", "--model", str(tiny_model_dir), "--iterations", "1",
                   "--out", str(out), "--resume"], alone=False)
    assert "format-warmup" in line and "format_warmup_lr" in line
