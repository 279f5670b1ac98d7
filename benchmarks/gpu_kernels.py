"""GPU benchmark of the kernels at the Qwen2.5-VL-7B head, in one call: build, check, time, report.

    python benchmarks/gpu_kernels.py --out $OUT/gpu_kernels.json          # H100, ~5 min
    python benchmarks/gpu_kernels.py --smoke --out smoke.json            # CPU interpreter, tiny shapes

What it does, in order:
1. Correctness first, at the benchmark shapes (H=3584, V=152064, bf16, N in {4096, 16384}): the Triton
   path's logp, entropy, grad_hidden, grad_weight (random upstream gradients) against an fp32 reference
   of the same bf16 inputs, computed exactly in row chunks (norm-wise relative error). At N <= 4096 the
   naive bf16 path's own error is measured too and ours must be within 2x of it (the tests' rule); at
   larger N (the naive bf16 path with entropy would not fit beside the reference) fixed bounds apply.
2. Timing with triton.testing.do_bench (median, 20% / 80% quantiles) of the Triton path, the naive
   eager path and torch.compile of the naive code, forward (no grad: old/ref log-probs) and
   forward+backward (torch.autograd.grad, nothing accumulates). Effective TFLOP/s counts 2NHV forward
   and 6NHV forward+backward (the Triton backward really does 8NHV: it recomputes the logits), also as
   a share of the bf16 matmul peak measured in the same run (8192^3; 790 if not measured). Extra
   memory = peak allocated - inputs - outputs (the gradients), per call. The compile run is never timed.
3. fused_grpo_loss forward+backward (B = N / 1024 sequences of 1024 tokens) against the naive
   composition, and grpo_loss / vote_count on their own.
4. One table on stdout, the targets verdict, and a last line that is one JSON object; --out receives the
   JSON and a Markdown table beside it (.md).
Targets (issue, H100): log-prob fwd+bwd >= 1.5x eager naive and >= 400 TFLOP/s effective (stretch 600),
extra memory <= 5% of naive.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import triton  # noqa: E402
import triton.testing  # noqa: E402

from vzero_fast.kernels import (  # noqa: E402
    force_backend,
    fused_grpo_loss,
    fused_linear_logprob,
    fused_linear_logprob_reference,
    grpo_loss,
    vote_count,
)

PEAK_TFLOPS = 790.0  # bf16 dense matmul (shared/ENVIRONMENT.md); `run` replaces it by this device's, measured
TARGETS = {"speedup_vs_eager": 1.5, "tflops": 400.0, "tflops_stretch": 600.0, "memory_share": 0.05}


def _commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                              text=True, check=True).stdout.strip() or "uncommitted"
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def timed(fn, device, rep_ms):
    """(median, p20, p80) in ms. CUDA: do_bench; CPU (smoke): a few wall-clock runs."""
    if device == "cuda":
        med, lo, hi = triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms,
                                              quantiles=[0.5, 0.2, 0.8])
        return med, lo, hi
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[1], times[0], times[2]


def extra_memory(fn, device):
    """Peak bytes allocated during one call beyond what existed before and what it returns."""
    if device != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated()
    kept = sum(t.numel() * t.element_size() for t in _tensors(out))
    del out
    return peak - before - kept


def rel_err(a, e):
    a, e = a.detach().double(), e.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------ log-prob

def make_inputs(N, H, V, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = (3.0 / H ** 0.5) ** 0.5  # logits of std ~3
    hidden = (torch.randn(N, H, generator=g) * scale).to(device, torch.bfloat16)
    weight = (torch.randn(V, H, generator=g) * scale).to(device, torch.bfloat16)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    g_logp = torch.randn(N, generator=g).to(device)
    g_ent = torch.randn(N, generator=g).to(device)
    return hidden, weight, targets, g_logp, g_ent


def grads_of(fn, hidden, weight, targets, g_logp, g_ent, entropy=True):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    lp, ent = fn(h, w, targets, return_entropy=True) if entropy else (fn(h, w, targets), None)
    loss = (lp.float() * g_logp).sum() + ((ent.float() * g_ent).sum() if entropy else 0.0)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return {"logp": lp.detach(), "entropy": ent.detach() if entropy else None, "grad_hidden": gh, "grad_weight": gw}


def reference_fp32(hidden, weight, targets, g_logp, g_ent, rows=2048):
    """Exact fp32 (no TF32) reference of the bf16 inputs, row chunk by row chunk."""
    w32 = weight.float().requires_grad_()
    grad_w = torch.zeros_like(w32)
    out = {"logp": [], "entropy": [], "grad_hidden": []}
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for lo in range(0, hidden.shape[0], rows):
            h32 = hidden[lo:lo + rows].float().requires_grad_()
            lp, ent = fused_linear_logprob_reference(h32, w32, targets[lo:lo + rows], return_entropy=True)
            loss = (lp * g_logp[lo:lo + rows]).sum() + (ent * g_ent[lo:lo + rows]).sum()
            gh, gw = torch.autograd.grad(loss, (h32, w32))
            grad_w += gw
            out["logp"].append(lp.detach())
            out["entropy"].append(ent.detach())
            out["grad_hidden"].append(gh)
            del lp, ent, loss, gh, gw
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    res = {k: torch.cat(v) for k, v in out.items()}
    res["grad_weight"] = grad_w
    return res


def check_logprob(N, inputs, naive_limit):
    """Errors of the Triton path (and of naive bf16 when it fits) against the fp32 reference."""
    ref = reference_fp32(*inputs)
    with force_backend("triton"):
        ours = grads_of(fused_linear_logprob, *inputs)
    row = {"op": "fused_linear_logprob", "N": N, "ours": {k: rel_err(ours[k], ref[k]) for k in ref}}
    del ours
    if N <= naive_limit:
        naive = grads_of(fused_linear_logprob_reference, *inputs)
        row["naive_bf16"] = {k: rel_err(naive[k], ref[k]) for k in ref}
        del naive
        row["rule"] = "ours <= 2 x naive bf16 error"
        row["pass"] = all(row["ours"][k] <= 2 * row["naive_bf16"][k] + 1e-12 for k in ref)
    else:
        # bf16 rounding of the outputs alone is 2^-9 = 2e-3 relative; forward outputs are fp32.
        bounds = {"logp": 1e-4, "entropy": 1e-4, "grad_hidden": 1e-2, "grad_weight": 1e-2}
        row["rule"] = f"fixed bounds {bounds}"
        row["pass"] = all(row["ours"][k] <= bounds[k] for k in ref)
    del ref
    return row


def bench_logprob(N, H, V, inputs, args, device, compiled):
    hidden, weight, targets, g_logp, _ = inputs
    impls = {"triton": fused_linear_logprob, "eager": fused_linear_logprob_reference}
    if compiled is not None:
        impls["compile"] = compiled
    h_req, w_req = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    rows = []
    for mode, flops in (("fwd", 2 * N * H * V), ("fwd+bwd", 6 * N * H * V)):
        for name, impl in impls.items():
            backend = "triton" if name == "triton" else "torch"

            def run(impl=impl, backend=backend, mode=mode):
                with force_backend(backend):
                    if mode == "fwd":
                        with torch.no_grad():
                            return impl(hidden, weight, targets)
                    lp = impl(h_req, w_req, targets)
                    return torch.autograd.grad(lp, (h_req, w_req), g_logp.to(lp.dtype))

            row = {"op": "fused_linear_logprob", "N": N, "H": H, "V": V, "dtype": "bf16", "impl": name,
                   "mode": mode}
            try:
                run()  # build / autotune / compile outside the timing
                _sync(device)
                med, lo, hi = timed(run, device, args.rep_ms)
                row.update(ms=med, ms_p20=lo, ms_p80=hi, tflops=flops / (med * 1e-3) / 1e12,
                           extra_bytes=extra_memory(run, device))
                row["peak_share"] = row["tflops"] / PEAK_TFLOPS
            except Exception as exc:  # an OOM or compile failure of one row must not lose the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                traceback.print_exc()
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------- loss and votes

def bench_grpo(N, H, V, inputs, args, device):
    hidden, weight, _, _, _ = inputs
    T = min(1024, N)
    B = N // T
    g = torch.Generator(device="cpu").manual_seed(1)
    h3 = hidden[: B * T].view(B, T, H).detach().requires_grad_()
    w = weight.detach().requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.arange(T)[None, :] < torch.randint(T // 4, T + 1, (B, 1), generator=g)).to(device)
    old = (torch.randn(B, T, generator=g) * 0.1 - 8.0).to(device)
    ref = old + (torch.randn(B, T, generator=g) * 0.1).to(device)
    adv = torch.randn(B, generator=g).to(device)
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.01, clip_c=3.0, return_entropy=True)

    def naive(h, w_, t, m, a, **k):
        ent_wanted = k.pop("return_entropy")
        lp, ent = fused_linear_logprob_reference(h, w_, torch.where(m, t, 0), return_entropy=True)
        loss, metrics = grpo_loss(lp, a, m, **k)  # vectorised torch loss: only the logits are naive
        if ent_wanted:
            metrics["entropy"] = (ent.detach() * m).sum() / m.sum().clamp(min=1)
        return loss, metrics

    rows = []
    for name, fn, backend in (("triton", fused_grpo_loss, "triton"), ("eager", naive, "torch")):
        def run(fn=fn, backend=backend):
            with force_backend(backend):
                loss, _ = fn(h3, w, targets, mask, adv, **kw)
                return torch.autograd.grad(loss, (h3, w))

        row = {"op": "fused_grpo_loss", "N": B * T, "H": H, "V": V, "dtype": "bf16", "impl": name,
               "mode": "fwd+bwd"}
        try:
            run()
            _sync(device)
            med, lo, hi = timed(run, device, args.rep_ms)
            row.update(ms=med, ms_p20=lo, ms_p80=hi, tflops=6 * B * T * H * V / (med * 1e-3) / 1e12,
                       extra_bytes=extra_memory(run, device))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc()
        rows.append(row)
    return rows


def bench_small(args, device):
    g = torch.Generator(device="cpu").manual_seed(2)
    B, T = (512, 4096) if device == "cuda" else (4, 64)
    logp = (torch.randn(B, T, generator=g) * 0.5 - 1).to(device).requires_grad_()
    old = (logp.detach() + 0.2 * torch.randn(B, T, generator=g).to(device))
    adv = torch.randn(B, generator=g).to(device)
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)).to(device)
    G, n = (65536, 16) if device == "cuda" else (64, 16)
    ids = torch.randint(-1, 5, (G, n), generator=g).to(device)
    rows = []
    for backend in ("triton", "torch"):
        def loss_run(backend=backend):
            with force_backend(backend):
                loss, _ = grpo_loss(logp, adv, mask, old_logprobs=old, clip_c=3.0)
                return torch.autograd.grad(loss, logp)

        def vote_run(backend=backend):
            with force_backend(backend):
                return vote_count(ids)

        for op, run, shape in (("grpo_loss", loss_run, f"B={B} T={T}"), ("vote_count", vote_run, f"G={G} n={n}")):
            row = {"op": op, "shape": shape, "impl": backend, "mode": "fwd+bwd" if op == "grpo_loss" else "fwd"}
            try:
                run()
                med, lo, hi = timed(run, device, min(args.rep_ms, 200))
                row.update(ms=med, ms_p20=lo, ms_p80=hi)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- report

def verdict(rows):
    """Targets per N, from the log-prob fwd+bwd rows."""
    out = {}
    by = {(r["N"], r["impl"]): r for r in rows if r.get("op") == "fused_linear_logprob" and r["mode"] == "fwd+bwd"}
    for N in sorted({n for n, _ in by}):
        t, e = by.get((N, "triton"), {}), by.get((N, "eager"), {})
        if "ms" not in t or "ms" not in e:
            out[N] = {"complete": False}
            continue
        v = {"speedup_vs_eager": e["ms"] / t["ms"], "tflops": t["tflops"]}
        if t.get("extra_bytes") is not None and e.get("extra_bytes"):
            v["memory_share"] = t["extra_bytes"] / e["extra_bytes"]
        v["meets"] = {"speedup": v["speedup_vs_eager"] >= TARGETS["speedup_vs_eager"],
                      "tflops": v["tflops"] >= TARGETS["tflops"],
                      "tflops_stretch": v["tflops"] >= TARGETS["tflops_stretch"],
                      "memory": v.get("memory_share", 1.0) <= TARGETS["memory_share"]}
        out[N] = v
    return out


def table(rows):
    head = "| op | shape | impl | mode | median ms (p20-p80) | TFLOP/s eff. | % peak | vs eager | extra mem GiB |"
    lines = [head, "|" + "---|" * 9]
    eager = {(r["op"], r.get("N"), r["mode"]): r.get("ms") for r in rows if r["impl"] == "eager"}
    for r in rows:
        shape = r.get("shape") or f"N={r['N']} H={r['H']} V={r['V']}"
        if "error" in r:
            lines.append(f"| {r['op']} | {shape} | {r['impl']} | {r['mode']} | {r['error']} | | | | |")
            continue
        base = eager.get((r["op"], r.get("N"), r["mode"]))
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        share = f"{100 * r['tflops'] / PEAK_TFLOPS:.0f}" if "tflops" in r else ""
        speed = f"{base / r['ms']:.2f}x" if base else ""
        mem = f"{r['extra_bytes'] / 2**30:.2f}" if r.get("extra_bytes") is not None else ""
        lines.append(f"| {r['op']} | {shape} | {r['impl']} | {r['mode']} | {r['ms']:.2f} "
                     f"({r['ms_p20']:.2f}-{r['ms_p80']:.2f}) | {tf} | {share} | {speed} | {mem} |")
    return "\n".join(lines)


def measure_peak_tflops(device) -> float | None:
    """bf16 dense matmul rate of this device, measured now (8192^3, do_bench median): the ceiling the
    kernels' effective TFLOP/s are compared with."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def run(*, n_list, hidden, vocab, rep_ms=1000, naive_check_limit=4096, compile_baseline=True, smoke=False,
        deadline: float | None = None, on_progress=None) -> dict:
    """Checks and timings (the module docstring's steps 1-3); returns the result dict, with "markdown".
    `deadline` (time.time()): token counts not started by then are skipped (their rows say so).
    `on_progress(partial)` gets {"checks", "rows"} after each token count (a killed run keeps them)."""
    global PEAK_TFLOPS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        n_list, hidden, vocab, compile_baseline = [16, 40], 32, 300, False
    elif device != "cuda":
        raise SystemExit("no CUDA device: run with --smoke to exercise the script on CPU")
    H, V = hidden, vocab
    measured = measure_peak_tflops(device)
    if measured is not None:
        PEAK_TFLOPS = measured
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "commit": _commit(),
            "date": datetime.date.today().isoformat(), "H": H, "V": V, "dtype": "bf16", "n": n_list,
            "peak_tflops_bf16_measured": measured}
    print(json.dumps(info), flush=True)
    compiled = torch.compile(fused_linear_logprob_reference, dynamic=False) if compile_baseline else None

    class _Args:  # what bench_* read
        pass

    args = _Args()
    args.rep_ms = rep_ms
    checks, rows = [], []
    for N in n_list:
        if deadline is not None and time.time() > deadline:
            rows.append({"op": "fused_linear_logprob", "N": N, "H": H, "V": V, "impl": "-", "mode": "-",
                         "error": "skipped: out of time"})
            continue
        inputs = make_inputs(N, H, V, device, seed=N)
        try:
            checks.append(check_logprob(N, inputs, naive_check_limit))
        except Exception as exc:
            checks.append({"op": "fused_linear_logprob", "N": N, "pass": False,
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            traceback.print_exc()
        print("check", json.dumps(checks[-1]), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        rows += bench_logprob(N, H, V, inputs, args, device, compiled)
        if N == n_list[0]:
            rows += bench_grpo(N, H, V, inputs, args, device)
        del inputs
        if on_progress is not None:
            on_progress({"checks": checks, "rows": rows, "markdown": table(rows)})
    rows += bench_small(args, device)
    md = table(rows)
    return {**info, "peak_tflops_used": PEAK_TFLOPS, "checks": checks, "rows": rows, "targets": TARGETS,
            "verdict": verdict(rows), "markdown": md}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path (a .md table is written beside it)")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384], help="token counts")
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--rep-ms", type=int, default=1000, help="do_bench repetition time per row")
    p.add_argument("--naive-check-limit", type=int, default=4096, help="largest N for the naive error check")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU in the Triton interpreter")
    args = p.parse_args()
    result = run(n_list=args.n, hidden=args.hidden, vocab=args.vocab, rep_ms=args.rep_ms,
                 naive_check_limit=args.naive_check_limit, compile_baseline=not args.no_compile, smoke=args.smoke)
    md = result.pop("markdown")
    print(md)
    print("verdict", json.dumps(result["verdict"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"{md}\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
