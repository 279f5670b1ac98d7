"""Rollout tokens/s of the native engine beside `transformers.generate` and (where vLLM imports) the in-process
vLLM engine on the same prompts, and the cost of a vLLM weight sync beside a plain copy of the same bytes, on
the CPU.

Run:  vzero-fast bench rollout [--sizes tiny,100m] [--rounds 3] [--out FILE.json] [--smoke]
      vzero-fast bench sync    [...]        (the vLLM sync vs a plain copy only; needs vLLM)
      (= python benchmarks/bench_rollout.py [--what rollout|sync|all]; --smoke = the tiny size, 1 round)
The last line is one JSON object; numbers go to benchmarks/RESULTS.md ("Rollout: native vs vLLM (CPU)").
Without vLLM (the main environment) the rollout table has the native engine and transformers.generate.

Shapes: 4 prompts (synthetic 112x112 figures, ~60 prompt tokens each) x n=8 samples x 32 new tokens, fixed
length (ignore_eos), temperature 1, fp32, 2 torch threads. Sizes: tiny (vzero_fast/tiny.py, 1.7M parameters)
and 100m (the tiny tokenizer and processor; text hidden 768 x 12 layers, 12 heads / 4 KV heads, MLP 2048;
vision hidden 384 x 8 blocks; 96.9M random parameters).

Decisions:
- One untimed warm-up call per engine, then rounds alternate the engines (native, generate, vLLM, native,
  ...) so that a neighbour's load on the shared cores hits all alike. Median and best are reported: with 2
  OpenMP threads on 2 shared cores, one core taken by a neighbour stalls every parallel region (rounds up to
  100x slower were seen), so the best round is the engine's speed and the median the speed under that run's
  load. tokens/s of an engine is its own `stats.tokens_per_s` (generated tokens / wall seconds of the whole
  `generate`, prompt encoding included); of `transformers.generate`, generated tokens / wall seconds of the
  call on the already-encoded batch (`num_return_sequences=8`: it encodes each image 8 times).
- A sync is `VLLMEngine.sync_weights(policy)`: vLLM's in-place layerwise reload (fused qkv / gate_up and the
  CPU kernel repacking included). Its floor is `dst.copy_(src)` of every tensor of the same `weight_stream`
  into preallocated tensors, timed the same way in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from vzero_fast.config import RolloutConfig
from vzero_fast.data import synthetic_figure
from vzero_fast.model import encode_prompts, load_policy
from vzero_fast.rollout import NativeEngine, Request, SamplingParams
from vzero_fast.tiny import build_tiny, random_state_dict

PROMPTS, N, NEW_TOKENS, IMAGE_SIZE, THREADS = 4, 8, 32, 112, 2

# The 100m size: tiny.py's layout scaled up; head_dim 768 / 12 = 64, so mrope_section sums to 32.
TEXT_100M = dict(hidden_size=768, num_hidden_layers=12, max_window_layers=12, intermediate_size=2048,
                 num_attention_heads=12, num_key_value_heads=4,
                 rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
VISION_100M = dict(depth=8, hidden_size=384, intermediate_size=1024, num_heads=6, out_hidden_size=768,
                   fullatt_block_indexes=[3, 7])


def make_model(size: str, root: Path) -> Path:
    """The model directory of `size` (tiny or 100m) under `root`, random weights from seed 0."""
    out = build_tiny(root / size, seed=0)
    if size == "tiny":
        return out
    if size != "100m":
        raise ValueError(f"unknown size {size!r} (tiny, 100m)")
    config = json.loads((out / "config.json").read_text())
    config.update(TEXT_100M)
    config["vision_config"].update(VISION_100M)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(random_state_dict(config, seed=0), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def requests(images, round_: int) -> list[Request]:
    return [Request.from_image_text(img, "Describe the figure.",
                                    SamplingParams(n=N, temperature=1.0, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                                   seed=1000 * round_ + i))
            for i, img in enumerate(images)]


def tokens_per_s(engine, images, round_: int) -> float:
    outs = engine.generate(requests(images, round_))
    lengths = {len(s.token_ids) for o in outs for s in o.samples}
    assert lengths == {NEW_TOKENS}, f"{engine.name}: response lengths {lengths}, expected {NEW_TOKENS} (ignore_eos)"
    return engine.stats.tokens_per_s


def hf_tokens_per_s(policy, batch, round_: int) -> float:
    """transformers.generate on the same prompts: n samples each via num_return_sequences, fixed length."""
    suppress = list(policy.vision_token_ids) + [policy.eos_token_id]  # fixed length, as ignore_eos
    torch.manual_seed(round_)
    start = time.perf_counter()
    with torch.no_grad():
        ids = policy.model.generate(**batch, do_sample=True, num_return_sequences=N, max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, suppress_tokens=suppress, top_k=0, top_p=1.0,
                                    temperature=1.0)
    seconds = time.perf_counter() - start
    return PROMPTS * N * (ids.shape[1] - batch["input_ids"].shape[1]) / seconds


def timed(fn, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `fn()` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_size(size: str, root: Path, rounds: int, *, rollout: bool, sync: bool, with_vllm: bool) -> dict:
    load0 = os.getloadavg()[0]
    policy = load_policy(make_model(size, root), dtype="float32", device="cpu")
    images = [synthetic_figure(i, size=IMAGE_SIZE) for i in range(PROMPTS)]
    result = {"size": size, "parameters": policy.num_parameters, "rounds": rounds,
              "torch_threads": torch.get_num_threads(), "generated_tokens": PROMPTS * N * NEW_TOKENS}
    vllm = None
    if with_vllm:
        from vzero_fast.rollout_vllm import VLLMEngine

        start = time.perf_counter()
        vllm = VLLMEngine(policy, options=RolloutConfig(cpu_kv_cache_gb=1.0, max_model_len=1024), seed=0)
        result["vllm_build_s"] = round(time.perf_counter() - start, 1)
    med = statistics.median
    if rollout:
        native = NativeEngine(policy)
        batch = encode_prompts(policy, images, ["Describe the figure."] * PROMPTS)
        runs = {"native": lambda r: tokens_per_s(native, images, r), "hf_generate": lambda r: hf_tokens_per_s(policy, batch, r)}
        if vllm is not None:
            runs["vllm"] = lambda r: tokens_per_s(vllm, images, r)
        for run in runs.values():  # warm-up: allocators, vLLM's first-batch set-up
            run(0)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(1, rounds + 1):
            for name, run in runs.items():
                rates[name].append(run(r))
        for stat, pick in (("median", med), ("best", max)):
            result[stat] = {f"{name}_tokens_per_s": pick(v) for name, v in rates.items()}
            for name in runs:
                if name != "native":
                    result[stat][f"{name}_over_native"] = pick(rates[name]) / pick(rates["native"])
        result["rounds_tokens_per_s"] = rates
    if sync:
        from vzero_fast.rollout_vllm import weight_stream

        sync_s = timed(lambda: vllm.sync_weights(policy), rounds)
        sync_bytes = vllm.last_sync["bytes"]
        src = [t for _, t in weight_stream(policy.model, vllm.dtype)]
        dst = [torch.empty_like(t) for t in src]
        copy_bytes = sum(t.numel() * t.element_size() for t in src)
        assert copy_bytes == sync_bytes, (copy_bytes, sync_bytes)

        def plain_copy():
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)

        copy_s = timed(plain_copy, rounds)
        result["sync_bytes"] = sync_bytes
        for stat, pick in (("median", med), ("best", min)):
            result.setdefault(stat, {}).update(
                sync_s=pick(sync_s), sync_gbps=sync_bytes / pick(sync_s) / 1e9, copy_s=pick(copy_s),
                copy_gbps=copy_bytes / pick(copy_s) / 1e9)
        result["rounds_s"] = {"sync": sync_s, "copy": copy_s}
    result["load_avg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return result


def _table(results: list[dict], rollout: bool, sync: bool) -> None:
    engines = [k.removesuffix("_tokens_per_s") for k in results[0]["median"] if k.endswith("_tokens_per_s")]
    cols = [f"{e} tok/s" for e in engines] + [f"{e} / native" for e in engines if e != "native"]
    if sync:
        cols += ["sync s", "sync GB/s", "copy GB/s"]
    print("| size | params | stat | " + " | ".join(cols) + " |")
    print("|---" * (3 + len(cols)) + "|")
    for r in results:
        for stat in ("median", "best"):
            m = r[stat]
            cells = [f"{m[f'{e}_tokens_per_s']:.0f}" for e in engines]
            cells += [f"{m[f'{e}_over_native']:.2f}x" for e in engines if e != "native"]
            if sync:
                cells += [f"{m['sync_s']:.3f}", f"{m['sync_gbps']:.2f}", f"{m['copy_gbps']:.2f}"]
            print(f"| {r['size']} | {r['parameters'] / 1e6:.1f}M | {stat} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=("rollout", "sync", "all"), default="all",
                        help="rollout tokens/s, the vLLM sync, or both (sync and vLLM columns need vLLM)")
    parser.add_argument("--sizes", default="tiny,100m", help="comma-separated: tiny, 100m")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine (and sync repeats)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("--smoke", action="store_true", help="tiny only, 1 round, 2 prompts x 2 x 4 tokens")
    args = parser.parse_args(argv)
    sizes, rounds = (["tiny"], 1) if args.smoke else (args.sizes.split(","), args.rounds)
    if args.smoke:  # the command runs end to end in seconds; the figures mean nothing
        global PROMPTS, N, NEW_TOKENS
        PROMPTS, N, NEW_TOKENS = 2, 2, 4
    from vzero_fast.rollout_vllm import vllm_unavailable

    reason = vllm_unavailable()
    if args.what == "sync" and reason is not None:
        raise SystemExit(f"bench sync needs vLLM: {reason}")
    rollout, sync = args.what in ("rollout", "all"), args.what in ("sync", "all") and reason is None
    if reason is not None:
        print(f"vLLM not measured: {reason}")

    # Before vLLM is built: its CPU worker reads OMP_NUM_THREADS and then disables torch.set_num_threads.
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for size in sizes:
            results.append(bench_size(size, Path(tmp), rounds, rollout=rollout, sync=sync, with_vllm=reason is None))
            gc.collect()  # the engine's memory (weights, 1 GiB KV cache) goes before the next size's

    print(f"prompts={PROMPTS} n={N} new_tokens={NEW_TOKENS} image={IMAGE_SIZE}px fp32 threads={THREADS} "
          f"rounds={rounds}; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    _table(results, rollout, sync)
    summary = {"bench": args.what if args.what != "all" else "rollout+sync", "results": results,
               "load_avg_start": round(load0, 2), "load_avg_end": round(os.getloadavg()[0], 2),
               "cores": os.cpu_count()}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
