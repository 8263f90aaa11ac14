"""Token choice and confidence scores from the logits of masked positions (plain torch).

The chosen token is the argmax, or at temperature T > 0 a Gumbel-max sample computed in
float64: argmax(logits / T + g), g = -log(-log u), the same draw as LLaDA's
``exp(logits) / (-log u) ** T``. Scores come from the softmax at temperature 1: confidence is
the chosen token's probability, margin the top-1 minus top-2 probability, and negative entropy
sum(p log p). Barred ids (the mask id always, stop ids where asked) are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Scores:
    tokens: torch.Tensor  # [N] chosen ids
    confidence: torch.Tensor  # [N] fp32
    margin: torch.Tensor  # [N] fp32
    neg_entropy: torch.Tensor  # [N] fp32

    def by_name(self, name: str) -> torch.Tensor:
        return {"confidence": self.confidence, "margin": self.margin, "entropy": self.neg_entropy}[name]


def score_logits(
    logits: torch.Tensor,
    mask_id: int,
    stop_ids: tuple[int, ...],
    bar_stop: torch.Tensor,
    temperature: float = 0.0,
    uniform_noise: torch.Tensor | None = None,
) -> Scores:
    """logits: [N, V]; bar_stop: [N] bool, rows where stop ids are barred;
    uniform_noise: [N, V] float64 in (0, 1), needed when temperature > 0."""
    logits = logits.float()
    logits[:, mask_id] = float("-inf")
    if stop_ids:
        stops = torch.tensor(stop_ids, device=logits.device)
        logits[:, stops] = torch.where(bar_stop[:, None], float("-inf"), logits[:, stops])
    log_probs = torch.log_softmax(logits, dim=-1)  # [N, V]
    probs = log_probs.exp()
    if temperature > 0:
        gumbel = -torch.log(-torch.log(uniform_noise))
        tokens = (logits.double() / temperature + gumbel).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    top2 = probs.topk(2, dim=-1).values  # [N, 2]
    neg_entropy = torch.where(probs > 0, probs * log_probs, 0.0).sum(-1)
    return Scores(
        tokens=tokens,
        confidence=probs.gather(1, tokens[:, None])[:, 0],
        margin=top2[:, 0] - top2[:, 1],
        neg_entropy=neg_entropy,
    )
