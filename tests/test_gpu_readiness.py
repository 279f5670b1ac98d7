"""What would break the first GPU run, caught on the CPU (issue #12).

- A whole GRPO step (rollout, CPU reward, old/ref log-probs, two optimizer steps) on a simulated
  accelerator (tests/_device_sim.py: CUDA's device rules with real CPU arithmetic): host advantages indexed
  with device row indices, or a host running max meeting device logits, raise there as on CUDA.
- Every kernel's torch path on the simulated device gives the CPU result; step metrics reach the host
  in one read.
- Every tensor factory in the hot paths names its device (an AST scan).
- `vzero_fast.kernels` imports from a source checkout with no install.
- The kernel dispatch tests hold where the Triton interpreter is off (a GPU machine).
- FSDP2 on a torch without `set_reduce_scatter_unused_params` (torch 2.11): logged, and a training pass
  without an image raises instead of hanging the ranks (2 gloo ranks under torchrun).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _device_sim import SIM_DEVICE, DeviceMismatch, SimTensor, simulated_device, unwrap

from vzero_fast.kernels import force_backend, fused_linear_logprob, grpo_loss, vote_count

pytest_plugins = ["_tiny_fixture"]

REPO = Path(__file__).resolve().parent.parent


def _env(**extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# ------------------------------------------------------------------------------ the simulated accelerator

def test_simulation_enforces_cuda_device_rules():
    """The probe can fail: it raises exactly where CUDA does and computes real values elsewhere."""
    with simulated_device():
        host = torch.arange(5.0)
        rows = torch.tensor([0, 3], device=SIM_DEVICE)
        assert isinstance(rows, SimTensor) and rows.device == SIM_DEVICE
        with pytest.raises(DeviceMismatch):
            host[rows]  # a CPU tensor indexed with device indices
        with pytest.raises(DeviceMismatch):
            host + torch.ones(5, device=SIM_DEVICE)
        dev = host.to(SIM_DEVICE)
        assert unwrap(dev[torch.tensor([1, 4])]).tolist() == [1.0, 4.0]  # device tensor, host indices: fine
        assert unwrap(dev * torch.tensor(2.0)).tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]  # a 0-dim host scalar
        back = (dev + 1).cpu()
        assert type(back) is torch.Tensor and back.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_kernel_torch_paths_on_a_device():
    """Each op's torch path (what runs when Triton is unavailable or forced off) on device tensors: the
    same numbers as on the CPU, gradients included."""
    g = torch.Generator().manual_seed(0)
    N, H, V, B, T = 12, 16, 300, 3, 4
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    old, ref = torch.randn(B, T, generator=g) * 0.1 - 2, torch.randn(B, T, generator=g) * 0.1 - 2
    adv, mask = torch.randn(B, generator=g), torch.rand(B, T, generator=g) > 0.3
    ids = torch.randint(-1, 4, (6, 5), generator=g)

    def run(device):
        h = hidden.to(device, copy=True).requires_grad_()
        w = weight.to(device, copy=True).requires_grad_()
        logp, ent = fused_linear_logprob(h, w, targets.to(device), temperature=0.7, return_entropy=True)
        loss, metrics = grpo_loss(logp.view(B, T), adv.to(device), mask.to(device), old_logprobs=old.to(device),
                                  ref_logprobs=ref.to(device), kl_coef=0.1, clip_c=3.0)
        (loss + ent.sum()).backward()
        out = {"logp": logp, "entropy": ent, "loss": loss, "grad_h": h.grad, "grad_w": w.grad, **metrics}
        out.update(zip(("majority", "count", "valid"), vote_count(ids.to(device)), strict=True))
        return {k: unwrap(v.detach()) for k, v in out.items()}

    with force_backend("torch"):
        want = run("cpu")
        with simulated_device():
            got = run(SIM_DEVICE)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.slow
def test_grpo_step_trains_on_a_simulated_accelerator(tiny_model_dir):
    """A full step with the reward on the host and the model on the device: it must train (groups kept,
    every weight moved), not raise on its first micro-batch."""
    from vzero_fast.config import PolicyConfig
    from vzero_fast.data import synthetic_figure
    from vzero_fast.grpo import Role
    from vzero_fast.metrics import StageTimer
    from vzero_fast.model import load_policy
    from vzero_fast.rollout import NativeEngine, Request, SamplingParams

    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    requests = [Request.from_image_text(synthetic_figure(i, size=56), "Describe the figure.",
                                        SamplingParams(n=4, max_new_tokens=4, seed=i)) for i in range(2)]

    def reward(outputs):  # a host tensor, as every reward function returns
        return torch.tensor([[float(s.token_ids[0] % 2) for s in o.samples] for o in outputs])

    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    with force_backend("torch"), simulated_device():
        policy.model.to(SIM_DEVICE)
        on_device = dataclasses.replace(policy, device=SIM_DEVICE)
        cfg = PolicyConfig(lr=1e-2, max_response_tokens=4, mini_batches=2, kl_coef=0.01)
        role = Role(name="policy", policy=on_device, cfg=cfg, engine=NativeEngine(on_device))
        role.freeze_reference()
        metrics = {k: unwrap(v).item() for k, v in role.grpo_step(requests, reward, timer=StageTimer()).items()}
        after = {n: unwrap(p.detach()) for n, p in policy.model.named_parameters()}
    assert metrics["groups_kept"] == 2 and metrics["tokens"] == 2 * 4 * 4
    assert metrics["skipped_updates"] == 0 and all(v == v for v in metrics.values())  # no NaN
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_step_metrics_reach_the_host_in_one_read():
    """to_host: ~20 device scalars per step, one device -> host read (one sync on a GPU), not one per value."""
    from vzero_fast.metrics import to_host

    with simulated_device() as sim:
        metrics = {f"m{i}": torch.tensor(i / 4, device=SIM_DEVICE) for i in range(20)}
        out = to_host({**metrics, "host": torch.tensor(2.5), "step": 7})
    assert sim.host_reads == 1
    assert out == {**{f"m{i}": i / 4 for i in range(20)}, "host": 2.5, "step": 7}


# ---------------------------------------------------------------------------------- devices in the source

# Functions that run once per micro-batch or decode step on the compute device: a tensor factory there
# without device= makes a host tensor that later meets device tensors.
HOT_PATHS = {
    "vzero_fast/grpo.py": {"accumulate", "token_logprobs", "response_hidden", "_logprobs"},
    "vzero_fast/rollout.py": {"_run_batch", "lm_head_logits", "apply_repetition_penalty", "suppress_tokens",
                              "top_k_top_p_filter", "sample_from_logits"},
    **{f"kernels/{p.name}": None for p in sorted((REPO / "kernels").glob("*.py"))},  # None: every function
}
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "asarray", "rand", "randn",
             "randint", "randperm", "linspace", "eye", "empty_strided", "scalar_tensor"}


def test_hot_path_factories_name_their_device():
    """Kernels (all but the `*_reference` functions) and the per-step GRPO / rollout functions."""
    missing, seen = [], set()
    for rel, names in HOT_PATHS.items():
        tree = ast.parse((REPO / rel).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if (names is not None and fn.name not in names) or fn.name.endswith("_reference"):
                continue
            seen.add((rel, fn.name))
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch" and not any(k.arg == "device" for k in node.keywords)):
                    missing.append(f"{rel}:{node.lineno} ({fn.name}): torch.{node.func.attr}(...) without device=")
    for rel, names in HOT_PATHS.items():  # a renamed function must not silently leave the scan
        assert names is None or {(rel, n) for n in names} <= seen, (rel, names - {n for r, n in seen if r == rel})
    assert not missing, "\n".join(missing)


# --------------------------------------------------------------------------------- imports and dispatch

def test_kernels_import_from_a_source_checkout(tmp_path):
    """No install at all (the GPU machine's state before the suite installs): the checkout on sys.path, the
    editable finder removed. `vzero_fast.kernels` must still be the checkout's kernels/."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import vzero_fast.kernels as k\n"
        "print(k.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()) == REPO / "kernels" / "__init__.py"


def test_dispatch_tests_hold_without_the_interpreter():
    """On a GPU machine conftest.py leaves TRITON_INTERPRET unset; the dispatch tests must pass there too."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_kernels_logprob.py"), "-k", "dispatch"],
                          cwd=REPO, env=_env(TRITON_INTERPRET="0"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2]


# ----------------------------------------------------------------------------------------- FSDP2 on 2.11

@pytest.mark.slow
def test_fsdp_without_unused_param_reduction(tiny_model_dir):
    """torch 2.11 has no FSDPModule.set_reduce_scatter_unused_params (simulated by removing it): shard_model
    logs it; an image pass still trains on both ranks; a training pass without an image raises at once."""
    worker = Path(__file__).with_name("_fsdp_unused_worker.py")
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run([*launcher, "--standalone", "--nproc_per_node=2", str(worker), str(tiny_model_dir)],
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["image_pass_grad_norm"] > 0
        assert "without an image" in r["text_only_error"]
    assert proc.stderr.count("has no set_reduce_scatter_unused_params") == 2
