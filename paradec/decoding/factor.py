"""Fast-dLLM's factor rule: the n-th most confident position of a group (n from 1) is committed
when its confidence >= 1 - f / (n + 1). The bound rises with n while the ranked confidences
fall, so the accepted positions are always a top-n prefix. Each group always commits its top-1
(and its floor, when a step budget must be met)."""

from __future__ import annotations

import torch

from paradec.decoding.selection import FACTOR, Candidates


def plan(candidates: Candidates, factor: float) -> tuple[int, torch.Tensor, float]:
    return FACTOR, candidates.scores.confidence, factor
