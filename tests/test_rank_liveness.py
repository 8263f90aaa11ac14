"""Liveness means progress: a rank that the others wait for and that makes no progress for
``rank_timeout_s`` is named and the job ends within that plus a small bound, whether it is
blocked in user code (its heartbeat still beating), frozen (SIGSTOP) before a meeting or frozen
inside a collective; ranks idle together between generate() calls are left alone.

Two gloo processes on this CPU, wired as torchrun would wire them; the launcher notes when each
process ends and SIGKILLs whatever is left."""

from __future__ import annotations

import json

import pytest

from liveness_worker import launch_timed, run_liveness
from tiny import tiny_checkpoint

TIMEOUT = 3.0
BOUND = 3.0  # seconds past the timeout allowed for naming the rank and ending the job (nominal ~1 s)
CONFIG = {"blocks": 2, "block_len": 8, "summary_len": 2, "prompt_kv": "recompute", "rank_timeout_s": TIMEOUT}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=52)
    return str(root)


def _play(model_dir, tmp_path, scenario):
    codes, ended = launch_timed(2, run_liveness, (model_dir, CONFIG, scenario, str(tmp_path)), timeout_s=60)
    reports = {}
    for r in range(2):
        path = tmp_path / f"rank{r}.json"
        reports[r] = json.loads(path.read_text()) if path.exists() else None
    errors = {r: json.loads((tmp_path / f"error{r}.json").read_text())["message"]["message"]
              for r in range(2) if (tmp_path / f"error{r}.json").exists()}
    return codes, ended, reports, errors


def test_a_rank_blocked_in_user_code_is_named_and_ended(model_dir, tmp_path):
    """Rank 1 sleeps in user code after a first generate() while rank 0 calls the next one: its
    heartbeat still beats, but it makes no progress while rank 0 waits at 'start'."""
    codes, ended, reports, errors = _play(model_dir, tmp_path, "sleep")
    zero, one = reports[0], reports[1]
    assert one["error"] is None and "first_done" in one  # the first call went through
    assert zero["error"].startswith("RankFailure: rank 1 made no progress for 3."), zero["error"]
    assert "waited for it at 'start'" in zero["error"] and "alive" in zero["error"]
    waited = zero["failed"] - zero["second_started"]
    assert TIMEOUT <= waited < TIMEOUT + BOUND, waited
    # the stuck rank ended itself first, its error recorded where torchrun reads it
    assert codes == [0, 1]
    assert ended[1] < zero["failed"]
    assert errors[1].startswith("RankFailure: rank 1 made no progress for"), errors
    assert max(ended) - zero["second_started"] < TIMEOUT + BOUND + 2, (ended, zero)


def test_a_stopped_rank_is_named_and_every_process_ends(model_dir, tmp_path):
    """Rank 1 is SIGSTOPped mid-thinking; rank 0 finishes and waits for it at 'gather'."""
    codes, ended, reports, errors = _play(model_dir, tmp_path, "sigstop")
    zero = reports[0]
    assert zero["error"].startswith("RankFailure: rank 1 stopped responding: it made no progress"), zero["error"]
    assert "waited for it at 'gather'" in zero["error"]
    assert zero["failed"] - zero["first_started"] < TIMEOUT + BOUND + 1  # thinking takes well under 1 s
    assert codes == [0, -9]  # rank 0 killed the stopped rank (same machine): nobody is left behind
    assert ended[1] < zero["failed"]
    assert errors[1].startswith("RankFailure: rank 1 stopped responding"), errors
    assert max(ended) - zero["first_started"] < TIMEOUT + BOUND + 3, (ended, zero)


def test_a_rank_stopped_inside_a_collective_is_named(model_dir, tmp_path):
    """Rank 1 freezes inside the gather, after both met: rank 0 is blocked in a gloo operation,
    which gives up after rank_timeout_s instead of the process group's 60 s."""
    codes, ended, reports, errors = _play(model_dir, tmp_path, "stop_in_collective")
    zero = reports[0]
    assert zero["error"].startswith("RankFailure: rank 1 stopped responding: no heartbeat"), zero["error"]
    assert "after 'gather'" in zero["error"]
    assert zero["failed"] - zero["first_started"] < TIMEOUT + BOUND + 3
    assert codes == [0, -9]
    assert max(ended) - zero["first_started"] < TIMEOUT + BOUND + 5, (ended, zero)


def test_ranks_idle_together_between_calls_are_left_alone(model_dir, tmp_path):
    """Both ranks idle for longer than rank_timeout_s between two calls (rank 1 arriving half a
    timeout after rank 0): nothing fails."""
    codes, _, reports, errors = _play(model_dir, tmp_path, "idle")
    assert codes == [0, 0]
    assert not errors
    for r in range(2):
        assert reports[r]["error"] is None and "second_done" in reports[r], reports[r]
    assert reports[0]["second_done"] - reports[0]["second_started"] >= TIMEOUT / 2  # it did wait for rank 1


def test_torchrun_names_the_stopped_rank_as_root_cause(model_dir, tmp_path):
    """Under torchrun the stopped rank is the root cause of the failed job (its error file holds
    the verdict) and the job ends within the bound, not after torchrun's 30 s SIGTERM grace."""
    import os
    import subprocess
    import sys
    import time

    from dist_worker import free_port

    worker = os.path.join(os.path.dirname(__file__), "liveness_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "--monitor-interval", "0.1", worker, "sigstop", model_dir,
               json.dumps(CONFIG), str(tmp_path)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = job.communicate(timeout=90)
        ended = time.time()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, 9)  # the launcher and every rank it started
            job.wait()
    assert job.returncode != 0, out
    stopped = float((tmp_path / "stopped1.txt").read_text())
    assert ended - stopped < TIMEOUT + BOUND + 4, (ended - stopped, out[-3000:])
    root = out[out.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root and "(SIGKILL)" in root, out[-3000:]
    assert "RankFailure: rank 1 stopped responding" in root, out[-3000:]
