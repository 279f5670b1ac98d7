"""V-Zero-OPD end to end (vzero_fast/recipes/opd.py, vzero_fast/regions.py): region data (JSONL rows with their
bad rows and bad boxes counted, hard negatives, downsampled views, synthetic figures whose boxes are exact),
the tokenizer check, the teacher's batched log-probs against transformers' own logits, config errors, the
tiny run from the command line (tiny teacher built, finite metrics, checkpoints transformers loads) and a
SIGTERM + --resume that ends identical to the uninterrupted run."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _runs import ENV, assert_same_weights, stable_metrics, train, train_until_signal
from PIL import Image

from vzero_fast.config import ConfigError, parse_overrides, resolve
from vzero_fast.data import resize_to_bounds
from vzero_fast.metrics import read_metrics
from vzero_fast.recipes.opd import Teacher, build_tiny_teacher, check_same_tokenizer
from vzero_fast.regions import negative_box, open_regions, overlaps, region_figure
from vzero_fast.rollout import NativeEngine, Request, SamplingParams

pytest_plugins = ["_tiny_fixture"]

RED, BLUE = (220, 30, 30), (30, 30, 220)
BOUNDS = dict(min_pixels=56 * 56, max_pixels=112 * 112)


# ---------------------------------------------------------------------------------------------- data

def test_negative_box_against_brute_force():
    """Same size, inside the image, no shared area with bbox; None exactly when no position qualifies."""
    rng = np.random.default_rng(0)
    nones = 0
    for _ in range(400):
        W, H = int(rng.integers(4, 20)), int(rng.integers(4, 20))
        x0, y0 = int(rng.integers(0, W - 1)), int(rng.integers(0, H - 1))
        box = (x0, y0, int(rng.integers(x0 + 1, W + 1)), int(rng.integers(y0 + 1, H + 1)))
        w, h = box[2] - box[0], box[3] - box[1]
        feasible = [(x, y) for x in range(W - w + 1) for y in range(H - h + 1)
                    if not overlaps((x, y, x + w, y + h), box)]
        got = negative_box(box, W, H, rng)
        if got is None:
            nones += 1
            assert not feasible, (box, W, H)
            continue
        assert (got[2] - got[0], got[3] - got[1]) == (w, h)
        assert 0 <= got[0] and 0 <= got[1] and got[2] <= W and got[3] <= H
        assert (got[0], got[1]) in feasible
    assert 0 < nones < 400


def test_synthetic_boxes_are_exact():
    """The asked-about shape lies inside its box (nothing else non-white in its grid cell), and the box is
    tight (its edges touch the shape); same seed, same figure."""
    for seed in range(40):
        image, question, box = region_figure(seed, 112)
        assert question.endswith("?") or question.endswith(".")
        ink = (np.asarray(image) != 255).any(-1)  # [H, W]
        cell = 56
        gx, gy = int((box[0] + box[2]) / 2 // cell), int((box[1] + box[3]) / 2 // cell)
        outside = ink[gy * cell:(gy + 1) * cell, gx * cell:(gx + 1) * cell].copy()
        outside[box[1] - gy * cell:box[3] - gy * cell, box[0] - gx * cell:box[2] - gx * cell] = False
        assert not outside.any(), seed
        crop = ink[box[1]:box[3], box[0]:box[2]]
        assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any(), seed
    again = region_figure(7, 112)
    assert np.array_equal(np.asarray(again[0]), np.asarray(region_figure(7, 112)[0])) and again[2] == region_figure(7, 112)[2]


def _listing(tmp_path):
    im = Image.new("RGB", (80, 60), "white")
    im.paste(RED, (10, 10, 30, 30))
    im.paste(BLUE, (50, 30, 70, 50))
    im.save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "question": "What is red?", "bbox": [10, 10, 30, 30], "neg_bbox": [50, 30, 70, 50]},
        {"image": str(tmp_path / "a.png"), "question": "What is blue?", "bbox": [50, 30, 70, 50]},
        "not json {",
        {"image": "a.png", "bbox": [10, 10, 30, 30]},                          # no question
        {"image": "a.png", "question": "q", "bbox": [30, 10, 10, 30]},         # x0 > x1
        {"image": "a.png", "question": "q", "bbox": [1, 2, 3]},                # three numbers
        {"image": "a.png", "question": "q", "bbox": [True, 0, 5, 5]},          # not numbers
        {"image": "a.png", "question": "q", "bbox": [70, 50, 90, 70]},         # leaves the image
        {"image": "missing.png", "question": "q", "bbox": [0, 0, 5, 5]},       # no such file
        {"image": "a.png", "question": "q", "bbox": [0, 0, 80, 40]},           # no room for a hard negative
        {"image": "a.png", "question": "q", "bbox": [0, 0, 5, 5], "neg_bbox": [75, 0, 85, 5]},  # neg outside
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _share(image, colour):
    a = np.asarray(image).astype(int)
    return float((np.abs(a - np.array(colour)).sum(-1) < 60).mean())


def test_listing_rows_boxes_and_views(tmp_path):
    cfg = resolve("tiny", None, parse_overrides(["--data.images", str(_listing(tmp_path))]))
    source = open_regions(cfg.data, seed=0, negative="hard_negative_crop")
    assert len(source) == 6 and source.stats.bad_rows == 5
    items = [source.load(i) for i in range(len(source))]
    assert [it is not None for it in items] == [True, True, False, False, False, False]
    stats = source.stats.as_dict()
    assert (stats["bad_box"], stats["missing"], stats["loaded"], stats["skipped"]) == (3, 1, 2, 4)
    red, blue = items[0], items[1]
    assert red.question == "What is red?" and red.bbox == (10, 10, 30, 30)
    assert _share(red.positive[1], RED) > 0.95 and _share(red.negative[1], BLUE) > 0.95  # the given neg_bbox
    assert _share(blue.positive[1], BLUE) > 0.95 and _share(blue.negative[1], BLUE) < 0.5  # drawn elsewhere
    assert red.positive[0] is red.negative[0]  # the full image in both views
    for im in (*red.positive, *red.negative, red.image):
        assert BOUNDS["min_pixels"] <= im.width * im.height <= BOUNDS["max_pixels"] and im.width % 28 == 0
    assert source.load(5) is None and source.stats.bad_box == 3  # judged once, counted once

    down = open_regions(cfg.data, seed=0, negative="downsample")
    item = down.load(0)
    original = Image.open(tmp_path / "a.png").convert("RGB")
    halves = [original.resize((40, 30), Image.BICUBIC), original.crop((10, 10, 30, 30)).resize((10, 10), Image.BICUBIC)]
    for got, half in zip(item.negative, halves, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(resize_to_bounds(half, factor=28, **BOUNDS)))
    assert down.load(4) is not None and down.load(5) is not None  # no hard negative needed in this mode
    assert down.stats.bad_box == 0


def test_listing_errors(tmp_path):
    cfg = resolve("tiny", None, parse_overrides(["--data.images", str(tmp_path / "x.csv")]))
    with pytest.raises(ValueError, match="jsonl"):
        open_regions(cfg.data, seed=0, negative="downsample")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    cfg = resolve("tiny", None, parse_overrides(["--data.images", str(tmp_path / "bad.jsonl")]))
    with pytest.raises(ValueError, match="no usable row"):
        open_regions(cfg.data, seed=0, negative="downsample")


def test_config_validation():
    for key, value in (("opd.negative", "blur"), ("opd.clamp", "0"), ("opd.teacher_dtype", "int8"),
                       ("opd.data_epochs", "0"), ("student.rollout_n", "0")):
        with pytest.raises(ConfigError, match=key):
            resolve("tiny", None, parse_overrides([f"--{key}", value]))
    cfg = resolve("opd-4b")
    assert (cfg.train.recipe, cfg.student.lr, cfg.student.prompts_per_step, cfg.student.rollout_n,
            cfg.student.mini_batches, cfg.student.max_response_tokens, cfg.opd.data_epochs) == (
        "opd", 1e-6, 32, 8, 2, 2048, 10)
    assert not cfg.opd.tiny_teacher and cfg.opd.teacher == ""


# ------------------------------------------------------------------------------------------ the teacher

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dir):
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher"), student_dir=tiny_model_dir, seed=5)


def test_tokenizer_check(tmp_path, tiny_model_dir, teacher_dir):
    from vzero_fast.tiny import build_tiny

    check_same_tokenizer(tiny_model_dir, teacher_dir)  # same tokenizer: no error
    other = build_tiny(tmp_path / "qwen3", family="qwen3_vl")
    with pytest.raises(ConfigError, match="--opd.teacher .*tokenizer is not the student's"):
        check_same_tokenizer(tiny_model_dir, other)
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["intermediate_size"] == 2 * json.loads((tiny_model_dir / "config.json").read_text())["intermediate_size"]


def _hf_teacher_logprobs(policy, images, question, response) -> torch.Tensor:
    """[r] float64: the teacher's own forward on its two-image prompt + the response; logits read at p - 1 + t."""
    text = policy.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]}])
    enc = policy.processor(text=text, images=list(images))
    ids = torch.cat([enc["input_ids"][0], response])[None]
    p = enc["input_ids"].shape[1]
    with torch.no_grad():
        logits = policy.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                              image_grid_thw=enc["image_grid_thw"],
                              mm_token_type_ids=(ids == policy.model.config.image_token_id).long()).logits[0]
    logp = torch.log_softmax(logits[p - 1:p - 1 + len(response)].double(), -1)
    return logp.gather(1, response[:, None]).squeeze(1)


def test_teacher_scores_both_views_like_transformers(tiny_policy, teacher_dir):
    """Teacher.score (one batched no-grad pass over micro-batches, fused lm_head) against the teacher's own
    forward, sample by sample, for z+ and z-; the two views give different log-probs."""
    cfg = resolve("tiny", None, parse_overrides(["--student.micro_batch_tokens", "300"]))
    trainer = SimpleNamespace(cfg=cfg, world=SimpleNamespace(fsdp=False), device=torch.device("cpu"))
    teacher = Teacher(trainer, teacher_dir)
    source = open_regions(cfg.data, seed=3, negative="hard_negative_crop")
    items = [source.load(i) for i in range(3)]
    requests = [Request.from_image_text(it.image, it.question, SamplingParams(n=2, max_new_tokens=7, seed=i))
                for i, it in enumerate(items)]
    outputs = NativeEngine(tiny_policy).generate(requests)
    pos, neg = teacher.score(outputs, items, lambda q: q)
    assert pos.shape == neg.shape == (6, max(len(s.token_ids) for o in outputs for s in o.samples))
    assert teacher.budget == 300  # several micro-batches
    k = 0
    for out, it in zip(outputs, items, strict=True):
        for s in out.samples:
            r = len(s.token_ids)
            for got, views in ((pos, it.positive), (neg, it.negative)):
                want = _hf_teacher_logprobs(teacher.policy, views, it.question, s.token_ids)
                torch.testing.assert_close(got[k, :r].double(), want, rtol=0, atol=2e-5)
                assert torch.all(got[k, r:] == 0)
            k += 1
    assert (pos - neg).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------- end to end

STEPS = 4


@pytest.mark.slow
def test_tiny_run_end_to_end_and_exact_resume(tmp_path):
    """The tiny run from the command line, no --model and no --opd.teacher (both built in the run): finite
    metrics, a wider tiny teacher, a student checkpoint that transformers loads and that moved. Then the same
    run stopped by SIGTERM after 2 steps and resumed: identical metrics (all but wall-clock) and weights; and
    its first 2 steps on 2 torchrun ranks. One test, so that the reference run is made once whatever worker
    runs it."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vzero_fast.model import check_model_dir

    args = ["--recipe", "opd", "--preset", "tiny", "--iterations", "1", "--max-steps-per-role", str(STEPS)]
    reference = tmp_path / "reference"
    train([*args, "--out", str(reference)])
    rows = read_metrics(reference)
    assert [(r["role"], r["step"]) for r in rows] == [("student", k) for k in range(1, STEPS + 1)]
    for row in rows:
        for key in ("gate_mean", "gate_std", "gate_above_1", "delta_mean", "Delta_mean", "d_mean", "time_teacher",
                    "response_length_mean", "loss", "kl", "grad_norm", "entropy", "time_rollout", "time_train"):
            assert row[key] is not None and math.isfinite(row[key]), (key, row)
        assert 0.0 <= row["gate_above_1"] <= 1.0 and 0.0 <= row["gate_mean"] <= 2.0
        assert row["gate_std"] > 0 and row["tokens"] > 0 and row["skipped_updates"] == 0
    config = json.loads((reference / "tiny-teacher" / "config.json").read_text())
    assert config["intermediate_size"] == 768
    saved = reference / "checkpoints" / "student" / "iter-1"
    check_model_dir(saved)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(saved, dtype=torch.float32)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(reference / "tiny-model", dtype=torch.float32)
    assert not torch.equal(hf.lm_head.weight, base.lm_head.weight)  # the student trained

    out = tmp_path / "run"
    stopped_at, _ = train_until_signal(args, out, after_rows=2, sig=signal.SIGTERM)
    assert 2 <= stopped_at < STEPS
    train(["--resume", "--out", str(out)])
    assert stable_metrics(out) == stable_metrics(reference)
    assert_same_weights(saved, out / "checkpoints" / "student" / "iter-1")

    # Two gloo ranks under torchrun (student, reference and teacher FSDP2-sharded; each rank scores its own
    # groups) give the one-process metrics of the same steps: global sums, not one rank's share.
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    two = tmp_path / "two"
    proc = subprocess.run([*launcher, "--standalone", "--nproc_per_node=2", "-m", "vzero_fast", "train", *args[:-1],
                           "2", "--out", str(two)], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    for got, want in zip(read_metrics(two), rows[:2], strict=False):
        for key in ("step", "groups", "tokens", "response_length_mean"):
            assert got[key] == want[key], key
        for key in ("loss", "kl", "grad_norm", "gate_mean", "gate_std", "gate_above_1", "delta_mean", "d_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), key
    assert len(read_metrics(two)) == 2


def test_downsample_run_and_missing_teacher(tmp_path, tiny_model_dir, teacher_dir):
    """In process: one step with the downsample negative view and an explicit teacher; with tiny_teacher off
    and no teacher the recipe refuses with a one-line error naming the flag."""
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    threads = torch.get_num_threads()
    base = ["--train.recipe", "opd", "--model.path", str(tiny_model_dir), "--train.iterations", "1",
            "--train.max_steps_per_role", "1"]
    try:
        cfg = resolve("tiny", None, parse_overrides([*base, "--train.out", str(tmp_path / "a"), "--opd.negative",
                                                     "downsample", "--opd.teacher", str(teacher_dir)]))
        trainer = Trainer(cfg)
        trainer.run(build_recipe("opd", trainer))
        cfg = resolve("tiny", None, parse_overrides([*base, "--train.out", str(tmp_path / "b"),
                                                     "--opd.tiny_teacher", "false"]))
        with pytest.raises(ConfigError, match="--opd.teacher DIR is required"):
            build_recipe("opd", Trainer(cfg))
    finally:
        torch.set_num_threads(threads)
    (row,) = read_metrics(tmp_path / "a")
    assert math.isfinite(row["loss"]) and math.isfinite(row["Delta_mean"]) and row["time_teacher"] > 0
    assert not (tmp_path / "a" / "tiny-teacher").exists()


@pytest.mark.slow
def test_bench_opd_smoke(tmp_path):
    """`vzero-fast bench opd --smoke`: the step breakdown and both memory paths run (the script itself checks
    that they give the same log-probs); the naive path holds at least one [tokens, V] fp32 tensor more."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "vzero_fast", "bench", "opd", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    step, mem = last["step"], last["memory"]
    assert step["teacher_s"] > 0 and step["rollout_s"] > 0 and step["update_s"] > 0
    assert mem["naive"]["extra_mib"] - mem["fused"]["extra_mib"] >= mem["logits_mib"]


@pytest.mark.slow
def test_qwen3_5_student_and_tiny_teacher(tmp_path):
    """The paper's family: a tiny Qwen3.5 student (hybrid DeltaNet decoder, 32 px image tokens) gets a tiny
    Qwen3.5 teacher built for it; one step trains with finite metrics."""
    from vzero_fast.recipes import build_recipe
    from vzero_fast.tiny import build_tiny
    from vzero_fast.trainer import Trainer

    student = build_tiny(tmp_path / "student", seed=0, family="qwen3_5")
    threads = torch.get_num_threads()
    try:
        cfg = resolve("tiny", None, parse_overrides([
            "--train.recipe", "opd", "--model.path", str(student), "--train.out", str(tmp_path / "run"),
            "--train.iterations", "1", "--train.max_steps_per_role", "1"]))
        trainer = Trainer(cfg)
        trainer.run(build_recipe("opd", trainer))
    finally:
        torch.set_num_threads(threads)
    config = json.loads((tmp_path / "run" / "tiny-teacher" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["text_config"]["intermediate_size"] == 768
    (row,) = read_metrics(tmp_path / "run")
    for key in ("loss", "grad_norm", "gate_std", "d_mean", "Delta_mean", "time_teacher"):
        assert math.isfinite(row[key]), (key, row)
    assert row["tokens"] > 0 and row["skipped_updates"] == 0
