"""Fake kernels (shapes and dtypes only) of ``torch.ops.paradec.*``, for torch.compile and meta
tensors. Imported by ``paradec.ops`` once ``paradec._C`` has registered the ops."""

from __future__ import annotations

import torch


@torch.library.register_fake("paradec::score")
def score_fake(logits, rows, mask_id, stop_ids, bar_stop, temperature, noise, row_invariant=False):
    """rows: [N] -> tokens [N] (rows' dtype), confidence, margin, neg_entropy [N] fp32."""
    n = rows.shape[0]
    real = logits.new_empty(n, dtype=torch.float32)
    return rows.new_empty(n), real, torch.empty_like(real), torch.empty_like(real)


@torch.library.register_fake("paradec::select_commit")
def select_commit_fake(canvas, trace, batch_index, column, key, score, confidence, quota, floor, tokens, rule, param,
                       step):
    """score: [N] -> committed [N] bool."""
    return score.new_empty(score.shape[0], dtype=torch.bool)
