"""LoRA vs full fine-tuning: peak memory of a V-Zero step, the 3B/7B arithmetic, adapter vs full weight sync.

1. Peak memory (CPU): one V-Zero run of one step per role (`vzero-fast train --recipe vzero --preset tiny
   --iterations 1 --max-steps-per-role 1`, no format warm-up) on the tiny model and on a ~100M-parameter random
   Qwen2.5-VL (benchmarks/bench_rollout.py's 100m shapes), full fine-tuning vs model.lora.rank R. Each run is a
   child of a fresh wrapper process, whose RUSAGE_CHILDREN max RSS is that run's peak resident memory; the peak
   of a child that only imports torch/transformers/vzero_fast and builds the model class is the floor both
   modes share ("imports"), reported beside it. On a random model no Questioner sample parses, so the Questioner
   step trains on zero advantages (a full backward and AdamW step all the same: the memory is the same) and the
   Solver stage has no question to train on; the rows say which steps trained.
2. Arithmetic for Qwen2.5-VL-3B and -7B on one 80 GB GPU: parameter counts from the real shapes (a meta-device
   model: exact, no weights), adapter sizes from `lora.target_names` on that model, bytes per parameter as this
   trainer holds them (optim.py: bf16 weight 2 + fp32 master 4 + fp32 gradient 4 + AdamW moments 8 = 18 B for
   full fine-tuning; fp32 adapter 4 + gradient 4 + moments 8 = 16 B; a frozen bf16 base or reference 2 B; a
   frozen fp32 reference adapter 4 B). Model state only: activations and the KV cache come on top.
3. Weight sync (`--sync`, needs vllm: the vLLM environment): vLLM engine on the 100m model, a full in-place sync
   of all weights vs a LoRA adapter sync (adapter file + LoRARequest), median of 5 after one untimed.

Run:  python benchmarks/bench_lora.py [--sizes tiny,100m] [--rank 16] [--gradient-checkpointing] [--smoke]
                                      [--out FILE.json]
      .venv-vllm/bin/python benchmarks/bench_lora.py --sync
The last line is one JSON object; numbers go to benchmarks/RESULTS.md ("LoRA roles").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 1024**3
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")
IMPORTS = ("import torch, transformers, vzero_fast.trainer, vzero_fast.recipes.vzero; "
           "from vzero_fast.model import model_class; model_class('qwen2_5_vl')")


def peak_rss(cmd: list[str], env: dict) -> int:
    """Peak resident bytes of `cmd`, run as the only child of a fresh wrapper process."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return int(proc.stdout.strip().splitlines()[-1])


def vzero_step_memory(model_dir: Path, rank: int, out: Path, env: dict, smoke: bool, checkpointing: bool) -> dict:
    from vzero_fast.metrics import read_metrics

    cmd = [sys.executable, "-m", "vzero_fast", "train", "--recipe", "vzero", "--preset", "tiny", "--model",
           str(model_dir), "--vzero.format_warmup_steps", "0", "--iterations", "1", "--max-steps-per-role", "1",
           "--out", str(out), "--overwrite", "--model.lora.rank", str(rank)]
    if checkpointing:
        cmd += ["--model.gradient_checkpointing", "true"]
    if smoke:
        cmd += ["--questioner.max_response_tokens", "8", "--vzero.reward_max_tokens", "8",
                "--solver.max_response_tokens", "8", "--data.synthetic_images", "8"]
    start = time.perf_counter()
    peak = peak_rss(cmd, env)
    rows = read_metrics(out)
    return {"peak_bytes": peak, "seconds": round(time.perf_counter() - start, 1),
            "trained": [f"{r['role']} (groups kept {r.get('groups_kept', 0):g})" for r in rows]}


def arithmetic(rank: int) -> dict:
    """Exact parameter counts of Qwen2.5-VL-3B/7B (meta device) and the memory of V-Zero's model state."""
    import torch
    from gpu_suite import _QWEN_3B, _QWEN_7B, _shaped_config  # the real shapes, kept once in the GPU suite
    from transformers import Qwen2_5_VLConfig

    from vzero_fast import lora
    from vzero_fast.model import model_class

    out = {}
    for name, shapes in (("3B", _QWEN_3B), ("7B", _QWEN_7B)):
        with torch.device("meta"):
            model = model_class("qwen2_5_vl")(Qwen2_5_VLConfig(**_shaped_config(shapes)))
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        per_rank = {}
        for vision in (False, True):
            targets = lora.target_names(model, vision=vision)
            per_rank[vision] = sum(model.get_submodule(t).in_features + model.get_submodule(t).out_features
                                   for t in targets)
        adapter = rank * per_rank[False]
        # Full fine-tuning, both roles resident: 18 B/parameter each (bf16 weight, fp32 master, fp32 gradient,
        # AdamW m and v) + two bf16 KL references (iteration 2: one per role). On one GPU this trainer keeps the
        # idle role's master and AdamW state (16 B/parameter) in host memory: GPU = 18 + 2 + 2 x 2 B/parameter.
        full = 2 * 18 * n + 2 * 2 * n
        full_gpu = (18 + 2 + 2 * 2) * n
        # LoRA: one bf16 base + per role an fp32 adapter with gradient and AdamW (16 B) + a frozen fp32 adapter
        # copy as its reference (4 B).
        lora_total = 2 * n + 2 * (16 + 4) * adapter
        out[name] = {"parameters": n, "adapter_parameters": adapter, "adapter_parameters_with_vision":
                     rank * per_rank[True], "full_gb": full / 1e9, "full_gpu_gb": full_gpu / 1e9,
                     "lora_gb": lora_total / 1e9,
                     "base_bf16_gb": 2 * n / 1e9, "adapter_state_gb_per_role": 16 * adapter / 1e9,
                     "adapter_sync_mb": 4 * adapter / 1e6, "full_sync_gb": 2 * n / 1e9}
    return out


def sync_times(model_dir: Path, rank: int, repeats: int) -> dict:
    import dataclasses

    import torch

    from vzero_fast import lora
    from vzero_fast.model import load_policy
    from vzero_fast.rollout_vllm import VLLMEngine, vllm_unavailable

    if vllm_unavailable() is not None:
        raise SystemExit(f"--sync needs vllm: {vllm_unavailable()}")
    base = load_policy(model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    for p in base.model.parameters():
        p.requires_grad_(False)
    view = dataclasses.replace(base, model=lora.attach(base.model, rank=rank, alpha=2.0 * rank))
    result = {}
    for what, policy in (("full", base), ("lora", view)):
        engine = VLLMEngine(policy, seed=0)
        engine.sync_weights(policy)  # untimed
        times = []
        for _ in range(repeats):
            with torch.no_grad():
                for p in policy.model.parameters():
                    if p.requires_grad or what == "full":
                        p.add_(0.0)
            engine.sync_weights(policy)
            times.append(engine.last_sync["seconds"])
        result[what] = {"median_s": statistics.median(times), "bytes": engine.last_sync["bytes"]}
        del engine
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,100m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="short responses, 8 images (checks the script only)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="model.gradient_checkpointing true in every run (activations out of the peak)")
    parser.add_argument("--sync", action="store_true", help="vLLM weight sync, full vs adapter (vLLM environment)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    from bench_rollout import make_model

    root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    result: dict = {"rank": args.rank, "cpu": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}
    if args.sync:
        result["sync"] = sync_times(make_model("100m" if not args.smoke else "tiny", root), args.rank,
                                    2 if args.smoke else 5)
        for what, r in result["sync"].items():
            print(f"vLLM sync {what}: {r['bytes'] / 1e6:.2f} MB in {r['median_s'] * 1e3:.1f} ms (median)")
    else:
        floor = peak_rss([sys.executable, "-c", IMPORTS], env)
        result["imports_peak_bytes"] = floor
        print(f"imports (torch, transformers, vzero_fast): {floor / GIB:.2f} GiB peak")
        result["memory"] = {}
        for size in args.sizes.split(","):
            model = make_model(size, root)
            for rank in (0, args.rank):
                r = vzero_step_memory(model, rank, root / f"run-{size}-{rank}", env, args.smoke,
                                      args.gradient_checkpointing)
                key = f"{size}/{'full' if rank == 0 else f'lora-r{rank}'}" + ("/gc" if args.gradient_checkpointing else "")
                result["memory"][key] = r
                print(f"{key:16s} peak {r['peak_bytes'] / GIB:.3f} GiB (above imports {(r['peak_bytes'] - floor) / GIB:.3f})"
                      f", {r['seconds']} s; trained: {', '.join(r['trained'])}")
        result["arithmetic"] = arithmetic(args.rank)
        for name, a in result["arithmetic"].items():
            print(f"Qwen2.5-VL-{name}: {a['parameters'] / 1e9:.2f}B parameters; V-Zero model state full "
                  f"{a['full_gb']:.0f} GB ({a['full_gpu_gb']:.0f} GB on the GPU with the idle role's state on the "
                  f"host) vs LoRA r{args.rank} {a['lora_gb']:.1f} GB (base {a['base_bf16_gb']:.1f} GB + "
                  f"2 x {a['adapter_state_gb_per_role']:.2f} GB); sync {a['full_sync_gb']:.1f} GB vs "
                  f"{a['adapter_sync_mb']:.0f} MB")
    result["loadavg_end"] = os.getloadavg()[0]
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
