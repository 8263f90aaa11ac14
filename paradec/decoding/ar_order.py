"""``ar_order``: the leftmost masked positions first, the quota of each group per step."""

from __future__ import annotations

import torch

from paradec.decoding.selection import Candidates, rank_in_groups


def select(candidates: Candidates) -> torch.Tensor:
    leftmost_first = -candidates.position.float()
    return rank_in_groups(candidates.key, leftmost_first, candidates.position) < candidates.quota
