"""vzero_fast.model: the training forward against transformers' logits, padding invariance, directory errors,
generation (greedy vs an argmax loop, seeds, suppressed vision tokens) and settings resolution.

Log-probs are compared in float64 (the model runs in fp32) with one tolerance, ATOL.
"""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vzero_fast.model import (
    ModelDirError,
    check_model_dir,
    encode_prompts,
    forward_hidden,
    generate,
    generate_ids,
    load_policy,
    load_processor,
    mm_token_types,
    pick_attn_implementation,
    resolve_device,
    resolve_dtype,
)

pytest_plugins = ["_tiny_fixture"]  # tiny_model_dir, tiny_policy (session-scoped)

ATOL = 1e-5  # fp32 model vs fp32 model, log-probs compared in float64


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [_image(56, 56, 0), _image(84, 112, 1)]  # 2x2 and 3x4 merged tokens: 4 and 12 image tokens
TEXTS = ["Describe the figure.", "How many circles are there? A) 1 B) 2 C) 3 D) 4"]


def _training_batch(policy, response_lengths=(7, 3), seed=0):
    """Left-padded prompts + right-padded random responses (no special ids), as a GRPO micro-batch."""
    batch = encode_prompts(policy, IMAGES, TEXTS)
    gen = torch.Generator().manual_seed(seed)
    n_text = min(policy.vision_token_ids) - 20  # ordinary BPE tokens only
    r = max(response_lengths)
    response = torch.randint(0, n_text, (len(TEXTS), r), generator=gen)  # [B, R]
    response_mask = (torch.arange(r)[None] < torch.tensor(response_lengths)[:, None]).long()  # [B, R]
    response = response.masked_fill(response_mask == 0, policy.pad_token_id)
    return dict(
        input_ids=torch.cat([batch["input_ids"], response], 1),
        attention_mask=torch.cat([batch["attention_mask"], response_mask], 1),
        mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(response)], 1),
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
    )


def _logprobs(hidden, weight):
    return torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)  # [B, T, V]


# ----------------------------------------------------------------------------- the training forward

def test_encode_prompts_layout(tiny_policy):
    batch = encode_prompts(tiny_policy, IMAGES, TEXTS)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]  # 56/14, 84/14 x 112/14 patches
    assert batch["pixel_values"].shape == (16 + 48, 3 * 2 * 14 * 14)
    image_tokens = (batch["input_ids"] == tiny_policy.image_token_id).sum(1)
    assert image_tokens.tolist() == [4, 12]  # t*h*w / merge^2
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == tiny_policy.image_token_id).long())
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask.all()  # left padding: every row ends with a real token
    short = int(mask.sum(1).argmin())
    assert (batch["input_ids"][short][mask[short] == 0] == tiny_policy.pad_token_id).all()


def test_logprobs_match_transformers_logits(tiny_policy):
    """forward_hidden @ lm_head.T equals transformers' own logits, two image sizes, padded on both sides."""
    batch = _training_batch(tiny_policy)
    with torch.no_grad():
        ours = _logprobs(forward_hidden(tiny_policy, **batch), tiny_policy.lm_head_weight)
        ref = torch.log_softmax(tiny_policy.model(**batch).logits.double(), dim=-1)
    valid = batch["attention_mask"].bool()
    assert (~valid).any(dim=1).all()  # both rows padded
    torch.testing.assert_close(ours[valid], ref[valid], rtol=0, atol=ATOL)


def test_padding_does_not_change_hidden_states(tiny_policy):
    """Each row of the padded batch equals the same row run alone without padding."""
    batch = _training_batch(tiny_policy)
    with torch.no_grad():
        together = forward_hidden(tiny_policy, **batch)  # [B, T, H]
        patches = batch["image_grid_thw"].prod(-1).tolist()
        pixel_rows = torch.split(batch["pixel_values"], patches)
        for i in range(len(TEXTS)):
            keep = batch["attention_mask"][i].bool()
            alone = forward_hidden(
                tiny_policy, input_ids=batch["input_ids"][i, keep][None],
                attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                pixel_values=pixel_rows[i], image_grid_thw=batch["image_grid_thw"][i:i + 1],
                mm_token_type_ids=batch["mm_token_type_ids"][i, keep][None])
            torch.testing.assert_close(together[i, keep], alone[0], rtol=0, atol=ATOL)


def test_mrope_positions_matter(tiny_policy):
    """Without mm_token_type_ids transformers silently uses 1D positions: the hidden states differ, so the
    two tests above can fail. forward_hidden derives the types itself when they are not given."""
    batch = _training_batch(tiny_policy)
    no_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = forward_hidden(tiny_policy, **batch)
        derived = forward_hidden(tiny_policy, **no_types)
        one_d = tiny_policy.model.base_model(**no_types, use_cache=False).last_hidden_state
    assert torch.equal(derived, ours)
    assert (one_d - ours)[valid].abs().max() > 100 * ATOL
    assert torch.equal(mm_token_types(batch["input_ids"], tiny_policy.image_token_id), batch["mm_token_type_ids"])


def test_forward_hidden_backward_reaches_vision_and_text(tiny_model_dir):
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu")  # own copy: gradients are written
    batch = _training_batch(policy)
    hidden = forward_hidden(policy, **batch)  # [B, T, H]
    logits = hidden @ policy.lm_head_weight.T  # [B, T, V]
    logits.logsumexp(-1)[batch["attention_mask"].bool()].sum().backward()
    grads = dict(policy.model.named_parameters())
    assert grads["model.visual.patch_embed.proj.weight"].grad.abs().sum() > 0
    assert grads["model.language_model.layers.0.self_attn.q_proj.weight"].grad.abs().sum() > 0


# ----------------------------------------------------------------------------- model directory errors

def _broken_copy(src, dst, remove=(), write=None):
    shutil.copytree(src, dst)
    for name in remove:
        (dst / name).unlink()
    for name, text in (write or {}).items():
        (dst / name).write_text(text)
    return dst


@pytest.mark.parametrize(("remove", "write", "needle"), [
    (("config.json",), None, "config.json"),
    ((), {"config.json": "{not json"}, "config.json"),
    ((), {"config.json": json.dumps({"model_type": "llama"})}, "model_type"),
    (("model.safetensors",), None, "safetensors"),
    (("tokenizer.json",), None, "tokenizer"),
    (("preprocessor_config.json",), None, "preprocessor_config.json"),
])
def test_broken_model_dir_errors_name_the_file(tiny_model_dir, tmp_path, remove, write, needle):
    path = _broken_copy(tiny_model_dir, tmp_path / "m", remove, write)
    with pytest.raises(ModelDirError, match=needle):
        check_model_dir(path)
    with pytest.raises(ModelDirError, match=needle):
        load_policy(path)


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist"):  # ModelDirError is both
        check_model_dir(tmp_path / "nope")


def test_tokenizer_config_disagreement_is_an_error(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["image_token_id"] += 1
    path = _broken_copy(tiny_model_dir, tmp_path / "m", write={"config.json": json.dumps(config)})
    with pytest.raises(ModelDirError, match="image_token_id"):
        load_processor(path)


def test_check_model_dir_accepts_the_tiny_model(tiny_model_dir):
    assert check_model_dir(str(tiny_model_dir)) == tiny_model_dir


# ----------------------------------------------------------------------------- generation

def _argmax_loop(policy, batch, n, suppress):
    """Greedy decoding by full recomputation with forward_hidden (no KV cache, no transformers generate)."""
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    out = []
    for _ in range(n):
        h = forward_hidden(policy, input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        logits = h[:, -1] @ policy.lm_head_weight.T  # [B, V]
        logits[:, suppress] = -float("inf")
        nxt = logits.argmax(-1).masked_fill(done, policy.pad_token_id)  # [B]
        out.append(nxt)
        done |= nxt == policy.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        types = torch.cat([types, torch.zeros_like(nxt)[:, None]], 1)
        if done.all():
            break
    return torch.stack(out, 1)


def test_greedy_generation_equals_argmax_loop(tiny_policy):
    """Also shows the checkpoint's generation_config.json (repetition_penalty 1.05, top_k 1) is not applied."""
    batch, new = generate_ids(tiny_policy, IMAGES, TEXTS, max_new_tokens=12, temperature=0)
    with torch.no_grad():
        ref = _argmax_loop(tiny_policy, batch, 12, tiny_policy.vision_token_ids)
    assert torch.equal(new, ref)


def test_generate_strings_deterministic_per_seed(tiny_policy):
    rng_before = torch.get_rng_state()
    a = generate(tiny_policy, IMAGES, TEXTS, max_new_tokens=16, seed=3)
    b = generate(tiny_policy, IMAGES, TEXTS, max_new_tokens=16, seed=3)
    c = generate(tiny_policy, IMAGES, TEXTS, max_new_tokens=16, seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert isinstance(a, list) and len(a) == 2 and all(isinstance(s, str) for s in a)
    assert a == b and a != c


def test_vision_tokens_are_never_generated(tiny_model_dir):
    """Make the vision tokens the model's favourite next tokens; generation must still avoid them."""
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu")
    vision = policy.vision_token_ids
    assert {policy.image_token_id, policy.config.video_token_id, policy.config.vision_start_token_id,
            policy.config.vision_end_token_id} <= set(vision)
    batch = encode_prompts(policy, IMAGES, TEXTS)
    with torch.no_grad():
        h = forward_hidden(policy, **batch)[:, -1]  # [B, H] last prompt position
        w = policy.lm_head_weight
        top = (h @ w.T).max()
        # u has a positive dot product with every row's hidden state (sum of unit vectors).
        u = (h / h.norm(dim=-1, keepdim=True)).sum(0)
        w[vision] = u * (top.abs() + 10) / (h @ u).min()
        assert set((h @ w.T).argmax(-1).tolist()) <= set(vision)
        # Control: transformers' generate without suppression picks them.
        control = policy.model.generate(**batch, max_new_tokens=1, do_sample=False)[:, -1]
        assert set(control.tolist()) <= set(vision)
    for seed in range(3):
        _, new = generate_ids(policy, IMAGES, TEXTS, max_new_tokens=8, seed=seed, temperature=1.5)
        assert not torch.isin(new, torch.tensor(vision)).any()
    _, new = generate_ids(policy, IMAGES, TEXTS, max_new_tokens=8, temperature=0)
    assert not torch.isin(new, torch.tensor(vision)).any()


# ----------------------------------------------------------------------------- settings

def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cuda) == torch.float16
    assert resolve_dtype("float32", cuda) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8", cpu)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            resolve_device("cuda")


def test_pick_attn_implementation(caplog):
    assert pick_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert pick_attn_implementation("sdpa", "cpu") == "sdpa"
    assert pick_attn_implementation("flash_attention_2", "cuda") == "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        pick_attn_implementation("flash3", "cpu")
    with caplog.at_level(logging.INFO, logger="vzero_fast.model"):
        pick_attn_implementation("eager", torch.device("meta"))
        pick_attn_implementation("eager", torch.device("meta"))
    assert [r.getMessage() for r in caplog.records].count(
        "attention backend: eager (requested eager, device meta)") == 1


def test_policy_properties(tiny_policy, tiny_model_dir):
    p = tiny_policy
    assert p.path == tiny_model_dir
    assert p.lm_head_weight.shape == (p.config.text_config.vocab_size, p.hidden_size)
    assert p.lm_head_weight is p.model.lm_head.weight
    assert p.eos_token_id == p.tokenizer.convert_tokens_to_ids("<|im_end|>") == p.config.text_config.eos_token_id
    assert p.pad_token_id == p.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert p.image_token_id == p.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert p.eos_token_id not in p.vision_token_ids and len(p.vision_token_ids) == 5
    assert p.device == torch.device("cpu") and p.dtype == torch.float32
