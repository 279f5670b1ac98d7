"""The Self-Judge recipe (vzero_fast/recipes/selfjudge.py) beyond its rules (tests/test_selfjudge_rules.py):
skipping the Judge for responses whose prior is 0 gives exactly the rewards of judging everything (a fake
Judge that answers from each request's seed, and the tiny model's own engine); the Judge is the Actor's KL
reference module (one frozen copy); the tiny run end to end through the CLI (finite metrics, checkpoints that
transformers loads) and a SIGTERM + --resume that ends with the uninterrupted run's metrics and weights."""

import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from _runs import assert_same_weights, stable_metrics, train, train_until_signal

from vzero_fast.config import parse_overrides, resolve
from vzero_fast.data import synthetic_figure
from vzero_fast.metrics import read_metrics
from vzero_fast.recipes.selfjudge import SelfJudgeRecipe, judge_text

pytest_plugins = ["_tiny_fixture"]

WELL = "<think>look</think> \\boxed{{{}}}"
# (responses, prior b written out by hand from ALGORITHMS.md section 3, well-formed flags)
GROUPS = [
    ([WELL.format(4)] * 7 + [WELL.format(5)], [1.0] * 7 + [0.0], [True] * 8),      # p = 7/8 > 0.85: "5" gets 0
    (["\\boxed{3}"] * 8, [1.0] * 8, [False] * 8),                                  # p = 1, none well formed
    ([WELL.format(2)] * 7 + ["no box at all"], [1.0] * 7 + [0.0], [True] * 7 + [False]),  # the None minority: 0
    ([WELL.format(1)] * 4 + [WELL.format(2)] * 2 + ["x", "y"], [0.5] * 4 + [0.25] * 4,  # p = 1/2: count / n
     [True] * 6 + [False] * 2),
]


def _g(s: float) -> float:
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    return min(max(1 + 0.2 * sig((s - 0.95) / 0.02) - 0.2 * sig((0.40 - s) / 0.05), 0.8), 1.2)


class SeedJudge:
    """A Judge whose score is a function of the request's seed: a response judged under another seed (e.g. one
    derived from its place in the batch) would get another score. Records every call."""

    def __init__(self):
        self.calls = []

    def generate(self, requests):
        self.calls.append(requests)
        return [SimpleNamespace(samples=[SimpleNamespace(text=f"[BEGIN SCORES]{{}}[END SCORES] "
                                                             f"\\boxed{{{(r.params.seed % 1001) / 1000}}}")])
                for r in requests]


def _recipe(engine, **rules):
    recipe = object.__new__(SelfJudgeRecipe)  # the reward needs the rules, the seed and the Judge's engine
    recipe.seed = 0
    recipe.rules = resolve("tiny", None, parse_overrides([f"--selfjudge.{k}={v}" for k, v in rules.items()])).selfjudge
    recipe.judge_engine = engine
    return recipe


def _outputs(image):
    return [SimpleNamespace(request=SimpleNamespace(images=[image], meta={"question": f"q{g}", "position": 10 + g}),
                            samples=[SimpleNamespace(text=t) for t in texts])
            for g, (texts, _, _) in enumerate(GROUPS)]


def test_skipping_prior_zero_equals_judging_everything():
    image = synthetic_figure(0, 56)
    judge = SeedJudge()
    recipe = _recipe(judge)
    outputs = _outputs(image)
    stats = {}
    skipped = recipe.rewards(outputs, iteration=1, stats=stats)
    everything = recipe.rewards(outputs, iteration=1, judge_all=True)
    assert torch.equal(skipped, everything)
    few, alls = judge.calls
    assert len(judge.calls) == 2 and len(few) == 30 and len(alls) == 32  # ONE call per reward; 2 of 32 skipped
    # The judged responses are exactly those with b > 0, asked with the same seed (hence score) either way.
    prior = [b for _, bs, _ in GROUPS for b in bs]
    seed_of = {k: r.params.seed for k, r in enumerate(alls)}
    assert [r.params.seed for r in few] == [seed_of[k] for k in range(32) if prior[k] > 0]
    assert len(set(seed_of.values())) == 32
    assert all(r.images == [image] and r.params.n == 1 for r in alls)
    assert alls[9].messages[-1]["content"][-1]["text"] == judge_text("q1", "\\boxed{3}")
    # Against ALGORITHMS.md directly: r = clip(b * g(s) + f, 0, 1).
    scores = [(s % 1001) / 1000 for s in seed_of.values()]
    well = [w for _, _, ws in GROUPS for w in ws]
    want = [min(max(b * _g(s) + (0.0 if w else -0.5), 0.0), 1.0) for b, s, w in zip(prior, scores, well, strict=True)]
    assert skipped.reshape(-1).tolist() == pytest.approx(want, abs=1e-6)
    assert stats["judged"] == 30 and stats["judge_skipped"] == 2 and stats["judge_parse_rate"] == 1.0
    assert stats["prior_share"] == pytest.approx((7 / 8 + 1 + 7 / 8 + 1 / 2) / 4)
    assert stats["hard_branch_rate"] == pytest.approx(3 / 4)
    assert stats["format_rate"] == pytest.approx((8 + 0 + 7 + 6) / 32)
    judged = [s for s, b in zip(scores, prior, strict=True) if b > 0]
    mean = sum(judged) / 30
    assert stats["judge_score_mean"] == pytest.approx(mean)
    assert stats["judge_score_std"] == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in judged) / 29))


def test_skip_is_exact_with_the_tiny_models_engine(tiny_policy):
    """The same on a real engine: per-request seeds make a judged response's sample independent of which others
    share its batch."""
    from vzero_fast.rollout import make_engine

    recipe = _recipe(make_engine(tiny_policy, "native", seed=0), judge_max_tokens=12)
    outputs = _outputs(synthetic_figure(1, 56))
    assert torch.equal(recipe.rewards(outputs, iteration=2), recipe.rewards(outputs, iteration=2, judge_all=True))


def test_judge_is_the_frozen_reference(tmp_path, tiny_model_dir):
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    threads = torch.get_num_threads()
    try:
        for kl in ("0.01", "0"):
            cfg = resolve("tiny", None, parse_overrides([
                "--train.out", str(tmp_path / kl), "--model.path", str(tiny_model_dir), "--train.recipe", "selfjudge",
                "--selfjudge.format_warmup_steps", "0", "--actor.kl_coef", kl]))
            trainer = Trainer(cfg)
            recipe = build_recipe("selfjudge", trainer)
            trainer.set_reference(recipe.role, 1)
            recipe.stage_start(trainer, 1)
            judge = recipe.judge.model
            assert judge is not recipe.role.policy.model and not any(p.requires_grad for p in judge.parameters())
            if kl == "0.01":
                assert judge is recipe.role.reference  # one frozen copy serves both jobs
            else:
                assert recipe.role.reference is None  # no reference: the Judge is loaded on its own
            live = recipe.role.policy.model.state_dict()
            assert all(torch.equal(v, live[k]) for k, v in judge.state_dict().items())  # stage-start weights
            recipe.stage_start(trainer, 1)
            assert recipe.judge.model is judge  # not rebuilt within the stage's weights
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ end to end

ARGS = ["--recipe", "selfjudge", "--preset", "tiny", "--iterations", "1", "--max-steps-per-role", "3"]


def test_tiny_selfjudge_end_to_end_then_exact_resume(tmp_path):
    """The acceptance command `vzero-fast train --recipe selfjudge --preset tiny --iterations 1
    --max-steps-per-role 3` (format warm-up included); then a run stopped by SIGTERM after its first step and
    resumed writes that run's metrics and weights. The second run starts from the first's warm-up files: a run
    that crashed after its warm-up, before any checkpoint, resumes from the beginning with the warm-up reused.
    One test, so that xdist runs the reference once."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    run = tmp_path / "reference"
    train([*ARGS, "--out", str(run)])
    rows = read_metrics(run)
    assert [(r["role"], r["step"]) for r in rows] == [("actor", 1), ("actor", 2), ("actor", 3)]
    for r in rows:
        for key in ("reward_mean", "reward_std", "loss", "kl", "entropy", "grad_norm", "prior_share",
                    "hard_branch_rate", "judge_parse_rate", "judge_score_mean", "judge_score_std", "format_rate",
                    "time_judge", "time_reward", "time_rollout", "time_train"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
        assert r["judged"] + r["judge_skipped"] == 4 * 8 and r["judged"] > 0
        for key in ("prior_share", "hard_branch_rate", "judge_parse_rate", "format_rate", "reward_mean"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["prior_share"] >= 1 / 8 and r["time_judge"] <= r["time_reward"]
    assert "time_format_warmup" in rows[0]
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "checkpoints" / "actor" / "iter-1",
                                                                 dtype=torch.float32)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "format-warmup", dtype=torch.float32)
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)

    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(run / "format-warmup", out / "format-warmup")
    shutil.copy(run / "format_warmup.json", out / "format_warmup.json")
    stopped_at, _ = train_until_signal([*ARGS, "--resume"], out, after_rows=1)
    assert 1 <= stopped_at < 3
    train(["--resume", "--out", str(out)])
    assert stable_metrics(out) == stable_metrics(run)
    assert_same_weights(run / "checkpoints" / "actor" / "iter-1", out / "checkpoints" / "actor" / "iter-1")


def test_selfjudge_7b_preset_is_the_papers():
    """ALGORITHMS.md sections 0 and 3: n = 8, batch 512 prompts in mini-batches of 128, lr 1e-6, k3 KL 0.01,
    responses up to 2048 tokens; the Judge at T = 1.0, top_p 0.9, up to 1024 tokens; threshold 0.85."""
    from vzero_fast.config import ConfigError

    cfg = resolve("selfjudge-7b")
    a = cfg.actor
    assert (a.rollout_n, a.prompts_per_step, a.prompts_per_step // a.mini_batches) == (8, 512, 128)
    assert (a.lr, a.kl_type, a.kl_coef, a.max_response_tokens, a.advantage) == (1e-6, "k3", 0.01, 2048,
                                                                                  "group-softmax")
    sj = cfg.selfjudge
    assert (sj.prior_threshold, sj.judge_temperature, sj.judge_top_p, sj.judge_max_tokens) == (0.85, 1.0, 0.9, 1024)
    assert sj.format_warmup_steps == 0 and cfg.train.iterations == 1
    assert resolve("tiny").selfjudge.format_warmup_steps > 0
    for bad in (["--selfjudge.prior_threshold", "1.0"], ["--selfjudge.judge_top_p", "0"],
                ["--selfjudge.judge_max_tokens", "0"], ["--selfjudge.format_warmup_lr", "0"],
                ["--actor.advantage", "softmax"]):
        with pytest.raises(ConfigError, match=bad[0][2:]):
            resolve("tiny", None, parse_overrides(bad))
