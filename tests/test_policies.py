"""Schedules and unmasking policies against plain-Python references on random inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy as np

from paradec import ops
from paradec.decoding.schedule import group_schedule
from paradec.ops.scoring import score_logits
from paradec.ops.selection import FACTOR, THRESHOLD, TOPK, rank_in_groups


@given(length=st.integers(1, 300), steps=st.integers(1, 400), kind=st.sampled_from(["uniform", "linspace"]))
def test_schedules_commit_everything_at_least_one_a_step(length, steps, kind):
    quotas = group_schedule(length, steps, None, kind)
    assert sum(quotas) == length and min(quotas) >= 1 and len(quotas) == min(steps, length)


def test_uniform_matches_llada_split():
    assert group_schedule(10, 4, None, "uniform") == [3, 3, 2, 2]
    assert group_schedule(8, 3, 5, "uniform") == [5, 3]  # tokens_per_step wins when both are given
    assert group_schedule(7, None, 3, "uniform") == [3, 3, 1]


def test_linspace_follows_dream_timesteps():
    # Dream: n_i = int(remaining * (1 - t_{i+1} / t_i)), t = linspace(1, 1e-3, steps + 1); last takes the rest.
    length, steps = 64, 8
    t = [1 + (1e-3 - 1) * i / steps for i in range(steps + 1)]
    remaining, expected = length, []
    for i in range(steps):
        n = remaining if i == steps - 1 else max(1, int(remaining * (1 - t[i + 1] / t[i])))
        expected.append(n)
        remaining -= n
    assert group_schedule(length, steps, None, "linspace") == expected


def _python_rank(keys, scores, positions):
    ranks = [0] * len(keys)
    for key in set(keys):
        members = sorted((i for i in range(len(keys)) if keys[i] == key), key=lambda i: (-scores[i], positions[i]))
        for r, i in enumerate(members):
            ranks[i] = r
    return ranks


candidates_strategy = st.integers(1, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
        # few distinct values, so ties are common
        st.lists(st.sampled_from([0.1, 0.3, 0.3, 0.5, 0.9, 0.99]), min_size=n, max_size=n),
        st.permutations(list(range(n))),
    )
)


@settings(max_examples=200)
@given(candidates_strategy)
def test_rank_in_groups_breaks_ties_by_lowest_position(data):
    keys, scores, positions = data
    got = rank_in_groups(torch.tensor(keys), torch.tensor(scores), torch.tensor(positions)).tolist()
    assert got == _python_rank(keys, scores, positions)


def _commit(impl, keys, scores, positions, quota, floor, rule, param):
    """Runs a select_commit implementation on one canvas row holding every candidate."""
    n = len(keys)
    canvas = torch.zeros(1, max(positions) + 1, dtype=torch.long)
    trace = torch.full_like(canvas, -1)
    conf = torch.tensor(scores, dtype=torch.float32)
    quotas = torch.tensor([min(quota, keys.count(k)) for k in keys])  # a quota never exceeds its segment
    committed = impl(canvas, trace, torch.zeros(n, dtype=torch.long), torch.tensor(positions), torch.tensor(keys),
                     conf, conf, quotas, torch.full((n,), floor), torch.arange(n) + 10, rule, param, 7)
    written = [canvas[0, p].item() == 10 + i and trace[0, p].item() == 7 for i, p in enumerate(positions)]
    assert committed.tolist() == written  # committed exactly where the canvas and trace were written
    return committed.tolist()


IMPLS = [ops.select_commit_twin] + ([torch.ops.paradec.select_commit] if ops.NATIVE else [])


@settings(max_examples=200)
@given(candidates_strategy, st.integers(1, 5), st.floats(0.05, 1.0), st.floats(0.1, 3.0), st.integers(1, 3))
def test_commit_rules_match_python_references(data, quota, tau, f, floor):
    keys, scores, positions = data
    ranks = _python_rank(keys, scores, positions)
    f32 = lambda x: float(np.float32(x))  # noqa: E731 - the rules compare in float32
    expected = {
        TOPK: [r < quota for r in ranks],
        THRESHOLD: [f32(s) >= f32(tau) or r < floor for s, r in zip(scores, ranks)],
        FACTOR: [f32(s) >= np.float32(1) - np.float32(f) / np.float32(r + 2) or r < floor for s, r in zip(scores, ranks)],
    }
    for impl in IMPLS:
        assert _commit(impl, keys, scores, positions, quota, floor, TOPK, 0.0) == expected[TOPK]
        assert _commit(impl, keys, scores, positions, quota, floor, THRESHOLD, tau) == expected[THRESHOLD]
        assert _commit(impl, keys, scores, positions, quota, floor, FACTOR, f) == expected[FACTOR]
    # factor's accepted set is a prefix of each group's ranking, and every group keeps its top-1
    for key in set(keys):
        chosen = sorted(r for k, r, e in zip(keys, ranks, expected[FACTOR]) if k == key and e)
        assert chosen == list(range(len(chosen))) and chosen[:1] == [0]


def test_scores_against_softmax_reference():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    mask_id, stops = 7, (3, 4)
    bar = torch.tensor([True, False, True, False, False, True])
    logits[0, mask_id] = 100.0  # the mask id must never win, however likely
    logits[2, 3] = 100.0  # a barred stop id must not win either
    logits[1, 4] = 100.0  # an unbarred one may
    s = score_logits(logits.clone(), mask_id, stops, bar)
    ref = logits.double().clone()
    ref[:, mask_id] = -math.inf
    ref[bar.nonzero()[:, 0][:, None], torch.tensor(stops)] = -math.inf
    p = torch.softmax(ref, -1)
    tokens = p.argmax(-1)
    assert s.tokens.tolist() == tokens.tolist() and s.tokens[1] == 4 and mask_id not in s.tokens.tolist()
    assert 3 != s.tokens[2]
    torch.testing.assert_close(s.confidence.double(), p.gather(1, tokens[:, None])[:, 0], rtol=1e-5, atol=1e-6)
    top2 = p.topk(2, -1).values
    torch.testing.assert_close(s.margin.double(), top2[:, 0] - top2[:, 1], rtol=1e-5, atol=1e-6)
    ent = torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    torch.testing.assert_close(s.neg_entropy.double(), ent, rtol=1e-5, atol=1e-6)


def test_gumbel_sampling_matches_llada_float64_draw():
    torch.manual_seed(1)
    logits = torch.randn(5, 40)
    u = torch.rand(5, 40, dtype=torch.float64).clamp(min=1e-300)
    for temperature in (0.5, 1.0, 2.0):
        s = score_logits(logits.clone(), 39, (), torch.zeros(5, dtype=torch.bool), temperature, u)
        # LLaDA's add_gumbel_noise: exp(logits) / (-log u) ** T, then argmax.
        ref = (logits.double().masked_fill(torch.arange(40) == 39, -math.inf).exp() / (-u.log()) ** temperature).argmax(-1)
        assert s.tokens.tolist() == ref.tolist()


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_gumbel_samples_follow_the_tempered_distribution(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40000, 4).clone()
    u = torch.rand(40000, 4, dtype=torch.float64).clamp(min=1e-300)
    s = score_logits(logits, 3, (), torch.zeros(40000, dtype=torch.bool), temperature, u)
    # id 3 is the mask id here: never drawn; the rest follow softmax(logits / T)
    freq = torch.bincount(s.tokens, minlength=4).double() / 40000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / temperature, -1).double()
    assert freq[3] == 0
    torch.testing.assert_close(freq[:3], expected, atol=0.01, rtol=0)  # 40k draws: sd < 0.0025
