"""Threshold rule: commit every position whose confidence reaches tau; each group always
commits its top-1 (and its floor, when a step budget must be met)."""

from __future__ import annotations

import torch

from paradec.decoding.selection import Candidates, rank_in_groups


def select(candidates: Candidates, threshold: float) -> torch.Tensor:
    confidence = candidates.scores.confidence
    rank = rank_in_groups(candidates.key, confidence, candidates.position)
    return (confidence >= threshold) | (rank < candidates.floor)
