"""Answer extraction and the Questioner's output parser: the format contracts of ALGORITHMS.md section 1.

    extract_boxed(text)   -> content of the last \\boxed{...} (nested braces kept, \\text{..} unwrapped) | None
    extract_choice(text)  -> "A".."D" from that content, normalised | None
    parse_question(text)  -> Question(description, question, options A-D, answer letter) | None
    answers_equal(given, truth) -> the project's answer equivalence (letters, numbers, short answers)

Decisions:
- "The last \\boxed{}" is the last occurrence of the string `\\boxed` followed by `{` (spaces allowed in
  between), as math graders do (`last_boxed_only_string`): in `\\boxed{\\boxed{A}}` that is the inner one. If
  that last one never closes, the answer is None: an earlier, closed box is not used, because a truncated
  final answer is not the answer the response meant to give.
- `\\text{..}` (and its look-alikes \\textbf, \\mathrm, \\mathbf, \\textit) is unwrapped wherever it occurs
  inside the box, so `\\boxed{\\text{(B)}}` gives "(B)" and then "B".
- A choice is normalised from the boxed content by stripping, in this order, spaces, one trailing ".",
  then either one pair of surrounding parentheses/brackets or one trailing ")" (so "(b).", "B)", "[c]"
  all count), then upper-casing. Anything that is not then
  exactly one of A, B, C, D is None (e.g. "42", "AB", "Option A", "E").
- The Questioner output is valid only when `<description>`, `<question>` and `<answer>` each parse as a
  closed tag pair (the first pair of each), the four labels `A)`, `B)`, `C)`, `D)` occur inside the
  question (a label counts when no letter or digit precedes it, so "BA)" is no label), and the answer is
  a letter after the same normalisation as `extract_choice`. The option texts are the spans between
  consecutive labels in the order they appear; the question stem is the text before the first label.
  Nothing beyond ALGORITHMS.md's rule is demanded (empty option texts are valid).
- Answer equivalence (`answers_equal`, the verifiable reward of `--recipe grpo`): a truth that is a letter
  A-D is a multiple-choice label and matches `normalize_choice` of the (\\text-unwrapped) answer. Otherwise
  both sides are normalised (`normalize_answer`: \\text{} unwrapped, `$`, `%`, commas and all whitespace
  dropped, one trailing "." dropped, lower-cased) and compared as numbers when both parse as finite floats
  (|a - b| <= 1e-6 * max(1, |b|), so "3.0" == "3" and "1,000" == "1000"), else as strings ("3:15" == "3:15 ",
  "Red" == "red"). Fractions are strings (2/4 != 1/2), as in MM-Zero's grader; no sympy.

Test: `pytest tests/test_answers.py tests/test_grpo_recipe.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LETTERS = ("A", "B", "C", "D")

_BOXED = re.compile(r"\\boxed\s*\{")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf)\s*\{")


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` matching the `{` just before `start`, or -1 when it never closes."""
    depth = 1
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _unwrap_text(s: str) -> str:
    """Replace every \\text{X} (and look-alikes) by X, innermost structure kept."""
    while (m := _TEXT_CMD.search(s)) is not None:
        end = _closing_brace(s, m.end())
        if end < 0:  # unclosed: drop the command name, keep what follows
            s = s[: m.start()] + s[m.end():]
        else:
            s = s[: m.start()] + s[m.end():end] + s[end + 1:]
    return s


def extract_boxed(text: str | None, *, unwrap_text: bool = True) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed, `\\text{..}` unwrapped unless
    unwrap_text=False, stripped); None when there is no `\\boxed{` or the last one is not closed."""
    if not text:
        return None
    last = None
    for last in _BOXED.finditer(text):  # noqa: B007 - we want the final match
        pass
    if last is None:
        return None
    end = _closing_brace(text, last.end())
    if end < 0:
        return None
    content = text[last.end():end]
    return (_unwrap_text(content) if unwrap_text else content).strip()


def normalize_choice(s: str | None) -> str | None:
    """"(b)", " c. ", "D)", "[a]" -> the upper-case letter; anything that is not one of A-D -> None."""
    if s is None:
        return None
    s = s.strip()
    if s.endswith("."):
        s = s[:-1].strip()
    if len(s) >= 2 and (s[0], s[-1]) in (("(", ")"), ("[", "]")):
        s = s[1:-1].strip()
    elif s.endswith(")"):
        s = s[:-1].strip()
    s = s.upper()
    return s if s in LETTERS else None


def extract_choice(text: str | None) -> str | None:
    """The Solver's answer: the last `\\boxed{}` content normalised to "A".."D", else None."""
    return normalize_choice(extract_boxed(text))


_DROP = re.compile(r"[\s$%,]")


def normalize_answer(s: str) -> str:
    """`\\text{..}` unwrapped, `$ % ,` and whitespace dropped, one trailing "." dropped, lower-cased."""
    s = _DROP.sub("", _unwrap_text(s))
    return (s[:-1] if s.endswith(".") else s).lower()


def _number(s: str) -> float | None:
    try:
        x = float(s)
    except ValueError:
        return None
    return x if x == x and abs(x) != float("inf") else None


def answers_equal(given: str | None, truth: str) -> bool:
    """Whether an extracted answer matches the truth: a letter truth (A-D) by `normalize_choice`, numbers by
    value, anything else as normalised strings (module docstring). No answer (None) matches nothing."""
    if given is None:
        return False
    if truth.strip() in LETTERS:
        return normalize_choice(_unwrap_text(given)) == truth.strip()
    g, t = normalize_answer(given), normalize_answer(truth)
    gx, tx = _number(g), _number(t)
    if gx is not None and tx is not None:
        return abs(gx - tx) <= 1e-6 * max(1.0, abs(tx))
    return g == t and g != ""


# ------------------------------------------------------------------------------------------ Questioner

@dataclass(frozen=True)
class Question:
    """One valid Questioner output."""

    description: str
    """What the Questioner says the image shows (<description>)."""
    question: str
    """The question stem: the <question> text before the first option label."""
    options: dict[str, str]
    """{"A": text, "B": text, "C": text, "D": text}."""
    answer: str
    """The intuitive answer a_fast, "A".."D" (<answer>)."""

    def solver_text(self) -> str:
        """The question as the Solver sees it: the stem, then one option per line."""
        lines = [self.question] + [f"{k}) {self.options[k]}" for k in LETTERS]
        return "\n".join(line for line in lines if line)


def _tag(text: str, name: str) -> str | None:
    m = re.search(rf"<{name}>(.*?)</{name}>", text, flags=re.DOTALL)
    return m.group(1).strip() if m else None


def _option_labels(question: str) -> dict[str, re.Match] | None:
    found = {}
    for k in LETTERS:
        m = re.search(rf"(?<![A-Za-z0-9]){k}\)", question)
        if m is None:
            return None
        found[k] = m
    return found


def parse_question(text: str | None) -> Question | None:
    """The Questioner's `<description>..</description> <question>.. A) .. B) .. C) .. D) ..</question>
    <answer>X</answer>` as a Question, or None when any part of the contract is missing."""
    if not text:
        return None
    description, body, answer = _tag(text, "description"), _tag(text, "question"), _tag(text, "answer")
    if description is None or body is None or answer is None:
        return None
    letter = normalize_choice(answer)
    labels = _option_labels(body)
    if letter is None or labels is None:
        return None
    order = sorted(labels.items(), key=lambda kv: kv[1].start())
    options = {}
    for (k, m), nxt in zip(order, [*order[1:], None], strict=True):
        end = nxt[1].start() if nxt is not None else len(body)
        options[k] = body[m.end():end].strip()
    stem = body[: order[0][1].start()].strip()
    return Question(description=description, question=stem, options=options, answer=letter)


__all__ = ["LETTERS", "Question", "answers_equal", "extract_boxed", "extract_choice", "normalize_answer",
           "normalize_choice", "parse_question"]
