"""Wall-clock of the tiny V-Zero recipe on CPU, with the per-stage breakdown from metrics.jsonl.

Runs `vzero-fast train --recipe vzero --preset tiny` in this process (a fresh run directory, the offline tiny
model built there), then sums the `time_<stage>` keys of each iteration's rows per role. What the timers do
not cover (model loads, KL references, the checkpoint written at the end of each stage) is reported as
"untimed": the iteration's wall-clock minus the timed sum.

Run:  python benchmarks/vzero_tiny.py [--iterations 1] [--out DIR] [dotted overrides]
The last line is one JSON object; numbers go to benchmarks/RESULTS.md ("V-Zero tiny iteration (CPU)").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def breakdown(rows: list[dict]) -> dict[int, dict[str, dict[str, float]]]:
    """iteration -> role -> {stage: seconds} (sums of the time_* keys of its rows)."""
    out: dict[int, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    for r in rows:
        for k, v in r.items():
            if k.startswith("time_") and k != "time_total" and v is not None:
                out[r["iteration"]][r["role"]][k.removeprefix("time_")] += v
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args, extra = parser.parse_known_args()
    logging.basicConfig(level=logging.WARNING)

    from vzero_fast.config import parse_overrides, resolve
    from vzero_fast.metrics import read_metrics
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    out = Path(args.out or tempfile.mkdtemp(prefix="vzero-tiny-"))
    cfg = resolve("tiny", None, parse_overrides(["--train.out", str(out), "--train.recipe", "vzero",
                                                 "--train.iterations", str(args.iterations), *extra]))
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    trainer = Trainer(cfg)
    recipe = build_recipe("vzero", trainer)
    setup_s = time.perf_counter() - start  # tiny model build, format warm-up, role loads
    state = trainer.run(recipe)
    wall_s = time.perf_counter() - start
    rows = read_metrics(out)
    per = breakdown(rows)
    warm = json.loads((out / "format_warmup.json").read_text()) if (out / "format_warmup.json").exists() else {}

    print(f"device: {cpu_model()}, {os.cpu_count()} cores, torch threads {cfg.train.cpu_threads or 'default'}; "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"wall-clock {wall_s:.1f} s for {args.iterations} iteration(s), {state['global_step']} GRPO steps; "
          f"set-up (tiny model, format warm-up, roles) {setup_s:.1f} s")
    timed_total = 0.0
    for it, roles in sorted(per.items()):
        for role, stages in roles.items():
            total = sum(stages.values())
            timed_total += total
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
            print(f"iteration {it} {role:<10} {total:6.1f} s: {parts}")
    print(f"untimed (model loads, references, stage-end checkpoints): {wall_s - timed_total:.1f} s")
    print(json.dumps({"bench": "vzero_tiny", "iterations": args.iterations, "wall_s": round(wall_s, 2),
                      "setup_s": round(setup_s, 2), "steps": state["global_step"],
                      "stages": {f"iter{it}/{role}": {k: round(v, 2) for k, v in stages.items()}
                                 for it, roles in per.items() for role, stages in roles.items()},
                      "warmup": {k: warm.get(k) for k in ("steps", "loss_first", "loss_last",
                                                          "questioner_parse_rate", "solver_parse_rate")},
                      "cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_start": round(load0, 2),
                      "run_dir": str(out)}))


if __name__ == "__main__":
    main()
