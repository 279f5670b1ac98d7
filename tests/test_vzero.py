"""V-Zero recipe (vzero_fast/recipes/vzero.py): the dual-track reward, pseudo-labels and the band on hand-built
vote lists and against a plain-Python reference; the reward's batching (one Solver call per step); the tiny
recipe end to end; SIGTERM in the middle of a Solver stage, then --resume, equals an uninterrupted run."""

import json
import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from vzero_fast.answers import LETTERS
from vzero_fast.config import parse_overrides, resolve
from vzero_fast.metrics import read_metrics
from vzero_fast.recipes.vzero import (
    NONE_ID,
    VZeroRecipe,
    choice_ids,
    dual_track_rewards,
    in_band,
    pseudo_labels,
)

pytest_plugins = ["_tiny_fixture"]


def _reference_reward(a_fast, answers):
    """ALGORITHMS.md section 1, written out directly."""
    if a_fast not in LETTERS:
        return -1.0
    votes = ["None" if a is None else a for a in answers]
    counts = Counter(votes)
    best = max(counts.values())
    a_hat = next(v for v in votes if counts[v] == best)  # ties: the answer seen first
    c = best / len(votes)
    if a_hat == a_fast:
        return min(c, 1 - c)
    if a_hat != "None":
        return 0.5 * c
    return 0.0


def questioner_reward(a_fast, solver_answers):
    """One question through dual_track_rewards: letters in, None for an invalid output / no usable box."""
    fast = torch.tensor([LETTERS.index(a_fast) if a_fast in LETTERS else -1])
    ids = torch.tensor([[LETTERS.index(a) if a in LETTERS else NONE_ID for a in solver_answers]])
    return float(dual_track_rewards(fast, ids)[0][0])


def solver_pseudo_label(answers):
    """One question through pseudo_labels: (label letter or None, share)."""
    label, share = pseudo_labels(torch.tensor([[LETTERS.index(a) if a in LETTERS else -1 for a in answers]]))
    return (LETTERS[int(label[0])] if label[0] >= 0 else None), float(share[0])


N = None
REWARD_CASES = [
    # (name, a_fast, Solver answers, expected reward)
    ("agree, split solver", "A", list("AAAAABBBCD"), 0.5),
    ("agree, confident solver", "A", list("AAAAAAAAAB"), 0.1),
    ("agree, 7 of 10", "C", list("CCCCCCCABD"), 0.3),
    ("overturned intuition", "A", list("BBBBBBAAAA"), 0.3),
    ("overturned, tie with None seen later", "D", ["A", N, N, "A", "A", "B", "C", "D", "D", N], 0.15),
    ("missing answers win the vote", "A", [N, N, N, N, N, "A", "A", "B", "C", "D"], 0.0),
    ("missing answers win over the intuition", "B", [N, N, N, "B", "B", N, "A", "C", "D", N], 0.0),
    ("tie, intuition seen first", "B", list("BAAB"), 0.5),
    ("tie, other answer seen first", "B", list("ABBA"), 0.25),
    ("tie, None seen first", "A", [N, "A", "A", N], 0.0),
    ("unanimous agreement", "A", list("AAAAAAAAAA"), 0.0),
    ("unanimous disagreement", "A", list("CCCCCCCCCC"), 0.5),
    ("unanimous None", "A", [N] * 10, 0.0),
    ("invalid question", None, list("AAAAABBBCD"), -1.0),
    ("empty a_fast", "", list("AAAAABBBCD"), -1.0),
]


@pytest.mark.parametrize("name, a_fast, answers, want", REWARD_CASES, ids=[c[0] for c in REWARD_CASES])
def test_dual_track_reward_hand_built(name, a_fast, answers, want):
    assert questioner_reward(a_fast, answers) == pytest.approx(want, abs=1e-6)
    assert _reference_reward(a_fast, answers) == pytest.approx(want, abs=1e-12)


def test_dual_track_rewards_vectorised_match_reference():
    rng = random.Random(0)
    for m in (1, 2, 5, 10, 13):
        fast, rows = [], []
        for _ in range(300):
            fast.append(rng.choice([*LETTERS, None]))
            pool = rng.choice([list(LETTERS) + [None], ["A", "B", None], ["C", None], ["D"]])
            rows.append([rng.choice(pool) for _ in range(m)])
        a_fast = torch.tensor([LETTERS.index(a) if a else -1 for a in fast])
        ids = torch.tensor([[LETTERS.index(a) if a else NONE_ID for a in row] for row in rows])  # [Q, m]
        got, a_hat, c = dual_track_rewards(a_fast, ids)
        want = torch.tensor([_reference_reward(f, r) for f, r in zip(fast, rows, strict=True)], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
        assert got.dtype == torch.float32 and a_hat.shape == c.shape == (300,)


def test_choice_ids_count_non_letters_as_none():
    texts = [r"<think>x</think> \boxed{b}", r"\boxed{42}", "no box at all", r"\boxed{A", r"\boxed{(D)}", ""]
    assert choice_ids(texts, none_id=NONE_ID) == [1, NONE_ID, NONE_ID, NONE_ID, 3, NONE_ID]
    assert choice_ids(texts, none_id=-1) == [1, -1, -1, -1, 3, -1]
    # A boxed non-letter is "None" in the reward vote: it cannot win as a real answer.
    assert questioner_reward("A", ["42"] * 6 + ["A"] * 4) == 0.0


@pytest.mark.parametrize("answers, label, share", [
    (list("AAAABBBCDD"), "A", 0.4),
    (["A", "A", "B", N, N, N, N, N, N, N], "A", 0.2),   # divided by all 10 answers, invalid ones too
    ([N, N, N, "C", N, N, N, N, N, "C"], "C", 0.2),     # None never wins: only A-D vote
    ([N] * 10, None, 0.0),
    (list("BAAB"), "B", 0.5),                           # tie: first seen
    (list("DDDDDDDDDD"), "D", 1.0),
])
def test_solver_pseudo_label(answers, label, share):
    assert solver_pseudo_label(answers) == (label, pytest.approx(share))


def test_pseudo_labels_vectorised_and_band():
    ids = torch.tensor([[0, 0, 1, -1], [-1, -1, -1, -1], [3, 2, 2, 3], [1, 1, 1, 1]])
    label, share = pseudo_labels(ids)
    assert label.tolist() == [0, -1, 3, 1]
    torch.testing.assert_close(share, torch.tensor([0.5, 0.0, 0.5, 1.0], dtype=torch.float64))
    _, tenths = pseudo_labels(torch.tensor([[0] * k + [-1] * (10 - k) for k in range(11)]))
    assert in_band(tenths, 0.3, 0.8).tolist() == [3 <= k <= 8 for k in range(11)]
    # The band is inclusive at both ends, with shares computed as count / 10 in fp32.
    counts = torch.arange(11)
    shares = counts.to(torch.float32) / 10
    assert in_band(shares, 0.3, 0.8).tolist() == [c in (3, 4, 5, 6, 7, 8) for c in range(11)]


# ---------------------------------------------------------------------------------- reward batching

class _FakeSolverEngine:
    """Answers a question whose stem is 'votes:X,Y,..' with those answers (N = no box, 9 = \\boxed{9})."""

    def __init__(self):
        self.calls = []

    def generate(self, requests):
        self.calls.append(requests)
        outs = []
        for r in requests:
            text = r.messages[-1]["content"][-1]["text"]
            votes = text.split("votes:")[1].split("\n")[0].split(",")
            assert len(votes) == r.params.n
            samples = [SimpleNamespace(text="I give up" if v == "N" else rf"<think>x</think> \boxed{{{v}}}")
                       for v in votes]
            outs.append(SimpleNamespace(request=r, samples=samples))
        return outs


def _question(votes, answer):
    return (f"<description>d</description> <question>votes:{votes}\nA) 1 B) 2 C) 3 D) 4</question> "
            f"<answer>{answer}</answer>")


def test_questioner_rewards_one_solver_call():
    cfg = resolve("tiny", None, parse_overrides(["--vzero.reward_votes", "4"]))
    recipe = object.__new__(VZeroRecipe)  # the reward only needs the config and the Solver's engine
    recipe.cfg, recipe.seed = cfg, 0
    recipe.solver = SimpleNamespace(engine=_FakeSolverEngine())
    image = object()
    samples = [[_question("A,A,B,N", "A"), "garbage", _question("B,B,B,A", "A")],
               [_question("N,N,N,A", "A"), _question("C,D,D,9", "D"), _question("A,B,C,D", "B")]]
    outputs = [SimpleNamespace(request=SimpleNamespace(images=[image], meta={"position": g}),
                               samples=[SimpleNamespace(text=t) for t in row]) for g, row in enumerate(samples)]
    stats = {}
    rewards = recipe.questioner_rewards(outputs, seed=1, stats=stats)
    calls = recipe.solver.engine.calls
    assert len(calls) == 1 and len(calls[0]) == 5  # ONE generate call with every valid question
    assert all(r.params.n == 4 and r.params.top_k == cfg.vzero.reward_top_k for r in calls[0])
    assert all(r.images == [image] for r in calls[0])
    assert len({r.params.seed for r in calls[0]}) == 5  # one seed per (image position, sample)
    want = [[min(0.5, 0.5), -1.0, 0.5 * 0.75],   # agree split; invalid; overturned by B (3 of 4)
            [0.0, min(0.5, 0.5), 0.5 * 0.25]]    # None wins; D agrees with 2 of 4 ("9" is None); A first of a 4-way tie
    torch.testing.assert_close(rewards, torch.tensor(want))
    assert stats["valid_question_rate"] == pytest.approx(5 / 6)
    assert stats["solver_none_rate"] == pytest.approx(1 / 5)
    assert stats["solver_agree_rate"] == pytest.approx(2 / 5)
    assert stats["solver_overturned_rate"] == pytest.approx(2 / 5)


def test_solver_rewards_match_pseudo_label():
    outputs = [SimpleNamespace(request=SimpleNamespace(meta={"label": "B"}),
                               samples=[SimpleNamespace(text=t) for t in (r"\boxed{B}", r"\boxed{b.}", "B", r"\boxed{C}")]),
               SimpleNamespace(request=SimpleNamespace(meta={"label": "D"}),
                               samples=[SimpleNamespace(text=t) for t in (r"\boxed{D}", r"\boxed{", "", r"\boxed{(D)}")])]
    stats = {}
    got = VZeroRecipe.solver_rewards(outputs, stats)
    assert got.tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]]
    assert stats["solver_letter_rate"] == pytest.approx(5 / 8)


# (Solver votes over 10, label, share = count / 10, kept in the band [0.3, 0.8]), written out by hand.
BAND_CASES = [
    ("A,A,B,C,D,N,N,N,N,N", "A", 0.2, False),  # below the band
    ("A,A,A,B,C,D,N,N,N,N", "A", 0.3, True),   # its lower edge
    ("B,B,B,B,B,A,C,D,N,N", "B", 0.5, True),
    ("C,C,C,C,C,C,C,C,A,B", "C", 0.8, True),   # its upper edge
    ("D,D,D,D,D,D,D,D,D,A", "D", 0.9, False),  # above
    ("D,D,D,D,D,D,D,D,D,D", "D", 1.0, False),
    ("N,N,N,N,N,N,N,N,N,N", None, 0.0, False),  # no letter at all: no label
]


def test_question_set_keeps_only_the_difficulty_band():
    """make_questions on fake engines: the new Questioner writes one question per image (plus one unparsable
    output), the old Solver votes; only labelled questions whose share lies in the band are kept."""
    from vzero_fast.data import ImageItem
    from vzero_fast.metrics import StageTimer

    texts = [_question(votes, "A") for votes, *_ in BAND_CASES] + ["no question here"]

    class Source:
        def __len__(self):
            return len(texts)

        def load(self, i):
            return ImageItem(index=i, key=f"synthetic:bar_chart:{i}", image=object())

    class Questioner:  # answers the request for image i with texts[i]
        def generate(self, requests):
            return [SimpleNamespace(request=r, samples=[SimpleNamespace(text=texts[r.meta["index"]])])
                    for r in requests]

    cfg = resolve("tiny", None, parse_overrides(["--vzero.label_votes", "10", "--vzero.band_low", "0.3",
                                                 "--vzero.band_high", "0.8"]))
    recipe = object.__new__(VZeroRecipe)
    recipe.cfg, recipe.seed, recipe.source = cfg, 0, Source()
    recipe.questioner = SimpleNamespace(engine=Questioner())
    recipe.solver = SimpleNamespace(engine=_FakeSolverEngine())
    trainer = SimpleNamespace(timer=StageTimer(), world=SimpleNamespace(rank=0, world_size=1))
    rows = recipe.make_questions(trainer, iteration=1)
    assert [r["image_index"] for r in rows] == list(range(len(texts)))
    for row, (votes, label, share, kept) in zip(rows, BAND_CASES, strict=False):
        assert row["valid"] and row["label"] == label and row["share"] == pytest.approx(share), row
        assert row["kept"] is kept, row
        assert row["votes"] == [None if v == "N" else v for v in votes.split(",")]
    assert not rows[-1]["valid"] and not rows[-1]["kept"]


# ------------------------------------------------------------------------------------------ end to end

ROW_KEYS = ("image", "image_index", "valid", "description", "question", "options", "intuitive_answer", "votes",
            "label", "share", "kept", "raw")


def test_tiny_vzero_end_to_end(tmp_path, tiny_model_dir):
    """1 iteration, 2 GRPO steps per role, from the shared tiny model (format warm-up included), evaluated on
    the built-in benchmark every 2 steps."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vzero_fast.model import check_model_dir
    from vzero_fast.recipes import build_recipe
    from vzero_fast.trainer import Trainer

    threads = torch.get_num_threads()
    cfg = resolve("tiny", None, parse_overrides([
        "--train.out", str(tmp_path), "--model.path", str(tiny_model_dir), "--train.recipe", "vzero",
        "--train.iterations", "1", "--train.max_steps_per_role", "2", "--data.synthetic_images", "24",
        "--train.eval_every", "2"]))
    try:
        trainer = Trainer(cfg)
        state = trainer.run(build_recipe("vzero", trainer))
    finally:
        torch.set_num_threads(threads)  # the tiny preset sets 1 thread; leave the session as it was
    assert state["global_step"] == 4
    rows = read_metrics(tmp_path)
    assert [(r["role"], r["iteration"], r["step"]) for r in rows] == [
        ("questioner", 1, 1), ("questioner", 1, 2), ("solver", 1, 1), ("solver", 1, 2)]
    for row in rows:
        for key in ("reward_mean", "reward_std", "loss", "kl", "entropy", "grad_norm", "response_length_mean",
                    "time_rollout", "time_reward", "time_train", "solver_letter_rate"):
            assert row[key] is not None and math.isfinite(row[key]), (key, row)
    for key in ("valid_question_rate", "solver_agree_rate", "solver_overturned_rate", "solver_none_rate",
                "solver_majority_share"):
        assert 0.0 <= rows[0][key] <= 1.0, (key, rows[0])
    assert -1.0 <= rows[0]["reward_mean"] <= 0.5
    assert rows[2]["questions"] == 24 and rows[2]["questions_kept"] >= 1
    assert "time_format_warmup" in rows[0] and "time_questions" in rows[2] and "time_labels" in rows[2]
    # train.eval_every 2: the built-in benchmark scores the stepping role after global steps 2 and 4 only.
    assert [r["global_step"] for r in rows if "eval_accuracy" in r] == [2, 4]
    for r in rows[1::2]:
        assert r["eval_items"] > 0 and 0.0 <= r["eval_accuracy"] <= 1.0 and r["time_eval"] > 0

    questions = [json.loads(line) for line in (tmp_path / "questions-iter1.jsonl").read_text().splitlines()]
    assert len(questions) == 24 and all(set(q) == set(ROW_KEYS) for q in questions)
    kept = [q for q in questions if q["kept"]]
    assert len(kept) == rows[2]["questions_kept"]
    for q in kept:
        assert q["valid"] and set(q["options"]) == set(LETTERS) and q["intuitive_answer"] in LETTERS
        assert q["label"] in LETTERS and len(q["votes"]) == cfg.vzero.label_votes
        assert q["share"] == pytest.approx(q["votes"].count(q["label"]) / cfg.vzero.label_votes)
        assert cfg.vzero.band_low <= q["share"] <= cfg.vzero.band_high

    warm = json.loads((tmp_path / "format_warmup.json").read_text())
    assert warm["loss_last"] < warm["loss_first"]
    for role in ("questioner", "solver"):
        saved = tmp_path / "checkpoints" / role / "iter-1"
        check_model_dir(saved)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(saved, dtype=torch.float32)
        live = trainer.roles[role].policy.model.state_dict()
        assert all(torch.equal(hf.state_dict()[k], v) for k, v in live.items())
    # The two roles trained apart from one warmed-up base.
    q, s = (trainer.roles[r].policy.lm_head_weight for r in ("questioner", "solver"))
    assert not torch.equal(q, s)
