"""torch.profiler over a range of global steps: `--profile.steps A:B`.

The trainer calls `StepProfiler.advance(global_step)` before the run's first step and after every step; the
profiler starts when the next step is A and stops after step B, then writes

    RUN/profile/trace-steps-A-B.json   (Chrome trace format: open in https://ui.perfetto.dev or chrome://tracing)
    RUN/profile/summary.md             (time per stage, then the top operators / kernels by self time)

and logs the same table.

Decisions:
- The stages are the trainer's own timers (`metrics.StageTimer`: rollout, reward, judge / teacher where a
  recipe has them, logprob, train, weight_sync, checkpoint ...): each timed block is also a
  `torch.profiler.record_function("stage/<name>")` range, and an NVTX range "<name>" on CUDA, so the same
  names appear in this trace, in nsys/ncu timelines, and as the `time_<name>` keys of metrics.jsonl.
- Only rank 0 profiles under torchrun (one trace; the ranks run the same code). Profiling slows what it
  records (per-operator events), so the profiled steps' `time_*` metrics are not representative.
- Activities: CPU always, CUDA when the run's device is a GPU (kernels then rank by self CUDA time).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vzero_fast.config import ProfileConfig, profile_steps

log = logging.getLogger("vzero_fast.profiling")

STAGE_PREFIX = "stage/"
"""Name prefix of the trainer's stage ranges in a trace."""


class StepProfiler:
    """Starts torch.profiler before global step A and stops it after step B (see the module docstring)."""

    def __init__(self, cfg: ProfileConfig, out_dir: Path, device: torch.device, *, enabled: bool = True):
        self.cfg = cfg
        self.range = profile_steps(cfg.steps) if cfg.steps and enabled else None
        self.out_dir = Path(out_dir)
        self.cuda = torch.device(device).type == "cuda"
        self.prof: torch.profiler.profile | None = None
        self.trace: Path | None = None

    def advance(self, global_step: int) -> None:
        """`global_step` steps are done: start before step A, stop after step B."""
        if self.range is None:
            return
        a, b = self.range
        if self.prof is None and global_step + 1 == a:
            self._start()
        elif self.prof is not None and global_step >= b:
            self._stop()

    def close(self) -> None:
        """End of the run (or a stop) inside the range: write what was recorded."""
        if self.prof is not None:
            self._stop()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=self.cfg.record_shapes,
                                           with_stack=self.cfg.with_stack)
        self.prof.__enter__()
        log.info("profiling global steps %d to %d", *self.range)

    def _stop(self) -> None:
        prof, self.prof = self.prof, None
        if self.cuda:
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        a, b = self.range
        self.trace = self.out_dir / f"trace-steps-{a}-{b}.json"
        prof.export_chrome_trace(str(self.trace))
        table = summary_table(prof.key_averages(), cuda=self.cuda, top=self.cfg.top)
        (self.out_dir / "summary.md").write_text(f"# Profile of global steps {a}-{b}\n\n{table}\n")
        log.info("profile of steps %d-%d: %s (open in https://ui.perfetto.dev)\n%s", a, b, self.trace, table)
        self.range = None  # one range per run


def summary_table(events, *, cuda: bool, top: int) -> str:
    """Markdown: total time per stage range, then the `top` operators (kernels on CUDA) by self time."""
    stages = sorted((e for e in events if e.key.startswith(STAGE_PREFIX)), key=lambda e: -e.cpu_time_total)
    lines = ["| stage | calls | wall ms |", "|---|---|---|"]
    lines += [f"| {e.key.removeprefix(STAGE_PREFIX)} | {e.count} | {e.cpu_time_total / 1e3:.1f} |" for e in stages]

    def self_time(e) -> float:  # microseconds
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    ops = sorted((e for e in events if not e.key.startswith(STAGE_PREFIX)), key=lambda e: -self_time(e))[:top]
    where = "CUDA" if cuda else "CPU"
    lines += ["", f"| operator | calls | self {where} ms |", "|---|---|---|"]
    lines += [f"| {e.key} | {e.count} | {self_time(e) / 1e3:.2f} |" for e in ops]
    return "\n".join(lines)


__all__ = ["STAGE_PREFIX", "StepProfiler", "summary_table"]
