"""Answer extraction on hand-written cases and the real GSM8K answers."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from paradec.answers import (
    extract_answer,
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    math_equal,
    normalize_math,
    normalize_number,
    numbers_equal,
)
from paradec.eval.tasks import TASKS, DataError, load_examples

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
# The first 40 lines of GSM8K's test split (MIT, OpenAI: tests/data/GSM8K_LICENSE), so that the
# real-data checks below run in CI too, where the shared data is not beside the checkout.
GSM8K_SAMPLE = Path(__file__).resolve().parent / "data" / "gsm8k_sample.jsonl"


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


# --- normalize_number / numbers_equal -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("18", Fraction(18)),
        ("18.0", Fraction(18)),
        ("18.", Fraction(18)),  # a trailing full stop
        ("$18", Fraction(18)),
        ("$1,000", Fraction(1000)),
        ("1,000,000", Fraction(1_000_000)),
        ("12,345.6", Fraction("12345.6")),
        ("18 dollars", Fraction(18)),
        ("5 cm", Fraction(5)),
        ("5%", Fraction(5)),
        ("3/4", Fraction(3, 4)),
        ("-3", Fraction(-3)),
        ("-3.00", Fraction(-3)),
        (".5", Fraction(1, 2)),
        ("1,8", None),  # a comma is a thousands separator only before three digits
        ("1,0000", None),
        ("1/0", None),
        ("abc", None),
        ("", None),
        ("eighteen", None),
        ("x = 5", None),
        (None, None),
    ],
)
def test_normalize_number(text, value):
    assert normalize_number(text) == value


@pytest.mark.parametrize(
    "predicted, gold, equal",
    [
        ("18", "18.0", True),
        ("$1,000", "1000", True),
        ("1,000,000", "1000000", True),
        ("18 dollars", "18", True),
        ("5%", "5", True),
        ("3/4", "0.75", True),
        ("-3", "-3.00", True),
        ("-3", "3", False),
        ("1,8", "18", False),
        ("1,8", "1.8", False),
        ("abc", "abc", False),  # equal strings, but not numbers
        ("", "", False),
        (None, "18", False),
        ("18", None, False),
        (None, None, False),
    ],
)
def test_numbers_equal(predicted, gold, equal):
    assert numbers_equal(predicted, gold) is equal
    assert numbers_equal(gold, predicted) is equal  # symmetric


# --- math_equal ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "predicted, gold, equal",
    [
        (r"\dfrac{1}{2}", r"\frac{1}{2}", True),
        (r"\tfrac{3}{4}", r"\frac{3}{4}", True),
        (r"\frac12", r"\frac{1}{2}", True),
        (r"\frac{1}2", r"\frac{1}{2}", True),
        (r"\sqrt2", r"\sqrt{2}", True),
        ("x = 5", "5", True),
        (r"\left( 1, 2 \right)", "(1,2)", True),
        (r"90^\circ", "90", True),
        (r"90^{\circ}", "90", True),
        (r"\text{(C)}", "(C)", True),
        (r"\textbf{(C)}", r"\text{(C)}", True),
        ("1/2", r"\frac{1}{2}", True),
        (r"10\text{ cm}", "10", True),
        (".5", "0.5", True),
        ("0.5", r"\frac{1}{2}", True),  # both numbers: compared as rationals
        (r"\frac{2}{4}", r"\frac{1}{2}", True),
        (r"\$5.00", "5", True),
        (r"50\%", "50", True),
        ("(1, 2)", "(2, 1)", False),
        (r"\frac{1}{3}", "0.33", False),
        (r"2\sqrt{2}", r"\sqrt{8}", False),  # by design: a string rule, no symbolic equivalence
        ("", "5", False),  # an empty prediction is never right
        ("", "", False),
        (None, "5", False),
        ("5", None, False),
    ],
)
def test_math_equal(predicted, gold, equal):
    assert math_equal(predicted, gold) is equal


@pytest.mark.parametrize(
    "text, normal",
    [
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"\left[ 0, 1 \right)", "[0,1)"),
        (r"\text{(C)}", "(C)"),
        ("3.", "3"),
        (".5", "0.5"),
        (None, None),
    ],
)
def test_normalize_math(text, normal):
    assert normalize_math(text) == normal


@pytest.mark.parametrize("predicted, gold", [("2", "2x"), ("3a", "3b")])
def test_math_equal_keeps_a_variable_after_a_number(predicted, gold):
    assert not math_equal(predicted, gold)


# --- extract_last_number ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", "42"),
        ("3 + 4 = 7", "7"),
        ("it costs $1,234.50 in total", "1234.50"),
        ("from 5 down to -7", "-7"),
        ("about .5 of it", ".5"),
        ("2.5 then 3", "3"),
        ("no numbers at all", None),
        ("", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


# --- Task.grade ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, text, gold, answer, correct, flexible, flexible_correct",
    [
        # gsm8k: strict is '#### N' (else \boxed{}); flexible falls back to the last number
        ("gsm8k", "3 + 4 = 7\n#### 7", "7", "7", True, "7", True),
        ("gsm8k", "#### 1,000", "1000", "1000", True, "1000", True),
        ("gsm8k", "#### 18.00", "18", "18.00", True, "18.00", True),
        ("gsm8k", "so she has 7 apples", "7", None, False, "7", True),
        ("gsm8k", "so she has 8 apples", "7", None, False, "8", False),
        ("gsm8k", r"the answer is \boxed{7}", "7", "7", True, "7", True),
        ("gsm8k", r"\boxed{3} #### 4", "4", "4", True, "4", True),  # '####' before \boxed{}
        # a strict answer that is wrong is not rescued by the last number
        ("gsm8k", "#### 8 ... or rather 7", "7", "8", False, "8", False),
        ("gsm8k", "I do not know", "7", None, False, None, False),
        # math500: \boxed{} first; no flexible fallback
        ("math500", r"so \boxed{\dfrac{1}{2}}.", r"\frac12", r"\dfrac{1}{2}", True, r"\dfrac{1}{2}", True),
        ("math500", r"\boxed{3} #### 4", "3", "3", True, "3", True),
        ("math500", "the answer is 1/2", r"\frac{1}{2}", None, False, None, False),
        ("math500", r"\boxed{2\sqrt{2}}", r"\sqrt{8}", r"2\sqrt{2}", False, r"2\sqrt{2}", False),
        # synthetic: like gsm8k
        ("synthetic", "30 + 3 = 33 . answer 33", "33", None, False, "33", True),
        ("synthetic", "30 + 3 = 33\n#### 33", "33", "33", True, "33", True),
        ("synthetic", "answer unknown", "33", None, False, None, False),
    ],
)
def test_grade(task, text, gold, answer, correct, flexible, flexible_correct):
    g = TASKS[task].grade(text, gold)
    assert (g.answer, g.correct, g.flexible_answer, g.flexible_correct) == (answer, correct, flexible, flexible_correct)


# --- The real GSM8K answers ---------------------------------------------------------------------


def _gsm8k_file(which: str) -> Path:
    if which == "full" and not GSM8K.exists():
        pytest.skip("shared GSM8K data not beside the checkout")
    return GSM8K if which == "full" else GSM8K_SAMPLE


def test_gsm8k_sample_is_the_head_of_the_test_split():
    lines = GSM8K_SAMPLE.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 40
    assert "MIT License" in (GSM8K_SAMPLE.parent / "GSM8K_LICENSE").read_text(encoding="utf-8")
    if GSM8K.exists():
        assert lines == GSM8K.read_text(encoding="utf-8").splitlines()[:40]


@pytest.mark.parametrize("which", ["sample", "full"])
def test_real_gsm8k_reference_solutions_grade_correct(which):
    path = _gsm8k_file(which)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    loaded = load_examples(TASKS["gsm8k"], path)
    assert loaded.skipped == [] and len(loaded.examples) == len(rows) >= 40
    task = TASKS["gsm8k"]
    flexible_hits = 0
    for row, example in zip(rows, loaded.examples):
        assert example.question == row["question"]
        assert normalize_number(example.gold) is not None, example.gold
        grade = task.grade(row["answer"], example.gold)
        assert grade.correct and grade.flexible_correct, (example.index, row["answer"][-80:], example.gold)
        # without its '#### N' line, the solution still ends on its answer most of the time
        body = re.sub(r"\n*####[^\n]*$", "", row["answer"].rstrip())
        assert "####" not in body
        grade = task.grade(body, example.gold)
        assert grade.answer is None and not grade.correct
        flexible_hits += grade.flexible_correct
    rate = flexible_hits / len(rows)
    print(f"GSM8K {which}: flexible accuracy of the reference solutions without '#### N': "
          f"{rate:.4f} ({flexible_hits}/{len(rows)})")
    assert rate >= 0.95


# --- load_examples on bad input -----------------------------------------------------------------


def _write(tmp_path: Path, lines: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


GOOD = {"question": "Zoe has 3 apples and finds 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"}
MALFORMED = [
    GOOD,
    "{not json",  # line 2
    {"question": "q"},  # line 3: no answer
    {"question": "q", "answer": "the answer is 7"},  # line 4: no '####'
    [1, 2],  # line 5: not an object
    "",  # line 6: blank lines are skipped, not malformed
    GOOD,  # line 7
]


def test_load_examples_names_malformed_lines(tmp_path):
    path = _write(tmp_path, MALFORMED)
    with pytest.raises(DataError) as err:
        load_examples(TASKS["gsm8k"], path)
    message = str(err.value)
    for number in (2, 3, 4, 5):
        assert f"line {number}:" in message
    assert "line 1:" not in message and "line 6" not in message and "line 7" not in message
    assert "4 malformed" in message and "--skip-malformed" in message


def test_load_examples_skips_malformed_lines_on_request(tmp_path):
    loaded = load_examples(TASKS["gsm8k"], _write(tmp_path, MALFORMED), skip_malformed=True)
    assert [e.index for e in loaded.examples] == [1, 7]
    assert [e.gold for e in loaded.examples] == ["7", "7"]
    assert [n for n, _ in loaded.skipped] == [2, 3, 4, 5]
    assert "not JSON" in loaded.skipped[0][1] and "answer" in loaded.skipped[1][1] and "####" in loaded.skipped[2][1]


@pytest.mark.parametrize("skip_malformed", [False, True])
def test_math_file_loaded_as_gsm8k_names_the_expected_fields(tmp_path, skip_malformed):
    path = _write(tmp_path, [{"problem": "What is 1 + 1?", "answer": "2"}] * 3)
    with pytest.raises(DataError) as err:
        load_examples(TASKS["gsm8k"], path, skip_malformed=skip_malformed)
    message = str(err.value)
    assert "question, answer" in message  # what gsm8k expects
    assert "problem" in message  # what the file holds


def test_math500_gold_from_boxed_solution(tmp_path):
    path = _write(tmp_path, [
        {"problem": "p1", "solution": r"so it is \boxed{\frac{1}{2}}."},
        {"problem": "p2", "answer": "3", "solution": r"\boxed{4}"},  # 'answer' wins
        {"problem": "p3", "solution": "no box here"},
    ])
    loaded = load_examples(TASKS["math500"], path, skip_malformed=True)
    assert [(e.index, e.question, e.gold) for e in loaded.examples] == [(1, "p1", r"\frac{1}{2}"), (2, "p2", "3")]
    assert [n for n, _ in loaded.skipped] == [3]
    with pytest.raises(DataError, match="line 3"):
        load_examples(TASKS["math500"], path)


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "2"])
def test_load_examples_limit_must_be_positive_int(tmp_path, limit):
    with pytest.raises(DataError, match="limit"):
        load_examples(TASKS["gsm8k"], _write(tmp_path, [GOOD]), limit=limit)


def test_load_examples_limit(tmp_path):
    path = _write(tmp_path, [GOOD, GOOD, GOOD])
    assert [e.index for e in load_examples(TASKS["gsm8k"], path, limit=2).examples] == [1, 2]
    assert len(load_examples(TASKS["gsm8k"], path, limit=1).examples) == 1


def test_load_examples_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(TASKS["gsm8k"], tmp_path / "nope.jsonl")
