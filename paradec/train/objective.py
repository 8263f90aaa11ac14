"""LLaDA's masked-diffusion SFT objective.

For each sequence draw t ~ U(eps, 1) (eps keeps 1/t finite), mask each response token with
probability t, predict the masked tokens and weight their cross-entropy by 1/t; the prompt is
never masked and takes no loss. A sequence's loss is divided by its number of response tokens
(LLaDA's SFT normalisation), then averaged over the batch. With ``structure_aware`` (NAP) the
canvas headers are never masked either; without it they are response tokens like the rest.
The EOS padding of every block is response, so the model learns where a block ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paradec.models.attention import PAD
from paradec.train.data import ROLE_BODY, ROLE_HEADER

EPS = 1e-3


@dataclass
class NoiseDraw:
    """One batch's diffusion noise: t [B] and uniform draws [B, T] (mask where u < t)."""

    t: torch.Tensor
    u: torch.Tensor

    @classmethod
    def draw(cls, generator: torch.Generator, batch: int, length: int) -> NoiseDraw:
        t = EPS + (1 - EPS) * torch.rand(batch, generator=generator, dtype=torch.float64)
        u = torch.rand(batch, length, generator=generator, dtype=torch.float64)
        return cls(t.float(), u.float())

    def rows(self, index: slice) -> NoiseDraw:
        return NoiseDraw(self.t[index], self.u[index])


def response_mask(roles: torch.Tensor, structure_aware: bool) -> torch.Tensor:
    """[B, T] bool: positions that may be masked and take loss."""
    response = roles == ROLE_BODY
    return response if structure_aware else response | (roles == ROLE_HEADER)


def masked_diffusion_loss(
    logits_fn, ids: torch.Tensor, segments: torch.Tensor, roles: torch.Tensor, noise: NoiseDraw, mask_id: int,
    attention: str, structure_aware: bool = True,
) -> torch.Tensor:
    """The scalar loss of one batch. logits_fn: the model's ``training_logits`` (or a wrapper
    of it: DDP, torch.compile); ids, segments, roles: [B, T] on the model's device."""
    device = ids.device
    t, u = noise.t.to(device), noise.u.to(device)
    response = response_mask(roles, structure_aware)  # [B, T]
    masked = response & (u < t[:, None])  # [B, T]
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    positions = torch.where(segments == PAD, -1, torch.arange(ids.shape[1], device=device))  # [B, T]
    logits = logits_fn(noisy, positions, segments, attention, masked)  # [M, V]
    ce = F.cross_entropy(logits.float(), ids[masked], reduction="none")  # [M]
    weight = 1.0 / t[:, None].expand_as(ids)[masked]
    per_row = torch.zeros(ids.shape[0], device=device).index_add_(0, masked.nonzero()[:, 0], ce * weight)
    return (per_row / response.sum(1).clamp(min=1)).mean()
