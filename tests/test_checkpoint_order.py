"""CheckpointManager.save's write order, in process: a save that dies between its trainer state and
latest.json (the `kill_point("save")` hook, raising here instead of SIGKILL) leaves latest.json naming the
previous, complete checkpoint, which restores. tests/test_resume.py checks the same through whole SIGKILLed
runs (slow); this one takes ~3 s.
"""

from __future__ import annotations

import json

import pytest

from vzero_fast import checkpoint
from vzero_fast.config import PolicyConfig
from vzero_fast.grpo import Role
from vzero_fast.model import load_policy
from vzero_fast.rollout import make_engine

pytest_plugins = ["_tiny_fixture"]


class Killed(Exception):
    pass


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    policy = load_policy(tiny_model_dir, dtype="float32", device="cpu", attn_implementation="sdpa")
    roles = {"policy": Role(name="policy", policy=policy, cfg=PolicyConfig(), engine=make_engine(policy))}
    manager = checkpoint.CheckpointManager(tmp_path, keep_last=2)
    manager.save(roles, {"global_step": 1})
    first = json.loads((manager.root / "latest.json").read_text())

    def kill_point(name):
        if name == "save":
            raise Killed

    monkeypatch.setattr(checkpoint, "kill_point", kill_point)
    roles["policy"].step = 2  # a later state
    with pytest.raises(Killed):
        manager.save(roles, {"global_step": 2})
    latest = json.loads((manager.root / "latest.json").read_text())
    assert latest == first and latest["state"] == {"global_step": 1}
    assert (manager.root / latest["trainer_state"]).is_file()
    assert checkpoint.CheckpointManager(tmp_path).restore(roles) == {"global_step": 1}
    assert roles["policy"].step == 0
