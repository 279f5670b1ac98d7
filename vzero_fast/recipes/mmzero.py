"""MM-Zero: a Proposer, a Coder and a Solver, all from one base model, improve each other from zero data
(ALGORITHMS.md section 2; arXiv 2603.09206). No image exists at the start: the Coder draws them.

Per iteration k (`stages`), each role continuing from its own last checkpoint:

    proposer stage, per step:                  coder stage:                         solver stage:
      topics -> Proposer: n proposals each       pool: updated Proposer writes        items: updated Coder draws one
      valid -> frozen Coder: N programs each       pool_size proposals; frozen          image per pool proposal; the
      programs -> confined renderer (pool)         Coder: N programs each, kept         not-yet-updated Solver answers
      rendered -> Solver: n answers to the         when render success in               hard and easy question
        easy and the hard question                 [0.25, 0.75]                         label_votes times: label =
      (s, c) per image -> proposer reward      per step: kept proposals -> Coder:       largest cluster, kept by the
        + content-type / diversity batch         n programs, rendered, answered:        consistency filters
        terms; GRPO on the Proposer              coder reward; GRPO on the Coder      per step: GRPO on the Solver

The rules (rewards, clusters, filters, parsing) are pure functions in vzero_fast/recipes/mmzero_rules.py,
re-exported here; answer equivalence is `answers.grade_answer`. Rendering is vzero_fast/render.py: every
model-written program runs in a child confined by the native `vzero-sandbox` launcher (sandbox/), never in
this process.

Decisions:
- One process: the frozen roles (the Coder while the Proposer trains, the Solver while the other two train) are
  the in-memory roles sampled through their own rollout engines; nothing is served, written or reloaded between
  phases (the reference starts a vLLM service per phase). The CURRENT Solver scores both the Proposer's and the
  Coder's images (in the reference scripts the Coder phase's reward service was started from the Coder's own
  checkpoint: ALGORITHMS.md calls that a quirk, not a design).
- Rendering overlaps generation: Coder programs are generated in chunks (one chunk = coder.prompts_per_step
  prompts) and each chunk's programs go to the render pool (threads, each waiting on one confined child) before
  the next chunk is generated. `time_render` is the time a step waited for renders after its last generate
  (part of `time_reward`).
- The Coder's prompt pool (`phase: pool` rows) is built at the Coder stage's start and the Solver's items at
  the Solver stage's start, written to proposals-iter<k>.jsonl / solver-iter<k>.jsonl with their images, and
  read back (never redrawn) when a run resumes inside the stage: the roles have trained since. Every row of a
  Proposer or Coder step is written with the step's images (images/iter<k>/<phase>/step<s>/...), so the file
  holds, for every proposal, the proposal, its programs, the render results and s, c; rows of steps after the
  checkpoint a run resumes from are dropped before the steps are redone.
- Every sampling seed is `step_seed(seed, purpose, iteration, step, index, sample)`: a resumed run draws what an
  uninterrupted one would. Topic k of a step is position k of seeded per-epoch permutations of mmzero.topics.
- Only the Solver sees images. The Proposer and the Coder get text-only prompts.
- code_language = python (the reference's earlier matplotlib path): the Coder writes a matplotlib program in a
  ```python fence, run confined the same way; `not_svg` is then never set (the program is not meant to be SVG).
- Steps per stage: train.max_steps_per_role when > 0, else the paper's 20; the Coder and Solver stages train 0
  steps (with a warning) when their filters keep nothing.
- Format warm-up (tiny preset only, mmzero.format_warmup_steps > 0): templated outputs of the three roles with
  random answers (format only, no labels), through vzero_fast/warmup.py (vzero_fast/recipes/mmzero_warmup.py).
- Not implemented: torchrun (the recipe runs in one process and says so); Solver timeouts (in process there are
  none).

Run: `vzero-fast train --recipe mmzero --preset tiny --out runs/mmzero-tiny --iterations 1` (CPU, minutes),
`vzero-fast train --preset mmzero-7b --model DIR --out DIR` (the paper's setting).
Tests: tests/test_mmzero_rules.py (rules), tests/test_mmzero.py (the recipe end to end, resume),
tests/test_render.py and tests/test_sandbox.py (rendering and confinement).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vzero_fast.answers import boxed_answer, squeeze_tag_spaces
from vzero_fast.config import Config, ConfigError
from vzero_fast.data import epoch_picks, image_from_png
from vzero_fast.model import image_factor
from vzero_fast.recipes.mmzero_rules import (  # noqa: F401  (the public rule functions, re-exported)
    BAND,
    CONTENT_TYPES,
    Proposal,
    coder_reward,
    content_type_penalty,
    diversity_changes,
    extract_svg,
    keep_coder_prompt,
    keep_solver_item,
    parse_proposal,
    proposer_batch_rewards,
    proposer_reward,
    render_stats,
    solver_label,
    solver_reward,
    solver_well_formed,
    svg_flags,
)
from vzero_fast.render import RenderPool, RenderResult
from vzero_fast.rollout import Request, RolloutOutput, SamplingParams
from vzero_fast.trainer import Trainer, step_seed
from vzero_fast.warmup import ensure_warmup

log = logging.getLogger("vzero_fast.recipes.mmzero")

PROPOSER, CODER, SOLVER = "proposer", "coder", "solver"
PAPER_STEPS = 20  # GRPO steps per role per iteration (ALGORITHMS.md section 2, Schedule)

PROPOSER_PROMPT = (
    "Topic: {topic}.\nPropose one figure on this topic that can be drawn as an image, and two questions about it. "
    "Write the figure's kind inside <content_type></content_type> (one of: data_chart, diagram, geometry, timeline, "
    "map, table, other), a complete description of everything the figure shows (all labels and numbers) inside "
    "<caption></caption>, a question answered by reading the figure inside <easy_question></easy_question> with its "
    "answer inside <easy_answer></easy_answer>, and a question that needs reasoning over the figure inside "
    "<hard_question></hard_question> with its answer inside <hard_answer></hard_answer>. Answers are short: a "
    "number, a word or a short phrase."
)
CODER_PROMPT = {
    "svg": ("Draw this figure as one self-contained SVG image.\nFigure: {caption}\nA reader must be able to answer "
            "from the image alone: {easy_question} / {hard_question}\nDo not write the answers into the figure. "
            "Reply with the SVG code only, inside a ```svg code fence."),
    "python": ("Draw this figure with matplotlib.\nFigure: {caption}\nA reader must be able to answer from the "
               "image alone: {easy_question} / {hard_question}\nDo not write the answers into the figure. Reply "
               "with one self-contained Python program inside a ```python code fence; it draws on the current "
               "figure and does not show it."),
}
SOLVER_PROMPT = ("{question}\n\nThink step by step inside <think></think>, then put the final answer (a number, a "
                 "word or a short phrase) inside \\boxed{{}}.")


def proposer_text(topic: str) -> str:
    return PROPOSER_PROMPT.format(topic=topic)


def coder_text(p: Proposal, language: str = "svg") -> str:
    return CODER_PROMPT[language].format(caption=p.caption, easy_question=p.easy_question,
                                         hard_question=p.hard_question)


def solver_text(question: str) -> str:
    return SOLVER_PROMPT.format(question=question)


def solver_answer(text: str) -> str:
    """The Solver's answer: the last \\boxed{} after the whitespace squeeze, "None" without one."""
    return boxed_answer(squeeze_tag_spaces(text))


_PYTHON_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(text: str, language: str) -> tuple[str, bool, bool]:
    """(code, empty, not_svg) of a Coder response: mmzero_rules' extract_svg and svg_flags, or in python mode the
    last ```python fence (empty when there is none; never "not SVG")."""
    if language == "svg":
        code = extract_svg(text)
        return (code, *svg_flags(code))
    found = _PYTHON_FENCE.findall(text)
    code = found[-1] if found else ""
    return code, not code.strip(), False


@dataclass
class Program:
    """One Coder response, rendered, and (when it rendered) answered by the Solver."""

    code: str
    empty: bool
    not_svg: bool
    render: RenderResult | None = None
    image: Any = None  # PIL image as the Solver sees it (RGB, inside the pixel bounds)
    png: str | None = None  # saved path, relative to the run directory
    easy: list[str] | None = None
    hard: list[str] | None = None
    s: float | None = None
    c: float | None = None

    @property
    def rendered(self) -> bool:
        return self.render is not None and self.render.ok

    @property
    def stats(self) -> tuple[float, float] | None:
        return (self.s, self.c) if self.rendered else None

    def row(self) -> dict[str, Any]:
        r = self.render
        return {"code": self.code, "empty": self.empty, "not_svg": self.not_svg, "rendered": self.rendered,
                "render_error": r.error if r is not None else "no code",
                "size": [r.width, r.height] if r is not None and r.ok else None, "png": self.png,
                "easy_answers": self.easy, "hard_answers": self.hard, "s": self.s, "c": self.c}


# ---------------------------------------------------------------------------------------- the recipe

class MMZeroRecipe:
    def __init__(self, trainer: Trainer):
        if trainer.world.world_size > 1:
            raise ConfigError("the mmzero recipe runs in one process (torchrun is not supported for it yet); "
                              "run it without torchrun")
        self.trainer = trainer
        self.cfg: Config = trainer.cfg
        self.mz = self.cfg.mmzero
        self.seed = self.cfg.train.seed
        self.language = self.mz.code_language
        self.factor = image_factor(trainer.model_path)
        self.pool = RenderPool(self.mz.render_workers, language=self.language, timeout=self.mz.render_timeout,
                               memory_mib=self.mz.render_memory_mib)
        if self.mz.format_warmup_steps > 0:
            from vzero_fast.recipes.mmzero_warmup import warmup_made_with, warmup_pass

            trainer.model_path = ensure_warmup(trainer, made_with=warmup_made_with(self.cfg),
                                               warm=lambda policy: warmup_pass(policy, self.cfg, self.factor))
        self.proposer = trainer.add_role(PROPOSER, self.cfg.proposer)
        self.coder = trainer.add_role(CODER, self.cfg.coder)
        self.solver = trainer.add_role(SOLVER, self.cfg.solver)

    def stages(self, iteration: int) -> list[str]:  # noqa: ARG002
        return [PROPOSER, CODER, SOLVER]

    def run_stage(self, trainer: Trainer, iteration: int, role_name: str, *, start_step: int) -> None:
        {PROPOSER: self._proposer_stage, CODER: self._coder_stage, SOLVER: self._solver_stage}[role_name](
            trainer, iteration, start_step)

    def steps(self) -> int:
        return self.cfg.train.max_steps_per_role or PAPER_STEPS

    # ----------------------------------------------------------------------------------- requests

    def topics(self, iteration: int, step: int, count: int) -> list[str]:
        """Topics of a step's prompts: positions [step*count, (step+1)*count) of seeded per-epoch permutations."""
        return epoch_picks(self.mz.topics, step, count, key=(self.seed, iteration, 17))

    def _proposer_request(self, topic: str, *, n: int, temperature: float, seed: int, meta: dict) -> Request:
        pc = self.cfg.proposer
        return Request.from_image_text(None, proposer_text(topic), SamplingParams(
            n=n, temperature=temperature, top_p=pc.top_p, top_k=pc.top_k, max_new_tokens=pc.max_response_tokens,
            repetition_penalty=pc.repetition_penalty, seed=seed), meta=meta)

    def _coder_request(self, p: Proposal, *, n: int, seed: int, meta: dict | None = None) -> Request:
        """A Coder prompt for proposal `p`, which the request carries (meta["proposal"]) to its reward."""
        cc = self.cfg.coder
        return Request.from_image_text(None, coder_text(p, self.language), SamplingParams(
            n=n, temperature=cc.temperature, top_p=cc.top_p, top_k=cc.top_k, max_new_tokens=cc.max_response_tokens,
            repetition_penalty=cc.repetition_penalty, seed=seed), meta={"proposal": p, **(meta or {})})

    def _solver_params(self, n: int, seed: int) -> SamplingParams:
        return SamplingParams(n=n, temperature=self.mz.vote_temperature, top_k=self.mz.vote_top_k,
                              max_new_tokens=self.mz.vote_max_tokens, seed=seed)

    # ------------------------------------------------------------------ programs -> images -> answers

    def code_and_render(self, requests: list[Request], engine) -> tuple[list[RolloutOutput], list[list[Future]]]:
        """Coder outputs of `requests` and a render future per sample; each chunk's renders run while the next
        chunk is generated."""
        chunk = max(1, self.cfg.coder.prompts_per_step)
        outs: list[RolloutOutput] = []
        futures: list[list[Future]] = []
        for lo in range(0, len(requests), chunk):
            part = engine.generate(requests[lo:lo + chunk])
            outs += part
            futures += [[self.pool.submit(extract_program(s.text, self.language)[0]) for s in o.samples]
                        for o in part]
        return outs, futures

    def programs(self, outputs: Sequence[RolloutOutput], futures: Sequence[Sequence[Future]] | None = None,
                 stats: dict[str, float] | None = None) -> list[list[Program]]:
        """[request][sample] Programs with their render results (waited for here; `futures` from
        code_and_render, else submitted now) and, when rendered, the image the Solver sees."""
        d = self.cfg.data
        if futures is None:
            futures = [[self.pool.submit(extract_program(s.text, self.language)[0]) for s in o.samples]
                       for o in outputs]
        start = time.perf_counter()
        out = []
        for o, fs in zip(outputs, futures, strict=True):
            row = []
            for s, f in zip(o.samples, fs, strict=True):
                prog = Program(*extract_program(s.text, self.language), render=f.result())
                if prog.rendered:
                    prog.image = image_from_png(prog.render.png, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                                                factor=self.factor)
                row.append(prog)
            out.append(row)
        if stats is not None:
            stats["time_render"] = stats.get("time_render", 0.0) + time.perf_counter() - start
        return out

    def answer(self, programs: list[Program], proposals: list[Proposal], *, n: int, seed: int) -> None:
        """The current Solver answers the easy and the hard question of every rendered program n times, all in one
        generate call (a step's images together: one batch for the engine); sets easy, hard, s, c. Program k's
        draws are seeded by (seed, k)."""
        todo = [(k, p, q) for k, (p, q) in enumerate(zip(programs, proposals, strict=True)) if p.rendered]
        if not todo:
            return
        requests = []
        for k, p, q in todo:
            for kind, question in (("easy", q.easy_question), ("hard", q.hard_question)):
                requests.append(Request.from_image_text(p.image, solver_text(question),
                                                        self._solver_params(n, step_seed(seed, k, kind))))
        outs = self.solver.engine.generate(requests)
        for j, (_, p, q) in enumerate(todo):
            p.easy = [solver_answer(s.text) for s in outs[2 * j].samples]
            p.hard = [solver_answer(s.text) for s in outs[2 * j + 1].samples]
            p.s, p.c = render_stats(p.easy, q.easy_answer, p.hard)

    def save_png(self, prog: Program, rel: str) -> None:
        if prog.rendered:
            path = self.trainer.run_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(prog.render.png)
            prog.png = rel

    # ------------------------------------------------------------------------------- proposer stage

    def _proposer_stage(self, trainer: Trainer, iteration: int, start_step: int) -> None:
        pc, steps = self.cfg.proposer, self.steps()
        self._drop_rows(iteration, lambda r: r["phase"] == PROPOSER and r["step"] >= start_step)
        trainer.stage_total(steps)
        for step in range(start_step, steps):
            requests = [self._proposer_request(t, n=pc.rollout_n, temperature=pc.temperature,
                                               seed=step_seed(self.seed, PROPOSER, iteration, step, k),
                                               meta={"topic": t})
                        for k, t in enumerate(self.topics(iteration, step, pc.prompts_per_step))]
            extra: dict[str, Any] = {}

            def reward_fn(outputs, _step=step, _extra=extra):
                return self.proposer_rewards(outputs, iteration=iteration, step=_step, stats=_extra)

            metrics = self.proposer.grpo_step(requests, reward_fn, timer=trainer.timer)
            trainer.step_done(self.proposer, {**metrics, **extra})

    def proposer_rewards(self, outputs: list[RolloutOutput], *, iteration: int, step: int,
                         stats: dict[str, Any]) -> torch.Tensor:
        """[G, n]: the frozen Coder draws N programs per valid proposal, the current Solver answers each rendered
        image's questions n times, then the per-proposal reward and the batch terms (mmzero_rules)."""
        G, n, N = len(outputs), len(outputs[0].samples), self.mz.coder_samples
        texts = [s.text for o in outputs for s in o.samples]
        parsed = [parse_proposal(t) for t in texts]
        valid = [i for i, p in enumerate(parsed) if p is not None]
        requests = [self._coder_request(parsed[i], n=N, seed=step_seed(self.seed, "proposer-code", iteration, step, i))
                    for i in valid]
        outs, futures = self.code_and_render(requests, self.coder.engine)
        progs = self.programs(outs, futures, stats)
        self.answer([p for row in progs for p in row], [parsed[i] for i, row in zip(valid, progs) for _ in row],
                    n=self.mz.solver_votes, seed=step_seed(self.seed, "proposer-solve", iteration, step))
        renders: list[list[tuple[float, float] | None]] = [[] for _ in parsed]
        for i, row in zip(valid, progs, strict=True):
            renders[i] = [p.stats for p in row]
            for j, p in enumerate(row):
                if self.mz.save_images:
                    self.save_png(p, f"images/iter{iteration}/proposer/step{step}/p{i}-{j}.png")
        rewards = proposer_batch_rewards(parsed, renders, terms=stats)
        stats.update(self._proposal_stats(parsed, [p for row in progs for p in row]))
        rows = []
        prog_of = dict(zip(valid, progs, strict=True))
        for i, (text, p) in enumerate(zip(texts, parsed, strict=True)):
            rows.append({"phase": PROPOSER, "step": step, "topic": outputs[i // n].request.meta["topic"],
                         "group": i // n, "sample": i % n, "raw": text,
                         "proposal": asdict(p) if p is not None else None,
                         "programs": [q.row() for q in prog_of.get(i, [])], "reward": rewards[i]})
        self._append_rows(iteration, rows)
        return torch.tensor(rewards, dtype=torch.float32).view(G, n)

    def _proposal_stats(self, parsed: list[Proposal | None], progs: list[Program]) -> dict[str, float]:
        valid = [p for p in parsed if p is not None]
        rendered = [p for p in progs if p.rendered]
        out = {"proposal_parse_rate": len(valid) / max(len(parsed), 1),
               "renders": float(len(progs)), "render_success_rate": len(rendered) / max(len(progs), 1)}
        out.update(self._render_stats(rendered))
        for t in CONTENT_TYPES:
            out[f"content_share_{t}"] = sum(p.content_type == t for p in valid) / max(len(valid), 1)
        return out

    @staticmethod
    def _render_stats(rendered: list[Program]) -> dict[str, float]:
        if not rendered:
            return {}
        c = np.array([p.c for p in rendered])
        return {"solvability": float(np.mean([p.s for p in rendered])),
                "difficulty": float(np.mean(np.minimum(c, 1 - c))), "hard_consistency": float(c.mean())}

    # ---------------------------------------------------------------------------------- coder stage

    def proposals_path(self, iteration: int) -> Path:
        return self.trainer.run_dir / f"proposals-iter{iteration}.jsonl"

    def make_pool(self, iteration: int) -> list[dict[str, Any]]:
        """The updated Proposer writes pool_size proposals (topics in turn); the not-yet-updated Coder draws
        coder_samples programs for each valid one; a proposal becomes a Coder prompt when its render success is
        in the band. Rows in proposal order (`phase: pool`)."""
        mz, pc = self.mz, self.cfg.proposer
        topics = [mz.topics[k % len(mz.topics)] for k in range(mz.pool_size)]
        chunk = pc.prompts_per_step * pc.rollout_n  # as many sequences as one Proposer rollout
        rows: list[dict[str, Any]] = []
        for lo in range(0, mz.pool_size, chunk):
            ks = range(lo, min(lo + chunk, mz.pool_size))
            outs = self.proposer.engine.generate([self._proposer_request(
                topics[k], n=1, temperature=mz.proposal_temperature, seed=step_seed(self.seed, "pool", iteration, k),
                meta={}) for k in ks])
            texts = [o.samples[0].text for o in outs]
            parsed = [parse_proposal(t) for t in texts]
            valid = [j for j, p in enumerate(parsed) if p is not None]
            code_outs, futures = self.code_and_render([self._coder_request(
                parsed[j], n=mz.coder_samples, seed=step_seed(self.seed, "pool-code", iteration, ks[j]))
                for j in valid], self.coder.engine)
            progs = dict(zip(valid, self.programs(code_outs, futures), strict=True))
            for j, (k, text, p) in enumerate(zip(ks, texts, parsed, strict=True)):
                ok = [q.rendered for q in progs.get(j, [])]
                rate = sum(ok) / len(ok) if ok else 0.0
                rows.append({"phase": "pool", "index": k, "topic": topics[k], "raw": text,
                             "proposal": asdict(p) if p is not None else None,
                             "filter_renders": [q.render.error or "ok" for q in progs.get(j, [])],
                             "render_success": rate, "coder_prompt": p is not None and keep_coder_prompt(rate)})
        return rows

    def coder_steps(self, kept: int) -> int:
        return self.steps() if kept else 0

    def _coder_stage(self, trainer: Trainer, iteration: int, start_step: int) -> None:
        cc = self.cfg.coder
        if start_step == 0:
            self._drop_rows(iteration, lambda r: r["phase"] in ("pool", CODER))
            with trainer.timer("pool"):
                pool = self.make_pool(iteration)
            self._append_rows(iteration, pool)
        else:  # resumed mid-stage: the Coder has trained since, its filter could not be redrawn
            self._drop_rows(iteration, lambda r: r["phase"] == CODER and r["step"] >= start_step)
            pool = [r for r in self._read_rows(self.proposals_path(iteration)) if r["phase"] == "pool"]
        kept = [r for r in pool if r["coder_prompt"]]
        valid = [r for r in pool if r["proposal"] is not None]
        stage_stats = {"pool": float(len(pool)), "pool_parse_rate": len(valid) / max(len(pool), 1),
                       "coder_prompts": float(len(kept)),
                       "pool_render_success": float(np.mean([r["render_success"] for r in valid])) if valid else 0.0}
        log.info("iteration %d: %d proposals, %d valid, %d Coder prompts (render success in [%.2f, %.2f])",
                 iteration, len(pool), len(valid), len(kept), *BAND)
        steps = self.coder_steps(len(kept))
        trainer.stage_total(steps)
        if steps == 0:
            log.warning("iteration %d: no proposal in the render-success band; the Coder does not train", iteration)
        for step in range(start_step, steps):
            batch = self._batch(kept, cc.prompts_per_step, iteration, step, salt=19)
            requests = [self._coder_request(Proposal(**r["proposal"]), n=cc.rollout_n,
                                            seed=step_seed(self.seed, CODER, iteration, step, k),
                                            meta={"index": r["index"]}) for k, r in enumerate(batch)]
            extra: dict[str, Any] = {}

            def reward_fn(outputs, _step=step, _extra=extra):
                return self.coder_rewards(outputs, iteration=iteration, step=_step, stats=_extra)

            metrics = self.coder.grpo_step(requests, reward_fn, timer=trainer.timer)
            trainer.step_done(self.coder, {**metrics, **stage_stats, **extra})

    def coder_rewards(self, outputs: list[RolloutOutput], *, iteration: int, step: int,
                      stats: dict[str, Any]) -> torch.Tensor:
        """[G, n]: each program rendered; each rendered image's questions answered n times by the current Solver;
        coder_reward(rendered, s, c, empty, not_svg)."""
        G, n = len(outputs), len(outputs[0].samples)
        progs = self.programs(outputs, stats=stats)
        props = [o.request.meta["proposal"] for o in outputs]
        self.answer([p for row in progs for p in row], [q for q, row in zip(props, progs) for _ in row],
                    n=self.mz.solver_votes, seed=step_seed(self.seed, "coder-solve", iteration, step))
        rewards, rows = [], []
        for g, (o, row, q) in enumerate(zip(outputs, progs, props, strict=True)):
            for j, p in enumerate(row):
                if self.mz.save_images:
                    self.save_png(p, f"images/iter{iteration}/coder/step{step}/p{g}-{j}.png")
                r = coder_reward(p.rendered, p.s or 0.0, p.c or 0.0, empty=p.empty, not_svg=p.not_svg)
                rewards.append(r)
                rows.append({"phase": CODER, "step": step, "index": o.request.meta["index"], "group": g, "sample": j,
                             "proposal": asdict(q), **p.row(), "raw": o.samples[j].text, "reward": r})
        flat = [p for row in progs for p in row]
        stats.update(render_success_rate=sum(p.rendered for p in flat) / max(len(flat), 1),
                     renders=float(len(flat)), empty_rate=sum(p.empty for p in flat) / max(len(flat), 1),
                     not_svg_rate=sum(p.not_svg for p in flat) / max(len(flat), 1),
                     **self._render_stats([p for p in flat if p.rendered]))
        self._append_rows(iteration, rows)
        return torch.tensor(rewards, dtype=torch.float32).view(G, n)

    # --------------------------------------------------------------------------------- solver stage

    def items_path(self, iteration: int) -> Path:
        return self.trainer.run_dir / f"solver-iter{iteration}.jsonl"

    def make_items(self, iteration: int) -> list[dict[str, Any]]:
        """The updated Coder draws one image per valid pool proposal; the not-yet-updated Solver answers each
        image's hard and easy question label_votes times; label = the hard answers' largest cluster's first
        member; kept by the filters of mmzero_rules. Images are saved (images/iter<k>/solver/<index>.png)."""
        mz = self.mz
        pool = [r for r in self._read_rows(self.proposals_path(iteration))
                if r["phase"] == "pool" and r["proposal"] is not None]
        chunk = self.cfg.coder.prompts_per_step * self.cfg.coder.rollout_n
        rows = []
        for lo in range(0, len(pool), chunk):
            part = pool[lo:lo + chunk]
            props = [Proposal(**r["proposal"]) for r in part]
            outs, futures = self.code_and_render([self._coder_request(
                p, n=1, seed=step_seed(self.seed, "items-code", iteration, r["index"]))
                for p, r in zip(props, part, strict=True)], self.coder.engine)
            progs = [row[0] for row in self.programs(outs, futures)]
            for p, r in zip(progs, part, strict=True):
                self.save_png(p, f"images/iter{iteration}/solver/{r['index']}.png")
            todo = [k for k, p in enumerate(progs) if p.rendered]
            answers = self.solver.engine.generate([Request.from_image_text(
                progs[k].image, solver_text(question),
                self._solver_params(mz.label_votes, step_seed(self.seed, "items-label", iteration,
                                                              part[k]["index"], kind)))
                for k in todo for kind, question in (("hard", props[k].hard_question),
                                                      ("easy", props[k].easy_question))]) if todo else []
            votes = {k: ([solver_answer(s.text) for s in answers[2 * j].samples],
                         [solver_answer(s.text) for s in answers[2 * j + 1].samples]) for j, k in enumerate(todo)}
            for k, (p, r, q) in enumerate(zip(progs, part, props, strict=True)):
                hard, easy = votes.get(k, (None, None))
                label, hard_c = solver_label(hard) if hard else (None, 0.0)
                easy_c = solver_label(easy)[1] if easy else 0.0
                rows.append({"index": r["index"], "image": p.png, "rendered": p.rendered,
                             "render_error": p.render.error if p.render else "no code", "code": p.code,
                             "question": q.hard_question, "easy_question": q.easy_question, "proposal": asdict(q),
                             "hard_answers": hard, "easy_answers": easy, "label": label,
                             "hard_consistency": hard_c, "easy_consistency": easy_c,
                             "kept": p.rendered and keep_solver_item(label, easy_c, hard_c)})
        return rows

    def _solver_stage(self, trainer: Trainer, iteration: int, start_step: int) -> None:
        sc, path = self.cfg.solver, self.items_path(iteration)
        if start_step == 0:
            with trainer.timer("items"):
                rows = self.make_items(iteration)
            self._write_rows(path, rows)
        elif path.exists():  # resumed mid-stage: the Solver has trained since, its votes can't be redrawn
            rows = self._read_rows(path)
        else:
            raise FileNotFoundError(f"resuming the solver stage of iteration {iteration} at step {start_step} "
                                    f"needs {path}, written at the stage's start")
        kept = [r for r in rows if r["kept"]]
        rendered = [r for r in rows if r["rendered"]]
        stage_stats = {"items": float(len(rows)), "items_rendered_rate": len(rendered) / max(len(rows), 1),
                       "items_kept": float(len(kept)),
                       "label_consistency_mean": float(np.mean([r["hard_consistency"] for r in rendered]))
                       if rendered else 0.0}
        log.info("iteration %d: %d Solver items, %d rendered, %d kept -> %s", iteration, len(rows), len(rendered),
                 len(kept), path)
        steps = self.steps() if kept else 0
        trainer.stage_total(steps)
        if steps == 0:
            log.warning("iteration %d: no Solver item passed the filters; the Solver does not train", iteration)
        d = self.cfg.data
        for step in range(start_step, steps):
            batch = self._batch(kept, sc.prompts_per_step, iteration, step, salt=23)
            requests = [Request.from_image_text(
                image_from_png((trainer.run_dir / r["image"]).read_bytes(), min_pixels=d.min_pixels,
                               max_pixels=d.max_pixels, factor=self.factor),  # as the Solver saw it when labelling
                solver_text(r["question"]),
                SamplingParams(n=sc.rollout_n, temperature=sc.temperature, top_p=sc.top_p, top_k=sc.top_k,
                               max_new_tokens=sc.max_response_tokens, repetition_penalty=sc.repetition_penalty,
                               seed=step_seed(self.seed, SOLVER, iteration, step, k)),
                meta={"label": r["label"], "index": r["index"]}) for k, r in enumerate(batch)]
            extra: dict[str, Any] = {}
            metrics = self.solver.grpo_step(requests, lambda outs, _e=extra: self.solver_rewards(outs, _e),
                                            timer=trainer.timer)
            trainer.step_done(self.solver, {**metrics, **stage_stats, **extra})

    @staticmethod
    def solver_rewards(outputs: list[RolloutOutput], stats: dict[str, Any] | None = None) -> torch.Tensor:
        """[G, n]: 0.9 * grade_answer(answer, label) + 0.1 * format."""
        G, n = len(outputs), len(outputs[0].samples)
        formed = [solver_well_formed(s.text) for o in outputs for s in o.samples]
        answers = [solver_answer(s.text) for o in outputs for s in o.samples]
        labels = [o.request.meta["label"] for o in outputs for _ in o.samples]
        r = [solver_reward(a, lab, well_formed=f) for a, lab, f in zip(answers, labels, formed, strict=True)]
        if stats is not None:
            stats["solver_format_rate"] = sum(formed) / max(len(formed), 1)
            stats["solver_boxed_rate"] = sum(a != "None" for a in answers) / max(len(answers), 1)
        return torch.tensor(r, dtype=torch.float32).view(G, n)

    # ------------------------------------------------------------------------------- rows and batches

    def _batch(self, rows: list[dict[str, Any]], count: int, iteration: int, step: int, *, salt: int) -> list[dict]:
        """Rows of step `step`: positions [step*b, (step+1)*b) of seeded per-epoch permutations, b = min(count, n)."""
        return epoch_picks(rows, step, min(count, len(rows)), key=(self.seed, iteration, salt))

    @staticmethod
    def _read_rows(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    @staticmethod
    def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)

    def _append_rows(self, iteration: int, rows: list[dict[str, Any]]) -> None:
        with open(self.proposals_path(iteration), "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))

    def _drop_rows(self, iteration: int, drop) -> None:
        path = self.proposals_path(iteration)
        rows = self._read_rows(path)
        if any(drop(r) for r in rows):
            self._write_rows(path, [r for r in rows if not drop(r)])
