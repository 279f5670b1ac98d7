"""MM-Zero's rules (ALGORITHMS.md section 2; arXiv 2603.09206) as pure functions on plain Python values.

The names and meanings of render_stats, proposer_reward, content_type_penalty, coder_reward and solver_reward are
fixed by issue 16 (an outside check calls them). Answer equivalence is `answers.grade_answer` (mathruler's
PRM800K grader, guarded), answers are `answers.boxed_answer` after `answers.squeeze_tag_spaces`.

    parse_proposal(text)          -> Proposal | None (five required tags; content_type optional, normalised)
    extract_svg(text) / svg_flags(code) -> the Coder's SVG and its flags (empty, not_svg)
    is_valid_answer(a), answer_clusters(answers)
    render_stats(easy_answers, easy_truth, hard_answers) -> (s, c) of one rendered image
    proposer_reward(renders)      -> (1/N) sum_rendered [min(s, 0.5) + d] - 0.3 * [some rendered, mean d < 0.15]
    content_type_penalty(types)   -> 0.15 * (frac - 0.5) / 0.5 where frac > 0.5, only with >= 2 distinct types
    sentence_bleu / bleu_distance_matrix / average_linkage_labels / cluster_shares / diversity_changes
    proposer_batch_rewards(proposals, renders) -> -1 for unparseable, else reward - type penalty + diversity
    coder_reward(rendered, s, c, *, empty, not_svg), keep_coder_prompt(success_rate)
    solver_well_formed(text), solver_reward(answer, label, *, well_formed)
    solver_label(answers) -> (label, consistency), keep_solver_item(label, easy_sc, hard_c)

The rules, one line each (d = min(c, 1 - c)):
- s = share of ALL n easy answers matching the proposal's easy_answer (grade_answer either way); a missing
  answer (None) or an empty one, or an empty easy_answer, never matches (the reference skips falsy strings) but
  counts in n. The string "None" (no box) is graded like any answer.
- c = largest cluster / number of VALID hard answers (invalid: None, and after strip, '' or, lower-cased, none,
  n/a, na, null, unknown, -); no valid answer: c = 0.
- Clusters: greedy in arrival order; an answer joins the FIRST cluster whose FIRST member it matches: identical,
  equal after lower-case + whitespace collapse, both contain "no " (lower-cased), or grade_answer either way.
- Proposer: unparseable -> -1, outside the batch terms. N counts failed renders (N = len(renders), at least 1).
- Content type (over the valid proposals): only with >= 2 distinct types; penalty magnitudes are returned (>= 0).
- Diversity, per field (caption 0.45, easy question 0.20, hard question 0.35): average-linkage clustering at
  distance threshold 0.25 on 1 - sentence BLEU; change = -clip(0.5 * n_valid * sum_f w_f (share_f - 1/n_valid),
  -0.5, 0.5): a unique proposal gains. With one valid proposal every share is 1 = 1/n_valid: change 0.
- Coder: rendered 1 + s + d - 0.05[empty] - 0.5[not_svg], else -(0.1 + 0.05[empty] + 0.5[not_svg]); floor -0.5.
  Coder prompts: render success over the 4 samples in [0.25, 0.75], both ends kept.
- Solver: 0.9 * grade_answer(answer, label) + 0.1 * well_formed. Solver data: every answer votes (a missing box
  is "None"), label = the largest cluster's first member (ties: the cluster formed first), consistency = largest
  / number of answers; keep when label is not None/''/"None", easy self-consistency >= 0.5, hard consistency in
  [0.25, 0.75] (both ends kept).

Decisions and readings (the reference is the authors' released code, MM-zero_final/):
- BLEU is our own ~30 lines, not nltk: it is exactly nltk's `sentence_bleu(refs=[r], hyp,
  smoothing_function=SmoothingFunction().method1)` (4-gram uniform weights, clipped counts, precision
  denominators max(1, count), a zero unigram match -> 0, epsilon 0.1 for a zero higher-order count, brevity
  penalty exp(1 - r/c), 0 for an empty hypothesis), computed with the same float operations (math.fsum of
  0.25*log p); tests/test_mmzero_rules.py compares it with nltk (a dev dependency) to 1e-15. nltk itself is ~1.5 MB
  plus regex/click/joblib and imports in ~0.5 s; sacrebleu's sentence BLEU differs (13a tokenisation, its own
  smoothing), so neither is a runtime dependency.
- BLEU is not symmetric. The reference fills the matrix once per unordered pair: for i < j,
  dist[i, j] = dist[j, i] = 1 - BLEU(reference=text[j], hypothesis=text[i]) (the earlier proposal is the
  hypothesis), dist[i, i] = 0. bleu_distance_matrix does exactly that.
- Clustering = sklearn AgglomerativeClustering(distance_threshold=0.25, linkage="average",
  metric="precomputed"), which runs scipy's linkage on the upper triangle and keeps every merge whose linkage
  distance is STRICTLY below 0.25 (a pair at exactly 0.25 stays apart; scipy's fcluster(t=0.25) would merge it).
  Ours is the naive O(n^3) algorithm on numpy (n <= 72: ~2 ms): merge the closest pair of clusters (ties: the
  first in row-major order) while that distance < 0.25, with the Lance-Williams average update scipy uses.
  Average linkage has no inversions, so stopping at the first distance >= 0.25 equals sklearn's cut.
- content_type is read case-insensitively with spaces as underscores ("Data Chart" -> data_chart) and the
  reference's alias "datachart"; anything else (and a missing tag) is "other". The reference, when the type is
  "other", re-derives a type from caption keywords for the batch penalty; ALGORITHMS.md does not have that rule
  and it is not implemented here.
- Coder flags (the reference's codegen_reward): empty = the extracted code is blank; not_svg = empty, or the
  stripped code neither starts with `<` nor contains `<svg` (case-insensitive). Empty implies not SVG, also when
  a caller passes empty=True, not_svg=False.
- The reference's answer clustering also truncates the lower-cased, collapsed forms to 120 characters, and its
  Solver-data vote drops empty answers from the vote and the denominator; ALGORITHMS.md has neither and neither
  is implemented (every answer votes; consistency divides by the number of answers).

Test: `pytest -q tests/test_mmzero_rules.py tests/test_answers.py -p no:cacheprovider`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vzero_fast.answers import NO_BOX, grade_answer, squeeze_tag_spaces

CONTENT_TYPES = ("data_chart", "diagram", "geometry", "timeline", "map", "table", "other")
"""The Proposer's content types; anything else normalises to "other"."""
INVALID_ANSWERS = frozenset({"", "none", "n/a", "na", "null", "unknown", "-"})
"""Hard answers (stripped, lower-cased) that are not answers: left out of c's denominator."""
SOLVABILITY_CAP = 0.5
"""min(s, 0.5) in the Proposer reward."""
EASY_HARD_THRESHOLD, EASY_HARD_PENALTY = 0.15, 0.3
"""The Proposer loses 0.3 when the mean d over its rendered images is < 0.15."""
CONTENT_TYPE_WEIGHT, CONTENT_TYPE_SHARE = 0.15, 0.5
"""Content-type penalty 0.15 * (frac - 0.5) / 0.5 above a 0.5 share."""
DIVERSITY_WEIGHTS = (("caption", 0.45), ("easy_question", 0.20), ("hard_question", 0.35))
"""Per-field weights of the BLEU-cluster diversity term."""
DIVERSITY_SCALE = 0.5
"""The diversity change is -clip(0.5 * n_valid * weighted excess share, -0.5, 0.5)."""
BLEU_THRESHOLD = 0.25
"""Clusters merge while their average 1 - BLEU distance is < 0.25."""
BAND = (0.25, 0.75)
"""Inclusive band for the Coder prompts' render success and the Solver items' hard consistency."""
EASY_MIN_CONSISTENCY = 0.5
"""Solver items need easy self-consistency >= 0.5."""


# ------------------------------------------------------------------------------------------ parsing

@dataclass(frozen=True, kw_only=True)
class Proposal:
    """One parsed Proposer output (all fields stripped)."""

    caption: str
    """What the figure shows (<caption>)."""
    easy_question: str
    """A question read off the figure (<easy_question>)."""
    easy_answer: str
    """The Proposer's answer to it (<easy_answer>): the silver label of solvability s."""
    hard_question: str
    """A question that needs reasoning over the figure (<hard_question>)."""
    hard_answer: str
    """The Proposer's answer to it (<hard_answer>; not used by any reward)."""
    content_type: str = "other"
    """One of CONTENT_TYPES (<content_type>, optional)."""


_REQUIRED = ("caption", "easy_question", "easy_answer", "hard_question", "hard_answer")
_CONTENT_ALIASES = {"datachart": "data_chart"}


def normalize_content_type(raw: str | None) -> str:
    """"Data Chart" -> "data_chart"; anything not in CONTENT_TYPES (or missing) -> "other"."""
    t = (raw or "").strip().lower().replace(" ", "_")
    t = _CONTENT_ALIASES.get(t, t)
    return t if t in CONTENT_TYPES else "other"


def _first_tag(text: str, name: str) -> str | None:
    m = re.search(rf"<{name}>([\s\S]*?)</{name}>", text)
    return m.group(1).strip() if m else None


def parse_proposal(text: str | None) -> Proposal | None:
    """The Proposer's tags (first closed pair of each, after the whitespace squeeze) as a Proposal; None when any
    of the five required tags is missing (an empty one is present)."""
    if not text:
        return None
    text = squeeze_tag_spaces(text)
    fields = {name: _first_tag(text, name) for name in _REQUIRED}
    if any(v is None for v in fields.values()):
        return None
    return Proposal(**fields, content_type=normalize_content_type(_first_tag(text, "content_type")))


_SVG_FENCE = re.compile(r"```svg\s*\n([\s\S]*?)```")
_XML_FENCE = re.compile(r"```xml\s*\n([\s\S]*?)```")
_RAW_SVG = re.compile(r"(<svg[\s\S]*?</svg>)", re.IGNORECASE)


def extract_svg(text: str | None) -> str:
    """The Coder's SVG: the first ```svg fence (the tag line ends the fence's first line), else the first ```xml
    fence if it holds `<svg` (any case), else the first raw `<svg ...</svg>` (any case), else ""; stripped."""
    if not text:
        return ""
    if m := _SVG_FENCE.search(text):
        return m.group(1).strip()
    if (m := _XML_FENCE.search(text)) and "<svg" in m.group(1).lower():
        return m.group(1).strip()
    if m := _RAW_SVG.search(text):
        return m.group(1).strip()
    return ""


def svg_flags(code: str) -> tuple[bool, bool]:
    """(empty, not_svg) of extracted Coder code: empty = blank; not_svg = blank, or neither starting with `<`
    nor containing `<svg` (the reference's codegen_reward)."""
    stripped = code.strip()
    empty = not stripped
    return empty, empty or not (stripped.startswith("<") or "<svg" in stripped.lower())


_WELL_FORMED = re.compile(r"<think>.*?</think>\s*\\boxed\{.*?\}\s*", re.DOTALL)


def solver_well_formed(text: str | None) -> bool:
    """`<think>...</think>` from the first character, then only whitespace, then `\\boxed{...}` ending the
    response (trailing whitespace allowed), after the whitespace squeeze."""
    return bool(text) and _WELL_FORMED.fullmatch(squeeze_tag_spaces(text)) is not None


# ------------------------------------------------------------------------------------------ answers

def is_valid_answer(a: str | None) -> bool:
    """False for None and for '', none, n/a, na, null, unknown, - (stripped, any case)."""
    return a is not None and a.strip().lower() not in INVALID_ANSWERS


def _collapse(s: str) -> str:
    return " ".join(s.lower().split())


def same_answer(a: str, first: str) -> bool:
    """Whether answer `a` joins a cluster whose first member is `first`."""
    if a == first or _collapse(a) == _collapse(first):
        return True
    if "no " in a.lower() and "no " in first.lower():
        return True
    return grade_answer(a, first) or grade_answer(first, a)


def answer_clusters(answers: Sequence[str | None]) -> list[list[int]]:
    """Greedy clusters in arrival order: answer i joins the first cluster whose FIRST member it matches
    (same_answer), else opens a new one. Returns the clusters (in creation order) as lists of indices into
    `answers`; None is read as "None"."""
    texts = [NO_BOX if a is None else a for a in answers]
    clusters: list[list[int]] = []
    for i, a in enumerate(texts):
        for cluster in clusters:
            if same_answer(a, texts[cluster[0]]):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def _matches_truth(answer: str | None, truth: str | None) -> bool:
    if not answer or not truth:
        return False
    return grade_answer(answer, truth) or grade_answer(truth, answer)


def render_stats(easy_answers: Sequence[str | None], easy_truth: str | None,
                 hard_answers: Sequence[str | None]) -> tuple[float, float]:
    """(s, c) of one rendered image: s = matching easy answers / ALL easy answers; c = largest cluster of the
    VALID hard answers / number of valid hard answers (0 without any)."""
    s = sum(_matches_truth(a, easy_truth) for a in easy_answers) / len(easy_answers) if easy_answers else 0.0
    valid = [a for a in hard_answers if is_valid_answer(a)]
    if not valid:
        return float(s), 0.0
    return float(s), max(len(k) for k in answer_clusters(valid)) / len(valid)


# ------------------------------------------------------------------------------------------ rewards

def proposer_reward(renders: Sequence[tuple[float, float] | None]) -> float:
    """Per-proposal part of the Proposer reward over its N Coder samples ((s, c) per rendered image, None for a
    failed render): (1/N) sum_rendered [min(s, 0.5) + d] - 0.3 when >= 1 rendered and mean d (rendered) < 0.15."""
    rendered = [r for r in renders if r is not None]
    d = [min(c, 1.0 - c) for _, c in rendered]
    reward = sum(min(s, SOLVABILITY_CAP) + d_j for (s, _), d_j in zip(rendered, d)) / max(len(renders), 1)
    if d and sum(d) / len(d) < EASY_HARD_THRESHOLD:
        reward -= EASY_HARD_PENALTY
    return reward


def content_type_penalty(types: Sequence[str]) -> list[float]:
    """Penalty magnitude (>= 0, subtracted) per proposal of the batch: 0.15 * (frac - 0.5) / 0.5 for a type whose
    share frac exceeds 0.5, only when the batch holds at least 2 distinct types."""
    counts = Counter(types)
    if len(counts) < 2:
        return [0.0] * len(types)
    out = []
    for t in types:
        frac = counts[t] / len(types)
        excess = frac - CONTENT_TYPE_SHARE
        out.append(CONTENT_TYPE_WEIGHT * (excess / (1.0 - CONTENT_TYPE_SHARE)) if excess > 0 else 0.0)
    return out


def coder_reward(rendered: bool, s: float, c: float, *, empty: bool, not_svg: bool) -> float:
    """Rendered: 1 + s + min(c, 1-c) - 0.05*[empty] - 0.5*[not_svg]; not rendered: -(0.1 + 0.05*[empty] +
    0.5*[not_svg]); floored at -0.5. Empty implies not SVG."""
    not_svg = not_svg or empty
    penalty = 0.05 * empty + 0.5 * not_svg
    r = 1.0 + s + min(c, 1.0 - c) - penalty if rendered else -(0.1 + penalty)
    return max(-0.5, r)


def keep_coder_prompt(success_rate: float) -> bool:
    """A proposal is a Coder prompt when its render success over 4 samples is in [0.25, 0.75]."""
    return BAND[0] <= success_rate <= BAND[1]


def solver_reward(answer: str | None, label: str, *, well_formed: bool) -> float:
    """0.9 * grade_answer(answer, label) + 0.1 * well_formed."""
    return 0.9 * float(grade_answer(answer, label)) + 0.1 * float(well_formed)


def solver_label(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """(label, consistency) of a question's answers: every answer votes (None reads "None"); label = the largest
    cluster's first member (ties: the cluster formed first), consistency = its size / number of answers.
    (None, 0.0) without answers."""
    if not answers:
        return None, 0.0
    clusters = answer_clusters(answers)
    largest = max(clusters, key=len)
    first = answers[largest[0]]
    return (NO_BOX if first is None else first), len(largest) / len(answers)


def keep_solver_item(label: str | None, easy_self_consistency: float, hard_consistency: float) -> bool:
    """Solver data filter: label not None/''/"None", easy self-consistency >= 0.5, hard consistency in
    [0.25, 0.75]."""
    if label is None or label in ("", NO_BOX):
        return False
    return easy_self_consistency >= EASY_MIN_CONSISTENCY and BAND[0] <= hard_consistency <= BAND[1]


# ------------------------------------------------------------------------------------------ diversity

def _ngram_counts(tokens: Sequence[str]) -> list[Counter]:
    """Counters of the 1- to 4-grams of a token list."""
    return [Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, 5)]


def _bleu(ref: list[Counter], ref_len: int, hyp: list[Counter], hyp_len: int) -> float:
    nums = [sum(min(count, r[g]) for g, count in h.items()) for r, h in zip(ref, hyp)]
    if nums[0] == 0:
        return 0.0
    dens = [max(1, sum(h.values())) for h in hyp]
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    p = [(num + 0.1) / den if num == 0 else num / den for num, den in zip(nums, dens)]
    return bp * math.exp(math.fsum(0.25 * math.log(p_i) for p_i in p))


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """nltk's sentence_bleu([reference], hypothesis, smoothing_function=SmoothingFunction().method1): BLEU-4,
    uniform weights, one reference, method-1 smoothing (epsilon 0.1)."""
    return _bleu(_ngram_counts(reference), len(reference), _ngram_counts(hypothesis), len(hypothesis))


def bleu_distance_matrix(texts: Sequence[str]) -> np.ndarray:
    """[n, n] 1 - BLEU on whitespace tokens, symmetric as the reference makes it: for i < j both entries are
    1 - sentence_bleu(reference=texts[j], hypothesis=texts[i]); the diagonal is 0."""
    tokens = [t.split() for t in texts]
    grams = [_ngram_counts(t) for t in tokens]  # counted once per text, not once per pair
    n = len(texts)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = 1.0 - _bleu(grams[j], len(tokens[j]), grams[i], len(tokens[i]))
    return dist


def average_linkage_labels(dist: np.ndarray, threshold: float = BLEU_THRESHOLD) -> list[int]:
    """Flat clusters of average-linkage agglomerative clustering on a symmetric distance matrix: merge the two
    closest clusters while their average distance is < threshold (sklearn's distance_threshold). Labels are
    numbered by first appearance."""
    n = dist.shape[0]
    d = np.array(dist, dtype=np.float64)  # [n, n], rows/columns of merged-away clusters are masked out
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    size = np.ones(n)
    members = [[i] for i in range(n)]
    alive = np.ones(n, dtype=bool)
    for _ in range(n - 1):
        masked = np.where(upper & alive[:, None] & alive[None, :], d, np.inf)
        a, b = divmod(int(np.argmin(masked)), n)  # a < b; ties: the first pair in row-major order
        if not masked[a, b] < threshold:
            break
        merged = (size[a] * d[a] + size[b] * d[b]) / (size[a] + size[b])  # average linkage (Lance-Williams)
        d[a, :] = merged
        d[:, a] = merged
        size[a] += size[b]
        members[a] += members[b]
        alive[b] = False
    labels = [0] * n
    order: dict[int, int] = {}
    for root in np.flatnonzero(alive):
        for i in members[root]:
            labels[i] = int(root)
    return [order.setdefault(lab, len(order)) for lab in labels]


def cluster_shares(texts: Sequence[str], threshold: float = BLEU_THRESHOLD) -> list[float]:
    """Each text's BLEU-cluster size / number of texts."""
    if not texts:
        return []
    labels = average_linkage_labels(bleu_distance_matrix(texts), threshold)
    sizes = Counter(labels)
    return [sizes[lab] / len(texts) for lab in labels]


def diversity_changes(proposals: Sequence[Proposal]) -> list[float]:
    """The reward change of each (valid) proposal of the batch: -clip(0.5 * n * sum_f w_f * (share_f - 1/n),
    -0.5, 0.5) over the fields caption 0.45, easy question 0.20, hard question 0.35."""
    n = len(proposals)
    if n <= 1:
        return [0.0] * n
    shares = {f: cluster_shares([getattr(p, f) for p in proposals]) for f, _ in DIVERSITY_WEIGHTS}
    uniform = 1.0 / n
    out = []
    for i in range(n):
        excess = sum(w * (shares[f][i] - uniform) for f, w in DIVERSITY_WEIGHTS)
        raw = excess * n * DIVERSITY_SCALE
        out.append(-max(-DIVERSITY_SCALE, min(DIVERSITY_SCALE, raw)))
    return out


def proposer_batch_rewards(proposals: Sequence[Proposal | None],
                           renders: Sequence[Sequence[tuple[float, float] | None]],
                           terms: dict[str, float] | None = None) -> list[float]:
    """The Proposer reward of every proposal of one reward batch: -1 for an unparseable one (None), which takes
    no part in the batch terms; else proposer_reward(renders[i]) - content-type penalty + diversity change, the
    batch terms computed over the valid proposals only. `terms` (when given and any proposal is valid) receives
    the three parts' means over the valid proposals: proposer_base_mean, content_penalty_mean, diversity_mean."""
    if len(proposals) != len(renders):
        raise ValueError(f"{len(proposals)} proposals but {len(renders)} render lists")
    valid = [i for i, p in enumerate(proposals) if p is not None]
    kept = [proposals[i] for i in valid]
    base = dict(zip(valid, (proposer_reward(renders[i]) for i in valid)))
    penalty = dict(zip(valid, content_type_penalty([p.content_type for p in kept])))
    change = dict(zip(valid, diversity_changes(kept)))
    if terms is not None and valid:
        terms.update(proposer_base_mean=sum(base.values()) / len(valid),
                     content_penalty_mean=sum(penalty.values()) / len(valid),
                     diversity_mean=sum(change.values()) / len(valid))
    return [base[i] - penalty[i] + change[i] if i in base else -1.0 for i in range(len(proposals))]


__all__ = [
    "BAND", "CONTENT_TYPES", "DIVERSITY_WEIGHTS", "INVALID_ANSWERS", "Proposal", "answer_clusters",
    "average_linkage_labels", "bleu_distance_matrix", "cluster_shares", "coder_reward", "content_type_penalty",
    "diversity_changes", "extract_svg", "is_valid_answer", "keep_coder_prompt", "keep_solver_item",
    "normalize_content_type", "parse_proposal", "proposer_batch_rewards", "proposer_reward", "render_stats",
    "same_answer", "sentence_bleu", "solver_label", "solver_reward", "solver_well_formed", "svg_flags",
]
