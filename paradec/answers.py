"""Final-answer extraction: GSM8K's ``#### N`` and LaTeX ``\\boxed{...}``."""

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
