"""Spreading a canvas over ranks: torchrun setup, placement, prompt-KV sharing, the summary
gather, and failure detection. Model code stays single-device; all of this wraps it."""

from paradec.distributed.env import DistEnv, current_env, init_distributed, print0
from paradec.distributed.guard import RankFailure
from paradec.distributed.placement import Placement


def teardown() -> None:
    """Stops failure detection and ends the process group."""
    from paradec.distributed.canvas import close_guard
    from paradec.distributed.env import teardown as end_process_group

    close_guard()
    end_process_group()


__all__ = ["DistEnv", "Placement", "RankFailure", "current_env", "init_distributed", "print0", "teardown"]
