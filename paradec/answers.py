"""Final-answer extraction (GSM8K's ``#### N``, LaTeX ``\\boxed{...}``, the last number) and the
rules that decide whether an extracted answer equals the gold one."""

from __future__ import annotations

import re

_GSM8K = re.compile(r"####\s*\$?\s*([-+]?[\d,]*\.?\d+)")


def extract_gsm8k(text: str) -> str | None:
    """The number after the last ``####``, commas removed; None when there is none."""
    found = _GSM8K.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces kept whole); None when absent
    or unbalanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """``#### N`` if present, else the last ``\\boxed{}``, else None."""
    answer = extract_gsm8k(text)
    return answer if answer is not None else extract_boxed(text)


# --- Normalisation and equivalence -------------------------------------------------------------
#
# Numbers (GSM8K, the synthetic task): ``normalize_number`` drops a leading ``$``, thousands
# commas, outer spaces, a trailing ``%``, unit words after the number and a space ("18 dollars",
# "5 cm"; a single letter as in "2 x" is a variable, not a unit) and a trailing ``.``; the rest
# must parse as a decimal or a fraction ``a/b``; equal when equal as exact rationals: "18",
# "18.0", "$18" and "18 dollars" are all 18, "3/4" is "0.75"; a comma is a thousands separator
# only before three digits, so "1,8" is not a number.
#
# MATH-500 (``math_equal``): both sides go through ``normalize_math`` and are equal when the
# strings match, or when both are numbers by the rule above and equal as rationals. The string
# rule: drop ``\left``/``\right``, spacing commands (``\!``, ``\,``, ``\;``, ``\:``, ``~``),
# ``\$``, ``$``, ``\%``, ``%``, degree marks (``^\circ``, ``^{\circ}``), a trailing ``.``,
# ``\text{...}`` around a whole answer and unit words after a number; ``\dfrac``/``\tfrac`` →
# ``\frac``; ``\frac12`` → ``\frac{1}{2}``; ``\sqrt2`` → ``\sqrt{2}``; a leading ``x =`` when the
# left side is one letter; an integer fraction ``a/b`` → ``\frac{a}{b}``; ``.5`` → ``0.5``;
# all whitespace removed. It is deliberately a string rule: symbolic equivalence (``2\sqrt{2}``
# against ``\sqrt{8}``) is not attempted and counts as wrong.

from fractions import Fraction  # noqa: E402

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(\D|$))")
_UNIT_AFTER_NUMBER = re.compile(r"^([-+]?[\d.,/]+)\s+(?:[A-Za-z]{2,}[A-Za-z.\s]*)$")  # "18 dollars", not "2x"


def normalize_number(text: str | None) -> Fraction | None:
    """The exact value of a numeric answer, None when the text is not a number by the rule above."""
    if text is None:
        return None
    s = text.strip().replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").strip()
    s = _THOUSANDS.sub("", s)
    unit = _UNIT_AFTER_NUMBER.match(s)
    s = unit.group(1) if unit else s
    s = s.rstrip(".").strip()  # inner spaces stay: "2 1/2" and "3 4" are not numbers
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(predicted: str | None, gold: str | None) -> bool:
    a, b = normalize_number(predicted), normalize_number(gold)
    return a is not None and a == b


_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{(.*)\}$")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF_SHORT = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")
_LHS = re.compile(r"^[A-Za-z]\s*=\s*")
_INT_FRAC = re.compile(r"^(-?\d+)/(\d+)$")
_LEADING_POINT = re.compile(r"(?<![\d}])\.(\d)")
_TEXT_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z\s.]*\}$")


def normalize_math(text: str | None) -> str | None:
    """A MATH answer in the normal form the rule above describes; None for None."""
    if text is None:
        return None
    s = text.strip()
    for old in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "~", "\\$", "$", "\\%", "%",
                "^{\\circ}", "^\\circ", "\\displaystyle"):
        s = s.replace(old, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.strip().rstrip(".").strip()
    wrapped = _TEXT_WRAP.match(s)
    s = wrapped.group(1).strip() if wrapped else s
    s = _TEXT_UNIT.sub("", s).strip() if re.match(r"^[-\d.,]+\s*\\", s) else s
    unit = _UNIT_AFTER_NUMBER.match(s)
    s = unit.group(1) if unit else s
    s = _LHS.sub("", s) if s.count("=") == 1 else s
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    fraction = _INT_FRAC.match(s.replace(" ", ""))
    s = f"\\frac{{{fraction.group(1)}}}{{{fraction.group(2)}}}" if fraction else s
    s = _LEADING_POINT.sub(r"0.\1", s)
    return re.sub(r"\s+", "", s)


def math_equal(predicted: str | None, gold: str | None) -> bool:
    """MATH-500 equivalence by the rule above."""
    a, b = normalize_math(predicted), normalize_math(gold)
    if a is None or b is None or not a:
        return False
    return a == b or numbers_equal(_frac_as_number(a), _frac_as_number(b))


def _frac_as_number(s: str) -> str:
    """``\\frac{a}{b}`` of integers as ``a/b`` (so that it compares with ``0.5``), else s."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", s)
    return f"{m.group(1)}{m.group(2)}/{m.group(3)}" if m else s


_LAST_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def extract_last_number(text: str) -> str | None:
    """The last number in the text (commas and ``$`` dropped): lm-eval's "flexible" GSM8K rule."""
    found = _LAST_NUMBER.findall(text)
    return found[-1].replace(",", "").replace("$", "").rstrip(".") if found else None
