"""Top-k by a score: ``confidence`` (max probability), ``margin`` (top-1 minus top-2) or
``entropy`` (negative entropy). Each group commits exactly its quota, best first."""

from __future__ import annotations

import torch

from paradec.decoding.selection import Candidates, rank_in_groups


def select(candidates: Candidates, score_name: str) -> torch.Tensor:
    """-> [N] bool, the positions to commit."""
    score = candidates.scores.by_name(score_name)
    return rank_in_groups(candidates.key, score, candidates.position) < candidates.quota
