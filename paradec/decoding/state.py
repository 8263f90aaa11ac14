"""The device state of one batch of requests being decoded: the canvas, the trace and the
counters a step reads and writes in place. The runner owns it; the step body updates it."""

from __future__ import annotations

import torch

from paradec.canvas import CanvasLayout


class DecodeState:
    """Tensors of a batch of B prompts on one layout of C canvas columns and G groups.

    canvas [B, C]: tokens (the mask id where still masked); trace [B, C]: the global step that
    committed each position (-1: not yet, or a header); positions, segments [B, C]: each column's
    absolute position and attention segment; prompt_ids [B, P] (right-padded), prompt_lens [B];
    seeds [B]: each request's seed (request r of a config: seed + r); group_steps [B, G]: steps
    each group has taken (the sampler's step key); window_steps [B, G]: ... in its current
    window; step [0-d]: the global step counter. Static per layout: groups [C] (each column's
    group), editable [C] (body columns), body_starts [G], stop_ids [S]."""

    def __init__(self, layout: CanvasLayout, batch: int, prompt_len: int, mask_id: int, pad_id: int,
                 stop_ids: list[int], device: torch.device):
        self.layout, self.device, self.mask_id, self.pad_id = layout, device, mask_id, pad_id
        b, c, g = batch, layout.length, layout.num_groups
        self.prompt_lens = torch.zeros(b, dtype=torch.long, device=device)
        self.prompt_ids = torch.zeros(b, prompt_len, dtype=torch.long, device=device)
        self.canvas = torch.empty(b, c, dtype=torch.long, device=device)
        self.positions = torch.empty(b, c, dtype=torch.long, device=device)
        self.trace = torch.empty(b, c, dtype=torch.long, device=device)
        self.seeds = torch.zeros(b, dtype=torch.long, device=device)
        self.group_steps = torch.zeros(b, g, dtype=torch.long, device=device)
        self.window_steps = torch.zeros(b, g, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.segments = layout.segments.to(device).repeat(b, 1)
        self.groups = layout.groups.to(device)
        self.editable = layout.editable.to(device)
        self.body_starts = torch.tensor([s for s, _ in layout.bodies], device=device)
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.canvas.shape[0]

    def reset(self, prompts: list[list[int]], seeds: list[int]) -> None:
        """Refills every buffer in place for ``prompts`` (as many as the state holds, none longer
        than its prompt width), so static buffers that point here stay valid."""
        self.prompt_lens.copy_(torch.tensor([len(q) for q in prompts]))
        self.prompt_ids.fill_(self.pad_id)
        for r, q in enumerate(prompts):
            self.prompt_ids[r, : len(q)] = torch.tensor(q, device=self.device)
        self.canvas.copy_(self.layout.template.to(self.device).expand_as(self.canvas))
        self.positions.copy_(self.prompt_lens[:, None] + torch.arange(self.canvas.shape[1], device=self.device))
        self.trace.fill_(-1)
        self.seeds.copy_(torch.tensor(seeds))
        self.group_steps.zero_()
        self.window_steps.zero_()
        self.step.zero_()

    def masked(self) -> torch.Tensor:
        """[B, C] bool: body positions still masked."""
        return (self.canvas == self.mask_id) & self.editable

    def per_group(self, columns: torch.Tensor) -> torch.Tensor:
        """[B, G] counts of a [B, C] bool per group (on the device)."""
        counts = torch.zeros(columns.shape[0], self.layout.num_groups, dtype=torch.long, device=self.device)
        return counts.index_add_(1, self.groups, columns.long())

    def committed(self) -> torch.Tensor:
        """[B, G] tokens committed so far in each group's body (host tensor; one device sync)."""
        return self.per_group((self.trace >= 0) & self.editable).cpu()
