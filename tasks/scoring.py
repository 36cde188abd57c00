"""Answer extraction and scoring: small pure functions over strings.

Every scorer returns a float in [0, 1]; the same number is the RL reward. Extraction returns ``None`` when a
completion holds no answer of the expected shape (scored 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_boxed(text: str, which: str = "last") -> str | None:
    r"""Content of the first or last ``\boxed{...}`` (or ``\fbox{...}``), nested braces handled."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    contents = []
    for start in starts:
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            contents.append(text[start : i - 1].strip())
    if not contents:
        return None
    return contents[0] if which == "first" else contents[-1]


def extract_last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def extract_gsm8k(text: str) -> str | None:
    r"""GSM8K: the number after ``####``; else the last ``\boxed{}``; else the last number in the text."""
    if "####" in text:
        num = extract_last_number(text.split("####", 1)[1].split("\n")[0])
        if num is not None:
            return num
    boxed = extract_boxed(text)
    if boxed is not None:
        num = extract_last_number(boxed)
        return num if num is not None else boxed
    return extract_last_number(text)


def parse_number(text: str | None) -> Fraction | None:
    """Parse '1,234', '-3.50', '3/4', '$12' or '50%' into an exact Fraction; None if it is no number."""
    if text is None:
        return None
    t = text.strip().replace(",", "").replace("$", "").replace("\\%", "").rstrip("%").strip()
    t = t.rstrip(".")
    m = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", t)
    try:
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def numeric_equal(pred: str | None, gold: str) -> bool:
    p, g = parse_number(pred), parse_number(gold)
    if p is None or g is None:
        return False
    return abs(float(p) - float(g)) <= 1e-6 * max(1.0, abs(float(g)))


# --- MATH answer normalisation (the usual Hendrycks-style string canonicalisation) ---------------------------

_UNIT_WORDS = r"(?:degrees?|cm|m|km|inches|inch|feet|foot|units?|sq\.?|square|meters?|dollars?|cents?|hours?|minutes?|seconds?)"


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{x}`` -> ``\frac{1}{x}``."""
    out, i = "", 0
    while i < len(s):
        if s.startswith("\\frac", i):
            out += "\\frac"
            i += 5
            for _ in range(2):
                if i < len(s) and s[i] == "{":
                    depth, j = 1, i + 1
                    while j < len(s) and depth:
                        depth += {"{": 1, "}": -1}.get(s[j], 0)
                        j += 1
                    out += s[i:j]
                    i = j
                elif i < len(s):
                    out += "{" + s[i] + "}"
                    i += 1
        else:
            out += s[i]
            i += 1
    return out


def normalize_math_answer(ans: str | None) -> str | None:
    r"""Canonical string form of a MATH answer: strips ``\left``/``\right``, spacing, ``\text{units}``, dollar
    signs, degree marks, a leading ``x =``, turns ``dfrac``/``tfrac`` into ``frac``, ``a/b`` into ``\frac{a}{b}``,
    ``0.5`` keeps its leading zero (``.5`` gains one) and drops trailing ``.0``."""
    if ans is None:
        return None
    s = ans.strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\text\{\s*" + _UNIT_WORDS + r"\s*\}", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+" + _UNIT_WORDS + r"$", "", s)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" -> "5" (only a short left-hand side, so equations stay equations)
    if "=" in s and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[-1]
    s = _fix_fracs(s)
    s = s.replace(" ", "")
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)
    s = s.replace(",\\!", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def math_equal(pred: str | None, gold: str) -> bool:
    """Equal after MATH normalisation, or numerically equal when both parse as numbers."""
    p, g = normalize_math_answer(pred), normalize_math_answer(gold)
    if p is None or g is None:
        return False
    if p == g:
        return True
    return numeric_equal(p, g) if parse_number(p) is not None and parse_number(g) is not None else False


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    r"""The chosen option letter: ``\boxed{C}``, 'answer is (C)', 'Answer: C', a leading 'C)' or 'C.', else the
    first standalone capital letter among ``letters``."""
    cls = f"[{letters}]"
    boxed = extract_boxed(text)
    if boxed:
        m = re.search(rf"\b({cls})\b", boxed)
        if m:
            return m.group(1)
    patterns = [
        rf"answer\s*(?:is|:)?\s*:?\s*\(?({cls})\b",
        rf"^\s*\(?({cls})[).:\s]",
        rf"^\s*({cls})\s*$",
        rf"\(({cls})\)",
        rf"\b({cls})\b",
    ]
    for pat in patterns:
        m = re.search(pat, text, flags=re.IGNORECASE | re.MULTILINE if "answer" in pat else re.MULTILINE)
        if m:
            return m.group(1).upper()
    return None


def normalize_text(text: str | None) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation: for exact-match answers."""
    if text is None:
        return ""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:'\"`")


def extract_first_line(text: str) -> str | None:
    """First non-empty line, with a leading 'Answer:' removed: for short free-form answers."""
    for line in text.strip().splitlines():
        line = line.strip()
        if line:
            return re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*:?\s*", "", line, flags=re.I)
    return None


def extract_answer_line(text: str) -> str | None:
    """The text after the last 'Answer:' marker if there is one, else the first non-empty line."""
    m = list(re.finditer(r"answer\s*:\s*(.+)", text, flags=re.I))
    if m:
        return m[-1].group(1).strip()
    return extract_first_line(text)


# Registries by name, so task definitions (YAML) can name their filter and metric without code.
FILTERS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
    "boxed_first": lambda t: extract_boxed(t, which="first"),
    "last_number": extract_last_number,
    "choice": extract_choice,
    "first_line": extract_first_line,
    "answer_line": extract_answer_line,
}

METRICS: dict[str, Callable[[str | None, str], bool]] = {
    "numeric": numeric_equal,
    "math": math_equal,
    "exact": lambda p, g: normalize_text(p) == normalize_text(g),
    "choice": lambda p, g: p is not None and p.strip().upper() == g.strip().upper(),
}
