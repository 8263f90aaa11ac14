"""What every unmasking policy works on: the masked positions of a step, grouped by
(request, group), with their scores. Ranking and the commit rules are in ``paradec.ops.selection``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec.ops.scoring import Scores


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
