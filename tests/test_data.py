"""Tests of vzero_fast.data: bad files skipped and counted once, listings, synthetic figures, Qwen pixel
bounds against transformers' smart_resize, epoch order, sharding and exact resume.

Every file is built in a temp folder; the "bomb" is a hand-written PNG header whose pixel data is broken,
so it can only be counted `too_large` (not `truncated`) if it was rejected before decoding.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vzero_fast import data
from vzero_fast.data import (
    REASONS,
    SYNTHETIC_KINDS,
    FolderSource,
    ImageItem,
    SyntheticSource,
    epoch_picks,
    fit_pixels,
    open_source,
    resize_to_bounds,
    shard_indices,
    step_items,
    synthetic_figure,
    write_synthetic_images,
)

F = 28
# (min_pixels, max_pixels): the tiny preset, the default config, Qwen's processor default, a tight range
BOUNDS = [(56 * 56, 112 * 112), (56 * 56, 1024 * F * F), (56 * 56, 1280 * F * F), (F * F, 4 * F * F)]


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(w: int, h: int, bit_depth: int = 1) -> bytes:
    """A PNG whose IHDR claims w x h but whose IDAT holds 100 zero bytes: fine to open, fails to decode."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def _write(path, payload: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    """A folder of good, bad and ignored files; returns (root, {relative name: reason or None if good})."""
    root = tmp_path / "imgs"
    palette = Image.new("P", (20, 12), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    good = {
        "a.jpg": _encode(_noise(40, 30), "JPEG"),
        "b.PNG": _encode(_noise(33, 17), "PNG"),
        "c.webp": _encode(_noise(24, 24), "WEBP"),
        "d.Bmp": _encode(_noise(19, 23), "BMP"),
        "e.JPEG": _encode(_noise(31, 29, seed=1), "JPEG"),
        "png_inside.jpg": _encode(_noise(16, 16, seed=2), "PNG"),
        "sub/deeper/f.jpeg": _encode(_noise(30, 40, seed=3), "JPEG"),
        "sub/grey16.png": _encode(Image.fromarray(np.full((10, 12), 257 * 100, dtype=np.uint16)), "PNG"),
        "sub/palette_transparent.png": _encode(palette, "PNG", transparency=1),
        "sub/la.png": _encode(Image.new("LA", (9, 9), (0, 0)), "PNG"),
        "sub/grey1bit.png": _encode(Image.new("1", (50, 8), 1), "PNG"),
    }
    valid_png = _encode(_noise(64, 64, seed=4), "PNG")
    bad = {
        "corrupt.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt"),
        "truncated.png": (valid_png[: len(valid_png) // 2], "truncated"),
        "zero.png": (b"", "empty"),
        "notes_renamed.png": (b"hello, I am a text file\n" * 20, "not_image"),
        "gif_inside.png": (_encode(_noise(8, 8, "L"), "GIF"), "unsupported_format"),
        "wide.png": (_encode(Image.new("L", (20000, 1), 255), "PNG"), "too_large"),
        "side_16385.png": (_encode(Image.new("L", (16385, 1), 255), "PNG"), "too_large"),
        "sub/bomb.png": (_png_header_only(12000, 12000), "too_large"),  # 144 Mpx > PIL's 89.5 Mpx limit
        "sub/bomb_side.png": (_png_header_only(20000, 50), "too_large"),  # 1 Mpx but a side > 16384
        "thin.png": (_encode(Image.new("L", (300, 1), 0), "PNG"), "bad_aspect"),
    }
    ignored = {"notes.txt": b"text", "anim.gif": _encode(_noise(8, 8, "L"), "GIF"), "README": b"x",
               "sub/scan.tiff": _encode(_noise(8, 8), "TIFF")}
    for name, payload in good.items():
        _write(root / name, payload)
    for name, (payload, _) in bad.items():
        _write(root / name, payload)
    for name, payload in ignored.items():
        _write(root / name, payload)
    expected = {name: None for name in good} | {name: reason for name, (_, reason) in bad.items()}
    return root, expected


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vzero_fast.data" and r.levelno == logging.WARNING]


@pytest.mark.filterwarnings("error")  # no PIL DecompressionBombWarning (or any other) may escape
def test_folder_loads_good_skips_bad_once(mixed_folder, caplog):
    root, expected = mixed_folder
    caplog.set_level(logging.INFO, logger="vzero_fast.data")
    source = open_source(str(root))
    assert isinstance(source, FolderSource)
    names = [str((root / n).absolute()) for n in expected]
    assert sorted(source.keys) == sorted(names)  # recursive, any-case extensions, nothing ignored leaks in
    assert source.stats.ignored_extension == 4

    by_key = {str((root / n).absolute()): reason for n, reason in expected.items()}
    for _ in range(2):  # a second epoch judges nothing again
        for i, key in enumerate(source.keys):
            item = source.load(i)
            if by_key[key] is None:
                assert isinstance(item, ImageItem) and item.index == i and item.key == key
                assert item.image.mode == "RGB"
            else:
                assert item is None, key

    stats = source.stats
    assert stats.loaded == sum(r is None for r in expected.values())
    for reason in REASONS:
        assert getattr(stats, reason) == sum(r == reason for r in expected.values()), reason
    assert stats.skipped == sum(r is not None for r in expected.values())
    assert stats.as_dict()["skipped"] == stats.skipped

    lines = _warnings(caplog)
    assert len(lines) == stats.skipped  # one line per bad file, not one per epoch
    for key, reason in by_key.items():
        if reason is not None:
            assert sum(key in line and reason in line for line in lines) == 1, (key, reason, lines)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert f"{len(expected)} images" in source.describe() and "4 ignored by extension" in source.describe()
    assert "3 too_large" not in source.describe() and "4 too_large" in source.describe()


def test_read_image_reasons_and_pinned_bomb_limit(mixed_folder, monkeypatch):
    root, _ = mixed_folder
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a caller lifting PIL's limit does not lift ours
    for name, reason in [("sub/bomb.png", "too_large"), ("truncated.png", "truncated"), ("nope.jpg", "missing"),
                         ("sub", "not_image")]:
        with pytest.raises(data.BadImageError) as info:
            data.read_image(root / name)
        assert info.value.reason == reason
    assert data.read_image(root / "a.jpg").size == (40, 30)


def test_rgb_conversion_of_odd_modes(mixed_folder):
    root, _ = mixed_folder
    source = open_source(str(root))
    loaded = {k.rsplit("/", 1)[-1]: source.load(i) for i, k in enumerate(source.keys)}
    grey16 = np.asarray(loaded["grey16.png"].image)
    assert grey16.shape == (10, 12, 3) and (grey16 == 100).all()  # 16-bit 25700 -> 8-bit 100, not clipped 255
    assert (np.asarray(loaded["palette_transparent.png"].image) == 255).all()  # transparent -> white
    assert (np.asarray(loaded["la.png"].image) == 255).all()
    assert loaded["png_inside.jpg"].image.size == (16, 16)


def test_load_applies_pixel_bounds_and_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 1200x400, shown 400x1200
    _write(tmp_path / "big.jpg", _encode(_noise(1200, 400), "JPEG", exif=exif))
    _write(tmp_path / "small.png", _encode(_noise(12, 10), "PNG"))
    _write(tmp_path / "mid.webp", _encode(_noise(333, 251), "WEBP"))
    lo, hi = 56 * 56, 112 * 112
    source = open_source(str(tmp_path), min_pixels=lo, max_pixels=hi)
    shown = {"big.jpg": (400, 1200), "small.png": (12, 10), "mid.webp": (333, 251)}
    for i, key in enumerate(source.keys):
        w, h = source.load(i).image.size
        assert (w, h) == fit_pixels(*shown[key.rsplit("/", 1)[-1]], min_pixels=lo, max_pixels=hi)
        assert w % F == 0 and h % F == 0 and lo <= w * h <= hi
    with pytest.raises(ValueError, match="both min_pixels and max_pixels"):
        open_source(str(tmp_path), max_pixels=hi)


# ------------------------------------------------------------------------------------------------------
# Listings and errors


def test_jsonl_listing_relative_absolute_missing_nonimage(tmp_path, monkeypatch, caplog):
    imgs = tmp_path / "lists" / "imgs"
    _write(imgs / "a.png", _encode(_noise(20, 20), "PNG"))
    b = _write(tmp_path / "elsewhere" / "b.jpg", _encode(_noise(20, 20), "JPEG"))
    _write(imgs / "notes.txt", b"not an image")
    listing = tmp_path / "lists" / "set.jsonl"
    lines = [{"image": "imgs/a.png", "caption": "ignored"}, {"path": str(b)}, {"image": "imgs/missing.png"},
             {"image": "imgs/notes.txt"}]
    listing.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n"
                       + "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths follow the listing, not the working folder
    caplog.set_level(logging.WARNING, logger="vzero_fast.data")
    source = open_source(str(listing))
    assert len(source) == 4 and source.kind == "jsonl"
    got = [source.load(i) for i in range(len(source))]
    assert [g is not None for g in got] == [True, True, False, False]
    assert got[0].key == str(imgs / "a.png")
    s = source.stats
    assert (s.loaded, s.missing, s.not_image, s.skipped) == (2, 1, 1, 2)
    assert len(_warnings(caplog)) == 2


def test_csv_listing(tmp_path):
    _write(tmp_path / "x" / "a.bmp", _encode(_noise(20, 20), "BMP"))
    _write(tmp_path / "x" / "b.jpg", _encode(_noise(20, 20), "PNG"))
    (tmp_path / "set.csv").write_text("id, Path ,label\n1,x/a.bmp,cat\n2,x/b.jpg,dog\n3,x/gone.png,\n,,\n")
    source = open_source(str(tmp_path / "set.csv"))
    assert len(source) == 3
    assert [source.load(i) is not None for i in range(3)] == [True, True, False]
    assert source.stats.missing == 1
    assert "csv" in source.describe() and "1 missing" in source.describe()


@pytest.mark.parametrize("name,content,match", [
    ("bad.jsonl", '{"image": "a.png"}\n{"image": "b.png"\n', "line 2 is not valid JSON"),
    ("nokey.jsonl", '{"image": "a.png"}\n{"file": "b.png"}\n', "line 2 is not an object"),
    ("list.jsonl", '["a.png"]\n', "line 1 is not an object"),
    ("empty_path.jsonl", '{"image": ""}\n', "line 1 has no image path"),
    ("bad.csv", "file,label\na.png,cat\n", "no \"image\" or \"path\" column"),
    ("empty.csv", "image\n", "names no images"),
])
def test_listing_errors(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        open_source(str(tmp_path / name))


def test_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    (tmp_path / "d" / "b.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"saw 2 file.*\.jpg.*\.webp"):
        open_source(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="not a .jsonl or .csv"):
        open_source(str(tmp_path / "d" / "a.txt"))
    assert isinstance(open_source("", synthetic_count=5, synthetic_size=56), SyntheticSource)


# ------------------------------------------------------------------------------------------------------
# Synthetic figures


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_synthetic_kind_renders_deterministically(kind):
    assert len(SYNTHETIC_KINDS) >= 6
    for size in (224, 112, 100):
        a = synthetic_figure(11, size, kind=kind)
        assert a.mode == "RGB" and a.size == (size, size)
        pixels = np.asarray(a, dtype=np.float64)
        assert pixels.std() > 20, (kind, size, pixels.std())  # not blank
        assert (pixels.reshape(-1, 3).std(0) > 0).all()
        assert np.array_equal(pixels, np.asarray(synthetic_figure(11, size, kind=kind)))
    differ = [not np.array_equal(np.asarray(synthetic_figure(s, 112, kind=kind)),
                                 np.asarray(synthetic_figure(s + 1, 112, kind=kind))) for s in range(5)]
    assert all(differ)


def test_synthetic_kind_from_seed_and_errors():
    kinds = {SYNTHETIC_KINDS.index(k) for k in SYNTHETIC_KINDS}
    for seed in range(len(SYNTHETIC_KINDS)):
        assert np.array_equal(np.asarray(synthetic_figure(seed, 64)),
                              np.asarray(synthetic_figure(seed, 64, kind=SYNTHETIC_KINDS[seed % len(kinds)])))
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        synthetic_figure(0, kind="radar")
    with pytest.raises(ValueError, match="size"):
        synthetic_figure(0, size=10)


def test_write_synthetic_images_matches_source(tmp_path):
    paths = write_synthetic_images(tmp_path / "figs", count=9, seed=3, size=64)
    source = SyntheticSource(9, seed=3, size=64)
    assert len(paths) == len(source) == 9
    for i, path in enumerate(paths):
        kind = SYNTHETIC_KINDS[i % len(SYNTHETIC_KINDS)]
        assert path.suffix == ".png" and kind in path.name and source.keys[i] == f"synthetic:{kind}:{i}"
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(source.load(i).image))
    assert not np.array_equal(np.asarray(source.load(0).image),
                              np.asarray(SyntheticSource(9, seed=4, size=64).load(0).image))
    bounded = SyntheticSource(3, seed=0, size=100, min_pixels=56 * 56, max_pixels=112 * 112)
    assert bounded.load(0).image.size == (112, 112)  # 100 rounds to 112: 12544 px, exactly the cap


# ------------------------------------------------------------------------------------------------------
# Pixel bounds


def _reference_smart_resize():
    """transformers' Qwen2-VL smart_resize (the PIL module needs no torchvision); None if not importable."""
    for module in ("image_processing_pil_qwen2_vl", "image_processing_qwen2_vl"):
        try:
            mod = __import__(f"transformers.models.qwen2_vl.{module}", fromlist=["smart_resize"])
            return mod.smart_resize
        except ImportError:
            continue
    return None


def _sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Fixed corner cases, then n random sizes: long side log-uniform in [10, 12000], aspect ratio
    log-uniform in [1, 4] (photo-like) for half of them and in [1, 200] for the rest; either orientation."""
    rng = np.random.default_rng(seed)
    long = np.exp(rng.uniform(math.log(10), math.log(12000), size=n))
    aspect = np.exp(rng.uniform(0, 1, size=n) * np.where(np.arange(n) % 2 == 0, math.log(4), math.log(200)))
    short = np.maximum(long / aspect, long / 199.9)
    pairs = [(int(a), max(1, int(b))) for a, b in zip(long, short, strict=True)]
    fixed = [(10, 10), (10000, 300), (300, 10000), (28, 28), (1, 1), (1, 200), (200, 1), (14, 14), (42, 14),
             (2000, 100), (10, 1000), (16384, 16384), (4000, 3000), (56, 56), (57, 57), (6614, 39), (62, 11482)]
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]
    return fixed + [(a, b) for a, b in pairs if max(a, b) <= 200 * min(a, b)]


def _in_bounds(w, h, lo, hi):
    return w % F == 0 and h % F == 0 and w >= F and h >= F and lo <= w * h <= hi


@pytest.mark.parametrize("lo,hi", BOUNDS)
def test_fit_pixels_matches_transformers_smart_resize(lo, hi):
    ref = _reference_smart_resize()
    if ref is None:
        pytest.skip("transformers' Qwen2-VL smart_resize is not importable")
    exact = 0
    sizes = _sizes(400)
    for w, h in sizes:
        rh, rw = ref(h, w, factor=F, min_pixels=lo, max_pixels=hi)
        ours = fit_pixels(w, h, min_pixels=lo, max_pixels=hi)
        assert _in_bounds(*ours, lo, hi), (w, h, ours)
        ref_aspect = max(rw, rh) / min(rw, rh)
        if lo <= rw * rh <= hi and ref_aspect <= 200:
            assert ours == (rw, rh), (w, h)
            exact += 1
        else:
            # smart_resize left the bounds (only when it clamped the short side up to one factor), or rounded
            # the ratio past 200, which the processor refuses when handed the resized image
            assert ref_aspect > 200 or min(rw, rh) == F, (w, h, rw, rh)
            assert ref_aspect > 200 or hi < 1024 * F * F  # the default configs never need the clamp
        # the processor, given ours, resizes nothing
        assert ref(ours[1], ours[0], factor=F, min_pixels=lo, max_pixels=hi) == (ours[1], ours[0])
    assert exact >= 0.5 * len(sizes)


def test_fit_pixels_brute_force_near_best_aspect():
    """Independent of transformers: in bounds, ratio <= 200, and the aspect ratio within one factor per side
    of the best that any in-bounds size of multiples of 28 achieves (found by trying them all)."""
    checked = 0
    for lo, hi in BOUNDS:
        ws = F * np.arange(1, hi // (F * F) + 1)
        W, H = np.meshgrid(ws, ws, indexing="ij")
        ok = (W * H >= lo) & (W * H <= hi) & (np.maximum(W, H) <= 200 * np.minimum(W, H))
        log_ratios = np.unique(np.log(W[ok] / H[ok]))  # every achievable log(w/h), sorted
        for w, h in _sizes(150, seed=1):
            ours_w, ours_h = fit_pixels(w, h, min_pixels=lo, max_pixels=hi)
            assert _in_bounds(ours_w, ours_h, lo, hi) and max(ours_w, ours_h) <= 200 * min(ours_w, ours_h)
            if min(ours_w, ours_h) == F:  # one factor of slack on a 28 px side allows any ratio: not checked
                continue
            target = math.log(w / h)
            j = np.searchsorted(log_ratios, target)
            best = np.abs(log_ratios[max(j - 1, 0):j + 1] - target).min()
            err = abs(math.log(ours_w / ours_h) - target)
            slack = math.log(ours_w / (ours_w - F)) + math.log(ours_h / (ours_h - F))
            assert err <= best + slack + 1e-9, (w, h, lo, hi, (ours_w, ours_h), err, best)
            checked += 1
    assert checked >= 300


def test_fit_pixels_errors_and_resize_to_bounds():
    with pytest.raises(ValueError, match="aspect ratio"):
        fit_pixels(201, 1, min_pixels=56 * 56, max_pixels=112 * 112)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        fit_pixels(10, 10, min_pixels=100, max_pixels=10)
    with pytest.raises(ValueError, match="no size"):
        fit_pixels(10, 10, min_pixels=1000, max_pixels=1500)  # 784 and 1568 straddle the range
    for w, h in [(10, 10), (500, 37), (37, 500), (1000, 1000), (223, 224)]:
        out = resize_to_bounds(_noise(w, h), 56 * 56, 112 * 112)
        assert out.mode == "RGB" and _in_bounds(*out.size, 56 * 56, 112 * 112)
    fits = _noise(56, 84)
    assert resize_to_bounds(fits, 56 * 56, 112 * 112) is fits


# ------------------------------------------------------------------------------------------------------
# Order, sharding, resume


def test_epoch_order_is_seeded_permutation():
    source = SyntheticSource(10, seed=0, size=32)
    a = source.epoch_order(0, seed=1)
    assert sorted(a) == list(range(10)) and all(isinstance(i, int) for i in a)
    assert a == SyntheticSource(10, seed=5, size=32).epoch_order(0, seed=1)  # depends on (seed, epoch) only
    assert a != source.epoch_order(1, seed=1) and a != source.epoch_order(0, seed=2)
    assert len({tuple(source.epoch_order(e, seed=1)) for e in range(6)}) == 6


@pytest.mark.parametrize("n", [10, 9, 1, 0])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_every_item_once(n, world_size):
    order = np.random.default_rng(n).permutation(n).tolist()
    shards = [shard_indices(order, r, world_size) for r in range(world_size)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == sorted(order) and len(flat) == n
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_indices(order, world_size, world_size)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_step_items_cover_good_items_once_per_epoch(mixed_folder, world_size):
    """One epoch of steps over all ranks: every good image once, bad ones never; the positions (what seeds a
    prompt's sampling) do not depend on the number of ranks; a fresh process draws the same items."""
    root, expected = mixed_folder
    good = {str((root / n).absolute()) for n, r in expected.items() if r is None}
    n = len(open_source(str(root)))
    count = world_size * 2
    seen, positions = [], []
    for rank in range(world_size):
        source = open_source(str(root))
        for step in range(-(-n // count)):
            items = [i for i in step_items(source, seed=7, step=step, count=count, rank=rank,
                                           world_size=world_size) if i.position < n]
            again = step_items(open_source(str(root)), seed=7, step=step, count=count, rank=rank,
                               world_size=world_size)
            assert [i.key for i in items] == [i.key for i in again if i.position < n]
            seen += [i.key for i in items]
            positions += [(i.position, i.key) for i in items]
    assert sorted(seen) == sorted(good)  # every good image once over all ranks, bad ones never
    order = open_source(str(root)).epoch_order(0, 7)
    keys = open_source(str(root)).keys
    assert all(keys[order[pos]] == key for pos, key in positions)


@pytest.mark.parametrize("count", [1, 3, 7, 10])
def test_epoch_picks_walk_seeded_permutations(count):
    """Steps in a row walk epoch 0's order, then epoch 1's, ... (each epoch every row once), the order of epoch e
    being numpy's permutation seeded by (seed, iteration, e, salt), independent of the step size."""
    rows = [f"r{i}" for i in range(7)]
    picked = [r for step in range(6) for r in epoch_picks(rows, step, count, key=(3, 2, 11))]
    assert len(picked) == 6 * count
    want = [rows[int(k)] for e in range(-(-6 * count // 7)) for k in np.random.default_rng([3, 2, e, 11]).permutation(7)]
    assert picked == want[:6 * count]
    assert epoch_picks(rows, 4, count, key=(3, 2, 11)) == picked[4 * count:5 * count]  # a pure function
    assert epoch_picks(rows, 0, 7, key=(3, 2, 12)) != epoch_picks(rows, 0, 7, key=(3, 2, 11))  # the salt counts


def test_synthetic_describe_and_stats():
    source = SyntheticSource(4, seed=2, size=56)
    assert source.describe() == "synthetic (seed 2, 56 px): 4 images (read when first used)"
    for i in range(4):
        assert source.load(i).image.size == (56, 56)
    assert source.stats.loaded == 4 and source.stats.skipped == 0
    assert source.describe().startswith("synthetic (seed 2, 56 px): 4 images (4 loaded, 0 skipped")
    assert data.MAX_SIDE == 16384
