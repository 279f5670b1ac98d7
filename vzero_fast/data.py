"""Unlabeled image sources: a folder, a JSONL/CSV listing, or synthetic figures drawn with pillow.

Every source is a list of candidate entries (`keys`, `len`) and `load(i) -> ImageItem | None`. The trainer
takes a step's images with `step_items(source, seed=, step=, count=, rank=, world_size=)`.

Decisions:
- `open_source(spec)` picks the source from what `spec` is: "" -> synthetic figures, a folder (recursive;
  .jpg .jpeg .png .webp .bmp, any case), a .jsonl (objects with an "image" or "path" key) or a .csv (a header
  with an "image" or "path" column). Relative listing paths resolve against the listing's folder. A bad
  spec, an empty folder, an unparsable JSONL line or a CSV without the column is an error at open time.
- A bad file never crashes a run: it is skipped with ONE warning line and counted in `stats` under one
  reason (`REASONS`). Failures are cached per index, so a file is judged once however many epochs ask.
  A file is judged by its bytes, not its name: PNG bytes in a .jpg load; a GIF named .png is
  `unsupported_format`. Only the accepted PIL plugins are tried (`Image.open(formats=...)`), which also
  keeps PIL's rarer parsers away from untrusted files. Unidentifiable bytes that start with an accepted
  format's signature count as `corrupt`, anything else as `not_image`.
- Size is checked from the header before any pixel is decoded: a side above 16384 px or more than PIL's
  89.5 Mpx bomb limit is `too_large` (a 12000x12000 1-bit PNG is a few bytes on disk and 144 Mpx decoded);
  a ratio above 200, which Qwen's processor refuses, is `bad_aspect`.
  `ImageFile.LOAD_TRUNCATED_IMAGES` stays False: a truncated file is `truncated`, not half an image.
- Images reach the model already inside the processor's pixel bounds: `fit_pixels` is the processor's
  `smart_resize` (same arithmetic, so the processor then resizes nothing), plus a search over all sizes
  for the cases where that rule's output would not survive a second pass: area outside [min_pixels,
  max_pixels] (a short side clamped to 28 under a small budget, e.g. 2000x100 with the tiny preset) or a
  ratio rounded past 200 (6614x39 -> 6608x28). Large JPEGs are decoded at a reduced DCT scale
  (`Image.draft`) before the exact bicubic resize.
- Every image becomes RGB: alpha composited on white (dropping alpha exposes arbitrary colours under
  transparent pixels), 16-bit greyscale scaled by 1/257, EXIF orientation applied.
- Order: `epoch_order(epoch, seed)` is a numpy permutation seeded by (seed, epoch); ranks take a strided
  slice (`shard_indices`), so shards are disjoint, cover everything and differ in size by at most 1.
  A step's images are a pure function of (seed, step) (`step_items`), so a resumed run sees the same ones;
  a bad file leaves its step one image short.
- Synthetic figures (the tiny default; the V-Zero paper trained on ~4K geometry/chart images): seven kinds
  with numbers and labels a model can be asked about, drawn with PIL's built-in font (no system fonts),
  every random choice from `numpy.random.default_rng(seed)`, so a seed gives identical pixels.

Test: `pytest tests/test_data.py`. Look: `python -m vzero_fast images figs --count 14`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

log = logging.getLogger("vzero_fast.data")

T = TypeVar("T")

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
MAX_SIDE = 16384
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS, pinned so a caller's override can't lift it
MAX_ASPECT = 200  # Qwen2-VL's smart_resize raises above this ratio
REASONS = ("missing", "unreadable", "empty", "not_image", "unsupported_format", "corrupt", "truncated",
           "too_large", "bad_aspect")

# First bytes of image formats, to tell a damaged image (corrupt) from something else (not_image).
_ACCEPTED_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")
_OTHER_MAGIC = (b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")


@dataclass(frozen=True)
class ImageItem:
    index: int
    """Position of the entry in the source (0 <= index < len(source))."""
    key: str
    """File path, or "synthetic:<kind>:<i>"."""
    image: Image.Image
    """RGB, already inside the source's pixel bounds when it has any."""
    position: int = -1
    """Position in the run's stream of step images (`step_items`: step * count + k), the same on any number
    of ranks, so per-prompt seeds derived from it are too; -1 for items not taken through `step_items`."""


@dataclass
class SourceStats:
    """Distinct entries judged so far, by outcome; each index counts once."""

    loaded: int = 0
    missing: int = 0
    unreadable: int = 0
    empty: int = 0
    not_image: int = 0
    unsupported_format: int = 0
    corrupt: int = 0
    truncated: int = 0
    too_large: int = 0
    bad_aspect: int = 0
    ignored_extension: int = 0
    """Files in a folder without an accepted extension; never candidates, never warned about."""
    bad_rows: int = 0
    """Rows of a question listing (vzero_fast/qa.py) without a usable image path, question or required answer;
    never candidates, each warned about once when the listing is read."""

    @property
    def skipped(self) -> int:
        return sum(getattr(self, r) for r in REASONS)

    def as_dict(self) -> dict[str, int]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["skipped"] = self.skipped
        return out


class BadImageError(Exception):
    """A file that cannot be used: `reason` is one of REASONS, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------------------
# Pixel bounds (Qwen2.5-VL's smart_resize)


def fit_pixels(width: int, height: int, *, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(new_w, new_h): multiples of `factor`, area in [min_pixels, max_pixels], aspect ratio kept (<= 200).

    Identical to transformers' Qwen2-VL `smart_resize` (the same float operations in the same order)
    whenever that rule lands inside the bounds, so the processor's own resize is then a no-op.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"aspect ratio of a {width}x{height} image is "
                         f"{max(width, height) / min(width, height):.1f}, above {MAX_ASPECT}, "
                         "the limit of Qwen2.5-VL's image processor")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    # Also keep the ratio <= 200: rounding 6614x39 gives 6608x28 (236), which the processor would refuse.
    if min_pixels <= h_bar * w_bar <= max_pixels and max(h_bar, w_bar) <= MAX_ASPECT * min(h_bar, w_bar):
        return w_bar, h_bar
    return _fit_search(width, height, min_pixels, max_pixels, factor)


def _fit_search(width: int, height: int, min_pixels: int, max_pixels: int, factor: int) -> tuple[int, int]:
    # smart_resize can leave the bounds when one side is clamped up to `factor` (e.g. 2000x100 under
    # max 112*112 gives 476x28 = 13328 px) or when its ceil overshoots a tight range. Search every
    # height instead: for each, the in-bounds widths nearest the kept aspect; least log-aspect error wins.
    hs = factor * np.arange(1, max_pixels // (factor * factor) + 1, dtype=np.int64)   # [H]
    lo = np.maximum(-(-min_pixels // (factor * hs)), -(-hs // (MAX_ASPECT * factor)))  # [H] width units
    lo = np.maximum(lo, 1)
    hi = np.minimum(max_pixels // (factor * hs), MAX_ASPECT * hs // factor)             # [H]
    ideal = hs * (width / height) / factor                                              # [H]
    best = None
    for w_units in (np.floor(ideal), np.ceil(ideal)):
        w = np.clip(w_units, lo, hi) * factor
        err = np.where(lo <= hi, np.abs(np.log(w * height / (hs * width))), np.inf)
        j = int(np.argmin(err))
        if best is None or err[j] < best[0]:
            best = (float(err[j]), int(w[j]), int(hs[j]))
    if best is None or not math.isfinite(best[0]):
        raise ValueError(f"no size with both sides multiples of {factor} has an area in "
                         f"[{min_pixels}, {max_pixels}]")
    return best[1], best[2]


def resize_to_bounds(image: Image.Image, min_pixels: int, max_pixels: int, *, factor: int = 28) -> Image.Image:
    """`image` resized (bicubic, as Qwen's processor does) to `fit_pixels` of its size; same object if it fits."""
    size = fit_pixels(*image.size, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------------------
# Decoding one file


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # 16-bit greyscale PNG ("I;16") or 32-bit "I" holding 16-bit values
        grey = np.clip(np.asarray(image, dtype=np.float32) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def image_from_png(data: bytes, *, min_pixels: int, max_pixels: int, factor: int = 28) -> Image.Image:
    """A PNG made by vzero_fast's renderer (vzero_fast/render.py, which checked it: at most 16384 px a side) as
    RGB inside the bounds, transparency composited on white as for files. Decoded without PIL's
    decompression-bomb guard (89M px, the limit `read_image` keeps for files): the renderer's rules allow
    16384 x 16384."""
    image = PngImagePlugin.PngImageFile(io.BytesIO(data))
    image.load()
    return resize_to_bounds(_to_rgb(image), min_pixels, max_pixels, factor=factor)


def _classify_unidentified(path: Path) -> BadImageError:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ACCEPTED_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return BadImageError("corrupt", "damaged header")
    if head.startswith(_OTHER_MAGIC) or head[4:8] == b"ftyp":
        return BadImageError("unsupported_format", f"format not in {', '.join(PIL_FORMATS)}")
    return BadImageError("not_image", f"no image format recognised (starts with {head[:8]!r})")


def read_image(path: str | os.PathLike, *, min_pixels: int | None = None, max_pixels: int | None = None,
               validate_only: bool = False, factor: int = 28) -> Image.Image:
    """Decode `path` to RGB inside the bounds (when given); raises BadImageError on a bad file.

    `validate_only` decodes (at the smallest JPEG scale) to prove the file is whole, and returns it raw.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise BadImageError("missing", "no such file")
        if not path.is_file():
            raise BadImageError("not_image", "not a regular file")
        if path.stat().st_size == 0:
            raise BadImageError("empty", "0 bytes")
        with open(path, "rb") as fp:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    image = Image.open(fp, formats=PIL_FORMATS)
            except UnidentifiedImageError:
                raise _classify_unidentified(path) from None
            w, h = image.size  # from the header; nothing decoded yet
            if max(w, h) > MAX_SIDE or w * h > MAX_IMAGE_PIXELS:
                raise BadImageError("too_large", f"{w}x{h} px (limits: side {MAX_SIDE}, {MAX_IMAGE_PIXELS} px)")
            if max(w, h) / min(w, h) > MAX_ASPECT:
                raise BadImageError("bad_aspect", f"{w}x{h} px, aspect ratio above {MAX_ASPECT}")
            target = None  # (w, h) after EXIF orientation, fixed from the header size
            if image.format in ("JPEG", "MPO") and (validate_only or max_pixels is not None):
                # DCT-domain downscale: decodes e.g. a 4000x3000 photo at 1/4 scale, several times faster;
                # draft keeps both sides >= the request and the exact resize to `target` follows.
                swap = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation: 90/270 degrees
                if not validate_only:
                    target = fit_pixels(*((h, w) if swap else (w, h)), min_pixels=min_pixels or 1,
                                        max_pixels=max_pixels, factor=factor)
                tw, th = target or (1, 1)
                image.draft(None, (th, tw) if swap else (tw, th))
            try:
                image.load()
            except (OSError, EOFError) as e:
                truncated = isinstance(e, EOFError) or "truncat" in str(e).lower()
                raise BadImageError("truncated" if truncated else "corrupt", str(e)) from None
            if validate_only:
                return image
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as e:  # a broken EXIF block should not cost a good picture
                log.debug("ignoring EXIF orientation of %s: %s", path, e)
                target = None  # computed for the rotated picture
            image = _to_rgb(image)
        if max_pixels is not None:
            target = target or fit_pixels(*image.size, min_pixels=min_pixels or 1, max_pixels=max_pixels,
                                          factor=factor)
            if image.size != target:
                image = image.resize(target, Image.Resampling.BICUBIC)
        return image
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError("too_large", str(e)) from None
    except PermissionError as e:
        raise BadImageError("unreadable", str(e)) from None
    except Exception as e:  # any other parser failure (SyntaxError, struct.error, ValueError, ...)
        raise BadImageError("corrupt", f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Sources


class ImageSource:
    """Candidate entries `keys`; `load(i)` gives an ImageItem or None (skipped, counted once)."""

    kind = "source"
    factor = 28
    """Pixels per image token along a side (the model's patch size x merge size; open_images sets it)."""

    def __init__(self, keys: list[str], *, where: str, min_pixels: int | None = None,
                 max_pixels: int | None = None):
        if (min_pixels is None) != (max_pixels is None):
            raise ValueError("give both min_pixels and max_pixels, or neither")
        if max_pixels is not None:
            fit_pixels(28, 28, min_pixels=min_pixels, max_pixels=max_pixels)  # validates the pair
        self.keys = keys
        self.where = where
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.stats = SourceStats()
        self.failures: dict[int, str] = {}  # index -> reason
        self._ok: set[int] = set()

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, i: int, validate_only: bool) -> Image.Image:
        raise NotImplementedError

    def _judge(self, i: int, validate_only: bool) -> Image.Image | None:
        if not 0 <= i < len(self.keys):
            raise IndexError(f"index {i} out of range for {len(self.keys)} entries")
        if i in self.failures:
            return None
        try:
            image = self._read(i, validate_only)
        except BadImageError as skip:
            self.failures[i] = skip.reason
            setattr(self.stats, skip.reason, getattr(self.stats, skip.reason) + 1)
            log.warning("skipping %s: %s (%s)", self.keys[i], skip.reason, skip.detail)
            return None
        if i not in self._ok:
            self._ok.add(i)
            self.stats.loaded += 1
        return image

    def load(self, i: int) -> ImageItem | None:
        image = self._judge(i, validate_only=False)
        return None if image is None else ImageItem(i, self.keys[i], image)

    def is_ok(self, i: int) -> bool:
        """Whether entry i loads; decodes it (cheaply) only when not yet judged in this process."""
        return i in self._ok or (i not in self.failures and self._judge(i, validate_only=True) is not None)

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        """A permutation of range(len(self)) seeded by (seed, epoch)."""
        return np.random.default_rng([seed, epoch]).permutation(len(self)).tolist()

    def describe(self) -> str:
        s = self.stats
        if not s.loaded and not s.skipped:
            tail = f"; {s.ignored_extension} other files ignored by extension" if s.ignored_extension else ""
            tail += f"; {s.bad_rows} bad rows skipped" if s.bad_rows else ""
            return f"{self.kind} {self.where}: {len(self)} images (read when first used{tail})"
        reasons = ", ".join(f"{getattr(s, r)} {r}" for r in REASONS if getattr(s, r))
        tail = f"; {s.ignored_extension} ignored by extension" if s.ignored_extension else ""
        tail += f"; {s.bad_rows} bad rows skipped" if s.bad_rows else ""
        return (f"{self.kind} {self.where}: {len(self)} images ({s.loaded} loaded, {s.skipped} skipped"
                f"{': ' + reasons if reasons else ''}{tail})")


class FileSource(ImageSource):
    """Image files by path; `kind` says where the paths came from."""

    def __init__(self, paths: Sequence[Path], *, kind: str, where: str, min_pixels: int | None = None,
                 max_pixels: int | None = None, ignored_extension: int = 0):
        super().__init__([str(p) for p in paths], where=where, min_pixels=min_pixels, max_pixels=max_pixels)
        self.kind = kind
        self.stats.ignored_extension = ignored_extension
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by another import): truncated "
                        "files will load partially instead of being skipped")

    def _read(self, i: int, validate_only: bool) -> Image.Image:
        return read_image(self.keys[i], min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                          validate_only=validate_only, factor=self.factor)


def scan_folder(root: str | os.PathLike) -> tuple[list[Path], dict[str, int]]:
    """(image paths sorted by relative path, count of other files by extension) under `root`, recursively."""
    root = Path(root)
    images, others = [], {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                images.append(Path(folder) / name)
            else:
                others[ext or "(none)"] = others.get(ext or "(none)", 0) + 1
    return images, others


def read_listing(path: str | os.PathLike) -> list[Path]:
    """Paths named by a .jsonl ("image" or "path" key per object) or .csv ("image" or "path" column)."""
    path = Path(path)
    base = path.parent
    raw: list[tuple[int, object]] = []  # (line number, value)
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}): {line.strip()[:80]!r}") from None
                if not isinstance(obj, dict) or not ({"image", "path"} & obj.keys()):
                    raise ValueError(f"{path}: line {n} is not an object with an \"image\" or \"path\" key")
                raw.append((n, obj.get("image", obj.get("path"))))
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            column = next((c for c in ("image", "path") if c in header), None)
            if column is None:
                raise ValueError(f"{path}: the CSV header has no \"image\" or \"path\" column (found {header})")
            col = header.index(column)
            for row in reader:
                if any(cell.strip() for cell in row):
                    raw.append((reader.line_num, row[col] if col < len(row) else ""))
    paths = []
    for n, value in raw:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}: line {n} has no image path (got {value!r})")
        p = Path(value.strip()).expanduser()
        paths.append(p if p.is_absolute() else base / p)
    if not paths:
        raise ValueError(f"{path}: the listing names no images")
    return paths


class FolderSource(FileSource):
    def __init__(self, root: str | os.PathLike, *, min_pixels: int | None = None, max_pixels: int | None = None,
                 quiet: bool = False):
        root = Path(root).expanduser().absolute()
        images, others = scan_folder(root)
        if not images:
            seen = sum(others.values())
            raise ValueError(f"no images in folder {root}: saw {seen} file(s) "
                             f"({', '.join(f'{n} {e}' for e, n in sorted(others.items())) or 'none'}); "
                             f"accepted extensions (any case): {' '.join(IMAGE_EXTENSIONS)}")
        super().__init__(images, kind="folder", where=str(root), min_pixels=min_pixels, max_pixels=max_pixels,
                         ignored_extension=sum(others.values()))
        if others and not quiet:
            log.info("folder %s: %d images; ignored by extension: %s", root, len(images),
                     ", ".join(f"{n} {e}" for e, n in sorted(others.items())))


class ListingSource(FileSource):
    def __init__(self, listing: str | os.PathLike, *, min_pixels: int | None = None,
                 max_pixels: int | None = None):
        listing = Path(listing).expanduser().absolute()
        super().__init__(read_listing(listing), kind=listing.suffix.lower().lstrip("."), where=str(listing),
                         min_pixels=min_pixels, max_pixels=max_pixels)


class SyntheticSource(ImageSource):
    """`count` synthetic figures drawn on demand: entry i is kind SYNTHETIC_KINDS[i % 7], seeded by (seed, i)."""

    kind = "synthetic"

    def __init__(self, count: int, seed: int = 0, size: int = 224, *, min_pixels: int | None = None,
                 max_pixels: int | None = None):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.seed, self.size = seed, size
        keys = [f"synthetic:{_set_kind(i)}:{i}" for i in range(count)]
        super().__init__(keys, where=f"(seed {seed}, {size} px)", min_pixels=min_pixels, max_pixels=max_pixels)

    def _read(self, i: int, validate_only: bool) -> Image.Image:
        image = synthetic_figure(_set_seed(self.seed, i), self.size, kind=_set_kind(i))
        if self.max_pixels is None:
            return image
        return resize_to_bounds(image, self.min_pixels, self.max_pixels, factor=self.factor)

    def is_ok(self, i: int) -> bool:
        return True  # drawing never fails; skip the render


def open_source(spec: str, *, min_pixels: int | None = None, max_pixels: int | None = None,
                synthetic_count: int = 64, synthetic_size: int = 224, seed: int = 0,
                quiet: bool = False) -> ImageSource:
    """A source from `spec`: "" (synthetic figures), a folder, a .jsonl or a .csv listing (`quiet`: no log
    line about ignored files, for a check that opens the source once before the run does)."""
    if not spec:
        return SyntheticSource(synthetic_count, seed, synthetic_size, min_pixels=min_pixels, max_pixels=max_pixels)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image source {spec!r} does not exist (give a folder, a .jsonl or .csv "
                                "listing, or an empty string for synthetic figures)")
    if path.is_dir():
        return FolderSource(path, min_pixels=min_pixels, max_pixels=max_pixels, quiet=quiet)
    if path.suffix.lower() in (".jsonl", ".csv"):
        return ListingSource(path, min_pixels=min_pixels, max_pixels=max_pixels)
    raise ValueError(f"image source {spec!r} is a file but not a .jsonl or .csv listing (give the folder that "
                     f"holds the images, or a listing of their paths)")


def shard_indices(order: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's strided slice of `order`: disjoint across ranks, all of `order` together, sizes within 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    return order[rank::world_size]


def open_images(data_cfg, *, seed: int, quiet: bool = False, factor: int = 28) -> ImageSource:
    """The run's image source from its `[data]` config section; images resized to multiples of `factor` px
    (`model.image_factor` of the checkpoint: 28 for Qwen2.5-VL, 32 for the Qwen3 families)."""
    source = open_source(data_cfg.images, min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels,
                         synthetic_count=data_cfg.synthetic_images, synthetic_size=data_cfg.synthetic_size,
                         seed=seed, quiet=quiet)
    if data_cfg.max_pixels is not None:
        fit_pixels(factor, factor, min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels, factor=factor)
    source.factor = factor
    return source


def step_items(source: ImageSource, *, seed: int, step: int, count: int, rank: int = 0,
               world_size: int = 1) -> list[ImageItem]:
    """The images of training step `step`: positions [step*count, (step+1)*count) of the concatenated
    seeded epoch orders (epoch e covers positions [e*n, (e+1)*n)), this rank's share of them.

    A pure function of (seed, step): a resumed run sees exactly the images an uninterrupted one would.
    Unreadable images are skipped (and counted once by the source), so a step may get fewer. Each item
    carries its `position`, which does not depend on the number of ranks (seed per-prompt sampling with it)."""
    n = len(source)
    positions = range(step * count, (step + 1) * count)
    items = []
    for pos in shard_indices(list(positions), rank, world_size):
        epoch, offset = divmod(pos, n)
        item = source.load(source.epoch_order(epoch, seed)[offset])
        if item is not None:
            items.append(dataclasses.replace(item, position=pos))
    return items


def epoch_picks(rows: Sequence[T], step: int, count: int, *, key: Sequence[int]) -> list[T]:
    """The rows of step `step`: positions [step*count, (step+1)*count) of the concatenated epoch orders, epoch e
    a numpy permutation seeded by (*key[:-1], e, key[-1]) (the recipes' (seed, iteration, epoch, salt)). Like
    `step_items` for rows in memory: a pure function of its arguments, so a resumed run picks what an
    uninterrupted one would."""
    n = len(rows)
    *head, salt = key
    orders: dict[int, np.ndarray] = {}
    out = []
    for pos in range(step * count, (step + 1) * count):
        epoch, offset = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([*head, epoch, salt]).permutation(n)
        out.append(rows[int(orders[epoch][offset])])
    return out


# ---------------------------------------------------------------------------------------------------------
# Synthetic figures

SYNTHETIC_KINDS = ("bar_chart", "line_chart", "pie_chart", "table", "geometry", "shapes", "clock")

COLOURS = {"red": (214, 48, 49), "blue": (40, 110, 205), "green": (46, 160, 67), "orange": (240, 140, 20),
           "purple": (136, 78, 170), "yellow": (235, 200, 30), "grey": (120, 120, 120)}
INK, GRID = (30, 30, 30), (215, 215, 215)
_CATEGORIES = (("Visitors", ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat")),  # (title, labels)
               ("Rainfall (mm)", ("Jan", "Feb", "Mar", "Apr", "May", "Jun")),
               ("Fruit sold", ("apple", "pear", "plum", "kiwi", "fig", "lime")),
               ("Pets in class", ("cats", "dogs", "birds", "fish", "mice", "frogs")))
_TITLES = ("Sales", "Visitors", "Votes", "Tickets sold", "Temperature (C)", "Books read")
_NAMES = ("Ann", "Bob", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana")


def _set_kind(i: int) -> str:
    return SYNTHETIC_KINDS[i % len(SYNTHETIC_KINDS)]


def _set_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


@functools.lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1 with FreeType: a scalable built-in font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill=INK, anchor: str = "mm") -> None:
    """Text placed by a two-letter anchor (l/m/r, t/m/b) computed from its box, so bitmap fonts work too."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - {"l": x0, "m": (x0 + x1) / 2, "r": x1}[anchor[0]]
    y = xy[1] - {"t": y0, "m": (y0 + y1) / 2, "b": y1}[anchor[1]]
    draw.text((x, y), text, fill=fill, font=font)


def _width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    x0, _, x1, _ = draw.textbbox((0, 0), text, font=font)
    return x1 - x0


def _pick(rng: np.random.Generator, seq: Sequence, k: int | None = None):
    if k is None:
        return seq[int(rng.integers(len(seq)))]
    return [seq[int(j)] for j in rng.choice(len(seq), size=k, replace=False)]


def _axes(draw, size: int, font, ymax: int, step: int, title: str, top: float = 0.15) -> tuple[float, ...]:
    """Title, y axis with ticks 0..ymax and light grid lines; returns the plot box (left, top, right, bottom)."""
    left = 0.08 * size + _width(draw, str(ymax), font)
    top, right, bottom = top * size, 0.96 * size, 0.85 * size
    _text(draw, (size / 2, 0.07 * size), title, font)
    for v in range(0, ymax + 1, step):
        y = bottom - (bottom - top) * v / ymax
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.line([(left - 3, y), (left, y)], fill=INK)
        _text(draw, (left - 5, y), str(v), font, anchor="rm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK, width=max(1, size // 150))
    return left, top, right, bottom


def _scale(rng) -> tuple[int, int]:
    step = int(_pick(rng, (1, 2, 5, 10, 20, 50)))
    return step * 5, step


def _bar_chart(draw, rng, size, font):
    n = int(rng.integers(3, 7))
    ymax, step = _scale(rng)
    values = rng.integers(1, ymax + 1, size=n)
    title, labels = _pick(rng, _CATEGORIES)
    left, top, right, bottom = _axes(draw, size, font, ymax, step, title)
    slot = (right - left) / n
    if any(_width(draw, c, font) > 0.95 * slot for c in labels[:n]):
        labels = "ABCDEF"  # letters when the words would collide
    colours = list(COLOURS.values())
    one = _pick(rng, colours[:5])
    per_bar = rng.random() < 0.4
    show_values = rng.random() < 0.5
    for j, (label, v) in enumerate(zip(labels[:n], values.tolist(), strict=True)):
        x0, x1 = left + slot * (j + 0.18), left + slot * (j + 0.82)
        y = bottom - (bottom - top) * v / ymax
        draw.rectangle([x0, y, x1, bottom], fill=colours[j] if per_bar else one, outline=INK)
        _text(draw, ((x0 + x1) / 2, bottom + 4), label, font, anchor="mt")
        if show_values:
            _text(draw, ((x0 + x1) / 2, y - 2), str(v), font, anchor="mb")


def _line_chart(draw, rng, size, font):
    n = int(rng.integers(4, 8))
    ymax, step = _scale(rng)
    n_series = int(rng.integers(1, 3))
    # two series: a legend row between the title and the plot, so no line can run through it
    left, top, right, bottom = _axes(draw, size, font, ymax, step, _pick(rng, _TITLES),
                                     top=0.15 if n_series == 1 else 0.24)
    first = int(rng.integers(2010, 2020))
    xs = [left + (right - left) * (j + 0.5) / n for j in range(n)]
    every = 1
    while _width(draw, str(first), font) > 0.9 * (xs[1] - xs[0]) * every:  # thin out labels that would collide
        every += 1
    for j, x in enumerate(xs):
        draw.line([(x, bottom), (x, bottom + 3)], fill=INK)
        if j % every == 0:
            _text(draw, (x, bottom + 4), str(first + j), font, anchor="mt")
    names = _pick(rng, (("north", "south"), ("east", "west"), ("A", "B"), ("boys", "girls")))
    colours = _pick(rng, list(COLOURS.values())[:5], n_series)
    r, box = max(2, size // 70), max(4, size // 28)
    for s in range(n_series):
        walk = rng.uniform(0.2, 0.8) * ymax + np.cumsum(rng.normal(0, 0.15 * ymax, size=n))   # [n]
        walk = np.clip(np.round(walk), 0, ymax).astype(int)
        pts = [(x, bottom - (bottom - top) * v / ymax) for x, v in zip(xs, walk.tolist(), strict=True)]
        draw.line(pts, fill=colours[s], width=max(2, size // 90))
        for x, y in pts:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colours[s], outline=INK)
        if n_series > 1:
            lx, ly = (0.3 + 0.3 * s) * size, 0.16 * size
            draw.rectangle([lx, ly - box / 2, lx + box, ly + box / 2], fill=colours[s], outline=INK)
            _text(draw, (lx + box + 4, ly), names[s], font, anchor="lm")


def _pie_chart(draw, rng, size, font):
    n = int(rng.integers(3, 6))
    raw = rng.dirichlet(np.full(n, 2.0)) * (100 - 5 * n) + 5  # every slice >= 5 %
    pct = np.floor(raw).astype(int)
    pct[np.argsort(raw - pct)[::-1][: 100 - pct.sum()]] += 1  # largest remainders make it sum to 100
    title, labels = _pick(rng, (("Favourite fruit", _CATEGORIES[2][1]), ("Pets owned", _CATEGORIES[3][1]),
                                ("Budget", ("rent", "food", "travel", "fun", "savings"))))
    labels = _pick(rng, labels, n)
    colours = _pick(rng, list(COLOURS.values()), n)
    _text(draw, (size / 2, 0.07 * size), title, font)
    cx, cy, rad = 0.36 * size, 0.55 * size, 0.3 * size
    angle = -90.0
    for p, c in zip(pct.tolist(), colours, strict=True):
        end = angle + 3.6 * p
        draw.pieslice([cx - rad, cy - rad, cx + rad, cy + rad], angle, end, fill=c, outline="white", width=2)
        if p >= 8:
            mid = math.radians((angle + end) / 2)
            _text(draw, (cx + 0.62 * rad * math.cos(mid), cy + 0.62 * rad * math.sin(mid)), f"{p}%", font,
                  fill="white")
        angle = end
    for j, (label, c) in enumerate(zip(labels, colours, strict=True)):
        y = 0.3 * size + j * 0.11 * size
        draw.rectangle([0.72 * size, y - 5, 0.72 * size + 10, y + 5], fill=c, outline=INK)
        _text(draw, (0.72 * size + 14, y), label, font, anchor="lm")


def _table(draw, rng, size, font):
    rows, cols = int(rng.integers(3, 6)), int(rng.integers(2, 4))
    header = [_pick(rng, ("Name", "Player", "Team"))] + list(_pick(
        rng, (("Q1", "Q2", "Q3"), ("2021", "2022", "2023"), ("Math", "Art", "Music"), ("Mon", "Tue", "Wed")))[:cols])
    body = [[name] + [str(v) for v in rng.integers(0, 100 if rng.random() < 0.5 else 1000, size=cols).tolist()]
            for name in _pick(rng, _NAMES, rows)]
    grid = [header] + body
    x0, y0, x1, y1 = 0.06 * size, 0.08 * size, 0.94 * size, min(0.92 * size, 0.08 * size + (rows + 1) * 0.15 * size)
    cw, rh = (x1 - x0) / (cols + 1), (y1 - y0) / (rows + 1)
    draw.rectangle([x0, y0, x1, y0 + rh], fill=(225, 232, 245))
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            _text(draw, (x0 + cw * (c + 0.5), y0 + rh * (r + 0.5)), cell, font)
    for r in range(rows + 2):
        draw.line([(x0, y0 + r * rh), (x1, y0 + r * rh)], fill=INK, width=2 if r in (0, 1, rows + 1) else 1)
    for c in range(cols + 2):
        draw.line([(x0 + c * cw, y0), (x0 + c * cw, y1)], fill=INK, width=1)


def _geometry(draw, rng, size, font):
    unit = _pick(rng, ("", " cm", " m"))
    names = _pick(rng, ("ABC", "PQR", "XYZ", "DEF"))
    if rng.random() < 0.4:  # right triangles with whole sides
        a, b, c = _pick(rng, ((3, 4, 5), (5, 12, 13), (6, 8, 10), (8, 15, 17), (9, 12, 15)))
    else:
        while True:
            a, b, c = rng.integers(3, 13, size=3).tolist()
            cos = [(b * b + c * c - a * a) / (2 * b * c), (a * a + c * c - b * b) / (2 * a * c),
                   (a * a + b * b - c * c) / (2 * a * b)]
            if max(cos) < 0.94 and min(cos) > -0.94:  # no angle below ~20 or above ~160 degrees
                break
    # sides: a = BC, b = CA, c = AB. A at the origin, B on the x axis, C by the law of cosines.
    cx = (b * b + c * c - a * a) / (2 * c)
    pts = np.array([[0.0, 0.0], [c, 0.0], [cx, math.sqrt(max(b * b - cx * cx, 0.0))]])
    theta = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = pts @ rot.T                                                                   # [3, 2]
    lo, hi = pts.min(0), pts.max(0)
    scale = 0.62 * size / (hi - lo).max()
    pts = (pts - (lo + hi) / 2) * scale + size / 2                                      # [3, 2] pixels
    centre = pts.mean(0)
    draw.polygon([tuple(p) for p in pts.tolist()], outline=INK, fill=(235, 242, 252), width=max(2, size // 100))
    for k, (opp, s1, s2) in enumerate(((a, b, c), (b, a, c), (c, a, b))):
        if s1 * s1 + s2 * s2 == opp * opp:  # right angle at vertex k: a small square in the corner
            u, v = pts[(k + 1) % 3] - pts[k], pts[(k + 2) % 3] - pts[k]
            u, v = u / np.linalg.norm(u) * 0.06 * size, v / np.linalg.norm(v) * 0.06 * size
            draw.line([tuple(p) for p in (pts[k] + u, pts[k] + u + v, pts[k] + v)], fill=INK, width=1)
    for p, name in zip(pts, names, strict=True):
        d = (p - centre) / np.linalg.norm(p - centre)
        draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=INK)
        _text(draw, tuple(p + d * 0.07 * size), name, font)
    for (i, j), length in (((1, 2), a), ((2, 0), b), ((0, 1), c)):
        mid = (pts[i] + pts[j]) / 2
        d = (mid - centre) / np.linalg.norm(mid - centre)
        _text(draw, tuple(mid + d * 0.07 * size), f"{length}{unit}", font, fill=(20, 60, 150))


def _shapes(draw, rng, size, font):
    grid = 4
    cell = size / grid
    n = int(rng.integers(3, 10))
    names = _pick(rng, ["red", "blue", "green", "orange", "purple", "yellow"], int(rng.integers(2, 4)))
    kinds = _pick(rng, ["circle", "square", "triangle"], int(rng.integers(1, 4)))
    for slot in rng.choice(grid * grid, size=n, replace=False).tolist():
        r = cell * rng.uniform(0.25, 0.38)
        x = (slot % grid + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        y = (slot // grid + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        fill, kind = COLOURS[_pick(rng, names)], _pick(rng, kinds)
        if kind == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=INK, width=2)
        elif kind == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill, outline=INK, width=2)
        else:
            draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill, outline=INK, width=2)


def _clock(draw, rng, size, font):
    hour, minute = int(rng.integers(1, 13)), int(rng.integers(0, 12)) * 5
    if rng.random() < 0.3:
        minute = int(rng.integers(0, 60))
    c, rad = size / 2, 0.44 * size
    draw.ellipse([c - rad, c - rad, c + rad, c + rad], fill=_pick(rng, ((250, 250, 245), (235, 245, 255))),
                 outline=INK, width=max(2, size // 60))
    for m in range(60):
        a = math.radians(m * 6 - 90)
        inner = rad * (0.86 if m % 5 == 0 else 0.92)
        draw.line([(c + inner * math.cos(a), c + inner * math.sin(a)),
                   (c + rad * 0.97 * math.cos(a), c + rad * 0.97 * math.sin(a))],
                  fill=INK, width=2 if m % 5 == 0 else 1)
    for h in range(1, 13):
        a = math.radians(h * 30 - 90)
        _text(draw, (c + rad * 0.72 * math.cos(a), c + rad * 0.72 * math.sin(a)), str(h), font)
    for angle, length, width in (((hour % 12 + minute / 60) * 30, 0.5, max(3, size // 45)),
                                 (minute * 6, 0.8, max(2, size // 90))):
        a = math.radians(angle - 90)
        draw.line([(c, c), (c + rad * length * math.cos(a), c + rad * length * math.sin(a))], fill=INK, width=width)
    draw.ellipse([c - 4, c - 4, c + 4, c + 4], fill=COLOURS["red"])


_DRAW = {"bar_chart": _bar_chart, "line_chart": _line_chart, "pie_chart": _pie_chart, "table": _table,
         "geometry": _geometry, "shapes": _shapes, "clock": _clock}


def synthetic_figure(seed: int, size: int = 224, kind: str | None = None) -> Image.Image:
    """An RGB size x size figure of `kind` (SYNTHETIC_KINDS[seed % 7] when None); same seed, same pixels."""
    if size < 28:
        raise ValueError(f"size must be >= 28, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    kind = SYNTHETIC_KINDS[seed % len(SYNTHETIC_KINDS)] if kind is None else kind
    if kind not in _DRAW:
        raise ValueError(f"unknown synthetic kind {kind!r}; kinds: {', '.join(SYNTHETIC_KINDS)}")
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), "white")
    _DRAW[kind](ImageDraw.Draw(image), rng, size, _font(max(8, round(size * 0.05))))
    return image


def write_synthetic_images(dir: str | os.PathLike, *, count: int, seed: int = 0, size: int = 224) -> list[Path]:
    """Write the figures of `SyntheticSource(count, seed, size)` as <dir>/<i>_<kind>.png; returns the paths."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    source = SyntheticSource(count, seed, size)
    paths = []
    for i in range(count):
        path = out / f"{i:05d}_{_set_kind(i)}.png"
        source.load(i).image.save(path)
        paths.append(path)
    return paths
