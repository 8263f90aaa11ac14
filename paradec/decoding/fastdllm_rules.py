"""Where Fast-dLLM v1's own decoders decide differently from paradec, a runner given
``FastDLLMRules`` decides as they do (``paradec.compat.fastdllm`` builds them). The step body
applies them on its static shapes, eager or graphed alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec.decoding.policies import Candidates
from paradec.ops.scoring import Scores
from paradec.ops.selection import rank_in_groups


@dataclass(frozen=True)
class FastDLLMRules:
    """Fast-dLLM v1's decisions (``llada/generate.py``) where they differ from paradec's:

    - confidence is the chosen token's probability under the softmax over the whole vocabulary,
      the mask id's mass included (paradec's own: over the ids a step may choose, which leaves
      the mask id out). The ranking and the threshold and factor rules read it. This is what
      parts Fast-dLLM's tokens from paradec's on tiny checkpoints, where the mask id holds about
      1/V of the mass; a trained model gives it almost none. (Only the mask id's mass is put back:
      where stop ids are barred too — ``bar_eos_in_blocks``, ``summary_min_tokens`` — theirs stays
      out; the block mode Fast-dLLM decodes bars none.)
    - the factor rule also commits a group's last masked position when it alone fails its bound
      (``get_transfer_index_dynamic`` then takes every position).
    - window_steps (``generate_with_dual_cache`` with a threshold or factor rule): a window stops
      after this many steps even if it still holds masked positions, and a window's refresh
      steps also consider the positions earlier windows of its group left masked (Fast-dLLM's
      full forward at each block's start commits among every masked position before the block's
      end).

    The mask id itself is never chosen (DESIGN.md contract 5): where Fast-dLLM's argmax is the mask
    id, its code "commits" [MASK] and the results part from there."""

    window_steps: int | None = None


def vocab_confidence(logits: torch.Tensor, rows: torch.Tensor, scores: Scores, mask_id: int) -> torch.Tensor:
    """[N] the chosen tokens' probabilities over the whole vocabulary: the scores' confidence p'
    leaves the mask id's logit l_m out of the softmax, so p = p' / (1 + p' exp(l_m - l_t)), with
    l_t the chosen token's logit. logits: [R, V]; rows: [N]. O(N) work: two gathers."""
    tokens = scores.tokens.clamp(min=0)
    chosen = logits[rows, tokens].double()  # [N]
    masked_logit = logits[rows, mask_id].double()
    p = scores.confidence.double()
    return (p / (1.0 + p * torch.exp(masked_logit - chosen))).to(scores.confidence.dtype)


def factor_last_commits(candidates: Candidates, ranking: torch.Tensor, masked: torch.Tensor, factor: float,
                        groups: int) -> torch.Tensor:
    """[N] floors that make the factor rule commit as Fast-dLLM v1's ``get_transfer_index_dynamic``
    does: where every masked position of a group but its last (its lowest-ranked) passes its
    bound, that code takes the last one too, so the floor becomes the group's masked count.

    ranking, masked: [N] (candidates that are not masked rank after the masked ones); groups: an
    upper bound on key + 1. Passing is decided as the commit kernel decides it (float32,
    ``confidence >= 1 - f / (rank + 2)``, rank 0 always). No host synchronisation."""
    key, confidence = candidates.key, candidates.scores.confidence
    rank = rank_in_groups(key, ranking, candidates.position)
    bound = 1.0 - factor / (rank + 2).float()
    passes = masked & ((confidence >= bound) | (rank == 0))
    count = torch.zeros(groups, dtype=torch.long, device=key.device).scatter_add_(0, key, masked.long())
    passing = torch.zeros_like(count).scatter_add_(0, key, passes.long())
    last_fails_alone = (count >= 2) & (passing == count - 1)  # [groups]
    return torch.where(last_fails_alone[key], count[key], candidates.floor)
