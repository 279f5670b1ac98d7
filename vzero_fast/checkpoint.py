"""Checkpoints: per role an HF-format model directory, plus the trainer state for an exact resume.

Layout under the run directory:
    checkpoints/<role>/step-000012/   config.json, model.safetensors, tokenizer files, preprocessor
                                      config, chat template: transformers and vLLM load it directly
    checkpoints/<role>/iter-1/        the role at the end of its stage in iteration 1 (kept always: the
                                      next iteration's KL reference and the per-iteration record)
    (LoRA roles: each of these is a PEFT adapter directory instead, adapter_config.json +
     adapter_model.safetensors, naming the base; `vzero-fast export --merge DIR --out OUT` merges one)
    checkpoints/trainer_state-000007.pt  optimizer states, counters, data position, which role dirs
    checkpoints/latest.json           the newest complete trainer state (written last)

Decisions:
- Atomic: everything is written to a `.tmp-*` sibling and renamed into place; `latest.json` is replaced
  with `os.replace` only after the directories it names exist, so a kill at any moment leaves the
  previous checkpoint usable.
- Weights are saved only when a role has changed since its last save; a trainer state that follows
  another role's update points at the unchanged role's existing directory. A LoRA role is saved even before
  its first step: its fresh A is random, so the base directory does not hold it.
- The non-weight files (tokenizer, preprocessor, chat template, generation config) are copied from the
  directory the policy was loaded from, byte for byte, so a checkpoint loads exactly like the original.
- Keep the last `keep_last` step directories per role (iteration directories are never pruned) and
  the last `keep_last` trainer states.
- RNG: all sampling randomness is derived from (seed, role, step) counters, so the state holds counters,
  not generator states; the torch/numpy/python global states are saved too for anything else.
- Many ranks (vzero_fast/distributed.py): every rank takes part in gathering a sharded model's full state
  dict and the full optimizer state (keyed by parameter name); rank 0 alone writes files, and the others
  wait at a barrier. On restore rank 0 reads the files and the shards are broadcast from it; the counters
  reach the other ranks the same way. Full, unsharded state on disk: a run resumes on any number of ranks.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from vzero_fast import distributed as dist
from vzero_fast import lora

log = logging.getLogger("vzero_fast.checkpoint")

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt")


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".tmp-{path.name}-{os.getpid()}"


def save_model_dir(model: torch.nn.Module, source_dir: str | Path, out: str | Path,
                   state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as an HF model directory at `out` (atomically): weights via save_pretrained, every
    other file copied from `source_dir`."""
    out = Path(out)
    tmp = _tmp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    # After save_pretrained: the checkpoint's own generation_config.json (Qwen's sampling defaults) wins
    # over the neutral one load_policy installs.
    for f in Path(source_dir).iterdir():
        if f.is_file() and not any(f.match(p) for p in WEIGHT_PATTERNS) and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_weights_into(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Copy the safetensors weights of an HF model directory into an existing model, in place. A sharded
    model (FSDP2) takes them from rank 0, which alone reads the files; every rank must call this."""
    if lora.is_adapter_dir(model_dir):  # a LoRA role: its adapter (every rank reads the small file)
        lora.load_adapter_into(model, model_dir)
        return
    if dist.is_sharded(model):
        state = read_weights(model, model_dir) if dist.is_main() else {}
    else:
        state = read_weights(model, model_dir)
    dist.load_full_state_dict(model, state)


def read_weights(model: torch.nn.Module, model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of an HF model directory, keyed like `model.state_dict()` (CPU tensors)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    # save_pretrained may write names in the checkpoint convention; map them back by suffix match.
    out, missing = {}, []
    for name in model.state_dict():
        src = state.get(name)
        if src is None:
            src = _find_by_suffix(state, name)
        if src is None:
            missing.append(name)
            continue
        out[name] = src
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m.endswith("lm_head.weight"))]
    if missing:
        raise KeyError(f"{model_dir}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out


def _find_by_suffix(state: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    parts = name.split(".")
    for k in range(1, len(parts)):
        tail = ".".join(parts[k:])
        hits = [v for key, v in state.items() if key.endswith("." + tail) or key == tail]
        if len(hits) == 1:
            return hits[0]
    return None


class CheckpointManager:
    """Saves and restores roles and trainer state under `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | Path, *, keep_last: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self._saved: dict[str, tuple[int, Path]] = {}  # role -> (step saved, dir)
        self.written: list[Path] = []  # what this process wrote (trainer states and role directories)

    # ---------------------------------------------------------------------------------------- roles

    def save_role(self, role, *, tag: str | None = None) -> Path:
        """HF directory of a role; `tag` (e.g. "iter-1") names a kept directory, else step-NNNNNN. A role that
        has never stepped is the directory it was loaded from (nothing is written)."""
        adapter = lora.has_adapters(role.policy.model)
        # A LoRA role is always written (a few MB): its fresh A is random, so the base directory does not hold it.
        if tag is None and role.step == 0 and role.name not in self._saved and not adapter:
            return Path(role.policy.path)
        name = tag or f"step-{role.step:06d}"
        prev = self._saved.get(role.name)
        # Rank 0's view of the filesystem decides, so that every rank takes the same (collective) branch.
        unchanged = dist.broadcast_object(bool(prev and prev[0] == role.step and prev[1].exists()))
        out = self.root / role.name / name
        if unchanged:
            if tag is None or prev[1].name == name:
                return prev[1]
            if dist.is_main():  # same weights under a kept name: copy, don't re-serialise
                tmp = _tmp_sibling(out)
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(prev[1], tmp)
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
        else:
            model = role.policy.model
            if adapter:  # PEFT's adapter directory (gathered from the shards first when sharded: every rank)
                state = lora.full_adapter_state(model)
                if dist.is_main():
                    lora.save_adapter(model, out, base_path=role.policy.path, state=state)
                    self.written.append(out)
            else:
                state = dist.full_state_dict(model) if dist.is_sharded(model) else None  # every rank gathers
                if dist.is_main():
                    save_model_dir(model, role.policy.path, out, state_dict=state)
                    self.written.append(out)
        dist.barrier()
        self._saved[role.name] = (role.step, out)
        return out

    def role_dirs(self, role_name: str) -> list[Path]:
        base = self.root / role_name
        return sorted(base.glob("step-*")) if base.exists() else []

    def _prune_role(self, role_name: str) -> None:
        """Delete old step directories (after latest.json names the new ones: a kill never leaves it pointing
        at a deleted directory)."""
        live = {str(d) for _, d in self._saved.values()}
        dirs = self.role_dirs(role_name)
        for d in dirs[: max(0, len(dirs) - self.keep_last)]:
            if str(d) not in live:
                shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------------------------- trainer state

    def save(self, roles: dict[str, Any], state: dict[str, Any]) -> Path:
        """Save every role (weights only where changed) and the trainer state; then point latest at it.

        The order makes every completed save a resume point and a partial one harmless: role directories,
        then the trainer state (written to a temporary name and renamed), then latest.json (likewise), then
        pruning of what latest.json no longer needs."""
        role_dirs = {name: self._rel(self.save_role(role)) for name, role in roles.items()}
        # Full optimizer states keyed by parameter name (gathered to rank 0 when sharded: every rank calls);
        # {} for a role that has not stepped yet (vzero_fast/optim.py).
        optim = {name: role.optimizer.state_dict() for name, role in roles.items()}
        seq = dist.broadcast_object(self._next_seq() if dist.is_main() else None)
        path = self.root / f"trainer_state-{seq:06d}.pt"
        if dist.is_main():
            payload = {
                "state": state,
                "roles": {name: {"dir": role_dirs[name], "step": role.step, "skipped_steps": role.skipped_steps,
                                 "has_optimizer": role.optimizer.has_state, "optimizer": optim[name]}
                          for name, role in roles.items()},
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                "world_size": dist.world_size(),
            }
            tmp = _tmp_sibling(path)
            torch.save(payload, tmp)
            os.replace(tmp, path)
            self.written.append(path)
            kill_point("save")  # tests: a kill between the trainer state and latest.json
            latest_tmp = _tmp_sibling(self.root / "latest.json")
            latest_tmp.write_text(json.dumps({"trainer_state": path.name, "roles": role_dirs, "state": state},
                                             indent=1))
            os.replace(latest_tmp, self.root / "latest.json")
            for name in roles:
                self._prune_role(name)
            self._prune_states()
            log.info("checkpoint %s (%s)", path.name, ", ".join(f"{k}: {v}" for k, v in role_dirs.items()))
        dist.barrier()
        return path

    def _rel(self, path: Path) -> str:
        """A role directory as latest.json names it: relative to checkpoints/ when inside the run directory
        (the run directory can move), else absolute (a --model directory)."""
        path = Path(path).resolve()
        run_dir = self.root.parent.resolve()
        return os.path.relpath(path, self.root.resolve()) if path.is_relative_to(run_dir) else str(path)

    def _next_seq(self) -> int:
        seqs = [int(m.group(1)) for p in self.root.glob("trainer_state-*.pt")
                if (m := re.match(r"trainer_state-(\d+)\.pt$", p.name))]
        return max(seqs, default=0) + 1

    def _prune_states(self) -> None:
        states = sorted(self.root.glob("trainer_state-*.pt"))
        for p in states[: max(0, len(states) - self.keep_last)]:
            p.unlink(missing_ok=True)

    def latest(self) -> dict[str, Any] | None:
        path = self.root / "latest.json"
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def restore(self, roles: dict[str, Any]) -> dict[str, Any]:
        """Load the newest checkpoint into `roles` (weights, optimizer, counters); returns the state."""
        latest = self.latest()
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.root} (latest.json is missing)")
        # Rank 0 reads the payload (optimizer states can be tens of GB); the others get its small part.
        payload = (torch.load(self.root / latest["trainer_state"], map_location="cpu", weights_only=False)
                   if dist.is_main() else None)
        meta = dist.broadcast_object(None if payload is None else {
            "state": payload["state"], "rng": payload["rng"], "world_size": payload.get("world_size", 1),
            "roles": {n: {k: v for k, v in info.items() if k != "optimizer"} for n, info in payload["roles"].items()}})
        for name, role in roles.items():
            info = meta["roles"][name]
            load_weights_into(role.policy.model, self.root / info["dir"])
            role.optimizer.load_state_dict(payload["roles"][name]["optimizer"] if payload is not None else {},
                                           has_state=info.get("has_optimizer", True))
            role.step = info["step"]
            role.skipped_steps = info["skipped_steps"]
            self._saved[name] = (role.step, self.root / info["dir"])
        torch.set_rng_state(meta["rng"]["torch"])
        np.random.set_state(meta["rng"]["numpy"])
        random.setstate(meta["rng"]["python"])
        log.info("resumed from %s (saved by %d rank(s), now %d)", latest["trainer_state"], meta["world_size"],
                 dist.world_size())
        return meta["state"]


class StopFlag:
    """SIGTERM / SIGINT set a flag; the trainer checks it between steps, saves and exits cleanly (with the
    shell's code, 128 + the signal number). A second signal while the flag is set exits at once (the previous
    checkpoint stays valid)."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        log.warning("received %s: saving a checkpoint after the current step, then exiting",
                    signal.Signals(signum).name)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


KILL_ENV = "VZERO_TEST_KILL_AT"
_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Test hook: with VZERO_TEST_KILL_AT=<name>:<k> the process SIGKILLs itself the k-th time it passes the
    point `name` ("step": after a step's metrics row; "save": inside a save, after the trainer state and
    before latest.json; "stage_end": after a stage's end-of-stage save). Nothing happens without the variable."""
    at = os.environ.get(KILL_ENV)
    if not at:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    point, _, k = at.partition(":")
    if point == name and _kill_counts[name] == int(k or 1):
        os.kill(os.getpid(), signal.SIGKILL)
