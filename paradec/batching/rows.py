"""The device state of a batching engine's rows: one pool row per live request, each with its own
layout, window, quotas, seed and counters, so requests of different settings share every call.

Per row (R rows; S slots a row, ``RowGeometry``; C = max canvas; G = max groups + 1, the last a
dummy group that padding columns belong to):
- ids, positions, segments [R, S]: what each slot holds (prompt, canvas, scratch); segments are
  also the keys' attention segments (PAD: never a key). canvas_slots [R, C]: each canvas
  column's slot (after the row's prompt); extent [R] (host): the row's keys lie in [0, extent).
- canvas, trace [R, C]; editable [R, C]; groups [R, C] (G - 1 past the row's canvas).
- seeds [R]; group_steps, window_steps [R, G]; step [R]: the sampler's keys and the counters.
- prompt_lens [R]; last_hidden [R, d], the final state of slot hidden_slot [R] (a shifted model's
  prediction of the slot after it): the prompt's last, after the summary's extension the last
  think column (a headerless summary's first token).
- canvas_attention [R]: the row attends under ``canvas`` (else ``isolated``); eos_fill [R].
- delayed [R]: the row's steps forward only what can change (``paradec.decoding.delayed``), with
  step_successor, step_always [R, S] per step slot.
- the current window: step_slots, refresh_slots [R, S] (scratch-padded), commit_cols [R, C] with commit_valid,
  barred, commit_groups, commit_offsets; quotas [R, G, C], schedule_len [R, G], budgeted [R] (a
  step budget sets floors, ``steps`` in the config).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from paradec.batching.pool import RowGeometry
from paradec.batching.sequence import Sequence, WindowColumns
from paradec.models.attention import PAD, PROMPT


def to_device(values, device: torch.device) -> torch.Tensor:
    """A host list (or CPU tensor) as a device tensor without waiting for the device: staged in
    pinned memory, since a copy from pageable memory (and a plain ``torch.tensor(...,
    device=cuda)``) first synchronises the stream, and the host would wait for the step in flight
    (measured on an H200: a lone 8B request's engine steps then left the GPU idle a third of
    the time)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class Rows:
    def __init__(self, rows: int, geometry: RowGeometry, max_groups: int, hidden: int, mask_id: int, pad_id: int,
                 stop_ids: list[int], dtype: torch.dtype, device: torch.device):
        r, s, c, g = rows, geometry.slots, geometry.max_canvas, max_groups + 1
        self.geometry, self.device, self.mask_id, self.pad_id = geometry, device, mask_id, pad_id
        self.dummy_group = g - 1
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.full((r, s), pad_id, **long)
        self.positions = torch.full((r, s), -1, **long)
        self.segments = torch.full((r, s), PAD, **long)
        self.canvas = torch.full((r, c), pad_id, **long)
        self.canvas_slots = torch.full((r, c), geometry.scratch, **long)  # the slot of each canvas column
        self.extent = torch.ones(r, dtype=torch.long)  # host: slots [0, extent) hold the row's keys
        self.trace = torch.full((r, c), -1, **long)
        self.editable = torch.zeros(r, c, dtype=torch.bool, device=device)
        self.groups = torch.full((r, c), self.dummy_group, **long)
        self.seeds = torch.zeros(r, **long)
        self.group_steps = torch.zeros(r, g, **long)
        self.window_steps = torch.zeros(r, g, **long)
        self.step = torch.zeros(r, **long)
        self.prompt_lens = torch.ones(r, **long)
        self.last_hidden = torch.zeros(r, hidden, dtype=dtype, device=device)
        self.hidden_slot = torch.zeros(r, **long)
        self.canvas_attention = torch.zeros(r, dtype=torch.bool, device=device)
        self.eos_fill = torch.zeros(r, dtype=torch.bool, device=device)
        self.body_starts = torch.zeros(r, g, **long)
        # rows the step call forwards: STEP rows, or REFRESH rows in a refresh call
        self.stepping = torch.zeros(r, dtype=torch.bool, device=device)
        self.refreshing = torch.zeros(r, dtype=torch.bool, device=device)  # of them, rows refreshing (a mixed call)
        self.step_slots = torch.full((r, s), geometry.scratch, **long)
        self.delayed = torch.zeros(r, dtype=torch.bool, device=device)
        self.step_successor = torch.zeros(r, s, dtype=torch.bool, device=device)
        self.step_always = torch.zeros(r, s, dtype=torch.bool, device=device)
        self.refresh_slots = torch.full((r, s), geometry.scratch, **long)
        self.commit_cols = torch.zeros(r, c, **long)
        self.commit_valid = torch.zeros(r, c, dtype=torch.bool, device=device)
        self.barred = torch.zeros(r, c, dtype=torch.bool, device=device)
        self.commit_groups = torch.full((r, c), self.dummy_group, **long)
        self.commit_offsets = torch.zeros(r, c, **long)
        self.quotas = torch.zeros(r, g, c, **long)
        self.schedule_len = torch.zeros(r, g, **long)
        self.budgeted = torch.zeros(r, dtype=torch.bool, device=device)
        self.stop_ids = torch.tensor(stop_ids, **long)
        self.clear(range(r))

    @property
    def num_groups(self) -> int:
        return self.group_steps.shape[1]

    def clear(self, rows) -> None:
        """Rows holding no request: a dummy prompt key in slot 0 (a padding query sees the prompt,
        so every query of the row sees one key), nothing else."""
        for row in rows:
            self.segments[row].fill_(PAD)
            self.segments[row, 0] = PROMPT
            self.editable[row] = False
            self.step_slots[row].fill_(self.geometry.scratch)
            self.refresh_slots[row].fill_(self.geometry.scratch)
            self.commit_valid[row] = False
            self.canvas_slots[row].fill_(self.geometry.scratch)
            self.extent[row] = 1

    def admit(self, row: int, seq: Sequence, seed: int) -> None:
        """Fills row ``row`` for ``seq``: its prompt, its canvas template, its counters."""
        geo, layout, device = self.geometry, seq.layout, self.device
        p, c = len(seq.prompt_ids), layout.length
        canvas_at = slice(p, p + c)
        self.ids[row].fill_(self.pad_id)
        self.ids[row, :p] = to_device(seq.prompt_ids, device)
        self.positions[row].fill_(-1)
        self.positions[row, :p] = torch.arange(p, device=device)
        self.positions[row, canvas_at] = p + torch.arange(c, device=device)
        self.segments[row].fill_(PAD)
        self.segments[row, :p] = PROMPT
        self.segments[row, canvas_at] = to_device(layout.segments, device)
        self.canvas_slots[row] = (p + torch.arange(self.canvas.shape[1], device=device)).clamp(max=geo.scratch)
        self.extent[row] = p + c
        self.canvas[row].fill_(self.pad_id)
        self.canvas[row, :c] = to_device(layout.template, device)
        self.trace[row].fill_(-1)
        self.editable[row] = False
        self.editable[row, :c] = to_device(layout.editable, device)
        self.groups[row].fill_(self.dummy_group)
        self.groups[row, :c] = to_device(layout.groups, device)
        self.body_starts[row].zero_()
        self.body_starts[row, : layout.num_groups] = to_device([s for s, _ in layout.bodies], device)
        self.seeds[row] = seed
        self.group_steps[row] = 0
        self.window_steps[row] = 0
        self.step[row] = 0
        self.prompt_lens[row] = p
        self.last_hidden[row] = 0
        self.hidden_slot[row] = p - 1
        self.canvas_attention[row] = seq.config.attention == "canvas"
        self.eos_fill[row] = seq.config.eos_closes_block
        self.budgeted[row] = seq.config.steps is not None
        self.delayed[row] = seq.delayed
        self.step_slots[row].fill_(self.geometry.scratch)
        self.refresh_slots[row].fill_(self.geometry.scratch)
        self.commit_valid[row] = False

    def load_windows(self, loads: list[tuple[int, WindowColumns]]) -> None:
        """Rows' current windows, ``(row, columns)`` each: their step and refresh slots, commit
        columns and quotas; their window counters start over; the rows must be distinct. Each
        table's used prefix is staged on the host for every row and goes over in one transfer
        (and the row ids in another); then a fill and a write a table:
        rows in lockstep change windows together, and a write a table and row left the GPU idle
        ~1 ms a row (8 rows of an 8B engine on an H200: ~100 ms of a 3.7 s batch;
        benchmarks/RESULTS.md, session 17)."""
        if not loads:
            return
        tables = self._window_tables()  # (table, the value of a row's entries past its window's)
        values = [self._window_row(columns) for _, columns in loads]  # per row: per table
        shapes = [_used(table, [v[t] for v in values]) for t, (table, _) in enumerate(tables)]
        sizes = [math.prod(shape) for shape in shapes]
        host = np.empty((len(loads), sum(sizes)), dtype=np.int64)  # [n, the used prefixes]; numpy: µs an op
        for i, row_values in enumerate(values):
            at = 0
            for (_, fill), shape, size, value in zip(tables, shapes, sizes, row_values):
                block = host[i, at: at + size].reshape(shape)  # a view
                block[...] = fill
                if isinstance(value, dict):  # quotas: group -> its schedule
                    for g, schedule in value.items():
                        block[g, : len(schedule)] = schedule
                elif len(value):
                    block[: len(value)] = np.asarray(value)
                at += size
        staged = to_device(torch.from_numpy(host), self.device)
        rows = to_device([row for row, _ in loads], self.device)
        at = 0
        for (table, fill), shape, size in zip(tables, shapes, sizes):
            table.index_fill_(0, rows, fill)
            if size:
                used = table[(slice(None), *(slice(0, k) for k in shape))]
                used.index_copy_(0, rows, staged[:, at: at + size].view(len(loads), *shape).to(table.dtype))
            at += size

    def _window_tables(self) -> list[tuple[torch.Tensor, int]]:
        scratch, dummy = self.geometry.scratch, self.dummy_group
        return [(self.step_slots, scratch), (self.step_successor, 0), (self.step_always, 0),
                (self.refresh_slots, scratch), (self.commit_cols, 0),
                (self.commit_valid, 0), (self.barred, 0), (self.commit_groups, dummy), (self.commit_offsets, 0),
                (self.quotas, 0), (self.schedule_len, 0), (self.window_steps, 0)]

    @staticmethod
    def _window_row(columns: WindowColumns) -> list:
        """A row's values for ``_window_tables``, in order, each from the row's first entry (the
        quotas as group -> schedule)."""
        schedule_len = [0] * (max(columns.schedules, default=-1) + 1)
        for g, schedule in columns.schedules.items():
            schedule_len[g] = len(schedule)
        return [columns.step, columns.step_successor, columns.step_always, columns.refresh, columns.commit_at,
                [1] * len(columns.commit), columns.barred,
                columns.commit_groups, columns.commit_offsets, columns.schedules, schedule_len, []]

    def move(self, source: int, target: int) -> None:
        """Row ``source``'s state into row ``target`` (the pool moves the keys)."""
        for tensor in self._per_row():
            tensor[target].copy_(tensor[source])

    def masked(self, rows: int) -> torch.Tensor:
        """[rows, C] bool: body positions still masked in the first ``rows`` rows."""
        return (self.canvas[:rows] == self.mask_id) & self.editable[:rows]

    def _per_row(self) -> list[torch.Tensor]:
        return [self.ids, self.positions, self.segments, self.canvas, self.canvas_slots, self.extent, self.trace,
                self.editable, self.groups,
                self.seeds, self.group_steps, self.window_steps, self.step, self.prompt_lens, self.last_hidden,
                self.hidden_slot, self.canvas_attention, self.eos_fill, self.body_starts, self.stepping,
                self.step_slots, self.delayed, self.step_successor, self.step_always,
                self.refresh_slots, self.commit_cols, self.commit_valid, self.barred, self.commit_groups,
                self.commit_offsets, self.quotas, self.schedule_len, self.budgeted]


def _used(table: torch.Tensor, values: list) -> tuple[int, ...]:
    """The prefix of a row of ``table`` that rows' ``values`` reach: (entries,), or for the
    quotas' [G, C] rows (groups, schedule length)."""
    if table.dim() == 3:
        return (max(max(v, default=-1) + 1 for v in values),
                max((len(s) for v in values for s in v.values()), default=0))
    return (max(len(v) for v in values),)
