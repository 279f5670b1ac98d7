"""A role's optimizer: AdamW, over fp32 master weights when the model computes in bf16/fp16.

Decisions:
- bf16 has 8 mantissa bits: an AdamW step below ~1/256 of a weight rounds away, and at lr 1e-6 most do
  (measured: 10 steps on bf16 weights changed 2% of them). When a plain (unsharded) model's trainable
  parameters are bf16/fp16 and `model.master_weights` is on (the default), AdamW updates fp32 copies
  ("masters") and the model's weights are the masters rounded to the compute dtype after every step. Memory per
  parameter: 2 (bf16 weight) + 4 (master) + 4 (fp32 gradient) + 8 (AdamW moments) = 18 bytes.
- Gradients reach the masters as they are produced: a post-accumulate-grad hook adds each bf16 gradient into
  the fp32 master gradient and frees it, so micro-batch accumulation sums in fp32 and no bf16 gradient
  outlives its layer's backward. Clipping sees the fp32 gradients.
- Under FSDP2 (vzero_fast/distributed.py) MixedPrecisionPolicy already keeps fp32 sharded parameters and
  computes in bf16: no masters here.
- An optimizer that has not stepped has no state and saves {}: asking torch.distributed.checkpoint for it
  would run a zero-gradient step that sets AdamW's step count to 1, and the first real update would then use
  another bias correction (the cause of runs drifting after a save). State dicts are keyed by parameter
  name in torch.distributed.checkpoint's full-state format, so they load on any number of ranks; with
  masters, each parameter's entry carries its fp32 master as "master".

Test: `pytest tests/test_optim.py`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vzero_fast import distributed as dist

log = logging.getLogger("vzero_fast.optim")

LOW_PRECISION = (torch.bfloat16, torch.float16)


class RoleOptimizer:
    """AdamW over a model's trainable parameters (or their fp32 masters). `params` hold the gradients that
    clipping and the step use."""

    def __init__(self, model: torch.nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
                 master_weights: bool = True, name: str = ""):
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        weights = [p for p in model.parameters() if p.requires_grad]
        low = [p for p in weights if p.dtype in LOW_PRECISION]
        self.masters: list[torch.Tensor] | None = None
        self._weights = weights
        if low and not dist.is_sharded(model):
            if master_weights:
                self.masters = [p.detach().float().clone().requires_grad_(True) if p.dtype in LOW_PRECISION else p
                                for p in weights]
                for p, m in zip(weights, self.masters, strict=True):
                    if m is not p:
                        p.register_post_accumulate_grad_hook(_into_master(m))
                log.info("%s: AdamW over fp32 master weights, compute in %s", name, low[0].dtype)
            else:
                log.warning("%s trains %s weights without fp32 master weights (model.master_weights false): "
                            "updates below the weights' resolution are lost", name, low[0].dtype)
        self.params = self.masters if self.masters is not None else weights
        # foreach=False keeps CPU optimizer steps bit-identical between runs of different batching.
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay,
                                           foreach=False)

    @property
    def has_state(self) -> bool:
        return bool(self.optimizer.state)

    def step(self) -> None:
        self.optimizer.step()
        if self.masters is not None:
            with torch.no_grad():
                for p, m in zip(self._weights, self.masters, strict=True):
                    if m is not p:
                        p.copy_(m)  # round to the compute dtype

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            for p in self._weights:
                p.grad = None

    def move(self, device: torch.device) -> None:
        """Move the AdamW state and the masters (not the model) to `device`; a no-op for sharded models (FSDP's
        cpu_offload keeps their state in CPU memory instead). Blocking copies: a non-blocking copy to
        pageable or pinned CPU memory may be read before it lands."""
        if dist.is_sharded(self.model):
            return
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    state[k] = v.to(device)
        if self.masters is not None:
            for m, p in zip(self.masters, self._weights, strict=True):
                if m is not p:
                    m.data = m.data.to(device)

    # ------------------------------------------------------------------------------------- state dicts

    def state_dict(self) -> dict[str, Any]:
        """The full state keyed by parameter name ({} before the first step; every rank calls it when sharded,
        rank 0 gets the state)."""
        if not self.has_state:
            return {}
        if self.masters is None:
            return dist.optimizer_state(self.model, self.optimizer)
        index = {id(p): i for i, p in enumerate(self.params)}
        state = {}
        for i, (name, p) in enumerate(zip(self.names, self.params, strict=True)):
            entry = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                     for k, v in self.optimizer.state.get(p, {}).items()}
            if self._weights[i] is not p:
                entry["master"] = p.detach().cpu().clone()
            state[name] = entry
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [self.names[index[id(p)]] for p in g["params"]]} for g in self.optimizer.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any], *, has_state: bool) -> None:
        """Inverse of `state_dict`, from a run with any number of ranks. `has_state` is whether the saved
        optimizer had stepped (the same on every rank; only rank 0's `state` is read when sharded). Without
        state the optimizer starts fresh and the masters are the model's current weights."""
        if not has_state:
            self.optimizer.state.clear()
            self._masters_from_weights()
            return
        if self.masters is None:
            dist.load_optimizer_state(self.model, self.optimizer, state)
            return
        position = {name: i for i, name in enumerate(self.names)}
        saved = state["state"]
        self.optimizer.load_state_dict({
            "state": {position[n]: {k: v for k, v in s.items() if k != "master"} for n, s in saved.items()
                      if n in position and any(k != "master" for k in s)},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]],
        })
        self._masters_from_weights()
        with torch.no_grad():
            for name, m in zip(self.names, self.masters, strict=True):
                if "master" in saved.get(name, {}):
                    m.copy_(saved[name]["master"])

    def _masters_from_weights(self) -> None:
        if self.masters is None:
            return
        with torch.no_grad():
            for p, m in zip(self._weights, self.masters, strict=True):
                if m is not p:
                    m.copy_(p)


def _into_master(master: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = p.grad.to(master.device, torch.float32)
        else:
            master.grad.add_(p.grad.to(master.device))
        p.grad = None
    return hook
