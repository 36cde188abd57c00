"""Unit tests of answer extraction and scoring (pure functions, hand-checked values)."""

import pytest

from tasks.scoring import (
    extract_boxed,
    extract_choice,
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


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (r"so \boxed{C}", "C"),
        ("The answer is (B).", "B"),
        ("Answer: d", "D"),
        ("A) 21 is right", "A"),
        ("E", "E"),
        ("I think it's C because", "C"),
        ("none", None),
    ],
)
def test_extract_choice(text, want):
    assert extract_choice(text) == want
