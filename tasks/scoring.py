"""Answer extraction and scoring: small pure functions over strings.

Every scorer returns a float in [0, 1]; the same number is the RL reward, so an extractor must not reward text
that only looks like an answer. Extraction returns ``None`` when a completion holds no answer of the expected shape
(scored 0). Filters are looked up by name (``FILTERS``) from the task definitions; a filter that can say which of its
rules matched also has an entry in ``FILTER_RULES`` (stored with every evaluated sample). To add a filter, add a
function ``text -> answer | None`` to ``FILTERS`` (and, optionally, ``text -> (answer, rule)`` to ``FILTER_RULES``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
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


def explain_gsm8k(text: str) -> tuple[str | None, str | None]:
    """``extract_gsm8k`` and the rule that matched: ``####``, ``boxed`` or ``last_number``."""
    if "####" in text:
        num = extract_last_number(text.split("####", 1)[1].split("\n")[0])
        if num is not None:
            return num, "####"
    boxed = extract_boxed(text)
    if boxed is not None:
        num = extract_last_number(boxed)
        return (num if num is not None else boxed), "boxed"
    num = extract_last_number(text)
    return num, ("last_number" if num is not None else None)


def extract_gsm8k(text: str) -> str | None:
    r"""GSM8K: the number after ``####``; else the number in the last ``\boxed{}``; else the last number in the text.

    Compared with ``numeric_equal`` (exact fractions, relative tolerance 1e-6 after dropping ``,``, ``$``, ``%``),
    which differs from the two usual references:

    - lm-eval's ``gsm8k`` (v3, ``exact_match``): its ``strict-match`` filter takes only ``#### <number>``, its
      ``flexible-extract`` the last number-like string (``-?[$0-9.,]{2,}|-?[0-9]+``); then the *strings* are compared
      after deleting ``,``, ``$``, everything up to ``#### `` and one trailing ``.``. So ``12.0`` or ``12.50`` vs gold
      ``12`` / ``12.5`` are wrong there and right here, and so are ``3/4`` vs ``0.75`` and ``50%`` vs ``50``.
      lm-eval looks at no ``\boxed{}`` (we prefer the box to the last number, so a number written after the box
      does not count). It cuts the generation at ``until: ["Question:", "</s>", "<|im_end|>"]``; we cut at the
      task's ``until`` (``gsm8k.yaml``) and stop on the model's own end-of-turn and EOS tokens.
    - The MemGen public code scores the *first* ``\boxed{}`` of the completion, MATH-style normalised, against the
      answer as strings. We take the *last* box (a model that corrects itself is scored on its final answer), fall
      back to ``####`` and then the last number when there is no box (MemGen scores those 0), and compare numbers,
      not strings (``1,000`` / ``1000.0`` vs ``1000``). The first-box rule is the ``boxed_first`` filter.
    """
    return explain_gsm8k(text)[0]


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


def _fix_sqrt(s: str) -> str:
    r"""``\sqrt2`` -> ``\sqrt{2}``, ``\sqrt x`` -> ``\sqrt{x}`` (one character without braces is the argument)."""
    return re.sub(r"\\sqrt\s*([^{\s\\[])", r"\\sqrt{\1}", s)


def normalize_math_answer(ans: str | None) -> str | None:
    r"""Canonical string form of a MATH answer: strips ``\left``/``\right``, spacing, ``\text{units}``, dollar
    signs, degree marks, a leading ``x =``, turns ``dfrac``/``tfrac`` into ``frac``, ``a/b`` into ``\frac{a}{b}``,
    ``\sqrt2`` into ``\sqrt{2}``, ``0.5`` keeps its leading zero (``.5`` gains one) and drops trailing ``.0``."""
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
    s = _fix_sqrt(_fix_fracs(s))
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


def math_equal(pred: str | None, gold: str, timeout_s: float | None = None) -> bool:
    r"""MATH answers: equal after the string normalisation above (the fast path) or as numbers, else symbolically
    equal by math-verify (``0.25`` = ``\frac14``, ``2\sqrt2`` = ``\sqrt8``, ``\{1,2\}`` = ``\{2,1\}``,
    ``x^2+2x+1`` = ``(x+1)^2``), which gives up after ``timeout_s`` seconds (default
    ``tasks.math_equivalence.DEFAULT_TIMEOUT_S``) in any thread and then says not equal."""
    from tasks.math_equivalence import DEFAULT_TIMEOUT_S, equivalent

    p, g = normalize_math_answer(pred), normalize_math_answer(gold)
    if pred is None or not p or not g:
        return False
    if p == g:
        return True
    if parse_number(p) is not None and parse_number(g) is not None:
        return numeric_equal(p, g)
    return equivalent(pred, gold, DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)


# --- multiple choice -------------------------------------------------------------------------------------------
# Strict by default: a letter counts only where the completion says it is the answer. The lenient cascade (the
# first standalone capital letter, a leading "C)") takes echoed option lists ("A. ...\nB. ...") and sentences that
# start with the article "A" for answers: on GPQA most of SmolLM2's "answers" came from such echoes. The scorer is
# also the RL reward, so a hedge ("A or B", "\boxed{A, B}") is no answer either.

_HEDGE = re.compile(r"\s*(?:,|/|\bor\b|\band\b)\s*\(?[A-H]\b", flags=re.IGNORECASE)


def _boxed_letter(text: str, letters: str) -> str | None:
    r"""The letter of the last ``\boxed{}`` when the box holds just a letter (``C``, ``(C)``, ``\text{C}``, ``C.``)
    or a letter and then its option (``C) 21``, ``C. Paris``)."""
    boxed = extract_boxed(text)
    if boxed is None:
        return None
    inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", boxed).strip()
    m = re.fullmatch(rf"\(?\s*([{letters}])\s*\)?\s*[.:]?", inner) or re.match(
        rf"\(?([{letters}])(?:\)|\.|:)\s+\S", inner)
    return m.group(1) if m else None


_STATEMENT = re.compile(
    r"(?:\banswer\b|\b(?:correct|right|best|final)\s+(?:option|choice)\b)[*_\s]*"
    r"(?:is|would\s+be|will\s+be|should\s+be|:|=)[*_\s:]*(?:option\s+|choice\s+)?"
    r"(\(\s*[A-Za-z]\s*\)|\[\s*[A-Za-z]\s*\]|\$?\\boxed\{\s*[A-Za-z]\s*\}\$?|[\"'“‘`]\s*[A-Za-z]\s*[\"'”’`]"
    r"|[A-Za-z](?![\w'=])"
    # the option's text and then its letter, closing the sentence: "The correct answer is: Eagle (C)."
    r"|[^\n()]{1,80}?\(\s*[A-Za-z]\s*\)(?=[ \t]*[.!]?[ \t]*(?:\n|$)))",
    flags=re.IGNORECASE,
)


def _stated_letter(text: str, letters: str) -> str | None:
    """The letter of the last 'answer is X' / 'Answer: "X"' / 'the correct option is (X)' / 'the answer is: <option
    text> (X).' statement. A lower-case bare letter counts only when nothing follows it on its line ('the answer is
    a prime' holds an article); 'X = ...' and 'X or Y' are no answers."""
    found = None
    for m in _STATEMENT.finditer(text):
        raw, rest = m.group(1), text[m.end():]
        if raw.endswith(")"):  # "(C)" or "Eagle (C)"
            raw = raw[raw.rindex("(") :]
        letter = re.sub(r"boxed|[^A-Za-z]", "", raw).upper()
        if letter not in letters or re.match(r"\s*=", rest) or _HEDGE.match(rest):
            continue
        if len(raw) == 1 and raw.islower() and not re.match(r"[ \t]*[.!)]?[ \t]*(?:\n|$)", rest):
            continue
        found = letter
    return found


def _bare_letter(text: str, letters: str) -> str | None:
    """The letter when the whole reply is one letter, optionally bracketed, in bold or with a full stop."""
    m = re.fullmatch(rf"[\s*_]*[(\[]?\s*([{letters}])\s*[)\]]?[.:]?[\s*_]*", text, flags=re.IGNORECASE)
    return m.group(1).upper() if m else None


def explain_choice(text: str, letters: str = "ABCDE") -> tuple[str | None, str | None]:
    r"""Strict option-letter extraction and the rule that matched: ``boxed`` (``\boxed{C}``), ``answer_statement``
    ('The answer is (C)', 'Answer: C', 'the correct option is C') or ``bare_letter`` (the reply is just 'C', '(C)'
    or 'C.'); ``(None, None)`` otherwise, e.g. for a completion that only echoes the options or starts with
    'A = ...' or the article 'A'."""
    for rule, find in (("boxed", _boxed_letter), ("answer_statement", _stated_letter), ("bare_letter", _bare_letter)):
        letter = find(text, letters)
        if letter is not None:
            return letter, rule
    return None, None


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The option letter by the strict rules of ``explain_choice`` (the ``choice`` filter)."""
    return explain_choice(text, letters)[0]


def explain_choice_lenient(text: str, letters: str = "ABCDE") -> tuple[str | None, str | None]:
    r"""The earlier cascade (filter ``choice_lenient``; the ``choice`` filter of aqua/gpqa/arc_challenge v1 and
    choice v2): ``\boxed{}``, 'answer is (C)', 'Answer: C', a leading 'C)' or 'C.', a one-letter reply, '(C)', else
    the first standalone capital among ``letters`` (which also takes echoed options and the article 'A')."""
    cls = f"[{letters}]"
    boxed = extract_boxed(text)
    if boxed:
        m = re.search(rf"\b({cls})\b", boxed)
        if m:
            return m.group(1), "boxed"
    patterns = [
        ("answer_statement", rf"answer\s*(?:is|:)?\s*:?\s*\(?({cls})\b"),
        ("leading_letter", rf"^\s*\(?({cls})[).:\s]"),
        ("bare_letter", rf"^\s*({cls})\s*$"),
        ("parenthesised", rf"\(({cls})\)"),
        ("any_letter", rf"\b({cls})\b"),
    ]
    for rule, pat in patterns:
        m = re.search(pat, text, flags=re.IGNORECASE | re.MULTILINE if "answer" in pat else re.MULTILINE)
        if m:
            return m.group(1).upper(), rule
    return None, None


def extract_choice_lenient(text: str, letters: str = "ABCDE") -> str | None:
    """The option letter by the lenient cascade of ``explain_choice_lenient`` (the ``choice_lenient`` filter)."""
    return explain_choice_lenient(text, letters)[0]


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


_STATED = re.compile(r"\bis\s+(.+)", flags=re.I)


def extract_stated(text: str) -> str | None:
    """The answer after the last 'Answer:' marker, else the value a one-sentence reply states with its first
    " is " ('The capital city of France is Paris.' -> 'Paris'), cut at the first , . ; ! ? or newline: for
    short factual probes whose small-model replies are full sentences. Stricter than a substring match: 'Paris'
    must be the whole stated value."""
    m = list(re.finditer(r"answer\s*:\s*(.+)", text, flags=re.I))
    if m:
        value = m[-1].group(1)
    else:
        line = extract_first_line(text)
        if line is None:
            return None
        s = _STATED.search(line)
        value = s.group(1) if s else line
    return re.split(r"[,.;!?\n]", value.strip(), maxsplit=1)[0].strip() or None


# Registries by name, so task definitions (YAML) can name their filter and metric without code.
FILTERS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
    "boxed_first": lambda t: extract_boxed(t, which="first"),
    "last_number": extract_last_number,
    "choice": extract_choice,
    "choice_lenient": extract_choice_lenient,
    "first_line": extract_first_line,
    "answer_line": extract_answer_line,
    "stated": extract_stated,
}

# Filters that also name the rule that matched (stored with each evaluated sample as ``extract_rule``).
FILTER_RULES: dict[str, Callable[[str], tuple[str | None, str | None]]] = {
    "gsm8k": explain_gsm8k,
    "choice": explain_choice,
    "choice_lenient": explain_choice_lenient,
}


def explain_extraction(filter_name: str, text: str) -> tuple[str | None, str | None]:
    """The answer ``FILTERS[filter_name]`` extracts and the name of the rule that found it (the filter's name for
    filters with a single rule; None when nothing was found)."""
    if filter_name in FILTER_RULES:
        return FILTER_RULES[filter_name](text)
    answer = FILTERS[filter_name](text)
    return answer, (filter_name if answer is not None else None)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of the stop strings ``until``, as lm-eval's ``until``."""
    cut = min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]

METRICS: dict[str, Callable[[str | None, str], bool]] = {
    "numeric": numeric_equal,
    "math": math_equal,
    # The MemGen public code's GSM8K rule: MATH-style string normalisation only (no numeric or symbolic equivalence).
    "math_string": lambda p, g: p is not None and normalize_math_answer(p) == normalize_math_answer(g),
    "exact": lambda p, g: normalize_text(p) == normalize_text(g),
    "choice": lambda p, g: p is not None and p.strip().upper() == g.strip().upper(),
}
