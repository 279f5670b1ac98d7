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

MM-Zero's answers (ALGORITHMS.md section 2; the functions below the MM-Zero rule):

    squeeze_tag_spaces(text) -> whitespace around `<`, `>` and `/` deleted (before parsing any Proposer output or
                                Solver response, so `\\boxed{1 / 2}` reads `1/2`)
    boxed_answer(text)       -> content of the LAST `\\boxed{` with balanced braces, stripped; "None" without one
    grade_answer(given, truth) -> the PRM800K-style grader of `mathruler.grader.grade_answer`, guarded

- `boxed_answer` is not `extract_boxed`: the reference (mathruler's extract_boxed_content) finds the last literal
  `\\boxed{` (no space allowed before the brace, so in `\\boxed{A} \\boxed {B}` it reads "A"), does not unwrap
  `\\text{}` (the grader does that, only for a whole-answer `\\text{..}`), and answers the string "None" rather
  than None; `\\boxed{}` gives "". A last box that never closes gives "None" too (no fall-back to an earlier one).
- `grade_answer` keeps the reference's semantics (mathruler 0.1.0, PRM800K): equal after the MATH-style
  normalisation, or after `_normalize` (whole `\\text{}` unwrapped, `$ %` dropped, unit words such as cm, degree,
  day, ... dropped, properly formatted thousands commas and spaces dropped, LaTeX to text, lower-case,
  integer-valued numbers to ints), or element by element (tuples/intervals split, same brackets required) where
  two fractions a/b compare as strings (2/4 != 1/2), an integer never equals a non-integer (truth 2 vs 2.5, or
  2 vs 4/2), and anything else is equal when sympy simplifies `(truth)-(given)` to 0. The normalisers are
  mathruler's own functions (the reference's code, so no drift; mathruler is pinned below 0.2 because three of
  them are private: _normalize, _is_frac, _str_is_int); the control flow is re-written here so that the sympy
  step can be guarded.
- The guard (sympy on model-written strings can hang, e.g. `9**9**9`, `99999999!`, `ff(10**8,10**8)`, or a
  91-character product of four ninth powers that takes 5 s to simplify): (1) answers longer than
  GRADE_MAX_CHARS (1000) are compared as stripped strings only; (2) a static check refuses to evaluate what the
  reference's own check (`should_allow_eval`: <= 2 distinct letters, no `^{`, `^(`, `^d^`, multi-digit
  exponents) lets through but can explode: `**` is read as `^` for that check, a signed exponent
  (`^-99999999`, `^-(..)`), a power of a parenthesised power, `!`, `_`, attribute access (`.n(...)`), any sympy
  or Python name other than sqrt/pi/oo (`ff`, `eye`, ...) and expressions over SYMPY_MAX_CHARS (256); refused
  means "not equal", as the reference's own check does; (3) the sympy call itself runs in a persistent child
  process (`python -c`, started on first use, address space capped at 2 GiB) with a SYMPY_TIMEOUT_S (5 s) wall
  limit: on timeout or crash the child is killed, the pair counts as not equal, and the next call starts a new
  child. The reference used a 10 s thread timeout (stopit), which cannot interrupt sympy's big-integer
  arithmetic. Results are cached per (truth element, given element) (an LRU of 65536), timeouts included, so a
  slow pair costs its time once. Canonical integers (both sides `-?[1-9][0-9]*` or 0, <= 100 digits) compare
  by value without sympy: the same answer sympy gives. An exception anywhere falls back to comparing the stripped,
  lower-cased strings (the reference's callers do the same).

Test: `pytest tests/test_answers.py tests/test_grpo_recipe.py tests/test_mmzero_rules.py`.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import select
import subprocess
import sys
import threading
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


# ------------------------------------------------------------------------------------------ MM-Zero

NO_BOX = "None"
"""MM-Zero's answer for a response without a (closed) `\\boxed{}`: the string "None", which votes like any answer."""
GRADE_MAX_CHARS = 1000
"""Longer answers (the Solver is asked for a number, a word or a short phrase) are compared as stripped strings."""
SYMPY_MAX_CHARS = 256
"""Longest `(truth)-(given)` expression handed to sympy."""
SYMPY_TIMEOUT_S = 5.0
"""Wall-clock limit of one sympy comparison in the child process."""
SYMPY_MEMORY_BYTES = 2 << 30
"""Address-space limit of the sympy child (RLIMIT_AS): a huge integer raises MemoryError there, not here."""

_SQUEEZE = re.compile(r"\s*(<|>|/)\s*")
_BOXED_LITERAL = "\\boxed{"


def squeeze_tag_spaces(text: str) -> str:
    """Whitespace around `<`, `>` and `/` deleted: `< /think >` -> `</think>`, `\\boxed{1 / 2}` -> `\\boxed{1/2}`."""
    return _SQUEEZE.sub(r"\1", text)


def boxed_answer(text: str | None) -> str:
    """MM-Zero's answer: the stripped content of the LAST literal `\\boxed{` with balanced braces, else "None"
    (also when that last box never closes). No `\\text{}` unwrapping (module docstring)."""
    if not text:
        return NO_BOX
    start = text.rfind(_BOXED_LITERAL)
    if start < 0:
        return NO_BOX
    begin = start + len(_BOXED_LITERAL)
    end = _closing_brace(text, begin)
    return text[begin:end].strip() if end >= 0 else NO_BOX


_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,99})")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIGNED_EXPONENT = re.compile(r"\^[-+](?:[0-9]{2,}|[({])")
_ATTRIBUTE = re.compile(r"\.\s*[A-Za-z_]")
_ALLOWED_NAMES = frozenset({"sqrt", "pi", "oo"})


@functools.lru_cache(maxsize=1)
def _grader():
    """mathruler's grader module and the names sympy's parser would resolve (imported on first use: sympy and
    pylatexenc cost ~0.5 s, which recipes that never grade MM-Zero answers do not pay)."""
    import builtins
    import keyword

    import sympy
    from mathruler import grader

    names = set(sympy.__all__) | set(dir(builtins)) | set(keyword.kwlist)
    return grader, frozenset(n for n in names if n not in _ALLOWED_NAMES)


def _power_of_power(expr: str) -> bool:
    """Whether some `^` has a parenthesised base that itself holds a `^`: `((9^9)^9)^9` grows as 9^(9^k)."""
    opened: list[int] = []
    for i, ch in enumerate(expr):
        if ch == "(":
            opened.append(i)
        elif ch == ")" and opened:
            start = opened.pop()
            if expr.startswith("^", i + 1) and "^" in expr[start:i]:
                return True
    return False


def sympy_allowed(expr: str) -> bool:
    """The static half of the guard: whether `expr` may be handed to sympy at all (module docstring)."""
    grader, names = _grader()
    caret = expr.replace("**", "^")
    if len(expr) > SYMPY_MAX_CHARS or not grader.should_allow_eval(caret):
        return False
    if "!" in expr or "_" in expr or _ATTRIBUTE.search(expr) or _SIGNED_EXPONENT.search(caret):
        return False
    if _power_of_power(caret):
        return False
    return not any(name in names for name in _NAME.findall(expr))


_WORKER = (
    "import json, resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))\n"
    "import sympy\n"
    "from sympy.parsing import sympy_parser\n"
    "T = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)\n"
    "print('ready', flush=True)\n"
    "for line in sys.stdin:\n"
    "    a, b = json.loads(line)\n"
    "    try:\n"
    "        ok = sympy.simplify(sympy_parser.parse_expr(f'({{a}})-({{b}})'.replace('^', '**'), transformations=T)) == 0\n"
    "    except BaseException:\n"
    "        ok = False\n"
    "    print('1' if ok else '0', flush=True)\n"
)


class SympyWorker:
    """One child Python process that answers "does sympy simplify (a)-(b) to 0" (the reference's
    `are_equal_under_sympy` after its check), one request at a time, under a wall-clock limit. On a timeout or a
    crash the child is killed and `equal` returns None; the next call starts a new child. Thread-safe; a forked
    copy of this object starts its own child."""

    def __init__(self, timeout_s: float = SYMPY_TIMEOUT_S, memory_bytes: int = SYMPY_MEMORY_BYTES):
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self._proc: subprocess.Popen | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self.restarts = 0
        """Children killed after a timeout or found dead (a metric for tests and logs)."""

    def _start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", _WORKER.format(mem=self.memory_bytes)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, bufsize=1)
        self._pid = os.getpid()
        if self._read(60.0) != "ready":  # importing sympy takes ~0.5 s; 60 s covers a loaded machine
            self.close()
            raise RuntimeError("the sympy worker did not start")

    def _read(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        return line.strip() if line else None

    def close(self) -> None:
        """Kill the child (if this process started it)."""
        if self._proc is not None and self._pid == os.getpid():
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def equal(self, a: str, b: str) -> bool | None:
        """sympy.simplify((a)-(b)) == 0, or None when it did not answer within timeout_s."""
        with self._lock:
            if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                if self._proc is not None and self._pid == os.getpid():
                    self.restarts += 1
                self._proc = None
                self._start()
            try:
                self._proc.stdin.write(json.dumps([a, b]) + "\n")
                self._proc.stdin.flush()
                line = self._read(self.timeout_s)
            except OSError:
                line = None
            if line is None:
                self.restarts += 1
                self.close()
                return None
            return line == "1"


_SYMPY = SympyWorker()
atexit.register(_SYMPY.close)


@functools.lru_cache(maxsize=1 << 16)
def _sympy_equal(truth: str, given: str) -> bool:
    """One element pair past the int/fraction checks: by value for canonical ints, else guarded sympy."""
    if _CANONICAL_INT.fullmatch(truth) and _CANONICAL_INT.fullmatch(given):
        return int(truth) == int(given)
    if not sympy_allowed(f"({truth})-({given})"):
        return False
    return bool(_SYMPY.equal(truth, given))


def _grade(given: str, truth: str) -> bool:
    grader, _ = _grader()
    from mathruler.math_normalize import normalize_answer as mathd_normalize

    if mathd_normalize(truth) == mathd_normalize(given):  # at least as lenient as MATH's checker
        return True
    truth_n, given_n = grader._normalize(truth), grader._normalize(given)
    if truth_n == given_n:
        return True
    if not given_n:
        return False
    truth_e, given_e = grader.split_tuple(truth_n), grader.split_tuple(given_n)
    if len(truth_e) > 1 and (truth_n[0] != given_n[0] or truth_n[-1] != given_n[-1]):
        return False  # a tuple/interval needs the same brackets
    if len(truth_e) != len(given_e):
        return False
    for t, g in zip(truth_e, given_e):
        if grader._is_frac(t) and grader._is_frac(g):
            ok = t == g  # unreduced fractions are not simplified: 2/4 != 1/2
        elif grader._str_is_int(t) != grader._str_is_int(g):
            ok = False  # an integer only equals an integer
        else:
            ok = _sympy_equal(t, g)
        if not ok:
            return False
    return True


def grade_answer(given: str | None, truth: str | None) -> bool:
    """MM-Zero's answer equivalence (PRM800K / mathruler semantics, guarded; module docstring). Not symmetric:
    callers that mean "either way" call it twice. None on either side is never equal."""
    if given is None or truth is None:
        return False
    if len(given) > GRADE_MAX_CHARS or len(truth) > GRADE_MAX_CHARS:
        return given.strip() == truth.strip()
    try:
        return _grade(given, truth)
    except Exception:  # the reference's callers fall back to this comparison on a grader error
        return given.strip().lower() == truth.strip().lower()


__all__ = ["LETTERS", "NO_BOX", "Question", "SympyWorker", "answers_equal", "boxed_answer", "extract_boxed",
           "extract_choice", "grade_answer", "normalize_answer", "normalize_choice", "parse_question",
           "squeeze_tag_spaces", "sympy_allowed"]
