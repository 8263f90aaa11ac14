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
    uniform_noise: [N, V] float64 in (0, 1), needed when temperature > 0.

    Edge rows: a row with +inf logits is scored as the softmax's limit, uniform over them (the
    first one is chosen); a row with no allowed finite logit chooses -1 with zero scores.
    """
    logits = logits.float()
    logits[:, mask_id] = float("-inf")
    if stop_ids:
        stops = torch.tensor(stop_ids, device=logits.device)
        logits[:, stops] = torch.where(bar_stop[:, None], float("-inf"), logits[:, stops])
    positive_inf = torch.isposinf(logits)
    has_inf = positive_inf.any(-1, keepdim=True)
    finite = torch.where(has_inf, torch.where(positive_inf, 0.0, float("-inf")), logits)
    empty = ~(finite > float("-inf")).any(-1)  # [N] nothing allowed
    log_probs = torch.log_softmax(torch.where(empty[:, None], 0.0, finite), dim=-1)  # [N, V]
    probs = log_probs.exp()
    if temperature > 0:
        gumbel = -torch.log(-torch.log(uniform_noise))
        tokens = (logits.double() / temperature + gumbel).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # [N, 2]
    second = top2[:, 1] if top2.shape[-1] > 1 else torch.zeros_like(top2[:, 0])
    neg_entropy = torch.where(probs > 0, probs * log_probs, 0.0).sum(-1)
    confidence = probs.gather(1, tokens[:, None])[:, 0]
    zero = torch.zeros_like(confidence)
    return Scores(
        tokens=torch.where(empty, -1, tokens),
        confidence=torch.where(empty, zero, confidence),
        margin=torch.where(empty, zero, top2[:, 0] - second),
        neg_entropy=torch.where(empty, zero, neg_entropy),
    )
