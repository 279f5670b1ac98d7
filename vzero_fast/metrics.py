"""Per-step metrics: one JSON object per line in `metrics.jsonl`, stage timers, progress bars, plots.

Decisions:
- Metrics stay device tensors inside a step; `MetricsWriter.write` converts them with ONE host sync per
  step (a single `torch.stack(...).tolist()`), never per value.
- Time is broken down by stage (rollout, reward, logprob, train, weight_sync, ...) with `StageTimer`;
  on CUDA a stage ends with a synchronize so its time is the device's, not the launch queue's.
- `metrics.jsonl` is appended to and flushed every line, so a killed run keeps every finished step;
  `--resume` truncates it to the steps the checkpoint covers (`truncate_metrics`).
- `vzero-fast plot RUN_DIR` draws one PNG per metric family from `metrics.jsonl`, a stacked time breakdown
  and one overview page (matplotlib comes from the `plot` extra; without it the command says how to install
  it). x is the run's global step; a role's curve is broken where another role trains, and dashed lines mark
  where each iteration starts.
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
        # The same block is a "stage/<name>" range in torch.profiler traces (vzero_fast/profiling.py) and an
        # NVTX range on CUDA (nsys / ncu timelines).
        cuda = self.device is not None and self.device.type == "cuda"
        self._sync()
        start = time.perf_counter()
        if cuda:
            torch.cuda.nvtx.range_push(stage)
        try:
            with torch.profiler.record_function(f"stage/{stage}"):
                yield
        finally:
            if cuda:
                torch.cuda.nvtx.range_pop()
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
    """Device tensors -> Python floats with one host read per device (one sync per step on a GPU: the values
    are stacked where they live, then copied once); other values pass through."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: v for k, v in metrics.items() if k not in keys}
    by_device: dict[torch.device, list[str]] = {}
    for k in keys:
        by_device.setdefault(metrics[k].device, []).append(k)
    for group in by_device.values():
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in group]).tolist()
        out.update(zip(group, values))
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


def progress(iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "",
             disable: bool | None = None):
    """A tqdm bar with total and ETA; `initial` = steps already done (a resumed stage); `disable=None` shows
    it only on a terminal (log files stay free of bar lines, they get one log line per step instead)."""
    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                leave=True)


# ----------------------------------------------------------------------------------------------- plots

# name -> (metric keys, y-axis label). x is the run's global step: the roles take turns, so each role's
# curve has gaps where another role trains (drawn as separate segments, never a line across them).
PLOT_GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "reward": (("reward_mean",), "reward (mean over the step's samples)"),
    "loss": (("loss",), "GRPO loss"),
    "kl": (("kl",), "KL to the stage's reference (per token)"),
    "entropy": (("entropy",), "entropy (nats per token)"),
    "clip": (("clip_frac_low", "clip_frac_high"), "clipped share of tokens"),
    "response_length": (("response_length_mean", "response_length_max"), "response length (tokens)"),
    "throughput": (("rollout_tokens_per_s",), "rollout throughput (generated tokens/s)"),
    "logprob_diff": (("logprob_diff",), "|sampler - trainer| log-prob (nats per token)"),
    # V-Zero's own (recipes/vzero.py): what its rewards and pseudo-labels are made of.
    "vzero_questioner": (("valid_question_rate", "solver_agree_rate", "solver_overturned_rate", "solver_none_rate",
                          "solver_majority_share"), "share of the step's questions / votes"),
    "vzero_solver": (("questions_valid_rate", "kept_rate", "label_share_mean", "solver_letter_rate"),
                     "share of the stage's questions / votes"),
    "vzero_questions": (("questions", "questions_kept"), "questions in the Solver's stage"),
    # Self-Judge's (recipes/selfjudge.py) and the in-training evaluation (train.eval_every, evaluate.py).
    "selfjudge": (("prior_share", "hard_branch_rate", "judge_parse_rate", "judge_score_mean", "format_rate"),
                  "share / mean over the step's responses"),
    "eval": (("eval_accuracy",), "greedy accuracy, built-in benchmark"),
}
OVERVIEW = ("reward", "loss", "kl", "time", "vzero_questioner", "response_length")
BAND_LABEL = "±1 std over samples"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("vzero-fast plot needs matplotlib: pip install 'vzero_fast[plot]'") from e
    return plt


def _segments(rows: list[dict[str, Any]], key: str) -> list[tuple[list[int], list[float], list[float]]]:
    """(x, y, std) runs of consecutive global steps where `key` has a value."""
    out: list[tuple[list[int], list[float], list[float]]] = []
    last = None
    for i, r in enumerate(rows):
        x, y = r.get("global_step", i + 1), r.get(key)
        if y is None:
            last = None
            continue
        if last is None or x != last + 1:
            out.append(([], [], []))
        out[-1][0].append(x)
        out[-1][1].append(y)
        out[-1][2].append(r.get("reward_std") or 0.0)
        last = x
    return out


def _iteration_marks(ax, rows: list[dict[str, Any]]) -> None:
    """Dashed lines where an iteration starts, labelled at the top."""
    firsts: dict[int, int] = {}
    for i, r in enumerate(rows):
        firsts.setdefault(r.get("iteration", 1), r.get("global_step", i + 1))
    for it, x in sorted(firsts.items()):
        ax.axvline(x - 0.5, color="0.6", lw=0.8, ls="--", zorder=0)
        ax.annotate(f"iter {it}", (x - 0.5, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="0.4")


def _draw_group(ax, rows: list[dict[str, Any]], keys: tuple[str, ...], ylabel: str) -> bool:
    roles = list(dict.fromkeys(r.get("role", "policy") for r in rows))  # in order of appearance
    colors = iter(f"C{i}" for i in range(20))
    drew = False
    for role in roles:
        mine = [r for r in rows if r.get("role", "policy") == role]
        for key in keys:
            color, labelled = next(colors), False
            for xs, ys, std in _segments(mine, key):
                label = None if labelled else (f"{role}: {key}" if len(keys) > 1 else role)
                ax.plot(xs, ys, marker=".", ms=4, color=color, label=label)
                if key == "reward_mean":
                    ax.fill_between(xs, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)],
                                    color=color, alpha=0.15, lw=0,
                                    label=None if labelled else f"{role}: {BAND_LABEL}")
                labelled = drew = True
    if drew:
        _finish(ax, rows, ylabel)
    return drew


def _draw_time(ax, rows: list[dict[str, Any]]) -> bool:
    """Stacked bars: each step's seconds by phase (rollout, reward, log-probs, train, checkpoint, ...)."""
    phases = sorted({k for r in rows for k in r if k.startswith("time_") and k != "time_total"},
                    key=lambda k: ("rollout", "reward", "logprob", "train").index(k[5:])
                    if k[5:] in ("rollout", "reward", "logprob", "train") else 9)
    if not phases:
        return False
    xs = [r.get("global_step", i + 1) for i, r in enumerate(rows)]
    bottom = [0.0] * len(rows)
    for i, key in enumerate(phases):
        ys = [r.get(key) or 0.0 for r in rows]
        ax.bar(xs, ys, bottom=bottom, width=0.8, color=f"C{i}", label=key[5:].replace("_", " "))
        bottom = [b + y for b, y in zip(bottom, ys)]
    _finish(ax, rows, "seconds per step (by phase)")
    return True


def _finish(ax, rows: list[dict[str, Any]], ylabel: str) -> None:
    _iteration_marks(ax, rows)
    ax.set_xlim(0.3, rows[-1].get("global_step", len(rows)) + 0.7)  # every panel spans the whole run
    ax.set_xlabel("step (all roles in turn)")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per metric family present in the run, `time.png` (stacked time breakdown) and `overview.png`
    (the main panels on one page). Returns the files written."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise SystemExit(f"no metrics in {run_dir / 'metrics.jsonl'}")
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written, drawn = [], []

    def draw(name: str, ax) -> bool:
        if name == "time":
            ok = _draw_time(ax, rows)
        else:
            keys, ylabel = PLOT_GROUPS[name]
            ok = _draw_group(ax, rows, keys, ylabel)
        ax.set_title(name.replace("_", " "), fontsize=9)
        return ok

    for name in (*PLOT_GROUPS, "time"):
        fig, ax = plt.subplots(figsize=(7.5, 3.5))
        if draw(name, ax):
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
            drawn.append(name)
        plt.close(fig)
    panels = [n for n in OVERVIEW if n in drawn]
    if panels:
        cols = 2
        fig, axes = plt.subplots((len(panels) + 1) // cols, cols, figsize=(14, 3.2 * ((len(panels) + 1) // cols)),
                                 squeeze=False)
        for ax, name in zip(axes.flat, panels):
            draw(name, ax)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: {rows[-1].get('global_step', len(rows))} steps", fontsize=10)
        fig.tight_layout()
        path = out_dir / "overview.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
