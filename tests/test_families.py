"""The three model families (Qwen2.5-VL, Qwen3-VL, Qwen3.5) against transformers itself, per family (CPU, fp32).

References: transformers' own class of each family loading `make-tiny`'s checkpoint (weights, logits,
`generate`), float64 log_softmax of its logits; the engine's sampling log-probs against the training forward.
Qwen3.5 decodes with recurrent + convolution state besides the KV cache: batching, expansion to n samples and
compaction must leave each request's samples exactly as when it runs alone.
"""

import hashlib
import warnings

import pytest
import torch
from _engine_ref import forward_logprob_gap
from safetensors.torch import load_file

from vzero_fast.data import open_images, synthetic_figure
from vzero_fast.kernels import fused_linear_logprob
from vzero_fast.model import encode_prompts, forward_hidden, image_factor, load_policy, model_class
from vzero_fast.rollout import NativeEngine, Request, SamplingParams
from vzero_fast.tiny import FAMILIES, build_tiny

ATOL = 1e-5  # fp32 model vs fp32 model, compared in float64 (the bound)
TEXTS = ("Describe the figure.", "How many bars are there in the chart? Answer with a number.")

_dirs: dict = {}
_policies: dict = {}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory):
    if family not in _dirs:
        _dirs[family] = build_tiny(tmp_path_factory.mktemp(f"tiny_{family}"), seed=0, family=family)
    return _dirs[family]


@pytest.fixture(scope="module")
def policy(family, model_dir):
    if family not in _policies:
        _policies[family] = load_policy(model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    return _policies[family]


def _images(policy):
    """Two synthetic figures of different sizes and shapes, in whole image tokens of the family."""
    f = policy.processor.factor
    return [synthetic_figure(0, size=2 * f), synthetic_figure(3, size=4 * f).resize((4 * f, 3 * f))]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ the checkpoint

def test_make_tiny_byte_identical_per_seed(family, model_dir, tmp_path):
    from vzero_fast.cli import main

    assert main(["make-tiny", str(tmp_path / "again"), "--family", family]) == 0
    assert main(["make-tiny", str(tmp_path / "seed1"), "--family", family, "--seed", "1"]) == 0
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert _sha(model_dir / name) == _sha(tmp_path / "again" / name), name
    assert _sha(model_dir / "model.safetensors") != _sha(tmp_path / "seed1" / "model.safetensors")
    assert _sha(model_dir / "tokenizer.json") == _sha(tmp_path / "seed1" / "tokenizer.json")


def test_transformers_loads_every_tensor(family, model_dir, policy):
    cls = model_class(family)
    assert type(policy.model) is cls and policy.model.config.model_type == family
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    saved = load_file(model_dir / "model.safetensors")
    live = model.state_dict()
    assert set(saved) <= set(live)
    assert all(torch.equal(live[k], v) for k, v in saved.items())
    # What makes the family what it is, present in the loaded model:
    if family == "qwen3_vl":
        assert len(model.model.visual.deepstack_merger_list) == 2
    if family == "qwen3_5":
        assert model.config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]


def test_family_special_tokens_and_image_tokens(family, policy):
    tok = policy.tokenizer
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id
    assert policy.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    if family != "qwen2_5_vl":  # Qwen3's think tags: one token each, kept by decoding
        ids = tok("<think>a</think>", add_special_tokens=False)["input_ids"]
        assert ids[0] == tok.convert_tokens_to_ids("<think>") and ids[-1] == tok.convert_tokens_to_ids("</think>")
        assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>"
    f = policy.processor.factor
    assert f == (28 if family == "qwen2_5_vl" else 32)
    batch = encode_prompts(policy, _images(policy), list(TEXTS))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]  # 2x2 and 3x4 merged tokens
    assert (batch["input_ids"] == policy.image_token_id).sum(1).tolist() == [4, 12]


def test_generation_prompt_that_opens_think_is_trimmed(policy):
    """A template ending the generation prompt with "<think>\n" (Qwen3.5's) renders as one that does not:
    the response writes <think> itself. An empty closed block, or a user turn's own text, is left alone."""
    from vzero_fast.model import chat_prompt

    plain = chat_prompt(policy, "Describe the figure.")
    opening = policy.processor  # the session's processor: its template is restored below
    base = opening.chat_template
    try:
        opening.chat_template = base + "{% if add_generation_prompt %}<think>\n{% endif %}"
        assert chat_prompt(policy, "Describe the figure.") == plain
        opening.chat_template = base + "{% if add_generation_prompt %}<think>\n\n</think>\n\n{% endif %}"
        assert chat_prompt(policy, "Describe the figure.") == plain + "<think>\n\n</think>\n\n"
        messages = [{"role": "user", "content": "<think>\n"}]
        assert policy.processor.apply_chat_template(messages, add_generation_prompt=False).endswith("<think>\n"
                                                                                                   "<|im_end|>\n")
    finally:
        opening.chat_template = base


def test_data_resizes_to_the_family_factor(family, model_dir, policy):
    from vzero_fast.config import DataConfig

    assert image_factor(model_dir) == policy.processor.factor
    cfg = DataConfig(synthetic_images=7, synthetic_size=112, min_pixels=56 * 56, max_pixels=112 * 112)
    source = open_images(cfg, seed=0, factor=image_factor(model_dir))
    for i in range(len(source)):
        w, h = source.load(i).image.size
        assert w % policy.processor.factor == 0 and h % policy.processor.factor == 0, (w, h)
        assert 56 * 56 <= w * h <= 112 * 112
        grid = policy.image_processor([source.load(i).image], return_tensors="pt")["image_grid_thw"][0]
        patch = policy.processor.factor // 2
        assert grid.tolist() == [1, h // patch, w // patch]  # the processor resized nothing


# ------------------------------------------------------------------------------------------ the forward

def test_fused_logprobs_equal_transformers_logits(family, policy):
    """Padded batch of two images of different sizes + right-padded responses: transformers' logits ->
    float64 log_softmax vs our training forward's hidden states -> the fused log-prob kernel."""
    batch = encode_prompts(policy, _images(policy), list(TEXTS))
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 3])
    response = torch.randint(0, min(policy.vision_token_ids) - 20, (2, 7), generator=gen)  # ordinary tokens
    response_mask = (torch.arange(7)[None] < lengths[:, None]).long()
    inputs = dict(input_ids=torch.cat([batch["input_ids"], response.masked_fill(response_mask == 0, 0)], 1),
                  attention_mask=torch.cat([batch["attention_mask"], response_mask], 1),
                  mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(response)], 1),
                  pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    with torch.no_grad():
        logits = policy.model(**inputs).logits  # [B, T, V], transformers' own head
        hidden = forward_hidden(policy, **inputs)  # [B, T, H]
    P = batch["input_ids"].shape[1]
    rows, cols = [], []
    for b in range(2):
        for t in range(P - 1, P - 1 + int(lengths[b])):  # position t predicts token t + 1
            rows.append(b)
            cols.append(t)
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    targets = inputs["input_ids"][rows, cols + 1]
    ref = torch.log_softmax(logits[rows, cols].double(), -1).gather(-1, targets[:, None])[:, 0]
    ours = fused_linear_logprob(hidden[rows, cols], policy.lm_head_weight, targets, temperature=1.0)
    gap = (ours.double() - ref).abs().max().item()
    print(f"{family}: fused log-probs vs transformers' logits, max |diff| {gap:.2e}")
    assert gap <= ATOL


# ------------------------------------------------------------------------------------------ the engine

def test_engine_logprobs_equal_training_forward(family, policy):
    images = _images(policy)
    reqs = [Request.from_image_text(im, t, SamplingParams(n=3, temperature=0.7, max_new_tokens=m, seed=5))
            for im, t, m in zip(images, TEXTS, (4, 11), strict=True)]  # ragged: 3 rows finish early (compaction)
    outs = NativeEngine(policy, seed=0).generate(reqs)
    assert [len(s.token_ids) for o in outs for s in o.samples] == [4] * 3 + [11] * 3
    gap = forward_logprob_gap(policy, outs, 0.7)
    print(f"{family}: logprob_diff (native decode vs training forward) {gap:.2e}")
    assert gap <= ATOL


def test_engine_greedy_equals_generate(family, policy):
    from transformers import GenerationConfig

    images = _images(policy)
    batch = encode_prompts(policy, images, list(TEXTS))  # left-padded, as the engine's prefill
    cfg = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=policy.eos_token_id,
                           pad_token_id=policy.pad_token_id, suppress_tokens=policy.vision_token_ids)
    with torch.no_grad():
        ref = policy.model.generate(**batch, generation_config=cfg)[:, batch["input_ids"].shape[1]:]
    outs = NativeEngine(policy, seed=0).generate(
        [Request.from_image_text(im, t, SamplingParams(n=2, temperature=0, max_new_tokens=12), request_id=i)
         for i, (im, t) in enumerate(zip(images, TEXTS, strict=True))])
    for o, r in zip(outs, ref, strict=True):
        for s in o.samples:
            n = len(s.token_ids)
            assert s.token_ids.tolist() == r[:n].tolist()
            assert (r[n:] == policy.pad_token_id).all()


def test_state_expansion_and_compaction_keep_each_request_alone(family, policy):
    """A request's seeded samples are the same alone (n = 1 row per sample) and inside a left-padded batch
    whose prefill state is expanded to n rows and compacted as rows finish: the KV cache, and for Qwen3.5
    the recurrent and convolution states, follow their rows."""
    images = _images(policy)
    params = [SamplingParams(n=4, temperature=1.0, max_new_tokens=m, seed=11 + i) for i, m in enumerate((3, 10))]
    engine = NativeEngine(policy, seed=0)
    together = engine.generate([Request.from_image_text(im, t, p) for im, t, p in zip(images, TEXTS, params,
                                                                                       strict=True)])
    for im, t, p, out in zip(images, TEXTS, params, together, strict=True):
        alone = engine.generate([Request.from_image_text(im, t, p)])[0]
        for a, b in zip(alone.samples, out.samples, strict=True):
            assert a.token_ids.tolist() == b.token_ids.tolist()
            assert torch.allclose(a.logprobs, b.logprobs, atol=ATOL, rtol=0)
    if family == "qwen3_5":  # the cache really carries linear-attention state
        from transformers import DynamicCache

        cache = DynamicCache(config=policy.model.config)
        kinds = {type(layer).__name__ for layer in cache.layers}
        assert any("Linear" in k for k in kinds), kinds
