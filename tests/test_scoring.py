"""Unit tests of answer extraction and scoring (pure functions, hand-checked values)."""

import pytest

from tasks.scoring import (
    cut_at_stops,
    explain_choice,
    explain_extraction,
    explain_gsm8k,
    extract_boxed,
    extract_choice,
    extract_choice_lenient,
    extract_gsm8k,
    math_equal,
    normalize_math_answer,
    numeric_equal,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("She pays 5*3=15 dollars.\n#### 15", "15"),
        ("#### 1,234", "1234"),
        ("so the answer is \\boxed{42}.", "42"),
        ("First 3 then 7 and finally 12.", "12"),
        ("The total is $-3.50.", "-3.50"),
        ("no numbers here", None),
    ],
)
def test_extract_gsm8k(text, want):
    assert extract_gsm8k(text) == want


def test_extract_boxed_nested_and_first_last():
    t = r"a \boxed{\frac{1}{2}} then \boxed{3}"
    assert extract_boxed(t) == "3"
    assert extract_boxed(t, which="first") == r"\frac{1}{2}"
    assert extract_boxed("nothing") is None
    assert extract_boxed(r"\boxed{unclosed") is None


def test_numeric_equal():
    assert numeric_equal("1,000", "1000")
    assert numeric_equal("3/4", "0.75")
    assert numeric_equal("$12", "12")
    assert numeric_equal("12.0", "12")
    assert not numeric_equal("12.5", "12")
    assert not numeric_equal(None, "1")
    assert not numeric_equal("abc", "1")
    assert parse_number("50%") == 50


@pytest.mark.parametrize(
    ("a", "b", "eq"),
    [
        (r"\dfrac{1}{2}", r"\frac12", True),
        ("0.5", r"\frac{1}{2}", True),
        (r"\left( 3, 4 \right)", "(3,4)", True),
        (r"10^\circ", "10", True),
        (r"5 \text{ cm}", "5", True),
        ("x = 7", "7", True),
        ("1/3", r"\frac{1}{3}", True),
        (r"\$4.00", "4", True),
        ("2", "3", False),
        (r"\frac{1}{3}", r"\frac{1}{4}", False),
    ],
)
def test_math_equal(a, b, eq):
    assert math_equal(a, b) is eq


def test_normalize_math_answer_idempotent():
    for s in [r"\frac{1}{2}", "(3,4)", "7", r"\sqrt{2}"]:
        n = normalize_math_answer(s)
        assert normalize_math_answer(n) == n


# --- multiple choice: strict by default (the scorer is also the RL reward) ------------------------------------


@pytest.mark.parametrize(
    ("text", "want", "rule"),
    [
        # right answers, written differently
        (r"so \boxed{C}", "C", "boxed"),
        (r"The answer is $\boxed{D}$.", "D", "boxed"),
        (r"\boxed{\text{(B)}}", "B", "boxed"),
        (r"\boxed{B) 42}", "B", "boxed"),
        ("The answer is (B).", "B", "answer_statement"),
        ("Answer: d", "D", "answer_statement"),
        ("**Answer:** C", "C", "answer_statement"),
        ("Final answer: (A)", "A", "answer_statement"),
        ("The correct option is C.", "C", "answer_statement"),
        ("Answer: C) 21", "C", "answer_statement"),
        ("The answer is A because the others are wrong.", "A", "answer_statement"),
        ("Answer: B, since 21 is odd.", "B", "answer_statement"),
        ("answer: B\nWait, no.\nAnswer: D", "D", "answer_statement"),  # the last statement counts
        ('The answer is: "D"', "D", "answer_statement"),  # SmolLM2 on `choice`
        ("The correct answer is: Eagle (C).", "C", "answer_statement"),  # the option's text, then its letter
        ("E", "E", "bare_letter"),
        ("(C)", "C", "bare_letter"),
        ("  c.  ", "C", "bare_letter"),
        # wrong answers that look right
        ("A. Paris\nB. London\nC. Rome\nD. Berlin", None, None),  # echoes the options
        ("A)21\nB)22\nC)23\nD)24\nE)25", None, None),  # AQuA's option layout echoed
        ("A = 5, so x = 10.", None, None),
        ("A man walks into a bar.", None, None),
        ("the answer is a prime number", None, None),  # the article, not option A
        ("I think it's C because", None, None),  # no statement
        ("A) 21 is right", None, None),
        ("Mexico (A)\nrocket (B)\nGuava (C)", None, None),  # SmolLM2 on `choice`: echoed options
        ("A. France (C)\nB. England (D)", None, None),
        ("The answer is: lemon", None, None),
        ("The answer is A or B", None, None),  # hedges are no answer (else an RL policy learns to list letters)
        ("The answer is: the eagle (C) or the hawk (D).", None, None),
        ("Answer: A/B", None, None),
        (r"\boxed{A, B}", None, None),
        ("The answer is 42.", None, None),
        ("none", None, None),
        ("", None, None),
    ],
)
def test_explain_choice_strict(text, want, rule):
    assert explain_choice(text) == (want, rule)
    assert extract_choice(text) == want
    assert explain_extraction("choice", text) == (want, rule)


@pytest.mark.parametrize(
    ("text", "want"),
    [("A) 21 is right", "A"), ("I think it's C because", "C"), ("A. Paris\nB. London", "A"), (r"so \boxed{C}", "C")],
)
def test_choice_lenient_keeps_the_old_cascade(text, want):
    assert extract_choice_lenient(text) == want
    assert explain_extraction("choice_lenient", text)[0] == want


def test_choice_letters_outside_the_options_are_no_answer():
    assert extract_choice("Answer: F") is None
    assert extract_choice("Answer: D", letters="ABC") is None


def test_gsm8k_rules_and_single_rule_filters():
    assert explain_gsm8k("so\n#### 1,234") == ("1234", "####")
    assert explain_gsm8k(r"2+3 = 5, \boxed{5} then 7") == ("5", "boxed")
    assert explain_gsm8k("3 then 7") == ("7", "last_number")
    assert explain_gsm8k("no numbers") == (None, None)
    assert explain_extraction("boxed", r"\boxed{x}") == ("x", "boxed")
    assert explain_extraction("boxed", "nothing") == (None, None)


def test_cut_at_stops():
    assert cut_at_stops("a \\boxed{1}\nQuestion: b \\boxed{2}", ["Question:"]) == "a \\boxed{1}\n"
    assert cut_at_stops("x END y STOP", ["STOP", "END"]) == "x "  # the earliest stop, whichever is listed first
    assert cut_at_stops("untouched", []) == "untouched"
