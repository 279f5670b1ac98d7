"""Saving never changes training, and every complete checkpoint is a resume point (V-Zero, tiny model, CPU).

One uninterrupted run (save_every 0: checkpoints at stage ends only) is the reference. Runs with other save
schedules, runs stopped by SIGTERM / SIGINT, and runs SIGKILLed at three points (inside a stage, right after
a stage-end save, in the middle of a save) then resumed must all end with the reference's metrics (all but
wall-clock), question sets and weights. Two roles matter here: a save while one role trains also saves the
other's optimizer before it ever stepped (the bug that made resumed Solvers drift).
"""

import json
import signal

import pytest
import torch
from _runs import assert_same_weights, stable_metrics, train, train_until_killed, train_until_signal

# 2 iterations x (Questioner, Solver) x 2 steps = 8 rows; the four stage ends are after rows 2, 4, 6, 8.
STEPS = 2
ROWS = 4 * STEPS


@pytest.fixture(scope="module")
def args(warm_model):
    return ["--recipe", "vzero", "--preset", "tiny", "--model", str(warm_model), "--vzero.format_warmup_steps",
            "0", "--iterations", "2", "--max-steps-per-role", str(STEPS)]


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train([*args, "--out", str(out)])
    rows = stable_metrics(out)
    assert [(r["role"], r["iteration"]) for r in rows] == (
        [("questioner", 1)] * STEPS + [("solver", 1)] * STEPS + [("questioner", 2)] * STEPS
        + [("solver", 2)] * STEPS)
    # Both roles really train in both iterations, so that a drifting optimizer would show.
    assert all(r.get("groups_kept", 0) > 0 and r.get("tokens", 0) > 0 for r in rows), rows
    # AdamW's step count is the number of updates it made (2 mini-batches per GRPO step, tiny preset): a save
    # must not count one more (asking torch.distributed.checkpoint for the state of an optimizer that has not
    # stepped yet runs a zero-gradient step, and the stage-end saves of the reference would hide it).
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    payload = torch.load(out / "checkpoints" / latest["trainer_state"], weights_only=False)
    for role in ("questioner", "solver"):
        updates = sum(2 - r["skipped_updates"] for r in rows if r["role"] == role)
        steps = {float(s["step"]) for s in payload["roles"][role]["optimizer"]["state"].values()}
        assert steps == {float(updates)}, (role, steps, updates)
    return out


def assert_same_run(run, reference):
    assert stable_metrics(run) == stable_metrics(reference)  # nothing lost, nothing repeated, same numbers
    for k in (1, 2):
        name = f"questions-iter{k}.jsonl"
        assert (run / name).read_text() == (reference / name).read_text(), name
    for name in ("questioner/iter-1", "solver/iter-1", "questioner/iter-2", "solver/iter-2"):
        assert_same_weights(reference / "checkpoints" / name, run / "checkpoints" / name)


@pytest.mark.slow
@pytest.mark.parametrize("save_every", [1, 3])
def test_save_schedule_does_not_change_training(args, reference, tmp_path, save_every):
    out = tmp_path / "run"
    train([*args, "--save-every", str(save_every), "--out", str(out)])
    assert_same_run(out, reference)
    if save_every == 1:  # a save after the first step, while the Solver has not stepped yet
        state = json.loads((out / "checkpoints" / "latest.json").read_text())
        assert state["state"]["global_step"] == ROWS


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "after_rows"), [(signal.SIGTERM, 3), (signal.SIGINT, 6)])
def test_signal_then_resume(args, reference, tmp_path, sig, after_rows):
    out = tmp_path / "run"
    stopped_at, output = train_until_signal(args, out, after_rows=after_rows, sig=sig)
    assert after_rows <= stopped_at < ROWS
    text = output.decode()
    assert f"stopped by {signal.Signals(sig).name}" in text and f"--resume --out {out}" in text
    assert "steps in" not in text.splitlines()[-1]  # not the finished run's final line
    train(["--resume", "--out", str(out)])
    assert_same_run(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize(("at", "rows_on_disk"), [
    ("step:3", 3),        # inside the Solver stage of iteration 1 (save_every 0: resumes from the stage start)
    ("stage_end:2", 4),   # right after the Solver's stage-end save of iteration 1
    ("save:3", 6),        # inside the 3rd save, after the trainer state, before latest.json
])
def test_sigkill_then_resume(args, reference, tmp_path, at, rows_on_disk):
    out = tmp_path / "run"
    assert train_until_killed(args, out, at=at) == rows_on_disk
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    if at.startswith("save"):  # latest.json still names the previous (2nd) save, whose files are complete
        assert latest["state"]["global_step"] == 4
    train(["--resume", "--out", str(out)])
    assert_same_run(out, reference)
