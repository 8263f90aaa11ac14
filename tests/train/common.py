"""Constants and helpers shared by the tests of paradec.train (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from paradec.models.loading import load_tokenizer
from paradec.train.data import CanvasFormat, ReasoningExample
from paradec.train.recipe import BLOCK_LEN, PATH_COUNTS, SUMMARY_LEN, reasoning_example, tiny_model_config
from paradec.train.tasks import arith
from paradec.train.trainer import TrainConfig

TESTS = Path(__file__).resolve().parents[1]  # tests/, where train_worker.py is
FMT = CanvasFormat(BLOCK_LEN, SUMMARY_LEN, PATH_COUNTS)
TINY = dict(layers=1, width=32, heads=2, mlp=64)
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def train_config(task_data: Path, out, **overrides) -> TrainConfig:
    """4 steps of a tiny model on the task's nap dataset (checkpoints at 2 and 4)."""
    tokenizer = load_tokenizer(task_data / "tokenizer")
    base = dict(data=str(task_data / "nap.safetensors"), tokenizer=str(task_data / "tokenizer"), out=str(out),
                model=tiny_model_config(tokenizer, **TINY), steps=4, batch_size=4, warmup=1, save_every=2,
                log_every=1, seed=5)
    return TrainConfig(**(base | overrides))


def reasoning_examples(count: int, seed: int = 0) -> list[ReasoningExample]:
    stream, rng = arith.training_problems(seed), random.Random(seed)
    return [reasoning_example(next(stream), PATH_COUNTS[i % len(PATH_COUNTS)], rng, noise=0.5) for i in range(count)]


def words(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def loss_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]


def trainer_state(out: Path) -> dict:
    return torch.load(out / "trainer_state.pt", weights_only=True)
