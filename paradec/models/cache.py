"""KV caches of the diffusion transformer: the prompt cache every step reuses, and the per-block
cache of isolated think blocks decoded side by side, with the helpers that build and fill them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec.models.attention import PAD


@dataclass
class PromptCache:
    """The prompt's KV, computed once under prompt-only attention and reused by every step.

    kv: [L, 2, B, Hkv, C, D], one tensor (so it moves between ranks in one message) whose first
    P tokens are the prompt's; the C - P tokens after them are scratch room ("reserve") where a
    forward of up to C - P tokens writes its own k/v in place instead of copying the cache;
    segments: [B, P], PROMPT or PAD (prompts are right-padded); lengths: [B] and last_hidden:
    [B, d], the final-layer hidden state (before the final norm) of each row's token at position
    lengths - 1: the prompt's last (lengths: the prompt's), or after ``extend`` the extension's
    last (the finished think blocks' last column), which a shifted model (Dream) needs to predict
    the position after it when no header follows.
    """

    kv: torch.Tensor
    segments: torch.Tensor
    lengths: torch.Tensor
    last_hidden: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    @property
    def num_tokens(self) -> int:
        return self.segments.shape[1]

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]


@dataclass
class BlockCache:
    """Keys for isolated think blocks decoded side by side, each block over its own keys only:
    row ``b * m + j`` holds request b's prompt KV in slots ``[0, P)`` and block j's columns
    after them, in canvas order. Under ``isolated`` attention a block sees exactly these, so its
    queries need no mask over the other blocks' keys and one batched attention call serves all
    m blocks (at the cost of m copies of the prompt KV).

    kv: [L, 2, B * m, C, Hkv, D], token-major, so one flat index (row * C + slot) addresses a
    slot; bias: [B * m, 1, 1, C] additive (0, or -inf on slots that hold no key: prompt padding,
    shorter blocks), or None when every slot holds one."""

    kv: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class PackedQueries:
    """A forward's queries packed: only the N real ones of a [B, T] batch of rows (a row pads
    to the widest), so that every token-wise product (the projections, the MLP) runs over N
    rows, not B * T; attention alone unpacks them into [B, T] (padding queries zero, their
    outputs dropped). With a static cache of rows (``paradec.batching``).

    rows, slots: [N] each query's row and the slot its k/v are written into; padded: [N] its
    index in the flattened [B, T] layout (row * T + column), the mask's rows."""

    rows: torch.Tensor
    slots: torch.Tensor
    padded: torch.Tensor
    batch: int
    width: int


def kv_buffer(prefix: torch.Tensor | None, kv: list[tuple[torch.Tensor, torch.Tensor]], reserve: int) -> torch.Tensor:
    """One [L, 2, B, Hkv, C, D] buffer: ``prefix`` ([L, 2, B, Hkv, P, D] or None), then each
    layer's new k/v ([B, Hkv, T, D]), then ``reserve`` tokens of scratch room."""
    k0 = kv[0][0]
    p = 0 if prefix is None else prefix.shape[4]
    t = k0.shape[2]
    buffer = k0.new_empty(len(kv), 2, k0.shape[0], k0.shape[1], p + t + reserve, k0.shape[3])
    if prefix is not None:
        buffer[..., :p, :] = prefix
    for i, (k, v) in enumerate(kv):
        buffer[i, 0, :, :, p : p + t], buffer[i, 1, :, :, p : p + t] = k, v
    return buffer


def empty_cache(like: torch.Tensor, cfg, batch: int, cached: int, reserve: int, seg_dtype: torch.dtype) -> PromptCache:
    """A zeroed ``PromptCache`` of ``batch`` rows for a model of config ``cfg`` (a
    ``TransformerConfig``): kv [L, 2, batch, Hkv, cached + reserve, D] in ``like``'s dtype and
    device, segments [batch, cached] all PAD (of ``seg_dtype``), lengths [batch] zero,
    last_hidden [batch, d] zero. A static buffer that ``copy_cache`` refills."""
    kv = like.new_zeros(cfg.num_layers, 2, batch, cfg.num_kv_heads, cached + reserve, cfg.head_dim)
    return PromptCache(kv=kv, segments=torch.full((batch, cached), PAD, dtype=seg_dtype, device=like.device),
                       lengths=torch.zeros(batch, dtype=torch.long, device=like.device),
                       last_hidden=like.new_zeros(batch, cfg.hidden_size))


def copy_cache(dst: PromptCache, src: PromptCache, n: int) -> None:
    """The first ``n`` tokens of ``src`` into ``dst`` (its other slots untouched): kv [..., :n, :],
    segments [:, :n] (``src.segments`` is [B, n]), lengths and last_hidden."""
    dst.kv[..., :n, :].copy_(src.kv[..., :n, :])
    dst.segments[:, :n].copy_(src.segments)
    dst.lengths.copy_(src.lengths)
    dst.last_hidden.copy_(src.last_hidden)
