"""Spreading a canvas over ranks: torchrun setup, placement, prompt-KV sharing, the summary
gather, and failure detection. Model code stays single-device; all of this wraps it."""

from paradec.distributed.env import DistEnv, current_env, init_distributed, print0
from paradec.distributed.guard import RankFailure
from paradec.distributed.placement import Placement


def teardown() -> None:
    """Stops failure detection (every engine's guard) and ends the process group."""
    from paradec.distributed.env import teardown as end_process_group
    from paradec.engine import close_guards  # the engine builds on this package

    close_guards()
    end_process_group()


__all__ = ["DistEnv", "Placement", "RankFailure", "current_env", "init_distributed", "print0", "teardown"]
