"""Evaluation tasks: how a data file's lines become examples, and how a decoded text is graded.

Data files are JSON lines. Each task expects these fields on every line:

- ``gsm8k``: ``question``, ``answer`` (the answer text ending in ``#### N``, as OpenAI publishes it);
  with no data file, GSM8K's test split (1,319 problems, MIT) shipped inside the package
  (``gsm8k_test_path()``);
- ``math500``: ``problem`` and ``answer`` (HuggingFaceH4/MATH-500's layout); a line without
  ``answer`` but with a ``solution`` holding ``\\boxed{...}`` takes the boxed text as gold;
- ``synthetic``: ``question``, ``answer`` (a number, or text ending in ``#### N``); with no data
  file, the built-in model's fixed held-out split (``paradec.train.tasks.arith``).

Grading (rules in ``paradec.answers``): ``strict`` extraction is ``#### N``, else the last
``\\boxed{}`` (for math500: the boxed text first); ``flexible`` falls back to the last number in
the text (gsm8k and synthetic only — lm-eval's "flexible-extract"). Numbers compare as exact
rationals after normalisation; math500 answers by normalised string (or number).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paradec.answers import (
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    math_equal,
    normalize_number,
    numbers_equal,
)
from paradec.errors import InputError


class DataError(InputError):
    """A data file does not hold what its task expects."""


GSM8K_TEST = Path(__file__).resolve().parent / "data" / "gsm8k" / "test.jsonl"


def gsm8k_test_path() -> Path:
    """GSM8K's test split as OpenAI publishes it (1,319 JSON lines of ``question``, ``answer``;
    MIT, ``LICENSE`` beside it), shipped inside the package: an absolute path that holds from any
    working directory and in a plain (non-editable) install."""
    if not GSM8K_TEST.is_file():
        raise DataError(f"GSM8K's test split is missing from the installed package ({GSM8K_TEST}); "
                        f"reinstall paradec, or pass a data file")
    return GSM8K_TEST


@dataclass(frozen=True)
class Example:
    index: int  # the line number in the data file (1-based), or the position in the built-in split
    question: str
    gold: str


@dataclass(frozen=True)
class Grade:
    answer: str | None  # strict extraction; None when the text holds none (counted wrong, listed)
    correct: bool
    flexible_answer: str | None
    flexible_correct: bool


@dataclass(frozen=True)
class Task:
    name: str
    fields: str  # what every line must hold, for error messages
    parse: Callable[[dict], tuple[str, str]]  # a JSON object -> (question, gold); KeyError/ValueError when malformed
    equal: Callable[[str | None, str | None], bool]
    boxed_first: bool
    flexible: bool

    def grade(self, text: str, gold: str) -> Grade:
        first, second = (extract_boxed, extract_gsm8k) if self.boxed_first else (extract_gsm8k, extract_boxed)
        strict = first(text)
        strict = second(text) if strict is None else strict
        flexible = strict if strict is not None or not self.flexible else extract_last_number(text)
        return Grade(strict, self.equal(strict, gold), flexible, self.equal(flexible, gold))


def _gsm8k(row: dict) -> tuple[str, str]:
    gold = extract_gsm8k(_text(row, "answer"))
    if gold is None:
        raise ValueError("'answer' has no '#### N'")
    return _text(row, "question"), gold


def _math500(row: dict) -> tuple[str, str]:
    if "answer" in row:
        return _text(row, "problem"), _text(row, "answer")
    gold = extract_boxed(_text(row, "solution"))
    if gold is None:
        raise ValueError("no 'answer' and no \\boxed{} in 'solution'")
    return _text(row, "problem"), gold


def _synthetic(row: dict) -> tuple[str, str]:
    answer = row["answer"]
    gold = str(answer) if isinstance(answer, int | float) and not isinstance(answer, bool) else None
    if isinstance(answer, str):
        gold = extract_gsm8k(answer) if "####" in answer else answer.strip()
    if gold is None or normalize_number(gold) is None:
        raise ValueError(f"'answer' is not a number or '#### N': {answer!r}")
    return _text(row, "question"), gold


def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string, got {type(value).__name__}")
    return value


TASKS = {
    "gsm8k": Task("gsm8k", "question, answer (ending in '#### N')", _gsm8k, numbers_equal, False, True),
    "math500": Task("math500", "problem, answer (or solution with \\boxed{})", _math500, math_equal, True, False),
    "synthetic": Task("synthetic", "question, answer (a number or '#### N')", _synthetic, numbers_equal, False, True),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


@dataclass
class Loaded:
    examples: list[Example]
    skipped: list[tuple[int, str]]  # (line number, why) of malformed lines skipped on request


def load_examples(task: Task, path: Path | None, limit: int | None = None, skip_malformed: bool = False) -> Loaded:
    """The task's examples from a JSONL file (``None``: the built-in split — synthetic's held-out
    problems, gsm8k's packaged test split; math500 has none), the first ``limit`` of them. A malformed line raises a DataError naming it (every malformed line,
    up to ten) unless ``skip_malformed``; a file none of whose lines fits the task raises even
    then, saying which fields the task expected and which the file holds."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be an int >= 1, got {limit!r}")
    if path is None and task.name == "gsm8k":
        path = gsm8k_test_path()
    if path is None:
        if task.name != "synthetic":
            raise DataError(f"task {task.name} needs a data file (--data): JSON lines with {task.fields}")
        from paradec.train.tasks import arith

        problems = arith.test_problems()[:limit]
        return Loaded([Example(i, p.question, str(p.answer)) for i, p in enumerate(problems)], [])
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    examples, bad, seen_fields = [], [], None
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
                seen_fields = seen_fields or sorted(row)
                question, gold = task.parse(row)
            except json.JSONDecodeError as e:
                bad.append((number, f"not JSON ({e.msg})"))
            except KeyError as e:
                bad.append((number, f"missing field {e}"))
            except ValueError as e:
                bad.append((number, str(e)))
            else:
                examples.append(Example(number, question, gold))
                if limit is not None and len(examples) == limit:
                    break
    if not examples:
        holds = f"its first object has fields {', '.join(seen_fields)}" if seen_fields else "it has no JSON object"
        raise DataError(f"{path}: no line fits task {task.name}, which expects JSON lines with {task.fields}; "
                        f"{holds}" + (f" (line {bad[0][0]}: {bad[0][1]})" if bad else ""))
    if bad and not skip_malformed:
        listed = "; ".join(f"line {n}: {why}" for n, why in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{path}: {len(bad)} malformed line(s) for task {task.name} (expects {task.fields}): "
                        f"{listed}{more}. Fix them, or skip them with --skip-malformed")
    return Loaded(examples, bad)
