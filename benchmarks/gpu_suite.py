"""The one command a lent GPU runs: install, check, train, time and report, in at most 8 minutes.

    python benchmarks/gpu_suite.py --out $OUT/gpu_suite          # H100/H200, one call, <= 8 min
    python benchmarks/gpu_suite.py --smoke --out suite-smoke      # CPU at toy shapes (CI), ~2-3 min
    python benchmarks/gpu_suite.py --out DIR --only preflight kernels   # a subset

Stages, cheapest and most informative first (each one's result is useful even if a later one fails):
  versions     python, torch, CUDA, NCCL, triton, transformers; GPU name, capability, SMs, memory
  install      `pip install --no-deps --no-build-isolation --no-index -e .` (a dry run with --smoke), then
               where `vzero_fast.kernels` resolves from a clean interpreter (it exists only after an install
               or from a checkout: pyproject maps kernels/ to it)
  imports      the package, transformers' Qwen2.5-VL, and which kernel backend a CUDA bf16 tensor gets
  compile      benchmarks/kernel_report.py with this machine's triton and ptxas, in parallel (registers,
               spills, stages as this compiler builds them; it also fills Triton's cache for the kernels
               stage's 7B-head shapes)
  preflight    every kernel on both backends (triton, torch) against the float64 reference: odd shapes,
               bf16 and fp32, an H whose rows are not 16-byte aligned
  toy_step     one GRPO step of the tiny model on the device; it must train: groups kept > 0, no skipped
               update, every weight tensor moved
  nccl         the real CLI under `torchrun --nproc_per_node=1` with FSDP2 on NCCL (gloo with --smoke)
  kernels      benchmarks/gpu_kernels.py at the Qwen2.5-VL-7B head: fused log-prob fwd and fwd+bwd, GRPO
               loss, vote count vs eager and torch.compile; TFLOP/s against the bf16 peak measured here,
               extra memory
  weight_sync  the device copy a 7B weight sync does (every tensor of Qwen2.5-VL-7B, bf16) vs one flat
               copy of the same bytes (the device-copy bandwidth)
  step_3b      one GRPO step of a random-weight Qwen2.5-VL-3B-shaped model (bf16, fixed lengths) with its
               time breakdown, native-engine tokens/s beside transformers.generate, peak memory
Every stage records the peak device memory it allocated.

Decisions:
- Each stage runs in its own subprocess under a time box, and the run under a budget (480 s on a GPU):
  a hung kernel or NCCL call is killed and the suite moves on; a stage that no longer fits the budget
  is reported "skipped". The orchestrator imports only the standard library, so it reports even when
  torch or the package cannot be imported.
- Stages put the checkout on PYTHONPATH: they run whether or not the install worked (vzero_fast's
  __init__ finds kernels/ in a checkout); the install and imports stages check the installed state
  from a clean interpreter.
- Writes DIR/gpu_suite.json (every stage: status, seconds, peak memory, summary, data), DIR/gpu_suite.md
  (the table, then each stage's details), DIR/stages/<stage>.json and DIR/logs/<stage>.log. The last
  stdout line is one JSON object. Exit status 0 when no stage that ran failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
# (stage, time box on a GPU in s, time box with --smoke in s)
STAGES = [("versions", 60, 60), ("install", 120, 60), ("imports", 90, 60), ("compile", 120, 90),
          ("preflight", 150, 120), ("toy_step", 120, 120), ("nccl", 150, 150), ("kernels", 180, 120),
          ("weight_sync", 90, 60), ("step_3b", 240, 120)]
BUDGET_S = {"gpu": 480, "smoke": 900}
MIN_STAGE_S = 20  # a stage is started only with at least this much of the budget left


# =========================================================================================== orchestrator

def _stage_env(smoke: bool, name: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # Kernels run in the Triton interpreter with --smoke (no GPU); the compile stage must not interpret.
    env["TRITON_INTERPRET"] = "1" if smoke and name not in ("compile",) else "0"
    # Checks that need the kernels right, not fast, use one config: autotuning compiles every config anew
    # for each new specialization (2-10 s each), minutes of a GPU's 15 that the timing stages need.
    if name in ("preflight", "toy_step", "nccl"):
        env["VZERO_AUTOTUNE"] = "0"
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_stage(name: str, box: float, out: Path, smoke: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out)]
    if smoke:
        cmd.append("--smoke")
    log_path = out / "logs" / f"{name}.log"
    start = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=box, cwd=REPO,
                                  env=_stage_env(smoke, name))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.time() - start
    result_path = out / "stages" / f"{name}.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if code is None:
        partial = f"; before that: {result['summary']}" if result.get("summary") else ""
        result.update(status="timeout", summary=f"killed after its {box:.0f} s time box{partial}")
    elif not result:
        tail = log_path.read_text()[-600:].strip().splitlines()
        result = {"status": "failed", "summary": f"exit {code}: {tail[-1] if tail else 'no output'}"}
    result["seconds"] = round(seconds, 1)
    result["name"] = name
    return result


def orchestrate(args) -> int:
    out = Path(args.out).resolve()
    (out / "stages").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for old in (out / "stages").glob("*.json"):
        old.unlink()
    budget = args.budget or BUDGET_S["smoke" if args.smoke else "gpu"]
    deadline = time.time() + budget
    results = []
    for name, box_gpu, box_smoke in STAGES:
        if args.only and name not in args.only:
            continue
        left = deadline - time.time()
        if left < MIN_STAGE_S:
            results.append({"name": name, "status": "skipped", "seconds": 0.0,
                            "summary": f"out of time ({left:.0f} s of the {budget} s budget left)"})
            continue
        box = min(box_smoke if args.smoke else box_gpu, left)
        print(f"== {name} (time box {box:.0f} s)", flush=True)
        results.append(run_stage(name, box, out, args.smoke))
        r = results[-1]
        print(f"   {r['status']} in {r['seconds']} s: {r.get('summary', '')}", flush=True)
    report = {"suite": "gpu_suite", "date": datetime.date.today().isoformat(), "commit": _commit(),
              "smoke": args.smoke, "budget_s": budget, "total_s": round(sum(r["seconds"] for r in results), 1),
              "stages": results}
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "gpu_suite.md").write_text(md)
    print(md)
    print(json.dumps({k: v for k, v in report.items() if k != "stages"} |
                     {"status": {r["name"]: r["status"] for r in results}}))
    return 1 if any(r["status"] in ("failed", "timeout") for r in results) else 0


def markdown(report: dict) -> str:
    lines = [f"# GPU suite ({'smoke, CPU' if report['smoke'] else 'GPU'}) -- {report['date']}, commit "
             f"{report['commit']}, {report['total_s']} s of a {report['budget_s']} s budget", "",
             "| stage | status | s | peak GiB | result |", "|---|---|---|---|---|"]
    for r in report["stages"]:
        peak = r.get("peak_gib")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {'' if peak is None else f'{peak:.1f}'} | "
                     f"{str(r.get('summary', '')).replace('|', '/')} |")
    for r in report["stages"]:
        if r.get("markdown"):
            lines += ["", f"## {r['name']}", "", r["markdown"]]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return rev + (" + uncommitted changes" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"


# ============================================================================================ the stages
# Each runs in its own process: `gpu_suite.py --stage NAME --out DIR [--smoke]`, and returns
# (ok, summary, data[, markdown]).

def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stage_versions(ctx):
    import platform

    import torch

    data = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    for mod in ("triton", "transformers", "numpy", "safetensors"):
        try:
            data[mod] = __import__(mod).__version__
        except ImportError as exc:
            data[mod] = f"missing ({exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()
        data.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                    nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
        try:
            data["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            data["driver"] = "nvidia-smi unavailable"
    where = f"{data['gpu']} (sm {data['capability']}, {data['memory_gib']} GiB)" if "gpu" in data else "no GPU"
    return True, (f"{where}; python {data['python']}, torch {data['torch']} (CUDA {data['cuda']}), "
                  f"triton {data['triton']}, transformers {data['transformers']}"), data


def _clean_import(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from an empty directory without the checkout on PYTHONPATH: the installed state."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=120)


def stage_install(ctx):
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(REPO)]
    if ctx.smoke:
        cmd.insert(4, "--dry-run")  # CI: check the command, leave the environment as it is
    start = time.perf_counter()
    pip = subprocess.run(cmd, capture_output=True, text=True, timeout=110)
    pip_s = time.perf_counter() - start
    check = _clean_import("import vzero_fast.kernels as k; print(k.__file__)")
    where = check.stdout.strip()
    expected = str(REPO / "kernels" / "__init__.py")
    data = {"command": " ".join(cmd), "pip_exit": pip.returncode, "pip_s": round(pip_s, 1),
            "pip_tail": (pip.stdout + pip.stderr)[-1500:], "kernels_resolve_to": where or check.stderr[-800:]}
    ok = pip.returncode == 0 and (where == expected or ctx.smoke and check.returncode == 0)
    summary = (f"pip -e {'(dry run) ' if ctx.smoke else ''}exit {pip.returncode} in {pip_s:.1f} s; "
               f"vzero_fast.kernels -> {where or 'NOT IMPORTABLE'}")
    return ok, summary, data


def stage_imports(ctx):
    import torch

    timings = {}
    for mod in ("torch", "triton", "transformers", "vzero_fast.kernels", "vzero_fast.grpo", "vzero_fast.rollout",
                "vzero_fast.distributed", "vzero_fast.trainer"):
        start = time.perf_counter()
        __import__(mod)
        timings[mod] = round(time.perf_counter() - start, 2)
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401

    import vzero_fast.kernels as kernels
    from vzero_fast.kernels.dispatch import pick_backend

    dev = _device()
    backend = pick_backend("suite_probe", torch.zeros(2, dtype=torch.bfloat16, device=dev))
    data = {"import_s": timings, "kernels_file": kernels.__file__, "bf16_backend_on_device": backend,
            "installed": _clean_import("import vzero_fast.kernels as k; print(k.__file__)").stdout.strip()}
    ok = kernels.__file__ == str(REPO / "kernels" / "__init__.py") and (backend == "triton") == (dev.type == "cuda")
    return ok, f"imports ok ({sum(timings.values()):.1f} s); bf16 on {dev.type} -> {backend} kernels", data


def stage_compile(ctx):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    sys.path.insert(0, str(BENCH))
    import kernel_report as report

    arch = report.TARGET.arch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
        report.SMS = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [{**c, "arch": arch} for c in report.cases()]
    if ctx.smoke:  # CI runs the full report as its own step; here one case per kernel family
        cases = [c for c in cases if c["kernel"] in ("vote_count", "grpo_loss_bwd")][:2]
    # spawn: this process has initialised CUDA, which a forked child must not inherit
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(report.compile_case, cases))
    misses = [report.verdict(r) for r in rows]
    failed = sum("compile" in m for m in misses)
    spilled = [r for r in rows if r.get("spill_bytes")]
    stages = [r["stages"] for r in rows if r.get("stages")]
    summary = (f"{len(rows) - failed}/{len(rows)} compiled for sm_{arch}; {sum(bool(m) for m in misses) - failed} "
               f"missed targets; spills in {len(spilled)}"
               + (f"; main-loop stages {min(stages)}-{max(stages)}" if stages else ""))
    return failed == 0, summary, {"rows": rows}, report.table(rows)


def _rel(actual, expected) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item() if a.numel() else 0.0


def stage_preflight(ctx):
    import torch

    from vzero_fast.kernels import (
        force_backend,
        fused_grpo_loss,
        fused_grpo_loss_reference,
        fused_linear_logprob,
        fused_linear_logprob_reference,
        grpo_loss,
        grpo_loss_reference,
        vote_count,
        vote_count_reference,
    )

    dev = _device()
    g = torch.Generator().manual_seed(0)
    rows = []

    def logprob_case(N, H, V, dtype, backend):
        scale = (3.0 / H ** 0.5) ** 0.5
        h64 = (torch.randn(N, H, generator=g) * scale).to(dtype).double()  # the rounded inputs' float64 truth
        w64 = (torch.randn(V, H, generator=g) * scale).to(dtype).double()
        t = torch.randint(0, V, (N,), generator=g)
        gl, ge = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)

        def run(fn, dt, device, backend=None):
            h = h64.to(device, dt, copy=True).requires_grad_()
            w = w64.to(device, dt, copy=True).requires_grad_()
            with force_backend(backend):
                lp, ent = fn(h, w, t.to(device), temperature=0.7, return_entropy=True)
            ((lp.double() * gl.to(device)).sum() + (ent.double() * ge.to(device)).sum()).backward()
            return {"logp": lp, "entropy": ent, "grad_h": h.grad, "grad_w": w.grad}

        ref = run(fused_linear_logprob_reference, torch.float64, "cpu")
        got = run(fused_linear_logprob, dtype, dev, backend)
        errs = {k: _rel(got[k], ref[k]) for k in ref}
        if dtype == torch.float32:
            bound, rule = {k: 1e-5 for k in ref}, "<= 1e-5"
        else:
            naive = run(fused_linear_logprob_reference, dtype, dev, "torch")
            bound, rule = {k: 2 * _rel(naive[k], ref[k]) + 1e-12 for k in ref}, "<= 2 x naive"
        return errs, all(errs[k] <= bound[k] for k in ref), rule

    # odd shapes; the second's rows are not 16-byte aligned in bf16 (TMA needs a padded copy)
    cases = ([(37, 48, 131, torch.bfloat16), (37, 48, 131, torch.float32), (9, 20, 200, torch.bfloat16)]
             if ctx.smoke else [(300, 512, 4099, torch.bfloat16), (300, 512, 4099, torch.float32),
                                (37, 100, 1000, torch.bfloat16)])
    for N, H, V, dtype in cases:
        for backend in ("triton", "torch"):
            start = time.perf_counter()
            try:
                errs, ok, rule = logprob_case(N, H, V, dtype, backend)
                rows.append({"op": "fused_linear_logprob", "shape": f"N={N} H={H} V={V}",
                             "dtype": str(dtype).removeprefix("torch."), "backend": backend, "ok": ok,
                             "rule": rule, "max_err": max(errs.values()), "errors": errs})
            except Exception as exc:
                rows.append({"op": "fused_linear_logprob", "shape": f"N={N} H={H} V={V}", "backend": backend,
                             "dtype": str(dtype).removeprefix("torch."), "ok": False, "error": _err(exc)})
            rows[-1]["s"] = round(time.perf_counter() - start, 2)

    # GRPO loss (fp32 log-probs, off-policy, k3 reference, dual clip), its fused form, and the vote count.
    B, T = (3, 20) if ctx.smoke else (6, 77)
    lp = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 2
    old, ref = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64), lp - 0.05
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.05, clip_c=3.0)
    x64 = lp.clone().requires_grad_()
    want, want_m = grpo_loss_reference(x64, adv, mask, **kw)
    want.backward()
    ids = torch.randint(-1, 5, (999 if not ctx.smoke else 50, 10), generator=g)
    want_votes = vote_count_reference(ids)
    Hf, Vf = (48, 131) if ctx.smoke else (512, 4099)
    hf = torch.randn(B, T, Hf, generator=g, dtype=torch.float64) * 0.3
    wf = torch.randn(Vf, Hf, generator=g, dtype=torch.float64) * 0.3
    tf = torch.randint(0, Vf, (B, T), generator=g)
    fused_want, _ = fused_grpo_loss_reference(hf, wf, tf, mask, adv, **kw)
    for backend in ("triton", "torch"):
        start = time.perf_counter()
        try:
            x = lp.to(dev, torch.float32).requires_grad_()
            with force_backend(backend):
                loss, m = grpo_loss(x, adv.to(dev), mask.to(dev), **{k: (v.to(dev, torch.float32) if hasattr(v, "to")
                                                                          else v) for k, v in kw.items()})
                loss.backward()
            errs = {"loss": _rel(loss, want), "grad": _rel(x.grad, x64.grad),
                    **{k: abs(m[k].item() - want_m[k].item()) for k in want_m}}
            rows.append({"op": "grpo_loss", "shape": f"B={B} T={T}", "dtype": "float32", "backend": backend,
                         "ok": errs["loss"] <= 1e-5 and errs["grad"] <= 1e-5 and max(errs[k] for k in want_m) <= 1e-5,
                         "rule": "<= 1e-5", "max_err": max(errs.values()), "errors": errs})
        except Exception as exc:
            rows.append({"op": "grpo_loss", "backend": backend, "ok": False, "error": _err(exc)})
        try:
            with force_backend(backend):
                got_fused, _ = fused_grpo_loss(hf.to(dev, torch.float32), wf.to(dev, torch.float32), tf.to(dev),
                                               mask.to(dev), adv.to(dev, torch.float32),
                                               **{k: (v.to(dev, torch.float32) if hasattr(v, "to") else v)
                                                  for k, v in kw.items()})
            err = _rel(got_fused, fused_want)
            rows.append({"op": "fused_grpo_loss", "shape": f"B={B} T={T} H={Hf} V={Vf}", "dtype": "float32",
                         "backend": backend, "ok": err <= 1e-5, "rule": "<= 1e-5", "max_err": err})
        except Exception as exc:
            rows.append({"op": "fused_grpo_loss", "backend": backend, "ok": False, "error": _err(exc)})
        try:
            with force_backend(backend):
                got_votes = vote_count(ids.to(dev))
            same = all(torch.equal(a.cpu(), b) for a, b in zip(got_votes, want_votes, strict=True))
            rows.append({"op": "vote_count", "shape": f"G={ids.shape[0]} n=10", "dtype": "int64", "backend": backend,
                         "ok": same, "rule": "exact", "max_err": 0.0 if same else 1.0})
        except Exception as exc:
            rows.append({"op": "vote_count", "backend": backend, "ok": False, "error": _err(exc)})
        rows[-1]["s"] = round(time.perf_counter() - start, 2)
    md = ["| op | shape | dtype | backend | rule | max error | ok | s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = r.get("error") or f"{r['max_err']:.2e}"
        md.append(f"| {r['op']} | {r.get('shape', '')} | {r.get('dtype', '')} | {r['backend']} | {r.get('rule', '')} "
                  f"| {err} | {'yes' if r['ok'] else 'NO'} | {r.get('s', '')} |")
    bad = [f"{r['op']}/{r['backend']}/{r.get('dtype', '')}" for r in rows if not r["ok"]]
    summary = f"{len(rows) - len(bad)}/{len(rows)} match the reference" + (f"; FAILED: {', '.join(bad)}" if bad else "")
    return not bad, summary, {"rows": rows}, "\n".join(md)


def _err(exc: BaseException) -> str:
    traceback.print_exc()
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"


def _tiny_policy(tmp: Path, dtype):
    from vzero_fast.model import load_policy
    from vzero_fast.tiny import build_tiny

    return load_policy(build_tiny(tmp / "tiny", seed=0), dtype=dtype, device=_device(), attn_implementation="sdpa")


def _requests(n_prompts: int, n: int, new_tokens: int, size: int, step: int = 0):
    from vzero_fast.data import synthetic_figure
    from vzero_fast.rollout import Request, SamplingParams

    return [Request.from_image_text(synthetic_figure(1000 * step + i, size=size), "Describe the figure.",
                                    SamplingParams(n=n, max_new_tokens=new_tokens, ignore_eos=True,
                                                   seed=1000 * step + i))
            for i in range(n_prompts)]


def _parity_reward(outputs):
    """1 for an even first token: a host tensor, as reward functions return, with variance in every group
    of a random policy."""
    import torch

    return torch.tensor([[float(s.token_ids[0] % 2 == 0) for s in o.samples] for o in outputs])


def _grpo_step(policy, cfg, requests, *, steps: int = 1):
    """Run `steps` GRPO steps; per step the host metrics and the time breakdown."""
    import logging

    from vzero_fast.grpo import Role
    from vzero_fast.metrics import StageTimer, to_host
    from vzero_fast.rollout import NativeEngine

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    role = Role(name="policy", policy=policy, cfg=cfg, engine=NativeEngine(policy))
    role.freeze_reference()
    timer = StageTimer(policy.device)
    rows = []
    for step in range(steps):
        start = time.perf_counter()
        m = to_host(role.grpo_step(requests(step), _parity_reward, timer=timer))
        m.update(timer.pop())
        m["wall_s"] = time.perf_counter() - start
        rows.append(m)
    return role, rows


def stage_toy_step(ctx):
    import torch

    from vzero_fast.config import PolicyConfig

    dev = _device()
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        policy = _tiny_policy(Path(tmp), dtype)
        before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        # lr 1e-2: two Adam steps of ~lr each must move even the norm weights (~1.0) of the bf16 copy, whose
        # spacing there is 2^-7 (the fp32 masters move at any lr)
        cfg = PolicyConfig(lr=1e-2, max_response_tokens=8, mini_batches=2, kl_coef=0.01, micro_batch_tokens=4096)
        _, rows = _grpo_step(policy, cfg, lambda step: _requests(4, 4, 8, 112, step))
        moved = sum(not torch.equal(before[n], p.detach()) for n, p in policy.model.named_parameters())
    m = rows[0]
    finite = all(isinstance(v, float) and v == v for v in m.values() if isinstance(v, float))
    trained = m.get("groups_kept", 0) > 0 and m.get("tokens", 0) > 0 and m.get("skipped_updates", 1) == 0
    ok = trained and finite and moved == len(before)
    summary = (f"{dtype} on {dev.type}: groups kept {m.get('groups_kept', 0):.0f}/{m.get('groups', 0):.0f}, "
               f"{m.get('tokens', 0):.0f} tokens, loss {m.get('loss', float('nan')):.4f}, skipped "
               f"{m.get('skipped_updates', '-')}, weight tensors moved {moved}/{len(before)}, {m['wall_s']:.1f} s")
    return ok, summary, {"metrics": m, "moved": moved, "tensors": len(before)}


def stage_nccl(ctx):
    dev = _device()
    run_dir = Path(ctx.out) / "nccl_run"
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", "--nproc_per_node=1", "-m", "vzero_fast", "train", "--recipe", "toy",
           "--preset", "tiny", "--out", str(run_dir), "--iterations", "1", "--max-steps-per-role", "2",
           "--device", dev.type, "--dist.fsdp", "on", "--dist.timeout_s", "60"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.box - 10, cwd=REPO)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (Path(ctx.out) / "logs" / "nccl_run.log").write_text(log)
    metrics_path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    backend = "nccl" if dev.type == "cuda" else "gloo"
    joined = f"{backend} on" in log
    ok = proc.returncode == 0 and joined and len(rows) >= 2 and all(r.get("groups_kept", 0) > 0 for r in rows)
    summary = (f"torchrun 1 rank, FSDP2 on {backend}: exit {proc.returncode}, {len(rows)} steps logged, "
               f"{'joined' if joined else 'NO ' + backend + ' group'} in {seconds:.0f} s"
               + ("; torch lacks set_reduce_scatter_unused_params (logged)" if "has no set_reduce_scatter" in log
                  else ""))
    return ok, summary, {"exit": proc.returncode, "rows": rows, "log_tail": log[-3000:]}


def stage_kernels(ctx):
    sys.path.insert(0, str(BENCH))
    import gpu_kernels

    def partial(p):  # if the time box kills the stage, the rows measured so far survive
        _write_stage(ctx.out, "kernels", {"status": "partial", "summary": f"{len(p['rows'])} rows measured",
                                          "data": {k: v for k, v in p.items() if k != "markdown"},
                                          "markdown": p["markdown"]})

    left = ctx.deadline - time.time()
    result = gpu_kernels.run(n_list=[4096, 16384], hidden=3584, vocab=152064, rep_ms=300, compile_baseline=True,
                             smoke=ctx.smoke, deadline=time.time() + 0.45 * left, on_progress=partial)
    md = result.pop("markdown")
    checks_ok = all(c.get("pass") for c in result["checks"])
    parts = []
    for n, v in result["verdict"].items():
        if v.get("complete", True):
            parts.append(f"N={n}: fwd+bwd {v['tflops']:.0f} TFLOP/s, {v['speedup_vs_eager']:.2f}x eager"
                         + (f", extra memory {100 * v['memory_share']:.1f}% of naive" if "memory_share" in v else ""))
    peak = result.get("peak_tflops_bf16_measured")
    summary = (f"checks {'pass' if checks_ok else 'FAIL'}; " + "; ".join(parts)
               + (f"; bf16 matmul peak here {peak:.0f} TFLOP/s" if peak else ""))
    return checks_ok, summary, result, md


_QWEN_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "out_hidden_size": 3584, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}}
_QWEN_3B = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
            "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "out_hidden_size": 2048, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}}


def _shaped_config(shapes: dict | None) -> dict:
    """The tiny model's config (its tokenizer's special ids) with the given shapes (ALGORITHMS.md)."""
    from vzero_fast.tiny import tiny_config

    cfg = tiny_config()
    if shapes:
        cfg.update({k: v for k, v in shapes.items() if k != "vision_config"})
        cfg["vision_config"] = {**cfg["vision_config"], **shapes["vision_config"]}
    return cfg


def stage_weight_sync(ctx):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    dev = _device()
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(**_shaped_config(None if ctx.smoke else _QWEN_7B))).parameters()]
    numel = sum(torch.Size(s).numel() for s in shapes)
    src = [torch.randn(s, device=dev, dtype=torch.bfloat16) for s in shapes]
    dst = [torch.empty_like(t) for t in src]
    flat_src = torch.empty(min(numel, 1 << 31), device=dev, dtype=torch.bfloat16)  # <= 4 GiB: the bandwidth
    flat_dst = torch.empty_like(flat_src)

    def timed(fn, reps=3):
        fn()
        best = float("inf")
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    def per_tensor():
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    t_sync = timed(per_tensor)
    nbytes = 2 * numel
    t_flat = timed(lambda: flat_dst.copy_(flat_src)) * numel / flat_src.numel()  # the same bytes at that rate
    data = {"parameters": numel, "tensors": len(shapes), "bytes": nbytes, "per_tensor_s": t_sync, "flat_s": t_flat,
            "flat_buffer_bytes": 2 * flat_src.numel(),
            "per_tensor_gbps_rw": 2 * nbytes / t_sync / 1e9, "flat_gbps_rw": 2 * nbytes / t_flat / 1e9}
    what = "tiny-model" if ctx.smoke else "Qwen2.5-VL-7B"
    summary = (f"{what} weights ({numel / 1e6:.1f} M params, {len(shapes)} tensors, {nbytes / 2**30:.2f} GiB bf16): "
               f"tensor-by-tensor copy {t_sync * 1e3:.1f} ms ({data['per_tensor_gbps_rw']:.0f} GB/s read+write) vs "
               f"one flat copy {t_flat * 1e3:.1f} ms ({data['flat_gbps_rw']:.0f} GB/s)")
    return True, summary, data


def stage_step_3b(ctx):
    import torch

    from vzero_fast.config import PolicyConfig
    from vzero_fast.model import Policy, encode_prompts, load_processor
    from vzero_fast.tiny import build_tiny

    dev = _device()
    prompts, n, new_tokens, size = (2, 2, 8, 112) if ctx.smoke else (8, 4, 128, 448)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny(Path(tmp) / "tiny", seed=0)  # its tokenizer and image processor
        processor = load_processor(model_dir)
        if ctx.smoke:
            policy = _tiny_policy(Path(tmp), "float32")
        else:
            from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            start = time.perf_counter()
            with torch.device(dev):
                model = Qwen2_5_VLForConditionalGeneration._from_config(
                    Qwen2_5_VLConfig(**_shaped_config(_QWEN_3B)), attn_implementation="sdpa", dtype=torch.bfloat16)
            model.gradient_checkpointing_enable()
            model.generation_config = GenerationConfig(eos_token_id=processor.tokenizer.eos_token_id,
                                                       pad_token_id=processor.tokenizer.pad_token_id)
            policy = Policy(model=model, processor=processor, device=dev, dtype=torch.bfloat16,
                            attn_implementation="sdpa", path=model_dir)
            print(f"3B-shaped model: {policy.num_parameters / 1e9:.2f} B parameters built in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        cfg = PolicyConfig(lr=1e-6, max_response_tokens=new_tokens, mini_batches=2, kl_coef=0.01,
                           micro_batch_tokens=8192, rollout_n=n, prompts_per_step=prompts)
        _, rows = _grpo_step(policy, cfg, lambda step: _requests(prompts, n, new_tokens, size, step), steps=2)
        # transformers.generate on the same prompts (HF encodes each image n times; ours once per prompt)
        images = [r.images[0] for r in _requests(prompts, n, new_tokens, size, 9)]
        batch = encode_prompts(policy, images, ["Describe the figure."] * prompts)
        suppress = list(policy.vision_token_ids) + [policy.eos_token_id]
        policy.model.eval()
        with torch.no_grad():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            ids = policy.model.generate(**batch, do_sample=True, num_return_sequences=n, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, suppress_tokens=suppress, top_k=0, top_p=1.0,
                                        temperature=1.0)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            hf_s = time.perf_counter() - start
        hf_tok_s = prompts * n * (ids.shape[1] - batch["input_ids"].shape[1]) / hf_s
        params = policy.num_parameters
    keys = ("wall_s", "time_rollout", "time_reward", "time_logprob", "time_train", "rollout_tokens_per_s",
            "groups_kept", "tokens", "loss", "skipped_updates")
    steps = [{k: r.get(k) for k in keys} for r in rows]
    last = steps[-1]
    md = ["| step | wall s | rollout s | reward s | log-probs s | train s | native tok/s | loss |",
          "|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(steps):
        md.append(f"| {i + 1}{' (cold: compile + autotune)' if i == 0 else ''} | {s['wall_s']:.2f} | "
                  f"{s['time_rollout']:.2f} | {s['time_reward']:.3f} | {s['time_logprob']:.2f} | {s['time_train']:.2f} | "
                  f"{s['rollout_tokens_per_s']:.0f} | {s['loss']:.4f} |")
    md.append(f"\ntransformers.generate, same prompts and lengths: {hf_tok_s:.0f} tokens/s")
    what = "tiny (smoke)" if ctx.smoke else f"3B-shaped ({params / 1e9:.2f} B params, bf16, fp32 masters)"
    ok = all(s["groups_kept"] and s["skipped_updates"] == 0 for s in steps)
    summary = (f"{what}, {prompts} prompts x {n} x {new_tokens} tokens: step {last['wall_s']:.1f} s (rollout "
               f"{last['time_rollout']:.1f}, log-probs {last['time_logprob']:.1f}, train {last['time_train']:.1f}); "
               f"native {last['rollout_tokens_per_s']:.0f} vs generate {hf_tok_s:.0f} tokens/s")
    return ok, summary, {"steps": steps, "hf_generate_tokens_per_s": hf_tok_s, "parameters": params}, "\n".join(md)


# ============================================================================================ stage runner

class _Ctx:
    def __init__(self, args, box: float):
        self.smoke, self.out, self.box = args.smoke, args.out, box
        self.deadline = time.time() + box


def _write_stage(out, name: str, result: dict) -> None:
    path = Path(out) / "stages" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)  # atomic: a kill never leaves half a file


def run_one(args) -> int:
    out = Path(args.out)
    box = dict((n, g if not args.smoke else s) for n, g, s in STAGES)[args.stage]
    ctx = _Ctx(args, box)
    result = {"status": "failed", "summary": "", "data": {}}
    peak = None
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ret = globals()[f"stage_{args.stage}"](ctx)
        ok, summary, data = ret[:3]
        result.update(status="ok" if ok else "failed", summary=summary, data=data)
        if len(ret) > 3:
            result["markdown"] = ret[3]
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
    except Exception as exc:
        result["summary"] = _err(exc)
        result["data"] = {"traceback": traceback.format_exc()[-4000:]}
    result["peak_gib"] = peak
    _write_stage(out, args.stage, result)
    print(json.dumps({"stage": args.stage, "status": result["status"], "summary": result["summary"]}), flush=True)
    return 0 if result["status"] == "ok" else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu_suite.json / .md, stages/ and logs/")
    p.add_argument("--smoke", action="store_true", help="CPU, toy shapes (Triton kernels in the interpreter)")
    p.add_argument("--only", nargs="+", choices=[s[0] for s in STAGES], help="run only these stages")
    p.add_argument("--budget", type=int, help="seconds for the whole run (default 480 on a GPU, 900 smoke)")
    p.add_argument("--stage", choices=[s[0] for s in STAGES], help=argparse.SUPPRESS)  # internal: one stage
    args = p.parse_args()
    return run_one(args) if args.stage else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
