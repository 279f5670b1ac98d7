"""Per-step metrics: one JSON object per line in `metrics.jsonl`, stage timers, progress bars, plots.

Decisions:
- Metrics stay device tensors inside a step; `MetricsWriter.write` converts them with ONE host sync per
  step (a single `torch.stack(...).tolist()`), never per value.
- Time is broken down by stage (rollout, reward, logprob, train, weight_sync, ...) with `StageTimer`;
  on CUDA a stage ends with a synchronize so its time is the device's, not the launch queue's.
- `metrics.jsonl` is appended to and flushed every line, so a killed run keeps every finished step;
  `--resume` truncates it to the steps the checkpoint covers (`truncate_metrics`).
- `vzero-fast plot RUN_DIR` draws one PNG per metric family from `metrics.jsonl` (matplotlib comes
  from the `plot` extra; without it the command says how to install it).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


class StageTimer:
    """Accumulates wall seconds per named stage: `with timer("rollout"): ...`."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pop(self) -> dict[str, float]:
        """The breakdown so far as `time_<stage>` keys, and reset."""
        out = {f"time_{k}": v for k, v in self.seconds.items()}
        out["time_total"] = sum(self.seconds.values())
        self.seconds = defaultdict(float)
        return out


def to_host(metrics: dict[str, Any]) -> dict[str, Any]:
    """Device tensors -> Python floats with one host sync; other values pass through."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: v for k, v in metrics.items() if k not in keys}
    if keys:
        values = torch.stack([metrics[k].detach().float().reshape(()).cpu() for k in keys]).tolist()
        out.update(zip(keys, values))
    return out


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write them as null so every line stays valid JSON for other tools.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON object per step to `metrics.jsonl` (path None: rows are only returned, as on the
    ranks other than 0 of a torchrun launch)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)

    def write(self, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {k: _clean(v) for k, v in to_host(metrics).items()}
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, keep: int) -> None:
    """Keep the first `keep` lines (the steps a checkpoint covers) so a resumed run repeats nothing."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(line + "\n" for line in lines[:keep]))


def progress(iterable=None, *, total: int | None = None, desc: str = "", disable: bool | None = None):
    """A tqdm bar; `disable=None` shows it only on a terminal (log files stay free of bar lines)."""
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=True)


# ----------------------------------------------------------------------------------------------- plots

PLOT_GROUPS = {
    "reward": ("reward_mean",),
    "loss": ("loss",),
    "kl": ("kl",),
    "entropy": ("entropy",),
    "clip": ("clip_frac_low", "clip_frac_high"),
    "response_length": ("response_length_mean", "response_length_max"),
    "throughput": ("rollout_tokens_per_s",),
    "logprob_diff": ("logprob_diff",),
}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per metric family, one line per role, x = the role's global step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("vzero-fast plot needs matplotlib: pip install 'vzero_fast[plot]'") from e
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise SystemExit(f"no metrics in {run_dir / 'metrics.jsonl'}")
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    roles = sorted({r.get("role", "policy") for r in rows})
    written = []
    for name, keys in PLOT_GROUPS.items():
        if not any(k in r and r[k] is not None for r in rows for k in keys):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for role in roles:
            mine = [r for r in rows if r.get("role", "policy") == role]
            for key in keys:
                pts = [(r.get("global_step", i), r[key]) for i, r in enumerate(mine) if r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker=".", label=f"{role} {key}" if len(keys) > 1 else role)
                    if key == "reward_mean" and any(r.get("reward_std") is not None for r in mine):
                        std = [r.get("reward_std") or 0.0 for r in mine if r.get(key) is not None]
                        ax.fill_between(xs, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)],
                                        alpha=0.15)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
