"""``ar_order``: the leftmost masked positions first, the quota of each group per step."""

from __future__ import annotations

import torch

from paradec.decoding.selection import Candidates
from paradec.ops.selection import TOPK


def plan(candidates: Candidates) -> tuple[int, torch.Tensor, float]:
    return TOPK, -candidates.position.float(), 0.0
