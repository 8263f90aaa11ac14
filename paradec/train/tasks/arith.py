"""A synthetic multi-step arithmetic task with several genuinely different solution paths.

A problem: someone starts with some items, then gains and loses items in a few events; some
events come in containers ("3 bags of 4 pens"), which need a product. The answer is the final
count. A solution path states each product and keeps a running total, in one of many valid
orders: events may be taken in any order (the running total must stay within the number range)
and products either all first or each where its event is taken. So paths differ in their
intermediate values, not only in wording. A *noisy* path makes one arithmetic slip and carries
the wrong value on to a wrong final count; a problem's summary lists every path's final count
and then the right answer as ``#### N``.

Every number the task writes lies in [0, MAX_NUMBER], one token each in the task's tokenizer.
The held-out split is fixed: ``test_problems()`` is generated from its own seed, and training
problems with the same question text are never produced by ``training_problems()``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

MAX_NUMBER = 99
TEST_SEED = 20260211
TEST_SIZE = 600

NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Zoe", "Leo", "Ivy")
ITEMS = ("apples", "pens", "cards", "shells", "books", "coins", "eggs", "stamps", "beads", "nuts")
CONTAINERS = ("bags", "boxes", "jars", "packs", "crates")
GAIN_PLAIN = ("{name} buys {n} {item} .", "{name} finds {n} more {item} .", "{name} gets {n} {item} from a friend .")
GAIN_GROUPS = ("{name} buys {c} {box} of {p} {item} each .", "{name} gets {c} {box} with {p} {item} in each .")
LOSS_PLAIN = ("{name} gives away {n} {item} .", "{name} sells {n} {item} .", "{name} loses {n} {item} .")
LOSS_GROUPS = ("{name} sells {c} {box} of {p} {item} each .", "{name} gives {c} friends {p} {item} each .")
START = "{name} has {n} {item} ."
QUESTION = "How many {item} does {name} have now ?"


@dataclass(frozen=True)
class Event:
    sign: int  # +1 gain, -1 loss
    count: int  # items, or containers when ``per`` is set
    per: int | None = None  # items in each container

    @property
    def value(self) -> int:
        return self.count * (self.per or 1)


@dataclass(frozen=True)
class Problem:
    question: str
    start: int
    events: tuple[Event, ...]

    @property
    def answer(self) -> int:
        return self.start + sum(e.sign * e.value for e in self.events)


@dataclass(frozen=True)
class Path:
    text: str
    final: int  # the count this path ends on (wrong when it is noisy)
    noisy: bool


def _in_range(v: int) -> bool:
    return 0 <= v <= MAX_NUMBER


def make_problem(rng: random.Random) -> Problem:
    """One problem with 2-4 events, at most 2 of them in containers, every order of events
    valid for at least one path, and every number in range."""
    while True:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        start = rng.randint(5, 40)
        events, groups = [], 0
        for _ in range(rng.randint(2, 4)):
            sign = rng.choice((1, 1, -1))
            if groups < 2 and rng.random() < 0.45:
                groups += 1
                events.append(Event(sign, rng.randint(2, 5), rng.randint(2, 9)))
            else:
                events.append(Event(sign, rng.randint(1, 20)))
        problem = Problem("", start, tuple(events))
        if _in_range(problem.answer) and _orders(problem, rng, 1):
            sentences = [START.format(name=name, n=start, item=item)]
            for e in events:
                if e.per is None:
                    template = rng.choice(GAIN_PLAIN if e.sign > 0 else LOSS_PLAIN)
                else:
                    template = rng.choice(GAIN_GROUPS if e.sign > 0 else LOSS_GROUPS)
                sentences.append(template.format(name=name, n=e.count, c=e.count, p=e.per, box=rng.choice(CONTAINERS),
                                                 item=item))
            sentences.append(QUESTION.format(name=name, item=item))
            return Problem(" ".join(sentences), start, tuple(events))


def _orders(problem: Problem, rng: random.Random, wanted: int, tries: int = 60) -> list[tuple[int, ...]]:
    """Up to ``wanted`` distinct event orders whose running totals stay in range, in random order."""
    found: list[tuple[int, ...]] = []
    n = len(problem.events)
    for _ in range(tries):
        order = tuple(rng.sample(range(n), n))
        if order in found:
            continue
        total, ok = problem.start, True
        for i in order:
            total += problem.events[i].sign * problem.events[i].value
            ok &= _in_range(total)
        if ok:
            found.append(order)
            if len(found) == wanted:
                break
    return found


def solution_paths(problem: Problem, count: int, rng: random.Random, noisy: int = 0) -> list[Path]:
    """``count`` paths; path j (think block j + 1) takes event ``j mod n`` first where a valid
    order allows, products first in even rounds over the events and inline in odd ones, so a
    block's header says how its path starts and greedy decoding of m blocks writes different
    paths. Where that rule cannot give a path not yet written, another valid one is taken
    (distinct texts where the problem allows). ``noisy`` random paths make one slip."""
    n = len(problem.events)
    orders = _orders(problem, rng, 4 * n)
    chosen: list[tuple[tuple[int, ...], bool]] = []
    written: set[str] = set()
    for j in range(count):
        first = (j // n) % 2 == 0
        preferred = [(o, first) for o in orders if o[0] == j % n]
        others = [(o, f) for o in orders for f in (first, not first)]
        fresh = [style for style in preferred + others if _clean_text(problem, *style) not in written]
        order, products_first = (fresh or preferred or others)[0]
        chosen.append((order, products_first))
        written.add(_clean_text(problem, order, products_first))
    slips = set(rng.sample(range(count), noisy))
    return [_path(problem, order, first, rng, slip=j in slips) for j, (order, first) in enumerate(chosen)]


def _clean_text(problem: Problem, order: tuple[int, ...], products_first: bool) -> str:
    return _write(problem, _steps(problem, order, products_first), -1, 0)[0]


def _steps(problem: Problem, order: tuple[int, ...], products_first: bool) -> list[tuple[str, int]]:
    """("mul" | "acc", event index) in the order a path writes them."""
    events = problem.events
    steps = [("mul", i) for i in order if events[i].per is not None] if products_first else []
    for i in order:
        if events[i].per is not None and not products_first:
            steps.append(("mul", i))
        steps.append(("acc", i))
    return steps


def _path(problem: Problem, order: tuple[int, ...], products_first: bool, rng: random.Random, slip: bool) -> Path:
    """Steps ``a * b = c .`` and ``total +/- v = new .``, then ``answer N``. A slip changes one
    step's result by 1-3 and the path carries it on; slips that would take a later number out of
    range are drawn again (after 50 tries the path stays clean and says so)."""
    steps = _steps(problem, order, products_first)
    for _ in range(50 if slip else 1):
        slip_at, delta = (rng.randrange(len(steps)), rng.choice((-3, -2, -1, 1, 2, 3))) if slip else (-1, 0)
        written = _write(problem, steps, slip_at, delta)
        if written is not None:
            return Path(*written, noisy=slip_at >= 0)
    text, final = _write(problem, steps, -1, 0)
    return Path(text, final, noisy=False)


def _write(problem: Problem, steps: list[tuple[str, int]], slip_at: int, delta: int) -> tuple[str, int] | None:
    """The path's text and final count, or None when a number leaves [0, MAX_NUMBER]."""
    total, values, words = problem.start, {}, []
    for k, (kind, i) in enumerate(steps):
        e = problem.events[i]
        if kind == "mul":
            left, op, right, result = e.count, "*", e.per, e.value
        else:
            left, op, right = total, "+" if e.sign > 0 else "-", values.get(i, e.value)
            result = left + right if e.sign > 0 else left - right
        if k == slip_at:
            result += delta
        if not all(_in_range(v) for v in (left, right, result)):
            return None
        if kind == "mul":
            values[i] = result
        else:
            total = result
        words.append(f"{left} {op} {right} = {result} .")
    return " ".join(words) + f" answer {total}", total


def summary_text(paths: list[Path], answer: int) -> str:
    """What the summary block says: each path's final count, then the right answer."""
    return "votes " + " ".join(str(p.final) for p in paths) + f" #### {answer}"


def check_answer(predicted: str | None, problem: Problem) -> bool:
    """True when the extracted answer is the problem's answer (as an integer)."""
    if predicted is None:
        return False
    try:
        return int(float(predicted.replace(",", ""))) == problem.answer and float(predicted) == int(float(predicted))
    except ValueError:
        return False


def test_problems() -> list[Problem]:
    """The fixed held-out split (TEST_SIZE problems, distinct questions)."""
    rng = random.Random(TEST_SEED)
    seen, out = set(), []
    while len(out) < TEST_SIZE:
        p = make_problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def training_problems(seed: int) -> Iterator[Problem]:
    """An endless stream of problems whose questions are not in the held-out split."""
    held_out = {p.question for p in test_problems()}
    rng = random.Random(seed)
    while True:
        p = make_problem(rng)
        if p.question not in held_out:
            yield p


def vocabulary() -> list[str]:
    """Every word the task writes (numbers included), for a word-level tokenizer."""
    words = {str(n) for n in range(MAX_NUMBER + 1)}
    for text in (*GAIN_PLAIN, *GAIN_GROUPS, *LOSS_PLAIN, *LOSS_GROUPS, START, QUESTION):
        words |= {w for w in text.split() if not w.startswith("{")}
    words |= set(NAMES) | set(ITEMS) | set(CONTAINERS)
    words |= {"*", "+", "-", "=", ".", "answer", "votes", "####", "path", ":", "summary"}
    return sorted(words)
