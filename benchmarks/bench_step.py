"""One GRPO step of the tiny Qwen2.5-VL on CPU, with its time breakdown, and rollout tokens/s of the native
engine beside plain `transformers.generate` on the same prompts.

Run:  vzero-fast bench step [--steps 3] [--smoke] [--out FILE.json]   (= python benchmarks/bench_step.py: the
      breakdown table; the last line is one JSON object)
      pytest benchmarks/bench_step.py --benchmark-only     (pytest-benchmark timings)

Shapes: 4 prompts (synthetic 112x112 figures, ~60 prompt tokens each) x n=8 samples x 16 new tokens, fixed
length (eos suppressed so every sample runs to the limit), fp32, AdamW, kl 0.01 with a frozen reference,
2 mini-batches (so old log-probs are recomputed). The HF baseline samples the same 4 x 8 sequences with
`num_return_sequences=8` (it encodes each image 8 times).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vzero_fast.config import PolicyConfig
from vzero_fast.data import synthetic_figure
from vzero_fast.grpo import Role
from vzero_fast.metrics import StageTimer, to_host
from vzero_fast.model import encode_prompts, load_policy
from vzero_fast.rollout import NativeEngine, Request, SamplingParams
from vzero_fast.tiny import build_tiny

PROMPTS, N, NEW_TOKENS = 4, 8, 16


def _setup(tmp: Path):
    model_dir = build_tiny(tmp / "tiny", seed=0)
    policy = load_policy(model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    cfg = PolicyConfig(lr=1e-5, max_response_tokens=NEW_TOKENS, mini_batches=2, kl_coef=0.01,
                       micro_batch_tokens=4096)
    engine = NativeEngine(policy)
    role = Role(name="policy", policy=policy, cfg=cfg, engine=engine)
    role.freeze_reference()
    images = [synthetic_figure(i, size=112) for i in range(PROMPTS)]
    return policy, role, images


def _requests(images, step: int):
    return [Request.from_image_text(img, "Describe the figure.",
                                    SamplingParams(n=N, max_new_tokens=NEW_TOKENS, ignore_eos=True, seed=1000 * step + i))
            for i, img in enumerate(images)]


def _reward(outputs):
    return torch.tensor([[float(len(s.text) % 3 == 0) for s in o.samples] for o in outputs])


def grpo_step_breakdown(steps: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        policy, role, images = _setup(Path(tmp))
        timer = StageTimer()
        rows = []
        for step in range(steps + 1):  # step 0 warms up allocators and is not reported
            start = time.perf_counter()
            m = to_host(role.grpo_step(_requests(images, step), _reward, timer=timer))
            m.update(timer.pop())
            m["wall_s"] = time.perf_counter() - start
            if step:
                rows.append(m)
        keys = ["wall_s", "time_rollout", "time_reward", "time_logprob", "time_train", "rollout_tokens_per_s",
                "response_length_mean"]
        return {k: statistics.median(r[k] for r in rows) for k in keys}


def rollout_vs_hf(repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        policy, role, images = _setup(Path(tmp))
        engine = role.engine
        native, hf = [], []
        batch = encode_prompts(policy, images, ["Describe the figure."] * PROMPTS)
        suppress = list(policy.vision_token_ids) + [policy.eos_token_id]  # fixed length, as ignore_eos
        for r in range(repeats + 1):
            start = time.perf_counter()
            outs = engine.generate(_requests(images, r))
            t = time.perf_counter() - start
            tokens = sum(len(s.token_ids) for o in outs for s in o.samples)
            if r:
                native.append(tokens / t)
            start = time.perf_counter()
            with torch.no_grad():
                ids = policy.model.generate(**batch, do_sample=True, num_return_sequences=N,
                                            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                            suppress_tokens=suppress, top_k=0, top_p=1.0, temperature=1.0)
            t = time.perf_counter() - start
            new = ids.shape[1] - batch["input_ids"].shape[1]
            if r:
                hf.append(PROMPTS * N * new / t)
        return {"native_tokens_per_s": statistics.median(native), "hf_generate_tokens_per_s": statistics.median(hf)}


def test_bench_grpo_step(benchmark):
    with tempfile.TemporaryDirectory() as tmp:
        policy, role, images = _setup(Path(tmp))
        counter = iter(range(10**6))
        benchmark.pedantic(lambda: role.grpo_step(_requests(images, next(counter)), _reward, timer=StageTimer()),
                           rounds=3, warmup_rounds=1)


def test_bench_native_rollout(benchmark):
    with tempfile.TemporaryDirectory() as tmp:
        policy, role, images = _setup(Path(tmp))
        counter = iter(range(10**6))
        benchmark.pedantic(lambda: role.engine.generate(_requests(images, next(counter))), rounds=3, warmup_rounds=1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="one GRPO step of the tiny model, and native rollout vs generate")
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rollout rounds per engine")
    parser.add_argument("--smoke", action="store_true", help="1 step, 1 rollout round, 2 prompts x 2 x 4 tokens")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    steps, repeats = (1, 1) if args.smoke else (args.steps, args.repeats)
    if args.smoke:  # the command runs end to end in seconds; the figures mean nothing
        global PROMPTS, N, NEW_TOKENS
        PROMPTS, N, NEW_TOKENS = 2, 2, 4
    torch.manual_seed(0)
    step = grpo_step_breakdown(steps)
    gen = rollout_vs_hf(repeats)
    print(f"threads={torch.get_num_threads()} prompts={PROMPTS} n={N} new_tokens={NEW_TOKENS}")
    print("| stage | median s |\n|---|---|")
    for k in ("time_rollout", "time_reward", "time_logprob", "time_train", "wall_s"):
        print(f"| {k} | {step[k]:.3f} |")
    print(f"native engine {gen['native_tokens_per_s']:.0f} tok/s vs transformers.generate "
          f"{gen['hf_generate_tokens_per_s']:.0f} tok/s")
    line = json.dumps({"bench": "step", "steps": steps, "step": step, "rollout": gen})
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return {"step": step, "rollout": gen}


if __name__ == "__main__":
    main()
