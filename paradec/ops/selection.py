"""The commit rules of ``paradec.ops.select_commit``, ranking inside groups, and the plain-torch
twin of the select_commit kernel."""

from __future__ import annotations

import torch

# Commit rules (the ``rule`` argument of ``paradec.ops.select_commit``): exactly the quota, best
# first; every position with confidence >= tau; Fast-dLLM's factor rule. The last two always
# commit at least the group's floor (its top-1, or more to meet a step budget).
TOPK, THRESHOLD, FACTOR = 0, 1, 2


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


def select_commit_twin(canvas, trace, batch_index, column, key, score, confidence, quota, floor, tokens, rule,
                       param, step) -> torch.Tensor:
    """canvas, trace: [B, L]; batch_index, column, key, score, confidence, quota, floor, tokens:
    [N]. Commits in place; returns [N] bool, the candidates committed."""
    rank = rank_in_groups(key, score, column)
    if rule == TOPK:
        check_quota(key, quota)
        committed = rank < quota
    elif rule == THRESHOLD:
        committed = (confidence >= param) | (rank < floor)  # in float32, as the kernel compares
    elif rule == FACTOR:
        committed = (confidence >= 1.0 - param / (rank + 2).float()) | (rank < floor)
    else:
        raise ValueError(f"rule must be {TOPK} (top-k), {THRESHOLD} (threshold) or {FACTOR} (factor), got {rule}")
    b, c = batch_index[committed], column[committed]
    canvas[b, c] = tokens[committed]
    trace[b, c] = step
    return committed


def check_quota(key: torch.Tensor, quota: torch.Tensor) -> None:
    """key, quota: [N]. Raises when a candidate's quota exceeds its segment's candidate count."""
    if not key.numel():
        return
    size = torch.bincount(key)[key]  # [N] candidates in each one's segment
    if bool((quota > size).any()):
        i = int((quota > size).nonzero()[0, 0])
        raise ValueError(f"select_commit: quota {int(quota[i])} of segment key {int(key[i])} is larger than "
                         f"its {int(size[i])} candidates")
