"""The trainer end to end on the tiny model (CPU): it learns a verifiable reward; a run stopped by SIGTERM
and resumed ends with exactly the metrics of an uninterrupted run; checkpoints load in transformers."""

import json
import math
from pathlib import Path

import pytest
import torch
from _runs import assert_same_weights, stable_metrics, train, train_until_signal

from vzero_fast.config import parse_overrides, resolve
from vzero_fast.metrics import read_metrics

pytest_plugins = ["_tiny_fixture"]

def _run(cfg, resume=False):
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    trainer = Trainer(cfg, resume=resume)
    return trainer.run(build_recipe(cfg.train.recipe, trainer)), trainer


def _cfg(tmp_path, model_dir, *args):
    return resolve("tiny", None, parse_overrides(["--train.out", str(tmp_path), "--model.path", str(model_dir),
                                                  "--train.recipe", "toy", *args]))


@pytest.mark.slow
def test_toy_reward_is_learned(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, "--train.iterations", "1", "--train.max_steps_per_role", "24")
    state, trainer = _run(cfg)
    rows = read_metrics(tmp_path)
    assert len(rows) == 24 == state["global_step"]
    rewards = [r["reward_mean"] for r in rows]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert start < 0.2, rewards
    assert end > 0.6, rewards
    for row in rows:  # every documented metric is present and finite
        for key in ("reward_mean", "reward_std", "loss", "kl", "clip_frac_low", "clip_frac_high", "entropy",
                    "response_length_mean", "response_length_max", "tokens", "rollout_tokens_per_s",
                    "logprob_diff", "time_rollout", "time_reward", "time_train"):
            assert row[key] is not None and math.isfinite(row[key]), (key, row)
        assert row["role"] == "policy" and row["iteration"] == 1
    assert (tmp_path / "config.toml").exists() and (tmp_path / "toy_targets.json").exists()


def _trained_dir(run_dir: Path) -> Path:
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return run_dir / "checkpoints" / latest["roles"]["policy"]


def test_checkpoint_loads_in_transformers_and_plots(tmp_path, tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vzero_fast.model import check_model_dir, encode_prompts, forward_hidden, load_policy

    cfg = _cfg(tmp_path, tiny_model_dir, "--train.iterations", "2", "--train.max_steps_per_role", "2",
               "--train.save_every", "1", "--train.keep_last", "2")
    _, trainer = _run(cfg)
    ckpt = tmp_path / "checkpoints"
    # keep_last step dirs, plus one kept directory per iteration.
    assert sorted(p.name for p in (ckpt / "policy").iterdir()) == ["iter-1", "iter-2", "step-000003", "step-000004"]
    assert len(list(ckpt.glob("trainer_state-*.pt"))) == 2
    saved = _trained_dir(tmp_path)
    check_model_dir(saved)  # every file a model directory needs
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(saved, dtype=torch.float32).eval()
    live = trainer.roles["policy"].policy
    for name, p in live.model.state_dict().items():
        assert torch.equal(hf.state_dict()[name], p), name
    ours = load_policy(saved, dtype="float32", device="cpu", attn_implementation="sdpa")
    from vzero_fast.data import synthetic_figure

    batch = encode_prompts(ours, [synthetic_figure(0, size=56)], ["Describe the figure."])
    with torch.no_grad():
        logits = hf(**batch).logits
        hidden = forward_hidden(ours, **batch)
    torch.testing.assert_close(hidden @ ours.lm_head_weight.T, logits, rtol=1e-5, atol=1e-5)
    # The weights moved away from the base model.
    base = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    assert not torch.equal(base.lm_head_weight, ours.lm_head_weight)

    from vzero_fast.metrics import plot_run

    pytest.importorskip("matplotlib")
    pngs = plot_run(tmp_path)
    assert {p.name for p in pngs} >= {"reward.png", "loss.png", "kl.png", "entropy.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    args = ["--preset", "tiny", "--recipe", "toy", "--model", str(tiny_model_dir), "--iterations", "2",
            "--max-steps-per-role", "4", "--save-every", "3", "--policy.mini_batches", "2",
            "--policy.rollout_n", "4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train([*args, "--out", str(full)])
    want = stable_metrics(full)
    assert len(want) == 8

    # mid-way: in iteration 2, between two periodic checkpoints
    stopped_at, out = train_until_signal(args, cut, after_rows=5)
    assert 5 <= stopped_at < 8, "SIGTERM should stop the run before its end"
    assert b"--resume" in out

    train(["--resume", "--out", str(cut)])
    assert stable_metrics(cut) == want  # nothing lost, nothing repeated, the same numbers
    for name in ("policy/iter-1", "policy/iter-2"):
        assert_same_weights(full / "checkpoints" / name, cut / "checkpoints" / name)
