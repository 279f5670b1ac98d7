"""Rollout engines: sample n responses per (chat messages + images) request, for GRPO.

`RolloutEngine` is the interface the trainer talks to; `NativeEngine` implements it with the policy's own
parameters (zero copies, no weight hand-off); `vzero_fast/rollout_vllm.py` implements it on an in-process
vLLM engine. `make_engine` is the one place that picks a backend and logs which one runs.

Decisions:
- One prefill per prompt, n samples decoded from it. The B prompts of a batch are left-padded and
  prefilled together (the vision tower runs once per image, never n times); the KV cache and the last
  hidden state are then expanded to the R = sum(n) sequences with `Cache.reorder_cache(row)` (an
  index_select, row = repeat_interleave(arange(B), n)) and all R sequences decode together. HF
  `generate` cannot do this: its num_return_sequences expands the inputs, so the image is encoded n times.
- M-RoPE positions are computed here and passed explicitly: the prompt's from `get_rope_index` (the
  function the training forward uses), and decode step t of prompt b at `max(prompt positions of b) + 1
  + t` on all three axes -- equal to HF's `text position + rope_deltas`. Passing them keeps the model's
  cached `rope_deltas` out of the loop; it would be wrong here after expansion with per-prompt n.
- `Sample.logprobs` are `log_softmax(logits / T)[token]` of the model's raw logits in fp32, before the
  repetition penalty, vision-token suppression and top-k/top-p truncation: exactly what the trainer
  computes from the final hidden states (ALGORITHMS.md section 0), so the trainer's `logprob_diff` measures
  numerics only. Greedy (T = 0) reports T = 1 log-probs. The logits come from `lm_head_logits`, which
  keeps fp32 outputs for bf16 weights (HF's lm_head rounds them to bf16, whose spacing at |logit| in
  [16, 32) is 0.125: errors up to 0.06 nats).
- Sampling is vectorised over [R, V]: repetition penalty (HF semantics, over the prompt's real tokens
  and the response so far; left padding excluded so a result does not depend on batch-mates' lengths),
  vision special tokens set to -inf, temperature, top-k, top-p (HF semantics, ties at the k-th logit kept),
  then an inverse-CDF draw: the first token whose cumulative probability (fp64) reaches u * total, for one
  uniform u per sequence and step -- an exact categorical draw without a host sync.
- Randomness is per sequence, never per batch: sample j of a request draws its uniforms for steps 0..S-1
  from a CPU generator seeded by (request seed, j) (`_row_uniforms`, drawn once per batch, not per token).
  A request's samples therefore do not depend on its batch-mates, the batching, or compaction, so ranks
  that each generate a share of the prompts sample exactly what one process would (up to the last bits of
  the logits). A request without a seed takes one from the engine's seed stream (`seed=` at construction),
  in request order, so a run is reproducible from its seed.
- Host syncs: one per decode step, the running count, to stop when all sequences are done and to
  compact: when at most half of the active rows still run, the finished ones are dropped from the KV
  cache and every per-row tensor (at most log2(R) copies; GRPO response lengths have a long tail).
  Only with stop strings does the step also copy its [A] new tokens to the host, where the sequences
  that have stop strings and still run decode their last (longest stop + 8) tokens and search them.
- Batches are bounded by `max_batch_tokens` >= (longest prompt + longest max_new_tokens) * R, the KV
  cache's size in tokens (Qwen2.5-VL-7B: 28 layers x 2 x 4 kv heads x 128 x 2 B = 57 KiB per token, so
  65536 tokens = 3.5 GiB). Requests keep their order; one request always fits alone.
- Under FSDP2 (vzero_fast/distributed.py) `generate` gathers the whole model once per call (`gathered`) and
  decodes with no communication; the gather is collective, so every rank calls `generate` equally often
  (an empty request list included).
- The KV cache is passed as `cache=` where the model's forward has that argument (transformers >= 5.24
  renamed `past_key_values`, which now warns until its removal in 5.40) and as `past_key_values=` before
  (5.17-5.23 would swallow an unknown `cache=` into **kwargs and silently decode without a cache).
- LoRA roles (vzero_fast/lora.py): a role's policy is a view of the one frozen base with its own adapter, so
  the engine samples through that view unchanged; `sync_weights(other_view)` switches the adapter between
  request batches by adopting another view (nothing is copied: every view holds the base's own tensors).
  LoRA adds 2 small matmuls per adapted layer and token (rank r: r * (in + out) MACs vs in * out).
- The KV cache is a transformers DynamicCache (grows by concatenation: O(length^2) copying; a static
  cache is future work). Nothing is held between calls, so `sleep` only returns cached allocator blocks.

Test: `pytest tests/test_rollout.py` (tiny random Qwen2.5-VL on CPU: ~10 s on 2 idle cores).
"""

from __future__ import annotations

import abc
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from vzero_fast.distributed import gathered

log = logging.getLogger("vzero_fast.rollout")

FINISH_REASONS = ("eos", "stop", "length")
_RUNNING, _EOS, _STOP, _LENGTH = 0, 1, 2, 3  # finish codes on the device; index FINISH_REASONS with code - 1


# ----------------------------------------------------------------------------------------------------------
# Requests and results


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample the responses of one request (vLLM's names and meanings)."""

    n: int = 1
    """Responses sampled from the prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 = greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with probability >= top_p (1.0 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    max_new_tokens: int = 64
    """Longest response in tokens; reaching it finishes with reason "length"."""
    repetition_penalty: float = 1.0
    """HF repetition penalty over prompt and response tokens (1.0 = off)."""
    stop: tuple[str, ...] = ()
    """Strings that end a response (reason "stop"); the text is cut before the first one."""
    ignore_eos: bool = False
    """Never sample eos (vLLM's ignore_eos): every response runs to max_new_tokens (fixed-length benchmarks)."""
    seed: int | None = None
    """Seed of this request's samples (see the module docstring); None = the engine's seed stream."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a sequence of strings, not the string {self.stop!r}")
        self.stop = tuple(self.stop)
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n),
            (self.temperature >= 0, "temperature", ">= 0", self.temperature),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0", self.top_k),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens",
             "an integer >= 1", self.max_new_tokens),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop),
            (self.seed is None or isinstance(self.seed, int), "seed", "None or an integer", self.seed),
        ]
        for ok, name, allowed, value in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


@dataclass(kw_only=True)
class Request:
    """One prompt: chat messages whose content is a string or a list of image / text parts."""

    messages: list[dict[str, Any]]
    """[{"role": ..., "content": str | [{"type": "image", "image": PIL.Image}, {"type": "text", "text": str}]}]"""
    params: SamplingParams = field(default_factory=SamplingParams)
    """How to sample this request's responses."""
    request_id: Any = None
    """Caller's id, passed through untouched."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Caller's data (e.g. the image's index or the ground truth), passed through untouched."""

    def __post_init__(self):
        for m in self.messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"a message needs 'role' and 'content', got {m!r}")
            if not isinstance(m["content"], str):
                for part in m["content"]:
                    if part.get("type") not in ("image", "text"):
                        raise ValueError(f"content parts are image or text, got {part!r}")

    @classmethod
    def from_image_text(cls, image, text: str, params: SamplingParams | None = None, *,
                        system: str | None = None, request_id: Any = None,
                        meta: dict[str, Any] | None = None) -> Request:
        """The usual request: an optional system message, then one user turn with an image and text."""
        messages = [{"role": "system", "content": system}] if system is not None else []
        content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        return cls(messages=messages, params=params or SamplingParams(), request_id=request_id, meta=meta or {})

    @property
    def images(self) -> list:
        """The images of the messages, in order (the order of their placeholders in the prompt)."""
        return [part["image"] for m in self.messages if not isinstance(m["content"], str)
                for part in m["content"] if part["type"] == "image"]


@dataclass
class Sample:
    """One sampled response. All tensors are on the CPU."""

    token_ids: torch.Tensor
    """[L] int64: the response only; eos included if produced; nothing after the token that ends a stop string."""
    text: str
    """Decoded response without special tokens, cut before the first stop string."""
    logprobs: torch.Tensor
    """[L] fp32: log_softmax(logits / T)[token] of the raw logits (T = 1 when greedy); see the module docstring."""
    finish_reason: str
    """"eos", "stop" or "length"."""


@dataclass
class RolloutOutput:
    """The n samples of one request and the encoded prompt the trainer re-scores them with (CPU tensors)."""

    request: Request
    prompt_ids: torch.Tensor
    """[P] int64: the prompt's tokens, no padding, image placeholders expanded."""
    mm_token_type_ids: torch.Tensor
    """[P] int64: 1 at image tokens (the training forward needs it for M-RoPE)."""
    pixel_values: torch.Tensor | None
    """[patches, C*t*p*p] this prompt's images (None without images)."""
    image_grid_thw: torch.Tensor | None
    """[images, 3] (t, h, w) patch grid of each image (None without images)."""
    samples: list[Sample]


@dataclass
class EngineStats:
    """The last `generate` call; tokens are generated (non-pad) response tokens."""

    requests: int = 0
    sequences: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens / wall seconds of the whole call (encoding, prefill and decode)."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**self.__dict__, "tokens_per_s": self.tokens_per_s}


# ----------------------------------------------------------------------------------------------------------
# The interface


class RolloutEngine(abc.ABC):
    """Generates responses for requests; `stats` describes the last call."""

    name: str = "?"
    syncs: int = 0
    """Weight loads so far: an engine that holds its own copy of the weights counts them (the native one never
    copies, so never loads)."""
    last_sync: dict[str, float] = {}  # read-only default: loading engines set their own
    """seconds, bytes and gbps of the last load."""

    def __init__(self):
        self.stats = EngineStats()

    @abc.abstractmethod
    def generate(self, requests: list[Request]) -> list[RolloutOutput]:
        """One output per request, in order, each with `request.params.n` samples."""

    @abc.abstractmethod
    def sync_weights(self, policy) -> None:
        """Make the next `generate` sample from `policy`'s current parameters. The trainer calls it after every
        optimizer step (grpo.Role) and after a resume loads weights (Trainer); a step's calls come while the
        engine sleeps, so an engine that cannot take weights then must keep them until `wake`."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """Release what the engine holds on the device while its role trains (grpo.Role.grpo_step calls it
        after the rollout and the reward, before the updates)."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Re-acquire what `sleep` released (called after the updates, before the next rollout)."""


ENGINES: dict[str, Any] = {}
"""Backends besides the built-in native and vllm ones: name -> factory(policy, **kwargs) -> RolloutEngine (tests'
probes). rollout.backend accepts a name once it is here."""


def make_engine(policy, backend: str = "native", *, options=None, **kwargs) -> RolloutEngine:
    """The one place a rollout backend is chosen and built (the trainer passes rollout.backend and the
    `rollout` config as `options`); logs which one runs. auto = vllm where it imports and builds an engine,
    else native, with the reason logged. With rollout.share_engine, `share_with=` another role's vLLM engine
    gives this role a view of that same engine (rollout_vllm.SharedVLLMEngine)."""
    if backend == "auto":
        from vzero_fast.rollout_vllm import vllm_unavailable

        reason = vllm_unavailable()
        if reason is None:
            try:
                return make_engine(policy, "vllm", options=options, **kwargs)
            except Exception as e:  # noqa: BLE001 - auto falls back on any failure to build, and says why
                reason = f"building a vLLM engine failed: {type(e).__name__}: {e}"
        log.warning("rollout.backend auto: native engine (%s)", reason)
        backend = "native"
    share_with = kwargs.pop("share_with", None)  # an engine of another role (rollout.share_engine: vLLM only)
    if backend == "native":
        if options is not None:
            kwargs.setdefault("max_batch_tokens", options.max_batch_tokens)
        engine = NativeEngine(policy, **kwargs)
    elif backend == "vllm":
        from vzero_fast.rollout_vllm import SharedVLLMEngine, VLLMEngine

        if isinstance(share_with, SharedVLLMEngine):
            engine = SharedVLLMEngine(share_with.engine, policy)
        else:
            engine = VLLMEngine(policy, options=options, **kwargs)
            if options is not None and options.share_engine:
                engine = SharedVLLMEngine(engine, policy)
    elif backend in ENGINES:
        engine = ENGINES[backend](policy, **kwargs)
    else:
        raise ValueError(f"unknown rollout backend {backend!r}; expected one of {sorted({'native', 'vllm', 'auto', *ENGINES})}")
    log.info("rollout backend: %s", engine.name)
    return engine


# ----------------------------------------------------------------------------------------------------------
# Logits processing (pure functions on [R, V] fp32 logits; the tests check each against a direct formula)


_LOGITS_PATH: dict[tuple[str, torch.dtype], str] = {}


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [R, H] @ weight [V, H]^T -> [R, V] fp32 logits.

    fp32 weights: F.linear. bf16/fp16 on CUDA: `torch.mm(..., out_dtype=float32)` (fp32 accumulate and
    output, no weight copy) where this torch has it, else an fp32 upcast of the weight (4*V*H bytes per call:
    2.2 GB for 7B, which is why it is the fallback). The path taken is logged once per (device, dtype).
    """
    key = (hidden.device.type, weight.dtype)
    if weight.dtype == torch.float32:
        path, out = "fp32 linear", F.linear(hidden.float(), weight)
    elif hidden.is_cuda and _LOGITS_PATH.get(key) != "fp32 upcast":
        try:
            path, out = "mm out_dtype=fp32", torch.mm(hidden.to(weight.dtype), weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            path, out = "fp32 upcast", F.linear(hidden.float(), weight.float())
    else:
        path, out = "fp32 upcast", F.linear(hidden.float(), weight.float())
    if _LOGITS_PATH.get(key) is None:
        _LOGITS_PATH[key] = path
        log.info("rollout logits on %s with %s weights: %s", key[0], weight.dtype, path)
    return out


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's repetition penalty: at seen tokens, positive logits / penalty, negative logits * penalty.

    logits [R, V], seen [R, V] bool, penalty [R] (1.0 = no change)."""
    p = penalty[:, None].to(logits.dtype)  # [R, 1]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def suppress_tokens(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Set the logits of token_ids [K] to -inf in place (vision special tokens must never be sampled)."""
    logits.index_fill_(-1, token_ids, float("-inf"))
    return logits


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, *,
                       max_k: int, any_top_p: bool) -> torch.Tensor:
    """Per-row top-k then top-p (HF semantics) on temperature-scaled logits [R, V]; removed -> -inf.

    top_k [R] (0 = off), top_p [R] (1.0 = off); max_k = max(top_k) and any_top_p = any(top_p < 1) are
    host-side facts of the params, so no tensor is read back."""
    neg_inf = float("-inf")
    if max_k > 0:
        kth = logits.topk(min(max_k, logits.shape[-1]), dim=-1).values  # [R, max_k] descending
        k = top_k.clamp(1, kth.shape[-1])
        thresh = kth.gather(-1, (k - 1)[:, None])  # [R, 1]: the k-th largest logit; ties at it are kept
        logits = logits.masked_fill((logits < thresh) & (top_k > 0)[:, None], neg_inf)
    if any_top_p:
        srt, idx = logits.sort(dim=-1)  # [R, V] ascending
        cum = srt.softmax(-1).cumsum(-1)  # [R, V]
        drop = cum <= (1 - top_p)[:, None].to(cum.dtype)
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, neg_inf))
    return logits


def sample_from_logits(logits: torch.Tensor, *, greedy: torch.Tensor, all_greedy: bool,
                       uniforms: torch.Tensor) -> torch.Tensor:
    """Token [R] per row: argmax where greedy [R], else the inverse-CDF draw from softmax(logits) at the
    row's uniform in (0, 1) (uniforms [R], fp64).

    The first index whose cumulative probability reaches u * total: for u > 0 it always has a positive
    probability (a token at -inf adds 0 to the sum, so it can never be the first to reach the threshold)."""
    best = logits.argmax(-1)  # [R]
    if all_greedy:
        return best
    cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)  # [R, V]; fp64 so a long vocabulary sums exactly enough
    target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]  # [R, 1]
    tok = torch.searchsorted(cdf, target)[:, 0].clamp_max_(logits.shape[-1] - 1)  # [R]
    return torch.where(greedy, best, tok)


def _row_uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """[R, steps] fp64 uniforms in (0, 1): row r from its own generator seeded by seeds[r] (one call per row
    and batch, none per token)."""
    out = torch.empty(len(seeds), steps, dtype=torch.float64)
    gen = torch.Generator()
    for r, seed in enumerate(seeds):
        torch.rand(steps, generator=gen.manual_seed(seed), dtype=torch.float64, out=out[r])
    return out.clamp_(min=2.0**-60)  # torch.rand may return exactly 0


# ----------------------------------------------------------------------------------------------------------
# Prompt encoding


def render_messages(policy, messages: list[dict[str, Any]]) -> str:
    """Chat-template text of the messages plus the assistant header; one <|image_pad|> per image part
    (the processor expands it). Image objects are left out of what the template sees."""
    plain = [m if isinstance(m["content"], str) else
             {**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
             for m in messages]
    return policy.processor.apply_chat_template(plain, add_generation_prompt=True)


@dataclass
class EncodedRequests:
    """The prompts of a list of requests as the trainer re-scores them: left-padded [N, T] CPU tensors (one
    processor call), every image's patches concatenated in request order."""

    texts: list[str]  # each request's chat text (`render_messages`)
    ids: torch.Tensor  # [N, T] int64
    mask: torch.Tensor  # [N, T]
    mm: torch.Tensor  # [N, T] mm_token_type_ids
    grid: torch.Tensor | None  # [images, 3]
    pixels: torch.Tensor | None  # [patches, C*t*p*p]
    prompt_lens: list[int]
    img_start: list[int]  # request b's images are img_start[b]:img_start[b + 1]
    patch_start: list[int]  # image i's patches are patch_start[i]:patch_start[i + 1]

    def prompt(self, b: int) -> dict[str, Any]:
        """RolloutOutput's prompt fields of request b (no padding)."""
        keep = self.mask[b].bool()
        i0, i1 = self.img_start[b], self.img_start[b + 1]
        return dict(prompt_ids=self.ids[b, keep].clone(), mm_token_type_ids=self.mm[b, keep].long(),
                    pixel_values=self.pixels[self.patch_start[i0]:self.patch_start[i1]] if i1 > i0 else None,
                    image_grid_thw=self.grid[i0:i1] if i1 > i0 else None)


def encode_requests(policy, requests: list[Request]) -> EncodedRequests:
    """One processor call over the requests' chat texts (`render_messages`) and images, left-padded."""
    images = [r.images for r in requests]
    flat = [im for ims in images for im in ims]
    texts = [render_messages(policy, r.messages) for r in requests]
    enc = policy.processor(text=texts, images=flat or None, padding_side="left")  # CPU tensors
    grid = enc.get("image_grid_thw")
    img_start = [0]
    for ims in images:
        img_start.append(img_start[-1] + len(ims))
    return EncodedRequests(texts=texts, ids=enc["input_ids"], mask=enc["attention_mask"], mm=enc["mm_token_type_ids"],
                           grid=grid, pixels=enc.get("pixel_values"), prompt_lens=enc["attention_mask"].sum(1).tolist(),
                           img_start=img_start,
                           patch_start=[0] + (grid.prod(-1).cumsum(0).tolist() if grid is not None else []))


def request_seeds(requests: list[Request], stream: torch.Generator) -> list[int]:
    """Each request's seed, fixed before any batching: its own, else the next of the engine's seed stream (drawn
    in request order, so a run is reproducible from the engine's seed)."""
    return [r.params.seed if r.params.seed is not None else int(torch.randint(1 << 62, (1,), generator=stream))
            for r in requests]


def _mix_seeds(seeds: list[int | None]) -> int:
    h = 0
    for s in seeds:
        h = (h * 1_000_003 + (-1 if s is None else s) + 2) % (1 << 62)
    return h


def sample_seeds(request_seed: int, n: int) -> list[int]:
    """The seeds of a request's n samples: sample j depends on (request seed, j) only."""
    return [_mix_seeds([request_seed, j]) for j in range(n)]


# ----------------------------------------------------------------------------------------------------------
# The native engine


class NativeEngine(RolloutEngine):
    """Generates with the policy's own parameters: batched prefill, one image encoding per prompt, a KV cache
    expanded n times, vectorised sampling. See the module docstring for the decisions."""

    name = "native"

    def __init__(self, policy, *, max_batch_tokens: int = 65536, seed: int = 0):
        super().__init__()
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.policy = policy
        self.max_batch_tokens = max_batch_tokens
        self._seed_stream = torch.Generator().manual_seed(seed)

    # -- hooks -------------------------------------------------------------------------------------------
    def sync_weights(self, policy) -> None:
        """Nothing to copy: the engine samples with the policy's parameters. A different Policy is adopted."""
        self.policy = policy

    def sleep(self) -> None:
        """Nothing is held between calls (the KV cache lives inside `generate`); hand cached blocks back."""
        if self.policy.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Nothing to re-acquire: the next `generate` allocates its cache."""

    # -- generate ----------------------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[RolloutOutput]:
        self.stats = stats = EngineStats(requests=len(requests))
        if not requests:
            with gathered(self.policy.model):  # under FSDP2 the gather is collective: take part anyway
                return []
        start = time.perf_counter()
        policy, model = self.policy, self.policy.model
        proc = policy.processor
        enc = encode_requests(policy, requests)
        ids, mask, mm, grid, pixels = enc.ids, enc.mask, enc.mm, enc.grid, enc.pixels
        prompt_lens, img_start, patch_start = enc.prompt_lens, enc.img_start, enc.patch_start
        seeds = request_seeds(requests, self._seed_stream)

        outputs: list[RolloutOutput] = []
        was_training = model.training
        model.eval()
        # Under FSDP2: one all-gather per group for the whole rollout phase, none per decode step.
        try:
            with gathered(model):
                for lo, hi in self._plan(requests, prompt_lens):
                    t_b = max(prompt_lens[lo:hi])  # left padding: the last t_b columns hold every prompt
                    i0, i1 = img_start[lo], img_start[hi]
                    p0, p1 = patch_start[i0], patch_start[i1]
                    b_grid = grid[i0:i1] if i1 > i0 else None
                    b_pixels = pixels[p0:p1] if i1 > i0 else None
                    params = [r.params for r in requests[lo:hi]]
                    with torch.inference_mode():
                        res = self._run_batch(ids[lo:hi, -t_b:], mask[lo:hi, -t_b:], mm[lo:hi, -t_b:],
                                              b_pixels, b_grid, params, seeds[lo:hi], stats)
                    tokens, logps, lengths, finish, cut = res
                    r = 0
                    for j, req in enumerate(requests[lo:hi]):
                        b = lo + j
                        samples = []
                        for _ in range(req.params.n):
                            n_tok = lengths[r]
                            tok = tokens[r, :n_tok].clone()
                            text = proc.tokenizer.decode(tok.tolist(), skip_special_tokens=True)
                            if cut[r]:
                                text = text[:_first_stop(text, req.params.stop)]
                            samples.append(Sample(token_ids=tok, text=text, logprobs=logps[r, :n_tok].clone(),
                                                  finish_reason=FINISH_REASONS[finish[r] - 1]))
                            r += 1
                        outputs.append(RolloutOutput(request=req, samples=samples, **enc.prompt(b)))
        finally:
            model.train(was_training)
        stats.seconds = time.perf_counter() - start
        log.debug("native rollout: %d requests, %d sequences in %d batches; %d prompt + %d generated tokens in "
                 "%.2f s (prefill %.2f s, decode %.2f s, %d steps): %.1f generated tokens/s",
                 stats.requests, stats.sequences, stats.batches, stats.prompt_tokens, stats.generated_tokens,
                 stats.seconds, stats.prefill_seconds, stats.decode_seconds, stats.decode_steps,
                 stats.tokens_per_s)
        return outputs

    def _plan(self, requests: list[Request], prompt_lens: list[int]) -> list[tuple[int, int]]:
        """Consecutive [lo, hi) batches with (longest prompt + longest response) * sequences <= the budget."""
        batches, lo, t_max, s_max, rows = [], 0, 0, 0, 0
        for i, (req, t) in enumerate(zip(requests, prompt_lens, strict=True)):
            t2, s2, rows2 = max(t_max, t), max(s_max, req.params.max_new_tokens), rows + req.params.n
            if i > lo and (t2 + s2) * rows2 > self.max_batch_tokens:
                batches.append((lo, i))
                lo, t2, s2, rows2 = i, t, req.params.max_new_tokens, req.params.n
            t_max, s_max, rows = t2, s2, rows2
        batches.append((lo, len(requests)))
        return batches

    def _run_batch(self, ids, mask, mm, pixels, grid, params: list[SamplingParams], seeds: list[int],
                   stats: EngineStats):
        """Prefill B prompts, decode R = sum(n) sequences. Returns CPU tokens [R, S], logprobs [R, S],
        lengths, finish codes and, per row, whether a stop string ended it (host lists)."""
        policy, model = self.policy, self.policy.model
        dev = policy.device
        weight = policy.lm_head_weight  # [V, H]
        vocab = weight.shape[0]
        tok_dec = policy.processor.tokenizer
        B, T = ids.shape
        ns = [p.n for p in params]
        R, S = sum(ns), max(p.max_new_tokens for p in params)
        ids, mask, mm = ids.to(dev), mask.to(dev), mm.to(dev)
        grid = grid.to(dev) if grid is not None else None
        row = torch.repeat_interleave(torch.arange(B, device=dev), torch.tensor(ns, device=dev))  # [R] -> prompt

        def per_row(values, dtype):  # a per-request value broadcast to its n rows: [R]
            return torch.tensor(values, dtype=dtype, device=dev)[row]

        temp = per_row([p.temperature for p in params], torch.float32)
        greedy = temp == 0
        temp = torch.where(greedy, torch.ones_like(temp), temp)  # greedy rows report T = 1 log-probs
        top_k = per_row([p.top_k for p in params], torch.long)
        top_p = per_row([p.top_p for p in params], torch.float32)
        penalty = per_row([p.repetition_penalty for p in params], torch.float32)
        max_new = per_row([p.max_new_tokens for p in params], torch.long)
        no_eos = per_row([p.ignore_eos for p in params], torch.bool) if any(p.ignore_eos for p in params) else None
        max_k = max(p.top_k for p in params)
        any_top_p = any(p.top_p < 1 for p in params)
        all_greedy = all(p.temperature == 0 for p in params)
        use_penalty = any(p.repetition_penalty != 1 for p in params)
        eos_host = set(_as_list(policy.eos_token_id))
        eos = torch.tensor(sorted(eos_host), device=dev)
        vision = torch.tensor(sorted(policy.vision_token_ids), device=dev, dtype=torch.long)
        pad = policy.pad_token_id
        uniforms = None  # [R, S] fp64: row r's uniform for each decode step (see the module docstring)
        if not all_greedy:
            uniforms = _row_uniforms([s for seed, n in zip(seeds, ns, strict=True) for s in sample_seeds(seed, n)], S).to(dev)

        # Prefill: the vision tower runs here, once per image of the B prompts.
        t0 = time.perf_counter()
        pos, _ = model.base_model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=mask)  # [3, B, T]
        next_pos = pos.amax(dim=(0, 2)) + 1  # [B]: M-RoPE position of the first response token
        cache = DynamicCache(config=model.config)
        kv = {_cache_kwarg(type(model.base_model)): cache}
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               pixel_values=pixels.to(dev) if pixels is not None else None, image_grid_thw=grid,
                               use_cache=True, **kv)
        hidden = out.last_hidden_state[:, -1][row]  # [R, H]: left padding puts every prompt's end last
        cache.reorder_cache(row)  # [B, ...] -> [R, ...]: the n samples share the prompt's cache
        seen = None
        if use_penalty:
            # [R, V] tokens seen so far; left padding goes to a dummy column V that is dropped.
            seen = torch.zeros(B, vocab + 1, dtype=torch.bool, device=dev)
            seen.scatter_(1, ids.masked_fill(mask == 0, vocab), True)
            seen = seen[:, :vocab][row]
        full_mask = torch.cat([mask[row], mask.new_ones(R, S)], dim=1)  # [R, T + S]
        step_pos = next_pos[row]  # [R]
        _sync(dev)
        t1 = time.perf_counter()
        stats.prefill_seconds += t1 - t0

        tokens = torch.full((R, S), pad, dtype=torch.long, device=dev)  # [R, S]
        logps = torch.zeros(R, S, dtype=torch.float32, device=dev)  # [R, S]
        finish = torch.zeros(R, dtype=torch.long, device=dev)  # [R] finish code, 0 = running
        lengths = torch.zeros(R, dtype=torch.long, device=dev)  # [R] tokens emitted while running
        act = torch.arange(R, device=dev)  # [A] global row of each active (cache) row
        running = torch.ones(R, dtype=torch.bool, device=dev)  # [A]
        # Host-side stop-string state: global row -> (its stop strings, tokens so far).
        stop_of = {r: params[b].stop for r, b in enumerate(row.tolist()) if params[b].stop}
        stop_hist: dict[int, list[int]] = {r: [] for r in stop_of}
        stop_window = {r: max(len(s) for s in st) + 8 for r, st in stop_of.items()}  # tokens >= 1 char each
        cut = [False] * R  # host: a stop string ended this row
        act_host = list(range(R))
        steps = 0
        for t in range(S):
            raw = lm_head_logits(hidden, weight)  # [A, V] fp32
            x = raw / temp[:, None]  # [A, V]: the distribution the trainer scores with
            lse = x.logsumexp(-1)  # [A], taken before x is processed in place
            if seen is not None:  # HF order: penalty, then temperature
                x = apply_repetition_penalty(raw, seen, penalty) / temp[:, None]
            x = suppress_tokens(x, vision)
            if no_eos is not None:  # ignore_eos rows: eos gets probability 0
                x[:, eos] = x[:, eos].masked_fill(no_eos[:, None], float("-inf"))
            x = top_k_top_p_filter(x, top_k, top_p, max_k=max_k, any_top_p=any_top_p)
            tok = sample_from_logits(x, greedy=greedy, all_greedy=all_greedy,
                                     uniforms=uniforms[act, t] if uniforms is not None else None)  # [A]
            lp = raw.gather(-1, tok[:, None])[:, 0] / temp - lse  # [A] log_softmax(raw / T)[tok]
            tok = tok.masked_fill(~running, pad)
            tokens[act, t] = tok
            logps[act, t] = lp.masked_fill(~running, 0.0)
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            is_eos = running & torch.isin(tok, eos)
            at_len = running & ~is_eos & (t + 1 >= max_new)
            finish[act] = torch.where(is_eos, _EOS, torch.where(at_len, _LENGTH, finish[act]))
            lengths[act] += running.long()  # still this step's running flags: the eos token counts
            was_running = running
            running = running & ~is_eos & ~at_len
            steps += 1
            # The step's one host sync: the running count, plus the new tokens when stop strings are in play.
            if stop_of:
                host_tok, host_was = torch.stack([tok, was_running.long()]).tolist()
                stopped = []
                for a, r in enumerate(act_host):  # per-sequence string matching: only rows with stop strings
                    if r in stop_of and host_was[a] and host_tok[a] not in eos_host:
                        stop_hist[r].append(host_tok[a])
                        tail = tok_dec.decode(stop_hist[r][-stop_window[r]:], skip_special_tokens=True)
                        if any(s in tail for s in stop_of[r]):
                            stopped.append(a)
                            cut[r] = True
                if stopped:
                    idx = torch.tensor(stopped, device=dev)
                    running[idx] = False
                    finish[act[idx]] = _STOP
            n_run = int(running.sum())
            if n_run == 0 or t + 1 == S:
                break
            if 2 * n_run <= len(act):  # compact: drop finished rows from the cache and every [A] tensor
                keep = running.nonzero()[:, 0]  # [A']
                cache.reorder_cache(keep)
                act, running, full_mask, step_pos, tok = (v[keep] for v in (act, running, full_mask, step_pos, tok))
                temp, greedy, top_k, top_p, penalty, max_new = (v[keep] for v in (temp, greedy, top_k, top_p,
                                                                                  penalty, max_new))
                seen = seen[keep] if seen is not None else None
                no_eos = no_eos[keep] if no_eos is not None else None
                act_host = act.tolist()
            # One decode step for the active rows: text position continues after the prompt on all 3 axes.
            out = model.base_model(input_ids=tok[:, None], attention_mask=full_mask[:, : T + t + 1],
                                   position_ids=(step_pos + t).view(1, -1, 1).expand(3, -1, 1),
                                   use_cache=True, **kv)
            hidden = out.last_hidden_state[:, -1]  # [A, H]
        _sync(dev)
        stats.decode_seconds += time.perf_counter() - t1
        stats.decode_steps += steps
        stats.batches += 1
        stats.sequences += R
        stats.prompt_tokens += int(mask.sum())
        lengths_host = lengths.tolist()
        stats.generated_tokens += sum(lengths_host)
        return tokens.cpu(), logps.cpu(), lengths_host, finish.tolist(), cut


@functools.cache
def _cache_kwarg(model_type: type) -> str:
    """The name under which `model_type.forward` takes the KV cache (see the module docstring)."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else len(text)


def _as_list(x) -> list[int]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
