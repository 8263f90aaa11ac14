"""``random``: positions in a random order (priorities drawn per step from the request's
stream), the quota of each group per step."""

from __future__ import annotations

import torch

from paradec.decoding.selection import Candidates
from paradec.ops.selection import TOPK


def plan(candidates: Candidates) -> tuple[int, torch.Tensor, float]:
    return TOPK, candidates.priority, 0.0
