"""Answer extraction on hand-written cases and the real GSM8K answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paradec.answers import extract_answer, extract_boxed, extract_gsm8k

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("#### -5.5 dollars", "-5.5"),
        ("#### $18", "18"),
        ("first #### 3 then #### 4", "4"),
        ("no answer here", None),
    ],
)
def test_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"the answer is \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{1} and later \boxed{ x^{2} }", "x^{2}"),
        (r"\boxed{unclosed", None),
        ("nothing", None),
    ],
)
def test_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_gsm8k_wins_over_boxed():
    assert extract_answer(r"\boxed{3} #### 4") == "4"
    assert extract_answer(r"\boxed{3}") == "3"


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data not beside the checkout")
def test_real_gsm8k_answers_all_extract():
    lines = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
    assert len(lines) > 1000
    for row in lines:
        final = row["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_gsm8k(row["answer"]) == final, row["answer"][-60:]
