"""The grpo recipe (vzero_fast/recipes/grpo.py) and its data (vzero_fast/qa.py): answer equivalence, majority
labels and rewards on hand-built groups; question listings with bad rows skipped and counted; the synthetic
colour task's labels read back from its pixels; and the learning run: on the tiny preset the mean reward rises
from chance (computed from the labels) to at least chance + 0.2 within 40 GRPO steps on the CPU."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _runs import train
from PIL import Image

from vzero_fast.answers import LETTERS, answers_equal
from vzero_fast.config import parse_overrides, resolve
from vzero_fast.data import COLOURS
from vzero_fast.metrics import read_metrics
from vzero_fast.qa import COLOUR_OPTIONS, SyntheticQASource, label_chance, open_qa
from vzero_fast.recipes.grpo import GRPORecipe, grpo_rewards, majority_answer


@pytest.mark.parametrize("given, truth, want", [
    ("B", "B", True), ("(b).", "B", True), ("\\text{C}", "C", True), ("A", "B", False), ("AB", "A", False),
    ("3.0", "3", True), ("1,000", "1000", True), ("$5", "5", True), ("50%", "50", True), ("3", "3.5", False),
    ("2/4", "1/2", False), ("1/2", "1/2", True), ("3:15", "3:15", True), ("3:15", "3:20", False),
    ("Red", "red", True), (" blue ", "blue", True), ("", "", False), (None, "4", False), ("4.0000001", "4", True),
])
def test_answers_equal(given, truth, want):
    assert answers_equal(given, truth) is want


def test_majority_answer_counts_valid_votes_over_all():
    assert majority_answer(["B", "A", "A", "B", None]) == ("B", 0.4)  # tie: the one seen first; share over all 5
    assert majority_answer([None, None, "7", None]) == ("7", 0.25)  # missing boxes never win
    assert majority_answer([None, None]) == (None, 0.0)
    assert majority_answer(["b", "B", "B"]) == ("B", 2 / 3)  # exact strings vote apart


def test_rewards_label_maj_and_format_weight():
    texts = [["\\boxed{A}", "\\boxed{b}", "no box", "<think>x</think> \\boxed{A}"],
             ["\\boxed{4}", "\\boxed{4.0}", "\\boxed{5}", "\\boxed{5"]]
    assert grpo_rewards(texts, ["A", "4"]).tolist() == [[1, 0, 0, 1], [1, 1, 0, 0]]
    assert grpo_rewards(texts, [None, "5"]).tolist() == [[0, 0, 0, 0], [0, 0, 1, 0]]
    got = grpo_rewards(texts, ["A", "4"], format_weight=0.25)
    assert got[0].tolist() == pytest.approx([0.75, 0.0, 0.0, 1.0])  # only the last one is well formed
    # maj through the recipe: labels come from the votes, never from the source's answers (None here).
    recipe = object.__new__(GRPORecipe)
    recipe.rules = SimpleNamespace(mode="maj", format_weight=0.0)
    recipe.source = SimpleNamespace(answers=[None, None])
    outputs = [SimpleNamespace(request=SimpleNamespace(meta={"index": g}),
                               samples=[SimpleNamespace(text=t) for t in row]) for g, row in enumerate(texts)]
    stats = {}
    # Group 0 votes "A" 2, "b" 1 -> maj "A"; group 1 votes "4", "4.0", "5" (exact strings, the unclosed box does
    # not vote): a three-way tie of one vote each, won by "4", which "4.0" also equals.
    assert recipe.rewards(outputs, stats).tolist() == [[1, 0, 0, 1], [1, 1, 0, 0]]
    assert stats["maj_share"] == pytest.approx((2 / 4 + 1 / 4) / 2) and stats["label_rate"] == 1.0
    assert stats["boxed_rate"] == pytest.approx(6 / 8) and stats["accuracy"] == pytest.approx(4 / 8)


def _write_listing(tmp_path, name, rows):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text("image,question,answer\n" + "\n".join(rows) + "\n")
    return path


def test_listing_rows_bad_rows_skipped_and_counted(tmp_path, caplog):
    rows = [{"image": "ok.png", "question": "What colour?", "answer": "red"},
            {"image": "ok.png", "question": "Unlabeled?"},          # no answer: bad only when labels are needed
            {"image": "", "question": "no image"},                   # bad
            {"path": "ok.png", "question": "  "},                    # bad: empty question
            "{not json",                                             # bad
            ["a", "list"],                                           # bad: not an object
            {"image": "bad.png", "question": "A broken file", "answer": "x"},  # a bad IMAGE: counted on load
            {"image": "missing.png", "question": "Gone", "answer": "y"}]
    path = _write_listing(tmp_path, "rows.jsonl", rows)
    data = resolve("tiny", None, parse_overrides(["--data.images", str(path)])).data
    labeled = open_qa(data, seed=0, task="colour", require_answer=True)
    assert labeled.stats.bad_rows == 5 and len(labeled) == 3
    assert labeled.questions == ["What colour?", "A broken file", "Gone"] and labeled.answers == ["red", "x", "y"]
    assert [labeled.load(i) is not None for i in range(3)] == [True, False, False]
    assert (labeled.stats.not_image, labeled.stats.missing, labeled.stats.loaded) == (1, 1, 1)
    assert "5 bad rows skipped" in labeled.describe()
    unlabeled = open_qa(data, seed=0, task="figures", require_answer=False)
    assert unlabeled.stats.bad_rows == 4 and len(unlabeled) == 4
    assert unlabeled.answers == [None] * 4  # the answer field is never read without require_answer
    warned = [r.getMessage() for r in caplog.records if "skipping line" in r.getMessage()]
    assert len(warned) == 5 + 4
    # CSV, same rules; a file with no usable row is an error at open time, not a crash mid-run.
    csv_path = _write_listing(tmp_path, "rows.csv", ["ok.png,How many?,3", ",no image,1", "ok.png,,2",
                                                     "ok.png,Unlabeled,"])
    data = resolve("tiny", None, parse_overrides(["--data.images", str(csv_path)])).data
    got = open_qa(data, seed=0, task="colour", require_answer=True)
    assert (len(got), got.stats.bad_rows, got.answers) == (1, 3, ["3"])
    empty = _write_listing(tmp_path, "none.jsonl", ["{broken"])
    with pytest.raises(ValueError, match="no usable row"):
        open_qa(resolve("tiny", None, parse_overrides(["--data.images", str(empty)])).data, seed=0, task="colour",
                require_answer=True)


def test_colour_task_labels_match_the_pixels_and_chance():
    source = SyntheticQASource(30, task="colour", seed=3, size=112)
    counts = {k: source.answers.count(k) for k in LETTERS}
    assert sorted(counts.values()) == [7, 7, 8, 8]  # balanced: 30 items over 4 colours
    assert label_chance(source) == 8 / 30
    for i in range(len(source)):
        pixels = np.asarray(source.load(i).image).reshape(-1, 3)
        colours, n = np.unique(pixels, axis=0, return_counts=True)
        non_white = [(c, k) for c, k in zip(colours.tolist(), n.tolist(), strict=True) if c != [255, 255, 255]]
        dominant = max(non_white, key=lambda ck: ck[1])[0]
        assert tuple(dominant) == COLOURS[COLOUR_OPTIONS[LETTERS.index(source.answers[i])]], i
    again = SyntheticQASource(30, task="colour", seed=3, size=112)
    assert np.array_equal(np.asarray(again.load(5).image), np.asarray(source.load(5).image))


# ------------------------------------------------------------------------------------- learning run

STEPS = 40


HELD_OUT = 20  # colour items of the built-in benchmark (vzero_fast/eval_bench.py)


def test_grpo_reward_rises_from_chance(tmp_path):
    """The tiny preset on the colour task at 168 px (36 image tokens; at 112 px it learns too slowly for a
    test, see the tiny preset), 40 steps: 85 s of CPU (1 thread). One test, so that xdist runs it once."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "run"
    train(["--recipe", "grpo", "--preset", "tiny", "--iterations", "1", "--max-steps-per-role", str(STEPS),
           "--data.synthetic_size", "168", "--data.max_pixels", str(168 * 168), "--out", str(out)])
    cfg = resolve(None, out / "config.toml")
    chance = label_chance(open_qa(cfg.data, seed=cfg.train.seed, task="colour", require_answer=True))
    assert chance == 0.25  # 32 items, 8 per colour
    rows = read_metrics(out)
    assert len(rows) == STEPS and all(r["role"] == "learner" for r in rows)
    rewards = [r["reward_mean"] for r in rows]
    start, end = np.mean(rewards[:5]), np.mean(rewards[-10:])
    assert start < chance + 0.1, rewards  # the warm-up taught the format, not the answers
    assert end >= chance + 0.2, rewards
    assert all(r["accuracy"] == r["reward_mean"] for r in rows)  # format_weight 0: reward = accuracy
    assert np.mean([r["boxed_rate"] for r in rows[-10:]]) > 0.8
    for r in rows:
        for key in ("loss", "kl", "entropy", "grad_norm", "time_rollout", "time_train"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
    warm = json.loads((out / "format_warmup.json").read_text())
    assert warm["loss_last"] < warm["loss_first"] and warm["learner_parse_rate"] > 0.5
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "checkpoints" / "learner" / "iter-1",
                                                                 dtype=torch.float32)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "format-warmup", dtype=torch.float32)
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)  # it trained, and transformers loads it

    # Held out: colour items of the built-in benchmark (seeds disjoint from training's), greedy, before and after.
    from vzero_fast.eval_bench import SYNTHETIC_PLAN, synthetic_item
    from vzero_fast.evaluate import evaluate_engine
    from vzero_fast.model import load_policy
    from vzero_fast.rollout import NativeEngine

    stride = len(SYNTHETIC_PLAN)  # item i is a colour item when i % 7 == 0
    items = [synthetic_item(i, size=168) for i in range(0, HELD_OUT * stride, stride)]
    assert {it.category for it in items} == {"colour"}
    accuracy = {}
    for name, path in (("base", out / "format-warmup"), ("trained", out / "checkpoints" / "learner" / "iter-1")):
        policy = load_policy(path, dtype="float32", device="cpu", attn_implementation="sdpa")
        rows = evaluate_engine(NativeEngine(policy, seed=0), items, max_new_tokens=cfg.learner.max_response_tokens,
                               bounds=(cfg.data.min_pixels, cfg.data.max_pixels), show_progress=False)
        accuracy[name] = float(np.mean([r["correct"] for r in rows]))
    print(f"held-out colour accuracy (greedy, {HELD_OUT} items): {accuracy}")
    assert accuracy["trained"] >= accuracy["base"] + 0.2, accuracy


def test_grpo_config_checked():
    from vzero_fast.config import ConfigError

    assert resolve("tiny").grpo.mode == "label" and resolve("tiny").learner.advantage == "grpo"
    assert resolve("selfjudge-7b").learner.lr == 1e-6
    for bad in (["--grpo.mode", "vote"], ["--grpo.format_weight", "1.5"], ["--grpo.format_warmup_steps", "-1"],
                ["--learner.rollout_n", "0"]):
        with pytest.raises(ConfigError, match=bad[0][2:]):
            resolve("tiny", None, parse_overrides(bad))
