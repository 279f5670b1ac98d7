"""Experiment tracking beside metrics.jsonl: TensorBoard and Weights & Biases (`train.report_to`).

`train.report_to` is a comma-separated subset of jsonl, tensorboard, wandb; metrics.jsonl is always written
(it is what resume and `vzero-fast plot` read). Every step row goes to each tracker as scalars named
`<role>/<metric>` at x = the global step, and the resolved config goes with the run.

Decisions:
- TensorBoard: `torch.utils.tensorboard.SummaryWriter` into RUN/tensorboard (`tensorboard --logdir RUN`);
  the config is a text entry (its TOML).
- W&B: `wandb.init(mode=offline)` unless WANDB_MODE is set (a cluster node often has no network; `wandb sync
  RUN/wandb/offline-run-*` uploads later), files under RUN/wandb, project from WANDB_PROJECT (default
  vzero_fast), run name = the run directory's name, and one run id per run directory (RUN/wandb_id), so a
  resumed run appends to the same W&B run.
- Only numbers are sent (strings, lists and None stay in metrics.jsonl). A resumed run re-sends the steps
  after its checkpoint with the same values (resume is exact).
- Both are optional extras (`pip install -e ".[track]"`); `unavailable(names)` says what is missing in one
  line, and the CLI refuses the run before any work (exit 2).
- Rank 0 only.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("vzero_fast.tracking")

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""Tracker -> the package it needs."""


def trackers(report_to: str) -> list[str]:
    """The trackers named by `train.report_to` (jsonl included or not, it is always written)."""
    return [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "jsonl"]


def unavailable(report_to: str) -> str | None:
    """One line naming the trackers whose package does not import, with the install command; None if all do."""
    missing = [t for t in trackers(report_to) if importlib.util.find_spec(PACKAGES[t]) is None]
    if not missing:
        return None
    return (f"train.report_to {','.join(missing)} needs the package(s) {', '.join(PACKAGES[t] for t in missing)}: "
            f"pip install {' '.join(PACKAGES[t] for t in missing)} (or pip install -e \".[track]\")")


class Tracking:
    """The run's trackers; `log(row)` after each metrics row, `close()` at the end."""

    def __init__(self, report_to: str, run_dir: Path, config: dict[str, Any], config_toml: str,
                 *, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.tb = None
        self.wandb_run = None
        names = trackers(report_to) if enabled else []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            self.tb.add_text("config", "```toml\n" + config_toml + "\n```", global_step=0)
        if "wandb" in names:
            import wandb

            id_file = self.run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            os.environ.setdefault("WANDB_SILENT", "true")  # wandb's own console summary would bury the step log
            self.wandb_run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(self.run_dir),
                                        project=os.environ.get("WANDB_PROJECT", "vzero_fast"), name=self.run_dir.name,
                                        id=run_id, resume="allow", config=config)

            log.info("W&B run %s (%s) in %s%s", run_id, self.wandb_run.settings.mode, self.run_dir / "wandb",
                     "; upload later with: wandb sync " + str(self.run_dir / "wandb" / "offline-run-*")
                     if self.wandb_run.settings.mode == "offline" else "")

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["global_step"])
        role = row.get("role", "run")
        scalars = {f"{role}/{k}": float(v) for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   and k not in ("global_step",)}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, global_step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


__all__ = ["PACKAGES", "Tracking", "trackers", "unavailable"]
