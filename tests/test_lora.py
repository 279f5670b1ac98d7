"""vzero_fast/lora.py: LoRA views over one shared frozen base (tiny Qwen2.5-VL, CPU).

References, all independent of the code under test: PEFT's LoraModel (the library whose numerics we claim),
the formula y = x W^T + b + s x A^T B^T written out in float64, a plain model whose weights are W + s B A
(merged here, by hand), and separate engines per adapter. Adapters are made non-trivial (B != 0: a fresh
adapter equals the base, which would make every comparison with the base pass).
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vzero_fast import lora
from vzero_fast.config import ConfigError, LoraConfig, RoleConfig
from vzero_fast.grpo import Role, SampleBatch, collate, token_logprobs
from vzero_fast.model import encode_prompts, forward_hidden, load_policy, model_class
from vzero_fast.rollout import NativeEngine, Request, SamplingParams

pytest_plugins = ["_tiny_fixture"]  # tiny_model_dir, tiny_policy (session-scoped)

ATOL = 1e-5  # fp32 model vs fp32 model, log-probs compared in float64 (as tests/test_model.py)
LANGUAGE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [_image(56, 56, 0), _image(84, 112, 1)]
TEXTS = ["Describe the figure.", "How many circles are there? A) 1 B) 2 C) 3 D) 4"]


def _frozen(path, dtype=torch.float32):
    policy = load_policy(path, dtype=dtype, device="cpu", attn_implementation="sdpa")
    for p in policy.model.parameters():
        p.requires_grad_(False)
    return policy


def _randomize(view, seed: int, std: float = 0.05) -> None:
    """Non-zero B (and a fresh A) so that the adapter changes what the model computes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora.adapter_state(view).items()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)


def _batch(policy, dtype=None):
    batch = encode_prompts(policy, IMAGES, TEXTS)
    if dtype is not None:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


# ------------------------------------------------------------------------------------------ the layer

@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_forward_and_gradients_equal_the_formula(bias):
    """y = x W^T + b + (alpha/r) x A^T B^T, and dx, dA, dB under a random upstream gradient, in float64; odd
    shapes. W and b are frozen (no gradient)."""
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out, r, alpha = 7, 13, 11, 3, 5.0
    base = torch.nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64)
    base.requires_grad_(False)
    layer = lora.LoraLinear(base, rank=r, alpha=alpha, dropout=0.0, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(d_out, r, generator=gen, dtype=torch.float64))
    x = torch.randn(2, n, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, n, d_out, generator=gen, dtype=torch.float64)
    (layer(x) * up).sum().backward()
    got = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())

    W, A, B = base.weight, layer.lora_A.weight.detach().clone().requires_grad_(), \
        layer.lora_B.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = x2 @ W.T + (base.bias if bias else 0) + (alpha / r) * (x2 @ A.T) @ B.T
    (y * up).sum().backward()
    torch.testing.assert_close(layer(x).detach(), y.detach(), rtol=1e-12, atol=1e-12)
    for g, want in zip(got, (x2.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert layer.weight.grad is None


def test_lora_linear_low_precision_base_keeps_fp32_adapters():
    """bf16 base: the adapter is fp32 (PEFT's autocast_adapter_dtype), the output bf16, and equal to PEFT's order
    of operations: (base(x) + s B A x in fp32) rounded once to bf16."""
    gen = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(16, 8, dtype=torch.bfloat16)
    layer = lora.LoraLinear(base, rank=4, alpha=8.0, dropout=0.0, dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(8, 4, generator=gen))
    x = torch.randn(3, 16, generator=gen).to(torch.bfloat16)
    y = layer(x)
    assert layer.lora_A.weight.dtype == torch.float32 and y.dtype == torch.bfloat16
    want = (base(x) + 2.0 * (x.float() @ layer.lora_A.weight.T) @ layer.lora_B.weight.T).to(torch.bfloat16)
    assert torch.equal(y, want)


# ------------------------------------------------------------------------------------------ the views

def test_view_shares_every_base_tensor_and_trains_only_adapters(tiny_model_dir):
    base = _frozen(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    view = lora.attach(base.model, rank=4, alpha=8.0)
    base_params = {id(p) for p in base.model.parameters()}
    base_ptrs = {p.data_ptr() for p in base.model.parameters()}
    for name, p in view.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.data_ptr() not in base_ptrs, name
        else:  # the base's own Parameter object: nothing copied
            assert id(p) in base_params and not p.requires_grad, name
    assert {id(b) for b in view.buffers()} >= {id(b) for b in base.model.buffers()}
    n_adapter = sum(p.numel() for p in lora.adapter_state(view).values())
    # rank 4 on 4 layers x 7 linear layers (128 -> 128/64/64/128, 128 -> 384 x 2, 384 -> 128)
    assert base.model.config.text_config.num_hidden_layers == 4
    assert n_adapter == 4 * 4 * sum(i + o for i, o in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 384),
                                                       (128, 384), (384, 128)])
    # Training the view changes the adapter only; the base is bit-identical.
    batch = _batch(base)
    forward_hidden(view, **batch).square().mean().backward()
    opt = torch.optim.AdamW([p for p in view.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    for n, p in base.model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n


def test_fresh_adapter_is_the_base_and_a_trained_one_is_not(tiny_model_dir):
    base = _frozen(tiny_model_dir)
    view = lora.attach(base.model, rank=4, alpha=8.0, vision=True)
    batch = _batch(base)
    with torch.no_grad():
        h0 = forward_hidden(base, **batch)
        assert torch.equal(forward_hidden(view, **batch), h0)  # B = 0
        _randomize(view, 0)
        assert (forward_hidden(view, **batch) - h0).abs().max() > 1e-2


def test_target_selection(tiny_model_dir, tiny_policy):
    model = tiny_policy.model
    text = lora.target_names(model)
    assert len(text) == 4 * 7 and all(".language_model." in n for n in text)
    assert {n.rsplit(".", 1)[-1] for n in text} == set(LANGUAGE)
    with_vision = lora.target_names(model, vision=True)
    assert set(text) < set(with_vision) and any(".visual." in n for n in with_vision)
    assert "lm_head" not in with_vision  # the fused kernel reads the frozen head
    assert lora.target_names(model, "q_proj, v_proj") == [n for n in text if n.endswith(("q_proj", "v_proj"))]
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora.target_names(model, "qkv")  # a vision-only layer name without vision
    assert any(n.endswith("attn.qkv") for n in lora.target_names(model, "qkv", vision=True))


def test_lora_config_checks():
    assert LoraConfig().rank == 0  # off by default
    for bad in (dict(rank=-1), dict(alpha=0.0), dict(dropout=1.0), dict(target_modules="q_proj,lm_head"),
                dict(target_modules="q_proj,,v_proj")):
        with pytest.raises(ConfigError):
            LoraConfig(**bad)


# ------------------------------------------------------------------------------- against PEFT (library)

@pytest.mark.parametrize("vision", [False, True])
def test_forward_equals_peft(tiny_model_dir, tmp_path, vision):
    """Our view and PEFT's PeftModel (loaded from our saved adapter directory) give the same logits, float64."""
    peft = pytest.importorskip("peft")
    base = _frozen(tiny_model_dir, torch.float64)
    view = lora.attach(base.model, rank=4, alpha=12.0, vision=vision)
    _randomize(view, 1)
    lora.save_adapter(view, tmp_path / "adapter", base_path=tiny_model_dir)
    theirs = peft.PeftModel.from_pretrained(model_class("qwen2_5_vl").from_pretrained(tiny_model_dir,
                                                                                      dtype=torch.float64),
                                            tmp_path / "adapter").eval()
    batch = _batch(base, torch.float64)
    with torch.no_grad():
        ours = forward_hidden(view, **batch) @ base.lm_head_weight.T
        ref = theirs(**batch).logits
        plain = forward_hidden(base, **batch) @ base.lm_head_weight.T
    valid = batch["attention_mask"].bool()
    assert (ref - plain)[valid].abs().max() > 1e-2  # PEFT really applied the adapter
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-10, atol=1e-10)


def test_logprobs_through_the_fused_kernel_equal_peft(tiny_model_dir, tmp_path):
    """The training path (grpo.token_logprobs: gathered hidden rows -> fused lm_head log-prob kernel, frozen
    head) on a view equals log_softmax of PEFT's logits, and its gradient reaches the adapters only."""
    peft = pytest.importorskip("peft")
    base = _frozen(tiny_model_dir)
    view = lora.attach(base.model, rank=8, alpha=16.0, vision=True)
    _randomize(view, 2)
    policy = dataclasses.replace(base, model=view)
    lora.save_adapter(view, tmp_path / "adapter", base_path=tiny_model_dir)
    theirs = peft.PeftModel.from_pretrained(model_class("qwen2_5_vl").from_pretrained(tiny_model_dir),
                                            tmp_path / "adapter").eval()
    enc = encode_prompts(policy, IMAGES, TEXTS, padding_side="right")
    gen = torch.Generator().manual_seed(3)
    prompts = [enc["input_ids"][b][enc["attention_mask"][b].bool()] for b in range(2)]
    responses = [torch.randint(0, 1000, (k,), generator=gen) for k in (6, 3)]
    grids = enc["image_grid_thw"]
    split = grids.prod(-1).tolist()
    pixels = list(enc["pixel_values"].split(split))
    batch = SampleBatch(prompt_ids=prompts, response_ids=responses, prompt_of=[0, 1], pixel_values=pixels,
                        image_grid_thw=[grids[0:1], grids[1:2]], advantages=torch.zeros(2),
                        sample_logprobs=[torch.zeros(len(r)) for r in responses])
    mb = collate(batch, [0, 1], policy, 6)
    logp = token_logprobs(policy, policy.lm_head_weight, mb, 1.0)  # [2, 6]
    with torch.no_grad():
        logits = theirs(**mb.inputs).logits.double()  # [2, T, V], right-padded rows: prompt then response
    ref = torch.zeros(2, 6, dtype=torch.float64)
    for b, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        at = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))  # position p-1 predicts token p
        ref[b, : len(response)] = torch.log_softmax(logits[b, at], -1).gather(-1, response[:, None])[:, 0]
    torch.testing.assert_close(logp.double()[mb.mask], ref[mb.mask], rtol=0, atol=ATOL)
    logp.sum().backward()
    grads = {n: p.grad for n, p in view.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert base.lm_head_weight.grad is None


# ------------------------------------------------------------------------------------ frozen copies

def test_frozen_copy_copies_the_adapter_not_the_base(tiny_model_dir):
    base = _frozen(tiny_model_dir)
    view = lora.attach(base.model, rank=4, alpha=8.0)
    _randomize(view, 3)
    ref = lora.frozen_copy(view)
    batch = _batch(base)
    with torch.no_grad():
        h = forward_hidden(view, **batch)
        assert torch.equal(forward_hidden(ref, **batch), h)
        _randomize(view, 4)  # training the role later must not move its reference
        assert torch.equal(forward_hidden(ref, **batch), h)
    base_ptrs = {p.data_ptr() for p in base.model.parameters()}
    assert all(p.data_ptr() in base_ptrs for n, p in ref.named_parameters() if ".lora_" not in n)
    assert not any(p.requires_grad for p in ref.parameters())


def test_role_optimizer_and_reference_on_a_view(tiny_model_dir):
    base = _frozen(tiny_model_dir)
    policy = dataclasses.replace(base, model=lora.attach(base.model, rank=4, alpha=8.0))
    cfg = RoleConfig(kl_coef=0.01)
    role = Role(name="r", policy=policy, cfg=cfg, engine=NativeEngine(policy))
    adapters = set(map(id, lora.adapter_state(policy.model).values()))
    assert {id(p) for p in role.optimizer.params} == {id(p) for n, p in policy.model.named_parameters()
                                                      if ".lora_" in n}
    assert len(adapters) == len(role.optimizer.params) and role.optimizer.masters is None  # fp32 adapters
    role.freeze_reference()
    assert lora.has_adapters(role.reference) and role.reference is not policy.model


# ------------------------------------------------------------------------------------------ the engine

def test_native_engine_switches_adapters_without_copying_the_base(tiny_model_dir):
    """One engine, two adapters, switched between request batches (`sync_weights` adopts a view): each batch's
    samples equal those of an engine that only ever had that adapter, and no base tensor is copied or moved."""
    base = _frozen(tiny_model_dir)
    views = [lora.attach(base.model, rank=4, alpha=8.0) for _ in range(2)]
    for k, v in enumerate(views):
        _randomize(v, 10 + k, std=0.2)
    a, b = (dataclasses.replace(base, model=v) for v in views)
    ptrs = [p.data_ptr() for p in base.model.parameters()]

    def requests():
        return [Request.from_image_text(im, t, SamplingParams(n=3, max_new_tokens=6, seed=5 + i))
                for i, (im, t) in enumerate(zip(IMAGES, TEXTS, strict=True))]

    def samples(outputs):
        return [(s.token_ids.tolist(), s.logprobs) for o in outputs for s in o.samples]

    shared = NativeEngine(a)
    got_a = samples(shared.generate(requests()))
    shared.sync_weights(b)
    got_b = samples(shared.generate(requests()))
    shared.sync_weights(a)
    got_a2 = samples(shared.generate(requests()))
    for got, pol in ((got_a, a), (got_b, b), (got_a2, a)):
        want = samples(NativeEngine(pol).generate(requests()))
        assert [t for t, _ in got] == [t for t, _ in want]
        for (_, lp), (_, lq) in zip(got, want, strict=True):
            torch.testing.assert_close(lp, lq, rtol=0, atol=1e-6)
    assert [t for t, _ in got_a] != [t for t, _ in got_b]  # the adapters really differ
    assert [p.data_ptr() for p in base.model.parameters()] == ptrs


# ------------------------------------------------------------------------------- checkpoints and export

def test_adapter_directory_is_peft_format_and_round_trips(tiny_model_dir, tmp_path):
    base = _frozen(tiny_model_dir)
    view = lora.attach(base.model, rank=4, alpha=8.0, target_modules="q_proj,v_proj")
    _randomize(view, 5)
    out = lora.save_adapter(view, tmp_path / "a", base_path=tiny_model_dir)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    from safetensors.torch import load_file

    keys = load_file(out / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys) and len(keys) == 4 * 2 * 2
    again = lora.attach_from(base.model, out)  # layers, rank and alpha from the directory
    for n, t in lora.adapter_state(view).items():
        assert torch.equal(lora.adapter_state(again)[n], t), n
    other = lora.attach(base.model, rank=2, alpha=8.0, target_modules="q_proj,v_proj")
    with pytest.raises(ValueError, match="rank 4"):
        lora.load_adapter_into(other, out)
    with pytest.raises(KeyError, match="adapter mismatch"):
        lora.load_adapter_into(lora.attach(base.model, rank=4, alpha=8.0), out)


def test_export_merged_loads_in_transformers_with_equal_logprobs(tiny_model_dir, tmp_path):
    """`vzero-fast export --merge`: transformers loads the merged directory, and its log-probs equal base +
    adapter; the merge equals W + s B A computed here."""
    from vzero_fast.cli import main

    base = _frozen(tiny_model_dir)
    view = lora.attach(base.model, rank=4, alpha=8.0, vision=True)
    _randomize(view, 6)
    lora.save_adapter(view, tmp_path / "adapter", base_path=tiny_model_dir)
    assert main(["export", "--merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = model_class("qwen2_5_vl").from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    name = "model.language_model.layers.1.mlp.down_proj"
    layer = view.get_submodule(name)
    want = base.model.get_submodule(name).weight.double() + 2.0 * (
        layer.lora_B.weight.double() @ layer.lora_A.weight.double())
    torch.testing.assert_close(merged.get_submodule(name).weight.double(), want, rtol=0, atol=1e-6)
    batch = _batch(base)
    with torch.no_grad():
        ours = torch.log_softmax((forward_hidden(view, **batch) @ base.lm_head_weight.T).double(), -1)
        ref = torch.log_softmax(merged(**batch).logits.double(), -1)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], ref[valid], rtol=0, atol=ATOL)


def test_gradient_checkpointing_on_a_view_gives_the_same_adapter_gradients(tiny_model_dir):
    """model.gradient_checkpointing on a view (frozen base: no input requires grad) still reaches every adapter."""
    base = _frozen(tiny_model_dir)
    grads = []
    for checkpointing in (False, True):
        view = lora.attach(base.model, rank=4, alpha=8.0, vision=True)
        _randomize(view, 7)
        if checkpointing:
            view.gradient_checkpointing_enable()
        view.train()
        forward_hidden(view, **_batch(base)).square().mean().backward()
        grads.append({n: p.grad for n, p in view.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(lora.adapter_state(view))
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_forward_equals_peft_other_families(family, tmp_path):
    """Qwen3-VL (DeepStack) and Qwen3.5 (Gated DeltaNet layers' projections are linear layers too): the view
    equals PEFT's model on the same adapter, float64."""
    peft = pytest.importorskip("peft")
    from vzero_fast.tiny import build_tiny

    path = build_tiny(tmp_path / family, seed=0, family=family)
    base = _frozen(path, torch.float64)
    view = lora.attach(base.model, rank=4, alpha=8.0, vision=True)
    _randomize(view, 8)
    lora.save_adapter(view, tmp_path / "adapter", base_path=path)
    theirs = peft.PeftModel.from_pretrained(model_class(family).from_pretrained(path, dtype=torch.float64),
                                            tmp_path / "adapter").eval()
    batch = encode_prompts(base, [_image(64, 64, 2)], ["Describe the figure."])
    batch["pixel_values"] = batch["pixel_values"].to(torch.float64)
    with torch.no_grad():
        ours = forward_hidden(view, **batch) @ base.lm_head_weight.T
        ref = theirs(**batch).logits
        plain = forward_hidden(base, **batch) @ base.lm_head_weight.T
    assert (ref - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
