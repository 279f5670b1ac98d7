"""Answer extraction and the Questioner parser (vzero_fast/answers.py): edge cases and rejections."""

import pytest

from vzero_fast.answers import Question, extract_boxed, extract_choice, normalize_choice, parse_question


@pytest.mark.parametrize("text, want", [
    (r"so \boxed{B}", "B"),
    (r"\boxed{A} then \boxed{C}", "C"),                      # the last box wins
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),                # nested braces kept
    (r"\boxed{{A}}", "{A}"),
    (r"\boxed{\text{B}}", "B"),                              # \text unwrapped
    (r"\boxed{\text{(c)}.}", "(c)."),
    (r"\boxed{\textbf{D}}", "D"),
    (r"\boxed {  A  }", "A"),                                 # space before the brace, content stripped
    (r"\boxed{\boxed{A}}", "A"),                              # the last \boxed is the inner one
    (r"\boxed{}", ""),
    (r"no box here", None),
    ("", None),
    (None, None),
    (r"\boxed{A", None),                                      # unclosed
    (r"\boxed{A} and then \boxed{B", None),                   # the LAST one is unclosed: no fallback
    (r"\boxed{\frac{1}{2}", None),
    (r"\boxedA", None),
])
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


@pytest.mark.parametrize("content, want", [
    ("A", "A"), ("b", "B"), (" c ", "C"), ("(D)", "D"), ("( a )", "A"), ("[b]", "B"), ("B.", "B"),
    ("C)", "C"), ("(d).", "D"), (r"\text{A}", "A"),
    ("E", None), ("AB", None), ("42", None), ("Option A", None), ("A or B", None), ("", None), ("()", None),
    ("A..", None), ("((A))", None),
])
def test_extract_choice_normalisation(content, want):
    assert extract_choice(rf"<think>x</think> \boxed{{{content}}}") == want
    assert normalize_choice(content.replace(r"\text{A}", "A")) == want


def test_extract_choice_without_box():
    assert extract_choice("The answer is A.") is None
    assert extract_choice(r"\boxed{A") is None


GOOD = ("<description>A bar chart with 4 bars.</description> <question>Which bar is the tallest? "
        "A) Mon B) Tue C) Wed D) Thu</question> <answer>C</answer>")


def test_parse_good_question():
    q = parse_question(GOOD)
    assert q == Question(description="A bar chart with 4 bars.", question="Which bar is the tallest?",
                         options={"A": "Mon", "B": "Tue", "C": "Wed", "D": "Thu"}, answer="C")
    assert q.solver_text() == "Which bar is the tallest?\nA) Mon\nB) Tue\nC) Wed\nD) Thu"


@pytest.mark.parametrize("answer, want", [("c", "C"), (" (B) ", "B"), ("D.", "D"), ("A)", "A")])
def test_parse_normalises_the_answer(answer, want):
    assert parse_question(GOOD.replace("<answer>C</answer>", f"<answer>{answer}</answer>")).answer == want


def test_parse_multiline_and_out_of_order_options():
    text = ("<description>\nA clock.\n</description>\n<question>What time is it?\nB) 3\nA) 2\nC) 4\nD) 5\n"
            "</question>\n<answer>A</answer>")
    q = parse_question(text)
    assert q is not None and q.options == {"A": "2", "B": "3", "C": "4", "D": "5"}
    assert q.question == "What time is it?" and q.description == "A clock."


@pytest.mark.parametrize("bad", [
    GOOD.replace(" D) Thu", ""),                                              # a missing option
    GOOD.replace("B) Tue", "B Tue"),                                          # a label without ")"
    GOOD.replace("C) Wed", "XC) Wed"),                                        # "XC)" is no label
    GOOD.replace("<description>", "").replace("</description>", ""),          # a missing tag
    GOOD.replace("</question>", ""),                                          # an unclosed tag
    GOOD.replace("<answer>C</answer>", ""),                                   # no answer
    GOOD.replace("<answer>C</answer>", "<answer>E</answer>"),                 # not one of the letters
    GOOD.replace("<answer>C</answer>", "<answer>42</answer>"),                # not a letter
    GOOD.replace("<answer>C</answer>", "<answer></answer>"),                  # empty a_fast
    GOOD.replace("<answer>C</answer>", "<answer>C or D</answer>"),
    "", None,
])
def test_parse_rejections(bad):
    assert parse_question(bad) is None
