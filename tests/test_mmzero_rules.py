"""MM-Zero's rules (vzero_fast/recipes/mmzero_rules.py) against ALGORITHMS.md section 2, one test (or case) per
rule sentence. Expected values are worked out by hand from the formulas (the arithmetic is in the comments), or
come from independent references (nltk's BLEU, scipy's and sklearn's average linkage), never from the code
under test. Float results are compared with ABS (exact up to a few roundings of values near 1)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from vzero_fast.recipes.mmzero_rules import (
    CONTENT_TYPES,
    Proposal,
    answer_clusters,
    average_linkage_labels,
    bleu_distance_matrix,
    cluster_shares,
    coder_reward,
    content_type_penalty,
    diversity_changes,
    extract_svg,
    is_valid_answer,
    keep_coder_prompt,
    keep_solver_item,
    parse_proposal,
    proposer_batch_rewards,
    proposer_reward,
    render_stats,
    sentence_bleu,
    solver_label,
    solver_reward,
    solver_well_formed,
    svg_flags,
)

ABS = 1e-12  # a handful of float64 roundings of O(1) values


def test_fixed_signatures():
    """The issue fixes these names and parameters (an outside check calls them)."""
    sig = {f.__name__: list(inspect.signature(f).parameters) for f in (
        render_stats, proposer_reward, content_type_penalty, coder_reward, solver_reward)}
    assert sig == {"render_stats": ["easy_answers", "easy_truth", "hard_answers"], "proposer_reward": ["renders"],
                   "content_type_penalty": ["types"], "coder_reward": ["rendered", "s", "c", "empty", "not_svg"],
                   "solver_reward": ["answer", "label", "well_formed"]}
    kw = inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(coder_reward).parameters["empty"].kind == kw
    assert inspect.signature(coder_reward).parameters["not_svg"].kind == kw
    assert inspect.signature(solver_reward).parameters["well_formed"].kind == kw


# ------------------------------------------------------------------------------------------ s and c

def test_s_counts_missing_answers_in_the_denominator():
    # "12" and "12.0" (an integer-valued float) match; None, "" and "13" do not; n = 5 -> s = 2/5.
    s, _ = render_stats(["12", None, "12.0", "13", ""], "12", ["1"])
    assert s == pytest.approx(0.4, abs=ABS)


def test_s_grades_in_either_direction():
    """grade_answer is not symmetric: sympy reads (truth)-(given) by string concatenation, so the answer
    "1.5)-(1" is (0.5)-(1.5)-(1) = -2 as a given but (1.5)-(1)-(0.5) = 0 when graded as the truth. The easy
    answer "0.5" is matched by it only in the second direction, and s counts it."""
    s, _ = render_stats(["1.5)-(1", "7"], "0.5", ["1"])
    assert s == pytest.approx(0.5, abs=ABS)  # 1 of 2


def test_s_with_an_empty_easy_answer_is_zero():
    # The reference skips falsy labels: even an empty answer does not "match" an empty truth.
    assert render_stats(["", "", "x"], "", ["1"])[0] == 0.0


def test_s_none_string_is_an_answer():
    # A response without a box answers the string "None"; graded like any string (truth "None" -> match).
    assert render_stats(["None", None], "None", ["1"])[0] == pytest.approx(0.5, abs=ABS)


@pytest.mark.parametrize("answer, valid", [
    (None, False), ("", False), ("   ", False), ("None", False), ("none", False), (" N/A ", False),
    ("na", False), ("NULL", False), ("unknown", False), ("-", False),
    ("0", True), ("no", True), ("--", True), ("nan", True), ("None of them", True),
])
def test_invalid_answers(answer, valid):
    assert is_valid_answer(answer) is valid


def test_c_excludes_invalid_answers_from_the_denominator():
    # valid: "5", "6", "5.0", "six" -> clusters {5, 5.0}, {6}, {six}: c = 2/4 (not 2/9).
    _, c = render_stats(["1"], "1", ["5", "None", "n/a", "6", "5.0", "", None, "six", "UNKNOWN"])
    assert c == pytest.approx(0.5, abs=ABS)


def test_c_without_valid_answers_is_zero():
    assert render_stats(["1"], "1", [None, "None", "", "n/a", " - "]) == (1.0, 0.0)
    assert render_stats(["1"], "1", []) == (1.0, 0.0)


def test_clusters_compare_with_the_first_member_in_arrival_order():
    """"0.5" matches "1/2" (sympy) and "2/4" (sympy), but "2/4" and "1/2" are two unreduced fractions: strings,
    not equal. Only the cluster's FIRST member is compared."""
    assert answer_clusters(["1/2", "0.5", "2/4"]) == [[0, 1], [2]]  # "2/4" vs first "1/2": no
    assert answer_clusters(["0.5", "1/2", "2/4"]) == [[0, 1, 2]]  # both vs first "0.5": yes
    assert render_stats(["1"], "1", ["1/2", "0.5", "2/4"])[1] == pytest.approx(2 / 3, abs=ABS)
    assert render_stats(["1"], "1", ["0.5", "1/2", "2/4"])[1] == 1.0


def test_clusters_join_the_first_matching_cluster():
    # "x" opens a cluster; "no a" and "no b" match by the "no " rule; "NO A" joins the FIRST match.
    assert answer_clusters(["x", "no a", "y", "NO  b", "No c"]) == [[0], [1, 3, 4], [2]]


@pytest.mark.parametrize("a, b, same", [
    ("Red", "Red", True),                  # identical
    ("  Light   Blue ", "light blue", True),  # lower-case + whitespace collapse
    ("No change", "there is no difference", True),  # both contain "no "
    ("No", "no", True),                    # collapse
    ("No", "None", False),                 # "no " needs the space
    ("nonzero", "no way", False),
    ("\\frac{1}{2}", "0.5", True),         # grade_answer
    ("3", "4", False),
    ("0.5", "1.5)-(1", True),              # grade_answer either way (see test_s_grades_in_either_direction):
    ("1.5)-(1", "0.5", True),              # each order needs a different direction
])
def test_cluster_match_rules(a, b, same):
    assert (answer_clusters([a, b]) == [[0, 1]]) is same


def test_c_is_largest_cluster_share():
    # {7, 7.0, 7} (3), {8} (1), {nine} (1): 3/5.
    assert render_stats(["1"], "1", ["7", "8", "7.0", "nine", "7"])[1] == pytest.approx(0.6, abs=ABS)


# ------------------------------------------------------------------------------------------ Proposer

def test_proposer_failed_renders_count_in_n():
    # One rendered image (s=1 -> capped 0.5, c=0.5 -> d=0.5) over N=4: (0.5 + 0.5) / 4 = 0.25; mean d = 0.5.
    assert proposer_reward([(1.0, 0.5), None, None, None]) == pytest.approx(0.25, abs=ABS)
    assert proposer_reward([(1.0, 0.5)]) == pytest.approx(1.0, abs=ABS)


def test_proposer_solvability_capped_and_d_is_min_c_one_minus_c():
    # (min(0.9, 0.5) + min(0.3, 0.7)) + (min(0.2, 0.5) + min(0.6, 0.4)) = 0.8 + 0.6 = 1.4; / 2 = 0.7.
    assert proposer_reward([(0.9, 0.3), (0.2, 0.6)]) == pytest.approx(0.7, abs=ABS)


def test_easy_hard_penalty_uses_the_mean_over_rendered_images():
    # Rendered d = 1 - 0.8 = 0.2: the mean over RENDERED is 0.2 >= 0.15 -> no penalty (over all N = 4 it would
    # be 0.05). R = (0.5 + 0.2) / 4 = 0.175.
    assert proposer_reward([(0.5, 0.8), None, None, None]) == pytest.approx(0.175, abs=ABS)
    # d = 0.05, 0.1 -> mean 0.075 < 0.15: R = ((0.3 + 0.05) + (0.5 + 0.1)) / 4 - 0.3 = 0.2375 - 0.3 = -0.0625.
    assert proposer_reward([(0.3, 0.95), (0.6, 0.9), None, None]) == pytest.approx(-0.0625, abs=ABS)
    # c = 1 (a unanimous hard answer): d = 0 -> penalised: (0.5 + 0) / 1 - 0.3 = 0.2.
    assert proposer_reward([(0.5, 1.0)]) == pytest.approx(0.2, abs=ABS)


def test_easy_hard_penalty_needs_a_rendered_image():
    assert proposer_reward([None, None, None, None]) == 0.0
    assert proposer_reward([]) == 0.0


def test_content_type_penalty():
    # 3 of 4 data_chart: frac 0.75 -> 0.15 * (0.75 - 0.5) / 0.5 = 0.075; map (0.25) -> 0.
    assert content_type_penalty(["data_chart", "map", "data_chart", "data_chart"]) == pytest.approx(
        [0.075, 0.0, 0.075, 0.075], abs=ABS)
    # 5 of 6: 0.15 * (5/6 - 1/2) / 0.5 = 0.15 * (1/3) / 0.5 = 0.1.
    assert content_type_penalty(["table"] * 5 + ["map"]) == pytest.approx([0.1] * 5 + [0.0], abs=ABS)
    # A share of exactly 0.5 is not over-represented.
    assert content_type_penalty(["map", "table", "map", "table"]) == [0.0] * 4


def test_single_type_batch_has_no_penalty():
    assert content_type_penalty(["geometry"] * 6) == [0.0] * 6
    assert content_type_penalty([]) == []


# ------------------------------------------------------------------------------------------ BLEU + clusters

def test_bleu_hand_values():
    # Identical 4+ token texts: every precision 1, no brevity penalty -> 1.
    t = "a b c d e".split()
    assert sentence_bleu(t, t) == pytest.approx(1.0, abs=ABS)
    # Identical 3-token texts: p1=p2=p3=1, no 4-gram: method-1 gives 0.1/1 -> BLEU = 0.1 ** 0.25.
    assert sentence_bleu(["x", "y", "z"], ["x", "y", "z"]) == pytest.approx(0.1 ** 0.25, abs=ABS)
    # No shared unigram -> 0 (nltk returns 0 before smoothing).
    assert sentence_bleu(["a", "b"], ["c", "d"]) == 0.0
    assert sentence_bleu(["a"], []) == 0.0


def test_bleu_matrix_orientation():
    """1 - BLEU(reference=later text, hypothesis=earlier text), mirrored. A = 5 tokens inside B = 8 tokens:
    BLEU(ref=B, hyp=A) = exp(1 - 8/5) (all precisions 1, brevity penalty); BLEU(ref=A, hyp=B) =
    (5/8 * 4/7 * 3/6 * 2/5) ** 0.25 = (1/14) ** 0.25 (no brevity penalty)."""
    a, b = "the red bar is tall", "the red bar is tall and wide today"
    d_ab = bleu_distance_matrix([a, b])
    assert d_ab[0, 1] == d_ab[1, 0] == pytest.approx(1 - math.exp(-0.6), abs=ABS)
    d_ba = bleu_distance_matrix([b, a])
    assert d_ba[0, 1] == d_ba[1, 0] == pytest.approx(1 - (1 / 14) ** 0.25, abs=ABS)
    assert d_ab[0, 0] == d_ab[1, 1] == 0.0


def test_bleu_equals_nltk_method1():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    smooth = nltk_bleu.SmoothingFunction().method1
    rng = np.random.default_rng(16)
    vocab = "the a bar chart of sales by month shows red blue green 1 2 3 4 and".split()
    for _ in range(500):
        ref = list(rng.choice(vocab, int(rng.integers(0, 14))))
        hyp = list(rng.choice(vocab, int(rng.integers(0, 14))))
        want = nltk_bleu.sentence_bleu([ref], hyp, smoothing_function=smooth)
        assert sentence_bleu(ref, hyp) == pytest.approx(want, abs=1e-15), (ref, hyp)


def test_average_linkage_hand_cases():
    # d01 = 0.1 merges first; then d({0,1}, 2) = (0.2 + 0.35) / 2 = 0.275 >= 0.25: stop (single linkage, 0.2,
    # would merge; complete, 0.35, would not either way).
    d = np.array([[0, 0.1, 0.2], [0.1, 0, 0.35], [0.2, 0.35, 0]])
    assert average_linkage_labels(d) == [0, 0, 1]
    # (0.1 + 0.35) / 2 = 0.225 < 0.25: one cluster (complete linkage, 0.35, would keep 2 apart).
    d2 = np.array([[0, 0.1, 0.1], [0.1, 0, 0.35], [0.1, 0.35, 0]])
    assert average_linkage_labels(d2) == [0, 0, 0]


def test_threshold_edge_is_strict():
    """sklearn's distance_threshold: a merge at exactly 0.25 does not happen (checked against sklearn 1.9)."""
    at = np.array([[0, 0.25], [0.25, 0]])
    below = np.array([[0, np.nextafter(0.25, 0)], [np.nextafter(0.25, 0), 0]])
    assert average_linkage_labels(at) == [0, 1]
    assert average_linkage_labels(below) == [0, 0]


def _partition(labels) -> list[list[int]]:
    return sorted(sorted(i for i, x in enumerate(labels) if x == k) for k in set(labels))


def _random_distances(rng, n):
    x = rng.random((n, 3)) * rng.uniform(0.1, 1.0)  # spreads from "all merge" to "none merge" at 0.25
    return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


def test_average_linkage_equals_scipy():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(0)
    for _ in range(200):
        d = _random_distances(rng, int(rng.integers(2, 73)))
        z = hierarchy.linkage(squareform(d, checks=False), method="average")
        # fcluster keeps cophenetic distance <= t; sklearn (the reference) merges only < 0.25.
        want = hierarchy.fcluster(z, t=np.nextafter(0.25, 0), criterion="distance")
        assert _partition(average_linkage_labels(d)) == _partition(list(want))


def test_average_linkage_equals_sklearn():
    cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(1)
    for _ in range(100):
        d = _random_distances(rng, int(rng.integers(2, 73)))
        ref = cluster.AgglomerativeClustering(n_clusters=None, distance_threshold=0.25, metric="precomputed",
                                              linkage="average").fit_predict(d)
        assert _partition(average_linkage_labels(d)) == _partition(list(ref))


def test_cluster_shares():
    same = "a bar chart of monthly sales"
    assert cluster_shares([same, "completely different words here now", same]) == pytest.approx(
        [2 / 3, 1 / 3, 2 / 3], abs=ABS)
    # Identical 3-token texts are NOT one cluster: 1 - 0.1 ** 0.25 = 0.438 >= 0.25 (method-1 quirk).
    assert cluster_shares(["x y z", "x y z"]) == [0.5, 0.5]


def _prop(caption, easy_q="e", hard_q="h", content_type="other", k=0):
    return Proposal(caption=caption, easy_question=easy_q, easy_answer="1", hard_question=hard_q,
                    hard_answer="2", content_type=content_type)


WORDS = [f"w{i}" for i in range(200)]


def _unique(k: int) -> str:
    """A 6-token text sharing no token with any other _unique(j)."""
    return " ".join(WORDS[6 * k:6 * k + 6])


def test_diversity_unique_proposal_gains_and_clip():
    # n = 3: P0 = P1 (every field), P2 unique. P0, P1: shares 2/3, excess = (0.45 + 0.20 + 0.35) * (2/3 - 1/3)
    # = 1/3; 0.5 * 3 * 1/3 = 0.5 -> change -0.5. P2: share 1/3 = 1/n -> 0: the unique one is ahead by 0.5.
    dup = _prop(_unique(0), _unique(1), _unique(2))
    uniq = _prop(_unique(3), _unique(4), _unique(5))
    assert diversity_changes([dup, dup, uniq]) == pytest.approx([-0.5, -0.5, 0.0], abs=ABS)
    # n = 4, all identical: excess = 1 - 1/4 = 0.75; 0.5 * 4 * 0.75 = 1.5 -> clipped to 0.5: change -0.5.
    assert diversity_changes([dup] * 4) == pytest.approx([-0.5] * 4, abs=ABS)


@pytest.mark.parametrize("field, weight", [("caption", 0.45), ("easy_question", 0.20), ("hard_question", 0.35)])
def test_diversity_field_weights(field, weight):
    # n = 4, proposals 0 and 1 share one field only: share 2/4 vs 1/4 -> 0.5 * 4 * w * 0.25 = 0.5 * w.
    props = [_prop(_unique(3 * k), _unique(3 * k + 1), _unique(3 * k + 2)) for k in range(4)]
    props[1] = Proposal(**{**props[1].__dict__, field: getattr(props[0], field)})
    assert diversity_changes(props) == pytest.approx([-0.5 * weight, -0.5 * weight, 0.0, 0.0], abs=ABS)


def test_diversity_single_proposal():
    assert diversity_changes([_prop(_unique(0))]) == [0.0]
    assert diversity_changes([]) == []


def test_batch_rewards_unparseable_is_minus_one_and_left_out():
    """P0 = P2 (duplicates, data_chart), P3 unique (map), index 1 unparseable. Over the 3 VALID proposals:
    data_chart frac 2/3 -> 0.15 * (2/3 - 1/2) / 0.5 = 0.05 (with the unparseable counted, 2/4 = 0.5 -> 0);
    diversity: duplicates -0.5, P3 0 (n = 3, as in the test above).
    P0, P2: proposer_reward = 4 * (min(1, 0.5) + 0.5) / 4 = 1 -> 1 - 0.05 - 0.5 = 0.45.
    P3: (min(0.2, 0.5) + min(0.6, 0.4)) / 4 = 0.15, mean d 0.4 -> 0.15 - 0 + 0 = 0.15."""
    dup = _prop(_unique(0), _unique(1), _unique(2), content_type="data_chart")
    uniq = _prop(_unique(3), _unique(4), _unique(5), content_type="map")
    renders = [[(1.0, 0.5)] * 4, [], [(1.0, 0.5)] * 4, [(0.2, 0.6), None, None, None]]
    terms: dict[str, float] = {}
    got = proposer_batch_rewards([dup, None, dup, uniq], renders, terms=terms)
    assert got == pytest.approx([0.45, -1.0, 0.45, 0.15], abs=ABS)
    # The parts' means over the 3 valid proposals (the recipe's metrics): base (1 + 1 + 0.15) / 3, penalty
    # (0.05 + 0.05 + 0) / 3, diversity (-0.5 - 0.5 + 0) / 3.
    assert terms == pytest.approx({"proposer_base_mean": 2.15 / 3, "content_penalty_mean": 0.1 / 3,
                                   "diversity_mean": -1 / 3}, abs=ABS)
    none: dict[str, float] = {}
    assert proposer_batch_rewards([None, None], [[], []], terms=none) == [-1.0, -1.0]
    assert none == {}
    with pytest.raises(ValueError):
        proposer_batch_rewards([dup], [])


# ------------------------------------------------------------------------------------------ Coder

@pytest.mark.parametrize("rendered, s, c, empty, not_svg, want", [
    (True, 0.6, 0.7, False, False, 1.9),     # 1 + 0.6 + min(0.7, 0.3)
    (True, 0.0, 0.0, False, True, 0.5),      # 1 + 0 + 0 - 0.5
    (True, 0.2, 0.4, True, True, 1.05),      # 1 + 0.2 + 0.4 - 0.05 - 0.5
    (True, 0.2, 0.4, True, False, 1.05),     # empty implies not SVG: the same
    (False, 0.9, 0.5, False, False, -0.1),   # -(0.1); s and c do not count
    (False, 0.0, 0.0, False, True, -0.5),    # -(0.1 + 0.5) = -0.6 -> floor -0.5
    (False, 0.0, 0.0, True, False, -0.5),    # -(0.1 + 0.05 + 0.5) = -0.65 -> floor (not -0.15: empty => not SVG)
    (True, 1.0, 1.0, False, False, 2.0),     # 1 + 1 + min(1, 0)
])
def test_coder_reward(rendered, s, c, empty, not_svg, want):
    assert coder_reward(rendered, s, c, empty=empty, not_svg=not_svg) == pytest.approx(want, abs=ABS)


@pytest.mark.parametrize("rate, keep", [(0.0, False), (0.24, False), (0.25, True), (0.5, True), (0.75, True),
                                        (0.76, False), (1.0, False)])
def test_coder_prompt_band_inclusive(rate, keep):
    assert keep_coder_prompt(rate) is keep


SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="5" height="5"/></svg>'


@pytest.mark.parametrize("text, want", [
    (f"Here:\n```svg\n{SVG}\n```\n", SVG),
    (f"<svg id='raw'></svg>\n```svg\n{SVG}\n```", SVG),                 # the svg fence wins over raw
    (f"```xml\n<?xml version='1.0'?>\n{SVG}\n```", f"<?xml version='1.0'?>\n{SVG}"),
    (f"```xml\n<note/>\n```\n{SVG} trailing", SVG),                       # xml fence without <svg: raw next
    ("```xml\n<SVG></SVG>\n```", "<SVG></SVG>"),                          # "<svg" any case in the xml fence
    (f"text {SVG} and <svg>second</svg>", SVG),                            # the FIRST raw svg
    ("<SVG width='1'>x</SVG>", "<SVG width='1'>x</SVG>"),                  # raw, any case
    (f"```svg {SVG}```", SVG),                                             # no newline after the tag: raw
    ("```svg\n   \n```", ""),                                              # a blank fence
    ("```python\nprint(1)\n```", ""),
    ("", ""), (None, ""),
])
def test_extract_svg(text, want):
    assert extract_svg(text) == want


@pytest.mark.parametrize("code, flags", [
    ("", (True, True)), ("  \n ", (True, True)),
    (SVG, (False, False)), ("<?xml version='1.0'?><svg/>", (False, False)),
    ("<g></g>", (False, False)),           # starts with "<": SVG as far as the flags go (the renderer decides)
    ("drawing: <svg/>", (False, False)),   # contains "<svg"
    ("print('hi')", (False, True)),
])
def test_svg_flags(code, flags):
    assert svg_flags(code) == flags


# ------------------------------------------------------------------------------------------ Solver

@pytest.mark.parametrize("text, ok", [
    ("<think>2+2</think>\\boxed{4}", True),
    ("<think>a\nb</think>\n\n\\boxed{4}\n", True),             # whitespace between and after
    ("< think >x< /think > \\boxed{1 / 2}", True),              # tags fixed by the squeeze
    ("  <think>x</think>\\boxed{4}", True),                    # the squeeze deletes whitespace before "<"
    ("Sure. <think>x</think>\\boxed{4}", False),               # text before <think>
    ("<think>x</think> so \\boxed{4}", False),                 # text between
    ("<think>x</think>\\boxed{4} done", False),                # text after the box
    ("<think>x</think>\\boxed{4", False),
    ("\\boxed{4}", False), ("<think>x</think>", False), ("", False), (None, False),
    ("<think>x</think>\\boxed{\\frac{1}{2}}", True),
])
def test_solver_format(text, ok):
    assert solver_well_formed(text) is ok


@pytest.mark.parametrize("answer, label, formed, want", [
    ("0.5", "1/2", True, 1.0),          # 0.9 + 0.1
    ("1/2", "0.5", False, 0.9),
    ("2/4", "1/2", True, 0.1),          # unreduced fractions are strings
    ("2.5", "2", True, 0.1),            # an integer truth never equals a non-integer answer
    ("2", "2.5", False, 0.0),
    ("None", "3", True, 0.1),           # no box
    (None, "3", False, 0.0),
    ("\\text{Blue}", "blue", False, 0.9),
])
def test_solver_reward(answer, label, formed, want):
    assert solver_reward(answer, label, well_formed=formed) == pytest.approx(want, abs=ABS)


def test_solver_label_none_votes():
    # {4, 4.0, 4} = 3, {None, "None"} = 2 (None reads "None"), then 5, x, y, z: label "4", 3/10.
    label, c = solver_label(["4", "4.0", None, "5", "None", "4", "x", "y", "z", "None"])
    assert (label, c) == ("4", pytest.approx(0.3, abs=ABS))
    label, c = solver_label([None] * 6 + ["3"] * 4)  # "None" wins the vote: 6/10
    assert (label, c) == ("None", pytest.approx(0.6, abs=ABS))
    assert keep_solver_item(label, 1.0, 0.6) is False


def test_solver_label_first_member_and_ties():
    assert solver_label(["0.5", "1/2", "1/2"]) == ("0.5", 1.0)    # the cluster's FIRST member
    assert solver_label(["a", "b", "b", "a"]) == ("a", 0.5)         # tie: the cluster formed first
    assert solver_label([]) == (None, 0.0)


@pytest.mark.parametrize("label, easy, hard, keep", [
    ("3", 0.5, 0.5, True),
    ("3", 0.5, 0.25, True), ("3", 0.5, 0.75, True),          # hard band inclusive
    ("3", 0.5, 0.2, False), ("3", 0.5, 0.8, False),
    ("3", 0.4, 0.5, False), ("3", 1.0, 0.5, True),            # easy >= 0.5, inclusive
    ("", 1.0, 0.5, False), (None, 1.0, 0.5, False), ("None", 1.0, 0.5, False),
])
def test_solver_data_filter(label, easy, hard, keep):
    assert keep_solver_item(label, easy, hard) is keep


def test_easy_self_consistency_uses_the_same_clustering():
    # 10 easy answers: {7, 7.0, 7 (x3)} = 5 -> 0.5 (kept); the label of the easy side is not used.
    easy = ["7", "7.0", "8", "7", "9", "None", "7", "10", "7", None]
    assert solver_label(easy)[1] == pytest.approx(0.5, abs=ABS)


# ------------------------------------------------------------------------------------------ Proposer parser

GOOD = ("<content_type>data_chart</content_type><caption>A bar chart</caption><easy_question>Tallest?"
        "</easy_question><easy_answer>Mon</easy_answer><hard_question>Mon minus Tue?</hard_question>"
        "<hard_answer>3</hard_answer>")


def test_parse_good_proposal():
    assert parse_proposal(GOOD) == Proposal(content_type="data_chart", caption="A bar chart",
                                            easy_question="Tallest?", easy_answer="Mon",
                                            hard_question="Mon minus Tue?", hard_answer="3")


@pytest.mark.parametrize("tag", ["caption", "easy_question", "easy_answer", "hard_question", "hard_answer"])
def test_parse_missing_required_tag(tag):
    start, end = GOOD.index(f"<{tag}>"), GOOD.index(f"</{tag}>") + len(f"</{tag}>")
    assert parse_proposal(GOOD[:start] + GOOD[end:]) is None
    assert parse_proposal(GOOD.replace(f"</{tag}>", "")) is None  # unclosed


@pytest.mark.parametrize("raw, want", [
    ("data_chart", "data_chart"), ("Geometry", "geometry"), (" Data Chart ", "data_chart"),
    ("datachart", "data_chart"), ("TIMELINE", "timeline"), ("bar chart", "other"), ("", "other"),
    ("map", "map"), ("table", "table"), ("diagram", "diagram"), ("other", "other"),
])
def test_parse_content_type(raw, want):
    assert parse_proposal(GOOD.replace(">data_chart<", f">{raw}<")).content_type == want
    assert want in CONTENT_TYPES


def test_parse_content_type_is_optional():
    text = GOOD.replace("<content_type>data_chart</content_type>", "")
    assert parse_proposal(text).content_type == "other"


def test_parse_squeezes_whitespace_around_tags():
    text = ("< caption >Share of A / B</ caption >\n<easy_question> x < 5 ? </easy_question>"
            "<easy_answer>1 / 2</easy_answer><hard_question>q</hard_question><hard_answer> 7 </ hard_answer >")
    p = parse_proposal(text)
    assert p.caption == "Share of A/B" and p.easy_question == "x<5 ?" and p.easy_answer == "1/2"
    assert p.hard_answer == "7"


def test_parse_empty_tags_and_first_occurrence():
    text = GOOD.replace("<easy_answer>Mon</easy_answer>", "<easy_answer></easy_answer>")
    assert parse_proposal(text).easy_answer == ""
    assert parse_proposal(GOOD + "<caption>second</caption>").caption == "A bar chart"
    assert parse_proposal("") is None and parse_proposal(None) is None
