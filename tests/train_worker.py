"""Run under torchrun by tests/train/test_trainer_ddp.py: train(TrainConfig(**json)) on this rank (gloo on CPU).

    python -m torch.distributed.run --standalone --nproc-per-node 2 train_worker.py CONFIG.json
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main() -> None:
    torch.set_num_threads(1)
    from paradec.train import TrainConfig, train

    fast_rank = os.environ.get("PARADEC_TEST_FAST_CLOCK_RANK")
    if fast_rank is not None and os.environ.get("RANK") == fast_rank:
        # This rank's clock runs an hour per call: it alone sees max_minutes run out.
        import itertools

        from paradec.train import trainer

        ticks = itertools.count()
        trainer.time = type("FastClock", (), {"perf_counter": staticmethod(lambda: 3600.0 * next(ticks))})
    with open(sys.argv[1]) as f:
        train(TrainConfig(**json.load(f)))
    print(f"rank {os.environ.get('RANK')} done", flush=True)


if __name__ == "__main__":
    main()
