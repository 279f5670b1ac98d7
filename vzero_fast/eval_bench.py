"""Benchmarks for `vzero-fast eval` (vzero_fast/evaluate.py): labelled items of an image, a question and its
truth, read from a file or drawn with known answers.

    load_bench("synthetic" | "x.jsonl" | "x.tsv", limit=) -> Bench(items, rows, skipped by reason)

Layouts:
- a .jsonl, one object per line: `image` (a path, relative to the file), `question`, optional `choices` (a list
  of at most 4 strings, rendered "A) .." to "D) .." under the question), `answer` (for a choice item a letter or
  the option's text), optional `answer_type` (choice | number | text; inferred when absent: choices, or an
  answer that is one capital letter A-D, the options written in the question -> choice; a number -> number; else
  text), optional `category`, optional `id`.
- a .tsv in VLMEvalKit's layout: `index`, `image` (base64; a short number instead is the index of the row that
  holds the image, as VLMEvalKit writes repeated images), `question`, optional `hint` (put before the question),
  option columns `A`..`D` (empty ones left out), `answer`, optional `category`.
- `synthetic`: the built-in verifiable benchmark (`synthetic_bench`): data.py's synthetic figures and qa.py's
  colour shapes with their ground truth -- counts (bars, shapes, pie slices, table rows, line points), a value
  (the tallest bar, when printed), a time (the clock, "H:MM") and a colour (multiple choice, the grpo recipe's
  task, labels balanced so that one constant answer scores 1/4). qa.py's own "figures" task has no answers,
  so the truth is recorded here while data.py's drawing code draws the figure (`_RecordingRng` logs every
  draw; the tests check the pixels equal `synthetic_figure`'s, recount the shapes from the pixels and check
  the colour shape's fill). Item seeds are >= 2**32 while training's (`data._set_seed`, qa.py's items) are
  32-bit SeedSequence states, so no eval figure is a training figure.

Decisions:
- Bad rows (unparsable line, no question/answer, missing or undecodable image, a choice answer that is no
  option, more than 4 choices) are skipped and counted by reason (`Bench.skipped`); they never stop a run. A
  benchmark without any usable row is an error (`BenchError`).
- `limit` stops reading at that many usable items, so a large TSV's tail is never decoded.

Test: `pytest tests/test_eval.py`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vzero_fast.answers import LETTERS, normalize_answer, normalize_choice
from vzero_fast.data import PIL_FORMATS, BadImageError, read_image

log = logging.getLogger("vzero_fast.eval_bench")

ANSWER_TYPES = ("choice", "number", "text")
EVAL_SALT = 0x5EED_E7A1
SEED_OFFSET = 2**32
"""Eval figure seeds start here: training's are 32-bit (module docstring)."""
SYNTHETIC_PLAN = ("colour", "shapes", "bar_chart", "clock", "pie_chart", "table", "line_chart")
"""Item i of the synthetic benchmark is of kind SYNTHETIC_PLAN[i % 7]."""
SYNTHETIC_ITEMS = 70


@dataclass
class Item:
    """One benchmark question with its image and truth."""

    id: str
    """The row's id (JSONL `id` or line number, TSV `index`, "synthetic-<i>")."""
    image: Image.Image
    """RGB, as read (resized to the model's grid when asked)."""
    question: str
    """As asked, options included."""
    answer: str
    """The truth: a letter for a choice item."""
    answer_type: str
    """One of ANSWER_TYPES."""
    category: str = "uncategorized"
    """Per-category scores group by this."""
    choices: list[str] = field(default_factory=list)
    """The option texts of a choice item, in order A, B, ..."""


@dataclass
class Bench:
    """A benchmark's usable items and what was skipped."""

    name: str
    """"synthetic" or the file's stem."""
    items: list[Item]
    rows: int = 0
    """Rows read, skipped ones included."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped rows by reason."""


class BenchError(ValueError):
    """The benchmark itself cannot be read (not a bad row: the file, its kind, or no usable row at all)."""


def parse_number(s: str) -> float | None:
    """The value of a normalised answer ("1,000" -> 1000.0), None when it is not a finite number."""
    try:
        x = float(normalize_answer(s))
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def infer_answer_type(answer: str, choices: list[str]) -> str:
    """choice when there are options or the answer is one letter A-D (options written in the question), number
    when the answer parses as one, else text."""
    if choices or answer.strip() in LETTERS:
        return "choice"
    return "number" if parse_number(answer) is not None else "text"


# ------------------------------------------------------------------------------------------ reading

def _render(question: str, choices: list[str]) -> str:
    return "\n".join([question.strip()] + [f"{k}) {c}" for k, c in zip(LETTERS, choices, strict=False)])


def _make_item(*, id: str, image: Image.Image, question: Any, answer: Any, choices: Any = None,
               answer_type: Any = None, category: Any = None) -> Item | str:
    """An Item, or the reason the row is bad."""
    if not isinstance(question, str) or not question.strip():
        return "no_question"
    if answer is None or (isinstance(answer, float) and math.isnan(answer)) or not str(answer).strip():
        return "no_answer"
    answer = str(answer).strip()
    choices = [] if choices is None else choices
    if not isinstance(choices, list) or len(choices) > len(LETTERS) or not all(isinstance(c, str) for c in choices):
        return "bad_choices"
    kind = answer_type or infer_answer_type(answer, choices)
    if kind not in ANSWER_TYPES or (choices and kind != "choice"):
        return "bad_answer_type"
    if kind == "choice":
        letter = normalize_choice(answer)
        texts = [normalize_answer(c) for c in choices]
        if letter is None and normalize_answer(answer) in texts:
            letter = LETTERS[texts.index(normalize_answer(answer))]
        if letter is None or (choices and LETTERS.index(letter) >= len(choices)):
            return "answer_not_an_option"
        answer = letter
    elif kind == "number" and parse_number(answer) is None:
        return "answer_not_a_number"
    return Item(id=id, image=image, question=_render(question, choices), answer=answer, answer_type=kind,
                category=str(category).strip() if category not in (None, "") else "uncategorized", choices=choices)


def read_jsonl_bench(path: Path, limit: int | None = None) -> Bench:
    """The JSONL layout of the module docstring; bad rows skipped and counted; stops after `limit` items."""
    bench = Bench(name=path.stem, items=[])
    skipped: Counter = Counter()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit and len(bench.items) == limit:
                break
            bench.rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                skipped["bad_json"] += 1
                continue
            image_path = row.get("image")
            if not isinstance(image_path, str) or not image_path.strip():
                skipped["no_image"] += 1
                continue
            p = Path(image_path).expanduser()
            try:
                image = read_image(p if p.is_absolute() else path.parent / p)
            except BadImageError as e:
                skipped[f"image_{e.reason}"] += 1
                continue
            got = _make_item(id=str(row.get("id", n)), image=image, question=row.get("question"),
                             answer=row.get("answer"), choices=row.get("choices"), answer_type=row.get("answer_type"),
                             category=row.get("category"))
            if isinstance(got, str):
                skipped[got] += 1
            else:
                bench.items.append(got)
    bench.skipped = dict(skipped)
    return bench


def decode_base64_image(text: str) -> Image.Image:
    """RGB image of base64 text; BadImageError("undecodable_base64" / "corrupt") otherwise."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImageError("undecodable_base64", str(e)) from None
    try:
        image = Image.open(io.BytesIO(raw), formats=PIL_FORMATS)
        image.load()
        return image.convert("RGB")
    except Exception as e:  # any PIL parser failure: the bytes are no image of an accepted format
        raise BadImageError("corrupt", f"{type(e).__name__}: {e}") from None


def read_tsv_bench(path: Path, limit: int | None = None) -> Bench:
    """VLMEvalKit's TSV layout (module docstring); bad rows skipped and counted; stops after `limit` items."""
    csv.field_size_limit(2**31 - 1)  # base64 images are far above csv's 128 KiB default
    bench = Bench(name=path.stem, items=[])
    skipped: Counter = Counter()
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    images = {str(r.get("index", "")).strip(): r.get("image") or "" for r in rows}
    for n, row in enumerate(rows, 1):
        if limit and len(bench.items) == limit:
            break
        bench.rows += 1
        blob = (row.get("image") or "").strip()
        if re.fullmatch(r"\d{1,16}", blob) and blob in images:  # a reference to the row holding the image
            blob = images[blob].strip()
        if not blob:
            skipped["no_image"] += 1
            continue
        try:
            image = decode_base64_image(blob)
        except BadImageError as e:
            skipped[e.reason if e.reason == "undecodable_base64" else f"image_{e.reason}"] += 1
            continue
        choices = [row[k].strip() for k in LETTERS if (row.get(k) or "").strip() and row[k].strip().lower() != "nan"]
        question = row.get("question")
        hint = (row.get("hint") or "").strip()
        if hint and hint.lower() != "nan" and isinstance(question, str) and question.strip():
            question = f"Hint: {hint}\n{question}"
        got = _make_item(id=str(row.get("index") or n), image=image, question=question, answer=row.get("answer"),
                         choices=choices, category=row.get("category"))
        if isinstance(got, str):
            skipped[got] += 1
        else:
            bench.items.append(got)
    bench.skipped = dict(skipped)
    return bench


class _RecordingRng:
    """A numpy Generator that logs (method, result) of every draw, so the truth of a figure is read from the
    very numbers data.py's drawing code used."""

    def __init__(self, seed: int):
        self.rng, self.log = np.random.default_rng(seed), []

    def __getattr__(self, name: str):
        method = getattr(self.rng, name)

        def draw(*args, **kwargs):
            out = method(*args, **kwargs)
            self.log.append((name, out))
            return out
        return draw


def eval_seed(i: int) -> int:
    """Seed of synthetic eval item i: >= 2**32, so never one of training's 32-bit figure seeds."""
    return SEED_OFFSET + int(np.random.SeedSequence([EVAL_SALT, i]).generate_state(1)[0])


def draw_with_truth(seed: int, size: int, kind: str) -> tuple[Image.Image, list[tuple[str, Any]]]:
    """`data.synthetic_figure(seed, size, kind)`'s pixels, and the draws that made them."""
    from vzero_fast.data import _DRAW, _font  # the drawing code itself: the truth is what it drew

    rng = _RecordingRng(seed)
    image = Image.new("RGB", (size, size), "white")
    _DRAW[kind](ImageDraw.Draw(image), rng, size, _font(max(8, round(size * 0.05))))
    return image, rng.log


COUNT_QUESTIONS = {"shapes": "How many shapes are there?", "bar_chart": "How many bars are there?",
                   "pie_chart": "How many slices does the pie chart have?",
                   "table": "How many rows of data does the table have, not counting the header?",
                   "line_chart": "How many points does each line have?"}


def _ints(log_: list[tuple[str, Any]]) -> list[Any]:
    return [out for name, out in log_ if name == "integers"]


def synthetic_item(i: int, size: int = 224) -> Item:
    """Item i of the built-in benchmark (module docstring): kind SYNTHETIC_PLAN[i % 7], seed eval_seed(i)."""
    from vzero_fast.qa import COLOUR_OPTIONS, COLOUR_QUESTION, colour_figure

    kind, seed = SYNTHETIC_PLAN[i % len(SYNTHETIC_PLAN)], eval_seed(i)
    if kind == "colour":
        j = (i // len(SYNTHETIC_PLAN) + 1) % len(COLOUR_OPTIONS)  # balanced: one answer scores 1/4 of 4m items
        return Item(id=f"synthetic-{i}", image=colour_figure(seed, size, COLOUR_OPTIONS[j]),
                    question=COLOUR_QUESTION, answer=LETTERS[j], answer_type="choice", category="colour",
                    choices=list(COLOUR_OPTIONS))
    image, draws = draw_with_truth(seed, size, kind)
    ints = _ints(draws)
    answer_type, category = "number", "count"
    if kind == "clock":  # hour, minute / 5, then with probability 0.3 any minute (data._clock)
        hour, minute = int(ints[0]), int(ints[1]) * 5
        if next(out for name, out in draws if name == "random") < 0.3:
            minute = int(ints[2])
        question, answer = "What time does the clock show? Answer as H:MM.", f"{hour}:{minute:02d}"
        answer_type, category = "text", "time"
    else:  # the first draw of each of these kinds is its count (data.py)
        question, answer = COUNT_QUESTIONS[kind], str(int(ints[0]))
    if kind == "bar_chart" and [out for name, out in draws if name == "random"][1] < 0.5:
        # the values are printed on the bars (data._bar_chart's show_values): ask for the tallest
        values = next(v for v in ints if isinstance(v, np.ndarray))
        question, answer, category = "What is the value of the tallest bar?", str(int(values.max())), "value"
    return Item(id=f"synthetic-{i}", image=image, question=question, answer=answer, answer_type=answer_type,
                category=category)


def synthetic_bench(count: int = SYNTHETIC_ITEMS, size: int = 224) -> Bench:
    items = [synthetic_item(i, size) for i in range(count)]
    return Bench(name="synthetic", items=items, rows=count)


def load_bench(spec: str, *, limit: int | None = None, size: int = 224) -> Bench:
    """`synthetic`, a .jsonl or a VLMEvalKit .tsv; the first `limit` usable items (all when None)."""
    if spec == "synthetic":
        return synthetic_bench(limit or SYNTHETIC_ITEMS, size)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BenchError(f"--bench {spec}: no such file (give a .jsonl, a VLMEvalKit .tsv, or 'synthetic')")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".tsv"):
        raise BenchError(f"--bench {spec}: a benchmark is a .jsonl or a VLMEvalKit .tsv (or 'synthetic')")
    bench = (read_jsonl_bench if suffix == ".jsonl" else read_tsv_bench)(path, limit)
    if bench.skipped:
        log.warning("%s: skipped %d of %d rows (%s)", path, sum(bench.skipped.values()), bench.rows,
                    ", ".join(f"{n} {r}" for r, n in sorted(bench.skipped.items())))
    if not bench.items:
        raise BenchError(f"--bench {spec}: no usable row in {bench.rows} (skipped: {bench.skipped or 'none'})")
    return bench


__all__ = ["ANSWER_TYPES", "Bench", "BenchError", "Item", "decode_base64_image", "draw_with_truth", "eval_seed",
           "infer_answer_type", "load_bench", "parse_number", "read_jsonl_bench", "read_tsv_bench", "synthetic_bench",
           "synthetic_item"]
