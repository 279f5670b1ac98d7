"""V-Zero-OPD on CPU: one tiny step's time breakdown (student rollout, teacher scoring, update) and the teacher's
peak extra memory for its log-probs, the fused lm_head path against naive [tokens, vocab] logits.

Run:  vzero-fast bench opd [--steps 6] [--tokens 2048] [--hidden 256] [--smoke] [--out FILE.json]
      (= python benchmarks/bench_opd.py: the breakdown and memory lines; the last line is one JSON object)

Shapes.
- Step: the tiny preset of `--recipe opd` (vzero_fast/config.py): 4 prompts (synthetic 112x112 region figures)
  x n=4 samples x up to 16 tokens; student = the tiny Qwen2.5-VL (1.7M parameters), teacher = the tiny one with
  another seed and a twice as wide MLP (2.3M), scoring 2 views (full image + crop, 2 images per prompt) of
  every response; fp32, 1 thread, kl 0.01, 2 mini-batches. The first step (warm-up) is not counted; the
  figures are medians over the others. update = time_logprob (old + reference log-probs) + time_train.
- Memory: the teacher's log-probs of `tokens` response tokens at the 7B vocabulary (V = 152064) from hidden
  states [tokens, hidden] (a reduced hidden size: the [tokens, V] term does not depend on it), fp32, no grad.
  Each path runs in its own process; "extra" = peak resident memory during the op (VmHWM, reset just before it
  through /proc/self/clear_refs) minus the resident memory before it, inputs already allocated (Linux only). Naive = log_softmax(h @ W^T)[target] (what a teacher forward through
  transformers' lm_head does); fused = vzero_fast.kernels.fused_linear_logprob (torch path on CPU, chunked
  over the vocabulary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 152064


def step_breakdown(steps: int) -> dict:
    from vzero_fast.config import parse_overrides, resolve
    from vzero_fast.metrics import read_metrics
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve("tiny", None, parse_overrides(["--train.recipe", "opd", "--train.out", tmp,
                                                     "--train.iterations", "1", "--train.max_steps_per_role",
                                                     str(steps)]))
        trainer = Trainer(cfg)
        trainer.run(build_recipe("opd", trainer))
        rows = read_metrics(Path(tmp))[1:]  # the first step warms up
    def med(*keys):
        return statistics.median(sum(r.get(k, 0.0) for k in keys) for r in rows)
    return {"steps_measured": len(rows), "rollout_s": med("time_rollout"), "teacher_s": med("time_teacher"),
            "update_s": med("time_logprob", "time_train"), "total_s": med("time_total"),
            "response_tokens": med("tokens") / max(cfg.student.epochs, 1),
            "samples": cfg.student.prompts_per_step * cfg.student.rollout_n}


def _measure(path: str, tokens: int, hidden: int) -> dict:
    """In a fresh process: peak extra resident memory (MiB) and time of one teacher log-prob pass."""
    from vzero_fast.kernels import fused_linear_logprob

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g) / hidden ** 0.5
    w = torch.randn(VOCAB, hidden, generator=g)
    t = torch.randint(0, VOCAB, (tokens,), generator=g)

    def run(h_, t_):
        with torch.no_grad():
            if path == "naive":
                return torch.log_softmax(h_ @ w.T, dim=-1).gather(1, t_[:, None]).squeeze(1)  # [N, V] built
            return fused_linear_logprob(h_, w, t_)

    run(h[:4], t[:4])  # imports and one-off set-up outside the measurement
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = run(h, t)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    assert torch.isfinite(out).all()
    return {"extra_mib": (peak - before) / 1024, "seconds": seconds, "checksum": float(out.double().sum())}


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory(tokens: int, hidden: int) -> dict:
    out = {}
    for path in ("naive", "fused"):
        proc = subprocess.run([sys.executable, __file__, "--_measure", path, "--tokens", str(tokens),
                               "--hidden", str(hidden)], capture_output=True, text=True, check=True)
        out[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(out["naive"]["checksum"] - out["fused"]["checksum"]) <= 1e-4 * abs(out["naive"]["checksum"])
    out["logits_mib"] = tokens * VOCAB * 4 / 2**20  # one fp32 [tokens, V] tensor
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="2 steps, 256 tokens: checks the script runs")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure:
        print(json.dumps(_measure(args._measure, args.tokens, args.hidden)))
        return
    if args.smoke:
        args.steps, args.tokens = 2, 256
    threads = torch.get_num_threads()
    try:
        step = step_breakdown(args.steps)
    finally:
        torch.set_num_threads(threads)  # the tiny preset runs on 1 thread; leave the caller's setting
    print(f"tiny OPD step ({step['samples']} samples, median of {step['steps_measured']} steps): rollout "
          f"{step['rollout_s']:.3f} s | teacher scoring {step['teacher_s']:.3f} s | update {step['update_s']:.3f} s "
          f"| total {step['total_s']:.3f} s")
    mem = memory(args.tokens, args.hidden)
    print(f"teacher log-probs, {args.tokens} tokens x V={VOCAB}, H={args.hidden}, fp32: naive logits "
          f"+{mem['naive']['extra_mib']:.0f} MiB ({mem['naive']['seconds']:.2f} s), fused "
          f"+{mem['fused']['extra_mib']:.0f} MiB ({mem['fused']['seconds']:.2f} s); one [tokens, V] fp32 tensor = "
          f"{mem['logits_mib']:.0f} MiB")
    result = {"bench": "opd", "step": step, "memory": {"tokens": args.tokens, "hidden": args.hidden, "vocab": VOCAB,
                                                        **mem}}
    if args.out:
        Path(args.out).write_text(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
