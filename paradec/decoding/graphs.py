"""Decoding steps replayed as CUDA graphs.

A step launches hundreds of small kernels; on these GPUs a launch costs ~18 µs from the host, so
an eager 32-token step of an 8B model spends as long launching as computing (DESIGN.md's
numbers). A graph replays a whole step — the cached forward, scoring, selection, the in-place
commit into canvas and trace, EOS filling and the step counters — with one launch and no host
synchronisation; the host checks for completion every few steps.

Everything a step reads lives in static buffers that the host refills when a window starts:
the forwarded columns (padded), the window's candidate columns (padded), the quota table of
the window and a copy of the cache. One graph is captured per phase (think blocks, summary,
answer region) and replayed across its windows. Shapes are padded to the phase's largest
window, so padding queries (segment PAD) and stale cache slots (segment PAD) are masked out.
The steps it replays are the runner's eager steps on a static shape; ``tests/test_cuda.py``
compares the two on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec import ops
from paradec.decoding.selection import Candidates
from paradec.models.attention import PAD
from paradec.models.transformer import PromptCache

_PENDING = -7  # trace value select_commit writes inside a graph; replaced by the step counter


def graphs_apply(runner) -> bool:
    """Whether ``runner``'s steps can be replayed as graphs (static shapes, no host draws)."""
    cfg = runner.config
    return (
        runner.device.type == "cuda"
        and ops.native_on(runner.device)  # the torch twins read results on the host
        and cfg.cuda_graphs
        and cfg.temperature == 0
        and cfg.mode != "random"
        and (runner.config.cache_mode in ("prefix", "dual") or cfg.attention == "isolated")
    )


@dataclass
class _PhaseShape:
    step_width: int  # S: forwarded columns per step
    window_width: int  # N: candidate columns per step
    cached: int  # K: cache tokens before the forwarded ones
    schedule_len: int  # longest window schedule


class GraphedSteps:
    """The step graph of one phase of one runner: its static buffers and the captured graph.
    The runner keeps one per phase and reuses them across its windows and its ``reset``s."""

    def __init__(self, runner, phase: list[int], cache: PromptCache, pool):
        self.runner, self.phase, self.pool = runner, phase, pool
        self.graph = None
        self._build(cache)

    # --- host side ---------------------------------------------------------------------------
    def replay(self, cache: PromptCache, count: int, step: int, load: bool) -> int:
        """Replays ``count`` steps of the current window from global step ``step``; ``load``:
        refill the window's buffers and copy ``cache`` (the phase's prompt cache, or the
        window's) first. Returns the step after them."""
        r = self.runner
        if load:
            self._load_window(cache)
        self.step_t.fill_(step)
        self.window_steps.copy_(r.window_steps)
        before = r.window_steps.clone()
        if self.graph is None:
            self._capture()
        for _ in range(count):
            self.graph.replay()
        r.window_steps.copy_(self.window_steps.cpu())
        r.group_steps += r.window_steps - before
        return int(self.step_t)

    def _build(self, cache: PromptCache) -> None:
        """Static buffers large enough for every window of the phase."""
        r, phase = self.runner, self.phase
        device, b = r.device, r.canvas.shape[0]
        windows = max(len(r.windows[g]) for g in phase)
        step_cols = [self._step_columns(k) for k in range(windows)]
        window_cols = [self._window_columns(k) for k in range(windows)]
        if r._windowed_cache:
            # A refresh forwards the same tokens in every window and keeps all but the step
            # columns, so cache + step columns is the same total in every window.
            total = cache.num_tokens + len(self._step_columns(r.window_index))
            cached = total - min(len(c) for c in step_cols)
        else:
            cached = cache.num_tokens
        shape = _PhaseShape(
            step_width=max(len(c) for c in step_cols),
            window_width=max(len(c) for c in window_cols),
            cached=cached,
            schedule_len=max(len(s) for g in phase for s in r.schedules[g]),
        )
        self.shape = shape
        self.step_cols = torch.zeros(shape.step_width, dtype=torch.long, device=device)
        self.step_valid = torch.zeros(shape.step_width, dtype=torch.bool, device=device)
        self.window_cols = torch.zeros(shape.window_width, dtype=torch.long, device=device)
        self.window_valid = torch.zeros(shape.window_width, dtype=torch.bool, device=device)
        self.barred = torch.zeros(b, shape.window_width, dtype=torch.bool, device=device)
        g = r.layout.num_groups
        self.quotas = torch.zeros(g, shape.schedule_len, dtype=torch.long, device=device)
        self.schedule_len = torch.zeros(g, dtype=torch.long, device=device)
        self.window_steps = torch.zeros(b, g, dtype=torch.long, device=device)
        self.step_t = torch.zeros((), dtype=torch.long, device=device)
        kv = cache.kv
        self.cache = PromptCache(
            kv=kv.new_zeros(*kv.shape[:4], shape.cached + shape.step_width, kv.shape[5]),
            segments=torch.full((b, shape.cached), PAD, dtype=cache.segments.dtype, device=device),
            lengths=cache.lengths.clone(),
            last_hidden=cache.last_hidden.clone(),
        )
        self.rows = torch.arange(b * shape.window_width, device=device)
        self.batch_index = torch.arange(b, device=device).repeat_interleave(shape.window_width)  # [B * N]

    def _step_columns(self, window: int) -> torch.Tensor:
        r = self.runner
        if r._windowed_cache:
            return r._step_columns(self.phase, window)
        # Every column of the phase's groups, finished or not: a static shape (under
        # ``isolated`` a finished block changes no other block's logits).
        return torch.cat([torch.arange(*r.layout.blocks[g], device=r.device) for g in self.phase])

    def _window_columns(self, window: int) -> torch.Tensor:
        r = self.runner
        ranges = [r.windows[g][window] for g in self.phase if window < len(r.windows[g])]
        return torch.cat([torch.arange(*w, device=r.device) for w in ranges])

    def _load_window(self, cache: PromptCache) -> None:
        """Refills the static buffers for the runner's current window and copies ``cache``."""
        r = self.runner
        k = r.window_index
        _fill(self.step_cols, self.step_valid, self._step_columns(k))
        _fill(self.window_cols, self.window_valid, self._window_columns(k))
        group = r.groups[self.window_cols]
        offset = self.window_cols - r.body_starts[group]
        self.barred.copy_(r._barred(group, offset).expand_as(self.barred))
        self.quotas.zero_()
        self.schedule_len.zero_()
        for g in self.phase:
            if k < len(r.schedules[g]):
                schedule = r.schedules[g][k]
                self.quotas[g, : len(schedule)] = torch.tensor(schedule, device=r.device)
                self.schedule_len[g] = len(schedule)
        n = cache.num_tokens
        self.cache.kv[..., :n, :].copy_(cache.kv[..., :n, :])
        self.cache.segments[:, :n].copy_(cache.segments)
        self.cache.segments[:, n:].fill_(PAD)
        self.cache.lengths.copy_(cache.lengths)
        self.cache.last_hidden.copy_(cache.last_hidden)

    def _capture(self) -> None:
        """Captures one step. The warm-up runs really commit, so the state is put back."""
        r = self.runner
        saved = [t.clone() for t in (r.canvas, r.trace, self.window_steps, self.step_t)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step()
        for tensor, value in zip((r.canvas, r.trace, self.window_steps, self.step_t), saved):
            tensor.copy_(value)
        self.graph = graph

    # --- device side: what one replay does ----------------------------------------------------
    def forward(self) -> torch.Tensor:
        """The model forward of a step alone (what ``benchmarks/latency.py`` compares a whole
        step against): logits [B, N, V] of the window's columns."""
        r = self.runner
        cols, valid = self.step_cols, self.step_valid
        ids = torch.where(valid, r.canvas[:, cols], 0)  # [B, S]
        positions = torch.where(valid, r.positions[:, cols], -1)
        segments = torch.where(valid, r.segments[:, cols], PAD)
        logits_at = torch.where(self.window_valid, r.positions[:, self.window_cols], -1)  # [B, N]
        return r.model(ids, positions, segments, r.config.attention, cache=self.cache, logits_at=logits_at,
                       check_inputs=False)

    def _step(self) -> None:
        r, cfg, spec = self.runner, self.runner.config, self.runner.model.spec
        b, g_count = r.canvas.shape[0], r.layout.num_groups
        wcols, wvalid = self.window_cols, self.window_valid
        logits_at = torch.where(wvalid, r.positions[:, wcols], -1)  # [B, N]
        logits = self.forward()  # [B, N, V]
        vocab = logits.shape[-1]
        scores = ops.score(logits.view(-1, vocab), self.rows, spec.mask_id, r.stop_ids, self.barred.view(-1))
        masked = ((r.canvas[:, wcols] == spec.mask_id) & wvalid)  # [B, N]
        group = r.groups[wcols].expand(b, -1)  # [B, N]
        left = torch.zeros(b, g_count, dtype=torch.long, device=r.device).scatter_add_(1, group, masked.long())
        done = self.window_steps
        length = self.schedule_len[None].expand(b, -1)  # [B, G]
        scheduled = self.quotas[torch.arange(g_count, device=r.device)[None], done.clamp(max=self.shape.schedule_len - 1)]
        quota = torch.where(done < length, torch.minimum(scheduled, left), left)
        if cfg.steps is not None:
            remaining = (length - done).clamp(min=1)
            floor = torch.where(done < length, (left + remaining - 1) // remaining, left)
        else:
            floor = torch.ones_like(left)
        floor = torch.where(left > 0, floor.clamp(min=1), 0)
        flat_masked = masked.reshape(-1)
        key = (torch.arange(b, device=r.device)[:, None] * g_count + group).reshape(-1)
        candidates = Candidates(
            key=key,
            position=logits_at.reshape(-1),
            scores=scores,
            quota=quota.gather(1, group).reshape(-1),
            floor=floor.gather(1, group).reshape(-1),
        )
        rule, ranking, param = r._plan(candidates)
        lowest = torch.finfo(torch.float32).min
        ranking = torch.where(flat_masked, ranking.float().nan_to_num(nan=lowest, neginf=lowest), -torch.inf)
        confidence = torch.where(flat_masked, scores.confidence, -torch.inf)
        column = wcols.repeat(b)
        ops.select_commit(r.canvas, r.trace, self.batch_index, column, key, ranking, confidence,
                          candidates.quota, candidates.floor, scores.tokens, rule, param, _PENDING)
        r.trace.copy_(torch.where(r.trace == _PENDING, self.step_t, r.trace))
        if cfg.eos_closes_block:
            r._fill_after_eos(self.step_t)
        active = left > 0
        self.window_steps += active.long()
        self.step_t += active.any().long()


def _fill(columns: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> None:
    columns.zero_()
    valid.zero_()
    columns[: len(values)] = values
    valid[: len(values)] = True
