"""One render of model-written code to PNG, in a child process: `python -I render_worker.py svg|python`.

The code comes on stdin; PNG bytes go to stdout and the exit status is 0. On a failure one short reason goes
to stderr (`<reason>` or `renderer: <detail>`) and the exit status names it (`EXIT` below; 10-19, clear of
Python's 1, usage 2, the sandbox's 124/137 and signals 128+N). `vzero_fast/render.py` starts this script
once per render inside `vzero-sandbox` and re-checks what comes back; this file is the only place that
touches model-written code.

Decisions:
- Standalone: imports the stdlib and resvg_py (svg mode) or matplotlib (python mode), never vzero_fast or
  torch, so a start costs ~25 ms (python -I + resvg_py) rather than seconds.
- SVG size check BEFORE rendering, from the root tag only, with a regex (no XML parser: one that expands
  entities is the attack it guards against). resvg-py allocates the whole canvas up front: a declared
  100000 x 100000 canvas asks for 40 GB and aborts the process (a Rust allocation failure, not an
  exception). The size is resolved the way resvg (usvg) does: lengths in px / none, pt, pc, mm, cm, in at
  96 dpi, em = 16 px (resvg-py's default font size; 1 ex = 0.5 em), % of the viewBox (of 100 without one);
  a missing side is 100%, or follows the viewBox's aspect when the other side is given; a value resvg
  cannot parse counts as missing. tests/test_render.py checks this resolver against resvg's own output.
  Rejected: a side <= 0 (width, height or viewBox: the SVG spec says a zero viewBox side disables
  rendering and a negative one is an error) -> zero-side; a side > 16384 px -> too-large; long side /
  short side > 100 -> aspect (ALGORITHMS.md section 2, Coder).
- resvg is then told to fit the render into exactly that box (`width=`, `height=`: it keeps the aspect
  and never exceeds the box), so whatever the regex missed (a CSS style sheet setting the root's
  font-size for `em` sides, character references in attributes) cannot make the canvas larger than the
  checked size; for the SVGs the regex reads right, the box equals resvg's own size and changes nothing.
  The PNG's IHDR is checked again after rendering. The sandbox's memory limit is the last line behind both.
- DOCTYPE: a DOCTYPE with an internal subset (`<!DOCTYPE svg [ ... ]>`) and any `<!ENTITY` are rejected
  outright (reason "doctype"): they are the only way to declare entities (billion laughs: 10 entities of
  10 references each expand 3 bytes into 3 GB) and to move the root's attributes out of the regex's
  sight. A plain DOCTYPE (`<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "...dtd">`) is allowed: it
  declares nothing, resvg's XML parser (roxmltree) never fetches an external DTD, and it opens many
  real-world SVGs (matplotlib's and Inkscape's among them), so rejecting it would fail sound renders.
- Fonts: resvg-py's generic families default to fonts most Linux machines lack (text in `font-family=
  "sans-serif"` vanished here); they are mapped to DejaVu (fontconfig's usual default, and installed
  wherever matplotlib's fonts are). 96 dpi is passed explicitly: resvg-py's default dpi=0 turns every
  pt/mm/cm/in side into a zero one ("SVG has an invalid size").
- python mode (`mmzero.code_language = python`, the reference's older matplotlib path): the code runs
  with `exec` in this process, MPLBACKEND=Agg, cwd = the sandbox's fresh directory, its stdout/stderr sent
  to /dev/null (the PNG owns stdout). The image is the newest PNG the code saved in the cwd, else the
  current figure (size checked from figsize x dpi before drawing). SystemExit ends the code normally.

Test: pytest -q tests/test_render.py (the worker is exercised through vzero_fast.render.RenderPool).
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import sys

MAX_SIDE = 16384
MAX_ASPECT = 100.0
EXIT = {"blank": 10, "not-svg": 11, "doctype": 12, "zero-side": 13, "aspect": 14, "too-large": 15,
        "empty-png": 16, "renderer": 17}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# resvg (usvg) at 96 dpi: px per unit. em follows resvg-py's default font_size=16.
_UNIT_PX = {"": 1.0, "px": 1.0, "pt": 96 / 72, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0,
            "em": 16.0, "ex": 8.0}
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_LENGTH = re.compile(rf"({_NUMBER})(px|pt|pc|mm|cm|in|em|ex|%)?")
# Prolog items that may precede the root: XML declaration / processing instructions, comments, a DOCTYPE
# without an internal subset (one with "[" is rejected before this runs), whitespace.
_PROLOG = re.compile(r"(?:\s+|<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^\[>]*>)*", re.S | re.I)
_ROOT = re.compile(r"<((?:[\w.-]+:)?svg)((?:\s+[\w:.-]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*)\s*/?>", re.S)
_ATTR = re.compile(r"([\w:.-]+)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")
_CHARREF = re.compile(r"&(?:#(\d+)|#x([0-9a-fA-F]+)|(amp|lt|gt|quot|apos));")
_XML_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
_FONTS = dict(font_family="DejaVu Sans", sans_serif_family="DejaVu Sans", serif_family="DejaVu Serif",
              monospace_family="DejaVu Sans Mono")


class RenderError(Exception):
    """A failed render: `reason` is a key of EXIT; `detail` is shown after "renderer: "."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _unescape(value: str) -> str:
    def one(m: re.Match) -> str:
        if m.group(3):
            return _XML_ENTITIES[m.group(3)]
        code = int(m.group(1)) if m.group(1) else int(m.group(2), 16)
        return chr(code) if 0 < code < 0x110000 else ""
    return _CHARREF.sub(one, value)


def _length(value: str | None) -> tuple[float, str] | None:
    """(number, unit) of an SVG length, or None where resvg would not parse it (then it counts as missing)."""
    if value is None:
        return None
    m = _LENGTH.fullmatch(value.lstrip(" \t\r\n"))  # resvg skips leading, not trailing, whitespace
    if not m:
        return None
    number = float(m.group(1))
    return (number, m.group(2) or "") if math.isfinite(number) else None


def _viewbox(value: str | None) -> tuple[float, float] | None:
    """(width, height) of a viewBox of four numbers, or None when absent or malformed."""
    if value is None:
        return None
    parts = [p for p in re.split(r"[\s,]+", value.strip()) if p]
    if len(parts) != 4 or not all(re.fullmatch(_NUMBER, p) for p in parts):
        return None
    w, h = float(parts[2]), float(parts[3])
    return (w, h) if math.isfinite(w) and math.isfinite(h) else None


def check_size(width: float, height: float) -> None:
    """The ALGORITHMS.md size rules on a size in px (raises RenderError)."""
    if not (width > 0 and height > 0):
        raise RenderError("zero-side")
    if max(width, height) > MAX_SIDE:
        raise RenderError("too-large")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise RenderError("aspect")


def svg_size(svg: str) -> tuple[int, int]:
    """The pixel size resvg will give `svg`, read from its root tag without an XML parser; checked."""
    if re.search(r"<!ENTITY", svg, re.I) or re.search(r"<!DOCTYPE[^>]*\[", svg, re.I):
        raise RenderError("doctype")
    prolog = _PROLOG.match(svg)
    root = _ROOT.match(svg, prolog.end() if prolog else 0)
    if root is None:
        raise RenderError("renderer", "no <svg> root element")
    attrs = {}
    for m in _ATTR.finditer(root.group(2)):
        attrs.setdefault(m.group(1), _unescape(m.group(2) if m.group(2) is not None else m.group(3)))
    box = _viewbox(attrs.get("viewBox"))
    if box is not None and not (box[0] > 0 and box[1] > 0):
        raise RenderError("zero-side")
    ref_w, ref_h = box if box is not None else (100.0, 100.0)
    sides = []
    for name, ref in (("width", ref_w), ("height", ref_h)):
        length = _length(attrs.get(name))
        if length is None:
            sides.append(None)
        else:
            number, unit = length
            sides.append(ref * number / 100 if unit == "%" else number * _UNIT_PX[unit])
    w, h = sides
    if box is not None:
        if w is None and h is None:
            w, h = box
        elif h is None:
            h = w * box[1] / box[0] if w > 0 else w
        elif w is None:
            w = h * box[0] / box[1] if h > 0 else h
    w = ref_w if w is None else w
    h = ref_h if h is None else h
    check_size(w, h)  # on the float size first: a huge value must not reach round()
    size = max(1, math.floor(w + 0.5)), max(1, math.floor(h + 0.5))  # Rust's round(): half away from 0
    check_size(*size)
    return size


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, without decoding; RenderError("empty-png") if not a PNG."""
    if len(png) < 24 or png[:8] != PNG_SIGNATURE or png[12:16] != b"IHDR":
        raise RenderError("empty-png")
    return struct.unpack(">II", png[16:24])


def render_svg(code: str) -> bytes:
    if not code.strip():
        raise RenderError("blank")
    if not code.lstrip().startswith("<"):
        raise RenderError("not-svg")
    width, height = svg_size(code.lstrip())
    import resvg_py  # after the checks: a rejected SVG never loads the renderer

    try:
        png = resvg_py.svg_to_bytes(svg_string=code, width=width, height=height, dpi=96.0, **_FONTS)
    except (ValueError, RuntimeError) as e:
        raise RenderError("renderer", str(e)) from e
    check_size(*png_size(png))
    return png


def _run_user_code(code: str) -> None:
    """exec the model's code with its own stdout/stderr sent to /dev/null; fd 1 is restored after."""
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        exec(compile(code, "<model code>", "exec"), {"__name__": "__main__"})
    except SystemExit:
        pass
    except BaseException as e:  # noqa: BLE001 -- any failure of the model's code is a render failure
        raise RenderError("renderer", f"{type(e).__name__}: {e}") from e
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def render_python(code: str) -> bytes:
    if not code.strip():
        raise RenderError("blank")
    os.environ["MPLBACKEND"] = "Agg"
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.getcwd(), ".matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _run_user_code(code)
    # The cwd is fresh (the sandbox's, or a new temporary one unconfined): every PNG in it is the code's.
    saved = [e for e in os.scandir(".") if e.is_file() and e.name.lower().endswith(".png")]
    if saved:
        newest = max(saved, key=lambda e: e.stat().st_mtime_ns)
        with open(newest.path, "rb") as f:
            head = f.read(24)
            check_size(*png_size(head))  # before reading the rest
            return head + f.read()
    if not plt.get_fignums():
        raise RenderError("empty-png", "no figure drawn and no PNG saved")
    fig = plt.gcf()
    check_size(fig.get_figwidth() * fig.dpi, fig.get_figheight() * fig.dpi)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    except Exception as e:  # noqa: BLE001 -- a figure the code left broken
        raise RenderError("renderer", f"{type(e).__name__}: {e}") from e
    png = buf.getvalue()
    check_size(*png_size(png))
    return png


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ("svg", "python"):
        sys.stderr.write("usage: render_worker.py svg|python  (code on stdin, PNG on stdout)\n")
        return 2
    code = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    try:
        png = render_svg(code) if argv[0] == "svg" else render_python(code)
    except RenderError as e:
        line = f"renderer: {e.detail}" if e.reason == "renderer" else e.reason
        sys.stderr.write(line.replace("\n", " ")[:300] + "\n")
        return EXIT[e.reason]
    sys.stdout.buffer.write(png)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
