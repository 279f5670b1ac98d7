"""Launch one kernel once, after warm-up, at the Qwen2.5-VL-7B head shape: the target of a kernel profiler.

    ncu --set full --profile-from-start off -o logprob python benchmarks/kernel_once.py logprob_fwd_bwd
    python benchmarks/kernel_once.py logprob_fwd --n 16384          # no profiler: the figures only
    python benchmarks/kernel_once.py vote_count --smoke              # CPU: Triton interpreter, tiny shapes

Kernels (NAME): logprob_fwd (fused lm_head log-prob + entropy, forward: old/ref log-probs), logprob_fwd_bwd
(forward and backward, as in training), grpo_loss_fwd_bwd (the GRPO loss over log-probs: clip, KL), vote_count.

What it does: builds the inputs (bf16, H=3584, V=152064, N tokens), runs the kernel `--warmup` times (Triton
compiles and autotunes there), then times `--reps` launches with CUDA events (median), measures this device's
peaks in the same run (bf16 matmul 8192^3; a device-to-device copy of 2 GiB, counting read + write), and
finally launches the kernel ONCE between `torch.cuda.profiler.start()` / `stop()` inside an NVTX range
"vzero_once": `ncu --profile-from-start off` (or nsys with `--capture-range=cudaProfilerApi`) records
exactly that launch. Prints a table and, last, one JSON line with the achieved TFLOP/s and memory bandwidth
against the measured peaks.

Decisions:
- FLOPs are the algorithm's: 2NHV for the log-prob forward, 6NHV forward + backward (the backward kernel
  really does 8NHV: it recomputes the logits). Bytes are the minimum traffic: each input read once, each
  output written once (a kernel that re-reads tiles moves more; ncu's dram__bytes shows what it moved).
- Without CUDA (--smoke) nothing is timed against peaks: the Triton interpreter checks that the launch path
  runs, and the report says "not measured on GPU".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

from vzero_fast.kernels import force_backend, fused_linear_logprob, grpo_loss, vote_count  # noqa: E402

KERNELS = ("logprob_fwd", "logprob_fwd_bwd", "grpo_loss_fwd_bwd", "vote_count")


def build(name: str, n: int, hidden: int, vocab: int, device: torch.device, dtype: torch.dtype):
    """(launch function, FLOPs, minimum bytes) of one launch of kernel `name`."""
    g = torch.Generator(device="cpu").manual_seed(0)
    size = dtype.itemsize
    if name.startswith("logprob"):
        scale = (3.0 / hidden ** 0.5) ** 0.5
        h = (torch.randn(n, hidden, generator=g) * scale).to(device, dtype)
        w = (torch.randn(vocab, hidden, generator=g) * scale).to(device, dtype)
        t = torch.randint(0, vocab, (n,), generator=g).to(device)
        if name == "logprob_fwd":
            def launch():
                with torch.no_grad():
                    fused_linear_logprob(h, w, t, return_entropy=True)
            return launch, 2 * n * hidden * vocab, (n * hidden + vocab * hidden) * size + 2 * n * 4
        h.requires_grad_(True)
        w.requires_grad_(True)
        up = torch.randn(n, generator=g).to(device)

        def launch():
            lp, ent = fused_linear_logprob(h, w, t, return_entropy=True)
            torch.autograd.grad((lp * up).sum() + ent.sum(), (h, w))
        # forward reads h, w; backward reads h, w again and writes grad_h, grad_w
        return launch, 6 * n * hidden * vocab, 4 * (n * hidden + vocab * hidden) * size + 4 * n * 4
    if name == "grpo_loss_fwd_bwd":
        b, length = max(1, n // 1024), min(n, 1024)
        logp = (torch.randn(b, length, generator=g) * 0.5 - 1).to(device)
        old, ref = logp + 0.1, logp - 0.1
        adv = torch.randn(b, generator=g).to(device)
        mask = torch.ones(b, length, dtype=torch.bool, device=device)

        def launch():
            lp = logp.clone().requires_grad_(True)
            loss, _ = grpo_loss(lp, adv, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=0.01)
            loss.backward()
        return launch, 0, 5 * b * length * 4
    if name == "vote_count":
        ids = torch.randint(-1, 5, (n, 10), generator=g).to(device)

        def launch():
            vote_count(ids)
        return launch, 0, n * 10 * 8
    raise ValueError(f"unknown kernel {name!r}: one of {', '.join(KERNELS)}")


def _event_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def peaks(device: torch.device) -> dict[str, float]:
    """This device's bf16 matmul TFLOP/s (8192^3) and copy bandwidth (GB/s, read + write of 2 GiB)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = statistics.median(_event_ms(lambda: a @ a, 10))
    src = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = statistics.median(_event_ms(lambda: dst.copy_(src), 10))
    return {"tflops_bf16": 2 * 8192**3 / ms / 1e9, "copy_gbps": 2 * src.numel() * 2 / copy_ms / 1e6}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kernel", choices=KERNELS)
    p.add_argument("--n", type=int, default=4096, help="tokens (rows of the head)")
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--warmup", type=int, default=3, help="untimed launches first (compile, autotune)")
    p.add_argument("--reps", type=int, default=10, help="timed launches (CUDA events, median)")
    p.add_argument("--smoke", action="store_true", help="CPU (Triton interpreter), N=32 H=64 V=256")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    n, hidden, vocab = (32, 64, 256) if args.smoke else (args.n, args.hidden, args.vocab)
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's bf16 tl.dot is wrong (ENVIRONMENT.md)
    launch, flops, nbytes = build(args.kernel, n, hidden, vocab, device, dtype)
    backend = "triton" if cuda or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    result = {"bench": "kernel_once", "kernel": args.kernel, "shape": {"N": n, "H": hidden, "V": vocab},
              "dtype": str(dtype).removeprefix("torch."), "backend": backend, "device": str(device)}
    with force_backend(backend):
        for _ in range(args.warmup):
            launch()
        if cuda:
            torch.cuda.synchronize()
            ms = statistics.median(_event_ms(launch, args.reps))
            peak = peaks(device)
            result.update(ms=ms, tflops=flops / ms / 1e9 if flops else None, gbps=nbytes / ms / 1e6, peaks=peak,
                          gpu=torch.cuda.get_device_name(device))
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            torch.cuda.nvtx.range_push("vzero_once")
            launch()
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        else:
            start = time.perf_counter()
            launch()
            result.update(cpu_s=time.perf_counter() - start, note="not measured on GPU")
    print("| kernel | shape | dtype | ms | TFLOP/s (of peak) | GB/s (of peak) |\n|---|---|---|---|---|---|")
    if cuda:
        share_f = f" ({100 * result['tflops'] / peak['tflops_bf16']:.0f}%)" if flops else ""
        tf = f"{result['tflops']:.0f}{share_f}" if flops else "-"
        print(f"| {args.kernel} | N={n} H={hidden} V={vocab} | {result['dtype']} | {ms:.3f} | {tf} | "
              f"{result['gbps']:.0f} ({100 * result['gbps'] / peak['copy_gbps']:.0f}%) |")
    else:
        print(f"| {args.kernel} | N={n} H={hidden} V={vocab} | {result['dtype']} | not measured on GPU | - | - |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
