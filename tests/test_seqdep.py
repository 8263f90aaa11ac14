"""SeqDep (NAP Eq. 4) against a by-hand reference on a tiny random causal LM; segmentation rules;
the JSONL reader; ``paradec seqdep`` end to end."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradec.cli import main
from paradec.errors import InputError
from paradec.eval.seqdep import read_texts, score, segment
from paradec.eval.tasks import DataError
from paradec.metrics import segment_gains, seqdep
from paradec.models.ar import ARModel

from tiny import tiny_ar_checkpoint

CONTEXT = 64  # the tiny scorer's max_position_embeddings

PROMPT = "what is the a + b ?"
SEGMENTS = ["a b c = 3 .", "the d is 4 .", "x + y = z ?", "1 2"]  # every word is in the tiny vocabulary




@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """The tiny random Llama (fp32, as ``ARModel.load`` gives it on CPU); no BOS, so EOS starts."""
    return ARModel.load(tiny_ar_checkpoint(tmp_path_factory.mktemp("ar"), max_positions=CONTEXT, seed=1))


@pytest.fixture(scope="module")
def scorer64(scorer):
    """The same weights in float64."""
    return ARModel(copy.deepcopy(scorer.model).double(), scorer.tokenizer)


# --- The by-hand reference ----------------------------------------------------------------------


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _logp_next(model, prefix, token):
    """log p(token | prefix): one forward over exactly ``prefix`` (no batch, no padding, no mask)."""
    logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)[token].item()


def _reference_terms(ar, segments, prompt):
    """[(log p(s_n | x, s_<n), log p(s_n | x), tokens of s_n)] for n = 2..N, token by token."""
    tok = ar.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    context = [start] + (_encode(tok, prompt) if prompt else [])
    pieces = [_encode(tok, s) for s in segments]
    terms = []
    for n in range(1, len(pieces)):
        before = [t for p in pieces[:n] for t in p]
        with_prefix = alone = 0.0
        for k, token in enumerate(pieces[n]):
            with_prefix += _logp_next(ar.model, context + before + pieces[n][:k], token)
            alone += _logp_next(ar.model, context + pieces[n][:k], token)
        terms.append((with_prefix, alone, len(pieces[n])))
    return terms


def _reference(ar, segments, prompt, per_token=False):
    terms = _reference_terms(ar, segments, prompt)
    return sum((w - a) / (n if per_token else 1) for w, a, n in terms) / len(terms)


# Tolerance. Both sides take log_softmax in float64, but of logits the model computed in its own
# dtype; the only other difference is how the forwards are cut (one forward over the whole text and
# one right-padded batch, against one forward per token over the exact prefix). With the model in
# float64 those differences are ~1e-15, so 1e-6 is loose; any slip in the bookkeeping (an
# off-by-one token, the wrong start token, a padded position read, the segments tokenised together)
# moves the value by far more (the values here are O(0.1)-O(1) nats, see the non-trivial check).
# In float32 (the dtype the CLI loads on CPU) the same comparison was measured to differ by up to
# 1.0e-6 with this seed (and by thread count), so the float32 check uses 1e-5.
TOL64 = 1e-6
TOL32 = 1e-5


@pytest.mark.parametrize("prompt", [PROMPT, ""], ids=["prompt", "no-prompt"])
@pytest.mark.parametrize("per_token", [False, True], ids=["summed", "per-token"])
def test_seqdep_matches_token_by_token_reference(scorer64, prompt, per_token):
    expected = _reference(scorer64, SEGMENTS, prompt, per_token)
    assert abs(expected) > 1e-3  # non-trivial: the reference is far from the "independent" 0
    assert seqdep(scorer64, SEGMENTS, prompt, per_token=per_token) == pytest.approx(expected, abs=TOL64)
    # the same through (model, tokenizer) instead of an ARModel
    got = seqdep(scorer64.model, SEGMENTS, prompt, tokenizer=scorer64.tokenizer, per_token=per_token)
    assert got == pytest.approx(expected, abs=TOL64)


@pytest.mark.parametrize("prompt", [PROMPT, ""], ids=["prompt", "no-prompt"])
def test_segment_gains_terms_match_reference(scorer64, prompt):
    gains = segment_gains(scorer64, SEGMENTS, prompt)
    terms = _reference_terms(scorer64, SEGMENTS, prompt)
    assert len(gains) == len(SEGMENTS) - 1
    for g, (with_prefix, alone, tokens) in zip(gains, terms):
        assert g.with_prefix == pytest.approx(with_prefix, abs=TOL64)
        assert g.alone == pytest.approx(alone, abs=TOL64)
        assert g.tokens == tokens
        assert g.total == pytest.approx(with_prefix - alone, abs=TOL64)
        assert g.per_token == pytest.approx((with_prefix - alone) / tokens, abs=TOL64)


def test_prompt_changes_the_value(scorer64):
    """The prompt really is read (the two values differ by much more than the tolerance)."""
    assert abs(seqdep(scorer64, SEGMENTS, PROMPT) - seqdep(scorer64, SEGMENTS, "")) > 1e-3


def test_two_segments_and_uneven_lengths(scorer64):
    segments = ["a", "b c d e f g h i j"]  # one row in the batch, and padding-free
    assert seqdep(scorer64, segments, PROMPT) == pytest.approx(_reference(scorer64, segments, PROMPT), abs=TOL64)
    segments = ["1 2 3 4 5 6 7 8", "a", "b c d e f g h i j", "k"]  # rows of very different lengths: padding
    assert seqdep(scorer64, segments, "") == pytest.approx(_reference(scorer64, segments, ""), abs=TOL64)


def test_bos_starts_the_context_when_there_is_one(scorer64):
    """With a BOS token the context starts with it, not with EOS (the tiny tokenizer has no BOS)."""
    tokenizer = copy.deepcopy(scorer64.tokenizer)
    tokenizer.bos_token = "<|eot_id|>"
    assert tokenizer.bos_token_id not in (None, tokenizer.eos_token_id)
    with_bos = ARModel(scorer64.model, tokenizer)
    expected = _reference(with_bos, SEGMENTS, "")
    assert seqdep(scorer64.model, SEGMENTS, "", tokenizer=tokenizer) == pytest.approx(expected, abs=TOL64)
    assert abs(expected - seqdep(scorer64, SEGMENTS, "")) > 1e-3  # the start token matters


def test_seqdep_float32(scorer):
    for per_token in (False, True):
        expected = _reference(scorer, SEGMENTS, PROMPT, per_token)
        assert seqdep(scorer, SEGMENTS, PROMPT, per_token=per_token) == pytest.approx(expected, abs=TOL32)


def test_segments_are_tokenised_separately(scorer64):
    """'a b' + 'c' is scored as the tokens of 'a b' then of 'c' (here the same ids as 'a b c')."""
    tok = scorer64.tokenizer
    assert _encode(tok, "a b") + _encode(tok, "c") == _encode(tok, "a b c")
    gains = segment_gains(scorer64, ["a b", "c"], PROMPT)
    assert gains[0].tokens == 1


# --- Errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("segments", [[], ["only one ."]])
def test_fewer_than_two_segments_raise(scorer, segments):
    with pytest.raises(InputError, match="at least 2 segments"):
        seqdep(scorer, segments, PROMPT)


@pytest.mark.parametrize("segments, empty", [(["a .", "", "b ."], "[2]"), (["a .", "b .", "   "], "[3]")])
def test_empty_segment_raises(scorer, segments, empty):
    with pytest.raises(InputError, match=re.escape(empty)):
        seqdep(scorer, segments, PROMPT)


def test_longer_than_context_raises(scorer):
    # [start] + 32 + 31 tokens fill the 64 positions exactly: allowed; one more is not
    fits = [" ".join(["a"] * 32), " ".join(["b"] * 31)]
    assert math.isfinite(seqdep(scorer, fits))
    with pytest.raises(InputError, match=f"65 tokens, over the scorer's context of {CONTEXT}"):
        seqdep(scorer, [fits[0], fits[1] + " c"])
    with pytest.raises(InputError, match="context"):
        seqdep(scorer, fits, prompt="a")


def test_tokenizer_without_bos_or_eos_raises(scorer):
    tokenizer = copy.deepcopy(scorer.tokenizer)
    tokenizer.eos_token = None
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    with pytest.raises(InputError, match="neither a BOS nor an EOS"):
        seqdep(scorer.model, SEGMENTS, PROMPT, tokenizer=tokenizer)


def test_bare_model_without_tokenizer_raises(scorer):
    with pytest.raises(InputError, match="tokenizer"):
        seqdep(scorer.model, SEGMENTS, PROMPT)


# --- segment() ----------------------------------------------------------------------------------

# texts built from pieces that matter to the rules (full stops, line breaks of every kind, runs of
# whitespace) mixed with arbitrary characters; at least one non-whitespace character
_PIECES = list("ab.!? \n\r\t") + ["\r\n", "\u2028", "\x0c", "\x85", "...", ". ", ".\n\n", "\n \n", "3.5"]
_TEXTS = st.lists(st.one_of(st.sampled_from(_PIECES), st.characters()), max_size=30).map("".join).filter(
    lambda t: t.strip())


@settings(derandomize=True, database=None, max_examples=300)
@given(_TEXTS)
def test_lines_property(text):
    parts = segment(text, "lines")
    assert "".join(parts) == text
    assert parts and all(p.strip() for p in parts)
    lines = text.splitlines(keepends=True)
    assert len(parts) == sum(1 for line in lines if line.strip())  # one segment per line with content
    for p in parts[:-1]:
        assert p.splitlines(keepends=True)[-1] != p.splitlines()[-1]  # ends with a line break


@settings(derandomize=True, database=None, max_examples=300)
@given(_TEXTS)
def test_sentences_property(text):
    parts = segment(text, "sentences")
    assert "".join(parts) == text
    assert parts and all(p.strip() for p in parts)
    assert len(parts) == 1 + len(re.findall(r"[.!?]\s+(?=\S)", text))
    for p in parts[:-1]:
        assert p[-1].isspace() and p.rstrip()[-1] in ".!?"


@pytest.mark.parametrize(
    "text, parts",
    [
        ("a\nb\n", ["a\n", "b\n"]),
        ("a\nb", ["a\n", "b"]),
        ("a\r\nb", ["a\r\n", "b"]),
        ("a\n\n\nb", ["a\n\n\n", "b"]),  # blank lines join the segment before them
        ("a\n  \nb\n", ["a\n  \n", "b\n"]),
        ("\n\na\nb", ["\n\na\n", "b"]),  # leading blank lines join the first segment
        ("one line", ["one line"]),
        ("a. b. c", ["a. b. c"]),  # no newline: one segment
    ],
)
def test_segment_lines(text, parts):
    assert segment(text, "lines") == parts


@pytest.mark.parametrize(
    "text, parts",
    [
        ("Hi. Bye.", ["Hi. ", "Bye."]),
        ("Wait... what?! ok", ["Wait... ", "what?! ", "ok"]),
        ("It is 3.5 now. Yes", ["It is 3.5 now. ", "Yes"]),  # no cut inside a number
        ("a.\n\nb", ["a.\n\n", "b"]),  # the whitespace stays with the sentence it ends
        ("  Lead. x", ["  Lead. ", "x"]),
        ("end.   ", ["end.   "]),
        ("30 + 3 = 33 . answer 33", ["30 + 3 = 33 . ", "answer 33"]),
        ("no full stop", ["no full stop"]),
    ],
)
def test_segment_sentences(text, parts):
    assert segment(text, "sentences") == parts


@pytest.mark.parametrize("rule", ["given", "words", ""])
def test_segment_unknown_rule(rule):
    with pytest.raises(InputError, match="segment rule"):
        segment("a. b", rule)


# --- read_texts() and score() -------------------------------------------------------------------


def _jsonl(tmp_path, rows, name="texts.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "bad",
    ["{not json", json.dumps({"prompt": "p"}), json.dumps({"text": 3}), json.dumps({"text": "a", "prompt": 1}),
     json.dumps(["a list"])],
    ids=["not-json", "no-text", "text-not-str", "prompt-not-str", "not-object"],
)
def test_read_texts_bad_line_names_it(tmp_path, bad):
    path = _jsonl(tmp_path, [{"text": "a. b"}, "", bad, {"text": "c. d"}])
    with pytest.raises(DataError, match=r"line 3\b"):
        read_texts(path, "sentences")


def test_read_texts_rules(tmp_path):
    path = _jsonl(tmp_path, [{"text": "a. b", "prompt": "p"}, "", {"text": "x\ny"}])
    assert read_texts(path, "sentences") == [(1, "p", ["a. ", "b"]), (3, "", ["x\ny"])]
    assert read_texts(path, "lines") == [(1, "p", ["a. b"]), (3, "", ["x\n", "y"])]
    assert read_texts(path, "lines", limit=1) == [(1, "p", ["a. b"])]


def test_read_texts_given_reads_segments(tmp_path):
    path = _jsonl(tmp_path, [{"segments": ["a b", " c", "d"], "prompt": "p", "text": "ignored. here"}])
    assert read_texts(path, "given") == [(1, "p", ["a b", " c", "d"])]
    with pytest.raises(DataError, match="line 1 needs 'segments'"):
        read_texts(_jsonl(tmp_path, [{"text": "a. b"}], "t.jsonl"), "given")
    with pytest.raises(DataError, match="line 1"):
        read_texts(_jsonl(tmp_path, [{"segments": ["a", 2]}], "u.jsonl"), "given")


def test_read_texts_empty_or_missing(tmp_path):
    with pytest.raises(DataError, match="no texts"):
        read_texts(_jsonl(tmp_path, ["", "  "]), "lines")
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "nope.jsonl", "lines")


@pytest.mark.parametrize("separator", ["\u2028", "\x85"], ids=["U+2028", "U+0085"])
def test_read_texts_unescaped_unicode_line_separator(tmp_path, separator):
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"text": f"one.{separator}two. three"}, ensure_ascii=False) + "\n", encoding="utf-8")
    # the line is read whole; the separator is whitespace, so the sentence rule splits after it
    assert read_texts(path, "sentences") == [(1, "", [f"one.{separator}", "two. ", "three"])]


def test_score_lists_single_segment_texts(scorer):
    texts = [(1, PROMPT, ["a b .", "c d"]), (2, PROMPT, ["only one"]), (4, "", ["a .", "b .", "c"]), (5, "", [])]
    result = score(scorer, texts, progress=False)
    assert result["unscored_lines"] == [2, 5]
    assert result["texts"] == 2 and [r["line"] for r in result["rows"]] == [1, 4]
    assert result["rows"][0]["seqdep"] == pytest.approx(seqdep(scorer, ["a b .", "c d"], PROMPT), abs=1e-9)
    assert result["rows"][1]["seqdep_per_token"] == pytest.approx(
        seqdep(scorer, ["a .", "b .", "c"], "", per_token=True), abs=1e-9)
    assert result["seqdep"] == pytest.approx((result["rows"][0]["seqdep"] + result["rows"][1]["seqdep"]) / 2)
    assert result["segments"] == pytest.approx(2.5)
    with pytest.raises(DataError, match="two or more segments"):
        score(scorer, [(1, "", ["one"])], progress=False)


# --- paradec seqdep, end to end -----------------------------------------------------------------

SYNTHETIC = [
    {"prompt": "Zoe has 30 apples . Zoe finds 3 more apples . How many apples does Zoe have now ?",
     "text": "30 + 3 = 33 . answer 33"},
    {"prompt": "Sam has 12 pens . Sam loses 5 pens . How many pens does Sam have now ?",
     "text": "12 - 5 = 7 . answer 7"},
]


def test_cli_seqdep(tmp_path, capsys):
    data = _jsonl(tmp_path, [*SYNTHETIC, {"prompt": "x", "text": "answer 7"}])
    out = tmp_path / "rows.jsonl"
    code = main(["seqdep", "--model", "paradec-tiny-answerer", "--data", str(data), "--segment", "sentences",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])["seqdep"]
    assert result["texts"] == 2 and result["segments"] == 2.0 and result["unscored_lines"] == [3]
    assert math.isfinite(result["seqdep"]) and math.isfinite(result["seqdep_per_token"])
    # the CLI's number is the library's, on the same segments
    answerer = ARModel.load("paradec-tiny-answerer")
    expected = [seqdep(answerer, segment(r["text"], "sentences"), r["prompt"]) for r in SYNTHETIC]
    assert result["seqdep"] == pytest.approx(sum(expected) / 2, abs=1e-6)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2]
    assert [r["seqdep"] for r in rows] == pytest.approx(expected, abs=1e-6)


def test_cli_seqdep_bad_data(tmp_path, capsys):
    data = _jsonl(tmp_path, [SYNTHETIC[0], "{oops"])
    assert main(["seqdep", "--data", str(data), "--no-progress"]) == 2
    assert "line 2" in capsys.readouterr().err
