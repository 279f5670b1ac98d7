"""Accuracy of checkpoints on a labelled benchmark: greedy accuracy, maj@k and pass@k, per category, several
checkpoints side by side (base, iter-1, iter-2, ...), batched through the rollout engine.

    vzero-fast eval --model BASE runs/x/checkpoints/solver/iter-1 --bench synthetic --out runs/eval --k 4
    vzero-fast eval --model a=DIR_A b=DIR_B --bench MMStar.tsv --limit 200 --backend auto

Benchmarks (`--bench`, vzero_fast/eval_bench.py): a .jsonl (image path, question, optional choices, answer,
optional answer_type / category / id), a VLMEvalKit .tsv (base64 images, A-D option columns), or `synthetic`:
the built-in benchmark with known answers (counts, a value, clock times, colours) from seeds disjoint from
training's. Bad rows are skipped and counted by reason in summary.json; they never stop the run.

Outputs in `--out`: predictions.jsonl (a row per model and item: model, id, category, answer_type, question,
answer, response, prediction, correct, and with k > 0 samples, sample_predictions, samples_correct,
maj_prediction, maj_share, maj_correct, pass_at_k), summary.json (per model: the metrics, per category,
counts, seconds; the skipped rows by reason), summary.md (the tables, also printed) and comparison.png.

Decisions:
- Prompt: the question (+ options) and "Put the final answer inside \\boxed{}." -- the grpo recipe's prompt, so
  a model trained there is asked the way it was trained. The prediction is the last `\\boxed{}` content
  (answers.extract_boxed). Lenient, and only this: a choice box holding an option's text counts as that
  option's letter; without any box, a response that as a whole is a letter ("B", "(b)", "C.") for a choice
  item, or a number for a number item, is the prediction. Correctness is answers.answers_equal.
- Metrics: accuracy = greedy (T = 0) responses; from k samples at T = 1: maj@k (the most frequent prediction,
  grouped as answers_equal groups them: letters, numbers by value, normalised strings; ties to the first seen;
  no prediction does not vote), pass@k (some sample correct: the unbiased estimator with n = k) and
  sample_accuracy (mean over samples = unbiased pass@1). `--k 0` runs greedy only.
- Sample seeds depend on the item only, so every checkpoint is asked with the same random numbers.
- Images are resized into data's default pixel bounds (min 56*56, max 1024*28*28) on the model's patch grid.
- `train.eval_every N`: `eval_during_training` scores the stepping role's current weights on TRAIN_EVAL_ITEMS
  synthetic items (greedy, native engine, the role's max_response_tokens, the run's data size and bounds) every
  N global steps and returns `eval_accuracy`, `eval_items` (and per category `eval_accuracy_<cat>`) for the
  step's metrics row; its time is the row's `time_eval`.
- The PNG needs matplotlib (the `plot` extra); without it the command says so and writes the rest.

Test: `pytest tests/test_eval.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from vzero_fast.answers import LETTERS, answers_equal, extract_boxed, normalize_answer, normalize_choice
from vzero_fast.data import resize_to_bounds
from vzero_fast.eval_bench import (
    EVAL_SALT,
    Bench,
    BenchError,
    Item,
    load_bench,
    parse_number,
    synthetic_bench,
)

log = logging.getLogger("vzero_fast.evaluate")

PROMPT = "{question}\n\nPut the final answer inside \\boxed{{}}."
"""The grpo recipe's prompt (recipes/grpo.py)."""
TRAIN_EVAL_ITEMS = 28
DEFAULT_BOUNDS = (56 * 56, 1024 * 28 * 28)  # data.DataConfig's defaults


# ------------------------------------------------------------------------------------------ rules (pure)

def predict(response: str, item: Item) -> str | None:
    """The answer a response gives to `item` (module docstring: the boxed content, leniently), or None."""
    boxed = extract_boxed(response)
    if item.answer_type == "choice":
        if boxed is None:
            return normalize_choice(response.strip())
        letter = normalize_choice(boxed)
        if letter is None:  # the option's text in the box
            texts = [normalize_answer(c) for c in item.choices]
            if normalize_answer(boxed) in texts:
                letter = LETTERS[texts.index(normalize_answer(boxed))]
        return letter or boxed
    if boxed is None and item.answer_type == "number" and parse_number(response.strip()) is not None:
        return response.strip()
    return boxed


def _vote_key(answer: str | None, truth: str) -> Any:
    """What answers_equal compares for this truth: the letter, the number's value or the normalised string."""
    if answer is None:
        return None
    if truth.strip() in LETTERS:
        return normalize_choice(answer) or ("raw", answer)
    x = parse_number(answer)
    return x if x is not None else normalize_answer(answer)


def majority(answers: list[str | None], truth: str) -> tuple[str | None, float]:
    """(the most frequent answer, its share of all answers); equal answers grouped as for `truth`; no answer
    (None) does not vote; ties go to the one seen first. (None, 0.0) when nothing voted."""
    keys = [_vote_key(a, truth) for a in answers]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return None, 0.0
    best, count = max(votes.items(), key=lambda kv: kv[1])  # max keeps the first of equal counts
    return answers[keys.index(best)], count / len(answers)


def maj_at_k(answers: list[str | None], truth: str) -> bool:
    """Whether the majority answer of the k sampled answers is correct."""
    return answers_equal(majority(answers, truth)[0], truth)


def pass_at_k(corrects: list[bool], k: int | None = None) -> float:
    """Unbiased pass@k from n = len(corrects) samples, c of them correct: 1 - C(n-c, k) / C(n, k) (Chen et al.,
    2021); k defaults to n (then: 1.0 if any sample is correct, else 0.0)."""
    n, c = len(corrects), sum(bool(x) for x in corrects)
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n = {n}, got k = {k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ------------------------------------------------------------------------------------------ running

def _requests(items: list[Item], *, k: int, max_new_tokens: int, factor: int, bounds: tuple[int, int]):
    from vzero_fast.rollout import Request, SamplingParams

    out = []
    for it in items:
        image = resize_to_bounds(it.image, *bounds, factor=factor)
        text = PROMPT.format(question=it.question)
        out.append(Request.from_image_text(image, text, SamplingParams(n=1, temperature=0.0,
                                                                       max_new_tokens=max_new_tokens)))
        if k > 0:
            seed = int.from_bytes(hashlib.sha256(f"{EVAL_SALT}:{it.id}".encode()).digest()[:7], "little")
            out.append(Request.from_image_text(image, text, SamplingParams(
                n=k, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)))
    return out


def score_item(item: Item, response: str, samples: list[str]) -> dict[str, Any]:
    """One predictions.jsonl row (without `model`) from the greedy response and the k sampled ones."""
    prediction = predict(response, item)
    row = {"id": item.id, "category": item.category, "answer_type": item.answer_type, "question": item.question,
           "answer": item.answer, "response": response, "prediction": prediction,
           "correct": answers_equal(prediction, item.answer)}
    if samples:
        preds = [predict(s, item) for s in samples]
        corrects = [answers_equal(p, item.answer) for p in preds]
        maj, share = majority(preds, item.answer)
        row.update(samples=samples, sample_predictions=preds, samples_correct=corrects, maj_prediction=maj,
                   maj_share=share, maj_correct=answers_equal(maj, item.answer), pass_at_k=pass_at_k(corrects))
    return row


def evaluate_engine(engine, items: list[Item], *, k: int = 0, max_new_tokens: int = 1024, batch: int = 32,
                    factor: int = 28, bounds: tuple[int, int] = DEFAULT_BOUNDS, desc: str = "eval",
                    show_progress: bool = True) -> list[dict[str, Any]]:
    """Score `items` with `engine` (`batch` items per generate call): one `score_item` row per item."""
    from vzero_fast.metrics import progress

    rows = []
    bar = progress(total=len(items), desc=desc, disable=None if show_progress else True)
    last_line = time.perf_counter()
    try:
        for lo in range(0, len(items), batch):
            chunk = items[lo:lo + batch]
            outs = iter(engine.generate(_requests(chunk, k=k, max_new_tokens=max_new_tokens, factor=factor,
                                                  bounds=bounds)))
            for it in chunk:
                greedy = next(outs).samples[0].text
                samples = [s.text for s in next(outs).samples] if k > 0 else []
                rows.append(score_item(it, greedy, samples))
            bar.update(len(chunk))
            # Without a terminal the bar is off: a plain line at most every 10 s (and at the end) instead.
            if show_progress and bar.disable and (time.perf_counter() - last_line > 10 or len(rows) == len(items)):
                log.info("%s: %d/%d items", desc, len(rows), len(items))
                last_line = time.perf_counter()
    finally:
        bar.close()
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """accuracy (greedy) and, when the rows have samples, maj_at_k, pass_at_k, sample_accuracy; plus counts."""
    n = len(rows)
    out: dict[str, Any] = {"items": n, "correct": sum(r["correct"] for r in rows),
                           "accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
                           "no_answer_rate": sum(r["prediction"] is None for r in rows) / n if n else 0.0}
    if n and "samples_correct" in rows[0]:
        out["maj_at_k"] = sum(r["maj_correct"] for r in rows) / n
        out["pass_at_k"] = sum(r["pass_at_k"] for r in rows) / n
        out["sample_accuracy"] = sum(sum(r["samples_correct"]) / len(r["samples_correct"]) for r in rows) / n
    return out


def summarize_by_category(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = summarize(rows)
    cats = sorted({r["category"] for r in rows})
    out["categories"] = {c: summarize([r for r in rows if r["category"] == c]) for c in cats}
    return out


# ------------------------------------------------------------------------------------------ outputs

METRICS = (("accuracy", "accuracy"), ("maj_at_k", "maj@k"), ("pass_at_k", "pass@k"),
           ("sample_accuracy", "sample acc"))


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    models = summary["models"]
    k = summary["k"]
    cols = [(key, label.replace("k", str(k)) if "@" in label else label) for key, label in METRICS
            if any(key in m for m in models.values())]
    lines = [f"# {summary['bench']}: {summary['items']} items", ""]
    if summary["skipped"]:
        lines += [f"Skipped rows: {', '.join(f'{n} {r}' for r, n in sorted(summary['skipped'].items()))} "
                  f"(of {summary['rows']}).", ""]
    lines += ["| model | items | " + " | ".join(label for _, label in cols) + " |",
              "|---|---:|" + "---:|" * len(cols)]
    for name, m in models.items():
        lines.append(f"| {name} | {m['items']} | " + " | ".join(f"{m[key]:.3f}" for key, _ in cols) + " |")
    cats = sorted({c for m in models.values() for c in m["categories"]})
    lines += ["", "Greedy accuracy by category:", "", "| category | " + " | ".join(models) + " |",
              "|---|" + "---:|" * len(models)]
    for c in cats:
        cells = [f"{m['categories'][c]['accuracy']:.3f} ({m['categories'][c]['items']})" if c in m["categories"]
                 else "-" for m in models.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_png(summary: dict[str, Any], path: Path) -> str | None:
    """Grouped bars (overall metrics, then greedy accuracy per category), one colour per model; returns None,
    or why no PNG was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install 'vzero_fast[plot]')"
    models = summary["models"]
    keys = [(key, label) for key, label in METRICS if all(key in m for m in models.values())]
    cats = sorted({c for m in models.values() for c in m["categories"]})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [len(keys), max(len(cats), 1)]})
    width = 0.8 / len(models)
    for j, (name, m) in enumerate(models.items()):
        axes[0].bar([i + j * width for i in range(len(keys))], [m[key] for key, _ in keys], width, label=name)
        axes[1].bar([i + j * width for i in range(len(cats))],
                    [m["categories"].get(c, {}).get("accuracy", 0.0) for c in cats], width, label=name)
    for ax, labels, title in ((axes[0], [lab for _, lab in keys], f"overall (k = {summary['k']})"),
                              (axes[1], cats, "greedy accuracy by category")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{summary['bench']}: {summary['items']} items", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(out: Path, bench: Bench, results: dict[str, dict[str, Any]], *, k: int) -> dict[str, Any]:
    """predictions.jsonl, summary.json, summary.md and comparison.png in `out`; returns the summary.
    `results`: model name -> {"path", "rows", "seconds"}."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for name, res in results.items():
            for row in res["rows"]:
                f.write(json.dumps({"model": name, **row}) + "\n")
    summary = {"bench": bench.name, "items": len(bench.items), "rows": bench.rows, "skipped": bench.skipped, "k": k,
               "models": {name: {"path": res["path"], **summarize_by_category(res["rows"]),
                                 "seconds": round(res["seconds"], 2)} for name, res in results.items()}}
    note = write_png(summary, out / "comparison.png")
    summary["png"] = None if note else str(out / "comparison.png")
    summary["png_note"] = note
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_markdown(summary, out / "summary.md")
    return summary


# ------------------------------------------------------------------------------------------ command and hook

def model_names(specs: list[str]) -> dict[str, Path]:
    """`NAME=DIR` or `DIR` -> {name: dir}; a bare DIR is named by its last folder (with its parent's when two
    would clash, then #2, #3)."""
    pairs = [(s.split("=", 1) if "=" in s and not Path(s).exists() else (None, s)) for s in specs]
    names: dict[str, Path] = {}
    for name, d in pairs:
        p = Path(d).expanduser()
        if name is None:
            clash = sum(Path(e).expanduser().name == p.name for n, e in pairs if n is None) > 1
            name = f"{p.parent.name}/{p.name}" if clash and p.parent.name else p.name
        base, j = name, 2
        while name in names:
            name, j = f"{base}#{j}", j + 1
        names[name] = p
    return names


def run_eval(args) -> int:
    """`vzero-fast eval` (cli.py); user mistakes raise config.ConfigError (one line, exit 2)."""
    from vzero_fast.config import ConfigError, RolloutConfig
    from vzero_fast.model import ModelDirError, check_model_dir, image_factor, load_policy
    from vzero_fast.rollout import make_engine

    for flag, value, low in (("--k", args.k, 0), ("--limit", args.limit, 0), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch", args.batch, 1), ("--synthetic-size", args.synthetic_size, 28)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be >= {low}")
    models = model_names(args.model)
    for name, path in models.items():
        try:
            check_model_dir(path)
        except ModelDirError as e:
            raise ConfigError(f"--model {name}: {e}") from None
    if args.backend == "vllm":
        from vzero_fast.rollout_vllm import vllm_unavailable

        if (reason := vllm_unavailable()) is not None:
            raise ConfigError(f"--backend vllm: {reason} (use --backend native or auto)")
    try:
        bench = load_bench(args.bench, limit=args.limit or None, size=args.synthetic_size)
    except (BenchError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(e)) from None
    out = Path(args.out)
    log.info("eval: %d items of %s, %d model(s), k = %d, backend %s", len(bench.items), bench.name, len(models),
             args.k, args.backend)
    results = {}
    for name, path in models.items():
        start = time.perf_counter()
        policy = load_policy(path, dtype=args.dtype, device=args.device, name=f"eval model {name}")
        engine = make_engine(policy, args.backend, options=RolloutConfig(backend=args.backend), seed=0)
        rows = evaluate_engine(engine, bench.items, k=args.k, max_new_tokens=args.max_new_tokens, batch=args.batch,
                               factor=image_factor(path), desc=name)
        results[name] = {"path": str(path), "rows": rows, "seconds": time.perf_counter() - start}
        engine.sleep()  # hand back the KV cache before the next checkpoint loads
        del engine, policy
    summary = write_outputs(out, bench, results, k=args.k)
    print(out.joinpath("summary.md").read_text(), end="")
    print(f"wrote {out / 'predictions.jsonl'}, {out / 'summary.json'}, {out / 'summary.md'}"
          + (f", {summary['png']}" if summary["png"] else f" ({summary['png_note']})"), file=sys.stdout)
    return 0


def eval_during_training(trainer, role) -> dict[str, Any]:
    """`train.eval_every` (trainer.step_done): every N global steps, the stepping role's greedy accuracy on
    TRAIN_EVAL_ITEMS synthetic items as `eval_*` metrics ({} on other steps). Every rank runs it (the native
    engine's FSDP gather is collective); timed as the row's time_eval."""
    every = trainer.cfg.train.eval_every
    if not every or trainer.state["global_step"] % every:
        return {}
    from vzero_fast.model import image_factor
    from vzero_fast.rollout import NativeEngine

    data = trainer.cfg.data
    with trainer.timer("eval"):  # a native engine on the role's own weights costs nothing to build; greedy: no seed used
        engine = NativeEngine(role.policy)
        items = synthetic_bench(TRAIN_EVAL_ITEMS, data.synthetic_size).items
        rows = evaluate_engine(engine, items, k=0, max_new_tokens=role.cfg.max_response_tokens,
                               batch=TRAIN_EVAL_ITEMS, factor=image_factor(trainer.model_path),
                               bounds=(data.min_pixels, data.max_pixels), show_progress=False)
    s = summarize_by_category(rows)
    out = {"eval_accuracy": s["accuracy"], "eval_items": s["items"]}
    out.update({f"eval_accuracy_{c}": v["accuracy"] for c, v in s["categories"].items()})
    log.info("eval after global step %d (%s): accuracy %.3f on %d synthetic items", trainer.state["global_step"],
             role.name, s["accuracy"], s["items"])
    return out


__all__ = ["PROMPT", "TRAIN_EVAL_ITEMS", "eval_during_training", "evaluate_engine", "maj_at_k", "majority",
           "model_names", "pass_at_k", "predict", "run_eval", "score_item", "summarize", "summarize_by_category",
           "write_markdown", "write_outputs", "write_png"]
