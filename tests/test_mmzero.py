"""The MM-Zero recipe (vzero_fast/recipes/mmzero.py): its plumbing on hand-built outputs, and the tiny run end to
end (`vzero-fast train --recipe mmzero --preset tiny`) with exact resume. The rules themselves are tested in
tests/test_mmzero_rules.py, rendering and confinement in tests/test_render.py and tests/test_sandbox.py."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from _runs import assert_same_weights, stable_metrics, train, train_until_signal
from PIL import Image

from vzero_fast.config import ConfigError, resolve
from vzero_fast.metrics import read_metrics
from vzero_fast.recipes.mmzero import (
    MMZeroRecipe,
    extract_program,
    solver_answer,
)
from vzero_fast.recipes.mmzero_warmup import proposal_target, template_proposal
from vzero_fast.render import RenderPool
from vzero_fast.rollout import Request, RolloutOutput, Sample

ARGS = ["--recipe", "mmzero", "--preset", "tiny", "--iterations", "1", "--max-steps-per-role", "2"]


def _output(texts: list[str], meta: dict | None = None) -> RolloutOutput:
    samples = [Sample(token_ids=torch.tensor([1]), text=t, logprobs=torch.zeros(1), finish_reason="eos")
               for t in texts]
    return RolloutOutput(request=Request.from_image_text(None, "q", meta=meta or {}), prompt_ids=torch.tensor([1]),
                         mm_token_type_ids=torch.tensor([0]), pixel_values=None, image_grid_thw=None, samples=samples)


def _bare_recipe(pool: RenderPool | None = None) -> MMZeroRecipe:
    """The recipe's methods that need no trainer or model (rendering, rewards), on the tiny preset's settings."""
    recipe = object.__new__(MMZeroRecipe)
    recipe.cfg = resolve("tiny")
    recipe.mz = recipe.cfg.mmzero
    recipe.seed, recipe.language, recipe.factor = 0, "svg", 28
    recipe.pool = pool
    return recipe


def test_extract_program_flags():
    """ALGORITHMS.md section 2, Coder: code from a ```svg fence, else an ```xml fence holding <svg, else the first
    raw <svg ...</svg>; empty implies not SVG; code not starting with `<` is not SVG."""
    svg = '<svg width="4" height="4"><rect width="2" height="2"/></svg>'
    assert extract_program(f"Here:\n```svg\n{svg}\n```", "svg") == (svg, False, False)
    assert extract_program(f"```xml\n{svg}\n```", "svg")[0].strip() == svg
    assert extract_program(f"text {svg} more", "svg") == (svg, False, False)
    assert extract_program("no code at all", "svg") == ("", True, True)
    code, empty, not_svg = extract_program("```svg\nrect width=2\n```", "svg")
    assert (code.strip(), empty, not_svg) == ("rect width=2", False, True)
    prog = "import matplotlib.pyplot as plt\nplt.bar([1], [2])\n"
    assert extract_program(f"```python\n{prog}```", "python") == (prog, False, False)
    assert extract_program("plt.bar([1], [2])", "python") == ("", True, False)


def test_solver_answer_squeezes_and_defaults_to_none():
    """The last \\boxed{}, after whitespace around < > / is deleted; "None" when there is none."""
    assert solver_answer("<think>x</think> \\boxed{1 / 2}") == "1/2"
    assert solver_answer("\\boxed{3} then \\boxed{4}") == "4"
    assert solver_answer("no box here") == "None"


def test_topics_cover_each_topic_once_per_epoch():
    recipe = _bare_recipe()
    topics = recipe.mz.topics
    first = recipe.topics(iteration=1, step=0, count=len(topics))
    assert sorted(first) == sorted(topics)
    two_epochs = recipe.topics(1, 0, 2 * len(topics))
    assert Counter(two_epochs) == Counter({t: 2 for t in topics})
    assert recipe.topics(1, 1, 3) == two_epochs[3:6]  # a step's topics depend on (seed, iteration, step) only
    assert recipe.topics(2, 0, len(topics)) != first or len(topics) == 1


def test_warmup_templates_parse():
    """The warm-up's templated proposal is what the Proposer's parser reads back (format contract)."""
    import numpy as np

    from vzero_fast.recipes.mmzero_rules import parse_proposal

    rng = np.random.default_rng(0)
    for _ in range(8):
        p = template_proposal(rng)
        assert parse_proposal(proposal_target(p)) == p


def test_solver_rewards_are_the_formula():
    """0.9 * grade_answer(answer, label) + 0.1 * format (ALGORITHMS.md section 2, Solver reward)."""
    outs = [_output(["<think>a</think> \\boxed{12}", "\\boxed{12}", "<think>a</think> \\boxed{7}", "nothing"],
                    meta={"label": "12"}),
            _output(["<think>b</think>\n\\boxed{1/2}", "<think>b</think> \\boxed{2/4}", "<think></think>\\boxed{0.5}",
                     "<think>b</think> \\boxed{ 1 / 2 }"], meta={"label": "1/2"})]
    stats: dict = {}
    r = MMZeroRecipe.solver_rewards(outs, stats)
    # 2/4 != 1/2 (unreduced fractions compare as strings); 0.5 vs 1/2: sympy-equal under grade_answer.
    want = torch.tensor([[1.0, 0.9, 0.1, 0.0], [1.0, 0.1, 1.0, 1.0]])
    torch.testing.assert_close(r, want)
    assert stats["solver_boxed_rate"] == 7 / 8


def test_bad_programs_are_failed_renders_and_the_pool_keeps_going():
    """A canvas of 100000 x 100000, blank output and non-SVG text are failed renders (not exceptions); a good
    program in the same batch renders, and its image is what the Solver would see (RGB, multiple of 28)."""
    good = '<svg width="90" height="60"><rect x="10" y="10" width="30" height="40" fill="red"/></svg>'
    huge = '<svg width="100000" height="100000"><rect width="10" height="10"/></svg>'
    with RenderPool(2, language="svg", timeout=20, memory_mib=512) as pool:
        recipe = _bare_recipe(pool)
        outs = [_output([f"```svg\n{huge}\n```", "nothing here", f"```svg\n{good}\n```", "```svg\nrect\n```"])]
        stats: dict = {}
        (progs,) = recipe.programs(outs, stats=stats)
    assert [p.rendered for p in progs] == [False, False, True, False]
    assert [(p.empty, p.not_svg) for p in progs] == [(False, False), (True, True), (False, False), (False, True)]
    img = progs[2].image
    assert img.mode == "RGB" and img.size[0] % 28 == 0 and img.size[1] % 28 == 0
    assert stats["time_render"] >= 0


def test_python_coder_programs_render_confined():
    """mmzero.code_language = python: the last ```python fence runs confined (matplotlib) and its figure is the
    image; a program that raises is one failed render."""
    prog = "import matplotlib.pyplot as plt\nplt.bar([1, 2, 3], [3, 1, 2])\n"
    with RenderPool(1, language="python", timeout=30, memory_mib=1024) as pool:
        recipe = _bare_recipe(pool)
        recipe.language = "python"
        (progs,) = recipe.programs([_output([f"```python\n{prog}```", "```python\nraise SystemExit(3)\n```"])])
    assert progs[0].rendered and progs[0].image.mode == "RGB"
    assert not progs[1].rendered and not progs[1].empty and not progs[1].not_svg


class _ScriptedSolver:
    """A stand-in Solver engine: answers each question with scripted texts, keyed by the question."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls = script, 0

    def generate(self, requests):
        self.calls += 1
        outs = []
        for r in requests:
            text = r.messages[-1]["content"][-1]["text"]
            question = next(q for q in self.script if text.startswith(q))
            assert len(r.images) == 1 and r.params.n == len(self.script[question])
            outs.append(_output(self.script[question]))
        return outs


def test_answer_sets_s_and_c_from_the_easy_and_the_hard_question():
    """Program.s from the easy answers against the proposal's easy answer (all n in the denominator); c from the
    hard answers' clusters over the VALID ones (ALGORITHMS.md section 2); one Solver call for all images."""
    from vzero_fast.recipes.mmzero import Program, Proposal
    from vzero_fast.render import RenderResult

    recipe = _bare_recipe()
    solver = _ScriptedSolver({
        "How many bars?": ["\\boxed{3}", "\\boxed{3.0}", "\\boxed{4}", "none", "\\boxed{3}"],
        "Which is tallest?": ["\\boxed{B}", "\\boxed{b}", "\\boxed{n/a}", "\\boxed{C}", "x"]})
    recipe.solver = SimpleNamespace(engine=solver)
    q = Proposal(caption="c", easy_question="How many bars?", easy_answer="3", hard_question="Which is tallest?",
                 hard_answer="B")
    ok = RenderResult(ok=True, png=b"", width=4, height=4, error="", seconds=0.0)
    progs = [Program(code="<svg/>", empty=False, not_svg=False, render=ok, image=Image.new("RGB", (28, 28))),
             Program(code="", empty=True, not_svg=True, render=None)]
    recipe.answer(progs, [q, q], n=5, seed=0)
    assert solver.calls == 1
    # easy: 3, 3.0, 3 match "3" -> s = 3/5 (the unboxed "none" counts in the denominator);
    # hard: valid answers B, b, C, None ("x" has no box -> "None" is invalid, n/a invalid): B/b one cluster of 2,
    # C one of 1 -> c = 2/3
    assert progs[0].s == pytest.approx(3 / 5) and progs[0].c == pytest.approx(2 / 3)
    assert progs[0].easy == ["3", "3.0", "4", "None", "3"]
    assert progs[1].s is None and progs[1].stats is None


def test_rendered_png_becomes_the_solvers_rgb_image():
    """resvg leaves the background transparent: the Solver sees it on white (as image files are read), resized
    to the pixel bounds in multiples of the family's factor; a size above PIL's file guard (89M px) decodes."""
    import io

    from vzero_fast.data import fit_pixels, image_from_png

    rgba = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 30, 40))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    img = image_from_png(buf.getvalue(), min_pixels=56 * 56, max_pixels=112 * 112, factor=28)
    assert img.mode == "RGB" and img.size[0] % 28 == 0 and img.size[1] % 28 == 0
    assert img.getpixel((img.size[0] - 1, img.size[1] // 2)) == (255, 255, 255)
    assert img.getpixel((0, img.size[1] // 2)) == (255, 0, 0)
    wide = Image.new("L", (9600, 9600), 255)  # 92M px: Image.open refuses it as a decompression bomb
    buf = io.BytesIO()
    wide.save(buf, format="PNG", compress_level=1)
    got = image_from_png(buf.getvalue(), min_pixels=56 * 56, max_pixels=112 * 112)
    assert got.size == fit_pixels(9600, 9600, min_pixels=56 * 56, max_pixels=112 * 112)  # smart_resize (tested)


def test_mmzero_configs_check_their_values():
    cfg = resolve("mmzero-7b")
    assert cfg.train.recipe == "mmzero" and cfg.train.max_steps_per_role == 20
    assert (cfg.proposer.rollout_n, cfg.coder.rollout_n, cfg.solver.rollout_n) == (4, 4, 8)
    assert (cfg.coder.temperature, cfg.coder.top_p, cfg.mmzero.coder_samples, cfg.mmzero.solver_votes) == (
        0.7, 0.95, 4, 5)
    assert (cfg.mmzero.vote_temperature, cfg.mmzero.vote_top_k, cfg.mmzero.label_votes) == (1.0, 40, 10)
    assert cfg.proposer.prompts_per_step * cfg.proposer.rollout_n == 72  # the batch of the batch terms
    assert cfg.mmzero.render_timeout == 30.0
    for bad in ({"mmzero": {"code_language": "js"}}, {"mmzero": {"solver_votes": 0}},
                {"mmzero": {"topics": []}}, {"coder": {"top_p": 0}}):
        with pytest.raises(ConfigError):
            resolve("tiny", None, bad)
    assert resolve("tiny", None, {"mmzero": {"topics": "maps|tables, charts"}}).mmzero.topics == (
        "maps", "tables, charts")


@pytest.mark.slow
def test_tiny_mmzero_end_to_end_then_exact_resume(tmp_path):
    """The acceptance run: 1 iteration, 2 steps per role, format warm-up included; images saved as PNG that PIL
    opens, proposals-iter1.jsonl with proposal, code, render result, s and c; checkpoints that transformers loads.
    Then a run stopped by SIGTERM mid-way and resumed writes the same metrics and weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    run = tmp_path / "reference"
    train([*ARGS, "--out", str(run)])
    rows = read_metrics(run)
    roles = [(r["role"], r["step"]) for r in rows]
    assert roles[:2] == [("proposer", 1), ("proposer", 2)]
    for r in rows:
        assert math.isfinite(r["reward_mean"]) and math.isfinite(r["time_total"])
    prop = [r for r in rows if r["role"] == "proposer"]
    for r in prop:
        for key in ("proposal_parse_rate", "render_success_rate", "renders", "time_render"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert 0 <= r["proposal_parse_rate"] <= 1 and -1 <= r["reward_mean"] <= 1.5
    assert any(r["proposal_parse_rate"] > 0 for r in prop), "the warm-up should leave some parsable proposals"
    assert "time_format_warmup" in rows[0]

    lines = [json.loads(x) for x in (run / "proposals-iter1.jsonl").read_text().splitlines()]
    phases = Counter(r["phase"] for r in lines)
    assert phases["proposer"] == 2 * 2 * 4 and phases["pool"] == 12  # steps x topics x n; pool_size
    progs = [p for r in lines if r["phase"] in ("proposer", "coder") for p in (r.get("programs") or [r])
             if "rendered" in p]
    assert progs and {"code", "rendered", "render_error", "s", "c", "png"} <= set(progs[0])
    pngs = [p for p in progs if p["rendered"]]
    for p in pngs:
        with Image.open(run / p["png"]) as im:
            im.verify()
        assert p["s"] is not None and 0 <= p["s"] <= 1 and 0 <= p["c"] <= 1
    assert all(p["png"] is None for p in progs if not p["rendered"])
    items = [json.loads(x) for x in (run / "solver-iter1.jsonl").read_text().splitlines()]
    assert len(items) == sum(r["proposal"] is not None for r in lines if r["phase"] == "pool")

    for role in ("proposer", "coder", "solver"):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "checkpoints" / role / "iter-1",
                                                                  dtype=torch.float32)
        assert model.lm_head.weight.isfinite().all()

    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(run / "format-warmup", out / "format-warmup")
    shutil.copy(run / "format_warmup.json", out / "format_warmup.json")
    stopped_at, _ = train_until_signal([*ARGS, "--resume"], out, after_rows=3)
    assert 3 <= stopped_at < len(rows)
    train(["--resume", "--out", str(out)])
    assert stable_metrics(out) == stable_metrics(run)
    for role in ("proposer", "coder", "solver"):
        assert_same_weights(run / "checkpoints" / role / "iter-1", out / "checkpoints" / role / "iter-1")
    assert [json.loads(x) for x in (out / "proposals-iter1.jsonl").read_text().splitlines()] == lines

    # The same recipe with LoRA roles (issue 19: every recipe's roles through trainer.add_role), on the same
    # warmed base: one step per role, each role saved as a PEFT adapter directory.
    lora = tmp_path / "lora"
    lora.mkdir()
    shutil.copytree(run / "format-warmup", lora / "format-warmup")
    shutil.copy(run / "format_warmup.json", lora / "format_warmup.json")
    train(["--recipe", "mmzero", "--preset", "tiny", "--iterations", "1", "--max-steps-per-role", "1", "--resume",
           "--model.lora.rank", "8", "--out", str(lora)])
    assert [r["role"] for r in read_metrics(lora)][0] == "proposer"
    for role in ("proposer", "coder", "solver"):
        assert (lora / "checkpoints" / role / "iter-1" / "adapter_config.json").exists()


def test_mmzero_refuses_images(tmp_path, capsys):
    from vzero_fast.cli import main

    code = main(["train", "--recipe", "mmzero", "--preset", "tiny", "--images", str(tmp_path), "--out",
                 str(tmp_path / "run")])
    assert code == 2 and "starts from no images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
