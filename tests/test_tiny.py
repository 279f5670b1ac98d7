"""The offline tiny Qwen2.5-VL: deterministic, complete, small, the real architecture, loadable by transformers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vzero_fast.model import chat_prompt, encode_prompts, load_policy
from vzero_fast.tiny import SPECIAL_TOKENS, build_tiny, random_state_dict, tiny_config

pytest_plugins = ["_tiny_fixture"]  # tiny_model_dir, tiny_policy (session-scoped)

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "preprocessor_config.json")


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """A second build with seed 0 and one with seed 1."""
    root = tmp_path_factory.mktemp("rebuilds")
    return build_tiny(root / "seed0", seed=0), build_tiny(root / "seed1", seed=1)


def test_directory_has_every_file(tiny_model_dir):
    missing = [f for f in FILES if not (tiny_model_dir / f).is_file()]
    assert not missing
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_same_seed_same_bytes(tiny_model_dir, rebuilt):
    again, _ = rebuilt
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_different_seed_different_weights_same_tokenizer(tiny_model_dir, rebuilt):
    _, other = rebuilt
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape
        assert not torch.equal(a[name], b[name]), name
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (other / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_small(tiny_policy):
    n = tiny_policy.num_parameters
    assert 500_000 < n < 50_000_000


def test_real_architecture(tiny_policy):
    cfg = tiny_policy.model.config
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.num_key_value_heads < text.num_attention_heads  # GQA as in the 3B/7B
    # Windowed blocks and full-attention blocks both exist, and the window is smaller than an 84x112 image.
    full = list(vision.fullatt_block_indexes)
    assert full and all(0 <= i < vision.depth for i in full) and len(full) < vision.depth
    assert vision.window_size < 112
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert vision.out_hidden_size == text.hidden_size
    assert text.vocab_size >= len(tiny_policy.tokenizer)


def test_weights_round_trip_through_transformers(tiny_model_dir, tiny_policy):
    """transformers' from_pretrained, our load_policy and the in-memory weights give identical logits."""
    config = tiny_config()
    reference = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).eval()
    reference.load_state_dict(random_state_dict(config, seed=0), strict=True)
    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, output_loading_info=True, attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = encode_prompts(tiny_policy, [_image(56, 56, 0), _image(84, 112, 1)], ["Describe the figure.", "Q?"])
    with torch.no_grad():
        logits = [m(**batch).logits for m in (reference, loaded.eval(), tiny_policy.model)]
    assert logits[0].abs().max() > 0.1  # not a degenerate all-zero model
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(logits[1], logits[2])


def test_tied_variant(tmp_path):
    path = build_tiny(tmp_path / "tied", seed=0, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    policy = load_policy(path, dtype="float32", device="cpu")
    assert policy.lm_head_weight is policy.model.get_input_embeddings().weight


def test_tokenizer_round_trip_and_specials(tiny_model_dir, tiny_policy):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["Describe the figure: 3.14 + 27 = 30.14?", "<think>so</think> \\boxed{B}", "A) 1 B) 2 C) 3 D) 4",
             "naïve café 東京 🙂\n\n  tabs\there", ""]
    for text in texts:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.tokenize("12345") == list("12345")  # digits split one by one, as in Qwen2
    # The prompt contract's words are single tokens after "<" (tags) and after a backslash (\boxed).
    for word in ("description", "question", "answer", "think", "boxed"):
        assert len(tok.tokenize(word)) == 1, word
    cfg = tiny_policy.model.config
    expected = {"<|image_pad|>": cfg.image_token_id, "<|video_pad|>": cfg.video_token_id,
                "<|vision_start|>": cfg.vision_start_token_id, "<|vision_end|>": cfg.vision_end_token_id,
                "<|im_end|>": cfg.text_config.eos_token_id}
    for token in SPECIAL_TOKENS:
        ids = tok("x" + token + "y")["input_ids"]
        assert len(ids) == 3 and tok.convert_ids_to_tokens(ids[1]) == token, token
        if token in expected:
            assert ids[1] == expected[token], token
    # Specials follow the learned vocabulary in Qwen's order (151643.. in the real model).
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template_renders_image_placeholder(tiny_policy):
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert chat_prompt(tiny_policy, "How many?") == expected
    assert chat_prompt(tiny_policy.processor, "Hi", system="Be brief.", with_image=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_forward_with_one_small_image_is_cheap(tiny_policy):
    """Cheap by construction, counted in FLOPs rather than timed (a wall-clock bound tests the machine and its
    load): one 56x56 image and a short prompt cost ~70 MFLOP, under a second even at 1 GFLOP/s."""
    batch = encode_prompts(tiny_policy, [_image(56, 56, 0)], ["Describe the figure."])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        logits = tiny_policy.model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], tiny_policy.model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert 0 < counter.get_total_flops() < 1e9, counter.get_total_flops()
