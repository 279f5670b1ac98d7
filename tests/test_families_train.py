"""Training on the Qwen3 families end to end (CPU, tiny models of tests/test_families.py's kind): the toy recipe
learns its verifiable reward, and one tiny V-Zero iteration runs through both roles and writes checkpoints
in the family's own format that transformers loads with the family's class. Qwen2.5-VL's runs are
tests/test_trainer.py and tests/test_vzero.py.
"""

import math

import pytest
import torch
from safetensors.torch import load_file

from vzero_fast.config import parse_overrides, resolve
from vzero_fast.metrics import read_metrics
from vzero_fast.model import check_model_dir, model_class
from vzero_fast.tiny import build_tiny

QWEN3_FAMILIES = ("qwen3_vl", "qwen3_5")


@pytest.fixture(scope="module", params=QWEN3_FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, build_tiny(tmp_path_factory.mktemp(f"tiny_{request.param}"), seed=0, family=request.param)


def _run(out, model_dir, recipe, *args):
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    cfg = resolve("tiny", None, parse_overrides(["--train.out", str(out), "--model.path", str(model_dir),
                                                 "--train.recipe", recipe, "--train.iterations", "1", *args]))
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg)
        state = trainer.run(build_recipe(recipe, trainer))
    finally:
        torch.set_num_threads(threads)  # the tiny preset sets 1 thread; leave the session as it was
    return state, trainer


@pytest.mark.slow
def test_toy_reward_is_learned(family_dir, tmp_path):
    family, model_dir = family_dir
    state, _ = _run(tmp_path, model_dir, "toy", "--train.max_steps_per_role", "24")
    rewards = [r["reward_mean"] for r in read_metrics(tmp_path)]
    assert len(rewards) == 24 == state["global_step"]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    print(f"{family}: toy reward {start:.2f} (first 3 steps) -> {end:.2f} (last 5)")
    assert start < 0.3, rewards
    assert end > 0.7, rewards


@pytest.mark.slow
def test_tiny_vzero_iteration(family_dir, tmp_path):
    family, model_dir = family_dir
    state, trainer = _run(tmp_path, model_dir, "vzero", "--train.max_steps_per_role", "1",
                          "--data.synthetic_images", "16")
    assert state["global_step"] == 2
    rows = read_metrics(tmp_path)
    assert [(r["role"], r["step"]) for r in rows] == [("questioner", 1), ("solver", 1)]
    for row in rows:
        for key in ("reward_mean", "loss", "kl", "entropy", "grad_norm", "logprob_diff", "time_rollout"):
            assert row[key] is not None and math.isfinite(row[key]), (key, row)
        assert row["logprob_diff"] < 1e-4  # the engine's log-probs are the trainer's (fp32)
    for role in ("questioner", "solver"):
        saved = check_model_dir(tmp_path / "checkpoints" / role / "iter-1")
        hf, info = model_class(family).from_pretrained(saved, dtype=torch.float32, output_loading_info=True)
        assert hf.config.model_type == family and not info["missing_keys"] and not info["unexpected_keys"]
        on_disk = load_file(saved / "model.safetensors")
        live = trainer.roles[role].policy.model.state_dict()
        assert set(on_disk) <= set(live)
        assert all(torch.equal(live[k], v) for k, v in on_disk.items())
