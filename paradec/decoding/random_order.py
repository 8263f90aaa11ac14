"""``random``: positions in a random order (priorities drawn per step from the request's
stream), the quota of each group per step."""

from __future__ import annotations

import torch

from paradec.decoding.selection import Candidates, rank_in_groups


def select(candidates: Candidates) -> torch.Tensor:
    return rank_in_groups(candidates.key, candidates.priority, candidates.position) < candidates.quota
