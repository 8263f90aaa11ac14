"""examples/decode.py end to end: one process, and two gloo ranks under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import tiny_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "decode.py"
ARGS = ["--blocks", "3", "--block-len", "6", "--summary-len", "3", "--tokens-per-step", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("dream"), "dream", seed=71)
    return str(root)


def _run(cmd, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    """The example in one process (with --plot): (stdout, the plot's path). Both tests read it, so
    the same single run is not started twice."""
    tmp = tmp_path_factory.mktemp("one")
    out = _run([sys.executable, str(EXAMPLE), "--model", model_dir, "--prompt", "a b c", *ARGS,
                "--plot", str(tmp / "order.png")], tmp)
    return out, tmp / "order.png"


def test_one_process(one_process):
    out, plot = one_process
    for line in ("--- think 1", "--- think 3", "--- summary", "answer:", "NFE", "Global ARness@1"):
        assert line in out
    assert "placement" not in out  # one process: nothing spread
    assert plot.stat().st_size > 1000


def test_two_ranks_under_torchrun(model_dir, one_process, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(EXAMPLE), "--model", model_dir, "--prompt", "a b c", *ARGS]
    out = _run(cmd, tmp_path)
    assert "placement: 2 ranks, blocks per rank [[0, 1], [2]], idle []" in out
    assert out.count("--- summary") == 1  # printed on rank 0 only
    assert "rank 1 blocks [2]" in out
    single, _ = one_process  # --plot only adds the picture: the decoded text is the same
    between = lambda text: text[text.index("--- think 1"):text.index("answer:")]  # noqa: E731
    assert between(out) == between(single)  # same blocks and summary as one process
