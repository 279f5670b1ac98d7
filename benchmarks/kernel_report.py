"""What every Triton kernel compiles to on an H100/H200 (sm_90), found on a CPU: no GPU, no launch.

    python benchmarks/kernel_report.py --out DIR          # DIR/kernel_report.json + .md; ~1-2 min on 2 cores

For each kernel and each autotune config it launches with (the configs of kernels/*.py; the arguments
mirror the launchers at the Qwen2.5-VL-7B head: N=4096 tokens, H=3584, V=152064, bf16), the script runs
Triton's own argument specialization (alignment, stride 1 -> constant), compiles for
GPUTarget("cuda", 90, 32) and reads back:
- registers per thread and spill bytes (stores + loads) from `ptxas -v` on the generated PTX, with the
  ptxas Triton uses for sm_90 (its bundled ptxas-blackwell);
- shared memory per program (Triton's metadata);
- pipeline stages of the main loop: the number of shared-memory buffers its tl.dot operands rotate through,
  read from the TTGIR (1 = no software pipelining: each K step waits for its own loads);
- whether the tensor-core path is wgmma (Hopper) and whether the loads are TMA / cp.async.
Targets: no spills anywhere; >= 2 stages in the main loop of the log-prob kernels. fp32 log-prob rows are
compiled for the record only, in the one config a forced fp32 call autotunes over: the automatic dispatch
never runs them (fp32 on CUDA takes the torch path).

Exit status: 0 when everything compiled (a missed target is reported, not an error; `--strict` makes it
one), 1 when a kernel failed to compile. Needs triton with the CUDA backend (its ptxas), not a GPU. The
GPU machine has triton 3.6 (ptxas 12.8); this machine triton 3.9 (ptxas 13.x): figures may differ there.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret (before the kernels are imported)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMS = 132  # H100 / H200 SXM multiprocessors (the forward's vocabulary split depends on it)
N, H, V = 4096, 3584, 152064  # tokens, hidden size and vocabulary of the Qwen2.5-VL-7B head
B, T = 4, 1024  # GRPO loss: sequences x tokens
G, NVOTE = 65536, 16  # vote_count: groups x answers


def _ptr(dtype):
    return torch.empty(16, dtype=dtype)  # only the dtype and the 16-byte alignment reach the compiler


def _desc(dtype, shape):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(_ptr(dtype), list(shape), [shape[1], 1], [16, 16])  # blocks set per config


def _logprob_cases():
    lp = importlib.import_module("vzero_fast.kernels.logprob")
    bf16 = torch.bfloat16
    # As _triton_fwd: split the vocabulary when the row blocks alone do not fill the device.
    splits = max(1, min(triton.cdiv(4 * SMS, triton.cdiv(N, 128)), triton.cdiv(V, lp._GPU_MIN_SPLIT_COLS)))
    cols = triton.cdiv(triton.cdiv(V, splits), lp._GPU_SPLIT_ALIGN) * lp._GPU_SPLIT_ALIGN
    splits = triton.cdiv(V, cols)
    chunk = lp._GPU_BWD_CHUNK
    cases = []
    # bf16 (training) with and without the entropy, and fp32 (--model.dtype float32: exact fp32 products, no
    # tensor cores; compiled for the record, without the main-loop target).
    for dtype, ent in ((bf16, False), (bf16, True), (torch.float32, True)):
        flags = {"DOT_FP32": dtype == torch.float32, "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
        fwd_args = dict(h_desc=_desc(dtype, (N, H)), w_desc=_desc(dtype, (V, H)),
                        part_ptr=_ptr(torch.float32), N=N, H=H, V=V, cols_per_split=cols, stride_pq=splits * N,
                        stride_ps=N, inv_temp=1.0)
        bwd_args = dict(h_desc=_desc(dtype, (N, H)), w_desc=_desc(dtype, (V, H)), dz_desc=_desc(dtype, (N, chunk)),
                        tgt_ptr=_ptr(torch.int64), lse_ptr=_ptr(torch.float32), ent_ptr=_ptr(torch.float32),
                        glp_ptr=_ptr(torch.float32), gent_ptr=_ptr(torch.float32), N=N, H=H, v_lo=0,
                        v_hi=chunk, inv_temp=1.0)
        for kernel, fn, args in (("logprob_fwd", lp._logprob_fwd_kernel, fwd_args),
                                 ("logprob_bwd", lp._logprob_bwd_kernel, bwd_args)):
            configs = lp._gpu_configs(kernel == "logprob_bwd")
            if dtype != bf16:  # the one config forced fp32 autotunes over (kernels/logprob.py: _prune_fp32)
                configs = lp._prune_fp32(configs, {}, PRECISION=flags["PRECISION"])
            for cfg in configs:
                args = copy.deepcopy(args)  # each config gets its own descriptors
                if cfg.pre_hook is not None:
                    cfg.pre_hook({**args, **cfg.kwargs})  # what autotune does before a config runs
                cases.append({"kernel": kernel, "fn": (lp.__name__, fn.__name__),
                              "args": tuple(args[name] for name in fn.arg_names if name in args),
                              "constexprs": {"WITH_ENTROPY": ent, **flags, **cfg.kwargs},
                              "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                              "variant": f"{'bf16' if dtype == bf16 else 'fp32'} entropy={int(ent)}",
                              "targets": ("spills", "stages") if dtype == bf16 else ()})
    return cases


def _grpo_cases():
    gl = importlib.import_module("vzero_fast.kernels.grpo_loss")  # the package's grpo_loss is the function

    f32 = torch.float32
    cases = []
    for variant, flags in (("off-policy, k3 ref, dual clip", dict(ON_POLICY=False, HAS_REF=True, DUAL_CLIP=True,
                                                                    KL_TYPE=3)),
                           ("on-policy, no ref", dict(ON_POLICY=True, HAS_REF=False, DUAL_CLIP=False, KL_TYPE=3))):
        common = (_ptr(f32), _ptr(f32), _ptr(f32), _ptr(f32), _ptr(torch.uint8), _ptr(f32))
        scalars = (0.2, 0.2, 3.0, 0.01)
        # advantages [B] expanded over T: stride_ab = 1, stride_at = 0 (as _triton_grpo)
        fwd_args = (*common, _ptr(f32), T, T, 1, 0, B, *scalars)
        bwd_args = (*common, _ptr(f32), _ptr(f32), T, T, 1, 0, *scalars)
        block = {"BLOCK_T": min(gl._MAX_BLOCK_T, T)}
        for kernel, fn, args in (("grpo_loss_fwd", gl._grpo_loss_fwd_kernel, fwd_args),
                                 ("grpo_loss_bwd", gl._grpo_loss_bwd_kernel, bwd_args)):
            cases.append({"kernel": kernel, "fn": (gl.__name__, fn.__name__), "args": args,
                          "constexprs": {**flags, **block}, "num_warps": 4, "num_stages": 3, "variant": variant,
                          "targets": ("spills",)})
    return cases


def _vote_cases():
    vt = importlib.import_module("vzero_fast.kernels.vote")

    i64 = torch.int64
    args = (_ptr(i64), _ptr(i64), _ptr(i64), _ptr(i64), NVOTE, NVOTE, 1)
    return [{"kernel": "vote_count", "fn": (vt.__name__, vt._vote_count_fwd_kernel.__name__), "args": args,
             "constexprs": {"BLOCK_N": max(triton.next_power_of_2(NVOTE), 16), "BLOCK_J": vt._BLOCK_J},
             "num_warps": 4, "num_stages": 3, "variant": f"n={NVOTE}", "targets": ("spills",)}]


def cases() -> list[dict]:
    return _logprob_cases() + _grpo_cases() + _vote_cases()


# ------------------------------------------------------------------------------------------- measuring

_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
# A dot operand buffer allocated once outside the loop with a leading stage dimension: memdesc<SxMxK...>
_STAGED_ALLOC = re.compile(r"ttg\.local_alloc\s*(?:\{[^}]*\})?\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x")


def ptxas_usage(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # as Triton's own ptxas call
        proc = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={name}", str(src),
                               "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
    log = proc.stderr + proc.stdout
    stack, stores, loads = map(int, _PTXAS_SPILL.search(log).groups())
    return {"registers": int(_PTXAS_REGS.search(log).group(1)), "stack_bytes": stack,
            "spill_store_bytes": stores, "spill_load_bytes": loads, "spill_bytes": stores + loads}


def main_loop_stages(ttgir: str) -> int | None:
    """Shared-memory buffers of the dot operands (None when the kernel has no tl.dot)."""
    if "warp_group_dot" not in ttgir and "tt.dot" not in ttgir and "ttng.tc_gen5_mma" not in ttgir:
        return None
    staged = [int(s) for s in _STAGED_ALLOC.findall(ttgir)]
    return max(staged) if staged else 1


def compile_case(case: dict) -> dict:
    """Compile one (kernel, config) exactly as a launch would specialize it; measure it. The target is
    sm_90 unless the case names another compute capability ("arch": 100 for sm_100)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    module, name = case["fn"]
    fn = getattr(importlib.import_module(module), name)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1: run with TRITON_INTERPRET=0")
    row = {k: case[k] for k in ("kernel", "variant", "num_warps", "num_stages", "targets")}
    row["config"] = {k: v for k, v in case["constexprs"].items() if k.startswith("BLOCK") or k.startswith("GROUP")}
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", case.get("arch", TARGET.arch), 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = {**case["constexprs"], "num_warps": case["num_warps"], "num_stages": case["num_stages"]}
        bound, specialization, options = binder(*case["args"], **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
        row.update(ptxas_usage(ptx, target.arch))
        row["shared_bytes"] = kernel.metadata.shared
        row["stages"] = main_loop_stages(ttgir)
        row["wgmma"] = "wgmma.mma_async" in ptx
        row["tma"] = "cp.async.bulk.tensor" in ptx
        row["cp_async"] = "cp.async.cg" in ptx or "cp.async.ca" in ptx
    except Exception as exc:  # reported per row; the exit status says a kernel failed
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def verdict(row: dict) -> list[str]:
    """The targets this row misses (empty = all met, or none apply)."""
    if "error" in row:
        return ["compile"]
    miss = []
    if "spills" in row["targets"] and row["spill_bytes"] > 0:
        miss.append("spills")
    if "stages" in row["targets"] and (row["stages"] or 0) < 2:
        miss.append("stages")
    return miss


def table(rows: list[dict]) -> str:
    lines = ["| kernel | variant | config | warps | stages asked | regs | spill B (st+ld) | stack B | smem KiB "
             "| main-loop stages | wgmma | TMA | targets |", "|" + "---|" * 13]
    for r in rows:
        cfg = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["config"].items())
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {cfg} | {r['num_warps']} | {r['num_stages']} | "
                         f"{r['error']} | | | | | | | compile failed |")
            continue
        miss = verdict(r)
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {cfg} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
            f"{r['spill_bytes']} ({r['spill_store_bytes']}+{r['spill_load_bytes']}) | {r['stack_bytes']} | "
            f"{r['shared_bytes'] / 1024:.0f} | {r['stages'] if r['stages'] is not None else '-'} | "
            f"{'yes' if r['wgmma'] else 'no'} | {'yes' if r['tma'] else 'no'} | "
            f"{'MISSED: ' + ', '.join(miss) if miss else 'met' if r['targets'] else 'none (record)'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for kernel_report.json and kernel_report.md")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    p.add_argument("--kernel", action="append", help="only these kernels (e.g. logprob_fwd); repeatable")
    p.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    args = p.parse_args()
    todo = [c for c in cases() if not args.kernel or c["kernel"] in args.kernel]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_case, todo))
    misses = {i: verdict(r) for i, r in enumerate(rows)}
    failed = sum("compile" in m for m in misses.values())
    missed = sum(bool(m) for m in misses.values()) - failed
    info = {"date": datetime.date.today().isoformat(), "target": "cuda sm_90 (compile only, no GPU)",
            "triton": triton.__version__, "torch": torch.__version__, "shapes": {"N": N, "H": H, "V": V, "B": B,
            "T": T, "G": G, "n": NVOTE}, "compiled": len(rows) - failed, "failed": failed,
            "targets_missed": missed, "seconds": round(time.perf_counter() - start, 1)}
    md = table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_report.json").write_text(json.dumps({**info, "rows": rows}, indent=1))
    (out / "kernel_report.md").write_text(f"{json.dumps(info)}\n\n{md}\n")
    print(md)
    print(json.dumps(info))
    if failed:
        return 1
    return 2 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
