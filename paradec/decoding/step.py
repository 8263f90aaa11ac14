"""One decoding step: inputs -> forward -> scoring -> policy -> selection and in-place commit ->
EOS fill -> counters, on static shapes. The same body runs everywhere: called directly on a CPU
(or with ``cuda_graphs=False``), replayed as a CUDA graph on a GPU. "Graphs on or off" means
replay or call, never different code.

A step launches hundreds of small kernels; on these GPUs a launch costs ~18 µs from the host, so
an eager 32-token step of an 8B model spends as long launching as computing (DESIGN.md's
numbers). A replay runs the whole step with one launch and no host synchronisation; the host
checks for completion every few steps (a top-k schedule says exactly how many are left).

Everything a step reads lives in static buffers that the host refills when a window starts
(``load``): the forwarded columns, the columns it may commit in, the window's quota table and the
cache. Two bodies per phase (think blocks, summary, answer region), both reused across windows
and requests: the *step* and, with a windowed cache, the *refresh* (a window's first step:
everything the phase forwards, whose KV it writes into the step's cache, a slot per column; a
step rewrites its own columns' slots); when the config refreshes partially
(``GenerationConfig.refreshes_partially``: nap windows' default) a third, the *partial refresh*
of a window after the phase's first (``Plan.partial_refresh_columns`` only, into their slots).
Shapes are those of the phase's largest window: a
narrower window repeats its last column (which rewrites its own slot with the same KV). An
unwindowed step forwards every column of the phase (a finished block changes no other block's
logits under ``isolated``); under ``canvas`` attention with no cache it forwards the prompt and
the whole canvas. A window where every query sees every key (one request with nothing padded,
under ``canvas`` attention or in one segment) attends with no mask, which the fastest attention
kernels take; it gets its own graphs.

Sampled steps draw their numbers on the device (``paradec.decoding.sampler``), keyed by (seed,
group, the group's step, position), so they are captured like greedy ones.

Windowed isolated think blocks step *side by side*: under ``isolated`` attention block j's
queries see the prompt and block j only, so the step keeps a ``BlockCache`` (one row per block:
the prompt's KV, then the block's) and one batched attention call serves every block without a
mask over the other blocks' keys (three quarters of the keys at m = 4; measured in
benchmarks/RESULTS.md), and the window's refresh runs the same way, each block's columns over
its own row. The price is m copies of the prompt KV in the step's cache. A block's row never
sees another block's keys, so a block decodes alone as it does beside the others (bit for bit
where the kernels are batch-invariant: ``paradec.ops.batch_invariant``).
"""

from __future__ import annotations

import torch

from paradec import ops
from paradec.config import GenerationConfig
from paradec.decoding import delayed, sampler
from paradec.decoding.fastdllm_rules import FastDLLMRules, factor_last_commits, vocab_confidence
from paradec.decoding.plan import Plan
from paradec.decoding.policies import Candidates, Policy
from paradec.decoding.state import DecodeState
from paradec.models.attention import PAD, PROMPT, attention_mask
from paradec.models.cache import BlockCache, PromptCache, copy_cache, empty_cache
from paradec.models.loading import DiffusionModel
from paradec.ops.scoring import Sampling
from paradec.ops.selection import FACTOR, TOPK

PENDING = -7  # trace value select_commit writes; replaced by the step counter (a device value)
KEY_ALIGN = 8  # a BlockCache's rows are padded to a multiple of this many keys (16 bytes of bf16)
# Blocks step side by side while the keys they read, m * prompt + blocks, stay within this many
# times the masked step's prompt + blocks (and so does the step cache's memory). Measured on an
# H100 at LLaDA-8B shapes, 1024-token canvas, 32-token windows (step ms, side by side / masked):
# m = 4: 8.15 / 9.15 (prompt 512, ratio 2.1), 9.21 / 10.29 (2048, 3.1); m = 8: 9.96 / 10.39 (512,
# 3.5), 10.68 / 10.79 (1024, 4.6), 12.10 / 11.58 (2048, 5.8).
SIDE_BY_SIDE_MAX_KEYS = 4


def captures(config: GenerationConfig, device: torch.device) -> bool:
    """Whether steps on ``device`` replay as CUDA graphs (else the same body is called): a CUDA
    device whose kernels are the native ones (the torch twins read results on the host) and
    ``cuda_graphs`` on."""
    return device.type == "cuda" and ops.native_on(device) and config.cuda_graphs


class _Columns:
    """Static buffers of the columns a step may commit in: cols, valid [N] (padding after the
    real ones), current [N] (in the groups' current windows: what the quotas count), barred
    [B, N] (EOS may not be chosen), group, offset [N] (body offset, the sampler's key); rows and
    batch_index [B * N] index the step's flat logits and their requests."""

    def __init__(self, batch: int, width: int, device: torch.device):
        self.cols = torch.zeros(width, dtype=torch.long, device=device)
        self.valid = torch.zeros(width, dtype=torch.bool, device=device)
        self.current = torch.zeros(width, dtype=torch.bool, device=device)
        self.barred = torch.zeros(batch, width, dtype=torch.bool, device=device)
        self.group = torch.zeros(width, dtype=torch.long, device=device)
        self.offset = torch.zeros(width, dtype=torch.long, device=device)
        self.rows = torch.arange(batch * width, device=device)  # [B * N] rows of a step's flat logits
        self.batch_index = torch.arange(batch, device=device).repeat_interleave(width)  # [B * N]

    def load(self, plan: Plan, state: DecodeState, columns: list[int], current: list[int]) -> None:
        device = self.cols.device
        _fill(self.cols, self.valid, torch.tensor(columns, dtype=torch.long, device=device))
        self.current.copy_(torch.isin(self.cols, torch.tensor(current, dtype=torch.long, device=device)) & self.valid)
        barred = plan.barred(columns) + [False] * (len(self.cols) - len(columns))
        self.barred.copy_(torch.tensor(barred, device=device).expand_as(self.barred))
        self.group.copy_(state.groups[self.cols])
        self.offset.copy_(self.cols - state.body_starts[self.group])


class PhaseSteps:
    """The step bodies of one phase of one runner, their static buffers and (when capturing)
    their graphs. The runner keeps one per phase and reuses it across its windows and resets.

    phase_cache: the cache the phase starts from — the prompt KV (plus the think blocks' for the
    summary) under ``isolated``, None under ``canvas`` (the prompt is forwarded)."""

    def __init__(self, model: DiffusionModel, config: GenerationConfig, plan: Plan, state: DecodeState,
                 phase: list[int], phase_cache: PromptCache | None, policy: Policy, sampling: Sampling,
                 fastdllm: FastDLLMRules | None, capture: bool, pool=None):
        self.model, self.config, self.plan, self.state, self.phase = model, config, plan, state, phase
        self.policy, self.sampling, self.fastdllm, self.capture, self.pool = policy, sampling, fastdllm, capture, pool
        self.param = float(getattr(config, policy.parameter)) if policy.parameter else 0.0
        self.windowed = plan.windowed_cache
        self.per_block = self.windowed and _blocks_apart(plan, phase, phase_cache, model.module.shift_logits)
        # a refresh after the phase's first window forwards Plan.partial_refresh_columns only (with
        # Fast-dLLM's rules only when asked for by name)
        self.partial = (self.windowed and config.refreshes_partially
                        and (fastdllm is None or config.partial_refresh is True) and plan.num_windows(phase) > 1)
        # delayed KV (``paradec.decoding.delayed``): a step after the refresh forwards what can change
        self.delayed = self.windowed and config.delayed_kv
        self.step_graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # by whether attention runs unmasked
        self.delayed_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # by the step's width
        self.refresh_graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.partial_graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.step_dense = self.refresh_dense = self.partial_dense = False
        self.window = 0
        self._build(phase_cache)

    # --- host side ---------------------------------------------------------------------------
    def load(self, window: int, phase_cache: PromptCache | None, with_phase_cache: bool) -> None:
        """Refills the static buffers for window ``window``; with ``with_phase_cache`` (a phase's
        first window) also copies the phase's cache, which no step overwrites (the slots before
        the phase's own columns)."""
        plan, state, phase = self.plan, self.state, self.phase
        self.window = window
        if self.delayed:
            self._load_delayed(window)
        if self.per_block:
            step_cols = self._block_columns(plan.step_columns, window, self.block_width)
            self.step_cols.copy_(step_cols)
            self.block_slots.copy_(self._slots(step_cols.view(len(phase), -1)))
            if self.partial and window > 0:
                partial_cols = self._block_columns(plan.partial_refresh_columns, window, self.partial_width)
                self.partial_cols.copy_(partial_cols)
                self.partial_slots.copy_(self._slots(partial_cols.view(len(phase), -1)))
        elif self.windowed:  # padded by repeating the last column: it rewrites its own slot with the same k/v
            self.step_cols.copy_(_padded(plan.step_columns(phase, window), len(self.step_cols), state.device))
            self.step_slots.copy_(self.slot_of[self.step_cols + self.canvas_offset])
            if self.partial and window > 0:
                columns = plan.partial_refresh_columns(phase, window)
                self.partial_cols.copy_(_padded(columns, len(self.partial_cols), state.device))
                self.partial_slots.copy_(self.slot_of[self.partial_cols + self.canvas_offset])
        current = plan.window_columns(phase, window)
        self.columns.load(plan, state, current, current)
        if self.refresh_columns is not self.columns:
            self.refresh_columns.load(plan, state, plan.region_columns(phase, window), current)
        self.quotas.zero_()
        self.schedule_len.zero_()
        for g in phase:
            if window < len(plan.schedules[g]):
                schedule = plan.schedules[g][window]
                self.quotas[g, : len(schedule)] = torch.tensor(schedule, device=state.device)
                self.schedule_len[g] = len(schedule)
        base = 0 if phase_cache is None else phase_cache.num_tokens
        if self.per_block:
            if with_phase_cache:
                self._load_block_prompts(phase_cache)
            return
        if self.cache is not None and with_phase_cache:
            if phase_cache is not None:
                copy_cache(self.cache, phase_cache, base)
            else:
                self.cache.lengths.copy_(state.prompt_lens)
        if self.windowed:
            segments = self._sequence()[2]
            self.cache.segments[:, base : self.extra_start].copy_(segments[:, self.refresh_cols])
            forwarded = torch.isin(self.extra_cols, self.step_cols + self.canvas_offset)
            self.cache.segments[:, self.extra_start :].copy_(torch.where(forwarded, segments[:, self.extra_cols], PAD))
        self._choose_attention()

    def _choose_attention(self) -> None:
        """Whether this window's step, refresh and partial refresh attend with no mask: where every query sees
        every key (one request, no padding, ``canvas`` attention or one segment) the fastest
        attention kernels apply. A graph is captured per choice. One host sync per window."""
        mode = self.config.attention
        if not self.windowed:
            segments = self._sequence()[2][:, self.step_cols]
            keys = segments if self.cache is None else torch.cat((self.cache.segments, segments), 1)
            self.step_dense = bool(attention_mask(segments, keys, mode).all())
            return
        step_segments = self.state.segments[:, self.step_cols]
        keys, refresh_keys = self.cache.segments, self._refresh_keys()
        refresh_segments = keys[:, self.refresh_slots]
        checks = [attention_mask(step_segments, keys, mode).all(),
                  attention_mask(refresh_segments, refresh_keys, mode).all()]
        if self.partial:
            checks.append(attention_mask(self.state.segments[:, self.partial_cols], keys, mode).all())
        self.step_dense, self.refresh_dense, *partial = torch.stack(checks).tolist()
        self.partial_dense = bool(partial and partial[0])

    def _refresh_keys(self) -> torch.Tensor:
        """[B, C] segments of the keys a refresh sees: the step cache's, less the slots of step
        columns outside the phase (which the refresh does not forward)."""
        keys = self.cache.segments
        if len(self.extra_cols) == 0:
            return keys
        return torch.cat((keys[:, : self.extra_start], torch.full_like(keys[:, self.extra_start :], PAD)), 1)

    @property
    def step_graph(self) -> torch.cuda.CUDAGraph | None:
        """The step graph the current window replays (None before its first replay, or when
        steps are called rather than replayed)."""
        return self.step_graphs.get(self.step_dense)

    @property
    def refresh_graph(self) -> torch.cuda.CUDAGraph | None:
        return self.refresh_graphs.get(self.refresh_dense)

    def refresh(self) -> None:
        """A window's first step (or a periodic refresh); partial after the phase's first window
        when the config refreshes partially."""
        if self.partial and self.window > 0:
            self._run(self.partial_graphs, self.partial_dense, self._partial_refresh_step, 1)
        else:
            self._run(self.refresh_graphs, self.refresh_dense, self._refresh_step, 1)

    def step(self, count: int, action: int = 1) -> None:
        """``count`` steps of the current window (a step where no group is active changes
        nothing), the first of them the window's ``action``-th (its refresh is the 0th): with
        delayed KV each step's static width follows from it (``Plan.delayed_width``)."""
        if not self.delayed:
            self._run(self.step_graphs, self.step_dense, self._step, count)
            return
        for a in range(action, action + count):
            width = self._delayed_width(a)
            self._run(self.delayed_graphs, width, lambda: self._delayed_step(width), 1)

    def release(self) -> None:
        """Drops the graphs (their private memory) and the static caches."""
        graphs = (self.step_graphs, self.refresh_graphs, self.partial_graphs, self.delayed_graphs)
        for graph in (g for by_key in graphs for g in by_key.values()):
            graph.reset()
        self.step_graphs, self.refresh_graphs, self.partial_graphs, self.delayed_graphs = {}, {}, {}, {}
        self.cache = self.blocks = None

    def _run(self, graphs: dict, key, body, count: int) -> None:
        if not self.capture:
            for _ in range(count):
                body()
            return
        if key not in graphs:
            graphs[key] = self._capture(body)
        for _ in range(count):
            graphs[key].replay()

    def _capture(self, body) -> torch.cuda.CUDAGraph:
        """Captures ``body``. The warm-up runs really commit, so the state is put back."""
        s = self.state
        state = (s.canvas, s.trace, s.group_steps, s.window_steps, s.step)
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
        plan, state, phase = self.plan, self.state, self.phase
        device, b = state.device, state.batch_size
        windows = plan.num_windows(phase)
        base = 0 if phase_cache is None else phase_cache.num_tokens
        module = self.model.module
        kv_like, cfg = module.embed.weight, module.cfg
        self.cache = None
        # Sequence coordinates (what ``_sequence`` returns): the prompt then the canvas under
        # ``canvas`` attention with nothing cached, else the canvas alone (the prompt is cached).
        self.canvas_offset = state.prompt_ids.shape[1] if phase_cache is None else 0
        if self.windowed:
            step_width = max(len(plan.step_columns(phase, k)) for k in range(windows))
            if self.per_block:  # the refresh forwards each block's columns in its own row
                self._build_blocks(kv_like, cfg, b, base, windows)
                step_width = len(phase) * self.block_width
            else:
                # The refresh forwards the phase's columns: the prompt then the canvas under
                # ``canvas`` attention, the phase's blocks under ``isolated``.
                if self.canvas_offset:
                    columns = torch.arange(self.canvas_offset + state.canvas.shape[1], device=device)
                else:
                    columns = torch.tensor(plan.block_columns(phase), dtype=torch.long, device=device)
                self.refresh_cols = columns  # [W]
                # The step's cache: the phase cache, then every refresh column's KV in a slot of its
                # own; the refresh writes them all, a step rewrites its columns' slots, and every
                # slot is a key (Fast-dLLM's dual cache, replaced in place). A step column outside
                # the phase (a shifted model's predecessor of a headerless group's first window)
                # rewrites its own slot in the phase cache where that holds it (the summary's,
                # after the think blocks: as the batching engine's pool); else it gets a slot
                # after them, a key while a step forwards it (a rank without that block).
                in_phase = torch.zeros(self.canvas_offset + state.canvas.shape[1], dtype=torch.bool, device=device)
                in_phase[columns] = True
                outside = torch.tensor([c for k in range(windows) for c in plan.step_columns(phase, k)],
                                       dtype=torch.long, device=device) + self.canvas_offset
                outside = outside[~in_phase[outside]].unique()
                prompt = state.prompt_ids.shape[1]  # (a phase cache holds canvas column c at prompt + c)
                cached = outside + prompt < base  # (base is 0 with no phase cache)
                self.extra_cols = outside[~cached]  # [E]
                self.extra_start = base + len(columns)
                self.refresh_slots = base + torch.arange(len(columns), device=device)
                self.slot_of = torch.full(in_phase.shape, -1, dtype=torch.long, device=device)
                self.slot_of[columns] = self.refresh_slots
                self.slot_of[outside[cached]] = outside[cached] + prompt
                self.slot_of[self.extra_cols] = self.extra_start + torch.arange(len(self.extra_cols), device=device)
                self.step_slots = torch.zeros(step_width, dtype=torch.long, device=device)
                self.cache = empty_cache(kv_like, cfg, b, self.extra_start + len(self.extra_cols), 0, torch.long)
                if self.partial:
                    self.partial_width = max(len(plan.partial_refresh_columns(phase, k)) for k in range(1, windows))
                    self.partial_cols = torch.zeros(self.partial_width, dtype=torch.long, device=device)
                    self.partial_slots = torch.zeros(self.partial_width, dtype=torch.long, device=device)
            self.step_cols = torch.zeros(step_width, dtype=torch.long, device=device)
            if self.delayed:  # per step column: real (not padding), a window column follows it, outside the blocks
                self.step_valid, self.step_successor, self.step_always = (
                    torch.zeros(step_width, dtype=torch.bool, device=device) for _ in range(3))
        else:
            # Every column of the phase's groups, finished or not: a static shape.
            if self.canvas_offset:
                self.step_cols = torch.arange(self.canvas_offset + state.canvas.shape[1], device=device)
            else:
                self.step_cols = torch.tensor(plan.block_columns(phase), dtype=torch.long, device=device)
                self.cache = empty_cache(kv_like, cfg, b, base, len(self.step_cols), torch.long)
        self.columns = _Columns(b, max(len(plan.window_columns(phase, k)) for k in range(windows)), device)
        self.refresh_columns = self.columns
        if self.fastdllm is not None and self.fastdllm.window_steps is not None:
            self.refresh_columns = _Columns(b, max(len(plan.region_columns(phase, k)) for k in range(windows)), device)
        g = plan.layout.num_groups
        self.schedule_max = max(len(s) for gr in phase for s in plan.schedules[gr])
        self.quotas = torch.zeros(g, self.schedule_max, dtype=torch.long, device=device)
        self.schedule_len = torch.zeros(g, dtype=torch.long, device=device)
        self.batch = torch.arange(b, device=device)

    # --- blocks side by side (isolated think blocks, see BlockCache) ----------------------------
    def _build_blocks(self, kv_like, cfg, b: int, base: int, windows: int) -> None:
        """The per-block cache, the refresh's scatter into it, and the step's query width."""
        plan, phase, device = self.plan, self.phase, self.state.device
        m = len(phase)
        lengths = [plan.layout.blocks[g][1] - plan.layout.blocks[g][0] for g in phase]
        self.block_width = max(len(plan.step_columns([g], k)) for g in phase for k in range(windows))
        exact = b == 1 and len(set(lengths)) == 1  # every slot a key: no mask at all
        slots = base + max(lengths) if exact else _aligned(base + max(lengths))
        kv = kv_like.new_zeros(cfg.num_layers, 2, b * m, slots, cfg.num_kv_heads, cfg.head_dim)
        self.blocks = BlockCache(kv=kv, bias=None if exact else kv_like.new_zeros(b * m, 1, 1, slots))
        self.block_slots = torch.zeros(b * m * self.block_width, dtype=torch.long, device=device)
        if self.partial:
            self.partial_width = max(len(plan.partial_refresh_columns([g], k))
                                     for g in phase for k in range(1, windows))
            self.partial_cols = torch.zeros(m * self.partial_width, dtype=torch.long, device=device)
            self.partial_slots = torch.zeros(b * m * self.partial_width, dtype=torch.long, device=device)
        # The refresh forwards every column of every block, side by side too: block-major, each
        # block padded to the longest by repeating its last column (same k/v to the same slot).
        self.prompt_slots = base
        self.block_starts = torch.tensor([plan.layout.blocks[g][0] for g in phase], device=device)  # [m]
        longest = max(lengths)
        padded = [list(range(*plan.layout.blocks[g])) for g in phase]
        self.refresh_block_cols = torch.tensor([c for cols in padded for c in cols + cols[-1:] * (longest - len(cols))],
                                               dtype=torch.long, device=device)  # [m * L]
        self.refresh_block_slots = self._slots(self.refresh_block_cols.view(m, -1))  # [B * m * L]

    def _slots(self, columns: torch.Tensor) -> torch.Tensor:
        """Flat BlockCache slots (row * C + slot) of canvas ``columns`` ([K, S], any blocks) for
        every request: [B * K * S], request-major."""
        state, phase = self.state, self.phase
        b, m, slots = state.batch_size, len(phase), self.blocks.kv.shape[3]
        index = {g: j for j, g in enumerate(phase)}
        block = torch.tensor([index[int(g)] for g in state.groups[columns.reshape(-1)].tolist()], device=state.device)
        block = block.view(columns.shape)
        start = torch.tensor([self.plan.layout.blocks[g][0] for g in phase], device=state.device)[block]
        local = self.prompt_slots + columns - start  # [m or 1, S]
        rows = torch.arange(b, device=state.device).view(b, 1, 1) * m + block[None]  # [B, m or 1, S]
        return (rows * slots + local[None]).reshape(-1)

    def _block_columns(self, columns_of, window: int, width: int) -> torch.Tensor:
        """[m * width] each block's ``columns_of([g], window)``, block-major, each block padded to
        ``width`` by repeating its last column (the repeat computes and writes the same k/v)."""
        out = []
        for g in self.phase:
            cols = columns_of([g], window)
            out.extend(cols + cols[-1:] * (width - len(cols)))
        return torch.tensor(out, dtype=torch.long, device=self.state.device)

    def _load_block_prompts(self, phase_cache: PromptCache) -> None:
        """Each block's row starts with its request's prompt KV; the bias masks what holds no key."""
        device, layout, m = self.state.device, self.plan.layout, len(self.phase)
        p = phase_cache.num_tokens
        kv = self.blocks.kv  # [L, 2, B * m, C, Hkv, D]
        layers, _, rows, slots, hkv, d = kv.shape
        prompt = phase_cache.kv[..., :p, :].transpose(3, 4)  # [L, 2, B, P, Hkv, D]
        kv.view(layers, 2, rows // m, m, slots, hkv, d)[:, :, :, :, :p].copy_(prompt[:, :, :, None])
        if self.blocks.bias is not None:
            lengths = torch.tensor([layout.blocks[g][1] - layout.blocks[g][0] for g in self.phase], device=device)
            slot = torch.arange(slots, device=device)
            prompt_key = phase_cache.segments != PAD  # [B, P]
            block_key = (slot[None] >= p) & (slot[None] < p + lengths[:, None])  # [m, C]
            key = block_key[None].repeat(rows // m, 1, 1)  # [B, m, C]
            key[:, :, :p] = prompt_key[:, None]
            bias = torch.zeros(key.shape, dtype=kv.dtype, device=device).masked_fill_(~key, float("-inf"))
            self.blocks.bias.copy_(bias.view(rows, 1, 1, slots))

    # --- device side: the bodies --------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        """The model forward of a step alone (what ``benchmarks/latency.py`` compares a whole
        step against): logits [B, N, V] of the window's columns. Through the model's own
        ``__call__`` (a wrapper such as LLaDA's guidance, ``paradec.compat.llada.Guided``,
        applies), except side by side, which only the plain transformer offers."""
        logits_at = self._logits_at(self.columns)
        if self.per_block:
            return self._forward_cached(self.step_cols, self.block_slots, False, logits_at)
        if self.windowed:
            return self._forward_cached(self.step_cols, self.step_slots, self.step_dense, logits_at)
        ids, positions, segments = (x[:, self.step_cols] for x in self._sequence())
        return self.model(ids, positions, segments, self.config.attention, cache=self.cache, logits_at=logits_at,
                          check_inputs=False, dense=self.step_dense)

    def _forward_cached(self, cols: torch.Tensor, slots: torch.Tensor, dense: bool, logits_at: torch.Tensor):
        """Logits at ``logits_at`` of canvas columns ``cols`` forwarded over the step's cache,
        their k/v written at ``slots`` first (side by side: BlockCache slots)."""
        state = self.state
        if self.per_block:
            return self.model.module.forward_blocks(state.canvas[:, cols], state.positions[:, cols],
                                                    state.segments[:, cols], self.blocks, slots, logits_at)
        return self.model(state.canvas[:, cols], state.positions[:, cols], state.segments[:, cols],
                          self.config.attention, cache=self.cache, logits_at=logits_at, check_inputs=False,
                          dense=dense, slots=slots)

    def _logits_at(self, columns: _Columns) -> torch.Tensor:
        return torch.where(columns.valid, self.state.positions[:, columns.cols], -1)  # [B, N]

    def _sequence(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the refresh's (and an unwindowed step's) columns index: [B, L] ids, positions,
        segments."""
        state = self.state
        if self.canvas_offset == 0:
            return state.canvas, state.positions, state.segments
        prompt_pos = torch.arange(self.canvas_offset, device=state.device).expand_as(state.prompt_ids)
        prompt_real = prompt_pos < state.prompt_lens[:, None]
        ids = torch.cat((state.prompt_ids, state.canvas), 1)
        positions = torch.cat((torch.where(prompt_real, prompt_pos, -1), state.positions), 1)
        segments = torch.cat((torch.where(prompt_real, PROMPT, PAD), state.segments), 1)
        return ids, positions, segments

    def _refresh_step(self) -> None:
        """A window's first step: forward every column of the phase, writing their KV into the
        step's cache, and commit from its logits. Side by side, each block is a row of its own
        (``forward_blocks``), so a block refreshes alone as it does beside the others."""
        module, mode, state = self.model.module, self.config.attention, self.state
        logits_at = self._logits_at(self.refresh_columns)
        if self.per_block:  # each block's row: its prompt copy's keys and its own block's, nothing else
            cols = self.refresh_block_cols
            logits = module.forward_blocks(state.canvas[:, cols], state.positions[:, cols], state.segments[:, cols],
                                           self.blocks, self.refresh_block_slots, logits_at)
            self._commit(logits, logits_at, self.refresh_columns)
            return
        ids, positions, segments = (x[:, self.refresh_cols] for x in self._sequence())  # [B, W]
        mask = None if self.refresh_dense else attention_mask(segments, self._refresh_keys(), mode)
        hidden, _ = module.run_layers(module.embed(ids.clamp(min=0)), positions, mask, self.cache, self.refresh_slots,
                                      segments)
        if self.canvas_offset:  # the prompt was forwarded: its last hidden state as of now
            self.cache.last_hidden.copy_(hidden[self.batch, state.prompt_lens - 1])
        logits = module.head(module.gather_rows(hidden, positions, segments, logits_at, self.cache, False))
        self._commit(logits, logits_at, self.refresh_columns)

    def _step(self) -> None:
        self._commit(self.forward(), self._logits_at(self.columns), self.columns)

    def _load_delayed(self, window: int) -> None:
        """The window's per-column flags for delayed KV (``paradec.decoding.delayed.needed``), in
        ``step_cols``' layout: real columns, those a window column follows (shifted models), and
        those outside the phase's blocks."""
        plan, phase = self.plan, self.phase
        if self.per_block:
            lists = [plan.step_columns([g], window) for g in phase]
            width = self.block_width
        else:
            lists, width = [plan.step_columns(phase, window)], len(self.step_cols)
        flags = [[], [], []]
        for columns in lists:
            pad = [False] * (width - len(columns))
            successor, always = plan.delayed_flags(phase, window, columns)
            flags[0] += [True] * len(columns) + pad
            flags[1] += successor + pad
            flags[2] += always + pad
        for buffer, values in zip((self.step_valid, self.step_successor, self.step_always), flags):
            buffer.copy_(torch.tensor(values, dtype=torch.bool))

    def _delayed_width(self, action: int) -> int:
        """The static width of a delayed-KV step, action ``action`` of the window: the phase's
        bound (``Plan.delayed_width``), side by side each block's (the widest), at least one."""
        plan, window, by_rule = self.plan, self.window, self.policy.rule != TOPK
        if self.per_block:
            width = max(plan.delayed_width([g], window, action, by_rule) for g in self.phase)
            return max(1, min(width, self.block_width))
        return max(1, min(plan.delayed_width(self.phase, window, action, by_rule), len(self.step_cols)))

    def _delayed_step(self, width: int) -> None:
        """A step with delayed KV: the window's step columns that can change
        (``paradec.decoding.delayed``), ``width`` of them a row (or a block, side by side),
        padded by repeating a needed one; then the commit."""
        state, module = self.state, self.model.module
        b, m = state.batch_size, len(self.phase) if self.per_block else 1
        cols = self.step_cols.view(m, -1)  # [m, W] canvas columns
        flags = [x.view(m, -1) for x in (self.step_valid, self.step_successor, self.step_always)]
        last = state.canvas.shape[1] - 1
        keep = delayed.needed(state.canvas[:, cols], state.trace[:, cols], state.step, state.mask_id, flags[0],
                              state.canvas[:, (cols + 1).clamp(max=last)], flags[1], flags[2])  # [B, m, W]
        if not self.capture:
            delayed.check_width(keep, width)
        every = cols.expand(b, m, -1)
        first = every.gather(-1, keep.long().argmax(-1, keepdim=True))  # [B, m, 1] a needed column (or any)
        chosen = delayed.compact(every, keep, width, first)  # [B, m, width]
        flat = chosen.reshape(b, -1)
        ids, positions, segments = (x.gather(1, flat) for x in (state.canvas, state.positions, state.segments))
        logits_at = self._logits_at(self.columns)
        if self.per_block:
            slots_per_row = self.blocks.kv.shape[3]
            rows = self.batch.view(b, 1, 1) * m + torch.arange(m, device=state.device).view(1, m, 1)
            local = self.prompt_slots + chosen - self.block_starts.view(1, m, 1)
            slots = (rows * slots_per_row + local).reshape(-1)  # [B * m * width] BlockCache slots
            logits = module.forward_blocks(ids, positions, segments, self.blocks, slots, logits_at)
        else:
            slots = self.slot_of[flat + self.canvas_offset]  # [B, width], each row's own
            logits = self.model(ids, positions, segments, self.config.attention, cache=self.cache,
                                logits_at=logits_at, check_inputs=False, slots=slots)
        self._commit(logits, logits_at, self.columns)

    def _partial_refresh_step(self) -> None:
        """A refresh that forwards ``Plan.partial_refresh_columns`` only, then commits in the window."""
        logits_at = self._logits_at(self.columns)
        logits = self._forward_cached(self.partial_cols, self.partial_slots, self.partial_dense, logits_at)
        self._commit(logits, logits_at, self.columns)

    def _commit(self, logits: torch.Tensor, logits_at: torch.Tensor, columns: _Columns) -> None:
        """Scoring, the policy, selection and the in-place commit of one step, then EOS filling
        and the counters. logits: [B, N, V] of ``columns``; logits_at: [B, N]."""
        state, cfg = self.state, self.config
        b, n, vocab = logits.shape
        g_count = self.plan.layout.num_groups
        flat = logits.reshape(-1, vocab)  # [B * N, V]
        group = columns.group.expand(b, -1)  # [B, N]
        masked = (state.canvas[:, columns.cols] == state.mask_id) & columns.valid  # [B, N]
        left = torch.zeros(b, g_count, dtype=torch.long, device=state.device).scatter_add_(
            1, group, (masked & columns.current).long())  # [B, G] masked in the current windows
        active = left > 0
        masked = masked & active.gather(1, group)
        noise = priority = None
        if cfg.temperature > 0:
            noise = self._uniform(columns, sampler.TOKENS, vocab)  # [B * N, V]
        if self.policy.draws_order:
            priority = self._uniform(columns, sampler.ORDER, 1)[:, 0].float()
        rows = columns.rows
        scores = ops.score(flat, rows, state.mask_id, state.stop_ids, columns.barred.reshape(-1), cfg.temperature,
                           noise, self.sampling)
        if self.fastdllm is not None:
            scores.confidence = vocab_confidence(flat, rows, scores, state.mask_id)
        done = state.window_steps  # [B, G]
        length = self.schedule_len[None].expand(b, -1)  # [B, G]
        scheduled = self.quotas[torch.arange(g_count, device=state.device)[None], done.clamp(max=self.schedule_max - 1)]
        quota = torch.where(done < length, torch.minimum(scheduled, left), left)
        if cfg.steps is not None:
            remaining = (length - done).clamp(min=1)
            floor = torch.where(done < length, (left + remaining - 1) // remaining, left)
        else:
            floor = torch.ones_like(left)
        floor = torch.where(active, floor.clamp(min=1), 0)
        flat_masked = masked.reshape(-1)
        key = (self.batch[:, None] * g_count + group).reshape(-1)
        candidates = Candidates(key=key, position=logits_at.reshape(-1), scores=scores,
                                quota=quota.gather(1, group).reshape(-1), floor=floor.gather(1, group).reshape(-1),
                                priority=priority)
        lowest = torch.finfo(torch.float32).min
        ranking = self.policy.rank(candidates).float().nan_to_num(nan=lowest, neginf=lowest)
        ranking = torch.where(flat_masked, ranking, -torch.inf)
        confidence = torch.where(flat_masked, scores.confidence, -torch.inf)
        floor = candidates.floor
        if self.fastdllm is not None and self.policy.rule == FACTOR:
            floor = factor_last_commits(candidates, ranking, flat_masked, self.param, b * g_count)
        ops.select_commit(state.canvas, state.trace, columns.batch_index, columns.cols.repeat(b), key,
                          ranking, confidence, candidates.quota, floor, scores.tokens, self.policy.rule, self.param,
                          PENDING)
        state.trace.copy_(torch.where(state.trace == PENDING, state.step, state.trace))
        if cfg.eos_closes_block:
            fill_after_eos(state.canvas, state.trace, state.groups, state.editable, state.stop_ids, state.mask_id,
                           self.plan.layout.num_groups, self.model.spec.eos_id, state.step)
        state.group_steps += active.long()
        state.window_steps += active.long()
        state.step += active.any().long()

    def _uniform(self, columns: _Columns, salt: int, width: int) -> torch.Tensor:
        """[B * N, width] the sampler's numbers for every (request, column) of a step."""
        state = self.state
        b, n = state.batch_size, len(columns.cols)
        group = columns.group.expand(b, -1)  # [B, N]
        return sampler.uniform(state.seeds[:, None].expand(b, n).reshape(-1), group.reshape(-1),
                               state.group_steps.gather(1, group).reshape(-1), columns.offset.repeat(b), salt, width)


def fill_after_eos(canvas: torch.Tensor, trace: torch.Tensor, groups: torch.Tensor, editable: torch.Tensor,
                   stop_ids: torch.Tensor, mask_id: int, num_groups: int, eos_id: int, step: torch.Tensor,
                   rows: torch.Tensor | None = None) -> None:
    """An EOS committed at body position p means the text ends there: every masked position after
    p in that group becomes EOS, committed at ``step`` (a device tensor, 0-d or [B, 1] per row:
    nothing here waits for the host). canvas, trace: [B, C], in place; groups, editable: [C] or
    [B, C]; rows: [B, 1] bool, the rows that fill (None: every row)."""
    groups = groups.expand_as(canvas)
    c = canvas.shape[1]
    column = torch.arange(c, device=canvas.device).expand_as(canvas)
    is_stop = torch.isin(canvas, stop_ids) & editable & (trace >= 0)
    first = torch.full((canvas.shape[0], num_groups), c, device=canvas.device)
    first.scatter_reduce_(1, groups, torch.where(is_stop, column, c), "amin")
    fill = (canvas == mask_id) & editable & (column > first.gather(1, groups))
    if rows is not None:
        fill = fill & rows
    canvas.copy_(torch.where(fill, eos_id, canvas))
    trace.copy_(torch.where(fill, step, trace))


def _blocks_apart(plan: Plan, phase: list[int], phase_cache: PromptCache | None, shifted: bool) -> bool:
    """Whether a windowed phase's steps attend block by block (``BlockCache``): isolated think
    blocks (no summary in the phase, which attends to all of them) over a cached prompt, all with
    the same number of windows, and a prompt short enough that m copies of its keys stay cheap
    (see ``SIDE_BY_SIDE_MAX_KEYS``). A shifted model also needs a header on every block: a
    block's first token is predicted from the column before it, which must be in the block (with
    no header it is the prompt's last token, whose state only the prompt cache holds)."""
    layout = plan.layout
    headed = all(layout.bodies[g][0] > layout.blocks[g][0] for g in phase)
    if not (
        phase_cache is not None
        and layout.num_think_blocks > 0
        and layout.summary_group not in phase
        and len({len(plan.windows[g]) for g in phase}) == 1
        and (headed or not shifted)
    ):
        return False
    prompt, blocks = phase_cache.num_tokens, sum(end - start for start, end in (layout.blocks[g] for g in phase))
    return len(phase) * prompt + blocks <= SIDE_BY_SIDE_MAX_KEYS * (prompt + blocks)


def _padded(columns: list[int], width: int, device: torch.device) -> torch.Tensor:
    """[width] ``columns`` padded by repeating the last one (which rewrites its own slot with the same k/v)."""
    return torch.tensor(columns + columns[-1:] * (width - len(columns)), dtype=torch.long, device=device)


def _aligned(n: int) -> int:
    return -(-n // KEY_ALIGN) * KEY_ALIGN


def _fill(columns: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> None:
    columns.zero_()
    valid.zero_()
    columns[: len(values)] = values
    valid[: len(values)] = True
