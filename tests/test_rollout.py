"""NativeEngine against independent references on the tiny Qwen2.5-VL (CPU, fp32).

References: transformers' own `model.generate` (greedy), the training forward `forward_hidden` with a float64
log_softmax (log-probs), direct per-element formulas (logits processing), forward hooks (vision tower calls).
"""

import copy
import dataclasses
import logging
import warnings

import pytest
import torch
from _engine_ref import forward_logprob_gap
from transformers import GenerationConfig

from vzero_fast.data import synthetic_figure
from vzero_fast.model import encode_prompts
from vzero_fast.rollout import (
    NativeEngine,
    Request,
    RolloutEngine,
    SamplingParams,
    apply_repetition_penalty,
    make_engine,
    suppress_tokens,
    top_k_top_p_filter,
)

pytest_plugins = ["_tiny_fixture"]  # tiny_model_dir, tiny_policy (session-scoped)

LOGPROB_TOL = 1e-4  # fp32 cached decode vs fp32 full forward, compared in float64
TEXTS = ("Describe the figure.", "How many bars are there in the chart? Answer with a number.")
SIZES = (56, 112)  # 4 and 16 image tokens: different prompt lengths, so the batch is left-padded


@pytest.fixture(scope="module")
def images():
    return [synthetic_figure(i, size=s) for i, s in enumerate(SIZES)]


@pytest.fixture(scope="module")
def engine(tiny_policy):
    return NativeEngine(tiny_policy, seed=0)


def _requests(images, **params):
    return [Request.from_image_text(im, t, SamplingParams(**params), request_id=i)
            for i, (im, t) in enumerate(zip(images, TEXTS[:len(images)], strict=True))]


def _hf_greedy(policy, images, max_new_tokens, **extra):
    batch = encode_prompts(policy, images, list(TEXTS[:len(images)]))
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=policy.eos_token_id,
                           pad_token_id=policy.pad_token_id, suppress_tokens=policy.vision_token_ids, **extra)
    with torch.no_grad():
        out = policy.model.generate(**batch, generation_config=cfg)
    return out[:, batch["input_ids"].shape[1]:]  # [B, new]


def _assert_prefix_then_pad(ours, ref, pad):
    n = len(ours)
    assert ours.tolist() == ref[:n].tolist()
    assert (ref[n:] == pad).all()


def _policy_with_lm_head(policy, edit):
    """A deep copy of the policy whose lm_head weight [V, H] is edited in place by `edit`."""
    model = copy.deepcopy(policy.model)
    with torch.no_grad():
        edit(model.get_output_embeddings().weight)
    return dataclasses.replace(policy, model=model)


# ------------------------------------------------------------------------------------------- correctness


def test_greedy_equals_hf_generate_left_padded(tiny_policy, engine, images):
    ref = _hf_greedy(tiny_policy, images, 12)
    outs = engine.generate(_requests(images, n=2, temperature=0, max_new_tokens=12))
    assert [o.request.request_id for o in outs] == [0, 1]
    for o, r in zip(outs, ref, strict=True):
        assert len(o.samples) == 2
        for s in o.samples:
            _assert_prefix_then_pad(s.token_ids, r, tiny_policy.pad_token_id)
            assert s.token_ids.dtype == torch.long and s.logprobs.dtype == torch.float32
            assert s.text == tiny_policy.tokenizer.decode(s.token_ids.tolist(), skip_special_tokens=True)


def test_logprobs_equal_training_forward(tiny_policy, engine, images):
    temperature = 0.7
    reqs = [Request.from_image_text(im, t, SamplingParams(n=3, temperature=temperature, max_new_tokens=m, seed=5))
            for im, t, m in zip(images, TEXTS, (4, 11), strict=True)]  # ragged: the first 3 rows finish early (compaction)
    outs = engine.generate(reqs)
    gap = forward_logprob_gap(tiny_policy, outs, temperature)
    print(f"logprob_diff (native decode vs training forward, fp32): {gap:.2e}")
    assert [len(s.token_ids) for o in outs for s in o.samples] == [4] * 3 + [11] * 3
    assert gap < LOGPROB_TOL


def test_image_encoded_once_per_prompt(tiny_policy, engine, images):
    calls = []
    handle = tiny_policy.model.model.visual.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["grid_thw"].shape[0]), with_kwargs=True)
    try:
        outs = engine.generate(_requests(images, n=4, temperature=1.0, max_new_tokens=3))
    finally:
        handle.remove()
    assert calls == [len(images)]  # one vision-tower call over the 2 images, not 2 x 4
    assert [len(o.samples) for o in outs] == [4, 4]
    for o, im in zip(outs, images, strict=True):  # each output carries its own image's inputs
        assert o.image_grid_thw.tolist() == [[1, im.height // 14, im.width // 14]]
        assert o.pixel_values.shape[0] == o.image_grid_thw.prod()
        assert int(o.mm_token_type_ids.sum()) == o.image_grid_thw.prod() // 4 == (o.prompt_ids ==
                                                                                 tiny_policy.image_token_id).sum()


def test_no_deprecated_model_arguments(engine, images):
    """The engine calls the model with the installed transformers' argument names: no deprecation warning
    (>= 5.24 takes the KV cache as `cache=`, and `past_key_values=` warns; rollout.py `_cache_kwarg`). That
    the cache is really used is what the greedy and log-prob tests above check."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.generate(_requests(images, n=2, temperature=1.0, max_new_tokens=3))
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecated, deprecated


def test_batches_follow_token_budget_and_mode_restored(tiny_policy, images):
    one = NativeEngine(tiny_policy).generate(_requests(images, temperature=0, max_new_tokens=6))
    policy = _policy_with_lm_head(tiny_policy, lambda w: None)  # a copy: the shared policy stays in eval
    policy.model.train()
    small = NativeEngine(policy, max_batch_tokens=60)  # 2 rows x (prompts of 30-50 + 6) > 60: 2 batches
    modes = []
    handle = policy.model.model.language_model.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    split = small.generate(_requests(images, temperature=0, max_new_tokens=6))
    handle.remove()
    assert modes and not any(modes) and policy.model.training  # sampled in eval mode, train mode restored
    assert small.stats.batches == 2
    assert [o.samples[0].token_ids.tolist() for o in split] == [o.samples[0].token_ids.tolist() for o in one]


def test_text_only_and_multi_image_requests(tiny_policy, engine, images):
    reqs = [Request(messages=[{"role": "user", "content": "Count to three."}],
                    params=SamplingParams(n=2, temperature=0, max_new_tokens=5)),
            Request(messages=[{"role": "user", "content": [
                {"type": "image", "image": images[0]}, {"type": "text", "text": "and"},
                {"type": "image", "image": images[1]}, {"type": "text", "text": "Compare them."}]}],
                params=SamplingParams(n=1, temperature=0, max_new_tokens=5))]
    outs = engine.generate(reqs)
    assert outs[0].pixel_values is None and outs[0].image_grid_thw is None
    assert outs[1].image_grid_thw.shape == (2, 3) and outs[1].pixel_values.shape[0] == 16 + 64
    # The text-only prompt decoded alongside a two-image one equals HF greedy on it alone.
    batch = {k: v for k, v in tiny_policy.processor(text=[tiny_policy.processor.apply_chat_template(
        reqs[0].messages)]).items()}
    cfg = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=tiny_policy.eos_token_id,
                           pad_token_id=tiny_policy.pad_token_id, suppress_tokens=tiny_policy.vision_token_ids)
    with torch.no_grad():
        ref = tiny_policy.model.generate(**batch, generation_config=cfg)[0, batch["input_ids"].shape[1]:]
    for s in outs[0].samples:
        _assert_prefix_then_pad(s.token_ids, ref, tiny_policy.pad_token_id)


# ------------------------------------------------------------------------------------- stopping rules


def test_eos_stop_and_length(tiny_policy, images):
    ref = _hf_greedy(tiny_policy, images, 12)[1]  # greedy response of the second prompt
    # A copy whose eos row is 2x the row of a token greedy picks at step k: eos wins at step k or earlier.
    k = next(i for i in range(2, 12) if ref[i] not in ref[:i])
    eos = tiny_policy.eos_token_id
    policy = _policy_with_lm_head(tiny_policy, lambda w: w[eos].copy_(2 * w[ref[k]]))
    text = tiny_policy.tokenizer.decode(ref.tolist(), skip_special_tokens=True)
    stop = tiny_policy.tokenizer.decode(ref[2:4].tolist())  # a stop string in the middle of the text
    first = next(j for j in range(len(ref)) if stop in tiny_policy.tokenizer.decode(ref[:j + 1].tolist()))
    greedy = {"temperature": 0, "max_new_tokens": 12}
    reqs = [Request.from_image_text(images[1], TEXTS[1], SamplingParams(**greedy)),
            Request.from_image_text(images[1], TEXTS[1], SamplingParams(**{**greedy, "max_new_tokens": 3})),
            Request.from_image_text(images[1], TEXTS[1], SamplingParams(**greedy, stop=("never", stop)))]
    out_eos = NativeEngine(policy).generate(reqs[:1])[0].samples[0]
    out_len, out_stop = (o.samples[0] for o in NativeEngine(tiny_policy).generate(reqs[1:]))

    assert out_eos.finish_reason == "eos" and out_eos.token_ids[-1] == eos and len(out_eos.token_ids) <= k + 1
    assert out_eos.token_ids[:-1].tolist() == ref[:len(out_eos.token_ids) - 1].tolist()
    assert len(out_eos.logprobs) == len(out_eos.token_ids)
    assert out_len.finish_reason == "length" and out_len.token_ids.tolist() == ref[:3].tolist()
    assert out_stop.finish_reason == "stop"
    assert out_stop.token_ids.tolist() == ref[:first + 1].tolist()  # up to the token completing the stop
    assert out_stop.text == text[:text.find(stop)] and stop not in out_stop.text
    # ignore_eos (mixed in a batch with a normal request): that row runs to its length, eos never sampled,
    # and it follows the eos-banned greedy path, while its batch-mate still stops at eos.
    mixed = [reqs[0], Request.from_image_text(images[1], TEXTS[1], SamplingParams(**greedy, ignore_eos=True))]
    stops_at_eos, runs_on = (o.samples[0] for o in NativeEngine(policy).generate(mixed))
    assert stops_at_eos.finish_reason == "eos"
    assert runs_on.finish_reason == "length" and len(runs_on.token_ids) == 12 and eos not in runs_on.token_ids
    assert runs_on.token_ids[:len(out_eos.token_ids) - 1].tolist() == out_eos.token_ids[:-1].tolist()


def test_vision_tokens_never_sampled(tiny_policy):
    vision = tiny_policy.vision_token_ids
    h = tiny_policy.hidden_size

    def favour_vision(w):  # logits: +-1000 * h[0] on two vision tokens, 0 elsewhere
        w.zero_()
        w[vision[0], 0], w[vision[1], 0] = 1000.0, -1000.0

    policy = _policy_with_lm_head(tiny_policy, favour_vision)
    assert tiny_policy.lm_head_weight.abs().sum() > 0 and h > 1  # the shared policy is untouched
    reqs = [Request.from_image_text(synthetic_figure(7, size=56), TEXTS[0],
                                    SamplingParams(n=8, temperature=1.0, max_new_tokens=8, seed=1))]
    samples = NativeEngine(policy).generate(reqs)[0].samples
    ids = torch.cat([s.token_ids for s in samples])
    assert not torch.isin(ids, torch.tensor(vision)).any()
    # The raw distribution puts ~all mass on the vision tokens, so without suppression they would appear.
    assert torch.cat([s.logprobs for s in samples]).max() < -50


def test_suppress_tokens_unit():
    logits = torch.randn(3, 17)
    out = suppress_tokens(logits.clone(), torch.tensor([2, 16]))
    assert torch.isneginf(out[:, [2, 16]]).all()
    keep = [i for i in range(17) if i not in (2, 16)]
    assert torch.equal(out[:, keep], logits[:, keep])


# --------------------------------------------------------------------------------- logits processing


def test_repetition_penalty_against_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 23, generator=g) * 3  # both signs
    seen = torch.rand(4, 23, generator=g) < 0.4
    penalty = torch.tensor([1.0, 1.3, 0.7, 2.0])
    out = apply_repetition_penalty(logits, seen, penalty)
    for r in range(4):
        for v in range(23):
            x, p = logits[r, v].item(), penalty[r].item()
            want = (x * p if x < 0 else x / p) if seen[r, v] else x
            assert out[r, v].item() == pytest.approx(want, rel=1e-6)


def test_top_k_top_p_against_formula():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 31, generator=g) * 2
    top_k = torch.tensor([0, 1, 4, 0, 7])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.3])
    out = top_k_top_p_filter(logits.clone(), top_k, top_p, max_k=7, any_top_p=True)
    for r in range(5):
        kept = set(range(31))
        if top_k[r] > 0:
            kept = set(logits[r].argsort(descending=True)[: int(top_k[r])].tolist())
        probs = torch.full((31,), float("-inf"))
        probs[list(kept)] = logits[r, list(kept)]
        probs = probs.double().softmax(-1)
        order = probs.argsort(descending=True).tolist()
        nucleus, mass = set(), 0.0
        for v in order:  # smallest set whose mass reaches top_p
            if v in kept and (mass < top_p[r].item() or not nucleus):
                nucleus.add(v)
                mass += probs[v].item()
        got = set(torch.isfinite(out[r]).nonzero()[:, 0].tolist())
        assert got == nucleus, r


def test_top_k_one_and_tiny_top_p_equal_greedy(engine, images):
    greedy = engine.generate(_requests(images, temperature=0, max_new_tokens=8))
    for params in ({"top_k": 1}, {"top_p": 1e-6}):
        outs = engine.generate(_requests(images, n=2, temperature=1.0, max_new_tokens=8, seed=3, **params))
        for o, g in zip(outs, greedy, strict=True):
            for s in o.samples:
                assert s.token_ids.tolist() == g.samples[0].token_ids.tolist()
                torch.testing.assert_close(s.logprobs, g.samples[0].logprobs)  # both T = 1


def test_repetition_penalty_equals_hf_and_covers_the_prompt(tiny_policy, images):
    # A copy that, unpenalised, answers with a prompt word first: its lm_head row is 1.5x the row of the
    # token greedy picks first. A penalty of 2 over prompt + response turns that word down (1.5 / 2 < 1).
    first = _hf_greedy(tiny_policy, images[:1], 1)[0, 0]
    prompt = encode_prompts(tiny_policy, images[:1], list(TEXTS[:1]))["input_ids"][0].tolist()
    word = next(t for t in reversed(prompt) if t not in tiny_policy.tokenizer.all_special_ids and t != first)
    policy = _policy_with_lm_head(tiny_policy, lambda w: w[word].copy_(1.5 * w[first]))
    engine = NativeEngine(policy)
    plain = engine.generate(_requests(images[:1], temperature=0, max_new_tokens=1))[0].samples[0]
    assert plain.token_ids.tolist() == [word]
    ref = _hf_greedy(policy, images[:1], 12, repetition_penalty=2.0)[0]  # one prompt: no padding
    out = engine.generate(_requests(images[:1], temperature=0, max_new_tokens=12, repetition_penalty=2.0))
    _assert_prefix_then_pad(out[0].samples[0].token_ids, ref, tiny_policy.pad_token_id)
    assert ref[0] != word


# ------------------------------------------------------------------------ determinism, stats, factory


def test_deterministic_per_seed(tiny_policy, engine, images):
    def run(seed, eng=engine):
        outs = eng.generate(_requests(images, n=2, temperature=1.0, max_new_tokens=6, seed=seed))
        return [s.token_ids.tolist() for o in outs for s in o.samples]

    assert run(1) == run(1)
    assert run(1) != run(2)
    fresh = [run(None, NativeEngine(tiny_policy, seed=9)) for _ in range(2)]
    assert fresh[0] == fresh[1]  # no request seed: the engine's seed decides
    eng = NativeEngine(tiny_policy, seed=9)
    first, second = run(None, eng), run(None, eng)
    assert first == fresh[0] and second != first  # the engine's seed stream moves on between calls


def test_stats_and_log(engine, images, caplog):
    with caplog.at_level(logging.DEBUG, logger="vzero_fast.rollout"):  # one line per call: DEBUG, not INFO
        outs = engine.generate(_requests(images, n=3, temperature=1.0, max_new_tokens=5, seed=0))
    st = engine.stats
    assert st.generated_tokens == sum(len(s.token_ids) for o in outs for s in o.samples)
    assert st.sequences == 6 and st.requests == 2 and st.batches == 1
    assert st.tokens_per_s > 0 and st.prefill_seconds > 0 and st.decode_seconds > 0
    assert st.as_dict()["tokens_per_s"] == st.tokens_per_s and st.as_dict()["generated_tokens"] == st.generated_tokens
    assert [r.levelno for r in caplog.records if "generated tokens/s" in r.getMessage()] == [logging.DEBUG]


def test_factory_and_hooks(tiny_policy, images):
    """The native engine samples from the policy's own weights: after sleep, a sync and wake it draws exactly
    what it drew before (nothing was copied, freed or reseeded), and it follows the policy it is synced to."""
    eng = make_engine(tiny_policy, "native")
    assert isinstance(eng, RolloutEngine) and eng.name == "native" and eng.policy is tiny_policy
    reqs = _requests(images, n=2, temperature=1.0, max_new_tokens=4, seed=3)
    before = [s.token_ids.tolist() for o in eng.generate(reqs) for s in o.samples]
    eng.sleep()
    eng.sync_weights(tiny_policy)
    eng.wake()
    assert [s.token_ids.tolist() for o in eng.generate(reqs) for s in o.samples] == before
    assert eng.generate([]) == []
    other = object()
    eng.sync_weights(other)
    assert eng.policy is other
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_engine(tiny_policy, "sglang")


def test_sampling_params_validation():
    for bad in ({"n": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"max_new_tokens": 0},
                {"repetition_penalty": 0}, {"stop": "abc"}, {"stop": ("",)}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
