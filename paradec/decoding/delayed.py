"""Delayed KV inside a window (``delayed_kv``; dKV-Cache's delayed caching): which of a window's
step columns a step forwards, and how they are packed into a static width.

With a windowed cache a step forwards every step column of its window by default, so that the
KV of tokens committed earlier in the window follows the window's latest tokens. With delayed
KV a step after the window's refresh forwards a step column only when it can still change or
its KV is still a mask's: when it is masked, or was committed at the previous step; for a
shifted model also when it is the predecessor of a masked column of the window (its hidden
state predicts that column); and always when it lies outside the phase's blocks (a shifted
model's predecessor with a cache slot of its own, a key only while forwarded). Every other column
keeps the KV written when it was last forwarded, until the next refresh.

The count varies from step to step and request to request, but ``Plan.delayed_width`` bounds it
from the schedule, so a step forwards a static width: the needed columns first, in order, then
padding (the runner repeats a needed column, which rewrites its own slot with the same KV; the
batching engine's padding writes a spare slot). Runner and engine both use these two functions,
so a request decodes the same in either.
"""

from __future__ import annotations

import torch


def needed(tokens: torch.Tensor, trace: torch.Tensor, step: torch.Tensor, mask_id: int, valid: torch.Tensor,
           next_tokens: torch.Tensor | None = None, successor: torch.Tensor | None = None,
           always: torch.Tensor | None = None) -> torch.Tensor:
    """[..., W] bool: the step columns a delayed-KV step forwards. tokens, trace: [..., W] each
    column's token and committing step (``PENDING``-free: the step counter's values); step: the
    current step (broadcast over the columns: a 0-d tensor, or [B, 1...] per row); valid: real
    columns (not padding); next_tokens, successor: a shifted model's next column's token and
    whether that next column is in the window; always: columns outside the phase's blocks."""
    keep = (tokens == mask_id) | (trace == step - 1)
    if successor is not None:
        keep = keep | (successor & (next_tokens == mask_id))
    if always is not None:
        keep = keep | always
    return keep & valid


def compact(values: torch.Tensor, keep: torch.Tensor, width: int, pad: torch.Tensor | int) -> torch.Tensor:
    """[..., width]: the entries of ``values`` [..., W] where ``keep``, in order, then ``pad``
    (a scalar, or [..., 1]). Kept entries past ``width`` are dropped (``Plan.delayed_width``
    bounds them away). A scatter to distinct places: no host sync, so it is captured in graphs."""
    w = values.shape[-1]
    order = keep.long().cumsum(-1) - 1
    spill = width + torch.arange(w, device=values.device)  # where the rest go: distinct, then cut off
    target = torch.where(keep & (order < width), order, spill)
    out = values.new_empty(*values.shape[:-1], width + w)
    out[..., :width] = pad
    return out.scatter_(-1, target, values)[..., :width]


def check_width(keep: torch.Tensor, width: int, live: torch.Tensor | None = None) -> None:
    """Raises when a delayed-KV step needs more than ``width`` columns somewhere (``live``: only
    where it still commits). Called steps only: it reads the device."""
    counts = keep.sum(-1)
    if live is not None:
        counts = torch.where(live.view(live.shape + (1,) * (counts.dim() - live.dim())), counts, 0)
    most = int(counts.max()) if counts.numel() else 0
    if most > width:
        raise RuntimeError(f"delayed_kv: a step needs {most} columns but its static width is {width} "
                           "(Plan.delayed_width's bound does not hold)")
