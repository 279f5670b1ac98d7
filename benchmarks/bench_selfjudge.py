"""Where a tiny Self-Judge step spends its time, the Judge's share, and the Judge calls the b = 0 rule saves.

Runs `vzero-fast train --recipe selfjudge --preset tiny` in this process (a fresh run directory; the format
warm-up is made first and reported apart), then averages the `time_<stage>` keys of the steps after the first
(the first pays one-off costs) and sums `judged` / `judge_skipped` over all steps. time_judge is part of
time_reward (the Judge runs inside the reward).

Run:  python benchmarks/bench_selfjudge.py [--steps 8] [--out DIR] [dotted overrides]
The last line is one JSON object; numbers go to benchmarks/RESULTS.md ("Self-Judge tiny step (CPU)").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from vzero_tiny import cpu_model  # benchmarks/ is the script's own folder on sys.path


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary one)")
    args, extra = ap.parse_known_args()
    logging.basicConfig(level=logging.WARNING)
    from vzero_fast.config import parse_overrides, resolve
    from vzero_fast.metrics import read_metrics
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-selfjudge-")) / "run"
    cfg = resolve("tiny", None, parse_overrides([
        "--train.recipe", "selfjudge", "--train.out", str(out), "--train.iterations", "1",
        "--train.max_steps_per_role", str(args.steps), *extra]))
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.run(build_recipe("selfjudge", trainer))
    wall = time.perf_counter() - start
    rows = read_metrics(out)
    steady = rows[1:] or rows
    stages = sorted({k for r in steady for k in r if k.startswith("time_") and k not in ("time_total",
                                                                                        "time_format_warmup")})
    mean = {k: sum(r.get(k, 0.0) for r in steady) / len(steady) for k in stages}
    step = sum(v for k, v in mean.items() if k != "time_judge")  # time_judge is inside time_reward
    judged = sum(r["judged"] for r in rows)
    skipped = sum(r["judge_skipped"] for r in rows)
    a = cfg.actor
    result = {
        "bench": "selfjudge_tiny_step", "date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)), "torch_threads": cfg.train.cpu_threads, "commit": commit(),
        "shapes": {"prompts_per_step": a.prompts_per_step, "rollout_n": a.rollout_n,
                   "max_response_tokens": a.max_response_tokens, "judge_max_tokens": cfg.selfjudge.judge_max_tokens,
                   "image_px": cfg.data.synthetic_size},
        "steps": len(rows), "step_s": round(step, 3), "mean_s": {k[5:]: round(v, 3) for k, v in mean.items()},
        "judge_share": round(mean.get("time_judge", 0.0) / step, 3) if step else None,
        "judged": judged, "skipped": skipped, "saved_share": round(skipped / max(judged + skipped, 1), 4),
        "hard_branch_rate": round(sum(r["hard_branch_rate"] for r in rows) / len(rows), 3),
        "format_warmup_s": round(rows[0].get("time_format_warmup", 0.0), 2), "wall_s": round(wall, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
