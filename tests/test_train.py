"""paradec.train: the synthetic task, curation in the decoder's own layout, the masked-diffusion
objective, training logits, checkpoints, the trainer (resume, DDP over gloo) and the CLI.

Tiny models (one layer, width 32) and datasets of a few dozen problems, all on the CPU."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import paradec
from paradec import GenerationConfig
from paradec.answers import extract_answer
from paradec.api import build_layout, encode_prompt
from paradec.models import AttentionSpec, build
from paradec.models.attention import PAD, PROMPT
from paradec.models.loading import load_tokenizer
from paradec.models.saving import save_checkpoint
from paradec.train import trainer as trainer_module
from paradec.train.data import (
    CanvasFormat, ReasoningExample, curate, longcot_instance, longcot_text, nap_instance, pack,
)
from paradec.train.objective import NoiseDraw, masked_diffusion_loss
from paradec.train.recipe import (
    BLOCK_LEN, PATH_COUNTS, SUMMARY_LEN, build_task_data, reasoning_example, tiny_model_config,
)
from paradec.train.tasks import arith
from paradec.train.tokenizer import build_word_tokenizer
from paradec.train.trainer import PackedDataset, TrainConfig, train

from tiny import dream_config, llada_config, tiny_checkpoint, write_tokenizer

TESTS = Path(__file__).resolve().parent
FMT = CanvasFormat(BLOCK_LEN, SUMMARY_LEN, PATH_COUNTS)
TINY = dict(layers=1, width=32, heads=2, mlp=64)
# fp32 against fp32 through the same tiny layers, gathered before or after the final norm:
# differences are ~1e-6; 1e-4 (as in test_models.py) still catches a wrong shift, mask or row
# order, which moves logits by ~1e-1.
FP32 = dict(rtol=1e-4, atol=1e-4)
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """The recipe's tokenizer and both datasets, from 40 problems."""
    root = tmp_path_factory.mktemp("task")
    build_task_data(root, problems=40, workers=1)
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_word_tokenizer(arith.vocabulary(), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def task_model(tok):
    return build(tiny_model_config(tok, **TINY), tokenizer=tok)


def _config(task_data, out, **overrides) -> TrainConfig:
    tokenizer = load_tokenizer(task_data / "tokenizer")
    base = dict(data=str(task_data / "nap.safetensors"), tokenizer=str(task_data / "tokenizer"), out=str(out),
                model=tiny_model_config(tokenizer, **TINY), steps=4, batch_size=4, warmup=1, save_every=2,
                log_every=1, seed=5)
    return TrainConfig(**(base | overrides))


@pytest.fixture(scope="module")
def trained(task_data, tmp_path_factory):
    """4 uninterrupted steps (checkpoints at 2 and 4)."""
    config = _config(task_data, tmp_path_factory.mktemp("run") / "straight")
    return config, train(config)


# --- the task ---------------------------------------------------------------------------------

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


# --- curation ---------------------------------------------------------------------------------


def _examples(count: int, seed: int = 0) -> list[ReasoningExample]:
    stream, rng = arith.training_problems(seed), random.Random(seed)
    return [reasoning_example(next(stream), PATH_COUNTS[i % len(PATH_COUNTS)], rng, noise=0.5) for i in range(count)]


def _words(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("m", PATH_COUNTS)
def test_nap_instance_is_the_decoders_layout(tok, task_model, m):
    example = next(e for e in _examples(12, seed=m) if len(e.paths) == m)
    eos, mask = tok.eos_token_id, tok.mask_token_id
    instance = nap_instance(tok, example, FMT, eos, mask)
    config = GenerationConfig(mode="nap", blocks=m, block_len=BLOCK_LEN, summary_len=SUMMARY_LEN)
    layout = build_layout(task_model, config)
    prompt = encode_prompt(task_model, example.question, config, layout)
    p = len(prompt)
    ids, segments, roles = (torch.tensor(x) for x in (instance.ids, instance.segments, instance.roles))
    assert len(ids) == len(segments) == len(roles) == p + layout.length
    assert ids[:p].tolist() == prompt
    canvas = ids[p:]
    headers = layout.template != mask
    assert torch.equal(headers, ~layout.editable) and int(headers.sum()) == m + 1  # one token per header
    assert torch.equal(canvas[headers], layout.template[headers])
    assert segments[:p].tolist() == [PROMPT] * p and torch.equal(segments[p:], layout.segments)
    texts = list(example.paths) + [example.summary_text]
    for (start, end), text in zip(layout.bodies, texts, strict=True):
        tokens = _words(tok, text)
        assert canvas[start:end].tolist() == tokens + [eos] * (end - start - len(tokens))
    assert roles[:p].tolist() == [0] * p
    assert torch.equal(roles[p:], torch.where(headers, 1, 2))
    assert mask not in instance.ids


@pytest.mark.parametrize("m", PATH_COUNTS)
def test_longcot_instance_holds_the_same_paths_in_one_region(tok, m):
    example = next(e for e in _examples(12, seed=m) if len(e.paths) == m)
    eos = tok.eos_token_id
    instance = longcot_instance(tok, example, FMT, eos, tok.mask_token_id)
    p = len(_words(tok, example.question))
    assert instance.ids[:p] == _words(tok, example.question)
    assert len(instance.ids) == p + FMT.longcot_len(m)
    answer = instance.ids[p:]
    assert tok.decode(answer, skip_special_tokens=True) == longcot_text(example)
    text_len = len(_words(tok, longcot_text(example)))
    assert answer[text_len:] == [eos] * (len(answer) - text_len) and eos not in answer[:text_len]
    assert instance.roles == [0] * p + [2] * FMT.longcot_len(m)
    assert instance.segments == [PROMPT] * p + [1] * FMT.longcot_len(m)
    assert longcot_text(example).startswith("path 1 : " + example.paths[0])
    assert longcot_text(example).endswith("summary : " + example.summary_text)


def _decoded_paths(tok, instance, kind: str, question: str, m: int) -> list[str]:
    """The paths (and summary) an instance holds, read back from its tokens."""
    p = len(_words(tok, question))
    answer = instance.ids[p:]
    if kind == "longcot":
        text = tok.decode(answer, skip_special_tokens=True)
        return re.split(r" ?(?:path \d+|summary) : ", text)[1:]
    header_at = [i for i, r in enumerate(instance.roles[p:]) if r == 1] + [len(answer)]
    assert len(header_at) == m + 2
    return [tok.decode(answer[a + 1 : b], skip_special_tokens=True) for a, b in zip(header_at, header_at[1:])]


@pytest.mark.parametrize("kind", ["nap", "longcot"])
def test_curate_keeps_what_fits_and_reports_each_reject(tok, kind):
    good = _examples(6)
    q, paths, answer = good[0].question, good[0].paths, good[0].answer
    far_too_long = " ".join(["1 + 1 = 2 ."] * 34)  # 204 tokens: beyond a block and a long-CoT region
    exactly_full = " ".join(["7"] * BLOCK_LEN)  # fills its block to the last token
    examples = [
        good[0],
        ReasoningExample(q, (paths[0], far_too_long), answer),  # 1: a path too long
        good[1],
        ReasoningExample(q, paths[:1], answer),  # 3: too few paths
        ReasoningExample(q, (paths[0],) * 5, answer),  # 4: too many paths
        ReasoningExample(q, paths, ""),  # 5: no answer
        ReasoningExample(q, paths, answer, summary="votes 3 4"),  # 6: the summary states nothing
        ReasoningExample(q, paths, answer, summary=f"#### {int(answer) + 1}"),  # 7: the wrong answer
        good[2],
        ReasoningExample(q, (exactly_full, paths[1]), answer),  # 9: fits exactly
    ]
    instances, report = curate(tok, examples, FMT, kind, tok.eos_token_id, tok.mask_token_id)
    kept = [0, 2, 8, 9]
    assert report.kept == len(instances) == len(kept)
    assert [i for i, _ in report.rejected] == [1, 3, 4, 5, 6, 7]
    reasons = [why.split(":")[0] for _, why in report.rejected]
    assert reasons == ["too long", "path count", "path count", "missing answer",
                       "summary without the answer", "summary without the answer"]
    assert report.counts == Counter({"too long": 1, "path count": 2, "missing answer": 1,
                                     "summary without the answer": 2})
    assert report.summary().startswith("4 kept, 6 rejected (") and "2 path count" in report.summary()
    # Nothing truncated: every kept instance holds each path and the summary whole.
    for instance, i in zip(instances, kept):
        e = examples[i]
        assert _decoded_paths(tok, instance, kind, e.question, len(e.paths)) == [*e.paths, e.summary_text]


def test_curate_refuses_an_unknown_kind(tok):
    with pytest.raises(ValueError, match="kind"):
        curate(tok, _examples(1), FMT, "chat", tok.eos_token_id, tok.mask_token_id)


def test_pack_right_pads_with_pad_role_and_segment(tok):
    instances, _ = curate(tok, _examples(5), FMT, "nap", tok.eos_token_id, tok.mask_token_id)
    assert len({len(x.ids) for x in instances}) > 1  # rows of different lengths
    packed = pack(instances, tok.pad_token_id)
    width = max(len(x.ids) for x in instances)
    assert {k: tuple(v.shape) for k, v in packed.items()} == {k: (5, width) for k in ("ids", "segments", "roles")}
    for n, x in enumerate(instances):
        k = len(x.ids)
        assert packed["ids"][n, :k].tolist() == x.ids
        assert packed["segments"][n, :k].tolist() == x.segments and packed["roles"][n, :k].tolist() == x.roles
        assert (packed["ids"][n, k:] == tok.pad_token_id).all()
        assert (packed["segments"][n, k:] == PAD).all() and (packed["roles"][n, k:] == -1).all()
    with pytest.raises(ValueError):
        pack([], tok.pad_token_id)


# --- the objective ----------------------------------------------------------------------------


class Spy:
    """A logits_fn that records what it is given and returns a fixed random linear map of the
    noisy ids (logits = W[noisy]) at the target positions."""

    def __init__(self, vocab: int):
        self.weight = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.calls = []

    def __call__(self, noisy, positions, segments, attention, targets):
        self.calls.append(dict(noisy=noisy.clone(), positions=positions.clone(), segments=segments.clone(),
                               attention=attention, targets=targets.clone()))
        return self.weight[noisy][targets].float()


@pytest.fixture(scope="module")
def batch(tok):
    instances, _ = curate(tok, _examples(3, seed=7), FMT, "nap", tok.eos_token_id, tok.mask_token_id)
    return {k: v.long() for k, v in pack(instances, tok.pad_token_id).items()}


def _loss(batch, tok, noise, structure_aware):
    spy = Spy(len(tok))
    loss = masked_diffusion_loss(spy, batch["ids"], batch["segments"], batch["roles"], noise, tok.mask_token_id,
                                 "isolated", structure_aware)
    (call,) = spy.calls
    return loss, call, spy


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), structure_aware=st.booleans())
def test_the_prompt_and_padding_are_never_masked(batch, tok, seed, structure_aware):
    ids, roles = batch["ids"], batch["roles"]
    noise = NoiseDraw.draw(torch.Generator().manual_seed(seed), *ids.shape)
    _, call, _ = _loss(batch, tok, noise, structure_aware)
    noisy, mask = call["noisy"], tok.mask_token_id
    keep = (roles == 0) | (roles == -1) | ((roles == 1) if structure_aware else False)
    assert torch.equal(noisy[keep], ids[keep])
    may = (roles == 2) | ((roles == 1) if not structure_aware else False)
    assert torch.equal(call["targets"], may & (noise.u < noise.t[:, None]))
    assert torch.equal(noisy == mask, call["targets"])
    assert call["attention"] == "isolated" and torch.equal(call["segments"], batch["segments"])
    expected_positions = torch.where(batch["segments"] == PAD, -1, torch.arange(ids.shape[1]))
    assert torch.equal(call["positions"], expected_positions)


@pytest.mark.parametrize("structure_aware", [True, False])
def test_headers_are_masked_only_without_structure_awareness(batch, tok, structure_aware):
    ids, roles = batch["ids"], batch["roles"]
    everything = NoiseDraw(t=torch.ones(ids.shape[0]), u=torch.zeros(ids.shape))  # u < t everywhere
    _, call, _ = _loss(batch, tok, everything, structure_aware)
    masked = call["noisy"] == tok.mask_token_id
    assert masked[roles == 2].all()
    assert not masked[(roles == 0) | (roles == -1)].any()
    headers = masked[roles == 1]
    assert headers.numel() > 0
    assert (not headers.any()) if structure_aware else headers.all()


@pytest.mark.parametrize("structure_aware", [True, False])
def test_loss_equals_a_hand_computation(batch, tok, structure_aware):
    ids, roles = batch["ids"], batch["roles"]
    u = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1))
    noise = NoiseDraw(t=torch.tensor([0.25, 0.6, 0.9]), u=u)
    loss, _, spy = _loss(batch, tok, noise, structure_aware)
    rows = []
    for b in range(ids.shape[0]):
        response = (roles[b] == 2) | ((roles[b] == 1) & (not structure_aware))
        masked = response & (noise.u[b] < noise.t[b])
        assert masked.any()
        # Every masked position reads the mask id, so the spy's logits there are W[mask_id].
        log_p = torch.log_softmax(spy.weight[tok.mask_token_id].float().double(), dim=-1)
        ce = sum(-log_p[ids[b, p]] for p in masked.nonzero()[:, 0].tolist())
        rows.append(ce / float(noise.t[b]) / int(response.sum()))
    expected = torch.stack(rows).mean()
    # fp32 cross-entropy summed over ~100 positions against a float64 sum: ~1e-6 relative.
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


# --- training logits --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llada", "dream"])
def tiny(request, tmp_path_factory):
    root, config, _ = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=21)
    return paradec.load(root), config


def _canvas(config, seed=0, batch=2):
    spec = AttentionSpec.from_lengths("isolated", 5, [4, 3, 4], 3)
    positions = torch.arange(spec.total_len).expand(batch, -1)
    segments = spec.segment_ids(torch.arange(spec.total_len)).expand(batch, -1)
    ids = torch.randint(5, config["vocab_size"], (batch, spec.total_len), generator=torch.Generator().manual_seed(seed))
    return spec, ids, positions, segments


@pytest.mark.parametrize("mode", ["isolated", "canvas"])
def test_training_logits_equal_the_decoding_forward(tiny, mode):
    model, config = tiny
    spec, ids, positions, segments = _canvas(config)
    g = torch.Generator().manual_seed(3)
    # 6 targets per row, never position 0 (a shifted model cannot predict it).
    at = torch.stack([torch.randperm(spec.total_len - 1, generator=g)[:6].sort().values + 1 for _ in range(2)])
    targets = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, at, True)
    trained = model.module.training_logits(ids, positions, segments, mode, targets)
    decoded = model(ids, positions, segments, mode, logits_at=at)
    assert trained.shape == (12, config["vocab_size"]) and trained.requires_grad
    torch.testing.assert_close(trained.detach(), decoded.reshape(12, -1), **FP32)


def test_a_shifted_model_is_not_trained_on_position_0(tiny):
    model, config = tiny
    _, ids, positions, segments = _canvas(config)
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[0, 0] = True
    if model.spec.shift_logits:
        with pytest.raises(paradec.InputError, match="position 0"):
            model.module.training_logits(ids, positions, segments, "isolated", targets)
    else:
        assert model.module.training_logits(ids, positions, segments, "isolated", targets).shape[0] == 1


def test_isolated_training_logits_of_a_block_ignore_other_blocks(tiny):
    model, config = tiny
    spec, ids, positions, segments = _canvas(config, batch=1)
    (b1, e1), (b2, e2) = spec.blocks[:2]
    changed = ids.clone()
    changed[0, b2:e2] = torch.randint(5, config["vocab_size"], (e2 - b2,), generator=torch.Generator().manual_seed(9))
    assert not torch.equal(changed, ids)
    first = torch.zeros_like(ids, dtype=torch.bool)
    first[0, b1:e1] = True
    summary = torch.zeros_like(ids, dtype=torch.bool)
    summary[0, spec.summary[0] + 1 :] = True

    def logits(x, targets):
        return model.module.training_logits(x, positions[:1], segments[:1], "isolated", targets).detach()

    # Block 1 sees only the prompt and itself: its logits do not move (to rounding: the masked
    # keys' weights are exactly 0, so at most summation-order noise, ~1e-7).
    torch.testing.assert_close(logits(changed, first), logits(ids, first), rtol=1e-6, atol=1e-6)
    # ...while the summary, which sees every block, does.
    assert (logits(changed, summary) - logits(ids, summary)).abs().max() > 1e-3


# --- saving and loading -----------------------------------------------------------------------


@pytest.fixture(params=["llada", "dream", "llada-tied"])
def built(request, tmp_path):
    vocab = write_tokenizer(tmp_path / "tokenizer")
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    if request.param == "dream":
        config = dream_config(vocab)
    else:
        config = llada_config(vocab, weight_tying=request.param == "llada-tied")
    return build(config, seed=4, tokenizer=tokenizer), config


def _args(model, seed=0):
    spec = AttentionSpec.from_lengths("isolated", 4, [5, 5], 3)
    positions = torch.arange(spec.total_len)
    ids = torch.randint(5, 60, (spec.total_len,), generator=torch.Generator().manual_seed(seed))
    return ids[None], positions[None], spec.segment_ids(positions)[None], "isolated"


def test_saved_checkpoint_loads_identically(built, tmp_path):
    model, config = built
    root = save_checkpoint(model.module, config, tmp_path / "ckpt", model.tokenizer, metadata={"step": "7"})
    assert sorted(p.name for p in root.iterdir() if p.suffix == ".tmp") == []
    loaded = paradec.load(root)
    ours, theirs = dict(model.module.named_parameters()), dict(loaded.module.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(loaded(*_args(model)), model(*_args(model)))
    assert loaded.spec == model.spec
    with safe_open(root / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"step": "7"}


def test_bf16_export_is_smaller_and_loads(built, tmp_path):
    model, config = built
    fp32 = save_checkpoint(model.module, config, tmp_path / "fp32", model.tokenizer)
    bf16 = save_checkpoint(model.module, config, tmp_path / "bf16", model.tokenizer, dtype=torch.bfloat16)
    size = lambda root: (root / "model.safetensors").stat().st_size  # noqa: E731
    assert size(bf16) < 0.6 * size(fp32)
    with safe_open(bf16 / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = paradec.load(bf16)  # fp32 on the CPU
    for name, param in loaded.module.named_parameters():
        assert torch.equal(param, dict(model.module.named_parameters())[name].bfloat16().float()), name
    assert paradec.load(bf16, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("saved"), "llada", seed=8)
    return root


@pytest.mark.parametrize("keep", [0, 4, 100, 0.5, -1])
def test_a_truncated_weights_file_is_a_checkpoint_error(saved, tmp_path, keep):
    root = shutil.copytree(saved, tmp_path / "ckpt")
    weights = root / "model.safetensors"
    data = weights.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    weights.write_bytes(data[:n])
    with pytest.raises(paradec.CheckpointError, match="corrupt or partial"):
        paradec.load(root)


@pytest.mark.parametrize("garbage", [
    random.Random(0).randbytes(4096),
    (12).to_bytes(8, "little") + b"not json!!!!" + bytes(64),  # a plausible length, then no header
])
def test_garbage_weights_are_a_checkpoint_error(saved, tmp_path, garbage):
    root = shutil.copytree(saved, tmp_path / "ckpt")
    (root / "model.safetensors").write_bytes(garbage)
    with pytest.raises(paradec.CheckpointError, match="corrupt or partial"):
        paradec.load(root)


# --- the trainer ------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("steps", dict(steps=0)), ("batch_size", dict(batch_size=0)), ("save_every", dict(save_every=True)),
    ("lr", dict(lr=2.0)), ("warmup", dict(steps=10, warmup=11)), ("warmup", dict(warmup=-1)),
    ("min_lr", dict(min_lr=1.5)), ("attention", dict(attention="x")), ("max_minutes", dict(max_minutes=0)),
    ("model", dict(model={})),
])
def test_train_config_names_the_bad_field(field, value):
    base = dict(data="d", tokenizer="t", out="o", model={"model_type": "llada"}, steps=100, warmup=10)
    TrainConfig(**base)  # the base is valid
    with pytest.raises(paradec.ConfigError, match=field):
        TrainConfig(**(base | value))


def test_learning_rate_warms_up_then_decays_to_min_lr():
    config = TrainConfig(data="d", tokenizer="t", out="o", model={"model_type": "llada"}, steps=100, warmup=10,
                         lr=1e-3, min_lr=0.1)
    lrs = [config.lr_at(s) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]


def _state(out: Path) -> dict:
    return torch.load(out / "trainer_state.pt", weights_only=True)


def test_training_writes_a_checkpoint_that_loads_and_decodes(trained):
    config, out = trained
    log = _log(out)
    assert [line["step"] for line in log] == [1, 2, 3, 4]
    assert all(math.isfinite(line["loss"]) and line["loss"] > 0 for line in log)
    assert [line["lr"] for line in log] == [config.lr_at(s) for s in range(4)]
    assert _state(out)["step"] == 4
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata()["step"] == "4"
    assert json.loads((out / "train_config.json").read_text())["dataset"]["kind"] == "nap"
    model = paradec.load(out)
    question = arith.test_problems()[0].question
    result = paradec.generate(model, question, blocks=2, block_len=8, summary_len=4)
    assert len(result.blocks) == 2 and len(result.token_ids) == 2 * 9 + 5
    assert model.spec.mask_id not in result.token_ids


class _Interrupted(Exception):
    pass


def test_resumed_run_equals_an_uninterrupted_one(trained, tmp_path, monkeypatch):
    config, straight = trained
    save = trainer_module._save

    def save_then_die(cfg, model, model_config, optimizer, step, out, env):
        save(cfg, model, model_config, optimizer, step, out, env)
        if step == 2:
            raise _Interrupted

    monkeypatch.setattr(trainer_module, "_save", save_then_die)
    with pytest.raises(_Interrupted):
        train(replace(config, out=str(tmp_path / "cut")))
    monkeypatch.undo()
    assert _state(tmp_path / "cut")["step"] == 2
    resumed = train(replace(config, out=str(shutil.copytree(tmp_path / "cut", tmp_path / "copy")), resume=True))
    # Same batches, noise, schedule and optimizer state: the CPU run is bitwise reproducible.
    a, b = paradec.load(straight).module.state_dict(), paradec.load(resumed).module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _state(straight)["optimizer"]["state"], _state(resumed)["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    timeless = lambda out: [{k: v for k, v in line.items() if k not in ("seconds", "tokens_per_s")}  # noqa: E731
                            for line in _log(out)]
    assert timeless(resumed) == timeless(straight)  # steps 1-2 from the cut run, 3-4 resumed


def test_resume_without_trainer_state_is_a_checkpoint_error(trained, tmp_path):
    config, out = trained
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "trainer_state.pt").unlink()
    with pytest.raises(paradec.CheckpointError, match="trainer_state.pt"):
        train(replace(config, out=str(copy), resume=True))
    with pytest.raises(paradec.CheckpointError, match="no checkpoint"):
        train(replace(config, out=str(tmp_path / "empty"), resume=True))


def test_resume_from_an_interrupted_save_is_a_checkpoint_error(trained, tmp_path):
    config, out = trained
    copy = shutil.copytree(out, tmp_path / "copy")
    weights = copy / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"step": "3"})  # weights of step 3, state of step 4
    with pytest.raises(paradec.CheckpointError, match="interrupted"):
        train(replace(config, out=str(copy), resume=True))


def test_resume_over_weights_without_a_step_is_a_checkpoint_error(trained, tmp_path):
    config, out = trained
    copy = shutil.copytree(out, tmp_path / "copy")
    weights = copy / "model.safetensors"
    save_file(load_file(weights), weights)  # no metadata at all
    with pytest.raises(paradec.CheckpointError):
        train(replace(config, out=str(copy), resume=True))


def test_a_file_that_is_not_a_dataset_is_a_config_error(trained, tmp_path):
    _, out = trained
    with pytest.raises(paradec.ConfigError, match="not a paradec dataset"):
        PackedDataset(out / "model.safetensors")  # has metadata, not a dataset's
    with pytest.raises(paradec.ConfigError, match="does not exist"):
        PackedDataset(tmp_path / "none.safetensors")


def test_a_dataset_file_without_metadata_is_a_config_error(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"ids": torch.zeros(2, 3, dtype=torch.int32)}, path)
    with pytest.raises(paradec.ConfigError, match="not a paradec dataset"):
        PackedDataset(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Dataset files of n rows (one token each) for the batch-order tests."""
    root, out = tmp_path_factory.mktemp("datasets"), {}
    for n in (1, 3, 7, 40):
        rows = torch.arange(n, dtype=torch.int32)[:, None]
        tensors = {"ids": rows, "segments": torch.zeros(n, 1, dtype=torch.int8),
                   "roles": torch.full((n, 1), 2, dtype=torch.int8)}
        save_file(tensors, root / f"{n}.safetensors", metadata={"paradec": json.dumps({"kind": "nap", "mask_id": 1})})
        out[n] = PackedDataset(root / f"{n}.safetensors")
    return out


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 50), seed=st.integers(0, 2**32))
@pytest.mark.parametrize("n", [1, 3, 7, 40])
def test_batches_cover_each_row_once_per_epoch(datasets, n, batch, seed):
    dataset = datasets[n]
    steps = max(2, -(-3 * n // batch))  # through at least three epochs
    order = torch.cat([dataset.batch_indices(seed, s, batch) for s in range(steps)]).tolist()
    assert len(order) == steps * batch
    for epoch in range(len(order) // n):
        assert sorted(order[epoch * n : (epoch + 1) * n]) == list(range(n)), epoch
    # Stateless: steps asked out of order (as on resume) get the same rows.
    backwards = [dataset.batch_indices(seed, s, batch).tolist() for s in reversed(range(steps))]
    assert sum(reversed(backwards), []) == order


def test_the_task_dataset_batches_are_real_rows(task_data):
    dataset = PackedDataset(task_data / "nap.safetensors")
    assert len(dataset) == 40 and dataset.meta["kind"] == "nap"
    epoch = torch.cat([dataset.batch_indices(0, s, 8) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))
    longcot = PackedDataset(task_data / "longcot.safetensors")
    assert len(longcot) == 40 and longcot.meta["kind"] == "longcot"
    assert (dataset.roles == 1).any() and not (longcot.roles == 1).any()


# --- DDP --------------------------------------------------------------------------------------


def test_two_gloo_ranks_train_like_one_process(task_data, tmp_path):
    config = _config(task_data, tmp_path / "ddp", steps=3, save_every=3)
    (tmp_path / "config.json").write_text(json.dumps(asdict(config)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(TESTS / "train_worker.py"), str(tmp_path / "config.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    single = train(replace(config, out=str(tmp_path / "one")))
    a, b = paradec.load(tmp_path / "ddp").module.state_dict(), paradec.load(single).module.state_dict()
    # Each rank's loss is the mean of its 2 rows and DDP averages the gradients, so the update is
    # the one-process update up to summation order (all-reduce, padding trimmed per rank): ~1e-7
    # in the gradients, ~2e-8 in the weights after 3 steps (measured). A rank training on the
    # wrong rows moves weights by ~1e-3, the size of one step at lr = 1e-3. (Adam hides the
    # gradients' scale, so the logged grad_norm below checks that DDP averages, not sums.)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    start = build(config.model, seed=config.seed).module.state_dict()
    assert max((a[k] - start[k]).abs().max() for k in a) > 1e-4  # and it did train
    # The logged loss is the mean over ranks, i.e. the global batch's loss (logged to 5 decimals).
    for x, y in zip(_log(tmp_path / "ddp"), _log(single), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


# --- the CLI ----------------------------------------------------------------------------------


def _cli(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "paradec.train", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=ENV, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_cli_data_fit_export(tmp_path):
    data = tmp_path / "data"
    summary = json.loads(_cli("data", "--out", data, "--problems", 30, cwd=tmp_path).strip().splitlines()[-1])
    assert summary == {"nap": {"kept": 30, "rejected": {}}, "longcot": {"kept": 30, "rejected": {}}}
    assert json.loads((data / "curation.json").read_text())["nap"]["kept"] == 30
    ckpt, dest = tmp_path / "ckpt", tmp_path / "dest"
    _cli("fit", "--data", data / "nap.safetensors", "--tokenizer", data / "tokenizer", "--out", ckpt,
         "--layers", 1, "--width", 32, "--heads", 2, "--mlp", 64, "--steps", 2, "--batch-size", 2, "--warmup", 1,
         cwd=tmp_path)
    assert [line["step"] for line in _log(ckpt)] == [2]
    out = _cli("export", ckpt, dest, "--dtype", "bf16", cwd=tmp_path)
    assert "exported" in out and not (dest / "trainer_state.pt").exists()
    assert (dest / "model.safetensors").stat().st_size < 0.6 * (ckpt / "model.safetensors").stat().st_size
    exported, source = paradec.load(dest), paradec.load(ckpt)
    for (name, p), (_, q) in zip(exported.module.named_parameters(), source.module.named_parameters()):
        assert torch.equal(p, q.bfloat16().float()), name


def test_cli_fit_with_few_steps_and_the_default_warmup(task_data, tmp_path):
    from paradec.train.__main__ import main

    main(["fit", "--data", str(task_data / "nap.safetensors"), "--tokenizer", str(task_data / "tokenizer"),
          "--out", str(tmp_path / "ckpt"), "--layers", "1", "--width", "32", "--heads", "2", "--mlp", "64",
          "--steps", "2", "--batch-size", "2"])
    assert (tmp_path / "ckpt" / "model.safetensors").exists()


# --- review fixes: ranks stop together, ids agree, defaults follow the data -------------------


def test_max_minutes_stops_every_rank_at_the_same_step(task_data, tmp_path):
    # Rank 1's clock runs out after its first step; rank 0's never does. Both must stop and save
    # at the same step instead of one leaving the others in a collective.
    config = _config(task_data, tmp_path / "ddp", steps=6, save_every=6, max_minutes=1.0)
    (tmp_path / "config.json").write_text(json.dumps(asdict(config)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(TESTS / "train_worker.py"), str(tmp_path / "config.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=ENV | {"PARADEC_TEST_FAST_CLOCK_RANK": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 done" in done.stdout and "rank 1 done" in done.stdout
    assert 1 <= _state(tmp_path / "ddp")["step"] < 6


def test_generation_defaults_follow_the_data(task_data, trained, tmp_path):
    _, nap_out = trained
    assert paradec.load(nap_out).generation == {"blocks": 4, "block_len": FMT.block_len, "summary_len": FMT.summary_len}
    longcot = train(_config(task_data, tmp_path / "lc", data=str(task_data / "longcot.safetensors"), steps=1))
    model = paradec.load(longcot)
    assert model.generation == {"mode": "ao", "answer_len": FMT.longcot_len(4)}
    assert paradec.generate(model, "Tom has 5 pens . How many pens does Tom have now ?").blocks == []


def test_the_built_in_long_cot_model_decodes_one_region_by_default():
    result = paradec.generate(paradec.load("paradec-tiny-longcot"), arith.test_problems()[1].question, tokens_per_step=8)
    assert result.blocks == [] and result.summary.startswith("path 1 :")


def test_a_mask_id_that_differs_from_the_data_is_refused(task_data, tmp_path):
    tokenizer = load_tokenizer(task_data / "tokenizer")
    model = tiny_model_config(tokenizer, **TINY) | {"mask_token_id": 2}
    with pytest.raises(paradec.ConfigError, match="mask id differs"):
        train(_config(task_data, tmp_path / "x", model=model))


def test_rows_longer_than_the_model_are_refused(task_data, tmp_path):
    tokenizer = load_tokenizer(task_data / "tokenizer")
    model = tiny_model_config(tokenizer, **TINY) | {"max_sequence_length": 64}
    with pytest.raises(paradec.ConfigError, match="maximum length 64"):
        train(_config(task_data, tmp_path / "x", model=model))


def test_fine_tuning_starts_from_the_given_weights(task_data, trained, tmp_path):
    _, start = trained
    out = train(_config(task_data, tmp_path / "ft", model={}, init_from=str(start), steps=1, lr=1e-9, warmup=0))
    a, b = paradec.load(start).module.state_dict(), paradec.load(out).module.state_dict()
    for k in a:  # one step at lr 1e-9 moves no weight by more than ~1e-9 (Adam's step <= lr)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_a_corrupt_trainer_state_is_a_checkpoint_error(trained, tmp_path):
    config, out = trained
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "trainer_state.pt").write_bytes(b"not a zip")
    with pytest.raises(paradec.CheckpointError, match="corrupt or partial"):
        train(replace(config, out=str(copy), resume=True, steps=6))


def test_train_config_types_are_checked(task_data, tmp_path):
    for bad in (dict(lr="1e-3"), dict(grad_clip=None), dict(seed=-1), dict(model="config.json")):
        name = next(iter(bad))
        with pytest.raises(paradec.ConfigError, match=name):
            _config(task_data, tmp_path, **bad)


def test_bodies_never_go_through_the_chat_template(tmp_path):
    tok = build_word_tokenizer(arith.vocabulary() + ["user", "assistant", ":"], tmp_path / "tok")
    tok.chat_template = "{% for m in messages %}user : {{ m['content'] }} . assistant :{% endfor %}"
    example = _examples(1)[0]
    instance = nap_instance(tok, example, FMT, tok.eos_token_id, tok.mask_token_id)
    text = tok.decode(instance.ids, skip_special_tokens=True)
    assert text.startswith("user : ") and text.count("user") == 1 and text.count("assistant") == 1


def test_unknown_words_and_empty_questions_are_rejected_in_every_format(tok):
    from paradec.train.recipe import _same_examples

    good = _examples(2)
    unknown = replace(good[0], question=good[0].question.replace("How", "Zebras"))
    empty = replace(good[0], question="  ")
    too_long = replace(good[0], paths=(good[0].paths[0] + " 1 + 1 = 2 ." * 8,) + good[0].paths[1:])  # fits long-CoT only
    examples = [good[0], unknown, empty, too_long, good[1]]
    built = {k: curate(tok, examples, FMT, k, tok.eos_token_id, tok.mask_token_id) for k in ("nap", "longcot")}
    same = _same_examples(built, len(examples))
    for kind, (instances, report) in same.items():
        assert len(instances) == 2 and [i for i, _ in report.rejected] == [1, 2, 3], kind
        assert report.counts == {"unknown words": 1, "empty question": 1, "too long": 1}


def test_arness_leaves_out_eos_fill():
    from paradec.metrics import without_fill

    # body [1, 6): EOS (id 0) decoded at position 2; 3..5 are fill. body [7, 10): EOS at 8.
    trace = [-1, 0, 1, 2, 2, 2, -1, 3, 4, 4]
    tokens = [9, 5, 0, 0, 0, 0, 9, 5, 0, 0]
    assert without_fill(trace, tokens, [(1, 6), (7, 10)], {0}) == [-1, 0, 1, -1, -1, -1, -1, 3, 4, -1]
