"""NAR→AR: the diffusion model's think blocks reach an AR answerer as text (tiny models, CPU)."""

from __future__ import annotations

import warnings

import pytest

import paradec
from paradec import ConfigError, InputError
from paradec.hybrid import answer, answer_prompt, ar_to_ar
from paradec.models.ar import ARModel

from tiny import tiny_ar_checkpoint, tiny_checkpoint

QUESTION = "the 3 + 4 is ?"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=11)
    return paradec.load(root)


@pytest.fixture(scope="module")
def answerer(tmp_path_factory):
    return ARModel.load(tiny_ar_checkpoint(tmp_path_factory.mktemp("ar"), max_positions=256))


def test_the_template_holds_question_traces_and_summary():
    text = answer_prompt(" q ? ", ["a b", " c "], summary="s")
    assert text == "q ?\n\nReasoning 1: a b\nReasoning 2: c\nSummary: s\n\nAnswer:"
    assert "Summary" not in answer_prompt("q", ["a"])


def test_generate_with_an_answerer_reads_the_blocks_as_text(model, answerer):
    result = paradec.generate(model, QUESTION, blocks=3, block_len=6, summary_len=4, answerer=answerer,
                              answer_tokens=8)
    out = result.answerer
    expected = answer(answerer, QUESTION, result.blocks, 8)  # the same prompt, decoded directly
    assert out.token_ids == expected.token_ids and out.text == expected.text
    assert result.answer == out.answer
    assert result.summary == "" and result.summary_token_ids == []  # not decoded without with_summary
    assert len(result.blocks) == 3 and not out.truncated
    assert out.prompt_tokens == len(answerer.tokenizer.encode(answer_prompt(QUESTION, result.blocks)))
    with_summary = paradec.generate(model, QUESTION, blocks=3, block_len=6, summary_len=4, answerer=answerer,
                                    answer_tokens=8, with_summary=True)
    assert with_summary.blocks == result.blocks  # blocks do not depend on the summary (isolated)
    assert with_summary.answerer.prompt_tokens > out.prompt_tokens


def test_traces_are_cut_to_fit_the_answerer(model, tmp_path):
    small = ARModel.load(tiny_ar_checkpoint(tmp_path, max_positions=40))
    traces = ["a b c d e f g h i j k l m n o p"] * 3
    out = answer(small, QUESTION, traces, max_new_tokens=8)
    assert out.truncated and out.prompt_tokens + 8 <= 40
    fits = answer(small, QUESTION, ["a b"], max_new_tokens=8)
    assert not fits.truncated
    with pytest.raises(InputError, match=r"the question \(and summary\) alone take more than"):
        answer(small, " ".join(["a"] * 60), ["b"], max_new_tokens=8)


def test_an_answer_that_says_nothing_is_flagged(answerer):
    first = answer(answerer, QUESTION, ["a b"], max_new_tokens=4, stop_ids=()).token_ids[0]
    out = answer(answerer, QUESTION, ["a b"], max_new_tokens=4, stop_ids=(first,))  # it stops at once
    assert out.empty and out.stopped and out.answer is None and out.text == ""


def test_ar_to_ar_writes_its_own_trace(answerer):
    trace, out = ar_to_ar(answerer, QUESTION, trace_tokens=6, max_new_tokens=4)
    assert isinstance(trace, str)
    assert out.token_ids == answer(answerer, QUESTION, [trace], 4).token_ids


def test_bad_answerers_are_refused_before_any_work(model, answerer):
    with pytest.raises(InputError, match="answerer must be a paradec.models.ar.ARModel"):
        paradec.generate(model, QUESTION, answerer="/path/to/model")
    with pytest.raises(ConfigError, match="an answerer reads think blocks: it needs mode='nap'"):
        paradec.generate(model, QUESTION, mode="ao", answer_len=8, answerer=answerer)
    with pytest.raises(ConfigError, match="answer_tokens must be an int >= 1, got 0"):
        paradec.generate(model, QUESTION, answerer=answerer, answer_tokens=0)
    with pytest.raises(paradec.CheckpointError, match="no config.json"):
        ARModel.load("/nonexistent/answerer")


def test_under_torchrun_the_answerer_reads_the_gathered_blocks(model, answerer, tmp_path):
    import json

    from dist_worker import launch, run_with_answerer

    prompts = [QUESTION, "a b c d e f g h"]
    config = {"blocks": 3, "block_len": 5, "summary_len": 3, "tokens_per_step": 2}
    expected = paradec.generate(model, prompts, answerer=answerer, answer_tokens=6, **config)
    model_dir = tmp_path / "model"
    tiny_checkpoint(model_dir, "llada", seed=11)
    answerer_dir = tiny_ar_checkpoint(tmp_path / "ar", max_positions=256)
    codes = launch(2, run_with_answerer, (str(model_dir), str(answerer_dir), prompts, config, str(tmp_path)))
    assert codes == [0, 0]
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert json.loads((tmp_path / "rank1.json").read_text()) is None
    for g, e in zip(got, expected):
        assert g["token_ids"] == e.token_ids and g["summary"] == ""
        assert g["answer_ids"] == e.answerer.token_ids


def test_a_batch_of_answers_equals_answering_one_by_one(answerer):
    from paradec.hybrid import answer_batch

    questions = [QUESTION, "a b c ?", "1 2"]
    traces = [["a b"], ["c d e", "f"], ["g h i j k"]]
    with warnings.catch_warnings():  # the KV cache goes by the keyword this transformers takes (no deprecation)
        warnings.simplefilter("error", FutureWarning)
        together = answer_batch(answerer, questions, traces, 6)
        alone = [answer(answerer, q, t, 6) for q, t in zip(questions, traces)]
    assert [(o.token_ids, o.text, o.stopped, o.prompt_tokens) for o in together] == \
        [(o.token_ids, o.text, o.stopped, o.prompt_tokens) for o in alone]
