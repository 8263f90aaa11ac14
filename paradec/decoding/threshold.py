"""Threshold rule: commit every position whose confidence reaches tau; each group always
commits its top-1 (and its floor, when a step budget must be met)."""

from __future__ import annotations

import torch

from paradec.decoding.selection import Candidates
from paradec.ops.selection import THRESHOLD


def plan(candidates: Candidates, threshold: float) -> tuple[int, torch.Tensor, float]:
    return THRESHOLD, candidates.scores.confidence, threshold
