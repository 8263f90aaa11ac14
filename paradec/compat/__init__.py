"""Other runtimes' call signatures on paradec's engine."""

import torch

from paradec.api import split_prompts
from paradec.errors import InputError


def left_padded_prompts(ids: torch.Tensor, attention_mask) -> list[list[int]]:
    """The rows of ``ids`` [B, L] without their left padding (``attention_mask`` zeros), as Dream and
    LLaDA callers pad; right or inner padding and empty rows are refused."""
    if attention_mask is None:
        return ids.cpu().tolist()
    mask = torch.as_tensor(attention_mask).cpu().bool()
    if mask.shape == ids.shape and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise InputError("attention_mask: only left padding is supported (zeros before a row's tokens)")
    return split_prompts(ids, mask)[1]
