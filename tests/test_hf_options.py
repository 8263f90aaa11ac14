"""Hugging Face habits on paradec.generate: max_new_tokens, stop strings, num_return_sequences,
streamers, top_k/top_p sampling, the result type (text, finish_reason, repr, groups for plots),
and the settings that need another one (tiny random models, CPU)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import paradec
from paradec import ConfigError, GenerationConfig, InputError, ops
from paradec.api import build_layout, make_result
from paradec.decoding.runner import DecodeOutput
from paradec.ops.scoring import Sampling, Scores, sampling_keep, score_logits

from tiny import tiny_checkpoint

PROMPT = "the 3 + 4 is ?"
PROMPTS = ["the 3 + 4 is ?", "a b c d e f", "1 2"]
SMALL_NAP = dict(blocks=2, block_len=6, summary_len=6)


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=21)
    return paradec.load(root)


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=12)
    return paradec.load(root)


def _cut(text: str, stops: list[str]) -> str:
    hits = [text.find(s) for s in stops if s in text]
    return text[:min(hits)] if hits else text


# --- sampling filters ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ao", "block", "nap"])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_and_a_tiny_top_p_are_greedy(model, mode, temperature):
    base = dict(mode="nap", **SMALL_NAP) if mode == "nap" else dict(mode=mode, answer_len=12, block_len=6)
    greedy = paradec.generate(model, PROMPT, **base)
    top_k = paradec.generate(model, PROMPT, temperature=temperature, top_k=1, seed=7, **base)
    top_p = paradec.generate(model, PROMPT, temperature=temperature, top_p=1e-9, seed=7, **base)
    assert top_k.token_ids == greedy.token_ids and top_k.trace == greedy.trace
    assert top_p.token_ids == greedy.token_ids and top_p.trace == greedy.trace


def test_filters_change_samples_and_stay_reproducible(llada):
    kw = dict(mode="ao", answer_len=16, temperature=1.5, seed=3)
    plain = paradec.generate(llada, PROMPT, **kw)
    again = paradec.generate(llada, PROMPT, top_k=3, **kw)
    assert again.token_ids == paradec.generate(llada, PROMPT, top_k=3, **kw).token_ids
    assert paradec.generate(llada, PROMPT, top_k=llada.spec.vocab_size, **kw).token_ids == plain.token_ids
    assert paradec.generate(llada, PROMPT, top_p=1.0, **kw).token_ids == plain.token_ids  # 1 is off
    assert again.token_ids != plain.token_ids or paradec.generate(llada, PROMPT, top_p=0.3, **kw).token_ids != plain.token_ids


@pytest.mark.parametrize("filters", [dict(top_k=4), dict(top_p=0.6), dict(top_k=6, top_p=0.8),
                                     dict(top_p=0.7, score_on="sampling")])
def test_sampled_filters_do_not_depend_on_the_batch(llada, filters):
    """Contract 7: request r of a batch (seed + r) gets the tokens it gets alone with that seed."""
    kw = dict(mode="ao", answer_len=10, temperature=1.2, tokens_per_step=2, **filters)
    batch = paradec.generate(llada, PROMPTS, seed=40, **kw)
    for r, prompt in enumerate(PROMPTS):
        alone = paradec.generate(llada, prompt, seed=40 + r, **kw)
        assert alone.token_ids == batch[r].token_ids and alone.trace == batch[r].trace


def test_nap_blocks_with_filters_do_not_depend_on_the_other_blocks(llada):
    kw = dict(temperature=1.0, top_p=0.8, top_k=5, seed=2, block_len=6, summary_len=4)
    two = paradec.generate(llada, PROMPT, blocks=2, **kw)
    three = paradec.generate(llada, PROMPT, blocks=3, **kw)
    assert two.block_token_ids == three.block_token_ids[:2]


def _reference_keep(scaled: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """One row at a time, in Python floats: top-k keeps values >= the k-th largest; top-p keeps a
    token when the (renormalised) mass of tokens strictly more likely than it is below top_p."""
    keep = torch.zeros_like(scaled, dtype=torch.bool)
    for r, row in enumerate(scaled.tolist()):
        allowed = [v > -math.inf for v in row]
        if top_k is not None:
            kth = sorted(row, reverse=True)[min(top_k, len(row)) - 1]
            allowed = [a and v >= kth for a, v in zip(allowed, row)]
        if top_p is not None:
            top = max(v for v, a in zip(row, allowed) if a)
            weights = [math.exp(v - top) if a else 0.0 for v, a in zip(row, allowed)]
            total = math.fsum(weights)
            probs = [w / total for w in weights]
            allowed = [a and math.fsum(q for q in probs if q > p) < top_p for a, p in zip(allowed, probs)]
        keep[r] = torch.tensor(allowed)
    return keep


def _margin_to_cut(scaled: torch.Tensor, top_p) -> float:
    """How close any token's mass-above comes to top_p (rounding can only flip tokens that close)."""
    if top_p is None:
        return 1.0
    probs = torch.softmax(scaled, -1)
    above = (probs[:, None, :] * (probs[:, None, :] > probs[:, :, None])).sum(-1)
    return float((above - top_p).abs().min())


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(2, 40),
    spread=st.sampled_from([0.1, 1.0, 4.0, 20.0]),
    temperature=st.sampled_from([0.25, 1.0, 3.0]),
    top_k=st.one_of(st.none(), st.integers(1, 45)),
    top_p=st.one_of(st.none(), st.floats(0.01, 0.999)),
    seed=st.integers(0, 10_000),
)
def test_sampling_keep_matches_a_plain_reference(rows, vocab, spread, temperature, top_k, top_p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * spread
    scaled = logits.double() / temperature
    assume(_margin_to_cut(torch.where(scaled >= (scaled.topk(min(top_k, vocab)).values[:, -1:] if top_k else
                                                 -math.inf), scaled, -math.inf), top_p) > 1e-9)
    keep = sampling_keep(scaled, top_k, top_p)
    assert torch.equal(keep, _reference_keep(scaled, top_k, top_p))
    assert keep.gather(1, scaled.argmax(-1, keepdim=True)).all()  # the most likely token is always kept


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(4, 64),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    top_k=st.one_of(st.none(), st.integers(1, 10)),
    top_p=st.one_of(st.none(), st.floats(0.05, 0.99)),
    score_on=st.sampled_from(["model", "sampling"]),
    seed=st.integers(0, 10_000),
)
def test_score_with_filters_draws_inside_the_kept_set_and_routes_to_the_twin(rows, vocab, temperature, top_k, top_p,
                                                                          score_on, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows + 2, vocab, generator=g) * 3
    picked = torch.randint(0, rows + 2, (rows,), generator=g)
    stops, bar = torch.tensor([1]), torch.rand(rows, generator=g) < 0.5
    noise = torch.rand(rows, vocab, generator=g, dtype=torch.float64).clamp_(min=1e-300)
    sampling = Sampling(top_k=top_k, top_p=top_p, score_on=score_on)
    got = ops.score(logits, picked, 0, stops, bar, temperature, noise, sampling)
    want = score_logits(logits[picked], 0, (1,), bar, temperature, noise, top_k, top_p, score_on)
    assert torch.equal(got.tokens, want.tokens)
    for a, b in zip((got.confidence, got.margin, got.neg_entropy), (want.confidence, want.margin, want.neg_entropy)):
        if sampling.plain:  # the kernel: fp32 sums in another order (tests/test_ops.py's tolerance)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        else:  # filters and sampling scores: the twin itself
            assert torch.equal(a, b)
    barred = logits[picked].double()
    barred[:, 0] = -math.inf
    barred[bar, 1] = -math.inf
    keep = sampling_keep(barred / temperature, top_k, top_p)
    assert keep.gather(1, got.tokens[:, None]).all()
    if score_on == "sampling":  # the chosen token's probability under the distribution it was drawn from
        p = torch.softmax((barred / temperature).masked_fill(~keep, -math.inf), -1)
        torch.testing.assert_close(got.confidence.double(), p.gather(1, got.tokens[:, None])[:, 0], rtol=1e-5,
                                   atol=1e-6)


def test_plain_sampling_still_takes_the_kernel_path():
    logits = torch.randn(3, 50)
    rows, stops, bar = torch.arange(3), torch.tensor([1]), torch.zeros(3, dtype=torch.bool)
    noise = torch.rand(3, 50, dtype=torch.float64)
    plain = ops.score(logits, rows, 0, stops, bar, 0.8, noise)
    twin = ops.score_twin(logits, rows, 0, stops, bar, 0.8, noise)
    assert plain.tokens.tolist() == twin.tokens.tolist()
    assert Sampling().plain and not Sampling(top_k=3).plain and not Sampling(score_on="sampling").plain


def test_rank_temperature_draws_positions_by_softmax_of_the_score():
    """Gumbel-top-1 over score / tau: the first pick follows softmax(score / tau)."""
    n, tau = 40000, 0.5
    score = torch.tensor([0.9, 0.6, 0.3])
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, 3, generator=g, dtype=torch.float64)
    s = Scores(tokens=torch.zeros(3), confidence=score, margin=score, neg_entropy=score)
    firsts = []
    for row in u:
        s.rank_noise, s.rank_temperature = -torch.log(-torch.log(row)), tau
        firsts.append(int(s.by_name("confidence").argmax()))
    freq = torch.bincount(torch.tensor(firsts), minlength=3).double() / n
    torch.testing.assert_close(freq, torch.softmax(score.double() / tau, 0), atol=0.012, rtol=0)


def test_rank_temperature_in_generate(llada):
    kw = dict(mode="ao", answer_len=12, temperature=0.7, tokens_per_step=3)
    plain = paradec.generate(llada, PROMPT, seed=1, **kw)
    drawn = [paradec.generate(llada, PROMPT, seed=1, rank_temperature=t, **kw) for t in (0.05, 5.0)]
    assert drawn[1].trace == paradec.generate(llada, PROMPT, seed=1, rank_temperature=5.0, **kw).trace
    assert any(d.trace != plain.trace for d in drawn)
    batch = paradec.generate(llada, PROMPTS, seed=9, rank_temperature=1.0, **kw)
    assert batch[2].trace == paradec.generate(llada, PROMPTS[2], seed=11, rank_temperature=1.0, **kw).trace


# --- max_new_tokens, stop, finish_reason -----------------------------------------------------------
@pytest.mark.parametrize("mode", ["nap", "ao", "ar_order", "random", "block"])
def test_max_new_tokens_bounds_the_text_in_every_mode(llada, mode):
    extra = dict(blocks=2, block_len=6) if mode == "nap" else dict(block_len=4)
    result = paradec.generate(llada, PROMPT, mode=mode, max_new_tokens=7, **extra)
    config = paradec.api.resolve_config(llada, mode=mode, max_new_tokens=7, **extra)
    assert (config.summary_len if mode == "nap" else config.answer_len) == 7
    assert len(result.summary_token_ids) <= 7
    layout = build_layout(llada, config)
    assert layout.bodies[layout.num_think_blocks][1] - layout.bodies[layout.num_think_blocks][0] == 7


def test_max_new_tokens_follows_mode_and_later_overrides():
    c = GenerationConfig.build(None, max_new_tokens=9)
    assert (c.summary_len, c.max_new_tokens) == (9, 9)
    assert GenerationConfig.build(c, mode="ao").answer_len == 9  # carried to the new mode's region
    later = GenerationConfig.build(c, summary_len=20)  # a region length given later wins
    assert (later.summary_len, later.max_new_tokens) == (20, None)
    with pytest.raises(ConfigError, match=r"max_new_tokens=5 and answer_len=6 disagree"):
        GenerationConfig.build(None, mode="ao", max_new_tokens=5, answer_len=6)
    with pytest.raises(ConfigError, match=r"max_new_tokens=5 and summary_len=6 disagree"):
        GenerationConfig(max_new_tokens=5, summary_len=6)
    with pytest.raises(ConfigError, match=r"max_new_tokens must be an int >= 1"):
        GenerationConfig(max_new_tokens=0)


@pytest.mark.parametrize("mode", ["ar_order", "block", "ao", "nap"])
def test_stop_strings_cut_the_text_as_a_full_decode_would(model, mode):
    extra = dict(SMALL_NAP, summary_len=12) if mode == "nap" else dict(answer_len=16, block_len=4)
    # the tiny models' ids beyond the tokenizer's words decode to nothing: take a prompt with text
    prompt, full = next((p, r) for p in PROMPTS + ["x"]
                        if len((r := paradec.generate(model, p, mode=mode, **extra)).text.split()) >= 3 or p == "x")
    words = full.text.split()
    assert len(words) >= 3, full.text
    stops = [" " + words[2], "\u2603never"]
    cut = paradec.generate(model, prompt, mode=mode, stop=stops, **extra)
    assert cut.text == _cut(full.text, stops) and cut.summary == cut.text
    assert cut.finish_reason == "stop" and all(s not in cut.text for s in stops)
    assert model.tokenizer.decode(cut.summary_token_ids, skip_special_tokens=True) == cut.text
    n = len(cut.token_ids)
    assert cut.token_ids == full.token_ids[:n] and cut.groups == full.groups[:n]
    assert len(cut.trace) == n and cut.steps <= full.steps
    if mode == "ar_order":  # one token a step, left to right: decoding ended once the stop's token was in
        assert cut.steps == cut.nfe == min(full.steps, len(cut.summary_token_ids) + 1)


def test_a_stop_string_that_never_appears_changes_nothing(llada):
    full = paradec.generate(llada, PROMPT, mode="ao", answer_len=12)
    same = paradec.generate(llada, PROMPT, mode="ao", answer_len=12, stop="\u2603")
    assert (same.text, same.token_ids, same.finish_reason, same.nfe) == (full.text, full.token_ids, "length", full.nfe)


def test_finish_reason_says_stop_at_an_eos_and_length_otherwise(llada):
    config = GenerationConfig(mode="ao", answer_len=6)
    layout = build_layout(llada, config)
    out = DecodeOutput(torch.zeros(1), torch.zeros(1), 3, 3, {})
    eos, word = llada.spec.eos_id, llada.tokenizer.convert_tokens_to_ids("a")
    ended = make_result(llada, layout, [5], [word, word, eos, eos, eos, eos], list(range(6)), out)
    full = make_result(llada, layout, [5], [word] * 6, list(range(6)), out)
    assert (ended.finish_reason, ended.text) == ("stop", "a a")
    assert (full.finish_reason, full.text) == ("length", "a a a a a a")


def test_stop_needs_a_tokenizer_and_takes_strings(llada):
    with pytest.raises(ConfigError, match="stop must be a string or a list of strings"):
        GenerationConfig(stop=[1])
    with pytest.raises(ConfigError, match="stop strings must not be empty"):
        GenerationConfig(stop=["a", ""])
    assert GenerationConfig(stop=["x", "y", "x"]).stop == ("x", "y")
    assert GenerationConfig(stop=[]).stop is None
    bare = paradec.api.DiffusionModel(module=llada.module, spec=llada.spec, tokenizer=None)
    with pytest.raises(InputError, match="stop strings cut text: this model has no tokenizer"):
        paradec.generate(bare, [5, 6, 7], mode="ao", answer_len=4, stop="x")


# --- num_return_sequences ---------------------------------------------------------------------------
def test_n_sequences_are_single_generates_with_seed_plus_i(llada):
    kw = dict(mode="ao", answer_len=8, temperature=1.0)
    samples = paradec.generate(llada, PROMPT, seed=20, num_return_sequences=3, **kw)
    assert isinstance(samples, list) and len(samples) == 3
    for i, sample in enumerate(samples):
        assert sample.token_ids == paradec.generate(llada, PROMPT, seed=20 + i, **kw).token_ids
    grouped = paradec.generate(llada, PROMPTS[:2], seed=20, num_return_sequences=2, **kw)
    assert [len(g) for g in grouped] == [2, 2]
    for p, group in enumerate(grouped):  # prompt-major: request p * n + i uses seed + p * n + i
        for i, sample in enumerate(group):
            assert sample.token_ids == paradec.generate(llada, PROMPTS[p], seed=20 + 2 * p + i, **kw).token_ids
    assert len({tuple(s.token_ids) for s in samples}) > 1


def test_n_sequences_need_randomness(llada):
    with pytest.raises(ConfigError, match="num_return_sequences=2 would return 2 identical greedy results"):
        paradec.generate(llada, PROMPT, mode="ao", answer_len=4, num_return_sequences=2)
    random_order = paradec.generate(llada, PROMPT, mode="random", answer_len=6, num_return_sequences=2)
    assert len(random_order) == 2


# --- streamers --------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("mode", ["ar_order", "block", "ao", "nap"])
def test_streamer_receives_the_prompt_then_the_text_as_committed(model, mode):
    extra = dict(SMALL_NAP) if mode == "nap" else dict(answer_len=16, block_len=4)
    recorder = Recorder()
    result = paradec.generate(model, PROMPT, mode=mode, streamer=recorder, **extra)
    assert recorder.ended == 1 and recorder.puts[0] == [result.prompt_ids]
    streamed = [t for chunk in recorder.puts[1:] for t in chunk]
    assert streamed == result.summary_token_ids
    assert model.tokenizer.decode(streamed, skip_special_tokens=True) == result.text
    if mode in ("ar_order", "block") and len(streamed) > 4:
        assert len(recorder.puts) > 2  # it grew while decoding, not all at the end


def test_transformers_text_iterator_streamer(llada):
    from transformers import TextIteratorStreamer

    full = paradec.generate(llada, PROMPT, mode="ar_order", answer_len=16)
    words = full.text.split()
    stops = [" " + words[-1]] if len(words) > 1 else None
    streamer = TextIteratorStreamer(llada.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = paradec.generate(llada, PROMPT, mode="ar_order", answer_len=16, streamer=streamer, stop=stops)
    assert "".join(streamer).strip() == result.text.strip()
    assert result.text == _cut(full.text, stops or [])


def test_streamer_refusals(llada):
    with pytest.raises(ConfigError, match="a streamer follows one sequence"):
        paradec.generate(llada, PROMPTS, mode="ao", answer_len=4, streamer=Recorder())
    with pytest.raises(ConfigError, match="a streamer follows one sequence"):
        paradec.generate(llada, PROMPT, mode="ao", answer_len=4, temperature=1.0, num_return_sequences=2,
                         streamer=Recorder())
    with pytest.raises(InputError, match=r"streamer must have put\(token_ids\) and end\(\)"):
        paradec.generate(llada, PROMPT, mode="ao", answer_len=4, streamer=object())


# --- the result -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nap", "ao", "ar_order", "random", "block"])
def test_text_repr_and_plot_in_every_mode(llada, mode, tmp_path):
    from paradec.plots import decode_order_png

    extra = dict(SMALL_NAP) if mode == "nap" else dict(answer_len=12, block_len=4)
    result = paradec.generate(llada, PROMPT, mode=mode, **extra)
    assert result.text == result.summary and result.finish_reason in ("stop", "length")
    assert result.text == llada.tokenizer.decode(result.summary_token_ids, skip_special_tokens=True)
    assert (len(result.blocks) == 2) == (mode == "nap")
    text = repr(result)
    assert len(text) < 200 and "\n" not in text and str(result.token_ids) not in text
    assert text.startswith("GenerationResult(text=")
    layout = build_layout(llada, paradec.api.resolve_config(llada, mode=mode, **extra))
    assert result.groups == layout.groups.tolist() and len(result.groups) == len(result.trace)
    path = decode_order_png(result.trace, result.groups, tmp_path / "order.png")
    assert path.stat().st_size > 1000


def test_one_prompt_one_result_a_batch_a_list(llada):
    ids = llada.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    kw = dict(mode="ao", answer_len=4)
    assert isinstance(paradec.generate(llada, torch.tensor(ids), **kw), paradec.GenerationResult)
    batch = paradec.generate(llada, torch.tensor([ids]), **kw)  # a 2-D tensor is a batch, even of one row
    assert isinstance(batch, list) and len(batch) == 1


# --- settings that need another -----------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(top_p=0.9), r"top_p=0.9 restricts sampling: it needs temperature > 0"),
    (dict(top_k=5), r"top_k=5 restricts sampling: it needs temperature > 0"),
    (dict(top_k=-1, temperature=1.0), r"top_k must be an int >= 1"),
    (dict(top_p=1.5, temperature=1.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_k=2.5, temperature=1.0), r"top_k must be an int or None"),
    (dict(score_on="sampling"), r"score_on='sampling' .* needs temperature > 0"),
    (dict(score_on="logits", temperature=1.0), r"score_on must be one of \['model', 'sampling'\]"),
    (dict(policy="confidence", threshold=0.5), r"threshold=0.5 applies to policy='threshold'"),
    (dict(policy="margin", factor=2.0), r"factor=2.0 applies to policy='factor'"),
    # given explicitly at their defaults (Fast-dLLM's 0.9): refused as well, never dropped unseen
    (dict(policy="confidence", threshold=0.9), r"threshold=0.9 applies to policy='threshold'"),
    (dict(policy="entropy", threshold=0.9), r"threshold=0.9 applies to policy='threshold'"),
    (dict(policy="margin", factor=1.0), r"factor=1.0 applies to policy='factor'"),
    (dict(threshold=0.9, factor=1.0), r"factor=1.0 applies to policy='factor' .*, got policy='threshold'"),
    (dict(rank_temperature=1.0), r"rank_temperature draws its ranking noise .* needs temperature > 0"),
    (dict(rank_temperature=1.0, temperature=1.0, policy="threshold"), r"rank_temperature applies to the top-k"),
    (dict(rank_temperature=1.0, temperature=1.0, mode="ar_order"), r"mode='ar_order' does not rank by it"),
    (dict(rank_temperature=-1.0), r"rank_temperature must be >= 0"),
    (dict(num_return_sequences=0), r"num_return_sequences must be an int >= 1"),
])
def test_settings_that_need_another_are_refused_by_name(llada, overrides, message):
    with pytest.raises(ConfigError, match=message):
        paradec.generate(llada, PROMPT, **(dict(mode="ao", answer_len=4) | overrides))


def test_threshold_and_factor_imply_their_policy(llada):
    kw = dict(mode="ao", answer_len=8)
    assert GenerationConfig.build(None, threshold=0.5).policy == "threshold"
    assert GenerationConfig.build(None, factor=2.0).policy == "factor"
    implied = paradec.generate(llada, PROMPT, threshold=0.5, **kw)
    explicit = paradec.generate(llada, PROMPT, policy="threshold", threshold=0.5, **kw)
    assert implied.trace == explicit.trace
    # an override that changes the policy drops the old policy's parameter
    base = GenerationConfig(policy="threshold", threshold=0.5)
    assert GenerationConfig.build(base, policy="margin").threshold == 0.9
    sampled = GenerationConfig(temperature=1.0, top_p=0.5, top_k=3, score_on="sampling")
    greedy = GenerationConfig.build(sampled, temperature=0)
    assert (greedy.top_p, greedy.top_k, greedy.score_on) == (None, None, "model")


# --- what transformers callers pass ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """paradec-tiny: a real tokenizer whose pad id (0) is also its EOS, as LLaDA's and many are."""
    return paradec.load("paradec-tiny")


TINY = dict(blocks=2, tokens_per_step=4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_take_an_attention_mask_or_are_refused(tiny, side):
    """A tokenizer's padded batch: with its attention_mask (as an argument, or the tokenizer's
    output itself as prompts) each row decodes as its prompt alone; without it, a warning names
    attention_mask (its pads would be read as prompt)."""
    from paradec.train.tasks import arith

    questions = [p.question for p in arith.test_problems()[:3]]
    alone = [paradec.generate(tiny, q, **TINY).token_ids for q in questions]
    tokenizer, before = tiny.tokenizer, tiny.tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        encoded = tokenizer(questions, padding=True, return_tensors="pt")
        as_lists = tokenizer(questions, padding=True)  # lists, not tensors
    finally:
        tokenizer.padding_side = before
    assert not bool(encoded["attention_mask"].all())  # some row is padded
    masked = paradec.generate(tiny, encoded["input_ids"], attention_mask=encoded["attention_mask"], **TINY)
    assert [r.token_ids for r in masked] == alone
    assert [r.token_ids for r in paradec.generate(tiny, encoded, **TINY)] == alone
    assert [r.token_ids for r in paradec.generate(tiny, as_lists["input_ids"],
                                                  attention_mask=as_lists["attention_mask"], **TINY)] == alone
    unpadded = tokenizer(questions)  # transformers' default call: rows of their own lengths, masks of ones
    assert len({len(row) for row in unpadded["input_ids"]}) > 1
    assert [r.token_ids for r in paradec.generate(tiny, unpadded, **TINY)] == alone
    with pytest.warns(UserWarning, match=f"{'starts' if side == 'left' else 'ends'} with the pad token id 0.*"
                                         f"attention_mask="):  # warned, as transformers does: the id may be text
        paradec.generate(tiny, encoded["input_ids"], **TINY)
    padded_one = torch.tensor([tokenizer(questions[0])["input_ids"] + [tokenizer.pad_token_id] * 3])
    with pytest.warns(UserWarning, match="ends with the pad token id 0"):  # [1, length] (padding="max_length")
        paradec.generate(tiny, padded_one, **TINY)


def test_a_bad_attention_mask_is_refused_by_name(tiny):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    for mask, said in [([[1, 1, 1]], "attention_mask has shape"), ([[1, 0, 1, 1], [1] * 4], "row 0 has padding"),
                       ([[0] * 4, [1] * 4], "row 0 masks every token"), ([[2] * 4, [1] * 4], "holds 1 .* and 0"),
                       ([[0.5] * 4, [1] * 4], "holds 1 .* and 0")]:
        with pytest.raises(InputError, match=said):
            paradec.generate(tiny, ids, attention_mask=mask, **TINY)
    ragged = [[25, 26, 27], [29, 30, 31, 32]]  # rows of their own lengths: each checked against its own mask row
    for mask, said in [([[1, 1, 1], [1, 1, 1]], "row 1 has 3 entries for 4 tokens"),
                       ([[1, 1, 1]], r"a row per prompt \(2\)"), ([[1, 1, 1], [1, 0, 1, 1]], "row 1 has padding"),
                       ([[1, 1, 1], ["a"] * 4], "must be 0s and 1s")]:
        with pytest.raises(InputError, match=said):
            paradec.generate(tiny, ragged, attention_mask=mask, **TINY)
    with pytest.raises(InputError, match=r"prompts\[1\] with attention_mask must be token ids"):
        paradec.generate(tiny, [[25, 26, 27], [29, "x", 31, 32]], attention_mask=[[1] * 3, [1] * 4], **TINY)
    assert [r.token_ids for r in paradec.generate(tiny, ragged, attention_mask=[[0, 1, 1], [1, 1, 1, 0]], **TINY)] \
        == [r.token_ids for r in paradec.generate(tiny, [[26, 27], [29, 30, 31]], **TINY)]
    with pytest.raises(InputError, match="applies to token ids"):
        paradec.generate(tiny, ["a b", "c d"], attention_mask=[[1, 1], [1, 1]], **TINY)
    with pytest.raises(InputError, match="attention_mask given twice"):
        paradec.generate(tiny, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, attention_mask=ids, **TINY)
    with pytest.raises(InputError, match="bytes were given"):
        paradec.generate(tiny, b"1 2 3", **TINY)
    from paradec.compat import left_padded_prompts  # LLaDA's and Dream's callers: left padding, any mask dtype

    padded = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    for mask in ([[0, 0, 1, 1], [1, 1, 1, 1]], torch.tensor([[0.0, 0, 1, 1], [1, 1, 1, 1]])):
        assert left_padded_prompts(padded, mask) == [[5, 6], [7, 8, 9, 10]]
    with pytest.raises(InputError, match="only left padding"):
        left_padded_prompts(padded, [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_config_as_a_mapping_numpy_scalars_and_foreign_names(tiny):
    """``config`` may be a mapping of settings; numpy and 0-d tensor numbers are numbers; a
    transformers GenerationConfig and transformers', LLaDA's, Dream's and Fast-dLLM's own names
    are refused pointing at paradec's."""
    import numpy as np

    expected = paradec.generate(tiny, PROMPT, **TINY).token_ids
    assert paradec.generate(tiny, PROMPT, dict(TINY)).token_ids == expected
    assert paradec.generate(tiny, PROMPT, {"blocks": 2}, tokens_per_step=4).token_ids == expected
    assert paradec.generate(tiny, PROMPT, blocks=np.int64(2), tokens_per_step=torch.tensor(4),
                            temperature=np.float32(0)).token_ids == expected
    with pytest.raises(ConfigError, match=r"\['blocks'\] given both in config and as keyword arguments"):
        paradec.generate(tiny, PROMPT, {"blocks": 2}, blocks=3)
    import dataclasses  # a whole config as keyword arguments: its unused threshold/factor defaults are not given

    whole = dataclasses.asdict(paradec.api.resolve_config(tiny, policy="margin", **TINY))
    assert paradec.generate(tiny, PROMPT, **whole).token_ids == paradec.generate(tiny, PROMPT, policy="margin",
                                                                                 **TINY).token_ids
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="transformers' GenerationConfig: paradec takes its own settings"):
        paradec.generate(tiny, PROMPT, transformers.GenerationConfig(max_new_tokens=4))
    for name, value, hint in [("do_sample", False, "temperature=0"), ("stop_strings", ["."], "stop="),
                              ("gen_length", 64, "paradec.compat.llada.generate"), ("alg", "entropy", "policy="),
                              ("use_cache", True, "cache='prefix' or 'dual'")]:
        with pytest.raises(ConfigError, match=f"unknown generation settings .*{name}: .*{re.escape(hint)}"):
            paradec.generate(tiny, PROMPT, **{name: value})
