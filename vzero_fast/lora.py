"""LoRA: every trained role as an adapter over ONE frozen base model held in memory once.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A [r, in], B [out, r]; W, b frozen and shared

A role's model is a *view* of the base (`attach`): a copy of the module tree whose parameters and buffers are
the base's own tensors (same objects: no byte of the base is copied), with the selected nn.Linear layers
replaced by `LoraLinear`, which reads the shared weight and adds its own A and B. Everything that took a
role's HF model before (forward_hidden, the native engine, generate, gradient checkpointing, the optimizer
over `requires_grad` parameters) takes a view unchanged; the trainer only builds views instead of loading
copies (`Trainer.load_policy`).

Decisions:
- Our own ~60 lines instead of PEFT's `PeftModel`: PEFT wraps the HF model (`PeftModel.base_model` is its
  LoraModel, not the HF model's inner decoder that `forward_hidden` and the engine call) and keeps several
  adapters in ONE module tree behind a global `set_adapter` switch, so every forward of every role would have
  to set the right adapter first, and a missed switch silently scores with another role's weights. Views have
  no switch: a role's module IS its adapter. The numerics are PEFT's (tests/test_lora.py compares the forward
  with PEFT's): A kaiming-uniform(a=sqrt(5)), B = 0 (a fresh adapter is exactly the base), the adapter's
  input cast to the adapter's dtype, fp32 adapters over a bf16/fp16 base (PEFT's autocast_adapter_dtype),
  `(base(x) + lora(x)).to(base(x).dtype)`. Checkpoints are PEFT's directory format (`save_adapter`), which
  `peft.PeftModel.from_pretrained` loads.
- lm_head never gets an adapter (config check): the fused log-prob kernel streams `lm_head.weight` as it is;
  an adapted head would need W + s*B@A materialised per call ([V, H]: 1.1 GB at 7B in bf16) or a second
  low-rank term inside the kernel. The decoder's adapters already move every hidden state the head reads.
- The vision tower is in (`model.lora.vision`) or out (frozen base: no adapter, no gradient).
- A fresh adapter equals the base, so the iteration-1 KL reference of a role is the base itself (no copy,
  no adapter); a later stage's reference is a view with a frozen copy of the stage's starting adapter
  (`frozen_copy`, or loaded from `checkpoints/<role>/iter-<k-1>`).
- Export (`export_merged`, `vzero-fast export --merge ADAPTER --out DIR`): the base from disk with
  W + (alpha/r) B @ A computed in fp32 and stored in the base's dtype, written as an HF directory
  (checkpoint.save_model_dir) that transformers and vLLM load like the base.

Test: `pytest tests/test_lora.py` (forward vs PEFT and vs the formula, zero-copy views, log-probs through the
fused kernel, checkpoints, export) and `tests/test_lora_train.py` (toy recipe learns, V-Zero + exact resume).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger("vzero_fast.lora")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a model wrapped by PeftModel
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoraSpec:
    """What a view carries about its adapters (`model.vzero_lora`)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    """Module names (as in the base's named_modules) that hold an adapter."""
    base: nn.Module
    """The shared base model (not a submodule of the view: never registered, never saved)."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen nn.Linear's weight and bias (the base's own Parameters) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the shared Parameter itself (registered under the same name: HF keys stay)
        self.bias = base.bias
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dtype)  # [r, in]
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dtype)  # [out, r]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # [..., out] in the base dtype
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return (out + self.lora_B(self.lora_A(x)) * self.scaling).to(out.dtype)


# ----------------------------------------------------------------------------------------- which layers

def target_names(model: nn.Module, target_modules: str = "all-linear", *, vision: bool = False) -> list[str]:
    """Names of the nn.Linear layers of an HF model that get an adapter: all of them (all-linear) or those whose
    last name part is in the comma list; never the output embedding (lm_head); the vision tower's only when
    `vision`. ValueError when nothing matches."""
    head = model.get_output_embeddings()
    visual = getattr(model.base_model, "visual", None)
    in_vision = {id(m) for m in visual.modules()} if visual is not None else set()
    wanted = None if target_modules.strip() == "all-linear" else {t.strip() for t in target_modules.split(",")}
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m is not head and (vision or id(m) not in in_vision)
             and (wanted is None or name.rsplit(".", 1)[-1] in wanted)]
    if not names:
        raise ValueError(f"model.lora.target_modules {target_modules!r} matches no linear layer"
                         f"{'' if vision else ' outside the vision tower'}")
    return names


# ---------------------------------------------------------------------------------------------- views

def attach(base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0, target_modules: str = "all-linear",
           vision: bool = False, trainable: bool = True, targets: list[str] | None = None) -> nn.Module:
    """A view of `base` with a fresh adapter (B = 0: it computes exactly what the base does).

    The view's module tree is new; every parameter and buffer of the base is shared by identity. Only the
    adapters require grad (when `trainable`). `targets` (module names) overrides the selection."""
    if rank < 1:
        raise ValueError(f"a LoRA adapter needs rank >= 1, got {rank}")
    shared: dict[int, object] = {id(t): t for t in (*base.parameters(), *base.buffers())}
    shared[id(base.config)] = base.config
    view = copy.deepcopy(base, memo=shared)  # new modules, the same tensors
    names = list(targets) if targets is not None else target_names(base, target_modules, vision=vision)
    base_dtype = base.get_output_embeddings().weight.dtype
    dtype = torch.float32 if base_dtype in LOW_PRECISION else base_dtype  # PEFT's autocast_adapter_dtype
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = view.get_submodule(parent) if parent else view
        layer = getattr(owner, child)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"LoRA target {name} is a {type(layer).__name__}, not an nn.Linear")
        setattr(owner, child, LoraLinear(layer, rank=rank, alpha=alpha, dropout=dropout, dtype=dtype))
    for n, p in view.named_parameters():
        p.requires_grad_(trainable and _is_adapter(n))
    view.vzero_lora = LoraSpec(rank=rank, alpha=float(alpha), dropout=float(dropout), targets=tuple(names),
                               base=base)
    return view


def spec(model: nn.Module) -> LoraSpec | None:
    """The adapter spec of a view, None for a plain model."""
    return getattr(model, "vzero_lora", None)


def has_adapters(model: nn.Module) -> bool:
    return spec(model) is not None


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of a view by name (`...q_proj.lora_A.weight`), detached, not copied."""
    return {n: p.detach() for n, p in model.named_parameters() if _is_adapter(n)}


def frozen_copy(model: nn.Module) -> nn.Module:
    """Another view of the same base with a frozen copy of `model`'s adapters (a KL reference): the adapters'
    bytes are copied, the base's are not."""
    s = spec(model)
    ref = attach(s.base, rank=s.rank, alpha=s.alpha, dropout=s.dropout, targets=list(s.targets), trainable=False)
    load_adapter_state(ref, full_adapter_state(model))
    return ref.eval()


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors as full CPU copies; FSDP2-sharded adapters are gathered (collective: every rank
    calls, in the same parameter order)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        if _is_adapter(n):
            t = p.detach()
            out[n] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu().clone()
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full adapter tensors (our names) into a view, each rank into its own shard when FSDP2-sharded (no
    communication: every rank holds the full tensors); KeyError naming what is missing or unexpected."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = dict(model.named_parameters())
    mine = {n for n in own if _is_adapter(n)}
    missing, extra = sorted(mine - state.keys()), sorted(state.keys() - mine)
    if missing or extra:
        raise KeyError(f"adapter mismatch: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
                       f"{extra[:3]}{' ...' if len(extra) > 3 else ''}")
    with torch.no_grad():
        for n in sorted(mine):
            p, full = own[n], state[n]
            if isinstance(p, DTensor):
                shard = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
            else:
                p.copy_(full.to(p.device, p.dtype))


# ---------------------------------------------------------------------------------------- checkpoints

def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def peft_config(s: LoraSpec, base_path: str | Path) -> dict:
    """adapter_config.json in PEFT's LoraConfig fields; target_modules are the exact module names."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(Path(base_path).resolve()),
            "r": s.rank, "lora_alpha": s.alpha, "lora_dropout": s.dropout, "target_modules": list(s.targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "inference_mode": True}


def save_adapter(model: nn.Module, out: str | Path, *, base_path: str | Path,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a view's adapter as a PEFT adapter directory at `out`, atomically (a `.tmp-*` sibling renamed into
    place). `state` (our names) replaces the view's own tensors (e.g. a gathered FSDP state)."""
    out = Path(out)
    state = adapter_state(model) if state is None else {n: t for n, t in state.items() if _is_adapter(n)}
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({PEFT_PREFIX + n: t.detach().cpu().contiguous() for n, t in state.items()}, tmp / ADAPTER_WEIGHTS)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(spec(model), base_path), indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors keyed by our names) of a PEFT adapter directory."""
    path = Path(path)
    if not is_adapter_dir(path):
        raise FileNotFoundError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{path}: only plain LoRA adapters are supported (peft_type LORA, no DoRA, no rsLoRA)")
    raw = load_file(path / ADAPTER_WEIGHTS)
    state = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in raw.items()}
    return config, state


def load_adapter_into(model: nn.Module, path: str | Path) -> None:
    """Load a PEFT adapter directory into a view whose adapters have the same layers, rank and alpha."""
    config, state = read_adapter(path)
    s = spec(model)
    if s is None:
        raise ValueError(f"{path} is a LoRA adapter, but the model has no adapters (model.lora.rank is 0)")
    if (config["r"], float(config["lora_alpha"])) != (s.rank, s.alpha):
        raise ValueError(f"{path}: adapter rank {config['r']} alpha {config['lora_alpha']}, but model.lora has "
                         f"rank {s.rank} alpha {s.alpha}")
    load_adapter_state(model, state)


def attach_from(base: nn.Module, path: str | Path, *, trainable: bool = False) -> nn.Module:
    """A view of `base` with the adapter of a PEFT directory (its rank, alpha, dropout and layers)."""
    config, _ = read_adapter(path)
    targets = config["target_modules"]
    if isinstance(targets, str):  # PEFT also allows one regex over module names
        import re

        targets = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
    view = attach(base, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                  dropout=float(config.get("lora_dropout", 0.0)), targets=list(targets), trainable=trainable)
    load_adapter_into(view, path)
    return view


# ---------------------------------------------------------------------------------------------- export

@torch.no_grad()
def merge_into(model: nn.Module, config: dict, state: dict[str, torch.Tensor]) -> None:
    """W += (alpha / r) B @ A for every adapted layer of a plain HF model, in fp32, stored in W's dtype."""
    scaling = float(config["lora_alpha"]) / int(config["r"])
    layers = {n for n in (k.rsplit(".lora_", 1)[0] for k in state)}
    for name in sorted(layers):
        layer = model.get_submodule(name)
        a, b = state[f"{name}.lora_A.weight"].float(), state[f"{name}.lora_B.weight"].float()
        w = layer.weight
        w.copy_((w.float() + (b.to(w.device) @ a.to(w.device)) * scaling).to(w.dtype))


def export_merged(adapter: str | Path, out: str | Path, *, base: str | Path | None = None) -> Path:
    """Merge a PEFT adapter directory into its base (adapter_config.json's base_model_name_or_path, or `base`)
    and write an HF model directory at `out` in the base's stored dtype."""
    from vzero_fast.checkpoint import save_model_dir
    from vzero_fast.model import check_model_dir, family, model_class

    config, state = read_adapter(adapter)
    base = check_model_dir(base or config["base_model_name_or_path"])
    cfg = json.loads((base / "config.json").read_text())
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    dtype = getattr(torch, stored) if isinstance(stored, str) and hasattr(torch, stored) else torch.float32
    model = model_class(family(cfg["model_type"]).model_type).from_pretrained(base, dtype=dtype)
    merge_into(model, config, state)
    save_model_dir(model, base, out)
    log.info("merged %s (%d layers, rank %d) into %s -> %s", adapter, len(state) // 2, config["r"], base, out)
    return Path(out)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraLinear", "LoraSpec", "adapter_state", "attach", "attach_from",
           "export_merged", "frozen_copy", "full_adapter_state", "has_adapters", "is_adapter_dir", "load_adapter_into",
           "load_adapter_state", "merge_into", "peft_config", "read_adapter", "save_adapter", "spec",
           "target_names"]
