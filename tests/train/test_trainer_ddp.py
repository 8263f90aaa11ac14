"""paradec.train.trainer under torchrun (two gloo ranks, tests/train_worker.py): DDP trains like one
process, and a time limit that runs out on one rank stops every rank at the same step. These
tests are about processes, so they start them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

import paradec
from paradec.models import build
from paradec.train.trainer import train

from train.common import ENV, TESTS, loss_log, train_config, trainer_state



def _torchrun(config, tmp_path, env):
    """train(config) on two gloo ranks under torchrun (tests/train_worker.py)."""
    (tmp_path / "config.json").write_text(json.dumps(asdict(config)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(TESTS / "train_worker.py"), str(tmp_path / "config.json")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_two_gloo_ranks_train_like_one_process(task_data, tmp_path):
    config = train_config(task_data, tmp_path / "ddp", steps=3, save_every=3)
    done = _torchrun(config, tmp_path, ENV)
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
    for x, y in zip(loss_log(tmp_path / "ddp"), loss_log(single), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


def test_max_minutes_stops_every_rank_at_the_same_step(task_data, tmp_path):
    # Rank 1's clock runs out after its first step; rank 0's never does. Both must stop and save
    # at the same step instead of one leaving the others in a collective.
    config = train_config(task_data, tmp_path / "ddp", steps=6, save_every=6, max_minutes=1.0)
    done = _torchrun(config, tmp_path, ENV | {"PARADEC_TEST_FAST_CLOCK_RANK": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 done" in done.stdout and "rank 1 done" in done.stdout
    assert 1 <= trainer_state(tmp_path / "ddp")["step"] < 6
