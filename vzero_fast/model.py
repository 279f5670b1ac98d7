"""Load a Qwen-VL policy (Qwen2.5-VL, Qwen3-VL or Qwen3.5) from a local directory; encode prompts, run the
training forward, sample.

Decisions:
- One interface over three families (`FAMILIES`, keyed by config.json's `model_type`): transformers'
  `Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration` (DeepStack: vision features
  added to the first decoder layers; interleaved M-RoPE) and `Qwen3_5ForConditionalGeneration` (hybrid:
  Gated DeltaNet linear-attention layers with recurrent + convolution state, and gated full attention
  every fourth layer; partial interleaved M-RoPE). In transformers >= 5.17 the three share what this
  project calls: `model.base_model(input_ids, attention_mask, position_ids, pixel_values, image_grid_thw,
  mm_token_type_ids, cache)` returning the final normed hidden states, `base_model.get_rope_index(ids,
  mm_token_type_ids, image_grid_thw=, attention_mask=)` -> [3, B, T] positions, `DynamicCache(config=)`
  (KV layers, and linear-attention layers for Qwen3.5) with `reorder_cache`, and the same vision special
  tokens. Real checkpoints and the tiny ones from vzero_fast/tiny.py load the same way, by class, not
  Auto*. `check_model_dir` names the missing or broken file before transformers gets a chance to fail
  obscurely.
- Qwen3.5's chat template ends the generation prompt with an opened "<think>\n"; every recipe's format
  (V-Zero, Self-Judge, MM-Zero) has the response itself start with "<think>", so `apply_chat_template`
  drops that opening (a template that closes an empty think block is left as it is).
- Images per family: Qwen2.5-VL cuts 14 px patches, the Qwen3 families 16 px; merged 2x2 either way, so
  an image token covers `Processor.factor` = 28 or 32 px, and data.py resizes to multiples of that.
- Our own small `Processor` (tokenizer + image processor + chat template) instead of
  `Qwen2_5_VLProcessor`: without torchvision there is no video processor, and the transformers processor
  refuses `video_processor=None` (its `check_argument_for_proper_class`), as do its save/load. Ours
  expands each `<|image_pad|>` to `t*h*w / merge^2` tokens, exactly what the model's placeholder check
  expects, and builds `mm_token_type_ids` (1 on image tokens).
- The image processor is `Qwen2VLImageProcessorPil` by name: `AutoImageProcessor` raises without
  torchvision in transformers 5.17 and picks the torchvision resize where it exists; by name, the same
  pixels everywhere.
- Special-token ids are always read from the config/tokenizer (the tiny model's differ from the real
  151655 etc.), and `load_processor` fails if the tokenizer and config.json disagree on them.
- `forward_hidden` calls the inner `Qwen2_5_VLModel` (`model.base_model`), so the [B, T, V] logits are
  never built; log-probs come from hidden @ lm_head_weight.T in a streaming kernel. It passes
  `mm_token_type_ids`: transformers 5.17-5.23 compute the 3D M-RoPE positions only when it is given and
  silently fall back to 1D positions otherwise (log-probs then off by ~1e-3). When the caller omits it,
  it is derived from the input ids (image token -> 1, video token -> 2).
- `generate_ids` / `generate` are plain `model.generate` with an explicit GenerationConfig: sampling is defined by our
  arguments only. Qwen ships generation_config.json with repetition_penalty 1.05, top_k 1 and
  temperature 0.1, and transformers fills every unset field from it, so `load_policy` replaces the
  checkpoint's generation config with a neutral one (logged). Vision special tokens are suppressed (a
  sampled <|image_pad|> breaks the next forward: "Image features and image tokens do not match").
  The seed applies inside `torch.random.fork_rng`, leaving the caller's RNG untouched.
- Backend choice (flash_attention_2 vs sdpa) lives in `pick_attn_implementation` and is logged once.

Tests: tests/test_model.py (log-probs vs transformers' own logits in float64, padding invariance,
errors, generation), on the tiny model of tests/_tiny_fixture.py.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("vzero_fast.model")



@dataclass(frozen=True)
class Family:
    """What differs between the supported model families."""

    model_type: str
    """config.json's model_type."""
    name: str
    """For messages: "Qwen2.5-VL"."""
    model_class: str
    """transformers' class that loads a checkpoint of the family."""
    config_class: str
    """Its config class."""


FAMILIES = {f.model_type: f for f in (
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
    Family("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig"),
    Family("qwen3_5", "Qwen3.5", "Qwen3_5ForConditionalGeneration", "Qwen3_5Config"),
)}
"""The supported families by model_type."""


def family(model_type: str) -> Family:
    """The Family of a model_type; ValueError naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}: supported are {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def model_class(model_type: str) -> type:
    """transformers' ...ForConditionalGeneration class of a family."""
    return getattr(importlib.import_module("transformers"), family(model_type).model_class)


def config_class(model_type: str) -> type:
    """transformers' config class of a family."""
    return getattr(importlib.import_module("transformers"), family(model_type).config_class)

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
OPEN_THINK = "<think>\n"
"""How a thinking model's template opens the reasoning block at the end of the generation prompt."""
# Tokens a policy must never emit: a sampled placeholder breaks the next multimodal forward.
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", IMAGE_TOKEN, VIDEO_TOKEN)


class ModelDirError(FileNotFoundError, ValueError):
    """A model directory is missing, incomplete or not a supported checkpoint (the message names the file)."""


# ----------------------------------------------------------------------------- resolution of settings

def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" -> cuda when available else cpu; "cpu", "cuda", "cuda:1" as given (cuda must exist)."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch.cuda.is_available() is False")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on CPU; else "float32" / "bfloat16" / "float16"."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _flash_attn_importable() -> bool:
    try:
        importlib.import_module("flash_attn")
    except Exception:  # an installed but broken build (CUDA/ABI mismatch) raises more than ImportError
        return False
    return True


_logged_attn_choices: set[tuple[str, str, str]] = set()


def pick_attn_implementation(requested: str, device: torch.device | str) -> str:
    """"auto" -> flash_attention_2 where flash_attn imports and the device is CUDA, else sdpa.

    Any other value of ATTN_IMPLEMENTATIONS is returned as given. The choice is logged once.
    """
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {requested!r}")
    device = torch.device(device)
    if requested != "auto":
        choice = requested
    elif device.type == "cuda" and _flash_attn_importable():
        choice = "flash_attention_2"
    else:
        choice = "sdpa"
    key = (requested, choice, device.type)
    if key not in _logged_attn_choices:
        _logged_attn_choices.add(key)
        log.info("attention backend: %s (requested %s, device %s)", choice, requested, device.type)
    return choice


# ----------------------------------------------------------------------------- the model directory

def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"model directory {path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"config.json in {path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ModelDirError(f"config.json in {path} is not a JSON object")
    return config


def check_model_dir(path: str | Path) -> Path:
    """Check that `path` holds a loadable checkpoint of a supported family (FAMILIES); return it, or raise
    ModelDirError naming the missing/broken file (config.json, weights, tokenizer, preprocessor_config.json)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist (or is not a directory)")
    config = _read_config(path)
    if config.get("model_type") not in FAMILIES:
        raise ModelDirError(f"config.json in {path} has model_type {config.get('model_type')!r}, expected one of "
                            + ", ".join(f"{t!r} ({f.name})" for t, f in FAMILIES.items()))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelDirError(f"{index} is not a valid safetensors index: {e}") from e
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelDirError(f"model directory {path} lacks weight shards named in "
                                f"model.safetensors.index.json: {', '.join(missing)}")
    elif not any(path.glob("*.safetensors")):
        raise ModelDirError(f"model directory {path} has no *.safetensors weights "
                            "(model.safetensors or model.safetensors.index.json + shards)")
    if not (path / "tokenizer.json").is_file() and not (
            (path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        raise ModelDirError(f"model directory {path} has no tokenizer files "
                            "(tokenizer.json, or vocab.json + merges.txt)")
    if not (path / "preprocessor_config.json").is_file():
        raise ModelDirError(f"model directory {path} has no preprocessor_config.json (the image processor)")
    return path


def image_factor(path: str | Path) -> int:
    """Pixels per image token along a side for the checkpoint at `path` (patch_size x merge_size of its
    preprocessor_config.json): 28 for Qwen2.5-VL, 32 for the Qwen3 families."""
    pre = Path(path).expanduser() / "preprocessor_config.json"
    try:
        config = json.loads(pre.read_text())
        return int(config.get("patch_size", 14)) * int(config.get("merge_size", 2))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ModelDirError(f"cannot read the patch and merge sizes from {pre}: {e}") from e


# ----------------------------------------------------------------------------- processor

def mm_token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None) -> torch.Tensor:
    """transformers' `mm_token_type_ids`: 0 text, 1 image placeholder, 2 video placeholder. [B, T] int64."""
    types = (input_ids == image_token_id).long()  # [B, T]
    if video_token_id is not None:
        types = types + 2 * (input_ids == video_token_id).long()
    return types


class Processor:
    """Tokenizer + image processor + chat template of one checkpoint; turns (images, texts) into model inputs.

    Each `<|image_pad|>` in a text takes the next image, in order over the batch, and is expanded to
    grid_t * grid_h * grid_w / merge_size**2 placeholder tokens.
    """

    def __init__(self, tokenizer, image_processor, chat_template: str):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token = IMAGE_TOKEN
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        self.video_token_id = self._token_id(VIDEO_TOKEN)
        self.merge_size = int(image_processor.merge_size)
        self.factor = int(image_processor.patch_size) * self.merge_size
        """Pixels per image token along a side: 28 (Qwen2.5-VL) or 32 (Qwen3 families)."""

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ModelDirError(f"the tokenizer has no {token} token")
        return token_id

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The rendered conversation; a generation prompt that opens a think block (Qwen3.5's template ends
        it with "<think>\n") loses that opening: the recipes' formats have the response write it."""
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        if add_generation_prompt and text.endswith(OPEN_THINK):
            text = text[: -len(OPEN_THINK)]
        return text

    def __call__(self, *, text: str | list[str], images: list | None = None,
                 padding_side: str = "left") -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        n_slots = sum(t.count(self.image_token) for t in texts)
        if n_slots != len(images):
            raise ValueError(f"{n_slots} {self.image_token} placeholders in the texts but {len(images)} images")
        out: dict[str, torch.Tensor] = {}
        if images:
            vision = self.image_processor(images, return_tensors="pt")
            grid = vision["image_grid_thw"]  # [N, 3] (t, h, w) in patches
            counts = iter((grid.prod(-1) // self.merge_size**2).tolist())
            texts = ["".join(part if i == 0 else self.image_token * next(counts) + part
                             for i, part in enumerate(t.split(self.image_token))) for t in texts]
            out["pixel_values"] = vision["pixel_values"]  # [sum(t*h*w), 3 * temporal * patch * patch]
            out["image_grid_thw"] = grid
        enc = self.tokenizer(texts, padding=True, padding_side=padding_side, return_tensors="pt",
                             add_special_tokens=False)
        out["input_ids"] = enc["input_ids"]  # [B, T]
        out["attention_mask"] = enc["attention_mask"]  # [B, T]
        out["mm_token_type_ids"] = mm_token_types(enc["input_ids"], self.image_token_id, self.video_token_id)
        return out

    def batch_decode(self, ids, *, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)


def _read_chat_template(path: Path, tokenizer) -> str:
    # transformers 5 writes chat_template.jinja; Qwen's hub repos ship chat_template.json and also put
    # the template in tokenizer_config.json (which the tokenizer has loaded).
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ModelDirError(f"model directory {path} has no chat template (chat_template.jinja, "
                            "chat_template.json, or 'chat_template' in tokenizer_config.json)")
    return template


def load_processor(path: str | Path) -> Processor:
    """The processor of a model directory (no torchvision needed). Fails if tokenizer and config disagree
    on the image/video token ids."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    path = check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The PIL backend by name: AutoImageProcessor needs torchvision in transformers 5.17 (ImportError) and
    # picks a different resize implementation where torchvision exists; this gives the same pixels anywhere.
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    processor = Processor(tokenizer, image_processor, _read_chat_template(path, tokenizer))
    config = _read_config(path)
    for key, token_id in (("image_token_id", processor.image_token_id),
                          ("video_token_id", processor.video_token_id)):
        if key in config and config[key] != token_id:
            raise ModelDirError(f"config.json in {path} has {key} {config[key]} but the tokenizer maps "
                                f"it to {token_id}")
    return processor


# ----------------------------------------------------------------------------- the policy

@dataclass
class Policy:
    """A loaded model with its processor, device and dtype."""

    model: torch.nn.Module
    """transformers' ...ForConditionalGeneration of the checkpoint's family (FAMILIES), or a LoRA view of one (the
    same class over a shared frozen base's tensors, vzero_fast/lora.py)."""
    processor: Processor
    """Tokenizer + image processor + chat template."""
    device: torch.device
    """Where the model lives."""
    dtype: torch.dtype
    """Parameter dtype."""
    attn_implementation: str = "sdpa"
    """The attention backend the model was loaded with."""
    path: Path | None = None
    """The model directory it was loaded from (tokenizer/processor files to copy beside a checkpoint)."""

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def config(self):
        return self.model.config

    @property
    def eos_token_id(self) -> int:
        """End of an assistant turn (<|im_end|> for Qwen Instruct)."""
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.model.config.text_config.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_id

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def vision_token_ids(self) -> list[int]:
        """Ids never to sample: vision start/end/pad, image pad, video pad."""
        ids = {self.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
        cfg = self.model.config
        ids |= {getattr(cfg, k, None) for k in
                ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")}
        return sorted(i for i in ids if i is not None and i != self.tokenizer.unk_token_id)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection, [V, H] (the embedding itself when tied)."""
        return self.model.get_output_embeddings().weight

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_policy(path: str | Path, *, dtype: str | torch.dtype = "auto", attn_implementation: str = "auto",
                device: str | torch.device = "auto", name: str = "") -> Policy:
    """Load a checkpoint directory of any supported family as a Policy (eval mode; callers switch to train());
    `name` says in the log line what it is loaded as (a role, a KL reference, ...)."""
    from transformers import GenerationConfig

    path = check_model_dir(path)
    fam = family(_read_config(path)["model_type"])
    processor = load_processor(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attn = pick_attn_implementation(attn_implementation, device)
    model = model_class(fam.model_type).from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
    model.to(device).eval()
    # Sampling is defined by generate()'s arguments alone (see the module docstring).
    model.generation_config = GenerationConfig(eos_token_id=processor.tokenizer.eos_token_id,
                                               pad_token_id=processor.tokenizer.pad_token_id)
    policy = Policy(model=model, processor=processor, device=device, dtype=torch_dtype, attn_implementation=attn,
                    path=path)
    log.info("loaded %s%s (%s): %.1fM parameters, dtype %s, device %s, attention %s (checkpoint generation "
             "defaults ignored)", f"{name} from " if name else "", path, fam.name, policy.num_parameters / 1e6, str(torch_dtype).removeprefix("torch."),
             device, attn)
    return policy


def _processor_of(processor_or_policy) -> Processor:
    return processor_or_policy.processor if isinstance(processor_or_policy, Policy) else processor_or_policy


def chat_prompt(processor_or_policy, text: str, *, system: str | None = None, with_image: bool = True) -> str:
    """The chat-formatted prompt of one user turn (image first, then `text`) with the assistant header
    appended. `system=None` keeps the template's default system turn."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    content = [{"type": "image"}, {"type": "text", "text": text}] if with_image else text
    messages.append({"role": "user", "content": content})
    return _processor_of(processor_or_policy).apply_chat_template(messages, add_generation_prompt=True)


def encode_prompts(policy: Policy, images: list | None, texts: list[str], *, padding_side: str = "left",
                   system: str | None = None, chat: bool = True) -> dict[str, torch.Tensor]:
    """Tokenize one (image, user text) prompt per row, on the policy's device.

    Returns input_ids [B, T], attention_mask [B, T], mm_token_type_ids [B, T] (1 on image tokens) and,
    with images, pixel_values [N_patches, D] and image_grid_thw [B, 3]. `images=None` gives text-only
    prompts; `chat=False` takes `texts` as finished prompts (with their own <|image_pad|> slots).
    """
    if images is not None and chat and len(images) != len(texts):
        raise ValueError(f"{len(images)} images for {len(texts)} texts (one image per prompt)")
    if chat:
        texts = [chat_prompt(policy, t, system=system, with_image=images is not None) for t in texts]
    batch = policy.processor(text=texts, images=images, padding_side=padding_side)
    return {k: v.to(policy.device) for k, v in batch.items()}


def forward_hidden(policy_or_model, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                   mm_token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normed) hidden states [B, T, H] of the decoder for input_ids [B, T] with their images.

    The lm_head is not applied: logits at position t are hidden[:, t] @ lm_head_weight.T.
    """
    model = policy_or_model.model if isinstance(policy_or_model, Policy) else policy_or_model
    if image_grid_thw is not None and mm_token_type_ids is None:
        mm_token_type_ids = mm_token_types(input_ids, model.config.image_token_id, model.config.video_token_id)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                           image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=False)
    return out.last_hidden_state  # [B, T, H]


@torch.no_grad()
def generate_ids(policy: Policy, images: list | None, texts: list[str], *, max_new_tokens: int = 32,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 system: str | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sample one response per (image, text) prompt; greedy when temperature == 0. Deterministic per seed.

    Returns the encoded prompt batch (encode_prompts, left-padded) and the new tokens [B, N], N <=
    max_new_tokens; a row that ended (eos) early is filled with pad_token_id after its eos.
    """
    from transformers import GenerationConfig

    batch = encode_prompts(policy, images, texts, system=system)
    # Every field that shapes the distribution is set here; greedy leaves the sampling knobs unset (None)
    # because transformers warns about sampling flags next to do_sample=False.
    sample = temperature > 0
    knobs = dict(temperature=temperature, top_p=top_p, top_k=top_k) if sample else {}
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, repetition_penalty=1.0,
        eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
        suppress_tokens=policy.vision_token_ids, **knobs,
    )
    cuda = []
    if policy.device.type == "cuda":
        cuda = [policy.device.index if policy.device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        out = policy.model.generate(**batch, generation_config=gen_config)  # [B, T + N]
    return batch, out[:, batch["input_ids"].shape[1]:]


def generate(policy: Policy, images: list | None, texts: list[str], *, max_new_tokens: int = 32,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             system: str | None = None) -> list[str]:
    """`generate_ids`, decoded without special tokens: one string per prompt."""
    _, new = generate_ids(policy, images, texts, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, top_k=top_k, seed=seed, system=system)
    return policy.processor.batch_decode(new, skip_special_tokens=True)


__all__ = ["ATTN_IMPLEMENTATIONS", "FAMILIES", "Family", "ModelDirError", "Policy", "Processor", "chat_prompt", "check_model_dir",
           "config_class", "encode_prompts", "family", "forward_hidden", "image_factor", "generate", "generate_ids", "load_policy", "load_processor",
           "mm_token_types", "model_class", "pick_attn_implementation", "resolve_device", "resolve_dtype"]
