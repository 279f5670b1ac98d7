"""torchrun + FSDP2 on CPU (2 gloo ranks, vzero_fast/distributed.py) against one process.

- Sampling does not depend on batch-mates (what makes data-parallel rollouts equal the one-process ones).
- 2 ranks vs 1 process, same global batch and seed: same rewards, losses and gradient norms per step, and
  the same final weights up to AdamW's amplification of fp32 rounding (see WEIGHT_ATOL).
- Resume across world sizes: a 1-process checkpoint continued on 2 ranks and a 2-rank one continued on 1
  process end at the same metrics and weights.
- A rank that dies makes the other exit non-zero with a clear error, quickly.
- The V-Zero recipe runs on 2 ranks and its checkpoints load in transformers.

Every launch runs the real CLI in a subprocess (torchrun --standalone picks a free port). ~3 min on 2 cores.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vzero_fast.metrics import read_metrics

pytest_plugins = ["_tiny_fixture"]

LR = 1e-4
# The toy recipe with 2 mini-batches (off-policy: old log-probs recomputed), a KL reference, responses of up
# to 6 tokens and a token budget that gives each rank a different number of micro-batches.
TOY = ["--preset", "tiny", "--recipe", "toy", "--max-steps-per-role", "2", "--policy.mini_batches", "2",
       "--policy.rollout_n", "4", "--policy.max_response_tokens", "6", "--policy.micro_batch_tokens", "120",
       "--policy.lr", str(LR), "--dist.timeout_s", "60"]
LOSS_RTOL = 1e-4  # per-step losses: fp32 sums in a different order (micro-batches, ranks)
NORM_RTOL = 1e-3  # gradient norms of the second and later optimizer steps (weights already differ slightly)
# AdamW scales every element's step to ~lr whatever its gradient's size, so fp32 rounding in a near-zero
# gradient moves that element by a fraction of lr. Measured on this recipe: one process against itself with
# another micro-batch budget differs by up to 0.07 lr in 1 of 60000 elements -- exactly what 2 ranks vs 1
# process give. A lost or doubled rank contribution moves most elements by O(lr).
WEIGHT_ATOL = 0.1 * LR
WEIGHT_ATOL_FRAC = 1e-3  # ... and at most this fraction of elements may differ by more than 1e-3 lr
# The dying run's collective timeout: long, so that "the survivor did not wait for it" is a wide margin
# (a quarter of it) rather than a wall-clock bound that a slow or loaded machine could miss.
DIE_TIMEOUT_S = 600
EXACT = ("reward_mean", "reward_std", "groups", "groups_kept", "response_length_mean", "response_length_max",
         "tokens", "role_step", "global_step", "iteration", "step")


def _env(**extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(nproc=2):
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", f"--nproc_per_node={nproc}", "-m", "vzero_fast", "train"]


def _one():
    return [sys.executable, "-m", "vzero_fast", "train"]


def _run(cmd, *, env=None, timeout=300, check=True):
    proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(next((run_dir / "checkpoints" / "policy" / name).glob("*.safetensors")))


def _assert_rows_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for key in EXACT:
            assert g[key] == w[key], (key, g[key], w[key])
        assert g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL, abs=1e-7), (g["loss"], w["loss"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=NORM_RTOL), (g["grad_norm"], w["grad_norm"])
        assert g["kl"] == pytest.approx(w["kl"], rel=NORM_RTOL, abs=1e-7)


def _assert_weights_close(a: dict, b: dict, base: dict):
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    moved = torch.cat([(a[k] - base[k]).abs().flatten() for k in a])
    assert moved.max() > 10 * WEIGHT_ATOL  # the test can fail: training moved the weights
    assert diff.max() <= WEIGHT_ATOL, diff.max()
    assert (diff > 1e-3 * LR).float().mean() <= WEIGHT_ATOL_FRAC, (diff > 1e-3 * LR).float().mean()


# ----------------------------------------------------------------------------------------------- sampling

def test_samples_do_not_depend_on_batch_mates(tiny_policy):
    """A request's samples are the same alone, among other requests, and split into several batches."""
    from vzero_fast.data import synthetic_figure
    from vzero_fast.rollout import NativeEngine, Request, SamplingParams

    def req(i, n=3):
        return Request.from_image_text(synthetic_figure(i, size=56 + 28 * (i % 2)), "Describe the figure.",
                                       SamplingParams(n=n, max_new_tokens=8, temperature=1.0, seed=100 + i))

    def tokens(outputs):
        return [[s.token_ids.tolist() for s in o.samples] for o in outputs]

    alone = [tokens(NativeEngine(tiny_policy).generate([req(i)]))[0] for i in range(3)]
    together = tokens(NativeEngine(tiny_policy).generate([req(0), req(1), req(2)]))
    split = tokens(NativeEngine(tiny_policy, max_batch_tokens=200).generate([req(0), req(1), req(2)]))
    assert together == alone == split
    assert len({tuple(map(tuple, a)) for a in alone}) == 3  # different seeds: different samples


@pytest.mark.slow
def test_generate_gathers_once_per_rollout(tiny_model_dir):
    """Under FSDP2 `generate` all-gathers each group once, however many decode steps a rank runs (3 on rank 0,
    12 on rank 1: per-token gathers could not even stay matched), and leaves the model sharded. The vLLM
    engine's weight stream yields the full weights unit by unit and leaves the model sharded too."""
    worker = Path(__file__).with_name("_fsdp_worker.py")
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = _run([*launcher, "--standalone", "--nproc_per_node=2", str(worker), str(tiny_model_dir)], timeout=180)
    rows = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])
    assert [r["decode_steps"] for r in rows] == [3, 12]
    for r in rows:
        assert r["all_gathers"] == r["groups"] == 9  # 4 vision blocks + 4 decoder layers + the root
        assert r["sharded_after"]
        # The vLLM engine's weight stream: every parameter, gathered, cast to bf16, one unit unsharded at a time.
        assert r["stream_equal"] and r["stream_tensors"] >= 60, r
        assert r["stream_max_unsharded"] == 1 and r["stream_sharded_after"], r


# ------------------------------------------------------------------------------------ 2 ranks vs 1 process
# Four launches in all: one process for iteration 1 (A); 2 ranks whose rank 1 dies after step 3 (C, with a
# checkpoint after every step); then A continued on 2 ranks and C continued on one process.

@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("one_process")
    start = time.perf_counter()
    _run([*_one(), *TOY, "--model", str(tiny_model_dir), "--iterations", "1", "--out", str(out)])
    print(f"\n1-process run (2 steps): {time.perf_counter() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def dying_run(tmp_path_factory, tiny_model_dir):
    """2 ranks, 2 iterations x 2 steps planned; rank 1 exits (os._exit(1), distributed.die_for_test) after
    global step 3. Returns the run directory, the exit code, the output and the seconds from the death to
    the end of torchrun."""
    out = tmp_path_factory.mktemp("two_ranks_dies")
    env = _env(VZERO_TEST_DIE_AT_STEP="3", VZERO_TEST_DIE_RANK="1")
    cmd = [*_torchrun(), *TOY, "--model", str(tiny_model_dir), "--iterations", "2", "--save-every", "1",
           "--dist.timeout_s", str(DIE_TIMEOUT_S), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, died = [], None
    deadline = start + 300
    for line in proc.stdout:  # ends when every process holding the pipe has exited
        lines.append(line)
        if died is None and "rank 1 exits now" in line:
            died = time.perf_counter()
        if time.perf_counter() > deadline:
            proc.kill()
            break
    code = proc.wait(timeout=60)
    end = time.perf_counter()
    print(f"\n2-rank run that dies: {end - start:.1f} s, exit {code}, "
          f"{end - died if died else float('nan'):.1f} s from the death to the end")
    return out, code, "".join(lines), (end - died) if died else None


@pytest.mark.slow
def test_two_ranks_equal_one_process(tiny_model_dir, one_process_run, dying_run):
    """Same global batch and seed: steps 1-2 (iteration 1, before rank 1 dies) and the weights after them."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vzero_fast.model import check_model_dir

    two = dying_run[0]
    _assert_rows_close(read_metrics(two)[:2], read_metrics(one_process_run))
    base = load_file(next(Path(tiny_model_dir).glob("*.safetensors")))
    _assert_weights_close(_weights(two, "iter-1"), _weights(one_process_run, "iter-1"), base)
    # The 2-rank checkpoint is an HF directory: transformers loads it with exactly the saved weights.
    saved = two / "checkpoints" / "policy" / "iter-1"
    check_model_dir(saved)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(saved, dtype=torch.float32)
    for k, v in _weights(two, "iter-1").items():
        assert torch.equal(hf.state_dict()[k], v), k


@pytest.mark.slow
def test_two_ranks_equal_one_process_qwen3_5(tmp_path):
    """The hybrid Qwen3.5 (DeltaNet layers with their own parameter kinds: A_log, dt_bias, conv1d) under FSDP2:
    2 ranks equal one process, and the sharded checkpoint loads in transformers with the saved weights."""
    from vzero_fast.model import model_class
    from vzero_fast.tiny import build_tiny

    model_dir = build_tiny(tmp_path / "tiny", seed=0, family="qwen3_5")
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*TOY, "--model", str(model_dir), "--iterations", "1"]
    _run([*_one(), *args, "--out", str(one)])
    _run([*_torchrun(), *args, "--out", str(two)])
    _assert_rows_close(read_metrics(two), read_metrics(one))
    base = load_file(model_dir / "model.safetensors")
    _assert_weights_close(_weights(two, "iter-1"), _weights(one, "iter-1"), base)
    hf = model_class("qwen3_5").from_pretrained(two / "checkpoints" / "policy" / "iter-1", dtype=torch.float32)
    for k, v in _weights(two, "iter-1").items():
        assert torch.equal(hf.state_dict()[k], v), k


@pytest.mark.slow
def test_dying_rank_fails_the_run_quickly(dying_run):
    """Rank 0 must not wait for the dead rank: a clear error and a non-zero exit within seconds. The
    checkpoint of step 2 (the last complete one) stays usable."""
    run, code, log, after_death = dying_run
    print("\n".join(line for line in log.splitlines() if "exits now" in line or "rank 0 of 2 stops" in line
                    or "exitcode" in line))
    assert code != 0
    assert "VZERO_TEST_DIE_AT_STEP=3: rank 1 exits now" in log
    assert "rank 0 of 2 stops" in log or "Signal 15" in log  # our one-line error, or torchrun ended rank 0
    assert after_death is not None and after_death < DIE_TIMEOUT_S / 4  # nothing waited for the timeout
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["state"]["global_step"] == 2


@pytest.mark.slow
def test_resume_across_world_sizes(tmp_path, tiny_model_dir, one_process_run, dying_run):
    """A 1-process checkpoint continued on 2 ranks and a 2-rank checkpoint continued on one process end at
    the same metrics and weights (full, unsharded state on disk: any number of ranks can load it)."""
    a, c = tmp_path / "a", tmp_path / "c"
    shutil.copytree(one_process_run, a)
    shutil.copytree(dying_run[0], c)
    start = time.perf_counter()
    _run([*_torchrun(), "--resume", "--out", str(a), "--iterations", "2"])  # iteration 2 on 2 ranks
    mid = time.perf_counter()
    _run([*_one(), "--resume", "--out", str(c)])  # steps 3-4 on one process
    print(f"\nresume 1 -> 2 ranks: {mid - start:.1f} s; 2 ranks -> 1: {time.perf_counter() - mid:.1f} s")
    rows_a, rows_c = read_metrics(a), read_metrics(c)
    assert len(rows_a) == len(rows_c) == 4
    _assert_rows_close(rows_a, rows_c)
    base = load_file(next(Path(tiny_model_dir).glob("*.safetensors")))
    _assert_weights_close(_weights(a, "iter-2"), _weights(c, "iter-2"), base)


# ------------------------------------------------------------------------------------------------ V-Zero

@pytest.mark.slow
def test_vzero_recipe_on_two_ranks(tmp_path):
    """The tiny V-Zero recipe (format warm-up included), 2 ranks, 1 iteration, 2 steps per role: metrics,
    the question set and the checkpoints (which load in transformers)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vzero_fast.model import check_model_dir

    run = tmp_path / "vzero"
    proc = _run([*_torchrun(), "--recipe", "vzero", "--preset", "tiny", "--iterations", "1",
                 "--max-steps-per-role", "2", "--dist.timeout_s", "60",
                 "--out", str(run)], timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = read_metrics(run)
    assert [(r["role"], r["step"]) for r in rows] == [("questioner", 1), ("questioner", 2), ("solver", 1),
                                                      ("solver", 2)], rows
    q_rows, s_rows = rows[:2], rows[2:]
    for r in q_rows:  # global over both ranks: all 4 images x 4 samples of the step
        assert r["groups"] == 4 and 0 <= r["valid_question_rate"] <= 1 and 0 <= r["solver_letter_rate"] <= 1, r
    assert (run / "format-warmup" / "config.json").exists() and (run / "format_warmup.json").exists()
    questions = [json.loads(line) for line in (run / "questions-iter1.jsonl").read_text().splitlines()]
    assert [q["image_index"] for q in questions] == sorted(q["image_index"] for q in questions)
    assert len({q["image_index"] for q in questions}) == len(questions) == int(s_rows[0]["questions"]) > 0
    kept = [q for q in questions if q["kept"]]
    assert len(kept) == int(s_rows[0]["questions_kept"]) > 0, s_rows[0]
    assert all(q["valid"] and q["label"] in "ABCD" for q in kept)
    for r in s_rows:
        assert r["groups"] == min(4, len(kept)) and 0 <= r["solver_letter_rate"] <= 1, r
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    for role, rel in latest["roles"].items():
        saved = run / "checkpoints" / rel
        check_model_dir(saved)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(saved, dtype=torch.float32)
        for k, v in load_file(next(saved.glob("*.safetensors"))).items():
            assert torch.equal(hf.state_dict()[k], v), (role, k)


# ----------------------------------------------------------------------------------------- set-up errors

def test_one_process_without_torchrun(monkeypatch):
    from vzero_fast import distributed as dist
    from vzero_fast.config import ConfigError, DistConfig

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    world = dist.init(DistConfig(), "cpu")
    assert (world.rank, world.world_size, world.fsdp, world.is_main) == (0, 1, False, True)
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce(t) is t and dist.broadcast_object("x") == "x" and not dist.is_distributed()
    dist.shutdown()  # no group: nothing to do
    assert dist.end_process(143) == 143  # no torchrun group joined: the code comes back, the process lives
    with pytest.raises(ConfigError, match="torchrun"):
        dist.init(DistConfig(fsdp="on"), "cpu")
    with pytest.raises(ConfigError, match="cpu_offload"):
        dist.init(DistConfig(cpu_offload=True), "cpu")
    with pytest.raises(ConfigError, match="dist.fsdp"):
        DistConfig(fsdp="maybe")
