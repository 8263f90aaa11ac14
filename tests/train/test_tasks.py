"""paradec.train.tasks.arith, the synthetic task paradec-tiny is trained on: the fixed held-out
split, the training stream, correct and noisy solution paths (hypothesis properties and brute force),
grading and the summary; and paradec.train.tokenizer's word tokenizer over the task's vocabulary."""

from __future__ import annotations

import itertools
import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from paradec.answers import extract_answer
from paradec.train.tasks import arith


STEP = re.compile(r"(-?\d+) ([*+-]) (-?\d+) = (-?\d+) \.")
NUMBER = re.compile(r"-?\d+")


def _parse(text: str) -> tuple[list[tuple[int, str, int, int]], int]:
    """A path's steps (a, op, b, c) and the N of its closing ``answer N``; the whole text must parse."""
    body, final = text.rsplit(" answer ", 1)
    steps = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(body)]
    assert " ".join(f"{a} {op} {b} = {c} ." for a, op, b, c in steps) == body, text
    return steps, int(final)


def _right(step) -> bool:
    a, op, b, c = step
    return {"*": a * b, "+": a + b, "-": a - b}[op] == c


def _numbers(text: str) -> list[int]:
    return [int(w) for w in text.split() if NUMBER.fullmatch(w)]


def _random_problem(seed: int) -> arith.Problem:
    return arith.make_problem(random.Random(seed))


def test_held_out_split_is_fixed_and_distinct():
    problems = arith.test_problems()
    assert len(problems) >= 500
    assert len({p.question for p in problems}) == len(problems)
    assert arith.test_problems() == problems
    assert all(0 <= n <= arith.MAX_NUMBER for p in problems for n in _numbers(p.question))


def test_training_stream_never_yields_a_held_out_question():
    held_out = {p.question for p in arith.test_problems()}
    for seed in (0, 1):
        stream = arith.training_problems(seed)
        questions = [next(stream).question for _ in range(1500)]
        assert not held_out & set(questions)
        assert len(set(questions)) > 1000  # a real stream, not one problem repeated


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 4))
def test_numbers_of_questions_and_correct_paths_are_in_range(seed, count):
    problem = _random_problem(seed)
    paths = arith.solution_paths(problem, count, random.Random(seed), noisy=0)
    for text in [problem.question] + [p.text for p in paths]:
        numbers = _numbers(text)
        assert numbers and all(0 <= n <= arith.MAX_NUMBER for n in numbers), text


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 6), data=st.data())
def test_exactly_the_asked_number_of_paths_is_noisy(seed, count, data):
    noisy = data.draw(st.integers(0, count))
    paths = arith.solution_paths(_random_problem(seed), count, random.Random(seed + 1), noisy=noisy)
    assert len(paths) == count
    assert sum(p.noisy for p in paths) == noisy


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 4))
def test_correct_paths_are_right_at_every_step(seed, count):
    problem = _random_problem(seed)
    for path in arith.solution_paths(problem, count, random.Random(seed), noisy=0):
        steps, final = _parse(path.text)
        assert not path.noisy and all(map(_right, steps)), path.text
        # One product per container event, one running-total step per event.
        assert len(steps) == len(problem.events) + sum(e.per is not None for e in problem.events)
        totals = [s for s in steps if s[1] != "*"]
        assert totals[0][0] == problem.start
        assert all(nxt[0] == prev[3] for prev, nxt in zip(totals, totals[1:]))  # the total carries on
        assert final == path.final == totals[-1][3] == problem.answer


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 4))
def test_a_noisy_path_makes_exactly_one_slip(seed, count):
    problem = _random_problem(seed)
    for path in arith.solution_paths(problem, count, random.Random(seed), noisy=count):
        _check_noisy(problem, path)


def _check_noisy(problem: arith.Problem, path: arith.Path) -> None:
    """One wrong step, carried on to a wrong final that the path states; every number in range."""
    steps, final = _parse(path.text)
    assert path.noisy and sum(not _right(s) for s in steps) == 1, path.text
    assert all(0 <= n <= arith.MAX_NUMBER for n in _numbers(path.text)), path.text
    totals = [s for s in steps if s[1] != "*"]
    assert final == path.final == totals[-1][3] != problem.answer, path.text


def test_a_noisy_path_near_the_range_edge_stays_in_range():
    # 13 + 7 - 20 = 0: a slip down on the first step would carry a negative total to the end.
    problem = arith.Problem("q", 13, (arith.Event(1, 7), arith.Event(-1, 20)))
    slips = set()
    for seed in range(60):
        (path,) = arith.solution_paths(problem, 1, random.Random(seed), noisy=1)
        _check_noisy(problem, path)
        slips.add(path.text.split(" . ")[0])
    assert len(slips) > 1  # slips on either step, of several sizes


def _distinct_step_orders(problem: arith.Problem) -> set[tuple]:
    """Every step sequence a correct path may take (valid event orders x products first or
    inline), worked out here independently of arith's sampling."""
    events, out = problem.events, set()
    for order in itertools.permutations(range(len(events))):
        totals = itertools.accumulate((events[i].sign * events[i].value for i in order), initial=problem.start)
        if not all(0 <= t <= arith.MAX_NUMBER for t in totals):
            continue
        grouped = [("mul", i) for i in order if events[i].per is not None]
        for steps in (grouped + [("acc", i) for i in order],
                      [s for i in order for s in ([("mul", i)] if events[i].per is not None else []) + [("acc", i)]]):
            out.add(arith._write(problem, steps, -1, 0)[0])  # equal-valued events: same text, one path
    return out


def test_paths_differ_where_the_problem_allows():
    stream, rng = arith.training_problems(0), random.Random(0)
    same = []
    for _ in range(300):
        problem = next(stream)
        if len(_distinct_step_orders(problem)) < 2:
            continue  # only one correct path exists
        for count in (2, 3, 4):
            texts = {p.text for p in arith.solution_paths(problem, count, rng, noisy=0)}
            if len(texts) < 2:
                same.append((problem.question, count))
    assert not same, f"{len(same)} cases, e.g. {same[0]}"


def test_check_answer_and_summary():
    problem = arith.Problem("q", 10, (arith.Event(1, 6),))
    assert problem.answer == 16
    assert arith.check_answer("16", problem) and arith.check_answer("16.0", problem)
    for wrong in (None, "15", "abc", "16.5", ""):
        assert not arith.check_answer(wrong, problem), wrong
    paths = arith.solution_paths(problem, 3, random.Random(0), noisy=1)
    summary = arith.summary_text(paths, problem.answer)
    assert summary.endswith("#### 16") and extract_answer(summary) == "16"
    assert summary == "votes " + " ".join(str(p.final) for p in paths) + " #### 16"


def test_the_tokenizer_holds_every_word_of_the_task(tok):
    unk = tok.unk_token_id
    stream, rng = arith.training_problems(3), random.Random(3)
    for _ in range(50):
        problem = next(stream)
        paths = arith.solution_paths(problem, 4, rng, noisy=1)
        for text in [problem.question, arith.summary_text(paths, problem.answer)] + [p.text for p in paths]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert unk not in ids and tok.decode(ids) == text
