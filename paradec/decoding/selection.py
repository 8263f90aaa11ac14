"""What every unmasking policy works on: the masked positions of a step, grouped by
(request, group), with their scores; and ranking inside groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec.decoding.scoring import Scores

# Commit rules (the ``rule`` argument of ``paradec.ops.select_commit``): exactly the quota, best
# first; every position with confidence >= tau; Fast-dLLM's factor rule. The last two always
# commit at least the group's floor (its top-1, or more to meet a step budget).
TOPK, THRESHOLD, FACTOR = 0, 1, 2


@dataclass
class Candidates:
    """The masked positions one step may commit, flattened over the batch: [N] each.

    key: one id per (request, group); position: absolute position (ties go to the lowest);
    quota: the scheduled count of the candidate's group this step (top-k policies commit
    exactly that); floor: the least the group must commit this step (rule policies: at least
    the top-1, more when a step budget must be met); priority: a random key per position
    (``random`` order only).
    """

    key: torch.Tensor
    position: torch.Tensor
    scores: Scores
    quota: torch.Tensor
    floor: torch.Tensor
    priority: torch.Tensor | None = None


def rank_in_groups(key: torch.Tensor, score: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Rank of each candidate inside its group: 0 for the highest score; equal scores rank by
    lower position. key, score, position: [N] -> [N] long."""
    order = torch.argsort(position, stable=True)
    order = order[torch.argsort(score[order], descending=True, stable=True)]
    order = order[torch.argsort(key[order], stable=True)]
    sorted_key = key[order]
    index = torch.arange(len(order), device=key.device)
    starts = torch.ones_like(sorted_key, dtype=torch.bool)
    starts[1:] = sorted_key[1:] != sorted_key[:-1]
    group_start = torch.cummax(torch.where(starts, index, 0), dim=0).values
    rank = torch.empty_like(index)
    rank[order] = index - group_start
    return rank
