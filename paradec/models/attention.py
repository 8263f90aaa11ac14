"""Attention specs: which positions a query may see.

Every token carries a segment id. The prompt is segment PROMPT, think block j (0-based) is
segment j + 1, the summary is SUMMARY, padding is PAD.

- ``canvas``: every non-pad token sees every non-pad token (NAP's training attention).
- ``isolated``: the prompt sees the prompt; think block j sees the prompt and itself; the summary
  sees everything. Under it the prompt KV is exact to cache and the blocks are conditionally
  independent given the prompt (DESIGN.md contract 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec.errors import InputError

PAD = -1
PROMPT = 0
SUMMARY = -2
MODES = ("canvas", "isolated")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"attention mode must be one of {MODES}, got {mode!r}")


def attention_mask(query_segments: torch.Tensor, key_segments: torch.Tensor, mode: str) -> torch.Tensor:
    """Boolean mask, True where a query may attend to a key.

    query_segments: [B, Tq], key_segments: [B, Tk] -> [B, 1, Tq, Tk]
    A padding query sees the prompt only, so no row of the mask is empty.
    """
    check_mode(mode)
    q = query_segments[:, None, :, None]
    k = key_segments[:, None, None, :]
    key_real = k != PAD
    if mode == "canvas":
        return key_real & ((q != PAD) | (k == PROMPT))
    return key_real & ((k == PROMPT) | (k == q) | (q == SUMMARY))


@dataclass(frozen=True)
class AttentionSpec:
    """The layout of one sequence: prompt ``[0, prompt_len)``, think blocks and an optional
    summary, each an absolute ``[start, end)`` range. Ranges must tile the sequence with no
    overlap and no gap."""

    mode: str
    prompt_len: int
    blocks: tuple[tuple[int, int], ...]
    summary: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.prompt_len < 1:
            raise InputError(f"prompt_len must be >= 1, got {self.prompt_len}")
        cursor = self.prompt_len
        named = [(f"blocks[{j}]", r) for j, r in enumerate(self.blocks)]
        if self.summary is not None:
            named.append(("summary", self.summary))
        for name, (start, end) in named:
            if end <= start:
                raise InputError(f"{name} = [{start}, {end}) is empty or reversed")
            if start < cursor:
                raise InputError(f"{name} = [{start}, {end}) overlaps what comes before it (ends at {cursor})")
            if start > cursor:
                raise InputError(f"{name} = [{start}, {end}) leaves a gap [{cursor}, {start}) after what comes before it")
            cursor = end

    @classmethod
    def from_lengths(cls, mode: str, prompt_len: int, block_lens: list[int], summary_len: int = 0) -> AttentionSpec:
        blocks, cursor = [], prompt_len
        for length in block_lens:
            blocks.append((cursor, cursor + length))
            cursor += length
        summary = (cursor, cursor + summary_len) if summary_len > 0 else None
        return cls(mode, prompt_len, tuple(blocks), summary)

    @property
    def total_len(self) -> int:
        if self.summary is not None:
            return self.summary[1]
        return self.blocks[-1][1] if self.blocks else self.prompt_len

    def segment_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [T] absolute positions (PAD where < 0) -> [T] segment ids."""
        segments = torch.full_like(positions, PAD)
        segments[(positions >= 0) & (positions < self.prompt_len)] = PROMPT
        for j, (start, end) in enumerate(self.blocks):
            segments[(positions >= start) & (positions < end)] = j + 1
        if self.summary is not None:
            start, end = self.summary
            segments[(positions >= start) & (positions < end)] = SUMMARY
        if bool(((positions >= self.total_len)).any()):
            raise InputError(f"positions reach {int(positions.max())}, beyond this spec's length {self.total_len}")
        return segments
