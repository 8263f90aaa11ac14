"""Fast-dLLM's factor rule: the n-th most confident position of a group (n from 1) is committed
when its confidence >= 1 - f / (n + 1). The bound rises with n while the ranked confidences
fall, so the accepted positions are always a top-n prefix. Each group always commits its top-1
(and its floor, when a step budget must be met)."""

from __future__ import annotations

import torch

from paradec.decoding.selection import Candidates
from paradec.ops.selection import FACTOR


def plan(candidates: Candidates, factor: float) -> tuple[int, torch.Tensor, float]:
    return FACTOR, candidates.scores.confidence, factor


def last_one_floor(key: torch.Tensor, confidence: torch.Tensor, rank: torch.Tensor, masked: torch.Tensor,
                   floor: torch.Tensor, factor: float, groups: int) -> torch.Tensor:
    """Floors that make the rule commit as Fast-dLLM v1's ``get_transfer_index_dynamic`` does:
    where every masked position of a group but its last (its lowest-ranked) passes its bound,
    that code takes the last one too, so the floor becomes the group's masked count.

    key, confidence, rank, masked, floor: [N] (rank 0 is a group's best; candidates that are not
    masked rank after the masked ones); groups: an upper bound on key + 1. Passing is decided
    as the commit kernel decides it (float32, ``confidence >= 1 - f / (rank + 2)``, rank 0 always).
    No host synchronisation (it runs inside CUDA graphs)."""
    bound = 1.0 - factor / (rank + 2).float()
    passes = masked & ((confidence >= bound) | (rank == 0))
    count = torch.zeros(groups, dtype=torch.long, device=key.device).scatter_add_(0, key, masked.long())
    passing = torch.zeros_like(count).scatter_add_(0, key, passes.long())
    last_fails_alone = (count >= 2) & (passing == count - 1)  # [groups]
    return torch.where(last_fails_alone[key], count[key], floor)
