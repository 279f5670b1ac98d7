"""What confinement costs a render: SVG -> PNG through the sandbox vs the same worker unconfined vs in-process.

One fixed set of chart-like SVGs (`charts()`: bar charts, line charts, titles, axis labels and tick text;
seed 0, 480-800 px wide), rendered by
- sandbox:    RenderPool(confined=True), the trainer's path (one `vzero-sandbox` + `python -I
              render_worker.py` child per render);
- unconfined: RenderPool(confined=False), the same worker as a plain subprocess (what the sandbox adds);
- in-process: `render_worker.render_svg` called in this process, on threads (what a child process costs;
              never do this with model output: a bad SVG aborts the process),
each with 1 and 2 workers. One untimed warm-up pass per mode, then `--repeats` timed passes, the modes
taking turns pass by pass (the cores may be shared: a load change then falls on every mode). Reported:
renders/s (renders / wall seconds of the timed passes) and per-render latency (median, 20th and 80th
percentile of each render's own wall time, child start included).

Run:  python benchmarks/bench_render.py [--n 50] [--repeats 3] [--workers 1,2] [--smoke]
The last line is one JSON object; the table goes to docs/_draft_render.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ for vzero_tiny when imported by path
from vzero_tiny import cpu_model  # noqa: E402

from vzero_fast.render import RenderPool  # noqa: E402
from vzero_fast.render_worker import render_svg  # noqa: E402

PALETTE = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377")


def _bars(rng: random.Random, w: int, h: int) -> str:
    k = rng.randint(3, 8)
    values = [rng.randint(5, 95) for _ in range(k)]
    left, bottom, top = 60, h - 50, 50
    step = (w - left - 20) / k
    parts = [f'<line x1="{left}" y1="{bottom}" x2="{w - 20}" y2="{bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{top}" stroke="black"/>']
    for t in range(0, 101, 25):
        y = bottom - (bottom - top) * t / 100
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{t}</text>')
    for i, v in enumerate(values):
        bh = (bottom - top) * v / 100
        x = left + i * step + step * 0.15
        parts.append(f'<rect x="{x:.1f}" y="{bottom - bh:.1f}" width="{step * 0.7:.1f}" height="{bh:.1f}" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/>')
        parts.append(f'<text x="{x + step * 0.35:.1f}" y="{bottom - bh - 4:.1f}" font-size="11" '
                     f'text-anchor="middle">{v}</text>')
        parts.append(f'<text x="{x + step * 0.35:.1f}" y="{bottom + 16}" font-size="12" '
                     f'text-anchor="middle">Item {chr(65 + i)}</text>')
    return "".join(parts)


def _lines(rng: random.Random, w: int, h: int) -> str:
    left, bottom, top, n = 60, h - 50, 50, rng.randint(5, 12)
    parts = [f'<path d="M{left} {top} V{bottom} H{w - 20}" fill="none" stroke="black"/>']
    for s in range(rng.randint(1, 3)):
        ys = [rng.uniform(0, 100) for _ in range(n)]
        pts = [(left + (w - left - 30) * i / (n - 1), bottom - (bottom - top) * y / 100) for i, y in enumerate(ys)]
        parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}" fill="none" '
                     f'stroke="{PALETTE[s]}" stroke-width="2"/>')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{PALETTE[s]}"/>' for x, y in pts)
        parts.append(f'<text x="{w - 120}" y="{top + 16 * s}" font-size="12" fill="{PALETTE[s]}">Series {s + 1}</text>')
    parts.extend(f'<text x="{left + (w - left - 30) * i / (n - 1):.1f}" y="{bottom + 16}" font-size="11" '
                 f'text-anchor="middle">{2010 + i}</text>' for i in range(n))
    return "".join(parts)


def charts(n: int = 50, seed: int = 0) -> list[str]:
    """n chart-like SVGs (bar and line charts with a title, axes and labels), the same for a given seed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w, h = rng.choice((480, 640, 800)), rng.choice((360, 480, 600))
        body = _bars(rng, w, h) if i % 2 == 0 else _lines(rng, w, h)
        title = f"{'Sales by item' if i % 2 == 0 else 'Trend over years'} #{i}"
        out.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
                   f'<rect width="{w}" height="{h}" fill="white"/>'
                   f'<text x="{w / 2}" y="28" font-family="sans-serif" font-size="18" text-anchor="middle">'
                   f'{title}</text>{body}</svg>')
    return out


def _in_process(svg: str) -> float:
    start = time.perf_counter()
    render_svg(svg)
    return time.perf_counter() - start


class _Mode:
    """One way of rendering at one worker count; `run(svgs)` renders the set once: (wall s, latencies, ok)."""

    def __init__(self, mode: str, workers: int):
        self.mode, self.workers = mode, workers
        self.pool = (ThreadPoolExecutor(workers) if mode == "in-process"
                     else RenderPool(workers, confined=mode == "sandbox"))

    def run(self, svgs: list[str]) -> tuple[float, list[float], int]:
        start = time.perf_counter()
        if self.mode == "in-process":
            lat = list(self.pool.map(_in_process, svgs))
            ok = len(lat)
        else:
            results = self.pool.map(svgs)
            lat, ok = [r.seconds for r in results], sum(r.ok for r in results)
        return time.perf_counter() - start, lat, ok

    def close(self) -> None:
        (self.pool.shutdown if self.mode == "in-process" else self.pool.close)()


def measure(modes: list[str], workers: int, svgs: list[str], repeats: int) -> list[dict]:
    """renders/s and per-render latency of each mode at one worker count. The modes take turns pass by
    pass (after one untimed warm-up pass each), so that a change in the load of shared cores falls on all."""
    runners = [_Mode(m, workers) for m in modes]
    walls, lats, oks = [0.0] * len(modes), [[] for _ in modes], [0] * len(modes)
    try:
        for r in runners:
            r.run(svgs)
        for _ in range(repeats):
            for i, r in enumerate(runners):
                wall, lat, ok = r.run(svgs)
                walls[i] += wall
                lats[i] += lat
                oks[i] += ok
    finally:
        for r in runners:
            r.close()
    rows = []
    for mode, wall, lat, ok in zip(modes, walls, lats, oks):
        q = statistics.quantiles(lat, n=5) if len(lat) > 1 else [lat[0]] * 4
        rows.append({"mode": mode, "workers": workers, "renders": len(lat), "ok": ok, "wall_s": round(wall, 3),
                     "renders_per_s": round(len(lat) / wall, 1),
                     "latency_ms_median": round(1e3 * statistics.median(lat), 1),
                     "latency_ms_p20": round(1e3 * q[0], 1), "latency_ms_p80": round(1e3 * q[3], 1)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="number of SVGs in the set")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the set per mode")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--smoke", action="store_true", help="6 SVGs, 1 pass: checks the script runs")
    args = ap.parse_args(argv)
    n, repeats = (6, 1) if args.smoke else (args.n, args.repeats)
    svgs = charts(n)
    try:
        from vzero_fast.sandbox import sandbox_binary

        sandbox = str(sandbox_binary())
    except Exception as e:  # noqa: BLE001 -- reported, and the other modes still run
        sandbox = None
        print(f"sandbox unavailable, its rows are skipped: {type(e).__name__}: {e}", file=sys.stderr)
    modes = [m for m in ("sandbox", "unconfined", "in-process") if m != "sandbox" or sandbox is not None]
    rows, load_before = [], os.getloadavg()[0]
    for workers in (int(w) for w in args.workers.split(",")):
        for r in measure(modes, workers, svgs, repeats):
            rows.append(r)
            print(f"{r['mode']:>11} x{workers}: {r['renders_per_s']:7.1f} renders/s, latency median "
                  f"{r['latency_ms_median']:.1f} ms (p20 {r['latency_ms_p20']:.1f}, p80 {r['latency_ms_p80']:.1f}),"
                  f" {r['ok']}/{r['renders']} ok", file=sys.stderr)
    import resvg_py

    result = {"bench": "render_svg", "date": time.strftime("%Y-%m-%d", time.gmtime()), "cpu": cpu_model(),
              "cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
              "resvg_py": resvg_py.__version__, "sandbox": sandbox, "svgs": n, "repeats": repeats,
              "svg_bytes_mean": round(sum(map(len, svgs)) / n),
              "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
