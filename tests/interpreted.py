"""Triton-interpreter checks in child processes (``TRITON_INTERPRET=1`` must be set before the
kernels are defined), independent parts side by side: the interpreter runs a program instance
at a time on one thread, so two parts on the CI machine's two cores take about half the time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def run_interpreted(setup: str, parts: list[str], timeout_s: float = 900, env: dict | None = None) -> None:
    """Runs ``setup`` then each of ``parts`` (Python statements; ``sys.argv[1]`` is this folder,
    on ``sys.path``) in its own interpreted child, all at once; fails naming every part that did
    not end with ``ok``, with the end of its output."""
    env = dict(os.environ, TRITON_INTERPRET="1", **(env or {}))
    prelude = "import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1); "
    children = [subprocess.Popen([sys.executable, "-c", f"{prelude}{setup}; {part}; print('ok')", str(HERE)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for part in parts]
    failed, deadline = [], time.monotonic() + timeout_s
    try:
        for part, child in zip(parts, children):
            out, err = child.communicate(timeout=max(0.0, deadline - time.monotonic()))
            if child.returncode != 0 or not out.strip().endswith("ok"):
                failed.append(f"--- {part}: exit {child.returncode}\n{out[-3000:]}{err[-6000:]}")
    finally:
        for child in children:  # (a part that timed out, or the others after one did)
            child.kill()
            child.wait()
    assert not failed, "\n".join(failed)
