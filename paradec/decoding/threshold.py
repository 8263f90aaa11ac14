"""Threshold rule: commit every position whose confidence reaches tau; each group always
commits its top-1 (and its floor, when a step budget must be met)."""

from __future__ import annotations

import torch

from paradec.decoding.selection import THRESHOLD, Candidates


def plan(candidates: Candidates, threshold: float) -> tuple[int, torch.Tensor, float]:
    return THRESHOLD, candidates.scores.confidence, threshold
