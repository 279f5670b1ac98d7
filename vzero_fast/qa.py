"""Question data: items of an image and a question (and, for the grpo recipe, an answer), from a JSONL/CSV
listing or drawn synthetically, for the single-role recipes `grpo` and `selfjudge`.

    open_qa(data_cfg, seed=, task=, require_answer=) -> QASource   (an ImageSource: step_items works on it)
    source.questions[i], source.answers[i]                          (answers[i] is None when unlabeled)

Decisions:
- A listing is a .jsonl (one object per line) or .csv (a header) with `image` (or `path`) and `question`
  fields and an optional `answer`. A row without a usable image path or question, an unparsable JSONL
  line, or (when the recipe needs labels) a row without an answer is skipped with one warning line and
  counted in `stats.bad_rows`; it never crashes a run. Bad image files are skipped and counted by reason
  like any image source's (vzero_fast/data.py). An `answer` field is read only when `require_answer` (the
  grpo recipe in label mode): Self-Judge never sees it.
- Synthetic tasks (the tiny default, `data.images` empty):
  * "colour" (grpo): one large filled shape (circle, square or triangle, 60-90% of the side, random place) of
    one of four colours on white; the question lists the colours as options in a FIXED order (A red, B blue, C green,
    D yellow), so the answer letter is a function of the pixels alone: the one task a random tiny model can
    learn from pixels in tens of steps. Item i's colour is COLOURS[(i + offset) % 4] for a seeded offset and
    the items come in a seeded order, so the labels are balanced: a policy that ignores the image scores at
    most `label_chance(source)` = the largest label share (1/4 for a multiple of 4 items).
  * "figures" (selfjudge): data.py's synthetic figures (bar/line/pie chart, table, geometry, shapes, clock),
    each with a free-form question templated from its kind (counts, bar values, clock times). No answers.
- Every random choice comes from numpy generators seeded by (seed, i): a seed gives identical items.

Tests: tests/test_grpo_recipe.py (listing rows, bad rows, the colour task and its chance).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vzero_fast.answers import LETTERS
from vzero_fast.data import (
    COLOURS,
    FileSource,
    ImageSource,
    resize_to_bounds,
    synthetic_figure,
)

log = logging.getLogger("vzero_fast.qa")

TASKS = ("colour", "figures")
COLOUR_OPTIONS = ("red", "blue", "green", "yellow")
"""The colour task's options, in the fixed order A-D."""
COLOUR_QUESTION = "What colour is the shape?\n" + "\n".join(
    f"{k}) {c}" for k, c in zip(LETTERS, COLOUR_OPTIONS, strict=True))

# kind -> free-form questions about it (the "figures" task); the answers are in the pixels, never in the data.
FIGURE_QUESTIONS = {
    "bar_chart": ("How many bars are there?", "What is the value of the tallest bar?"),
    "line_chart": ("How many points does the line have?", "In which year is the value highest?"),
    "pie_chart": ("How many slices are there?", "What percentage is the largest slice?"),
    "table": ("How many rows of data does the table have?", "What is the largest number in the table?"),
    "geometry": ("What is the perimeter of the triangle?", "How long is the longest side?"),
    "shapes": ("How many shapes are there?", "How many circles are there?"),
    "clock": ("What time does the clock show?", "What hour does the hour hand point to?"),
}


class QASource(ImageSource):
    """An image source whose entries also carry a question and an optional answer."""

    questions: list[str]
    answers: list[str | None]


class ListingQASource(FileSource, QASource):
    def __init__(self, listing: str | os.PathLike, *, require_answer: bool, min_pixels: int | None = None,
                 max_pixels: int | None = None):
        listing = Path(listing).expanduser().absolute()
        rows, bad = read_qa_rows(listing, require_answer=require_answer)
        if not rows:
            need = "image, question and answer" if require_answer else "image and question"
            raise ValueError(f"{listing}: no usable row (each needs {need}; {bad} bad rows)")
        super().__init__([p for p, _, _ in rows], kind=listing.suffix.lower().lstrip("."), where=str(listing),
                         min_pixels=min_pixels, max_pixels=max_pixels)
        self.stats.bad_rows = bad
        self.questions = [q for _, q, _ in rows]
        self.answers = [a for _, _, a in rows]


def read_qa_rows(path: Path, *, require_answer: bool) -> tuple[list[tuple[Path, str, str | None]], int]:
    """(rows of (image path, question, answer or None), number of bad rows skipped) of a .jsonl or .csv."""
    raw: list[tuple[int, object]] = []  # (line number, the row as parsed: a dict, or the JSON error)
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        raw.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raw.append((n, f"not valid JSON ({e.msg})"))
    elif path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [h.strip().lower() for h in reader.fieldnames or []]
            raw += [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]
    else:
        raise ValueError(f"{path}: a question listing is a .jsonl or .csv file")
    rows, bad = [], 0
    for n, row in raw:
        problem = row if isinstance(row, str) else _row_problem(row, require_answer)
        if problem is not None:
            bad += 1
            log.warning("%s: skipping line %d: %s", path, n, problem)
            continue
        image = Path(str(row.get("image") or row.get("path")).strip()).expanduser()
        answer = str(row["answer"]).strip() if require_answer else None
        rows.append((image if image.is_absolute() else path.parent / image, str(row["question"]).strip(), answer))
    return rows, bad


def _row_problem(row, require_answer: bool) -> str | None:
    if not isinstance(row, dict):
        return "not an object"
    image = row.get("image") or row.get("path")
    if not isinstance(image, str) or not image.strip():
        return "no image path"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "no question"
    if require_answer and (row.get("answer") is None or not str(row["answer"]).strip()):
        return "no answer (the grpo recipe in label mode needs one)"
    return None


class SyntheticQASource(QASource):
    """`count` synthetic items of `task` (module docstring), drawn on demand."""

    kind = "synthetic"

    def __init__(self, count: int, *, task: str, seed: int = 0, size: int = 224, min_pixels: int | None = None,
                 max_pixels: int | None = None):
        if task not in TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; tasks: {', '.join(TASKS)}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.task, self.seed, self.size = task, seed, size
        if task == "colour":
            offset = int(np.random.default_rng([seed, 7]).integers(len(COLOUR_OPTIONS)))
            colours = [COLOUR_OPTIONS[(i + offset) % len(COLOUR_OPTIONS)] for i in range(count)]
            keys = [f"synthetic:colour:{i}" for i in range(count)]
            self.questions = [COLOUR_QUESTION] * count
            self.answers = [LETTERS[COLOUR_OPTIONS.index(c)] for c in colours]
        else:
            from vzero_fast.data import SYNTHETIC_KINDS

            kinds = [SYNTHETIC_KINDS[i % len(SYNTHETIC_KINDS)] for i in range(count)]
            keys = [f"synthetic:{k}:{i}" for i, k in enumerate(kinds)]
            pick = np.random.default_rng([seed, 9]).integers(2, size=count).tolist()
            self.questions = [FIGURE_QUESTIONS[k][j] for k, j in zip(kinds, pick, strict=True)]
            self.answers = [None] * count
        super().__init__(keys, where=f"{task} (seed {seed}, {size} px)", min_pixels=min_pixels, max_pixels=max_pixels)

    def _read(self, i: int, validate_only: bool) -> Image.Image:
        item_seed = int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0])
        if self.task == "colour":
            image = colour_figure(item_seed, self.size, COLOUR_OPTIONS[LETTERS.index(self.answers[i])])
        else:
            image = synthetic_figure(item_seed, self.size, kind=self.keys[i].split(":")[1])
        if self.max_pixels is None:
            return image
        return resize_to_bounds(image, self.min_pixels, self.max_pixels, factor=self.factor)

    def is_ok(self, i: int) -> bool:
        return True  # drawing never fails


def colour_figure(seed: int, size: int, colour: str) -> Image.Image:
    """One filled shape of `colour` (a COLOURS name) on white: random kind, size (60-90% of the side) and place."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.3, 0.45)
    x, y = rng.uniform(r, size - r, size=2).tolist()
    kind = int(rng.integers(3))
    fill = COLOURS[colour]
    if kind == 0:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(30, 30, 30), width=2)
    elif kind == 1:
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill, outline=(30, 30, 30), width=2)
    else:
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill, outline=(30, 30, 30))
    return image


def label_chance(source: QASource) -> float:
    """The best mean reward of any policy that ignores the image: the largest share of one answer among the
    source's labels (it can do no better than always giving the most frequent answer)."""
    labels = [a for a in source.answers if a is not None]
    if not labels:
        raise ValueError("label_chance needs a labeled source")
    return max(Counter(labels).values()) / len(labels)


def open_qa(data_cfg, *, seed: int, task: str, require_answer: bool, factor: int = 28) -> QASource:
    """The run's question items from its `[data]` section: the listing `data.images`, else the synthetic
    `task` (data.synthetic_images items of data.synthetic_size px); images resized to multiples of `factor`
    px (`model.image_factor`: 28 for Qwen2.5-VL, 32 for the Qwen3 families)."""
    bounds = dict(min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels)
    if not data_cfg.images:
        source = SyntheticQASource(data_cfg.synthetic_images, task=task, seed=seed, size=data_cfg.synthetic_size,
                                   **bounds)
    else:
        path = Path(data_cfg.images).expanduser()
        if not path.is_file() or path.suffix.lower() not in (".jsonl", ".csv"):
            raise ValueError(f"{data_cfg.images!r}: this recipe reads a .jsonl or .csv of image + question rows "
                             f"(or an empty data.images for synthetic questions)")
        source = ListingQASource(path, require_answer=require_answer, **bounds)
    source.factor = factor
    return source
