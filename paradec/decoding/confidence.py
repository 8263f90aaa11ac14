"""Top-k by a score: ``confidence`` (max probability), ``margin`` (top-1 minus top-2) or
``entropy`` (negative entropy). Each group commits exactly its quota, best first."""

from __future__ import annotations

import torch

from paradec.decoding.selection import Candidates
from paradec.ops.selection import TOPK


def plan(candidates: Candidates, score_name: str) -> tuple[int, torch.Tensor, float]:
    """-> (rule, ranking score [N], rule parameter)."""
    return TOPK, candidates.scores.by_name(score_name), 0.0
