"""Many GPUs, one trainer: torchrun + FSDP2 (`fully_shard`), data-parallel rollouts, full-state checkpoints.

Launch (the README's lines):
    torchrun --standalone --nproc_per_node=8 -m vzero_fast train --recipe vzero --preset vzero-7b --model DIR ...
    torchrun --nnodes=2 --node_rank=0|1 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m vzero_fast train ...       (same command on every node; --out on a shared filesystem)

Decisions:
- One process per device, started by torchrun; `init` reads its environment (RANK, WORLD_SIZE, LOCAL_RANK):
  nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU. Without torchrun the run is one plain process, no
  process group exists, and every helper below is a no-op (so single-process code paths are unchanged).
- `dist.timeout_s` bounds every collective: a rank that dies makes the others fail with an error instead of
  waiting forever (gloo sees the closed connection at once, NCCL's watchdog aborts after the timeout, and
  torchrun stops the remaining workers as soon as one exits non-zero).
- Sharding (`shard_model`): fully_shard on every vision block and every text decoder layer, then on the whole
  model (the root group: embeddings, final norm, patch embedding, merger, lm_head). On CUDA,
  MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) over fp32 master weights: with AdamW that is
  16 bytes per parameter, divided by the number of ranks; `dist.cpu_offload` moves the shards, gradients and
  optimizer state to CPU memory (FSDP2's CPUOffloadPolicy).
- LoRA (vzero_fast/lora.py): a role is a view of one frozen base; `shard_model(view, ignored_params=base)`
  shards its adapters only (fp32, no mixed precision) and leaves the base replicated on every rank, untouched
  (FSDP's ignored_params): the base is shared by every view, and sharding it per view would copy it. The
  adapters' gradients are reduce-scattered like any other; checkpoints gather the adapters alone
  (lora.full_adapter_state) and load them into each rank's shard without communication.
- Our forwards call `model.base_model` (logits are never built) and hand lm_head's weight to the streaming
  log-prob kernel, so the root module's own forward never runs. Three consequences, handled here: a forward
  pre-hook on base_model unshards the root group (a no-op when already gathered); the gradients of the root's
  parameters, lm_head's included, are reduce-scattered by FSDP's end-of-backward callback (as for any group
  whose inputs need no gradient); and one forward through the root at wrap time makes FSDP take the HF model
  as its root (FSDP picks the root at the first forward it sees). `reshard(model)` frees the gathered root
  after no-grad passes (FSDP frees it after each backward). Read `lm_head.weight` after the forward: before
  it, it is a sharded DTensor.
- Gradient clipping (`clip_grad_norm_`) takes the global norm as sqrt(all_reduce(sum of local squares)),
  computed where the shards live (GPU, or CPU with offload).
- Gradient reduction is a plain SUM (set_gradient_divide_factor(1) with sum-only comms; gloo has no
  PREMUL_SUM): the GRPO loss divides by the GLOBAL token (or sequence) count of the mini-batch, all-reduced
  before backward (grpo.py), so the sum over ranks is exactly the one-process gradient. FSDP's default
  average would need the loss multiplied by the world size instead.
- Every rank must run the same number of forward and backward passes through a sharded model (each pass
  all-gathers): grpo.py pads a rank's micro-batches with zero-weight dummy passes up to the global maximum.
  `set_reduce_scatter_unused_params(True)` keeps the reduce-scatters matched when a group got no gradient on
  some rank; `shard_model` gathers every group once so that all of them exist on every rank. Torch 2.11 lacks
  that method: there a training forward without an image raises (`_match_unused_reduce_scatters`).
- Rollouts: each rank generates its own prompts. `gathered(model)` unshards every group once and turns
  reshard-after-forward off for the rollout phase, so decode steps communicate nothing (no per-token
  all-gather) and ranks may decode different numbers of steps; it reshards on exit.
- Checkpoints: `full_state_dict` gathers the HF-keyed full state dict to rank 0 (others get {}), which writes
  the HF directory; `optimizer_state` is the full AdamW state keyed by parameter name; both load with a
  broadcast from rank 0. A run therefore resumes with any number of ranks, one included.
- Exit: `shutdown` (a barrier, then destroy_process_group), then `end_process(code)`, which ends a torchrun
  rank with os._exit after flushing: torch keeps a gloo group's threads alive past destroy_process_group, and
  in interpreter finalization they could abort the process (SIGABRT after a finished run).
- Test-only hook: with VZERO_TEST_DIE_AT_STEP=k, rank VZERO_TEST_DIE_RANK (default 1) exits at once
  (os._exit(1)) after global step k (`die_for_test`; tests/test_distributed.py, the dying-rank test).

Test: `pytest tests/test_distributed.py` (2 gloo ranks on CPU under torchrun).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vzero_fast.config import ConfigError, DistConfig
from vzero_fast.model import resolve_device

log = logging.getLogger("vzero_fast.distributed")
_joined = False  # whether this process joined a torchrun group (then `end_process` skips finalization)

TEST_DIE_ENV = "VZERO_TEST_DIE_AT_STEP"
TEST_DIE_RANK_ENV = "VZERO_TEST_DIE_RANK"


@dataclass(frozen=True)
class World:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    """Where this rank computes (cuda:LOCAL_RANK under torchrun on CUDA)."""
    fsdp: bool = False
    """Whether models are sharded with FSDP2."""
    cfg: DistConfig = field(default_factory=DistConfig)
    """The run's [dist] settings."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --------------------------------------------------------------------------------------------- the group

def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(cfg: DistConfig, device: str = "auto") -> World:
    """Join torchrun's process group (when launched by torchrun) and pick this rank's device."""
    if not launched_by_torchrun():
        if cfg.fsdp == "on":
            raise ConfigError("dist.fsdp: 'on' needs a torchrun launch (torchrun --nproc_per_node=1 ... for one rank)")
        if cfg.cpu_offload:
            raise ConfigError("dist.cpu_offload: needs FSDP, i.e. a torchrun launch")
        return World(device=resolve_device(device), cfg=cfg)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and cfg.fsdp == "off":
        raise ConfigError(f"dist.fsdp: 'off' cannot run {world} ranks; use auto or on")
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif cfg.cpu_offload:
        raise ConfigError("dist.cpu_offload: needs CUDA (on the CPU the parameters already live in CPU memory)")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    global _joined
    _joined = True
    fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and world > 1)
    if cfg.cpu_offload and not fsdp:
        raise ConfigError("dist.cpu_offload: needs FSDP (one rank: --dist.fsdp on)")
    log.info("rank %d of %d (local %d): %s on %s, FSDP2 %s, collective timeout %.0f s", rank, world, local_rank,
             backend, dev, "on" if fsdp else "off", cfg.timeout_s)
    return World(rank=rank, world_size=world, local_rank=local_rank, device=dev, fsdp=fsdp, cfg=cfg)


def shutdown() -> None:
    """The clean end of a run; every rank calls it, then `end_process`. A barrier first, so that no rank
    tears down while a peer is still in a collective; then the group is destroyed. Not for failure paths: a
    dead peer fails the barrier, a hung one holds it dist.timeout_s."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def end_process(code: int) -> int:
    """End a torchrun rank with `code` after `shutdown`, without interpreter finalization; elsewhere (a plain
    run, a test calling cli.main in-process) return `code` for the caller to return.

    Why: `destroy_process_group` only unregisters the group. Its gloo threads (2 workers, the TCP loop) keep
    running into finalization and exit() on every rank, because torch keeps the group referenced (DTensor's
    sharding-propagation and redistribution caches hold DeviceMesh objects, which hold their groups; seen with
    gdb: ~ProcessGroupGloo never runs). A C++ thread that touches Python there (a worker dropping the last
    reference to its collective's tensors takes the GIL) is ended by Python 3.11's finalization with a forced
    unwind through noexcept code: "terminate called without an active exception", SIGABRT, torchrun exit 1
    (seen in 1 of 20 2-rank resumes under load, after every rank's last line; pytorch#190489). Nothing public
    frees the group, so the rank leaves without finalization: logs and stdio flushed first; the trainer has
    closed its files."""
    if not _joined:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe must not change the code
            stream.flush()
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A new tensor: `t` reduced over the ranks ("sum" or "max"), on t's device; `t` itself when alone."""
    if not is_distributed():
        return t
    x = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x.to(t.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (`[obj]` when alone); every rank must call it."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_divisible(count: int, what: str) -> None:
    """Data-parallel steps split `count` prompts evenly: every rank gets the same number of groups."""
    if count % world_size():
        raise ConfigError(f"{what}: {count} is not divisible by the {world_size()} ranks")


def die_for_test(global_step: int) -> None:
    """The dying-rank test's hook (see the module docstring); nothing happens unless its env var is set."""
    at = os.environ.get(TEST_DIE_ENV)
    if at is not None and global_step == int(at) and rank() == int(os.environ.get(TEST_DIE_RANK_ENV, 1)):
        log.error("%s=%s: rank %d exits now (test hook)", TEST_DIE_ENV, at, rank())
        os._exit(1)


# ------------------------------------------------------------------------------------------------ FSDP2

def _fsdp_api():
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    return fully_shard, FSDPModule, MixedPrecisionPolicy, CPUOffloadPolicy


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, _fsdp_api()[1])


def _fsdp_modules(model: torch.nn.Module) -> list:
    fsdp_module = _fsdp_api()[1]
    return [m for m in model.modules() if isinstance(m, fsdp_module)]


def mixed_precision_dtype(world: World) -> torch.dtype | None:
    """The compute dtype FSDP casts parameters to (None: no mixed precision)."""
    mp = world.cfg.mixed_precision
    if not world.fsdp or mp == "off" or (mp == "auto" and world.device.type != "cuda"):
        return None
    return torch.bfloat16


def shard_model(model: torch.nn.Module, world: World, *,
                ignored_params: set[torch.nn.Parameter] | None = None) -> torch.nn.Module:
    """Apply FSDP2 to a Qwen2.5-VL model in place (vision blocks, decoder layers, root); returns it.

    `ignored_params` stay unsharded and untouched (a LoRA view's shared frozen base: only its adapters are
    sharded, in their own fp32, without mixed precision)."""
    fully_shard, _, MixedPrecisionPolicy, CPUOffloadPolicy = _fsdp_api()
    kwargs: dict[str, Any] = {}
    param_dtype = mixed_precision_dtype(world) if not ignored_params else None
    if ignored_params:
        kwargs["ignored_params"] = ignored_params
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if world.cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    base = model.base_model
    units = [*base.visual.blocks, *base.language_model.layers]
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    for m in _fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)  # SUM: the loss already divides by the global count
        if hasattr(m, "set_force_sum_reduction_for_comms"):
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; a factor of 1 needs no scaling
    _match_unused_reduce_scatters(model, world)
    # Our forwards enter at base_model: gather the root group (embeddings, norm, merger, lm_head) first.
    base.register_forward_pre_hook(lambda module, args: model.unshard())
    # FSDP takes the first module it sees run forward as its root: make that the whole model.
    was_training = model.training
    with torch.no_grad():
        model.eval()
        ids = torch.zeros(1, 1, dtype=torch.long, device=world.device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    model.train(was_training)
    with gathered(model):  # every group gathered once on every rank (see the module docstring)
        pass
    from torch.distributed.tensor import DTensor

    sharded = sum(p.numel() for p in model.parameters() if isinstance(p, DTensor))
    log.info("FSDP2: %d units + root over %d ranks; mixed precision %s; CPU offload %s; %.2fM parameters sharded, "
             "%.2fM replicated (ignored)", len(units), world.world_size, param_dtype or "off",
             "on" if world.cfg.cpu_offload else "off", sharded / 1e6,
             sum(p.numel() for p in ignored_params or ()) / 1e6)
    return model


UNUSED_PARAMS_API = "set_reduce_scatter_unused_params"


def _match_unused_reduce_scatters(model: torch.nn.Module, world: World) -> None:
    """Keep every rank in every reduce-scatter when a parameter gets no gradient on some ranks.

    Where FSDPModule has `set_reduce_scatter_unused_params` (torch 2.13 has it; 2.11 does not), such a
    parameter contributes zeros. Without it, a rank whose backward gives a group no gradient skips that
    group's reduce-scatter (an NCCL hang until dist.timeout_s) or sends a different set of gradients.
    Here every training pass runs the vision tower (real micro-batches and the zero-weight dummy passes
    both carry an image), which gives every parameter a gradient on every rank; so on such a torch a
    training forward without an image raises at once instead of hanging the ranks later."""
    if hasattr(model, UNUSED_PARAMS_API):
        model.set_reduce_scatter_unused_params(True)
        return
    log.warning("torch %s: FSDPModule has no %s; every training pass must run the vision tower on every rank "
                "(a training forward without an image raises)", torch.__version__, UNUSED_PARAMS_API)
    if world.world_size > 1:
        model.base_model.register_forward_pre_hook(_require_image_in_training_pass, with_kwargs=True)


def _require_image_in_training_pass(module, args, kwargs) -> None:
    if torch.is_grad_enabled() and kwargs.get("pixel_values") is None:
        raise RuntimeError(f"a training forward without an image under FSDP2 on torch {torch.__version__}, which "
                           f"lacks FSDPModule.{UNUSED_PARAMS_API}: the vision parameters would get gradients on "
                           "some ranks only and the reduce-scatters would not match (a hang under NCCL). Give "
                           "every prompt an image, or use a torch that has the method.")


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """The whole model unsharded for a rollout phase: one all-gather per group on entry, none per decode step,
    resharded on exit. A plain model passes through."""
    if not is_sharded(model):
        yield
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    handles = [m.unshard(async_op=True) for m in modules]
    for h in handles:
        if h is not None:
            h.wait()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's defaults: the root keeps its params


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered root group (after no-grad passes; a backward frees it by itself)."""
    if is_sharded(model):
        model.reshard()


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (same clip coefficient: max_norm / (norm + 1e-6), at most 1); for sharded
    gradients the global norm is sqrt(all_reduce(sum of the local shards' squares)), computed on the shards'
    own device, so that it also works with CPU-offloaded shards over NCCL. Returns the norm (fp32 scalar)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    dev = local[0].device
    sq = torch.stack([t.detach().float().pow(2).sum().to(dev) for t in local]).sum()  # this rank's shards
    norm = all_reduce(sq).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for t in local:
        t.detach().mul_(coef.to(t.device, t.dtype))
    return norm


# ------------------------------------------------------------------------------------------ state dicts

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict: gathered to rank 0's CPU when sharded (other ranks get {}; every rank must
    call it), the model's own otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict keyed like model.state_dict(); when sharded only rank 0's `state` is read."""
    if not is_sharded(model):
        own = model.state_dict()
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor.to(own[name].dtype))
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state if is_main() else {},
                         options=_options(full_state_dict=True, broadcast_from_rank0=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name (rank 0 only when sharded; every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not is_sharded(model):
        return get_optimizer_state_dict(model, optimizer)
    return get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`, from a run with any number of ranks (rank 0's `state` when sharded).

    Not strict: a trainable parameter that never received a gradient (the vision tower of a text-only role such
    as MM-Zero's Proposer) has no AdamW state in the checkpoint, exactly as in the optimizer that saved it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not is_sharded(model):
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options(strict=False))
        return
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state if is_main() else {},
                             options=_options(full_state_dict=True, broadcast_from_rank0=True, strict=False))
