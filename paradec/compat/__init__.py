"""Other runtimes' call signatures on paradec's engine."""

import torch

from paradec.errors import InputError


def left_padded_prompts(ids: torch.Tensor, attention_mask) -> list[list[int]]:
    """The rows of ``ids`` [B, L] without their left padding (``attention_mask`` zeros), as Dream and
    LLaDA callers pad; right or inner padding and empty rows are refused."""
    rows = ids.cpu()
    if attention_mask is None:
        return rows.tolist()
    mask = torch.as_tensor(attention_mask).cpu()
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask must have the inputs' shape {list(ids.shape)}, got {list(mask.shape)}")
    mask = mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise InputError("attention_mask: only left padding is supported (zeros before a row's tokens)")
    if not bool(mask.any(1).all()):
        raise InputError("attention_mask: a row has no tokens")
    return [row[keep].tolist() for row, keep in zip(rows, mask)]
