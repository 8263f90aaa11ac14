"""The built-in models ship inside the package, load offline, still solve the held-out task, and
the main job (README's quickstart) runs on 4 gloo ranks in under a minute."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import paradec
from paradec.cli import main
from paradec.models.loading import builtin_models
from paradec.train.data import CanvasFormat
from paradec.train.recipe import BLOCK_LEN, SUMMARY_LEN
from paradec.train.tasks import arith

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "decode.py"


@pytest.fixture(scope="module")
def tiny():
    return paradec.load("paradec-tiny")


@contextlib.contextmanager
def every_core():
    """Torch's threads on every core for a decode that runs alone (the session's one thread is
    for tests that share the cores with the processes they start): ~1.5x faster on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def solved(tiny):
    """The first 16 held-out problems decoded at one token per step per block (the model card's
    setting): the CPU regression check of the shipped weights, and the blocks the shipped answerer
    reads (16 take ~30 s on one of 2 cores, ~20 s on both; 32 took ~52 s on one)."""
    problems = arith.test_problems()[:16]
    with every_core():
        return problems, paradec.generate(tiny, [p.question for p in problems], tokens_per_step=1)


@pytest.fixture(scope="module")
def longcot():
    return paradec.load("paradec-tiny-longcot")


def test_builtin_models_are_listed_and_small():
    assert {"paradec-tiny", "paradec-tiny-longcot"} <= set(builtin_models())
    for name in ("paradec-tiny", "paradec-tiny-longcot"):
        root = Path(paradec.models.loading.BUILTIN_DIR) / name
        assert (root / "model.safetensors").stat().st_size <= 25 * 2**20  # the limit
        assert (root / "README.md").read_text().count("accuracy") >= 1  # a model card


def test_tiny_loads_offline_with_its_canvas(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = paradec.load("paradec-tiny")
    assert again.generation == {"blocks": 4, "block_len": BLOCK_LEN, "summary_len": SUMMARY_LEN}
    assert tiny.spec.family == "llada" and not tiny.spec.shift_logits
    assert len(tiny.think_header_ids(1)) == 1 and len(tiny.summary_header_ids()) == 1  # special tokens
    assert tiny.dtype == torch.float32  # bf16 on disk, fp32 on the CPU


def test_a_path_that_is_not_a_model_still_says_so():
    with pytest.raises(paradec.CheckpointError, match="not a checkpoint directory"):
        paradec.load("paradec-huge")


def test_tiny_still_solves_held_out_problems(solved):
    # A regression check of the shipped weights on the CPU: the card reports 0.993 on all 600 at
    # one token per step per block (H100, fp32); 16 problems must stay at or above 0.9 (one miss).
    problems, results = solved
    right = sum(arith.check_answer(r.answer, p) for r, p in zip(results, problems))
    assert right / len(problems) >= 0.9, [r.summary for r in results]
    assert all(len(r.blocks) == 4 and all(b.endswith(f"answer {b.split()[-1]}") for b in r.blocks) for r in results)


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_tiny_solves_held_out_problems_with_windows_and_caches(tiny, cache):
    # The cached windows are an approximation; on the shipped model it costs nothing measurable
    # here (32 of 32 dual, 31 of 32 prefix at 2 tokens per step, measured on this CPU).
    problems = arith.test_problems()[:16]
    with every_core():
        results = paradec.generate(tiny, [p.question for p in problems], tokens_per_step=2, window=8, cache=cache)
    right = sum(arith.check_answer(r.answer, p) for r, p in zip(results, problems))
    assert right / len(problems) >= 0.9, [r.summary for r in results]


def test_longcot_decodes_one_region(longcot):
    model = longcot
    problem = arith.test_problems()[0]
    result = paradec.generate(model, problem.question, mode="ao", answer_len=CanvasFormat(BLOCK_LEN, SUMMARY_LEN).longcot_len(4),
                              tokens_per_step=4)
    assert result.blocks == [] and result.summary.startswith("path 1 :")
    assert result.answer is not None


def test_the_built_in_long_cot_model_decodes_one_region_by_default(longcot):
    result = paradec.generate(longcot, arith.test_problems()[1].question, tokens_per_step=8)
    assert result.blocks == [] and result.summary.startswith("path 1 :")


def test_main_job_on_four_ranks(tmp_path, capsys):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(EXAMPLE)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    problem = arith.test_problems()[0]
    assert f"question: {problem.question}" in out
    assert "placement: 4 ranks, blocks per rank [[0], [1], [2], [3]], idle []" in out
    assert all(f"--- think {i}" in out for i in range(1, 5)) and "--- summary" in out
    assert f"answer: {problem.answer} (gold {problem.answer}: right)" in out
    assert re.search(r"Global ARness@1 \d\.\d{3}", out) and "seconds:" in out
    assert wall < 60, f"the main job took {wall:.1f} s (the issue asks for under a minute on 2 cores)"
    # Trained under isolated attention, the model decodes the same on 4 ranks as in one process
    # (here this process: examples/decode.py is `paradec decode`, and tests/test_example.py runs
    # the script itself as one process).
    assert main(["decode"]) == 0
    single = capsys.readouterr().out
    between = lambda text: text[text.index("--- think 1"):text.index("steps ")]  # noqa: E731
    assert between(single) == between(out)


def test_the_shipped_answerer_reads_tiny_blocks(solved):
    # NAR→AR regression on the CPU: the card reports 1.000 on 200 problems at one token per step.
    # The answerer reads the blocks decoded above, batched as generate(..., answerer=) hands them
    # over at temperature 0 (that generate does exactly this, and that a batch of answers equals
    # answering one by one, is pinned in tests/test_hybrid.py).
    from paradec.hybrid import answer_batch
    from paradec.models.ar import ARModel

    answerer = ARModel.load("paradec-tiny-answerer")
    problems, results = solved[0][:8], solved[1][:8]
    outs = answer_batch(answerer, [p.question for p in problems], [r.blocks for r in results], 8)
    right = sum(arith.check_answer(o.answer, p) for o, p in zip(outs, problems))
    assert right / len(problems) >= 0.875, [o.text for o in outs]
    assert not any(o.truncated or o.empty for o in outs)


def test_the_shipped_scorer_finds_long_cot_more_sequential_than_nap_format():
    # The SeqDep diagnosis of benchmarks/seqdep_synthetic.py, on 6 held-out problems: per token, the
    # paths of the NAP format depend on each other less than the steps of the long-CoT chain.
    import random

    from paradec.eval.seqdep import segment
    from paradec.metrics import seqdep
    from paradec.models.ar import ARModel
    from paradec.train.answerer import longcot_text, nap_text

    scorer = ARModel.load("paradec-tiny-scorer")
    rng = random.Random(0)
    nap, chain = [], []
    for problem in arith.test_problems()[:6]:
        paths = [p.text for p in arith.solution_paths(problem, 4, rng)]
        prompt, segments = nap_text(problem.question, paths, problem.answer)
        nap.append(seqdep(scorer, segments, prompt, per_token=True))
        prompt, text = longcot_text(problem.question, paths)
        chain.append(seqdep(scorer, segment(text, "sentences"), prompt, per_token=True))
    assert sum(chain) / 6 > 2 * sum(nap) / 6 > 0, (nap, chain)


def test_scorer_training_writes_a_loadable_causal_lm(tmp_path):
    from paradec.metrics import seqdep
    from paradec.models.ar import ARModel
    from paradec.train.answerer import AnswererConfig, train

    record = train(AnswererConfig(out=str(tmp_path / "scorer"), steps=2, batch_size=4, layers=1, width=32, heads=2,
                                  warmup=1, device="cpu", objective="scorer"))
    assert record["step"] == 1 and record["loss"] > 0
    scorer = ARModel.load(tmp_path / "scorer")
    assert isinstance(seqdep(scorer, ["3 * 5 = 15 .", " 30 + 15 = 45 ."], "Zoe has 30 apples ."), float)
    with pytest.raises(paradec.ConfigError, match="objective"):
        train(AnswererConfig(out=str(tmp_path / "x"), objective="lm"))
