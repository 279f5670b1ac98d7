"""Run configuration: nested keyword-only dataclasses, presets, TOML files and dotted CLI overrides.

Decisions:
- Every hyperparameter has exactly one home, a field with a one-line docstring (the string literal under
  it, which `field_docs` reads back for `vzero-fast train --help-config`).
- Precedence: preset < TOML file < CLI. `resolve(preset, file, overrides)` applies them in that order and
  validates once at the end (each dataclass checks itself in `__post_init__`; the error names the dotted
  field and what is allowed).
- Unknown keys, in a file or on the command line, are errors with a did-you-mean.
- The resolved config is written beside the run's outputs (`save_config`) as TOML that `load_toml` reads
  back into an equal config.

Run `python -m vzero_fast config --preset tiny` to print a resolved config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A config value, key or file that cannot be used; the message names the dotted field."""


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: must be {allowed}, got {value!r}")


DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN = ("auto", "sdpa", "flash_attention_2", "eager")
KL_TYPES = ("k1", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ADVANTAGES = ("grpo", "drgrpo", "group-softmax")
RECIPES = ("vzero", "toy", "grpo", "selfjudge", "opd", "mmzero")
CODE_LANGUAGES = ("svg", "python")
OPD_NEGATIVES = ("hard_negative_crop", "downsample")
GRPO_MODES = ("label", "maj")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(kw_only=True)
class LoraConfig:
    """Every trained role as a LoRA adapter over one shared frozen base model (vzero_fast/lora.py)."""

    rank: int = 0
    """LoRA rank r of each role's adapter; 0 = off (full fine-tuning, one model copy per role)."""
    alpha: float = 16.0
    """The adapter's update is (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (0 = none)."""
    target_modules: str = "all-linear"
    """Linear layers that get an adapter: all-linear, or a comma list of layer names (q_proj,v_proj,...); never lm_head, which stays frozen."""
    vision: bool = False
    """Adapters in the vision tower too (false: the vision tower is the frozen base's)."""

    def __post_init__(self) -> None:
        _check(self.rank >= 0, "model.lora.rank", ">= 0", self.rank)
        _check(self.alpha > 0, "model.lora.alpha", "> 0", self.alpha)
        _check(0 <= self.dropout < 1, "model.lora.dropout", "in [0, 1)", self.dropout)
        names = [t.strip() for t in self.target_modules.split(",")]
        _check(all(names), "model.lora.target_modules", "all-linear or a comma list of layer names",
               self.target_modules)
        _check("lm_head" not in names, "model.lora.target_modules",
               "without lm_head (it stays frozen: the fused log-prob kernel reads its weight)", self.target_modules)


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """Local model directory (Qwen2.5-VL-3B/7B-Instruct or `vzero-fast make-tiny DIR`); empty builds the offline tiny model in the run directory."""
    dtype: str = "auto"
    """Compute dtype of the weights: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16."""
    master_weights: bool = True
    """With bf16/fp16 weights, AdamW updates fp32 master copies (FSDP2's mixed precision under torchrun); false = pure low-precision training, where small updates are rounded away."""
    attn_implementation: str = "auto"
    """Attention backend: auto (flash_attention_2 where flash_attn imports on CUDA, else sdpa), sdpa, flash_attention_2 or eager."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass to save memory."""
    tiny_seed: int = 0
    """Seed of the random weights and tokenizer corpus when the tiny model is built."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (model.lora.rank > 0)."""

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", self.dtype)
        _check(self.attn_implementation in ATTN, "model.attn_implementation", f"one of {ATTN}",
               self.attn_implementation)


@dataclass(kw_only=True)
class DataConfig:
    images: str = ""
    """Unlabeled images: a folder (recursive), a .jsonl or .csv listing paths; empty uses synthetic figures. The grpo and selfjudge recipes read a .jsonl/.csv of image + question (+ answer) rows; opd a .jsonl of image, question, bbox (+ neg_bbox) rows."""
    synthetic_images: int = 64
    """Number of synthetic figures drawn when `images` is empty."""
    synthetic_size: int = 224
    """Side in pixels of the synthetic figures."""
    min_pixels: int = 56 * 56
    """Smallest image area fed to the vision tower (Qwen2.5-VL processor's min_pixels)."""
    max_pixels: int = 1024 * 28 * 28
    """Largest image area fed to the vision tower (Qwen2.5-VL processor's max_pixels)."""

    def __post_init__(self) -> None:
        _check(self.synthetic_images >= 1, "data.synthetic_images", ">= 1", self.synthetic_images)
        _check(self.synthetic_size >= 28, "data.synthetic_size", ">= 28", self.synthetic_size)
        _check(self.min_pixels >= 28 * 28, "data.min_pixels", ">= 784 (one 28x28 merged patch)",
               self.min_pixels)
        _check(self.max_pixels >= self.min_pixels, "data.max_pixels", f">= data.min_pixels ({self.min_pixels})",
               self.max_pixels)


@dataclass(kw_only=True)
class RoleConfig:
    """Sampling and GRPO settings of one trained role (defaults: ALGORITHMS.md section 0)."""

    prompts_per_step: int = 64
    """Prompts (images or questions) per GRPO step."""
    rollout_n: int = 5
    """Responses sampled per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (also divides the logits of the training log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of the rollouts (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling of the rollouts (0 = off)."""
    repetition_penalty: float = 1.0
    """Repetition penalty of the rollouts (1.0 = off)."""
    max_response_tokens: int = 2048
    """Longest sampled response."""
    lr: float = 1e-6
    """AdamW learning rate (constant schedule)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    kl_coef: float = 0.01
    """KL coefficient beta in the loss (0 skips the reference model)."""
    kl_type: str = "k3"
    """KL estimator: k1, k2 or k3 (low-variance KL)."""
    clip_low: float = 0.2
    """PPO clip epsilon below 1."""
    clip_high: float = 0.2
    """PPO clip epsilon above 1 (raise it for clip-higher)."""
    clip_c: float = 0.0
    """Dual-clip constant c (0 = off; 3 is the usual value)."""
    loss_agg: str = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum-norm."""
    agg_norm: float = 0.0
    """Divisor of seq-mean-token-sum-norm (0 = max_response_tokens)."""
    advantage: str = "grpo"
    """Group advantage: grpo ((r - mean) / (std + 1e-6)), drgrpo (r - mean) or group-softmax (Self-Judge: log-softmax of the group's rewards, centred)."""
    drop_zero_variance: bool = False
    """Train only on groups whose rewards differ (dynamic filtering): a zero-variance group has advantage 0 but its tokens count in the token-mean divisor."""
    mini_batches: int = 2
    """Optimizer steps per rollout batch (PPO mini-batches)."""
    epochs: int = 1
    """PPO epochs over each rollout batch."""
    micro_batch_tokens: int = 16384
    """Token budget of one forward/backward micro-batch."""

    def _validate(self, role: str) -> None:
        for name in ("prompts_per_step", "rollout_n", "max_response_tokens",
                     "mini_batches", "epochs", "micro_batch_tokens"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{role}.{name}", "an integer >= 1", value)
        _check(self.temperature > 0, f"{role}.temperature", "> 0", self.temperature)
        _check(0 < self.top_p <= 1, f"{role}.top_p", "in (0, 1]", self.top_p)
        _check(self.top_k >= 0, f"{role}.top_k", ">= 0", self.top_k)
        _check(self.repetition_penalty > 0, f"{role}.repetition_penalty", "> 0", self.repetition_penalty)
        _check(self.lr > 0, f"{role}.lr", "> 0", self.lr)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{role}.betas",
               "two numbers in [0, 1)", self.betas)
        _check(self.weight_decay >= 0, f"{role}.weight_decay", ">= 0", self.weight_decay)
        _check(self.grad_clip >= 0, f"{role}.grad_clip", ">= 0", self.grad_clip)
        _check(self.kl_coef >= 0, f"{role}.kl_coef", ">= 0", self.kl_coef)
        _check(self.kl_type in KL_TYPES, f"{role}.kl_type", f"one of {KL_TYPES}", self.kl_type)
        _check(0 <= self.clip_low < 1, f"{role}.clip_low", "in [0, 1)", self.clip_low)
        _check(self.clip_high >= 0, f"{role}.clip_high", ">= 0", self.clip_high)
        _check(self.clip_c == 0 or self.clip_c > 1, f"{role}.clip_c", "0 (off) or > 1", self.clip_c)
        _check(self.loss_agg in LOSS_AGGS, f"{role}.loss_agg", f"one of {LOSS_AGGS}", self.loss_agg)
        _check(self.agg_norm >= 0, f"{role}.agg_norm", ">= 0", self.agg_norm)
        _check(self.advantage in ADVANTAGES, f"{role}.advantage", f"one of {ADVANTAGES}", self.advantage)


@dataclass(kw_only=True)
class QuestionerConfig(RoleConfig):
    rollout_n: int = 4
    """Questions sampled per image (the Questioner's GRPO group)."""
    max_response_tokens: int = 2048
    """Longest Questioner output."""

    def __post_init__(self) -> None:
        self._validate("questioner")


@dataclass(kw_only=True)
class SolverConfig(RoleConfig):
    rollout_n: int = 5
    """Answers sampled per kept question (the Solver's GRPO group)."""
    max_response_tokens: int = 4096
    """Longest Solver answer while training."""

    def __post_init__(self) -> None:
        self._validate("solver")


@dataclass(kw_only=True)
class ProposerConfig(RoleConfig):
    """MM-Zero's Proposer: text only, a topic in, a figure proposal (caption + two questions) out."""

    prompts_per_step: int = 18
    """Topic prompts per step (18 x 4 = the 72 proposals whose batch terms are computed together)."""
    rollout_n: int = 4
    """Proposals sampled per topic (the Proposer's GRPO group)."""
    max_response_tokens: int = 1024
    """Longest proposal."""

    def __post_init__(self) -> None:
        self._validate("proposer")


@dataclass(kw_only=True)
class CoderConfig(RoleConfig):
    """MM-Zero's Coder: text only, a proposal in, one self-contained SVG (or matplotlib program) out."""

    prompts_per_step: int = 18
    """Proposals per step."""
    rollout_n: int = 4
    """Programs sampled per proposal (the Coder's GRPO group); also N, the Coder samples behind a Proposer reward."""
    temperature: float = 0.7
    """Sampling temperature of the Coder (training rollouts, the Proposer's reward and the data filters)."""
    top_p: float = 0.95
    """Top-p of the Coder."""
    max_response_tokens: int = 4096
    """Longest program."""

    def __post_init__(self) -> None:
        self._validate("coder")


@dataclass(kw_only=True)
class PolicyConfig(RoleConfig):
    """The one trained policy of single-role recipes (toy)."""

    rollout_n: int = 8
    """Responses sampled per prompt (the GRPO group size)."""

    def __post_init__(self) -> None:
        self._validate("policy")


@dataclass(kw_only=True)
class ActorConfig(RoleConfig):
    """Self-Judge's trained Actor (ALGORITHMS.md section 3)."""

    rollout_n: int = 8
    """Responses sampled per question (the GRPO group; the consistency prior votes over them)."""
    advantage: str = "group-softmax"
    """Group advantage; Self-Judge's is group-softmax (beta = 1): log-softmax of the group's rewards, centred."""

    def __post_init__(self) -> None:
        self._validate("actor")


@dataclass(kw_only=True)
class LearnerConfig(RoleConfig):
    """The trained policy of the grpo recipe (supervised GRPO on labels, or the majority-vote baseline)."""

    rollout_n: int = 8
    """Responses sampled per question (the GRPO group; `grpo.mode = maj` votes over them)."""

    def __post_init__(self) -> None:
        self._validate("learner")


@dataclass(kw_only=True)
class StudentConfig(RoleConfig):
    """V-Zero-OPD's trained student (ALGORITHMS.md section 4); `advantage` and `drop_zero_variance` do not apply
    (its advantages are per token, vzero_fast/recipes/opd.py)."""

    rollout_n: int = 8
    """Responses sampled per question (G, the group the evidence gate normalises over)."""

    def __post_init__(self) -> None:
        self._validate("student")


@dataclass(kw_only=True)
class OPDConfig:
    """V-Zero-OPD's rules (ALGORITHMS.md section 4): the frozen teacher, the negative view, the gate."""

    teacher: str = ""
    """Local teacher checkpoint (same tokenizer as the student); empty builds a tiny teacher when tiny_teacher is on."""
    tiny_teacher: bool = True
    """Without `teacher`, build a tiny teacher (another seed, wider MLP) for the tiny student; off = `teacher` is required."""
    teacher_dtype: str = "auto"
    """Teacher weights: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16."""
    negative: str = "hard_negative_crop"
    """Negative view z-: hard_negative_crop ([full, crop of neg_bbox or of a same-size non-overlapping region]) or downsample (the positive view with every image halved)."""
    gamma: float = 1.0
    """Delta = relu(delta) - gamma * relu(-delta): weight of evidence against the crop."""
    alpha: float = 0.5
    """w = clamp(1 + alpha * standardised p, 0, 2): strength of the evidence gate."""
    clamp: float = 10.0
    """d = clamp(log pS - log pT(z+), -clamp, clamp), before weighting."""
    data_epochs: int = 1
    """Passes over the data per iteration when train.max_steps_per_role is 0."""

    def __post_init__(self) -> None:
        _check(self.teacher_dtype in DTYPES, "opd.teacher_dtype", f"one of {DTYPES}", self.teacher_dtype)
        _check(self.negative in OPD_NEGATIVES, "opd.negative", f"one of {OPD_NEGATIVES}", self.negative)
        _check(self.gamma >= 0, "opd.gamma", ">= 0", self.gamma)
        _check(self.alpha >= 0, "opd.alpha", ">= 0", self.alpha)
        _check(self.clamp > 0, "opd.clamp", "> 0", self.clamp)
        _check(self.data_epochs >= 1, "opd.data_epochs", "an integer >= 1", self.data_epochs)


@dataclass(kw_only=True)
class SelfJudgeConfig:
    """Self-Judge's rules (ALGORITHMS.md section 3): the prior, the frozen Judge and the format warm-up."""

    prior_threshold: float = 0.85
    """Above this majority share p (strict) the prior is 1 for the majority answer, 0 otherwise; else count / n."""
    judge_temperature: float = 1.0
    """Sampling temperature of the Judge."""
    judge_top_p: float = 0.9
    """Top-p of the Judge."""
    judge_max_tokens: int = 1024
    """Longest Judge output (scores block and boxed overall score)."""
    format_warmup_steps: int = 0
    """Supervised steps on templated Actor and Judge outputs with random answers and scores (format only) before GRPO; the tiny preset uses them."""
    format_warmup_batch: int = 4
    """Examples per format warm-up step: half Actor outputs, half Judge outputs."""
    format_warmup_lr: float = 3e-3
    """AdamW learning rate of the format warm-up (its own optimizer, discarded afterwards)."""

    def __post_init__(self) -> None:
        _check(0 <= self.prior_threshold < 1, "selfjudge.prior_threshold", "in [0, 1)", self.prior_threshold)
        _check(self.judge_temperature > 0, "selfjudge.judge_temperature", "> 0", self.judge_temperature)
        _check(0 < self.judge_top_p <= 1, "selfjudge.judge_top_p", "in (0, 1]", self.judge_top_p)
        _check(self.judge_max_tokens >= 1, "selfjudge.judge_max_tokens", "an integer >= 1", self.judge_max_tokens)
        _check_warmup("selfjudge", self)


@dataclass(kw_only=True)
class GRPORecipeConfig:
    """The grpo recipe: plain GRPO with a verifiable reward on labeled questions (V-Zero's supervised GRPO)."""

    mode: str = "label"
    """label: reward 1 when the boxed answer equals the row's answer; maj: equals the group's majority answer (no labels read)."""
    format_weight: float = 0.0
    """w in r = (1 - w) * correct + w * well_formed (`<think>..</think>..\\boxed{..}` from the first character)."""
    format_warmup_steps: int = 0
    """Supervised steps on templated outputs with random answers (format only) before GRPO; the tiny preset uses them."""
    format_warmup_batch: int = 4
    """Examples per format warm-up step."""
    format_warmup_lr: float = 3e-3
    """AdamW learning rate of the format warm-up (its own optimizer, discarded afterwards)."""

    def __post_init__(self) -> None:
        _check(self.mode in GRPO_MODES, "grpo.mode", f"one of {GRPO_MODES}", self.mode)
        _check(0 <= self.format_weight <= 1, "grpo.format_weight", "in [0, 1]", self.format_weight)
        _check_warmup("grpo", self)


def _check_warmup(section: str, cfg) -> None:
    _check(cfg.format_warmup_steps >= 0, f"{section}.format_warmup_steps", ">= 0", cfg.format_warmup_steps)
    _check(cfg.format_warmup_batch >= 1, f"{section}.format_warmup_batch", ">= 1", cfg.format_warmup_batch)
    _check(cfg.format_warmup_lr > 0, f"{section}.format_warmup_lr", "> 0", cfg.format_warmup_lr)


@dataclass(kw_only=True)
class ToyConfig:
    """The toy recipe: reward 1 when the response starts with one of the target tokens."""

    target_mass: float = 0.1
    """Initial first-token probability covered by the target tokens (the starting reward)."""
    prompt: str = "Describe the figure."
    """User text sent with every image."""

    def __post_init__(self) -> None:
        _check(0 < self.target_mass < 1, "toy.target_mass", "in (0, 1)", self.target_mass)


@dataclass(kw_only=True)
class VZeroConfig:
    """V-Zero's rules (ALGORITHMS.md section 1)."""

    reward_votes: int = 10
    """Solver answers m sampled per question for the Questioner's dual-track reward."""
    reward_temperature: float = 1.0
    """Temperature of those Solver answers."""
    reward_top_k: int = 40
    """Top-k of those Solver answers."""
    reward_max_tokens: int = 2048
    """Longest of those Solver answers."""
    question_temperature: float = 1.0
    """Temperature of the updated Questioner when it writes the Solver's questions."""
    question_repetition_penalty: float = 1.1
    """Repetition penalty of the updated Questioner when it writes the Solver's questions."""
    label_votes: int = 10
    """Solver answers sampled per question for its majority-vote pseudo-label."""
    label_temperature: float = 1.0
    """Temperature of the pseudo-label votes."""
    label_top_p: float = 0.9
    """Top-p of the pseudo-label votes."""
    band_low: float = 0.3
    """Keep a question when its majority share is at least this."""
    band_high: float = 0.8
    """Keep a question when its majority share is at most this."""
    format_warmup_steps: int = 0
    """Supervised steps on templated outputs with random answer letters (format only, no labels) before GRPO; the tiny preset uses them."""
    format_warmup_batch: int = 4
    """Examples per format warm-up step: 3 of every 4 are Questioner outputs, the rest Solver outputs."""
    format_warmup_lr: float = 3e-3
    """AdamW learning rate of the format warm-up (its own optimizer, discarded afterwards)."""

    def __post_init__(self) -> None:
        for name in ("reward_votes", "reward_max_tokens", "label_votes"):
            _check(getattr(self, name) >= 1, f"vzero.{name}", "an integer >= 1", getattr(self, name))
        _check(0 <= self.band_low <= self.band_high <= 1, "vzero.band_low/band_high",
               "0 <= band_low <= band_high <= 1", (self.band_low, self.band_high))
        _check(self.format_warmup_steps >= 0, "vzero.format_warmup_steps", ">= 0", self.format_warmup_steps)
        _check(self.format_warmup_batch >= 1, "vzero.format_warmup_batch", ">= 1", self.format_warmup_batch)
        _check(self.format_warmup_lr > 0, "vzero.format_warmup_lr", "> 0", self.format_warmup_lr)
        for name in ("reward_temperature", "question_temperature", "label_temperature"):
            _check(getattr(self, name) > 0, f"vzero.{name}", "> 0", getattr(self, name))
        _check(0 < self.label_top_p <= 1, "vzero.label_top_p", "in (0, 1]", self.label_top_p)


MMZERO_TOPICS = ("chart and graph understanding", "geometry and measurement", "tables and statistics",
                 "maps and routes", "timelines and schedules", "diagrams and flowcharts", "counting and arithmetic",
                 "science diagrams")


@dataclass(kw_only=True)
class MMZeroConfig:
    """MM-Zero's rules and data settings (ALGORITHMS.md section 2); the roles' sampling is in [proposer], [coder],
    [solver]."""

    topics: tuple[str, ...] = MMZERO_TOPICS
    """Topic strings of the Proposer's prompts (CLI: "a|b|c")."""
    pool_size: int = 256
    """Proposals the updated Proposer writes per iteration (one per prompt, topics in turn): the candidates for
    the Coder's prompts and the Solver's items."""
    proposal_temperature: float = 1.0
    """Temperature of the updated Proposer when it writes the pool."""
    coder_samples: int = 4
    """N: Coder programs per proposal behind a Proposer reward, and behind the Coder-prompt filter."""
    solver_votes: int = 5
    """n: Solver answers per question per rendered image, for s (easy question) and c (hard question)."""
    vote_temperature: float = 1.0
    """Temperature of those Solver answers."""
    vote_top_k: int = 40
    """Top-k of those Solver answers."""
    vote_max_tokens: int = 2048
    """Longest of those Solver answers."""
    label_votes: int = 10
    """Solver answers per question (hard and easy) when the Solver's items are labelled."""
    code_language: str = "svg"
    """What the Coder writes: svg (rendered by resvg) or python (matplotlib, the reference's earlier path)."""
    render_workers: int = 2
    """Confined renderer processes at once (threads of the render pool; rendering overlaps generation)."""
    render_timeout: float = 30.0
    """Wall-clock seconds one render may take (the reference's 30 s)."""
    render_memory_mib: int = 2048
    """Address-space limit of one confined renderer process."""
    save_images: bool = True
    """Write every rendered image of the Proposer and Coder steps as PNG beside proposals-iter<k>.jsonl."""
    format_warmup_steps: int = 0
    """Supervised steps on templated outputs of the three roles (format only, random answers) before GRPO."""
    format_warmup_batch: int = 8
    """Examples per format warm-up step: of every 8, 3 Proposer, 1 Coder and 4 Solver outputs."""
    format_warmup_lr: float = 3e-3
    """AdamW learning rate of the format warm-up (its own optimizer, discarded afterwards)."""

    def __post_init__(self) -> None:
        _check(len(self.topics) >= 1 and all(isinstance(t, str) and t.strip() for t in self.topics),
               "mmzero.topics", "non-empty strings", self.topics)
        for name in ("pool_size", "coder_samples", "solver_votes", "vote_max_tokens", "label_votes",
                     "render_workers", "render_memory_mib", "format_warmup_batch"):
            _check(getattr(self, name) >= 1, f"mmzero.{name}", "an integer >= 1", getattr(self, name))
        for name in ("proposal_temperature", "vote_temperature", "render_timeout", "format_warmup_lr"):
            _check(getattr(self, name) > 0, f"mmzero.{name}", "> 0", getattr(self, name))
        _check(self.vote_top_k >= 0, "mmzero.vote_top_k", ">= 0", self.vote_top_k)
        _check(self.code_language in CODE_LANGUAGES, "mmzero.code_language", f"one of {CODE_LANGUAGES}",
               self.code_language)
        _check(self.format_warmup_steps >= 0, "mmzero.format_warmup_steps", ">= 0", self.format_warmup_steps)


@dataclass(kw_only=True)
class TrainConfig:
    recipe: str = "vzero"
    """Recipe to run (vzero: Questioner and Solver co-evolve; toy: a verifiable reward that checks the engine learns; selfjudge: an Actor rewarded by its consistency and a frozen Judge; grpo: GRPO on labeled questions, or on majority votes; opd: a student distilled from a frozen teacher, gated by visual evidence)."""
    out: str = "runs/vzero"
    """Run directory: metrics, checkpoints, the resolved config."""
    seed: int = 0
    """Seed of every random choice in the run (data order, sampling, initial weights of the tiny model)."""
    iterations: int = 2
    """Outer iterations (each trains every role once)."""
    max_steps_per_role: int = 0
    """Cap on GRPO steps per role per iteration (0 = one epoch over the data)."""
    save_every: int = 0
    """Also save a checkpoint every N steps (0 = only at the end of each role's stage)."""
    eval_every: int = 0
    """Every N global steps, score the stepping role greedily on 28 built-in synthetic items (vzero_fast/evaluate.py) into the step's metrics row: eval_accuracy, eval_items, time_eval (0 = off)."""
    keep_last: int = 2
    """Checkpoints kept per role (older ones are deleted)."""
    device: str = "auto"
    """Device: auto (cuda when available), cpu or cuda."""
    cpu_threads: int = 0
    """torch intra-op CPU threads (0 = torch's default, one per core); the tiny preset uses 1."""
    report_to: str = "jsonl"
    """Where metrics go, comma-separated: jsonl (always: metrics.jsonl), tensorboard (RUN/tensorboard), wandb (offline unless WANDB_MODE is set; RUN/wandb)."""

    def __post_init__(self) -> None:
        _check(self.cpu_threads >= 0, "train.cpu_threads", ">= 0", self.cpu_threads)
        _check(self.recipe in RECIPES, "train.recipe", f"one of {RECIPES}", self.recipe)
        _check(self.iterations >= 1, "train.iterations", ">= 1", self.iterations)
        _check(self.max_steps_per_role >= 0, "train.max_steps_per_role", ">= 0", self.max_steps_per_role)
        _check(self.save_every >= 0, "train.save_every", ">= 0", self.save_every)
        _check(self.eval_every >= 0, "train.eval_every", ">= 0 (0 = off)", self.eval_every)
        _check(self.keep_last >= 1, "train.keep_last", ">= 1", self.keep_last)
        _check(self.device in DEVICES, "train.device", f"one of {DEVICES}", self.device)
        trackers = [t.strip() for t in self.report_to.split(",") if t.strip()]
        _check(bool(trackers) and all(t in TRACKERS for t in trackers), "train.report_to",
               f"a comma-separated subset of {TRACKERS}", self.report_to)


ROLLOUT_BACKENDS = ("native", "vllm", "auto")
TRACKERS = ("jsonl", "tensorboard", "wandb")


def _registered_backend(name: str) -> bool:
    """A backend added to rollout.ENGINES at run time (tests' probes); imported only for such a name."""
    from vzero_fast.rollout import ENGINES

    return name in ENGINES
EAGER = ("auto", "on", "off")


@dataclass(kw_only=True)
class RolloutConfig:
    """The rollout engine of every role (vzero_fast/rollout.py make_engine; vLLM: vzero_fast/rollout_vllm.py)."""

    backend: str = "native"
    """native (samples with the policy's own weights), vllm (an in-process vLLM engine per role, weights synced in place after every optimizer step) or auto (vllm where it imports and builds an engine, else native; the choice is logged)."""
    max_batch_tokens: int = 65536
    """native: KV-cache budget of one batch in tokens, (longest prompt + longest response) x sequences."""
    gpu_memory_utilization: float = 0.3
    """vllm on CUDA: share of the device's memory each engine may take (weights + KV cache); the trainer needs the rest."""
    max_model_len: int = 4096
    """vllm: longest prompt + response in tokens an engine accepts."""
    cpu_kv_cache_gb: float = 1.0
    """vllm on the CPU: KV cache size per engine in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    eager: str = "auto"
    """vllm: on = no CUDA graphs / compilation, off = graphs, auto = off on CUDA, on on the CPU."""
    sleep_level: int = 1
    """vllm on CUDA: while its role trains an engine frees its KV cache (1), also its weights (2, reloaded from the policy at wake), or nothing (0). No-ops on the CPU."""
    max_images_per_prompt: int = 1
    """vllm: images one prompt may carry (vLLM's limit_mm_per_prompt)."""
    share_engine: bool = False
    """vllm: one engine for all roles, loading a role's weights whenever another role's were loaded last (one KV cache and one weight copy instead of one per role; each swap costs a weight sync)."""

    def __post_init__(self) -> None:
        _check(self.backend in ROLLOUT_BACKENDS or _registered_backend(self.backend), "rollout.backend",
               f"one of {ROLLOUT_BACKENDS}", self.backend)
        _check(self.max_batch_tokens >= 1, "rollout.max_batch_tokens", ">= 1", self.max_batch_tokens)
        _check(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "in (0, 1]",
               self.gpu_memory_utilization)
        _check(self.max_model_len >= 16, "rollout.max_model_len", ">= 16", self.max_model_len)
        _check(self.cpu_kv_cache_gb > 0, "rollout.cpu_kv_cache_gb", "> 0", self.cpu_kv_cache_gb)
        _check(self.eager in EAGER, "rollout.eager", f"one of {EAGER}", self.eager)
        _check(self.sleep_level in (0, 1, 2), "rollout.sleep_level", "0, 1 or 2", self.sleep_level)
        _check(self.max_images_per_prompt >= 1, "rollout.max_images_per_prompt", ">= 1", self.max_images_per_prompt)


FSDP_MODES = ("auto", "on", "off")
MIXED_PRECISION = ("auto", "bf16", "off")


@dataclass(kw_only=True)
class DistConfig:
    """Multi-GPU runs under torchrun: FSDP2 sharding and data-parallel rollouts (vzero_fast/distributed.py)."""

    fsdp: str = "auto"
    """FSDP2 sharding: auto (on when torchrun starts more than one rank), on (also for one rank under torchrun), off (one process only)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and AdamW state in CPU memory (FSDP2 CPUOffloadPolicy; needs CUDA)."""
    mixed_precision: str = "auto"
    """auto (bf16 compute, fp32 gradient reduce on CUDA; off on CPU), bf16 or off; with it, model.dtype auto loads fp32 master weights."""
    timeout_s: float = 600.0
    """Seconds a collective waits for the other ranks before the run fails with an error (a dead rank ends the run)."""

    def __post_init__(self) -> None:
        _check(self.fsdp in FSDP_MODES, "dist.fsdp", f"one of {FSDP_MODES}", self.fsdp)
        _check(self.mixed_precision in MIXED_PRECISION, "dist.mixed_precision", f"one of {MIXED_PRECISION}",
               self.mixed_precision)
        _check(self.timeout_s > 0, "dist.timeout_s", "> 0", self.timeout_s)


@dataclass(kw_only=True)
class ProfileConfig:
    """torch.profiler over a range of global steps (vzero_fast/profiling.py)."""

    steps: str = ""
    """Global steps A:B (inclusive) to profile, e.g. 3:4; empty = off. Writes RUN/profile/trace-steps-A-B.json (Perfetto / chrome://tracing) and summary.md."""
    record_shapes: bool = False
    """Record operator input shapes (larger traces)."""
    with_stack: bool = False
    """Record Python stacks of operators (much larger traces)."""
    top: int = 15
    """Operators listed in the end-of-profile table."""

    def __post_init__(self) -> None:
        _check(self.steps == "" or profile_steps(self.steps) is not None, "profile.steps",
               "A:B with 1 <= A <= B (global steps), or empty", self.steps)
        _check(self.top >= 1, "profile.top", ">= 1", self.top)


def profile_steps(spec: str) -> tuple[int, int] | None:
    """(A, B) of a "A:B" (or "A") step range with 1 <= A <= B; None when malformed."""
    parts = spec.split(":")
    try:
        a, b = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        return None
    return (a, b) if 1 <= a <= b else None


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy checkpoint every role starts from."""
    data: DataConfig = field(default_factory=DataConfig)
    """Unlabeled images."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run-level settings."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engines."""
    questioner: QuestionerConfig = field(default_factory=QuestionerConfig)
    """V-Zero Questioner role."""
    solver: SolverConfig = field(default_factory=SolverConfig)
    """V-Zero Solver role."""
    vzero: VZeroConfig = field(default_factory=VZeroConfig)
    """V-Zero rules."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The trained policy of single-role recipes (toy)."""
    toy: ToyConfig = field(default_factory=ToyConfig)
    """Toy recipe."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Self-Judge's trained Actor."""
    selfjudge: SelfJudgeConfig = field(default_factory=SelfJudgeConfig)
    """Self-Judge rules."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The grpo recipe's trained policy."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """V-Zero-OPD's trained student."""
    opd: OPDConfig = field(default_factory=OPDConfig)
    """V-Zero-OPD rules (teacher, negative view, gate)."""
    grpo: GRPORecipeConfig = field(default_factory=GRPORecipeConfig)
    """The grpo recipe (supervised GRPO / majority-vote baseline)."""
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    """MM-Zero's Proposer role."""
    coder: CoderConfig = field(default_factory=CoderConfig)
    """MM-Zero's Coder role."""
    mmzero: MMZeroConfig = field(default_factory=MMZeroConfig)
    """MM-Zero rules (pool, votes, filters, rendering)."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Multi-GPU (torchrun + FSDP2) settings."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """torch.profiler trace of a range of steps."""


# ----------------------------------------------------------------------------------------------- presets

def _tiny() -> dict[str, Any]:
    """CPU in minutes: the offline tiny model, 32 synthetic figures, short responses."""
    role = dict(prompts_per_step=4, lr=1e-4, micro_batch_tokens=4096, kl_coef=0.01)
    return {
        "model": {"path": "", "dtype": "float32", "attn_implementation": "sdpa"},
        # 32 figures: the V-Zero Solver stage asks one question per figure (measured: 12-13 valid, 11 kept).
        "data": {"synthetic_images": 32, "synthetic_size": 112, "min_pixels": 56 * 56, "max_pixels": 112 * 112},
        # One thread: the tiny model's ops are too small to split, and on a shared 2-core machine two
        # threads per process spin against other work (measured under load ~4: the V-Zero format warm-up
        # took 411 s with torch's default 2 threads, 38 s with 1).
        "train": {"device": "cpu", "iterations": 2, "max_steps_per_role": 4, "out": "runs/tiny", "cpu_threads": 1},
        "questioner": {**role, "rollout_n": 4, "max_response_tokens": 64},
        "solver": {**role, "rollout_n": 4, "max_response_tokens": 32},
        # Format warm-up (vzero recipe): 150 steps of 4 templated outputs take 29-38 s (1 thread, 2 shared
        # cores) and leave 28-38% of the Questioner's and 75% of the Solver's T=1 samples parsable (from 0%).
        "vzero": {"reward_votes": 6, "reward_max_tokens": 32, "label_votes": 6, "format_warmup_steps": 150,
                  "format_warmup_batch": 4, "format_warmup_lr": 3e-3},
        # The toy reward only looks at the first token: short responses and a large step size learn it
        # in ~10 steps on CPU (measured: reward 0.06 -> 1.0 by step 11).
        "policy": {**role, "rollout_n": 8, "max_response_tokens": 2, "lr": 1e-2, "mini_batches": 1},
        # grpo on the synthetic colour task (vzero_fast/qa.py): after the format warm-up (100 steps: 97% of
        # T=1 samples boxed) a response is `\\boxed{X}` (4 tokens + eos). Measured at 168 px (36 image tokens):
        # reward 0.27 (steps 1-5) -> 0.62 (31-40) -> 0.74 (41-50) at lr 1.5e-3; lr 3e-3 collapsed the format
        # within 20 steps, 1e-3 rose too slowly; at 112 px (16 image tokens) it reached only 0.40 in 50 steps.
        "learner": {**role, "prompts_per_step": 8, "rollout_n": 8, "max_response_tokens": 5, "lr": 1.5e-3,
                    "mini_batches": 1},
        "grpo": {"format_warmup_steps": 100, "format_warmup_batch": 4, "format_warmup_lr": 3e-3},
        # selfjudge: `<think>..</think> \\boxed{X}` is ~13 tokens, the Judge's short contract ~50 (vzero_fast/tiny.py's
        # tokenizer); the warm-up teaches both (format only: random answers and scores).
        "actor": {**role, "rollout_n": 8, "max_response_tokens": 24, "mini_batches": 1},
        "selfjudge": {"judge_max_tokens": 56, "format_warmup_steps": 100, "format_warmup_batch": 4,
                      "format_warmup_lr": 3e-3},
        # opd: no format to learn (the teacher scores whatever the student writes); 16-token answers, 2 mini-batches
        # per step (off-policy ratios and the current-student d are exercised), a tiny teacher built in the run.
        "student": {**role, "rollout_n": 4, "max_response_tokens": 16},
        "opd": {"tiny_teacher": True},
        # mmzero: the warm-up's templates are <= 67 (proposal), 63 (SVG in a fence) and 13 (answer) tokens of the tiny
        # tokenizer; 200 steps of 8 (3 proposals, 1 program, 4 answers) leave ~70% of T=1 proposals parsable and every
        # program renderable at T=0.7 -- so the tiny Coder samples at T=1.0, where render success spreads into the
        # Coder-prompt band [0.25, 0.75] (measured: 3 of 12 proposals; at T=0.7 none, and the Coder never trained).
        "proposer": {**role, "prompts_per_step": 2, "rollout_n": 4, "max_response_tokens": 80, "mini_batches": 1},
        "coder": {**role, "prompts_per_step": 2, "rollout_n": 4, "temperature": 1.0, "max_response_tokens": 80,
                  "mini_batches": 1},
        "mmzero": {"pool_size": 12, "coder_samples": 4, "solver_votes": 3, "vote_max_tokens": 24, "label_votes": 4,
                   "render_workers": 2, "render_memory_mib": 1024, "format_warmup_steps": 200,
                   "format_warmup_batch": 8, "format_warmup_lr": 3e-3},
    }


def _vzero(model_size: str) -> dict[str, Any]:
    """The paper's hyperparameters (ALGORITHMS.md sections 0-1); the checkpoint comes from --model."""
    shared = dict(prompts_per_step=64, lr=1e-6, weight_decay=0.01, grad_clip=1.0, kl_coef=0.01, kl_type="k3",
                  clip_low=0.2, clip_high=0.2, loss_agg="token-mean", mini_batches=2, epochs=1,
                  temperature=1.0)
    return {
        # Gradient checkpointing: without it a 16K-token micro-batch of the 7B keeps tens of GB of activations.
        # auto on CUDA: bf16 compute over fp32 master weights (vzero_fast/optim.py in one process, FSDP2's
        # mixed precision under torchrun); AdamW at lr 1e-6 on bare bf16 weights would lose most updates.
        "model": {"dtype": "auto", "gradient_checkpointing": True},
        # A full checkpoint every 20 steps: without save_every only SIGTERM and the run's end write the trainer
        # state, and a crash would lose a whole iteration (~9 h in the paper's setting).
        "train": {"iterations": 2, "out": f"runs/vzero-{model_size}", "save_every": 20},
        # vLLM where it runs (the Solver's 4096-token answers after a ~1.3K-token image prompt fit in 8192), one
        # engine for both roles (one bf16 weight copy and KV cache; a swap is a sync) in a quarter of the GPU:
        # the training role needs the rest (README, Memory; estimates, not measured on a GPU).
        "rollout": {"backend": "auto", "max_model_len": 8192, "share_engine": True, "gpu_memory_utilization": 0.25},
        "questioner": {**shared, "rollout_n": 4, "max_response_tokens": 2048},
        "solver": {**shared, "rollout_n": 5, "max_response_tokens": 4096},
        "vzero": {"reward_votes": 10, "reward_temperature": 1.0, "reward_top_k": 40, "reward_max_tokens": 2048,
                  "question_temperature": 1.0, "question_repetition_penalty": 1.1, "label_votes": 10,
                  "label_temperature": 1.0, "label_top_p": 0.9, "band_low": 0.3, "band_high": 0.8},
    }


def _selfjudge_7b() -> dict[str, Any]:
    """Self-Judge's hyperparameters (ALGORITHMS.md sections 0 and 3) for Qwen2.5-VL-7B; also the grpo recipe's
    (the baselines are trained with the same settings); the checkpoint comes from --model."""
    role = dict(prompts_per_step=512, rollout_n=8, mini_batches=4, lr=1e-6, weight_decay=0.01, grad_clip=1.0,
                kl_coef=0.01, kl_type="k3", clip_low=0.2, clip_high=0.2, loss_agg="token-mean", epochs=1,
                temperature=1.0, max_response_tokens=2048)
    return {
        "model": {"dtype": "auto", "gradient_checkpointing": True},
        # One iteration: the Judge is the frozen starting checkpoint. A checkpoint every 20 steps.
        "train": {"iterations": 1, "out": "runs/selfjudge-7b", "save_every": 20},
        # The Judge reads image + question + a 2048-token response and writes up to 1024 tokens: 8192 fits.
        # One shared vLLM engine: the Actor's weights and the Judge's alternate in it (two syncs per step).
        "rollout": {"backend": "auto", "max_model_len": 8192, "share_engine": True, "gpu_memory_utilization": 0.25},
        "actor": {**role, "advantage": "group-softmax"},  # batch 512, mini-batch 128
        "learner": {**role, "advantage": "grpo"},
        "selfjudge": {"prior_threshold": 0.85, "judge_temperature": 1.0, "judge_top_p": 0.9, "judge_max_tokens": 1024},
    }


def _opd_4b() -> dict[str, Any]:
    """V-Zero-OPD's settings (ALGORITHMS.md sections 0 and 4) for a Qwen3.5-4B student and a Qwen3.5-27B teacher;
    no weights ship: give --model STUDENT and --opd.teacher TEACHER (opd.tiny_teacher is off, so a missing
    teacher is an error). "32 prompts x 8, mini-batch 16" = 2 mini-batches of 16 prompts per rollout batch;
    "10 epochs" = 10 passes over the data (opd.data_epochs), one PPO epoch per batch as in section 0."""
    return {
        "model": {"dtype": "auto", "gradient_checkpointing": True},
        "train": {"recipe": "opd", "iterations": 1, "out": "runs/opd-4b", "save_every": 20},
        "rollout": {"backend": "auto", "max_model_len": 8192, "gpu_memory_utilization": 0.25},
        "student": {"prompts_per_step": 32, "rollout_n": 8, "mini_batches": 2, "epochs": 1, "lr": 1e-6,
                    "weight_decay": 0.01, "grad_clip": 1.0, "kl_coef": 0.01, "kl_type": "k3", "clip_low": 0.2,
                    "clip_high": 0.2, "loss_agg": "token-mean", "temperature": 1.0, "max_response_tokens": 2048},
        "opd": {"tiny_teacher": False, "teacher_dtype": "auto", "negative": "hard_negative_crop", "gamma": 1.0,
                "alpha": 0.5, "clamp": 10.0, "data_epochs": 10},
    }


def _mmzero_7b() -> dict[str, Any]:
    """MM-Zero's settings (ALGORITHMS.md sections 0 and 2) for Qwen2.5-VL-7B (a Qwen3-VL base works the same way:
    give its --model); the checkpoint comes from --model. 18 topics x 4 proposals per Proposer step, N = 4 Coder
    samples per proposal, n = 5 Solver votes per question, Solver groups of 8; 20 GRPO steps per role."""
    role = dict(prompts_per_step=18, lr=1e-6, weight_decay=0.01, grad_clip=1.0, kl_coef=0.01, kl_type="k3",
                clip_low=0.2, clip_high=0.2, loss_agg="token-mean", mini_batches=2, epochs=1)
    return {
        "model": {"dtype": "auto", "gradient_checkpointing": True},
        "train": {"recipe": "mmzero", "iterations": 6, "max_steps_per_role": 20, "out": "runs/mmzero-7b",
                  "save_every": 20},
        "rollout": {"backend": "auto", "max_model_len": 8192, "share_engine": True, "gpu_memory_utilization": 0.25},
        "proposer": {**role, "rollout_n": 4, "temperature": 1.0, "max_response_tokens": 1024},
        "coder": {**role, "rollout_n": 4, "temperature": 0.7, "top_p": 0.95, "max_response_tokens": 4096},
        "solver": {**role, "rollout_n": 8, "temperature": 1.0, "max_response_tokens": 2048},
        "mmzero": {"pool_size": 512, "coder_samples": 4, "solver_votes": 5, "vote_temperature": 1.0, "vote_top_k": 40,
                   "vote_max_tokens": 2048, "label_votes": 10, "code_language": "svg", "render_workers": 8,
                   "render_timeout": 30.0},
    }


PRESETS: dict[str, typing.Callable[[], dict[str, Any]]] = {
    "mmzero-7b": _mmzero_7b,
    "tiny": _tiny,
    "opd-4b": _opd_4b,
    "selfjudge-7b": _selfjudge_7b,
    "vzero-3b": lambda: _vzero("3b"),
    "vzero-7b": lambda: _vzero("7b"),
}


# ------------------------------------------------------------------------------------ dicts <-> dataclasses

def _fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """name -> (resolved type, dataclasses.Field) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _unknown(key: str, known: typing.Iterable[str], where: str) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in known], n=1)
    hint = ""
    if close:
        full = [k for k in known if k.split(".")[-1] == close[0]]
        hint = f"; did you mean {full[0]!r}?"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Convert a TOML or CLI value to the field's type; strings from the CLI are parsed."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: must be a boolean (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: must be a string, got {value!r}")
    if origin is tuple and typing.get_args(typ)[1:] == (Ellipsis,):  # a list of any length
        item = typing.get_args(typ)[0]
        if isinstance(value, str):  # CLI: "a|b|c" (strings hold commas and spaces)
            value = [v.strip() for v in value.split("|")] if item is str else [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: must be a list, got {value!r}")
        return tuple(_coerce(v, item, name) for v in value)
    if origin is tuple:
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value if value.strip().startswith(("(", "[")) else f"({value},)")
            except (ValueError, SyntaxError) as e:
                raise ConfigError(f"{name}: must be a list like '0.9,0.999', got {value!r}") from e
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    raise ConfigError(f"{name}: unsupported field type {typ!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A nested plain dict (tuples as lists) of a config dataclass."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _merge(base: dict[str, Any], update: dict[str, Any], cls: type, where: str, prefix: str = "") -> None:
    """Merge `update` into `base` in place, checking every key against the dataclass `cls`."""
    fields = _fields(cls)
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise _unknown(name, [f"{prefix}{k}" for k in _all_keys(cls)], where)
        typ, _ = fields[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: is a section; set its keys, e.g. {name}.<key> = ...")
            _merge(base.setdefault(key, {}), value, typ, where, f"{name}.")
        else:
            base[key] = _coerce(value, typ, name)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, (typ, _) in _fields(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += _all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _build(cls: type, data: dict[str, Any]) -> Any:
    kwargs = {}
    for name, (typ, _) in _fields(cls).items():
        if name not in data:
            continue
        kwargs[name] = _build(typ, data[name]) if dataclasses.is_dataclass(typ) else data[name]
    return cls(**kwargs)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--solver.rollout_n", "10", "--train.seed=3"]` -> {"solver": {"rollout_n": "10"}, "train": {"seed": "3"}}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"expected a dotted override like --solver.rollout_n 10, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        node = out
        *parents, leaf = key.replace("-", "_").split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from e


def resolve(preset: str | None = None, file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> Config:
    """preset < TOML file < CLI overrides, validated once."""
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, PRESETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown preset {preset!r} (choose from {sorted(PRESETS)}){hint}")
        _merge(merged, PRESETS[preset](), Config, f"preset {preset!r}")
    if file is not None:
        _merge(merged, load_toml(file), Config, f"config file {str(file)!r}")
    if overrides:
        _merge(merged, overrides, Config, "command-line overrides")
    return _build(Config, merged)


# ----------------------------------------------------------------------------------------------- writing

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # a nested section (model.lora) as an inline table
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps(cfg: Config) -> str:
    """TOML text of a config: one table per section, scalars only (what our dataclasses hold)."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as TOML (the run's record; `--config` reads it back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(cfg))
    return path


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the docstring literal under its field (for --help-config)."""
    src = inspect.getsource(cls)
    tree = ast.parse(src.lstrip() if src.startswith(" ") else src)
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    out = {}
    for cls_ in reversed(cls.__mro__[1:]):  # inherited docs first, overridden below
        if dataclasses.is_dataclass(cls_):
            out.update(field_docs(cls_, prefix))
    for name, (typ, _) in _fields(cls).items():
        if dataclasses.is_dataclass(typ):
            out.update(field_docs(typ, f"{prefix}{name}."))
        elif name in docs:
            out[f"{prefix}{name}"] = docs[name]
    return out
