"""ARness from traces: hand-made orders, brute-force references, and decoded traces."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import paradec
from paradec.metrics import decode_order, global_arness, local_arness, without_fill

from tiny import tiny_checkpoint



def test_left_to_right_is_fully_autoregressive():
    trace = list(range(10))
    assert global_arness(trace) == 1.0 and local_arness(trace) == 1.0 and local_arness(trace, 3) == 1.0


def test_right_to_left_is_not():
    trace = list(range(9, -1, -1))
    assert global_arness(trace) == pytest.approx(1 / 10)  # only the last, when one is left
    assert global_arness(trace, k=10) == 1.0
    assert local_arness(trace) == 0.0


def test_several_tokens_a_step_in_position_order():
    # two leftmost per step, with a header (-1) in the middle
    trace = [0, 0, 1, -1, 1, 2, 2]
    assert decode_order(trace) == [0, 1, 2, 4, 5, 6]
    assert global_arness(trace) == 1.0
    assert local_arness(trace) == pytest.approx(4 / 5)  # 2 -> 4 jumps the header


@given(st.lists(st.integers(-1, 6), min_size=1, max_size=30), st.integers(1, 4))
def test_against_brute_force(trace, k):
    order = decode_order(trace)
    masked = set(order)
    hits = 0
    for p in order:
        hits += sum(q < p for q in masked) < k
        masked.discard(p)
    assert global_arness(trace, k) == pytest.approx(hits / len(order) if order else 0.0)
    runs = sum(all(order[i - j] == order[i - j - 1] + 1 for j in range(k)) for i in range(k, len(order)))
    assert local_arness(trace, k) == pytest.approx(runs / (len(order) - k) if len(order) > k else 0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=41)
    return paradec.load(root)


@pytest.mark.parametrize("tokens_per_step", [1, 3])
def test_ar_order_scores_one_and_random_far_less(model, tokens_per_step):
    ar = paradec.generate(model, "a b c", mode="ar_order", answer_len=48, tokens_per_step=tokens_per_step)
    rnd = paradec.generate(model, "a b c", mode="random", answer_len=48, tokens_per_step=tokens_per_step, seed=3)
    assert global_arness(ar.trace) == 1.0 and local_arness(ar.trace) == 1.0
    assert global_arness(rnd.trace) < 0.4 and local_arness(rnd.trace) < 0.4


def test_arness_leaves_out_eos_fill():
    # body [1, 6): EOS (id 0) decoded at position 2; 3..5 are fill. body [7, 10): EOS at 8.
    trace = [-1, 0, 1, 2, 2, 2, -1, 3, 4, 4]
    tokens = [9, 5, 0, 0, 0, 0, 9, 5, 0, 0]
    assert without_fill(trace, tokens, [(1, 6), (7, 10)], {0}) == [-1, 0, 1, -1, -1, -1, -1, 3, 4, -1]
