"""Session-wide test settings."""

from __future__ import annotations

import os

import torch


def pytest_configure(config):
    """The whole session, and every process it starts, on one thread: the tests' models are
    tiny, and two threads on the CI machine's two cores (shared with the servers, engines and
    ranks the tests start) ran the suite at twice the CPU time (1135 against 613 CPU-s, all
    tests passing either way)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
