"""Decoding steps replayed as CUDA graphs.

A step launches hundreds of small kernels; on these GPUs a launch costs ~18 µs from the host, so
an eager 32-token step of an 8B model spends as long launching as computing (DESIGN.md's
numbers). A graph replays a whole step — the forward, scoring, selection, the in-place commit
into canvas and trace, EOS filling and the step counters — with one launch and no host
synchronisation; the host checks for completion every few steps.

Everything a step reads lives in static buffers that the host refills when a window starts:
the forwarded columns, the window's candidate columns, the window's quota table and the cache.
Two graphs per phase (think blocks, summary, answer region), both reused across windows and
requests: the *step* (the window's columns over the cache) and, with a windowed cache, the
*refresh* (a window's first step: everything the phase forwards, whose KV it writes into the
step's cache, a slot per column; a step rewrites its own columns' slots). Shapes are those of the
phase's largest window: a narrower window repeats its last column (which rewrites its own slot
with the same KV); unwindowed phases pad with queries of segment PAD, which nothing attends to. A
window where every query sees every key (one request with nothing padded, under ``canvas``
attention or in one segment) attends with no mask, which the fastest attention kernels take; it
gets its own graphs.

Windowed isolated think blocks step *side by side*: under ``isolated`` attention block j's
queries see the prompt and block j only, so the step keeps a ``BlockCache`` (one row per block:
the prompt's KV, then the block's) and one batched attention call serves every block without a
mask over the other blocks' keys (three quarters of the keys at m = 4; measured in
benchmarks/RESULTS.md). The price is m copies of the prompt KV in the step's cache.
The steps are the runner's eager steps on a static shape; ``tests/test_cuda.py`` compares the two.
"""

from __future__ import annotations

import torch

from paradec import ops
from paradec.decoding.selection import Candidates
from paradec.models.attention import PAD, PROMPT, attention_mask
from paradec.models.cache import BlockCache, PromptCache, copy_cache, empty_cache
from paradec.ops.selection import FACTOR

_PENDING = -7  # trace value select_commit writes inside a graph; replaced by the step counter
KEY_ALIGN = 8  # a BlockCache's rows are padded to a multiple of this many keys (16 bytes of bf16)
# Blocks step side by side while the keys they read, m * prompt + blocks, stay within this many
# times the masked step's prompt + blocks (and so does the step cache's memory). Measured on an
# H100 at LLaDA-8B shapes, 1024-token canvas, 32-token windows (step ms, side by side / masked):
# m = 4: 8.15 / 9.15 (prompt 512, ratio 2.1), 9.21 / 10.29 (2048, 3.1); m = 8: 9.96 / 10.39 (512,
# 3.5), 10.68 / 10.79 (1024, 4.6), 12.10 / 11.58 (2048, 5.8).
SIDE_BY_SIDE_MAX_KEYS = 4


def graphs_apply(cfg, device: torch.device) -> bool:
    """Whether steps under config ``cfg`` on ``device`` can be replayed as graphs (static
    shapes, no host draws)."""
    return (
        device.type == "cuda"
        and ops.native_on(device)  # the torch twins read results on the host
        and cfg.cuda_graphs
        and cfg.temperature == 0
        and cfg.mode != "random"
        and (cfg.cache_mode in ("prefix", "dual") or cfg.attention == "isolated")
    )


def _aligned(n: int) -> int:
    return -(-n // KEY_ALIGN) * KEY_ALIGN


class GraphedSteps:
    """The graphs of one phase of one runner and their static buffers. The runner keeps one per
    phase and reuses it across its windows and its ``reset``s.

    phase_cache: the cache the phase starts from — the prompt KV (plus the think blocks' for the
    summary) under ``isolated``, None under ``canvas`` (the prompt is forwarded)."""

    def __init__(self, runner, phase: list[int], phase_cache: PromptCache | None, pool):
        self.runner, self.phase, self.pool = runner, phase, pool
        self.windowed = runner._windowed_cache
        self.per_block = self.windowed and _blocks_apart(runner, phase, phase_cache)
        self.step_graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # by whether attention runs unmasked
        self.refresh_graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.step_dense = self.refresh_dense = False
        self._build(phase_cache)

    # --- host side ---------------------------------------------------------------------------
    def load(self, phase_cache: PromptCache | None, with_phase_cache: bool) -> None:
        """Refills the static buffers for the runner's current window; with
        ``with_phase_cache`` (a phase's first window) also copies the phase's cache, which no
        replay overwrites (the slots before the phase's own columns)."""
        r = self.runner
        k = r.window_index
        if self.per_block:
            step_cols = self._block_columns(k)
            self.step_cols.copy_(step_cols)
            self.step_valid.fill_(True)
            self.block_slots.copy_(self._slots(step_cols.view(len(self.phase), -1)))
        elif self.windowed:  # padded by repeating the last column: it rewrites its own slot with the same k/v
            step_cols = self._step_columns(k)
            self.step_cols.copy_(torch.cat((step_cols, step_cols[-1:].expand(len(self.step_cols) - len(step_cols)))))
            self.step_valid.fill_(True)
            self.step_slots.copy_(self.slot_of[self.step_cols + self.canvas_offset])
        else:
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
        base = 0 if phase_cache is None else phase_cache.num_tokens
        if self.per_block:
            if with_phase_cache:
                copy_cache(self.phase_cache, phase_cache, base)
                self._load_block_prompts(phase_cache)
            return
        if with_phase_cache and phase_cache is not None:
            copy_cache(self.cache, phase_cache, base)
        elif with_phase_cache:
            self.cache.lengths.copy_(r.prompt_lens)
        if self.windowed:
            segments = self._sequence()[2]
            self.cache.segments[:, base : self.extra_start].copy_(segments[:, self.refresh_cols])
            forwarded = torch.isin(self.extra_cols, self.step_cols + self.canvas_offset)
            self.cache.segments[:, self.extra_start :].copy_(torch.where(forwarded, segments[:, self.extra_cols], PAD))
        self._choose_attention()

    def _choose_attention(self) -> None:
        """Whether this window's step and refresh attend with no mask: where every query sees
        every key (one request, no padding, ``canvas`` attention or one segment) the fastest
        attention kernels apply. A graph is captured per choice. One host sync per window."""
        mode = self.runner.config.attention
        step_segments = torch.where(self.step_valid, self.runner.segments[:, self.step_cols], PAD)
        if not self.windowed:
            self.step_dense = bool(attention_mask(step_segments, torch.cat((self.cache.segments, step_segments), 1),
                                                  mode).all())
            return
        keys, refresh_keys = self.cache.segments, self._refresh_keys()
        refresh_segments = keys[:, self.refresh_slots]
        dense = torch.stack((attention_mask(step_segments, keys, mode).all(),
                             attention_mask(refresh_segments, refresh_keys, mode).all()))
        self.step_dense, self.refresh_dense = dense.tolist()

    def _refresh_keys(self) -> torch.Tensor:
        """[B, C] segments of the keys a refresh sees: the step cache's, less the slots of step
        columns outside the phase (which the refresh does not forward)."""
        keys = self.cache.segments
        if len(self.extra_cols) == 0:
            return keys
        return torch.cat((keys[:, : self.extra_start], torch.full_like(keys[:, self.extra_start :], PAD)), 1)

    @property
    def step_graph(self) -> torch.cuda.CUDAGraph | None:
        """The step graph the current window replays (None before its first replay)."""
        return self.step_graphs.get(self.step_dense)

    @property
    def refresh_graph(self) -> torch.cuda.CUDAGraph | None:
        return self.refresh_graphs.get(self.refresh_dense)

    def refresh(self, step: int) -> int:
        """The window's first step (or a periodic refresh): one replay; returns the next step."""
        if self.refresh_graph is None:
            self.refresh_graphs[self.refresh_dense] = self._capture(self._refresh_step)
        return self._replay(self.refresh_graph, 1, step)

    def replay(self, count: int, step: int) -> int:
        """Replays ``count`` steps of the current window from global step ``step``; returns the
        step after them."""
        if self.step_graph is None:
            self.step_graphs[self.step_dense] = self._capture(self._step)
        return self._replay(self.step_graph, count, step)

    def release(self) -> None:
        """Drops the graphs (their private memory) and the static caches."""
        for graph in (*self.step_graphs.values(), *self.refresh_graphs.values()):
            graph.reset()
        self.step_graphs, self.refresh_graphs = {}, {}
        self.cache = self.phase_cache = self.blocks = None

    def _replay(self, graph, count: int, step: int) -> int:
        r = self.runner
        self.step_t.fill_(step)
        self.window_steps.copy_(r.window_steps)
        before = r.window_steps.clone()
        for _ in range(count):
            graph.replay()
        r.window_steps.copy_(self.window_steps.cpu())
        r.group_steps += r.window_steps - before
        return int(self.step_t)

    def _capture(self, body):
        """Captures ``body``. The warm-up runs really commit, so the state is put back."""
        r = self.runner
        state = (r.canvas, r.trace, self.window_steps, self.step_t)
        saved = [t.clone() for t in state]
        # Warm-up on the current stream: memory a side stream allocates here stays allocated
        # after the graph is gone (measured on torch 2.11: hundreds of MiB per capture).
        for _ in range(2):
            body()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        return graph

    # --- static buffers ----------------------------------------------------------------------
    def _build(self, phase_cache: PromptCache | None) -> None:
        r, phase = self.runner, self.phase
        device, b = r.device, r.canvas.shape[0]
        windows = max(len(r.windows[g]) for g in phase)
        step_columns = [self._step_columns(k) for k in range(windows)]
        step_width = max(len(c) for c in step_columns)
        window_width = max(len(self._window_columns(k)) for k in range(windows))
        base = 0 if phase_cache is None else phase_cache.num_tokens
        kv_like = r.model.module.embed.weight
        cfg = r.model.module.cfg
        if self.windowed:
            # The refresh forwards the phase's columns in the coordinates of ``_sequence``: the
            # prompt then the canvas under ``canvas`` attention, the phase's blocks under
            # ``isolated`` (the prompt is in the phase cache).
            if r.config.attention == "canvas":
                self.canvas_offset = r.prompt_ids.shape[1]
                columns = torch.arange(self.canvas_offset + r.canvas.shape[1], device=device)
            else:
                self.canvas_offset = 0
                columns = torch.cat([torch.arange(*r.layout.blocks[g], device=device) for g in phase])
            self.refresh_cols = columns  # [W]
            if self.per_block:
                self.phase_cache = empty_cache(kv_like, cfg, b, base, len(columns), phase_cache.segments.dtype)
                self._build_blocks(kv_like, cfg, b, base, windows)
                step_width = len(phase) * self.block_width
            else:
                # The step's cache: the phase cache, then every refresh column's KV in a slot of its
                # own; the refresh writes them all, a step rewrites its columns' slots, and every
                # slot is a key (Fast-dLLM's dual cache, replaced in place). Last, a slot for each
                # step column outside the phase (a shifted model's predecessor of a headerless
                # group's first window): a key while a step forwards it, as in the eager step.
                in_phase = torch.zeros(self.canvas_offset + r.canvas.shape[1], dtype=torch.bool, device=device)
                in_phase[columns] = True
                outside = torch.cat(step_columns) + self.canvas_offset
                self.extra_cols = outside[~in_phase[outside]].unique()  # [E]
                self.extra_start = base + len(columns)
                self.refresh_slots = base + torch.arange(len(columns), device=device)
                self.slot_of = torch.full(in_phase.shape, -1, dtype=torch.long, device=device)
                self.slot_of[columns] = self.refresh_slots
                self.slot_of[self.extra_cols] = self.extra_start + torch.arange(len(self.extra_cols), device=device)
                self.step_slots = torch.zeros(step_width, dtype=torch.long, device=device)
                self.cache = empty_cache(kv_like, cfg, b, self.extra_start + len(self.extra_cols), 0, torch.long)
        else:
            self.cache = empty_cache(kv_like, cfg, b, base, step_width, torch.long)
        self.step_cols = torch.zeros(step_width, dtype=torch.long, device=device)
        self.step_valid = torch.zeros(step_width, dtype=torch.bool, device=device)
        self.window_cols = torch.zeros(window_width, dtype=torch.long, device=device)
        self.window_valid = torch.zeros(window_width, dtype=torch.bool, device=device)
        self.barred = torch.zeros(b, window_width, dtype=torch.bool, device=device)
        g = r.layout.num_groups
        self.schedule_max = max(len(s) for gr in phase for s in r.schedules[gr])
        self.quotas = torch.zeros(g, self.schedule_max, dtype=torch.long, device=device)
        self.schedule_len = torch.zeros(g, dtype=torch.long, device=device)
        self.window_steps = torch.zeros(b, g, dtype=torch.long, device=device)
        self.step_t = torch.zeros((), dtype=torch.long, device=device)
        self.rows = torch.arange(b * window_width, device=device)
        self.batch_index = torch.arange(b, device=device).repeat_interleave(window_width)  # [B * N]
        self.batch = torch.arange(b, device=device)

    def _step_columns(self, window: int) -> torch.Tensor:
        r = self.runner
        if self.windowed:
            return r._step_columns(self.phase, window)
        # Every column of the phase's groups, finished or not: a static shape (under
        # ``isolated`` a finished block changes no other block's logits).
        return torch.cat([torch.arange(*r.layout.blocks[g], device=r.device) for g in self.phase])

    def _window_columns(self, window: int) -> torch.Tensor:
        r = self.runner
        ranges = [r.windows[g][window] for g in self.phase if window < len(r.windows[g])]
        return torch.cat([torch.arange(*w, device=r.device) for w in ranges])

    # --- blocks side by side (isolated think blocks, see BlockCache) ----------------------------
    def _build_blocks(self, kv_like, cfg, b: int, base: int, windows: int) -> None:
        """The per-block cache, the refresh's scatter into it, and the step's query width."""
        r, phase, device = self.runner, self.phase, self.runner.device
        m = len(phase)
        lengths = [r.layout.blocks[g][1] - r.layout.blocks[g][0] for g in phase]
        self.block_width = max(len(r._step_columns([g], k)) for g in phase for k in range(windows))
        exact = b == 1 and len(set(lengths)) == 1  # every slot a key: no mask at all
        slots = base + max(lengths) if exact else _aligned(base + max(lengths))
        kv = kv_like.new_zeros(cfg.num_layers, 2, b * m, slots, cfg.num_kv_heads, cfg.head_dim)
        self.blocks = BlockCache(kv=kv, bias=None if exact else kv_like.new_zeros(b * m, 1, 1, slots))
        self.block_slots = torch.zeros(b * m * self.block_width, dtype=torch.long, device=device)
        # The refresh forwards every column of the phase: each one's k/v goes to its block's row.
        self.refresh_dst = self._slots(self.refresh_cols.view(1, -1))  # [B * W]

    def _slots(self, columns: torch.Tensor) -> torch.Tensor:
        """Flat BlockCache slots (row * C + slot) of canvas ``columns`` ([K, S], any blocks) for
        every request: [B * K * S], request-major."""
        r, phase = self.runner, self.phase
        b, m, slots = r.canvas.shape[0], len(phase), self.blocks.kv.shape[3]
        index = {g: j for j, g in enumerate(phase)}
        block = torch.tensor([index[int(g)] for g in r.groups[columns.reshape(-1)].tolist()], device=r.device)
        block = block.view(columns.shape)
        start = torch.tensor([r.layout.blocks[g][0] for g in phase], device=r.device)[block]
        local = self.phase_cache.num_tokens + columns - start  # [m or 1, S]
        rows = torch.arange(b, device=r.device).view(b, 1, 1) * m + block[None]  # [B, m or 1, S]
        return (rows * slots + local[None]).reshape(-1)

    def _block_columns(self, window: int) -> torch.Tensor:
        """[m * S] each block's step columns, block-major, each block padded to S by repeating
        its last column (the repeat computes and writes the same k/v as the original)."""
        r, width = self.runner, self.block_width
        out = []
        for g in self.phase:
            cols = r._step_columns([g], window).tolist()
            out.extend(cols + cols[-1:] * (width - len(cols)))
        return torch.tensor(out, dtype=torch.long, device=r.device)

    def _load_block_prompts(self, phase_cache: PromptCache) -> None:
        """Each block's row starts with its request's prompt KV; the bias masks what holds no key."""
        r, m = self.runner, len(self.phase)
        p = phase_cache.num_tokens
        kv = self.blocks.kv  # [L, 2, B * m, C, Hkv, D]
        layers, _, rows, slots, hkv, d = kv.shape
        prompt = phase_cache.kv[..., :p, :].transpose(3, 4)  # [L, 2, B, P, Hkv, D]
        kv.view(layers, 2, rows // m, m, slots, hkv, d)[:, :, :, :, :p].copy_(prompt[:, :, :, None])
        if self.blocks.bias is not None:
            lengths = torch.tensor([r.layout.blocks[g][1] - r.layout.blocks[g][0] for g in self.phase],
                                   device=r.device)
            slot = torch.arange(slots, device=r.device)
            prompt_key = phase_cache.segments != PAD  # [B, P]
            block_key = (slot[None] >= p) & (slot[None] < p + lengths[:, None])  # [m, C]
            key = block_key[None].repeat(rows // m, 1, 1)  # [B, m, C]
            key[:, :, :p] = prompt_key[:, None]
            bias = torch.zeros(key.shape, dtype=kv.dtype, device=r.device).masked_fill_(~key, float("-inf"))
            self.blocks.bias.copy_(bias.view(rows, 1, 1, slots))

    # --- device side: what a replay does ------------------------------------------------------
    def forward(self) -> torch.Tensor:
        """The model forward of a step alone (what ``benchmarks/latency.py`` compares a whole
        step against): logits [B, N, V] of the window's columns."""
        r = self.runner
        cols, valid = self.step_cols, self.step_valid
        ids = torch.where(valid, r.canvas[:, cols], 0)  # [B, S]
        positions = torch.where(valid, r.positions[:, cols], -1)
        segments = torch.where(valid, r.segments[:, cols], PAD)
        if self.per_block:
            return r.model.module.forward_blocks(ids, positions, segments, self.blocks, self.block_slots,
                                                 self._logits_at())
        return r.model(ids, positions, segments, r.config.attention, cache=self.cache, logits_at=self._logits_at(),
                       check_inputs=False, dense=self.step_dense, slots=self.step_slots if self.windowed else None)

    def _logits_at(self) -> torch.Tensor:
        r = self.runner
        return torch.where(self.window_valid, r.positions[:, self.window_cols], -1)  # [B, N]

    def _sequence(self):
        """What refresh columns index: [B, L] ids, positions, segments."""
        r = self.runner
        if self.canvas_offset == 0:
            return r.canvas, r.positions, r.segments
        prompt_pos = torch.arange(self.canvas_offset, device=r.device).expand_as(r.prompt_ids)
        prompt_real = prompt_pos < r.prompt_lens[:, None]
        ids = torch.cat((r.prompt_ids, r.canvas), 1)
        positions = torch.cat((torch.where(prompt_real, prompt_pos, -1), r.positions), 1)
        segments = torch.cat((torch.where(prompt_real, PROMPT, PAD), r.segments), 1)
        return ids, positions, segments

    def _refresh_step(self) -> None:
        """A window's first step: forward every column of the phase, writing their KV into the
        step's cache (the blocks' rows, side by side), and commit from its logits."""
        r, module = self.runner, self.runner.model.module
        ids, positions, segments = (x[:, self.refresh_cols] for x in self._sequence())  # [B, W]
        x = module.embed(ids.clamp(min=0))
        if self.per_block:
            keys = torch.cat((self.phase_cache.segments, segments), 1)
            mask = attention_mask(segments, keys, r.config.attention)
            hidden, kv = module.run_layers(x, positions, mask, self.phase_cache)
            for i, layer_kv in enumerate(kv):
                for buffer, new in zip(self.blocks.kv[i], layer_kv):  # [B, Hkv, W, D] -> each column's slot
                    hkv, d = new.shape[1], new.shape[3]
                    buffer.view(-1, hkv, d).index_copy_(0, self.refresh_dst, new.transpose(1, 2).reshape(-1, hkv, d))
            cache = self.phase_cache
        else:
            mask = None if self.refresh_dense else attention_mask(segments, self._refresh_keys(), r.config.attention)
            hidden, _ = module.run_layers(x, positions, mask, self.cache, self.refresh_slots)
            if self.canvas_offset:  # the prompt was forwarded: its last hidden state as of now
                self.cache.last_hidden.copy_(hidden[self.batch, r.prompt_lens - 1])
            cache = self.cache
        logits_at = self._logits_at()
        logits = module.head(module.gather_rows(hidden, positions, segments, logits_at, cache, False))
        self._commit(logits, logits_at)

    def _step(self) -> None:
        self._commit(self.forward(), self._logits_at())

    def _commit(self, logits: torch.Tensor, logits_at: torch.Tensor) -> None:
        """Scoring, selection and the in-place commit of one step. logits: [B, N, V]."""
        r, cfg, spec = self.runner, self.runner.config, self.runner.model.spec
        b, g_count = r.canvas.shape[0], r.layout.num_groups
        wcols = self.window_cols
        vocab = logits.shape[-1]
        scores = ops.score(logits.reshape(-1, vocab), self.rows, spec.mask_id, r.stop_ids, self.barred.view(-1))
        if r.fastdllm is not None:  # Fast-dLLM's confidence, as the eager step computes it
            scores.confidence = r._vocab_confidence(logits.reshape(-1, vocab), self.rows, scores)
        masked = (r.canvas[:, wcols] == spec.mask_id) & self.window_valid  # [B, N]
        group = r.groups[wcols].expand(b, -1)  # [B, N]
        left = torch.zeros(b, g_count, dtype=torch.long, device=r.device).scatter_add_(1, group, masked.long())
        done = self.window_steps
        length = self.schedule_len[None].expand(b, -1)  # [B, G]
        scheduled = self.quotas[torch.arange(g_count, device=r.device)[None], done.clamp(max=self.schedule_max - 1)]
        quota = torch.where(done < length, torch.minimum(scheduled, left), left)
        if cfg.steps is not None:
            remaining = (length - done).clamp(min=1)
            floor = torch.where(done < length, (left + remaining - 1) // remaining, left)
        else:
            floor = torch.ones_like(left)
        floor = torch.where(left > 0, floor.clamp(min=1), 0)
        flat_masked = masked.reshape(-1)
        key = (torch.arange(b, device=r.device)[:, None] * g_count + group).reshape(-1)
        candidates = Candidates(key=key, position=logits_at.reshape(-1), scores=scores,
                                quota=quota.gather(1, group).reshape(-1), floor=floor.gather(1, group).reshape(-1))
        rule, ranking, param = r._plan(candidates)
        lowest = torch.finfo(torch.float32).min
        ranking = torch.where(flat_masked, ranking.float().nan_to_num(nan=lowest, neginf=lowest), -torch.inf)
        confidence = torch.where(flat_masked, scores.confidence, -torch.inf)
        floor = candidates.floor
        if r.fastdllm is not None and rule == FACTOR:  # Fast-dLLM's factor rule, as the eager step applies it
            floor = r._factor_last_commits(candidates, ranking, flat_masked, param)
        ops.select_commit(r.canvas, r.trace, self.batch_index, wcols.repeat(b), key, ranking, confidence,
                          candidates.quota, floor, scores.tokens, rule, param, _PENDING)
        r.trace.copy_(torch.where(r.trace == _PENDING, self.step_t, r.trace))
        if cfg.eos_closes_block:
            r._fill_after_eos(self.step_t)
        active = left > 0
        self.window_steps += active.long()
        self.step_t += active.any().long()


def _blocks_apart(runner, phase: list[int], phase_cache: PromptCache | None) -> bool:
    """Whether a windowed phase's steps attend block by block (``BlockCache``): isolated think
    blocks (no summary in the phase, which attends to all of them) over a cached prompt, all with
    the same number of windows, and a prompt short enough that m copies of its keys stay cheap
    (see ``SIDE_BY_SIDE_MAX_KEYS``). A shifted model also needs a header on every block: a
    block's first token is predicted from the column before it, which must be in the block (with
    no header it is the prompt's last token, whose state only the prompt cache holds)."""
    layout = runner.layout
    headed = all(layout.bodies[g][0] > layout.blocks[g][0] for g in phase)
    if not (
        runner.config.attention == "isolated"
        and phase_cache is not None
        and layout.num_think_blocks > 0
        and layout.summary_group not in phase
        and len({len(runner.windows[g]) for g in phase}) == 1
        and (headed or not runner.model.module.shift_logits)
    ):
        return False
    prompt, blocks = phase_cache.num_tokens, sum(end - start for start, end in (layout.blocks[g] for g in phase))
    return len(phase) * prompt + blocks <= SIDE_BY_SIDE_MAX_KEYS * (prompt + blocks)


def _fill(columns: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> None:
    columns.zero_()
    valid.zero_()
    columns[: len(values)] = values
    valid[: len(values)] = True
