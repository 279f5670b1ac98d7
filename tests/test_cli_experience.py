"""The run as a person sees it: mistakes in the command are one line and exit 2 before anything is written;
a run whose output is redirected logs one line per step; the end-of-run summary counts the skipped files by
reason; a --model without --preset gets the preset that fits; the docs name no machine path."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _runs import ENV, TRAIN
from PIL import Image

from vzero_fast.config import ConfigError

pytest_plugins = ["_tiny_fixture"]

REPO = Path(__file__).resolve().parent.parent


def _mistake(tmp_path, *args):
    """Run `train` with a mistake: exit 2, exactly one line on stderr, no traceback, nothing written."""
    out = tmp_path / "run"
    proc = subprocess.run([*TRAIN, "--out", str(out), *args], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return lines[0]


def test_empty_image_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    line = _mistake(tmp_path, "--images", str(tmp_path / "empty"))
    assert "--images" in line and "no images" in line and ".png" in line


def test_missing_image_source(tmp_path):
    line = _mistake(tmp_path, "--images", str(tmp_path / "nonexistent"))
    assert "--images" in line and "does not exist" in line


def test_single_image_file(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    line = _mistake(tmp_path, "--images", str(tmp_path / "photo.png"))
    assert "--images" in line and "photo.png" in line and "folder" in line


def test_listing_without_paths(tmp_path):
    (tmp_path / "list.jsonl").write_text('{"caption": "a cat"}\n')
    line = _mistake(tmp_path, "--images", str(tmp_path / "list.jsonl"))
    assert "--images" in line and '"image" or "path"' in line


def test_not_a_model(tmp_path):
    line = _mistake(tmp_path, "--model", str(tmp_path / "notamodel"))
    assert "--model" in line and "notamodel" in line and "warm-up" not in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda is valid here")
def test_cuda_without_gpu(tmp_path):
    line = _mistake(tmp_path, "--device", "cuda")
    assert "--device cuda" in line


def test_vllm_backend_without_vllm(tmp_path):
    from vzero_fast.rollout_vllm import vllm_unavailable

    if vllm_unavailable() is None:
        pytest.skip("vllm imports here: --rollout.backend vllm is valid")
    line = _mistake(tmp_path, "--rollout.backend", "vllm")
    assert "--rollout.backend vllm" in line and "vllm does not import" in line and "native" in line


def test_unknown_config_key(tmp_path):
    line = _mistake(tmp_path, "--solver.rolout_n", "4")
    assert "rollout_n" in line  # the suggestion


def test_help_config_into_a_closed_pipe():
    """`vzero-fast config --help-config | head -1`: the reader leaves early; no BrokenPipeError."""
    proc = subprocess.Popen([sys.executable, "-m", "vzero_fast", "config", "--help-config"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == "", err


def _fake_model(path, hidden):
    """A directory that passes check_model_dir with a given text hidden size (no real weights needed)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "text_config": {"hidden_size": hidden}}))
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (path / name).write_text("")
    return path


def test_preset_follows_the_model(tmp_path, tiny_model_dir):
    from vzero_fast.cli import preset_for_model

    assert preset_for_model(_fake_model(tmp_path / "3b", 2048)) == "vzero-3b"
    assert preset_for_model(_fake_model(tmp_path / "7b", 3584)) == "vzero-7b"
    assert preset_for_model(tiny_model_dir) == "tiny"
    with pytest.raises(ConfigError, match="vzero-3b, vzero-7b"):
        preset_for_model(_fake_model(tmp_path / "32b", 5120))


def test_mmzero_on_a_7b_model_gets_the_mmzero_preset(tmp_path):
    """--recipe mmzero --model <7B> without --preset: MM-Zero's settings (Solver groups of 8, 72 proposals a step),
    not V-Zero's."""
    from vzero_fast.cli import _train_config, build_parser

    model = _fake_model(tmp_path / "7b", 3584)
    args, extra = build_parser().parse_known_args(["train", "--recipe", "mmzero", "--model", str(model)])
    cfg = _train_config(args, extra)
    assert (cfg.train.recipe, cfg.solver.rollout_n, cfg.proposer.prompts_per_step) == ("mmzero", 8, 18)
    args, extra = build_parser().parse_known_args(["train", "--recipe", "vzero", "--model", str(model)])
    assert _train_config(args, extra).solver.rollout_n == 5


def _plant_images(folder):
    """6 good images and one bad file per skip reason; returns the planted reasons."""
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (80 + 8 * i, 64), (40 * i, 100, 200)).save(folder / f"good{i}.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image at all\n" * 20)
    buf = folder / "cut.jpg"
    Image.new("RGB", (256, 256), (10, 200, 30)).save(buf, quality=95)
    data = buf.read_bytes()
    buf.write_bytes(data[: len(data) // 2])  # truncated
    Image.new("L", (20000, 2)).save(folder / "huge.png")  # a side above 16384 px
    Image.new("RGB", (600, 2)).save(folder / "sliver.png")  # aspect ratio above 200
    (folder / "readme.txt").write_text("ignored by extension")
    return {"empty": 1, "not_image": 1, "truncated": 1, "too_large": 1, "bad_aspect": 1}


@pytest.mark.slow
def test_redirected_run_logs_steps_and_summary_counts_skips(tmp_path, tiny_model_dir):
    planted = _plant_images(tmp_path / "imgs")
    out = tmp_path / "run"
    # 11 candidates, 4 prompts per step: 3 steps read every file of the first epoch.
    proc = subprocess.run([*TRAIN, "--recipe", "toy", "--preset", "tiny", "--model", str(tiny_model_dir),
                           "--images", str(tmp_path / "imgs"), "--iterations", "1", "--max-steps-per-role", "3",
                           "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = re.findall(r"policy iter 1 step (\d+)/3: reward", proc.stderr)
    assert steps == ["1", "2", "3"], proc.stderr[-3000:]
    assert "native rollout" not in proc.stderr  # per-call engine lines are DEBUG
    assert "Loading weights" not in proc.stderr and "Writing model shards" not in proc.stderr

    summary = json.loads((out / "run_summary.json").read_text())
    images = summary["images"]
    assert images["skipped_by_reason"] == planted
    assert images["skipped"] == sum(planted.values()) and images["loaded"] == 6 and images["not_read"] == 0
    assert images["ignored_by_extension"] == 1
    assert summary["status"] == "finished" and summary["steps"] == {"policy": 3}
    assert "5 skipped" in proc.stdout and "run finished" in proc.stdout


MACHINE_PATH = re.compile(r"(/work/|/root/|/home/\w|/Users/|/opt/|/tmp/|\.\./shared)")


def test_no_machine_paths_or_links_outside_the_repository():
    files = [REPO / "README.md", *(REPO / "docs").rglob("*"), *(REPO / "benchmarks").rglob("*"),
             *(REPO / "vzero_fast").rglob("*.py"), *(REPO / "kernels").rglob("*.py"), REPO / "pyproject.toml"]
    hits = []
    for f in files:
        if f.is_file() and f.suffix in (".md", ".py", ".toml", ".txt", ".json"):
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if MACHINE_PATH.search(line):
                    hits.append(f"{f.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_plots_break_a_role_where_another_trains(tmp_path):
    pytest.importorskip("matplotlib")
    from vzero_fast.metrics import _segments, plot_run

    rows, g = [], 0
    for it in (1, 2):
        for role in ("questioner", "solver"):
            for step in (1, 2):
                g += 1
                rows.append({"role": role, "iteration": it, "step": step, "global_step": g, "reward_mean": g / 10,
                             "reward_std": 0.1, "loss": 0.5, "time_rollout": 0.2, "time_train": 0.3,
                             **({"valid_question_rate": 0.5} if role == "questioner" else {})})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questioner = [r for r in rows if r["role"] == "questioner"]
    assert [xs for xs, _, _ in _segments(questioner, "reward_mean")] == [[1, 2], [5, 6]]
    names = {p.name for p in plot_run(tmp_path)}
    assert {"reward.png", "loss.png", "time.png", "vzero_questioner.png", "overview.png"} <= names
    assert "kl.png" not in names  # no data, no empty plot
