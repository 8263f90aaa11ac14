"""Run under torchrun by tests/test_train.py: train(TrainConfig(**json)) on this rank (gloo on CPU).

    python -m torch.distributed.run --standalone --nproc-per-node 2 train_worker.py CONFIG.json
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    torch.set_num_threads(1)
    from paradec.train import TrainConfig, train

    with open(sys.argv[1]) as f:
        train(TrainConfig(**json.load(f)))


if __name__ == "__main__":
    main()
