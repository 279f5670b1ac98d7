"""MM-Zero's format warm-up (tiny preset only): a random tiny model cannot write the Proposer's tags, the Coder's
fenced SVG or the Solver's `<think>..</think> \\boxed{}`, so every reward would be the parse failure's. Before
iteration 1 one copy of the base model gets a short supervised pass (vzero_fast/warmup.py) on templated outputs of
the three roles: format only, the answers are random digits, never a label.

Decisions:
- Of every 8 examples: 3 proposals (text only, the longest format), 1 program (text only), 4 Solver answers (on a
  synthetic figure from vzero_fast/data.py, resized like the Solver's images).
- Short, low-entropy templates (measured on the tiny model, docs/LOG.md 2026-12-01): one caption and two questions
  per content type; random captions and numbers left 0% of T=1 proposals parsable after 150 steps.
- After the pass, parse rates of T=1 samples (Proposer, Coder) go to format_warmup.json.

Test: tests/test_mmzero.py (templates parse back; the tiny run end to end).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from vzero_fast.config import Config, to_dict
from vzero_fast.data import resize_to_bounds, synthetic_figure
from vzero_fast.recipes.mmzero import coder_text, extract_program, proposer_text, solver_text
from vzero_fast.recipes.mmzero_rules import Proposal, parse_proposal
from vzero_fast.rollout import Request, SamplingParams, make_engine
from vzero_fast.trainer import step_seed
from vzero_fast.warmup import Example, supervised_pass


def warmup_made_with(cfg: Config) -> dict[str, Any]:
    """What decides the warm-up's weights (a warm-up found on disk is reused only when this matches)."""
    return {"model": cfg.model.path or f"tiny (seed {cfg.model.tiny_seed})", "dtype": cfg.model.dtype,
            "seed": cfg.train.seed, "code_language": cfg.mmzero.code_language, "topics": list(cfg.mmzero.topics),
            "data": to_dict(cfg.data),
            **{k: v for k, v in to_dict(cfg.mmzero).items() if k.startswith("format_warmup")},
            "budget": _budget(cfg)}


def _budget(cfg: Config) -> int:
    return max(cfg.proposer.micro_batch_tokens, cfg.coder.micro_batch_tokens, cfg.solver.micro_batch_tokens)


def warmup_pass(policy, cfg: Config, factor: int) -> dict[str, Any]:
    """Supervised format pass on templated outputs of the three roles; trains `policy` in place and returns the
    report (losses, parse rates after, seconds). Deterministic for a seed."""
    mz, d, language = cfg.mmzero, cfg.data, cfg.mmzero.code_language
    start = time.perf_counter()
    size = max(56, int(d.synthetic_size))

    def examples(rng: np.random.Generator) -> list[Example]:
        out = []
        for k in range(mz.format_warmup_batch):
            p = template_proposal(rng)
            if k % 8 < 3:
                out.append((None, proposer_text(str(mz.topics[int(rng.integers(len(mz.topics)))])),
                            proposal_target(p)))
            elif k % 8 == 3:
                out.append((None, coder_text(p, language), program_target(rng, language)))
            else:
                image = resize_to_bounds(synthetic_figure(int(rng.integers(2**31)), size), d.min_pixels,
                                         d.max_pixels, factor=factor)
                out.append((image, solver_text(p.hard_question), solver_target(rng)))
        return out

    losses = supervised_pass(policy, examples, steps=mz.format_warmup_steps, lr=mz.format_warmup_lr,
                             budget=_budget(cfg), seed=cfg.train.seed)
    report = {"steps": mz.format_warmup_steps, "loss_first": losses[0] if losses else None,
              "loss_last": losses[-1] if losses else None, "train_seconds": time.perf_counter() - start}
    report.update(parse_rates(policy, cfg))
    return report


def parse_rates(policy, cfg: Config, *, prompts: int = 4, n: int = 4) -> dict[str, float]:
    """Share of samples in the Proposer's and the Coder's formats, at their own temperatures (native engine)."""
    seed, mz, pc, cc = cfg.train.seed, cfg.mmzero, cfg.proposer, cfg.coder
    engine = make_engine(policy, "native", seed=seed)
    rng = np.random.default_rng([seed, 29])
    props = engine.generate([Request.from_image_text(None, proposer_text(mz.topics[k % len(mz.topics)]), SamplingParams(
        n=n, temperature=pc.temperature, max_new_tokens=pc.max_response_tokens, seed=step_seed(seed, "probe-p", k)))
        for k in range(prompts)])
    codes = engine.generate([Request.from_image_text(None, coder_text(template_proposal(rng), mz.code_language),
                                                     SamplingParams(n=n, temperature=cc.temperature, top_p=cc.top_p,
                                                                    max_new_tokens=cc.max_response_tokens,
                                                                    seed=step_seed(seed, "probe-c", k)))
                             for k in range(prompts)])
    p_ok = [parse_proposal(s.text) is not None for o in props for s in o.samples]
    c_ok = [not extract_program(s.text, mz.code_language)[1] for o in codes for s in o.samples]
    return {"proposer_parse_rate": sum(p_ok) / len(p_ok), "coder_parse_rate": sum(c_ok) / len(c_ok),
            "probe_samples": len(p_ok)}


# --------------------------------------------------------------------------------------------- templates

# (content type, caption, easy question, hard question): short and low in entropy on purpose (module docstring).
_TEMPLATES = (
    ("data_chart", "A bar chart.", "How many bars?", "Which bar is tallest?"),
    ("table", "A table.", "How many rows?", "What is the total?"),
    ("geometry", "A square.", "What is the side?", "What is the area?"),
    ("timeline", "A timeline.", "What is the start?", "How long is it?"),
)
_COLOURS = ("red", "blue", "green", "black")


def template_proposal(rng: np.random.Generator) -> Proposal:
    kind, caption, easy, hard = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return Proposal(content_type=kind, caption=caption, easy_question=easy, easy_answer=str(int(rng.integers(1, 5))),
                    hard_question=hard, hard_answer=str(int(rng.integers(1, 5))))


def proposal_target(p: Proposal) -> str:
    return (f"<content_type>{p.content_type}</content_type><caption>{p.caption}</caption>"
            f"<easy_question>{p.easy_question}</easy_question><easy_answer>{p.easy_answer}</easy_answer>"
            f"<hard_question>{p.hard_question}</hard_question><hard_answer>{p.hard_answer}</hard_answer>")


def program_target(rng: np.random.Generator, language: str) -> str:
    x, h = (int(v) for v in rng.integers(8, 40, size=2))
    colour = _COLOURS[int(rng.integers(len(_COLOURS)))]
    if language == "svg":
        return (f'```svg\n<svg width="64" height="48"><rect x="{x}" y="4" width="9" height="{h}" '
                f'fill="{colour}"/></svg>\n```')
    return f"```python\nimport matplotlib.pyplot as plt\nplt.bar([1, 2], [{x}, {h}], color='{colour}')\n```"


def solver_target(rng: np.random.Generator) -> str:
    return f"<think>Count them.</think> \\boxed{{{int(rng.integers(1, 5))}}}"
