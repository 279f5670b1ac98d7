"""`vzero-fast eval` and `train.eval_every` (vzero_fast/evaluate.py): the metrics on hand-built responses, the
built-in benchmark's truth and seeds, the JSONL / VLMEvalKit TSV readers with bad rows, the command's outputs
recounted from its predictions file, two checkpoints side by side, and eval rows in a training run."""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from _runs import stable
from PIL import Image

from vzero_fast.answers import answers_equal
from vzero_fast.cli import main
from vzero_fast.data import COLOURS, SYNTHETIC_KINDS, _set_seed, synthetic_figure
from vzero_fast.eval_bench import (
    SYNTHETIC_PLAN,
    Bench,
    Item,
    draw_with_truth,
    eval_seed,
    load_bench,
    synthetic_bench,
)
from vzero_fast.evaluate import (
    evaluate_engine,
    maj_at_k,
    majority,
    model_names,
    pass_at_k,
    predict,
    write_outputs,
)
from vzero_fast.metrics import read_metrics
from vzero_fast.rollout import RolloutEngine, RolloutOutput, Sample

pytest_plugins = ["_tiny_fixture"]


# ------------------------------------------------------------------------------------------ pure rules

def test_pass_at_k_is_the_unbiased_estimator():
    # n = 4 samples, c = 1 correct, k = 2: 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    assert pass_at_k([False, True, False, False], k=2) == pytest.approx(0.5)
    # k = n: any correct sample
    assert pass_at_k([False, False, True]) == 1.0
    assert pass_at_k([False, False, False]) == 0.0
    # n = 5, c = 2, k = 3: 1 - C(3, 3) / C(5, 3) = 1 - 1/10
    assert pass_at_k([True, False, True, False, False], k=3) == pytest.approx(0.9)
    assert pass_at_k([True, False], k=1) == pytest.approx(0.5)  # pass@1 = c / n
    with pytest.raises(ValueError, match="k"):
        pass_at_k([True, False], k=3)


def test_maj_at_k_groups_equal_answers_and_ignores_no_answer():
    assert maj_at_k(["3", "3.0", "4", None], "3")  # 3 and 3.0 are one answer: 2 votes to 1
    assert not maj_at_k(["4", "3", "4", None, None], "3")  # two Nones do not outvote 4
    assert not maj_at_k([None, None], "3")
    assert maj_at_k(["(b)", "B", "A"], "B")  # letters as answers_equal reads them
    assert maj_at_k(["B", "A", "A", "B"], "B") and not maj_at_k(["A", "B", "B", "A"], "B")  # ties: first seen
    assert maj_at_k(["1,000", "1000", "999"], "1000")
    assert maj_at_k(["Red", "red ", "blue"], "red")
    assert majority(["7", None, "7.0", "8"], "7") == ("7", 0.5)  # share over ALL answers


def test_predict_takes_the_box_and_is_lenient_only_as_documented():
    choice = Item(id="c", image=None, question="q", answer="C", answer_type="choice",
                  choices=["red", "blue", "green", "yellow"])
    assert predict("I think \\boxed{B}", choice) == "B"
    assert predict("\\boxed{(c).}", choice) == "C"
    assert predict("\\boxed{Green}", choice) == "C"  # the option's text
    assert predict("B", choice) == "B" and predict(" (d). ", choice) == "D"  # a bare letter, the whole response
    assert predict("The answer is B", choice) is None
    assert predict("\\boxed{purple}", choice) == "purple"  # kept as said; not correct
    number = Item(id="n", image=None, question="q", answer="7", answer_type="number")
    assert predict("7", number) == "7" and predict("\\boxed{7.0} or 8", number) == "7.0"
    assert predict("seven", number) is None
    text = Item(id="t", image=None, question="q", answer="10:13", answer_type="text")
    assert predict("10:13", text) is None and predict("\\boxed{10:13}", text) == "10:13"


# ------------------------------------------------------------------------------------------ built-in benchmark

def test_synthetic_truth_is_what_data_py_drew():
    bench = synthetic_bench(2 * len(SYNTHETIC_PLAN), size=160)
    assert {"colour", "count", "time"} <= {it.category for it in bench.items} <= {"colour", "count", "time", "value"}
    assert {it.answer_type for it in bench.items} == {"choice", "number", "text"}
    for i, it in enumerate(bench.items):
        kind = SYNTHETIC_PLAN[i % len(SYNTHETIC_PLAN)]
        if kind == "colour":
            continue
        # The recorded draw makes exactly data.py's figure (so the truth read from it is that figure's).
        image, _ = draw_with_truth(eval_seed(i), 160, kind)
        ref = synthetic_figure(eval_seed(i), 160, kind=kind)
        assert np.array_equal(np.asarray(image), np.asarray(ref)) and np.array_equal(np.asarray(it.image), np.asarray(ref))


def _components(mask: np.ndarray) -> int:
    """4-connected components of a boolean [H, W] mask (a plain flood fill)."""
    seen = np.zeros_like(mask)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        n += 1
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
    return n


def test_synthetic_shape_counts_match_the_pixels():
    items = [it for it in synthetic_bench(7 * 6, size=224).items if it.question == "How many shapes are there?"]
    assert len(items) == 6
    for it in items:
        ink = np.asarray(it.image).astype(int).sum(-1) < 700  # [H, W]: anything not white
        assert _components(ink) == int(it.answer), it.id
    colours = [it for it in synthetic_bench(7 * 4, size=112).items if it.category == "colour"]
    for it in colours:  # the shape's fill is the option the answer letter names
        pixels = Counter(map(tuple, np.asarray(it.image).reshape(-1, 3).tolist()))
        fill = next(c for c, _ in pixels.most_common() if c != (255, 255, 255))
        assert fill == COLOURS[it.choices["ABCD".index(it.answer)]], it.id
    assert sorted(it.answer for it in colours) == ["A", "B", "C", "D"]  # balanced: chance is 1/4


def test_eval_seeds_are_disjoint_from_training_seeds():
    eval_seeds = {eval_seed(i) for i in range(5000)}
    assert min(eval_seeds) >= 2**32 and len(eval_seeds) == 5000
    train = {_set_seed(s, i) for s in range(4) for i in range(2000)}  # data.py's figures; qa.py draws the same way
    assert max(train) < 2**32 and not eval_seeds & train
    # and no eval figure is a training figure (seed 0 training set vs the benchmark, kind by kind)
    bench = synthetic_bench(2 * len(SYNTHETIC_PLAN), size=112)
    seen = {synthetic_figure(_set_seed(0, i), 112, kind=SYNTHETIC_KINDS[i % 7]).tobytes() for i in range(70)}
    assert not any(it.image.tobytes() in seen for it in bench.items)


# ------------------------------------------------------------------------------------------ scoring, hand-built

class ScriptedEngine(RolloutEngine):
    """Answers each request from a table: question -> (greedy text, [k sampled texts])."""

    name = "scripted"

    def __init__(self, table):
        super().__init__()
        self.table, self.calls = table, 0

    def generate(self, requests):
        self.calls += 1
        outs = []
        for r in requests:
            text = r.messages[-1]["content"][-1]["text"]
            greedy, sampled = next(v for q, v in self.table.items() if text.startswith(q))
            texts = [greedy] if r.params.temperature == 0 else sampled
            assert len(texts) == r.params.n
            outs.append(RolloutOutput(request=r, prompt_ids=torch.zeros(1, dtype=torch.long),
                                      mm_token_type_ids=torch.zeros(1, dtype=torch.long), pixel_values=None,
                                      image_grid_thw=None,
                                      samples=[Sample(token_ids=torch.zeros(1, dtype=torch.long), text=t,
                                                      logprobs=torch.zeros(1), finish_reason="eos") for t in texts]))
        return outs

    def sync_weights(self, policy):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


def test_scores_and_files_recount_on_hand_built_responses(tmp_path):
    im = Image.new("RGB", (56, 56), "white")
    items = [Item(id="q1", image=im, question="Q1 colour?\nA) red\nB) blue", answer="B", answer_type="choice",
                  category="colour", choices=["red", "blue"]),
             Item(id="q2", image=im, question="Q2 how many?", answer="7", answer_type="number", category="count"),
             Item(id="q3", image=im, question="Q3 how many?", answer="3", answer_type="number", category="count"),
             Item(id="q4", image=im, question="Q4 time?", answer="10:13", answer_type="text", category="time")]
    table = {
        "Q1": ("\\boxed{B}", ["A", "\\boxed{blue}", "B"]),          # greedy right; maj B right; pass yes
        "Q2": ("\\boxed{7.0}", ["\\boxed{6}", "\\boxed{6}", "7"]),  # greedy right; maj 6 wrong; pass yes
        "Q3": ("3 apples", ["\\boxed{3}", "no", "x"]),             # greedy wrong (no box); maj 3 right; pass yes
        "Q4": ("\\boxed{10:15}", ["\\boxed{1:13}", "", "?"]),       # all wrong
    }
    engine = ScriptedEngine(table)
    rows = evaluate_engine(engine, items, k=3, batch=3, show_progress=False)
    assert engine.calls == 2  # 4 items in batches of 3
    assert [r["correct"] for r in rows] == [True, True, False, False]
    assert [r["maj_correct"] for r in rows] == [True, False, True, False]
    assert [r["samples_correct"] for r in rows] == [[False, True, True], [False, False, True],
                                                   [True, False, False], [False, False, False]]
    other = evaluate_engine(ScriptedEngine({q: ("\\boxed{B}", v[1]) for q, v in table.items()}), items, k=3,
                            show_progress=False)
    summary = write_outputs(tmp_path, Bench(name="hand", items=items, rows=5, skipped={"no_answer": 1}),
                            {"a": {"path": "A", "rows": rows, "seconds": 1.0},
                             "b": {"path": "B", "rows": other, "seconds": 1.0}}, k=3)
    a = summary["models"]["a"]
    assert (a["accuracy"], a["maj_at_k"], a["pass_at_k"]) == (0.5, 0.5, 0.75)
    assert a["sample_accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 0) / 4)
    assert a["categories"]["count"]["accuracy"] == 0.5 and a["categories"]["time"]["pass_at_k"] == 0.0
    assert summary["models"]["b"]["accuracy"] == 0.25  # only Q1's truth is B
    _recount(tmp_path, summary)
    md = (tmp_path / "summary.md").read_text()
    assert "| a | 4 | 0.500 | 0.500 | 0.750 |" in md and "1 no_answer" in md


def _recount(out, summary):
    """Every metric of summary.json recomputed from predictions.jsonl alone."""
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["model"] for p in preds} == set(summary["models"])
    for name, m in summary["models"].items():
        mine = [p for p in preds if p["model"] == name]
        assert len(mine) == m["items"] == summary["items"]
        for p in mine:
            assert p["correct"] == answers_equal(p["prediction"], p["answer"])
        assert m["accuracy"] == pytest.approx(sum(p["correct"] for p in mine) / len(mine))
        if "samples_correct" in mine[0]:
            assert m["pass_at_k"] == pytest.approx(sum(any(p["samples_correct"]) for p in mine) / len(mine))
            assert m["maj_at_k"] == pytest.approx(sum(maj_at_k(p["sample_predictions"], p["answer"])
                                                      for p in mine) / len(mine))
        for cat, c in m["categories"].items():
            sub = [p for p in mine if p["category"] == cat]
            assert c["items"] == len(sub) and c["accuracy"] == pytest.approx(sum(p["correct"] for p in sub) / len(sub))


# ------------------------------------------------------------------------------------------ the command

def test_eval_synthetic_two_checkpoints_side_by_side(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--model", f"base={tiny_model_dir}", f"again={tiny_model_dir}", "--bench", "synthetic",
               "--limit", "7", "--k", "2", "--max-new-tokens", "4", "--synthetic-size", "112", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == 7 and list(summary["models"]) == ["base", "again"]
    _recount(out, summary)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # same weights, same per-item seeds: the same responses, greedy and sampled
    by = {m: [(p["response"], p["samples"]) for p in preds if p["model"] == m] for m in ("base", "again")}
    assert by["base"] == by["again"]
    assert all(len(p["samples"]) == 2 for p in preds)
    printed = capsys.readouterr().out
    assert "| base | 7 |" in printed and "summary.md" in printed
    assert (summary["png"] is not None) == (out / "comparison.png").exists()
    assert summary["png"] is not None or "matplotlib is not installed" in printed


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    synthetic_figure(seed, 112, kind="shapes").save(buf, format="PNG")
    return buf.getvalue()


def test_eval_jsonl_and_tsv_skip_and_count_bad_rows(tmp_path, tiny_model_dir):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    rows = [{"image": "img/0.png", "question": "How many?", "answer": "4", "category": "count", "id": "a"},
            {"image": "img/1.png", "question": "Which?", "choices": ["x", "y", "z"], "answer": "y"},
            {"image": "img/2.png", "question": "Say hi", "answer": "hi", "answer_type": "text"},
            {"image": "img/2.png", "question": "Which? A) up B) down", "answer": "B", "category": "dir"},
            {"image": "img/missing.png", "question": "?", "answer": "1"},
            {"image": "img/broken.png", "question": "?", "answer": "1"},
            {"image": "img/0.png", "question": "no answer"},
            {"image": "img/0.png", "question": "Which?", "choices": ["x", "y"], "answer": "D"}]
    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    good = base64.b64encode(_png(5)).decode()
    tsv = tmp_path / "bench.tsv"
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category"]
    lines = [header,
             ["10", good, "What is shown?", "", "cat", "dog", "", "", "B", "animals"],
             ["11", "10", "Same image?", "look closely", "yes", "no", "", "", "A", "animals"],  # image by reference
             ["12", "%%%not base64%%%", "?", "", "a", "b", "", "", "A", "x"],
             ["13", base64.b64encode(b"hello, not an image").decode(), "?", "", "a", "b", "", "", "A", "x"],
             ["14", good, "", "", "a", "b", "", "", "A", "x"]]
    tsv.write_text("\n".join("\t".join(r) for r in lines) + "\n")
    for bench, items, skipped in ((jsonl, 4, {"image_missing": 1, "image_corrupt": 1, "no_answer": 1,
                                              "answer_not_an_option": 1, "bad_json": 1}),
                                  (tsv, 2, {"undecodable_base64": 1, "image_corrupt": 1, "no_question": 1})):
        out = tmp_path / f"out_{bench.suffix[1:]}"
        assert main(["eval", "--model", str(tiny_model_dir), "--bench", str(bench), "--k", "0",
                     "--max-new-tokens", "3", "--device", "cpu", "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["items"] == items and summary["skipped"] == skipped
        assert summary["rows"] == items + sum(skipped.values())
        _recount(out, summary)
    limited = load_bench(str(jsonl), limit=2)  # reading stops at the limit: later bad rows are never seen
    assert len(limited.items) == 2 and limited.rows == 2 and limited.skipped == {}
    preds = [json.loads(line) for line in (tmp_path / "out_jsonl" / "predictions.jsonl").read_text().splitlines()]
    assert [(p["id"], p["answer"], p["answer_type"]) for p in preds] == [
        ("a", "4", "number"), ("2", "B", "choice"), ("3", "hi", "text"), ("4", "B", "choice")]
    assert "A) x\nB) y\nC) z" in preds[1]["question"]
    preds = [json.loads(line) for line in (tmp_path / "out_tsv" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["10", "11"] and preds[1]["question"].startswith("Hint: look closely\n")


@pytest.mark.parametrize("args, message", [
    (["--bench", "nowhere.jsonl"], "no such file"),
    (["--bench", "setup.txt"], "a .jsonl or a VLMEvalKit .tsv"),
    (["--bench", "synthetic", "--k", "-1"], "--k -1"),
])
def test_eval_mistakes_are_one_line_exit_2(args, message, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "setup.txt").write_text("x")
    args = [a if a != "setup.txt" else str(tmp_path / "setup.txt") for a in args]
    assert main(["eval", "--model", str(tiny_model_dir), *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--bench", "synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-model" in err and len(err.splitlines()) == 1


def test_model_names(tmp_path):
    for d in ("a/iter-1", "b/iter-1", "base"):
        (tmp_path / d).mkdir(parents=True)
    names = model_names([str(tmp_path / "base"), str(tmp_path / "a/iter-1"), str(tmp_path / "b/iter-1"),
                         f"mine={tmp_path / 'base'}", f"mine={tmp_path / 'a/iter-1'}"])
    assert list(names) == ["base", "a/iter-1", "b/iter-1", "mine", "mine#2"]
    assert names["mine#2"] == tmp_path / "a/iter-1" and names["b/iter-1"] == tmp_path / "b/iter-1"


def test_eval_help_works():
    proc = subprocess.run([sys.executable, "-m", "vzero_fast", "eval", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--bench" in proc.stdout and "maj@k" in proc.stdout


# ------------------------------------------------------------------------------------------ during training

def _toy_run(out, tiny_model_dir, *extra):
    proc = subprocess.run([sys.executable, "-m", "vzero_fast", "train", "--recipe", "toy", "--preset", "tiny",
                           "--model", str(tiny_model_dir), "--iterations", "1", "--max-steps-per-role", "3",
                           *extra, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out)


def test_eval_every_writes_eval_rows_into_metrics(tmp_path, tiny_model_dir):
    rows = _toy_run(tmp_path / "run", tiny_model_dir, "--train.eval_every", "2")
    assert [r["global_step"] for r in rows] == [1, 2, 3]
    assert ["eval_accuracy" in r for r in rows] == [False, True, False]
    row = rows[1]
    assert row["eval_items"] == 28 and 0 <= row["eval_accuracy"] <= 1 and row["time_eval"] > 0
    assert "time_eval" not in rows[0]
    # the per-category scores recount to the overall one (items per category from the benchmark itself)
    bench = synthetic_bench(28, 112)
    n = Counter(it.category for it in bench.items)
    assert {k for k in row if k.startswith("eval_accuracy_")} == {f"eval_accuracy_{c}" for c in n}
    assert math.isclose(sum(row[f"eval_accuracy_{c}"] * k for c, k in n.items()) / 28, row["eval_accuracy"])
    # evaluating draws no random number of the run and leaves the weights as they were: training is unchanged
    plain = _toy_run(tmp_path / "plain", tiny_model_dir)
    assert [stable(r) for r in plain] == [{k: v for k, v in stable(r).items() if not k.startswith("eval_")}
                                          for r in rows]
