"""``paradec eval`` end to end on the built-in model: grading, counting, the results file and
resuming it, bad data, and examples or canvases spread over gloo ranks."""

from __future__ import annotations

import json

import pytest

import paradec
from paradec.api import GenerationResult, build_layout, resolve_config
from paradec.cli import main
from paradec.eval import DataError, evaluate, get_task, load_examples
from paradec.eval.run import _Decoder, summarise
from paradec.eval.tasks import gsm8k_test_path
from paradec.train.tasks import arith

from dist_worker import launch, run_eval_cli

SMALL = ["--blocks", "2", "--tokens-per-step", "4", "--no-progress"]  # a short canvas keeps the CPU run quick


@pytest.fixture(scope="module")
def tiny():
    return paradec.load("paradec-tiny")


def _run(tmp_path, *extra, out="r.jsonl", capsys=None):
    code = main(["eval", "--task", "synthetic", "--out", str(tmp_path / out), "--batch-size", "2", *SMALL, *extra])
    lines = (tmp_path / out).read_text().splitlines() if (tmp_path / out).exists() else []
    return code, [json.loads(line) for line in lines]


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]


def test_eval_cli_matches_generate(tiny, tmp_path, capsys):
    code, rows = _run(tmp_path, "--limit", "4")
    assert code == 0
    report = _report(capsys)
    header, records = rows[0], rows[1:]
    assert header["paradec_eval"] == 1 and header["task"] == "synthetic" and header["config"]["blocks"] == 2
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    problems = arith.test_problems()[:4]
    direct = paradec.generate(tiny, [p.question for p in problems], blocks=2, tokens_per_step=4)
    stops = set(tiny.spec.stop_ids)
    layout = build_layout(tiny, resolve_config(tiny, blocks=2, tokens_per_step=4))
    for p, r, d in zip(problems, records, direct):
        assert r["prompt"] == p.question and r["gold"] == str(p.answer)
        assert r["blocks"] == d.blocks and r["summary"] == d.summary
        assert r["correct"] == arith.check_answer(d.answer, p)
        # answer tokens: the regions' tokens before their first stop; no prompt, headers or EOS fill
        assert r["answer_tokens"] == sum(map(len, d.block_token_ids)) + len(d.summary_token_ids)
        cut = [next((i for i in range(s, e) if d.token_ids[i] in stops), e) - s for s, e in layout.bodies]
        assert r["answer_tokens"] == sum(cut) < len(d.token_ids)
        assert r["nfe"] == len({s for s in d.trace if s >= 0}) and r["batch_nfe"] >= r["nfe"]
        assert 0.0 <= r["global_arness"] <= 1.0
    assert report["n"] == 4
    assert report["accuracy"] == sum(r["correct"] for r in records) / 4
    assert report["answer_tokens"] == sum(r["answer_tokens"] for r in records)
    assert report["tokens_per_step"] == pytest.approx(report["answer_tokens"] / sum(r["nfe"] for r in records))
    assert report["tokens_per_s"] == pytest.approx(report["answer_tokens"] / report["wall_s"])


def test_eval_resumes_and_refuses_other_settings(tmp_path, capsys):
    code, first = _run(tmp_path, "--limit", "2")
    assert code == 0
    capsys.readouterr()
    code, rows = _run(tmp_path, "--limit", "4")
    assert code == 0 and _report(capsys)["resumed"] == 2
    assert rows[:3] == first and [r["index"] for r in rows[1:]] == [0, 1, 2, 3]
    # a killed run leaves a truncated last line: it is dropped and that example decoded again
    path = tmp_path / "r.jsonl"
    path.write_text(path.read_text()[:-40])
    code, again = _run(tmp_path, "--limit", "4")
    assert code == 0 and _report(capsys)["resumed"] == 3
    assert [r["index"] for r in again[1:]] == [0, 1, 2, 3]
    assert {**again[4], "seconds": 0} == {**rows[4], "seconds": 0}  # the same tokens again
    # a header written before a setting existed resumes when that setting is at its default
    header, *records = path.read_text().splitlines()
    older = json.loads(header)
    del older["config"]["delayed_kv"]
    path.write_text("\n".join([json.dumps(older), *records]) + "\n")
    code, _ = _run(tmp_path, "--limit", "4")
    assert code == 0 and _report(capsys)["resumed"] == 4
    # other settings are refused by name, nothing is overwritten
    before = path.read_text()
    code = main(["eval", "--task", "synthetic", "--out", str(path), "--limit", "4", "--blocks", "2",
                 "--tokens-per-step", "2", "--no-progress"])
    assert code == 2 and "config.tokens_per_step" in capsys.readouterr().err
    assert path.read_text() == before
    # --no-resume starts again
    code, fresh = _run(tmp_path, "--limit", "1", "--no-resume")
    assert code == 0 and len(fresh) == 2


def test_unparseable_answers_count_wrong_and_are_listed(tiny):
    task = get_task("gsm8k")
    example = load_examples(get_task("synthetic"), None, 1).examples[0]
    decoder = _Decoder(tiny, task, resolve_config(tiny, blocks=2), "{question}", None, 64)
    length = decoder.layout.length
    base = dict(token_ids=[0] * length, trace=[-1] * length, nfe=2, steps=2, timings={}, prompt_ids=[1],
                block_token_ids=[[5, 6]], summary_token_ids=[7])
    no_answer = GenerationResult(blocks=["x"], summary="no number here", answer=None, **base)
    right = GenerationResult(blocks=["x"], summary=f"#### {example.gold}", answer=example.gold, **base)
    records = [decoder.record(example, example.question, r, seconds=0.5) for r in (no_answer, right)]
    assert records[0]["answer"] is None and records[0]["correct"] is False
    assert records[1]["answer"] == example.gold and records[1]["correct"] is True
    assert records[0]["answer_tokens"] == 3  # two block tokens and one summary token
    report = summarise("gsm8k", records)
    assert report.unparsed == [example.index] and report.accuracy == 0.5 and report.tokens_per_s == 6 / 1.0


def test_malformed_data_names_lines_and_skips_only_when_asked(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    good = {"question": "Zoe has 30 apples . Zoe finds 3 more apples . How many apples does Zoe have now ?",
            "answer": "30 + 3 = 33 .\n#### 33"}
    data.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"question": "q"}), json.dumps(good)]) + "\n")
    code = main(["eval", "--task", "gsm8k", "--data", str(data), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "line 2" in err and "line 3" in err and "--skip-malformed" in err
    code = main(["eval", "--task", "gsm8k", "--data", str(data), "--skip-malformed", *SMALL])
    out = capsys.readouterr().out
    assert code == 0 and "skipped line 2" in out and "skipped line 3" in out
    assert json.loads(out.strip().splitlines()[-1])["eval"]["n"] == 2


def test_task_and_data_that_do_not_match(tmp_path, capsys):
    data = tmp_path / "gsm8k_like.jsonl"
    data.write_text(json.dumps({"question": "q ?", "answer": "#### 3"}) + "\n")
    code = main(["eval", "--task", "math500", "--data", str(data), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "problem" in err and "question" in err  # what it expected and what the file holds
    with pytest.raises(DataError, match="needs a data file"):
        load_examples(get_task("math500"), None)
    with pytest.raises(DataError, match="prompt_template"):
        evaluate(None, get_task("synthetic"), [], paradec.GenerationConfig(), prompt_template="no placeholder")
    with pytest.raises(SystemExit):
        main(["eval", "--task", "nope"])


def test_gsm8k_without_data_reads_the_packaged_test_split(tmp_path, monkeypatch):
    """No --data: GSM8K's test split shipped inside the package, found from any directory."""
    monkeypatch.chdir(tmp_path)
    path = gsm8k_test_path()
    assert path.is_absolute() and path.is_file() and (path.parent / "LICENSE").is_file()
    assert "paradec" in path.parts and path.parent.name == "gsm8k"
    loaded = load_examples(get_task("gsm8k"), None, limit=3)
    assert [e.index for e in loaded.examples] == [1, 2, 3] and not loaded.skipped
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert loaded.examples[0].question == first["question"] and loaded.examples[0].gold == "18"
    other = tmp_path / "other.jsonl"  # --data still wins
    other.write_text(json.dumps({"question": "q ?", "answer": "#### 3"}) + "\n")
    assert [e.gold for e in load_examples(get_task("gsm8k"), other).examples] == ["3"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """``paradec eval`` of 5 examples in this process: the rows both spreads are compared against."""
    code, rows = _run(tmp_path_factory.mktemp("one"), "--limit", "5", out="one.jsonl")
    assert code == 0
    return rows


@pytest.mark.parametrize("spread", ["examples", "canvas"])
def test_eval_over_ranks_equals_one_process(tmp_path, spread, one_process):
    one = one_process
    argv = ["eval", "--task", "synthetic", "--limit", "5", "--out", str(tmp_path / "two.jsonl"), "--batch-size", "2",
            "--spread", spread, "--device", "cpu", *SMALL]
    assert launch(2, run_eval_cli, (argv,)) == [0, 0]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert two[0] == one[0]
    by_index = {r["index"]: r for r in two[1:]}
    assert sorted(by_index) == [0, 1, 2, 3, 4]
    for r in one[1:]:  # placement never changes the answer; timings may differ
        got = by_index[r["index"]]
        for key in ("blocks", "summary", "answer", "correct", "answer_tokens", "nfe", "global_arness"):
            assert got[key] == r[key], (spread, r["index"], key)


def test_results_files_that_cannot_be_resumed(tmp_path):
    from paradec.eval.run import header, read_results

    head = header(get_task("synthetic"), None, "paradec-tiny", paradec.GenerationConfig(), "{question}", None, 64)
    path = tmp_path / "r.jsonl"
    path.write_text("\n")  # a run killed before its header was whole
    assert read_results(path, head) == {}
    path.write_text(json.dumps(head) + "\n" + json.dumps({"no": "index"}) + "\n" + json.dumps({"index": 1}) + "\n")
    with pytest.raises(DataError, match="line 2 is not an example record"):
        read_results(path, head)
