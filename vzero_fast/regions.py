"""Region data for V-Zero-OPD: an image, a question about one region of it, and that region's box.

    open_regions(data_cfg, seed=, negative=, factor=, teacher_factor=) -> RegionSource (an ImageSource:
    `data.step_items` works on it); source.load(i) -> RegionItem with the student's image and the teacher's
    positive and negative views.

Decisions:
- A listing is a .jsonl, one object per line: `image` (a path, relative to the listing's folder), `question`,
  `bbox` = [x0, y0, x1, y1] in pixels of the original image (the question-relevant region) and optionally
  `neg_bbox` (an irrelevant region of the same image). A line that is not a JSON object, or lacks a usable
  image path, question or box (four finite numbers with x0 < x1, y0 < y1), is skipped with one warning and
  counted in `stats.bad_rows` when the listing is read. A box that leaves the image (known once the image
  is read), a box too thin for the vision tower (aspect ratio above 200), or a hard negative that cannot be
  drawn is skipped and counted as `bad_box`; bad image files are skipped and counted by reason as by any
  image source (vzero_fast/data.py). Nothing here crashes a run.
- The teacher's views (ALGORITHMS.md section 4): positive = [full image, crop of bbox]; negative, by
  `negative` mode: `hard_negative_crop` = [full image, crop of neg_bbox, or of a same-size region that does
  not overlap bbox, drawn from (seed, index)]; `downsample` = the positive view with every image halved.
  Crops are cut from the original pixels, then every image is resized into the pixel bounds (a small crop is
  enlarged: that is the point of the crop). The student sees the full image only.
- Synthetic default (`data.images` empty): 2-4 filled shapes of distinct kinds in distinct cells of a 2x2
  grid on white, each shape's box known exactly; the question asks about one of them (templated), and
  its box is the bbox. A seed gives identical pixels, questions and boxes.

Test: tests/test_opd.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vzero_fast.data import (
    COLOURS,
    INK,
    MAX_ASPECT,
    REASONS,
    BadImageError,
    ImageItem,
    ImageSource,
    SourceStats,
    read_image,
    resize_to_bounds,
)

log = logging.getLogger("vzero_fast.regions")

NEGATIVE_MODES = ("hard_negative_crop", "downsample")
SHAPE_KINDS = ("circle", "square", "triangle", "diamond")
SHAPE_COLOURS = ("red", "blue", "green", "orange", "purple", "yellow")
QUESTIONS = ("What colour is the {kind}?", "Describe the {kind} in the figure.", "Which colour fills the {kind}?")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class RegionItem(ImageItem):
    """An ImageItem (`image`: the student's full image) with the question and the teacher's two views."""

    question: str = ""
    bbox: Box = (0, 0, 0, 0)
    """The relevant region, in pixels of the original image."""
    positive: tuple[Image.Image, ...] = ()
    """Teacher view z+: [full image, crop of bbox]."""
    negative: tuple[Image.Image, ...] = ()
    """Teacher view z-: [full image, negative crop] or the positive view halved (`downsample`)."""


@dataclass
class RegionStats(SourceStats):
    bad_box: int = 0
    """Rows whose box leaves the image, is too thin, or leaves no room for a same-size hard negative."""

    @property
    def skipped(self) -> int:
        return sum(getattr(self, r) for r in REASONS) + self.bad_box


# ------------------------------------------------------------------------------------------------ boxes

def parse_box(value) -> Box | None:
    """[x0, y0, x1, y1] of finite numbers with x0 < x1 and y0 < y1 -> integer pixel box (outward), else None."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    x0, y0, x1, y1 = value
    if not (x0 < x1 and y0 < y1):
        return None
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def overlaps(a: Box, b: Box) -> bool:
    """Whether two boxes share an area (touching edges do not)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def negative_box(bbox: Box, width: int, height: int, rng: np.random.Generator) -> Box | None:
    """A region of bbox's size inside the width x height image that does not overlap bbox, uniform within one
    of the (up to four) strips beside bbox, the strip chosen uniformly among those with room; None if none has."""
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    x_any, y_any = (0, width - w), (0, height - h)  # inclusive ranges of the top-left corner
    strips = [((0, bbox[0] - w), y_any), ((bbox[2], width - w), y_any),  # left, right
              (x_any, (0, bbox[1] - h)), (x_any, (bbox[3], height - h))]  # above, below
    strips = [s for s in strips if s[0][0] <= s[0][1] and s[1][0] <= s[1][1]]
    if not strips:
        return None
    (xa, xb), (ya, yb) = strips[int(rng.integers(len(strips)))]
    x0, y0 = int(rng.integers(xa, xb + 1)), int(rng.integers(ya, yb + 1))
    return x0, y0, x0 + w, y0 + h


def _check_inside(box: Box, size: tuple[int, int], what: str) -> None:
    w, h = size
    if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
        raise BadImageError("bad_box", f"{what} {list(box)} outside the {w}x{h} image")
    bw, bh = box[2] - box[0], box[3] - box[1]
    if max(bw, bh) / min(bw, bh) > MAX_ASPECT:
        raise BadImageError("bad_box", f"{what} {list(box)}: aspect ratio above {MAX_ASPECT}")


# ---------------------------------------------------------------------------------------- synthetic data

def region_figure(seed: int, size: int = 224) -> tuple[Image.Image, str, Box]:
    """(image, question, bbox): 2-4 shapes of distinct kinds in distinct cells of a 2x2 grid; the question
    asks about one of them and bbox is exactly the pixels it covers (outline included)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    cell = size / 2
    n = int(rng.integers(2, 5))
    kinds = rng.choice(len(SHAPE_KINDS), size=n, replace=False).tolist()
    cells = rng.choice(4, size=n, replace=False).tolist()
    boxes = []
    for kind, slot in zip(kinds, cells, strict=True):
        r = cell * rng.uniform(0.22, 0.4)
        cx = (slot % 2 + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r - 1)
        cy = (slot // 2 + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r - 1)
        fill = COLOURS[SHAPE_COLOURS[int(rng.integers(len(SHAPE_COLOURS)))]]
        name = SHAPE_KINDS[kind]
        if name == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=INK, width=2)
        elif name == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=INK, width=2)
        elif name == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill, outline=INK, width=2)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill, outline=INK, width=2)
        # PIL fills [x0, x1] inclusive: the covered pixels are floor(c - r) .. floor(c + r), one more at the end.
        boxes.append((max(0, math.floor(cx - r)), max(0, math.floor(cy - r)),
                      min(size, math.floor(cx + r) + 1), min(size, math.floor(cy + r) + 1)))
    target = int(rng.integers(n))
    question = QUESTIONS[int(rng.integers(len(QUESTIONS)))].format(kind=SHAPE_KINDS[kinds[target]])
    return image, question, boxes[target]


# -------------------------------------------------------------------------------------------- the source

@dataclass(frozen=True)
class RegionRow:
    image: str  # a path, or "synthetic:<i>"
    question: str
    bbox: Box
    neg_bbox: Box | None = None


def read_region_rows(path: Path) -> tuple[list[RegionRow], int]:
    """The usable rows of a .jsonl listing and the number of bad ones (each warned about once)."""
    rows, bad = [], 0
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        problem = None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            obj, problem = None, f"not JSON ({e.msg})"
        if problem is None:
            problem = _row_problem(obj)
        if problem is not None:
            bad += 1
            log.warning("%s line %d skipped: %s", path, n, problem)
            continue
        image = Path(str(obj["image"])).expanduser()
        image = image if image.is_absolute() else path.parent / image
        neg = parse_box(obj["neg_bbox"]) if obj.get("neg_bbox") is not None else None
        rows.append(RegionRow(str(image), obj["question"].strip(), parse_box(obj["bbox"]), neg))
    return rows, bad


def _row_problem(obj) -> str | None:
    if not isinstance(obj, dict):
        return "not a JSON object"
    if not isinstance(obj.get("image"), str) or not obj["image"].strip():
        return "no image path"
    if not isinstance(obj.get("question"), str) or not obj["question"].strip():
        return "no question"
    if parse_box(obj.get("bbox")) is None:
        return f"bbox {obj.get('bbox')!r} is not [x0, y0, x1, y1] with x0 < x1, y0 < y1"
    if obj.get("neg_bbox") is not None and parse_box(obj["neg_bbox"]) is None:
        return f"neg_bbox {obj['neg_bbox']!r} is not [x0, y0, x1, y1] with x0 < x1, y0 < y1"
    return None


class RegionSource(ImageSource):
    """Rows of (image, question, bbox[, neg_bbox]); `load(i)` -> RegionItem or None (skipped, counted once)."""

    def __init__(self, rows: list[RegionRow], *, kind: str, where: str, seed: int, negative: str,
                 min_pixels: int, max_pixels: int, teacher_factor: int = 28, synthetic_size: int = 0,
                 bad_rows: int = 0):
        if negative not in NEGATIVE_MODES:
            raise ValueError(f"negative view must be one of {NEGATIVE_MODES}, got {negative!r}")
        super().__init__([r.image for r in rows], where=where, min_pixels=min_pixels, max_pixels=max_pixels)
        self.kind, self.rows, self.seed, self.negative = kind, rows, seed, negative
        self.teacher_factor, self.synthetic_size = teacher_factor, synthetic_size
        self.stats = RegionStats(bad_rows=bad_rows)

    def _original(self, i: int) -> Image.Image:
        if self.synthetic_size:
            return region_figure(_item_seed(self.seed, i), self.synthetic_size)[0]
        return read_image(self.rows[i].image)  # raw pixels: the boxes are in its coordinates

    def _read(self, i: int, validate_only: bool):  # noqa: ARG002 - every row is judged by its boxes
        row, image = self.rows[i], self._original(i)
        _check_inside(row.bbox, image.size, "bbox")
        neg = row.neg_bbox
        if self.negative == "hard_negative_crop":
            if neg is None:
                neg = negative_box(row.bbox, *image.size, np.random.default_rng([self.seed, i, 1]))
                if neg is None:
                    raise BadImageError("bad_box", f"no region of bbox {list(row.bbox)}'s size outside it fits in "
                                                   f"the {image.size[0]}x{image.size[1]} image")
            else:
                _check_inside(neg, image.size, "neg_bbox")

        def fit(im: Image.Image, factor: int) -> Image.Image:
            return resize_to_bounds(im, self.min_pixels, self.max_pixels, factor=factor)

        crop = image.crop(row.bbox)
        tf = self.teacher_factor
        positive = (fit(image, tf), fit(crop, tf))
        if self.negative == "downsample":
            negative = tuple(fit(_half(im), tf) for im in (image, crop))
        else:
            negative = (positive[0], fit(image.crop(neg), tf))
        return fit(image, self.factor), positive, negative

    def load(self, i: int) -> RegionItem | None:
        views = self._judge(i, validate_only=False)
        if views is None:
            return None
        image, positive, negative = views
        row = self.rows[i]
        return RegionItem(i, self.keys[i], image, question=row.question, bbox=row.bbox, positive=positive,
                          negative=negative)

    def describe(self) -> str:
        return super().describe() + (f"; {self.stats.bad_box} bad boxes" if self.stats.bad_box else "")


def _half(image: Image.Image) -> Image.Image:
    """Every side halved (at least 1 px), bicubic: the `downsample` negative view loses the fine detail."""
    return image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.BICUBIC)


def _item_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i, 17]).generate_state(1)[0])


def open_regions(data_cfg, *, seed: int, negative: str, factor: int = 28, teacher_factor: int = 28) -> RegionSource:
    """The run's region source: the .jsonl listing `data.images`, or `data.synthetic_images` synthetic figures."""
    spec = data_cfg.images
    bounds = dict(min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels)
    if not spec:
        count, size = data_cfg.synthetic_images, data_cfg.synthetic_size
        rows = []
        for i in range(count):
            _, question, bbox = region_figure(_item_seed(seed, i), size)
            rows.append(RegionRow(f"synthetic:regions:{i}", question, bbox))
        source = RegionSource(rows, kind="synthetic regions", where=f"(seed {seed}, {size} px)", seed=seed,
                              negative=negative, teacher_factor=teacher_factor, synthetic_size=size, **bounds)
    else:
        path = Path(os.fspath(spec)).expanduser().absolute()
        if path.suffix.lower() != ".jsonl" or not path.is_file():
            raise ValueError(f"region data {spec!r} must be a .jsonl file of image, question, bbox rows")
        rows, bad = read_region_rows(path)
        if not rows:
            raise ValueError(f"region listing {spec!r} has no usable row ({bad} bad rows)")
        source = RegionSource(rows, kind="jsonl", where=str(path), seed=seed, negative=negative,
                              teacher_factor=teacher_factor, bad_rows=bad, **bounds)
    source.factor = factor
    return source
