"""What the trainer hands to its parts, observed on a real run (toy recipe, tiny model, CPU):

- the KL reference of a stage is the role's weights at that stage's start: the base model in iteration 1,
  `checkpoints/<role>/iter-<k-1>` in iteration k (as saved on disk, compared tensor by tensor);
- the engine seam: every role's engine comes from `rollout.make_engine` with `rollout.backend`, the role's
  engine sleeps while the role trains and wakes before the next rollout, `sync_weights` follows every optimizer
  step (the k-th sync sees AdamW's k-th step), and a resume syncs the restored weights. The probe is a real
  NativeEngine registered under its own backend name in `rollout.ENGINES`: nothing of the trainer is mocked.

Run: `pytest tests/test_trainer_seams.py` (~20 s on one thread).
"""

from __future__ import annotations

import pytest
import torch

from vzero_fast import config, rollout
from vzero_fast.config import parse_overrides, resolve
from vzero_fast.model import load_policy
from vzero_fast.rollout import NativeEngine

pytest_plugins = ["_tiny_fixture"]

ITERATIONS, STEPS, MINI_BATCHES = 2, 2, 2


class Probe(NativeEngine):
    """The native engine, recording what the trainer asks of it: ("generate",), ("sleep",), ("wake",) and
    ("sync", AdamW's step count at that moment)."""

    name = "probe"

    def __init__(self, policy, **kwargs):
        super().__init__(policy, **kwargs)
        self.events: list[tuple] = []
        self.role = None  # set by the test once the trainer built its roles
        self.asleep = False

    def generate(self, requests):
        assert not self.asleep, "generate while the engine sleeps"
        self.events.append(("generate",))
        return super().generate(requests)

    def sleep(self):
        self.asleep = True
        self.events.append(("sleep",))
        super().sleep()

    def wake(self):
        self.asleep = False
        self.events.append(("wake",))
        super().wake()

    def sync_weights(self, policy):
        assert policy is self.role.policy
        steps = {int(s["step"]) for s in self.role.optimizer.optimizer.state.values()}
        self.events.append(("sync", max(steps, default=0)))
        super().sync_weights(policy)


class RecordReferences:
    """The recipe, recording the role's KL reference weights as each stage starts."""

    def __init__(self, inner):
        self.inner = inner
        self.refs: dict[int, dict[str, torch.Tensor]] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stages(self, iteration):
        return self.inner.stages(iteration)

    def run_stage(self, trainer, iteration, role_name, *, start_step):
        ref = trainer.roles[role_name].reference
        self.refs[iteration] = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        self.inner.run_stage(trainer, iteration, role_name, start_step=start_step)


def _trainer(cfg, *, resume=False):
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    trainer = Trainer(cfg, resume=resume)
    recipe = RecordReferences(build_recipe("toy", trainer))
    for role in trainer.roles.values():
        role.engine.role = role
    return trainer, recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("seams") / "run"
    args = ["--train.out", str(out), "--model.path", str(tiny_model_dir), "--train.recipe", "toy",
            "--train.iterations", str(ITERATIONS), "--train.max_steps_per_role", str(STEPS),
            "--policy.mini_batches", str(MINI_BATCHES), "--rollout.backend", "probe"]
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(rollout.ENGINES, "probe", Probe)
        cfg = resolve("tiny", None, parse_overrides(args))
        try:
            trainer, recipe = _trainer(cfg)
            trainer.run(recipe)
            resumed, again = _trainer(cfg, resume=True)  # the finished run: restore, nothing left to train
            resumed.run(again)
        finally:
            torch.set_num_threads(threads)  # the tiny preset sets 1 thread
    return out, trainer, recipe, resumed


def _state(model_dir) -> dict[str, torch.Tensor]:
    return load_policy(model_dir, dtype="float32", device="cpu", attn_implementation="sdpa").model.state_dict()


def _equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_stage_reference_is_the_stage_start(run, tiny_model_dir):
    out, trainer, recipe, _ = run
    assert trainer.roles["policy"].cfg.kl_coef > 0 and sorted(recipe.refs) == [1, 2]
    base, iter1 = _state(tiny_model_dir), _state(out / "checkpoints" / "policy" / "iter-1")
    assert not _equal(base, iter1)  # iteration 1 trained: the two candidates differ
    assert _equal(recipe.refs[1], base)
    assert _equal(recipe.refs[2], iter1)


def test_engines_come_from_make_engine_and_follow_the_updates(run):
    _, trainer, _, resumed = run
    role = trainer.roles["policy"]
    assert type(role.engine) is Probe
    events = role.engine.events
    updates = ITERATIONS * STEPS * MINI_BATCHES - role.skipped_steps
    assert role.step == ITERATIONS * STEPS and updates > 0
    # The k-th sync follows AdamW's k-th step: one sync per update, none missing, none early.
    assert [e[1] for e in events if e[0] == "sync"] == list(range(1, updates + 1))
    # Per GRPO step: generate, then sleep, the step's syncs, wake -- never a rollout while asleep.
    kinds = [e[0] for e in events]
    step = ["generate", "sleep", *["sync"] * MINI_BATCHES, "wake"]
    assert kinds == step * (ITERATIONS * STEPS), kinds
    # A resume loads weights, then syncs them to the engine (AdamW restored with all its steps).
    again = resumed.roles["policy"]
    assert type(again.engine) is Probe and again.engine.events == [("sync", updates)]
    assert (again.step, again.skipped_steps) == (role.step, role.skipped_steps)
    assert all(torch.equal(p, q) for p, q in zip(again.policy.model.parameters(), role.policy.model.parameters(),
                                                  strict=True))


def test_make_engine_registry():
    from types import SimpleNamespace

    policy = object()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(rollout.ENGINES, "probe", lambda p, **kw: SimpleNamespace(name="probe", built=(p, kw)))
        assert rollout.make_engine(policy, "probe", seed=3).built == (policy, {"seed": 3})
    with pytest.raises(ValueError, match="unknown rollout backend 'probe'"):
        rollout.make_engine(policy, "probe")
    with pytest.raises(config.ConfigError, match="rollout.backend"):
        resolve("tiny", None, parse_overrides(["--rollout.backend", "probe"]))


def test_backend_without_vllm(caplog):
    """Where vllm does not import: backend vllm fails with the reason, auto falls back to native and logs why."""
    from vzero_fast.rollout_vllm import vllm_unavailable

    if vllm_unavailable() is None:
        pytest.skip("vllm imports here (tests/test_rollout_vllm.py covers the backend)")
    with pytest.raises(RuntimeError, match="vllm does not import"):
        rollout.make_engine(object(), "vllm")
    with caplog.at_level("WARNING", logger="vzero_fast.rollout"):
        engine = rollout.make_engine(object(), "auto", options=config.RolloutConfig(max_batch_tokens=123))
    assert type(engine) is rollout.NativeEngine and engine.max_batch_tokens == 123
    assert "native engine (vllm does not import" in caplog.text
