"""paradec.train.data: curation in the decoder's own layout. NAP instances against the decoder's
layout and prompt, long-CoT instances, what curation keeps and rejects (and why), padding by
``pack``, prompts through the chat template but bodies never, and (with paradec.train.recipe) the
same examples kept in every format."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import pytest
import torch

from paradec import GenerationConfig
from paradec.api import build_layout, encode_prompt
from paradec.models import build
from paradec.models.attention import PAD, PROMPT
from paradec.train.data import ReasoningExample, curate, longcot_instance, longcot_text, nap_instance, pack
from paradec.train.recipe import BLOCK_LEN, PATH_COUNTS, SUMMARY_LEN, tiny_model_config
from paradec.train.tasks import arith
from paradec.train.tokenizer import build_word_tokenizer

from train.common import FMT, TINY, reasoning_examples, words



@pytest.fixture(scope="module")
def task_model(tok):
    return build(tiny_model_config(tok, **TINY), tokenizer=tok)


@pytest.mark.parametrize("m", PATH_COUNTS)
def test_nap_instance_is_the_decoders_layout(tok, task_model, m):
    example = next(e for e in reasoning_examples(12, seed=m) if len(e.paths) == m)
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
        tokens = words(tok, text)
        assert canvas[start:end].tolist() == tokens + [eos] * (end - start - len(tokens))
    assert roles[:p].tolist() == [0] * p
    assert torch.equal(roles[p:], torch.where(headers, 1, 2))
    assert mask not in instance.ids


@pytest.mark.parametrize("m", PATH_COUNTS)
def test_longcot_instance_holds_the_same_paths_in_one_region(tok, m):
    example = next(e for e in reasoning_examples(12, seed=m) if len(e.paths) == m)
    eos = tok.eos_token_id
    instance = longcot_instance(tok, example, FMT, eos, tok.mask_token_id)
    p = len(words(tok, example.question))
    assert instance.ids[:p] == words(tok, example.question)
    assert len(instance.ids) == p + FMT.longcot_len(m)
    answer = instance.ids[p:]
    assert tok.decode(answer, skip_special_tokens=True) == longcot_text(example)
    text_len = len(words(tok, longcot_text(example)))
    assert answer[text_len:] == [eos] * (len(answer) - text_len) and eos not in answer[:text_len]
    assert instance.roles == [0] * p + [2] * FMT.longcot_len(m)
    assert instance.segments == [PROMPT] * p + [1] * FMT.longcot_len(m)
    assert longcot_text(example).startswith("path 1 : " + example.paths[0])
    assert longcot_text(example).endswith("summary : " + example.summary_text)


def _decoded_paths(tok, instance, kind: str, question: str, m: int) -> list[str]:
    """The paths (and summary) an instance holds, read back from its tokens."""
    p = len(words(tok, question))
    answer = instance.ids[p:]
    if kind == "longcot":
        text = tok.decode(answer, skip_special_tokens=True)
        return re.split(r" ?(?:path \d+|summary) : ", text)[1:]
    header_at = [i for i, r in enumerate(instance.roles[p:]) if r == 1] + [len(answer)]
    assert len(header_at) == m + 2
    return [tok.decode(answer[a + 1 : b], skip_special_tokens=True) for a, b in zip(header_at, header_at[1:])]


@pytest.mark.parametrize("kind", ["nap", "longcot"])
def test_curate_keeps_what_fits_and_reports_each_reject(tok, kind):
    good = reasoning_examples(6)
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
        curate(tok, reasoning_examples(1), FMT, "chat", tok.eos_token_id, tok.mask_token_id)


def test_pack_right_pads_with_pad_role_and_segment(tok):
    instances, _ = curate(tok, reasoning_examples(5), FMT, "nap", tok.eos_token_id, tok.mask_token_id)
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


def test_bodies_never_go_through_the_chat_template(tmp_path):
    tok = build_word_tokenizer(arith.vocabulary() + ["user", "assistant", ":"], tmp_path / "tok")
    tok.chat_template = "{% for m in messages %}user : {{ m['content'] }} . assistant :{% endfor %}"
    example = reasoning_examples(1)[0]
    instance = nap_instance(tok, example, FMT, tok.eos_token_id, tok.mask_token_id)
    text = tok.decode(instance.ids, skip_special_tokens=True)
    assert text.startswith("user : ") and text.count("user") == 1 and text.count("assistant") == 1


def test_unknown_words_and_empty_questions_are_rejected_in_every_format(tok):
    from paradec.train.recipe import _same_examples

    good = reasoning_examples(2)
    unknown = replace(good[0], question=good[0].question.replace("How", "Zebras"))
    empty = replace(good[0], question="  ")
    too_long = replace(good[0], paths=(good[0].paths[0] + " 1 + 1 = 2 ." * 8,) + good[0].paths[1:])  # fits long-CoT only
    examples = [good[0], unknown, empty, too_long, good[1]]
    built = {k: curate(tok, examples, FMT, k, tok.eos_token_id, tok.mask_token_id) for k in ("nap", "longcot")}
    same = _same_examples(built, len(examples))
    for kind, (instances, report) in same.items():
        assert len(instances) == 2 and [i for i, _ in report.rejected] == [1, 2, 3], kind
        assert report.counts == {"unknown words": 1, "empty question": 1, "too long": 1}
