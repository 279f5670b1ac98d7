"""Render model-written SVG (or matplotlib Python) to PNG in confined child processes, a few at a time.

`RenderPool(workers, language=...)` is a thread pool; each thread runs one child per render,
`python -I vzero_fast/render_worker.py svg|python` inside `vzero-sandbox` (vzero_fast/sandbox.py: fresh empty
workdir, clean environment, no network, memory and time limits, capped stdout). The threads only wait on
their child, which releases the GIL, so the trainer's generation in the main thread overlaps rendering.
`submit(code) -> Future[RenderResult]`, `map(codes) -> list[RenderResult]`, `stats()`, `close()`.

Decisions:
- Model-written code never runs in the trainer's process nor unconfined (ALGORITHMS.md section 2): resvg-py
  aborts the whole process on a huge canvas (a Rust allocation failure), and python mode runs arbitrary
  code. One child per render (~25 ms to start python -I + resvg_py; a chart renders in ~10 ms): no
  long-lived renderer whose state one bad input could poison, and a crash costs one render, never the pool.
- The failure rules of the reference (ALGORITHMS.md section 2, Coder): blank code and code not starting
  with `<` fail here, in the parent, and start no child; the child checks the declared size before
  rendering (zero side, aspect > 100, side > 16384 px; see render_worker.py) and reports the renderer's
  error or an empty PNG; the sandbox enforces the 30 s timeout and the memory limit. The parent then
  re-reads the PNG's size from its IHDR header (no decoding) against the same rules and has PIL verify
  the file, so a child that lies (python mode runs the model's code in it) cannot pass garbage.
- `error` is one short reason: blank, not-svg, doctype, zero-side, aspect, too-large, empty-png, timeout,
  memory, output-limit, "limit: <name>" (the sandbox's other limits), "crashed: signal N", "renderer:
  <detail>"; `stats()["failures"]` counts them by the part before ":". The sandbox reports a SIGABRT or
  SIGSEGV under its address-space limit as "memory" (inferred: resvg's allocation failure is an abort).
- memory_mib defaults to 2048: the largest canvas the rules allow (16384 x 16384 RGBA) is 1 GiB of pixels.
- Exit 125-127 from the sandbox (it could not set up, or could not start the worker) raises from the
  future instead: no model output causes it, and scoring every render as failed would train on garbage.
- `confined=False` runs the very same worker as a plain subprocess in a fresh temporary directory, for
  the benchmark baseline only (benchmarks/bench_render.py). It has no memory limit, no network or
  filesystem confinement: never use it on model output.

Test: pytest -q tests/test_render.py;  benchmark: python benchmarks/bench_render.py
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vzero_fast.render_worker import EXIT, RenderError, check_size, png_size

log = logging.getLogger("vzero_fast.render")

WORKER = Path(__file__).with_name("render_worker.py")
LANGUAGES = ("svg", "python")
# stdout cap: a flat-colour chart at the largest allowed canvas compresses to a few MiB; beyond this is noise.
MAX_PNG_BYTES = 64 << 20
# vzero-sandbox's statuses for "could not set up" / "cannot execute" / "not found" (vzero_fast/sandbox.py).
SANDBOX_BROKEN = (125, 126, 127)
_REASON_BY_EXIT = {code: reason for reason, code in EXIT.items()}
# The CPU-seconds limit is the wall timeout + 1 s (sandbox.run_confined): a busy loop meets either first.
_REASON_BY_LIMIT = {"timeout": "timeout", "cpu": "timeout", "memory": "memory", "output": "output-limit"}
_logged: set[tuple[str, bool]] = set()
_logged_lock = threading.Lock()


@dataclass(frozen=True)
class RenderResult:
    """The outcome of one render."""

    ok: bool
    """True when `png` holds a checked PNG."""
    png: bytes | None
    """The PNG file's bytes when ok, else None."""
    width: int
    """Pixel width from the PNG's header (0 when not ok)."""
    height: int
    """Pixel height from the PNG's header (0 when not ok)."""
    error: str
    """"" when ok, else a short reason (module docstring)."""
    seconds: float
    """Wall time of the render, child start included (0 when no child started)."""


def _failed(error: str, seconds: float = 0.0) -> RenderResult:
    return RenderResult(False, None, 0, 0, error, seconds)


def _limit_reason(limit: str) -> str:
    """The sandbox's limit name (its --report-fd line, which the child cannot forge) as a failure reason."""
    return _REASON_BY_LIMIT.get(limit, f"limit: {limit[:40]}")


def classify(returncode: int, stdout: bytes, stderr: bytes, limit: str | None, seconds: float) -> RenderResult:
    """A child's outcome as a RenderResult; on exit 0, the PNG is re-checked (IHDR size rules, PIL verify)."""
    text = stderr.decode("utf-8", errors="replace").strip()
    last = text.splitlines()[-1].strip() if text else ""
    if limit:
        return _failed(_limit_reason(limit), seconds)
    if returncode == 124:
        return _failed("timeout", seconds)
    if returncode == 0:
        try:
            width, height = png_size(stdout)
            check_size(width, height)
        except RenderError as e:
            return _failed(e.reason, seconds)
        try:
            from PIL.PngImagePlugin import PngImageFile

            # PngImageFile, not Image.open: the latter refuses > 179 M pixels as a "decompression bomb", but
            # 16384 x 16384 (268 M) is within the rules, and verify() reads chunks and CRCs, never pixels.
            with PngImageFile(io.BytesIO(stdout)) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 -- whatever PIL dislikes is not an image
            return _failed(f"renderer: invalid PNG ({type(e).__name__})", seconds)
        return RenderResult(True, stdout, width, height, "", seconds)
    if "memory allocation of" in text or "MemoryError" in last:
        return _failed("memory", seconds)  # Rust's abort message / Python's, under the memory limit
    reason = _REASON_BY_EXIT.get(returncode)
    if reason == "renderer":
        detail = last.removeprefix("renderer:").strip()
        return _failed(f"renderer: {detail[:200] or 'failed'}", seconds)
    if reason is not None:
        return _failed(reason, seconds)
    if returncode == -1 and last.startswith("renderer: "):  # the parent could not start the child
        return _failed(last[:200], seconds)
    if returncode < 0 or returncode > 128:
        signum = -returncode if returncode < 0 else returncode - 128
        return _failed(f"crashed: signal {signum}", seconds)
    return _failed(f"renderer: exit {returncode}: {last[:160]}", seconds)


class RenderPool:
    """Confined renders of SVG (or Python) code to PNG on `workers` threads, one child process per render."""

    def __init__(self, workers: int = 2, *, language: str = "svg", timeout: float = 30.0, memory_mib: int = 2048,
                 confined: bool = True):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if memory_mib < 64:
            raise ValueError(f"memory_mib must be >= 64, got {memory_mib}")
        self.workers, self.language, self.timeout = workers, language, float(timeout)
        self.memory_mib, self.confined = memory_mib, confined
        self._argv = [sys.executable, "-I", str(WORKER), language]
        self._env = {"MPLBACKEND": "Agg"} if language == "python" else {}
        if confined:
            from vzero_fast import sandbox  # raises where the sandbox is missing: never fall back silently

            self._run_confined = sandbox.run_confined
            how = f"confined by {sandbox.sandbox_binary()}"
        else:
            how = "UNCONFINED plain subprocess (benchmark baseline only)"
        with _logged_lock:
            if (language, confined) not in _logged:
                _logged.add((language, confined))
                renderer = "resvg_py" if language == "svg" else "matplotlib (Agg)"
                log.info("render: %s via %s in %s, %d workers, %.0f s timeout, %d MiB", language, renderer,
                         how, workers, self.timeout, memory_mib)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="render")
        self._lock = threading.Lock()
        self._renders = self._ok = self._active = self._max_active = 0
        self._seconds = 0.0
        self._failures: dict[str, int] = {}

    def submit(self, code: str) -> Future[RenderResult]:
        """Start rendering `code`; blank code and (svg) code not starting with `<` fail here, no child."""
        if not code.strip():
            early = "blank"
        elif self.language == "svg" and not code.lstrip().startswith("<"):
            early = "not-svg"
        else:
            return self._executor.submit(self._render, code)
        future: Future[RenderResult] = Future()
        future.set_result(self._count(_failed(early)))
        return future

    def map(self, codes) -> list[RenderResult]:
        """Render all `codes` (in parallel on the pool's threads); results in input order."""
        return [f.result() for f in [self.submit(c) for c in codes]]

    def stats(self) -> dict:
        """renders, ok, failures by reason, seconds (sum of render wall times), max_concurrent children."""
        with self._lock:
            return {"renders": self._renders, "ok": self._ok, "failures": dict(self._failures),
                    "seconds": self._seconds, "max_concurrent": self._max_active}

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> RenderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, result: RenderResult) -> RenderResult:
        with self._lock:
            self._renders += 1
            self._seconds += result.seconds
            if result.ok:
                self._ok += 1
            else:
                key = result.error.split(":", 1)[0]
                self._failures[key] = self._failures.get(key, 0) + 1
        return result

    def _render(self, code: str) -> RenderResult:
        start = time.perf_counter()
        with self._lock:
            self._active += 1
            self._max_active = max(self._max_active, self._active)
        try:
            returncode, out, err, limit = self._child(code.encode("utf-8"))
        except Exception as e:  # noqa: BLE001 -- a render that could not even run is one failed render
            returncode, out, err, limit = -1, b"", f"renderer: {type(e).__name__}: {e}".encode(), None
        finally:
            with self._lock:
                self._active -= 1
        if self.confined and limit is None and returncode in SANDBOX_BROKEN:
            # The sandbox could not set up or could not start the worker: nothing the model wrote can do
            # that, and scoring every render as failed would train on garbage. Loud, not a failed render.
            raise RuntimeError(f"vzero-sandbox could not run the render worker (exit {returncode}): "
                               f"{err.decode('utf-8', errors='replace').strip()[-300:]}")
        return self._count(classify(returncode, out, err, limit, time.perf_counter() - start))

    def _child(self, stdin: bytes) -> tuple[int, bytes, bytes, str | None]:
        if self.confined:
            r = self._run_confined(self._argv, stdin=stdin, timeout=self.timeout, memory_mib=self.memory_mib,
                                   output_limit=MAX_PNG_BYTES, env=self._env)
            return r.returncode, r.stdout, r.stderr, r.limit
        with tempfile.TemporaryDirectory(prefix="vzero-render-") as cwd:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd, **self._env}
            proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True)
            try:
                out, err = proc.communicate(stdin, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return 124, b"", b"", None
            return proc.returncode, out, err, None
