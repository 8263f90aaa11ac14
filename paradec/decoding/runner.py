"""The step loop. It owns the canvas, the prompt cache, budgets, EOS and the trace; a policy
only decides which masked positions a step commits (DESIGN.md contract 5).

A step forwards the unfinished groups of the current phase, scores their masked positions and
commits, in every unfinished group, at least one token. Phases: for ``nap`` the think blocks,
then the summary (or both at once with ``summary="concurrent"``); for the other modes the one
answer region. Under ``isolated`` attention the prompt KV is computed once and, before the
summary decodes, the finished blocks' KV is appended to it once, so a summary step forwards the
summary alone. Under ``canvas`` every step forwards the prompt and the whole canvas.

Windows (``block`` mode, ``nap`` with ``window``): each group of a phase decodes its body one
window at a time, all groups in step; a step commits only inside the current windows. With a
``prefix``/``dual`` cache the window's first step forwards what an unwindowed step would and
keeps the KV of everything the later steps of the window do not recompute.

``FastDLLMRules`` (``paradec.compat.fastdllm``) makes a runner decide as Fast-dLLM v1's own code
does where that differs from paradec's rules: confidence over the whole vocabulary, its factor
rule's last position, and its dual cache's bounded block loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from paradec import ops
from paradec.canvas import CanvasLayout
from paradec.config import RULE_POLICIES, GenerationConfig, window_lengths
from paradec.decoding import ar_order, confidence, factor, random_order, threshold
from paradec.decoding.graphs import GraphedSteps, graphs_apply
from paradec.decoding.schedule import group_schedule
from paradec.decoding.selection import Candidates
from paradec.errors import ConfigError
from paradec.models.attention import PAD, PROMPT
from paradec.models.cache import PromptCache
from paradec.models.loading import DiffusionModel
from paradec.ops.scoring import Sampling
from paradec.ops.selection import FACTOR, rank_in_groups


CHECK_EVERY = 4  # graph replays between completion checks when a rule decides how much commits


@dataclass
class DecodeOutput:
    canvas: torch.Tensor  # [B, C] final tokens after each prompt
    trace: torch.Tensor  # [B, C] global step that committed each position; -1 for headers
    nfe: int  # model forwards made by the steps (prefill and cache extension not counted)
    steps: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FastDLLMRules:
    """Where Fast-dLLM v1's own decoders (``llada/generate.py``) decide differently from paradec,
    a runner given these rules decides as they do (``paradec.compat.fastdllm``):

    - confidence is the chosen token's probability under the softmax over the whole vocabulary,
      the mask id's mass included (paradec's own: over the ids a step may choose, which leaves
      the mask id out). The ranking and the threshold and factor rules read it. This is what
      parts Fast-dLLM's tokens from paradec's on tiny checkpoints, where the mask id holds about
      1/V of the mass; a trained model gives it almost none. (Only the mask id's mass is put back:
      where stop ids are barred too — ``bar_eos_in_blocks``, ``summary_min_tokens`` — theirs stays
      out; the block mode Fast-dLLM decodes bars none.)
    - the factor rule also commits a group's last masked position when it alone fails its bound
      (``get_transfer_index_dynamic`` then takes every position).
    - window_steps (``generate_with_dual_cache`` with a threshold or factor rule): a window stops
      after this many steps even if it still holds masked positions, and a window's first step
      also considers the positions earlier windows of its group left masked (Fast-dLLM's full
      forward at each block's start commits among every masked position before the block's end).
      Such runs step eagerly (no CUDA graphs).

    The mask id itself is never chosen (DESIGN.md contract 5): where Fast-dLLM's argmax is the mask
    id, its code "commits" [MASK] and the results part from there."""

    window_steps: int | None = None


def stream_seed(seed: int, group: int, step: int, salt: int = 0) -> int:
    """A 63-bit generator seed for one (request seed, group, step) stream."""
    value = seed
    for part in (group, step, salt):
        value = (value * 0x9E3779B97F4A7C15 + part + 1) % (1 << 63)
    return value


class Runner:
    """Decodes a batch of prompts (token ids) on one layout with one config.

    think_blocks: the think blocks this runner decodes (default all). summary: whether it
    decodes the summary (default: when it decodes every think block). A rank of a distributed
    run decodes its own blocks and no summary; the summary owner then decodes the summary alone
    from the gathered blocks.
    """

    def __init__(
        self,
        model: DiffusionModel,
        config: GenerationConfig,
        layout: CanvasLayout,
        prompts: list[list[int]],
        think_blocks: list[int] | None = None,
        summary: bool | None = None,
        fastdllm: FastDLLMRules | None = None,
    ):
        self.model, self.config, self.layout = model, config, layout
        self.sampling = Sampling.of(config)  # the request's top_k / top_p / score_on / rank_temperature
        self.fastdllm = fastdllm
        self.device = model.device
        self.seeds = [config.seed + r for r in range(len(prompts))]
        m = layout.num_think_blocks
        groups = list(range(m)) if think_blocks is None else sorted(think_blocks)
        if not set(groups) <= set(range(m)) or (m == 0 and think_blocks):
            raise ConfigError(f"think_blocks must be a subset of range({m}), got {think_blocks}")
        if (len(groups) < m or summary is not None) and config.attention == "canvas":
            raise ConfigError(
                "attention='canvas' needs every think block on one device (each block attends to all "
                "the others); decoding blocks apart needs attention='isolated'"
            )
        with_summary = m > 0 and (len(groups) == m if summary is None else summary)
        if m == 0:
            self.phases = [[0]]
        elif not with_summary:
            self.phases = [groups]
        elif not groups:
            self.phases = [[m]]
        elif config.summary == "concurrent":
            self.phases = [groups + [m]]
        else:
            self.phases = [groups, [m]]
        b, c = len(prompts), layout.length
        self.prompt_lens = torch.zeros(b, dtype=torch.long, device=self.device)
        self.prompt_ids = torch.zeros(b, max(map(len, prompts)), dtype=torch.long, device=self.device)
        self.canvas = torch.empty(b, c, dtype=torch.long, device=self.device)  # [B, C]
        self.positions = torch.empty(b, c, dtype=torch.long, device=self.device)  # [B, C]
        self.trace = torch.empty(b, c, dtype=torch.long, device=self.device)
        self.segments = layout.segments.to(self.device).repeat(b, 1)  # [B, C]
        self.groups = layout.groups.to(self.device)  # [C]
        self.editable = layout.editable.to(self.device)  # [C]
        self.body_starts = torch.tensor([s for s, _ in layout.bodies], device=self.device)  # [G]
        self.stop_ids = torch.tensor(model.spec.stop_ids, dtype=torch.long, device=self.device)
        self.group_steps = torch.zeros(b, layout.num_groups, dtype=torch.long)  # steps each group has run
        self.window_steps = torch.zeros(b, layout.num_groups, dtype=torch.long)  # ... in its current window
        self.windows = {g: _window_ranges(start, end, config.window_len)  # each group's windows, in order
                        for g, (start, end) in enumerate(layout.bodies)}
        self.schedules = self._schedules()
        self.in_window = self.editable.clone()  # [C] the current windows of the phase
        self.window_cap = None if fastdllm is None else fastdllm.window_steps  # steps a window may take at most
        if self.window_cap is not None and not self._windowed_cache:
            raise ConfigError("FastDLLMRules.window_steps bounds a windowed cache's windows (cache='prefix' or 'dual')")
        graphed = graphs_apply(config, self.device) and self.window_cap is None
        self.graphs = {} if graphed else None  # phase -> GraphedSteps (None: eager steps)
        on_cuda = self.graphs is not None and self.device.type == "cuda"
        self.graph_pool = torch.cuda.graph_pool_handle() if on_cuda else None
        self.reset(prompts)

    def reset(self, prompts: list[list[int]]) -> None:
        """Starts over on ``prompts`` (as many as before, the longest as long as before), every
        buffer refilled in place, so the CUDA graphs already captured replay for them too (a
        server decoding many requests of one shape captures once)."""
        b, p = self.prompt_ids.shape
        if len(prompts) != b or max(map(len, prompts)) != p:
            raise ConfigError(f"reset needs {b} prompts, the longest {p} tokens; got {len(prompts)}, "
                              f"the longest {max(map(len, prompts), default=0)}")
        pad = self.model.spec.pad_id if self.model.spec.pad_id is not None else 0
        self.prompt_lens.copy_(torch.tensor([len(q) for q in prompts]))
        self.prompt_ids.fill_(pad)
        for r, q in enumerate(prompts):
            self.prompt_ids[r, : len(q)] = torch.tensor(q, device=self.device)
        self.canvas.copy_(self.layout.template.to(self.device).expand_as(self.canvas))
        self.positions.copy_(self.prompt_lens[:, None] + torch.arange(self.canvas.shape[1], device=self.device))
        self.trace.fill_(-1)
        self.group_steps.zero_()
        self.window_steps.zero_()
        self.timings = {"prefill": 0.0, "forward": 0.0, "unmask": 0.0, "bookkeeping": 0.0}

    # --- budgets -----------------------------------------------------------------------------
    def _schedules(self) -> dict[int, list[list[int]]]:
        """Each group's quotas, one list per window: think blocks (or the answer region) take
        the first phase's step budget, the summary the last phase's (the same one when they
        decode together); a group's windows share its budget in proportion to their lengths."""
        cfg, layout = self.config, self.layout
        budgets = cfg.phase_budgets()
        schedules = {}
        for g, windows in self.windows.items():
            steps = budgets[-1][2] if g == layout.summary_group else budgets[0][2]
            shares = [None] * len(windows) if steps is None else split_steps(steps, [e - s for s, e in windows])
            schedules[g] = [group_schedule(end - start, share, cfg.tokens_per_step, cfg.schedule)
                            for (start, end), share in zip(windows, shares)]
        return schedules

    # --- the loop ----------------------------------------------------------------------------
    @torch.no_grad()  # the graph bodies call the layers directly: no autograd graph may hold their buffers
    def run(self, cache=None, start: tuple[torch.Tensor, torch.Tensor, int] | None = None,
            should_abort=None, on_step=None) -> DecodeOutput:
        """Decode this runner's phases.

        cache: a prompt cache made elsewhere (received from another rank), else one is made here
        under ``isolated``; it may already hold the think blocks' KV (then the summary uses it as
        is). start: (canvas [B, C], trace [B, C], first step) to continue from, such as the
        gathered think blocks. should_abort: called between steps; it raises to stop the run
        (another rank failed). on_step: called as ``on_step(runner, step)`` between steps (between
        batches of graph replays when steps replay as CUDA graphs), with ``canvas`` and ``trace``
        as committed so far; it may raise to stop the run (a server's abort).
        """
        t_start = self._clock()
        if cache is None and self.config.attention == "isolated":
            cache = self.model.prefill(self.prompt_ids, self.prompt_lens, reserve=self.layout.length)
        self.timings["prefill"] = self._clock() - t_start
        step, nfe = 0, 0
        if start is not None:
            canvas, trace, step = start
            self.canvas.copy_(canvas)
            self.trace.copy_(trace)
        for phase in self.phases:
            t_phase = self._clock()
            blocks_cached = cache is not None and cache.num_tokens > self.prompt_ids.shape[1]
            if phase == [self.layout.summary_group] and cache is not None and not blocks_cached:
                cache = self._extend_with_blocks(cache)
            for window in range(max(len(self.windows[g]) for g in phase)):
                self._enter_window(phase, window)
                window_cache, window_step, graph_loaded = None, 0, False  # eager / graphed bookkeeping
                while True:
                    active = self._active(phase)  # [B, G] host bool
                    if not active.any() or (self.window_cap is not None and window_step >= self.window_cap):
                        break
                    if should_abort is not None:
                        should_abort()
                    if on_step is not None:
                        on_step(self, step)
                    every = self.config.refresh_every
                    due = self._windowed_cache and (window_step == 0 or bool(every and window_step % every == 0))
                    if self.graphs is None:
                        window_cache = self._step(active, phase, cache, None if due else window_cache, step)
                        step, nfe, window_step = step + 1, nfe + 1, window_step + 1
                        continue
                    graphed = self._graphed(phase, cache)
                    if not graph_loaded:
                        graphed.load(cache, with_phase_cache=window == 0)
                        graph_loaded = True
                    t_replay = self._clock()
                    if due:
                        count, after = 1, graphed.refresh(step)
                    else:
                        count = self._replays(active, every - window_step % every if every else None)
                        after = graphed.replay(count, step)
                    self.timings["graphs"] = self.timings.get("graphs", 0.0) + self._clock() - t_replay
                    nfe += count
                    window_step += after - step
                    step = after
            if self.layout.num_think_blocks == 0:
                name = "answer"
            else:
                name = "summary" if phase == [self.layout.summary_group] else "think"
            self.timings[name] = self.timings.get(name, 0.0) + self._clock() - t_phase
        self.timings["total"] = self._clock() - t_start
        return DecodeOutput(self.canvas.clone(), self.trace.clone(), nfe, step, dict(self.timings))

    def committed(self) -> torch.Tensor:
        """[B, G] tokens committed so far in each group's body (host tensor; one device sync)."""
        done = (self.trace >= 0) & self.editable  # [B, C]
        counts = torch.zeros(done.shape[0], self.layout.num_groups, dtype=torch.long, device=self.device)
        return counts.index_add_(1, self.groups, done.long()).cpu()

    def release(self) -> None:
        """Frees the captured graphs and their static buffers (caches included) now, rather
        than whenever the garbage collector gets to this runner."""
        for graphed in (self.graphs or {}).values():
            graphed.release()
        if self.graphs is not None:
            self.graphs.clear()

    def _graphed(self, phase: list[int], cache: PromptCache | None) -> GraphedSteps:
        key = tuple(phase)
        if key not in self.graphs:
            self.graphs[key] = GraphedSteps(self, phase, cache, self.graph_pool)
        return self.graphs[key]

    def _replays(self, active: torch.Tensor, until_refresh: int | None) -> int:
        """Graph replays before the host looks again: the steps the top-k schedules still
        need (each commits in every active group), or up to ``CHECK_EVERY`` for rule policies."""
        if self.config.policy in RULE_POLICIES and self.config.mode != "ar_order":
            count = CHECK_EVERY
        else:
            left = [len(self.schedules[g][self.window_index]) - int(self.window_steps[r, g])
                    for r, g in active.nonzero().tolist()]
            count = max(1, max(left))
        return min(count, until_refresh) if until_refresh else count

    def _enter_window(self, phase: list[int], window: int) -> None:
        """Makes window ``window`` of each group in ``phase`` the current one."""
        self.in_window = torch.zeros_like(self.editable)
        self.up_to_window = torch.zeros_like(self.editable)  # [C] each group's body up to its window's end
        for g in phase:
            if window < len(self.windows[g]):
                self.in_window[slice(*self.windows[g][window])] = True
                self.up_to_window[self.layout.bodies[g][0] : self.windows[g][window][1]] = True
        self.window_index = window
        self.window_steps.zero_()
        self.step_columns = self._step_columns(phase, window) if self._windowed_cache else None

    @property
    def _windowed_cache(self) -> bool:
        return self.config.cache_mode in ("prefix", "dual")

    def _step_columns(self, phase: list[int], window: int) -> torch.Tensor:
        """[S] canvas columns a cached step of this window forwards: each group's window
        (``dual``) or its window and the rest of its body (``prefix``); its header when one
        window spans the whole body (the header attends to the body, so such a step is exact;
        with several windows the header's KV is cached and refreshed with the rest of the
        block's, as Fast-dLLM caches everything outside the current block); and for a shifted
        model the column before each window (its hidden state predicts the window's first
        token)."""
        columns = set()
        for g in phase:
            if window >= len(self.windows[g]):
                continue
            start, end = self.windows[g][window]
            if self.config.cache_mode == "prefix":
                end = self.layout.bodies[g][1]
            columns.update(range(start, end))
            if len(self.windows[g]) == 1:
                columns.update(range(self.layout.blocks[g][0], self.layout.bodies[g][0]))
            if self.model.module.shift_logits and start > 0:
                columns.add(start - 1)
        return torch.tensor(sorted(columns), dtype=torch.long, device=self.device)

    def _active(self, phase: list[int]) -> torch.Tensor:
        """[B, G] bool on the host: groups of this phase that still have masked positions in
        their current window."""
        masked = self._masked() & self.in_window  # [B, C]
        per_group = torch.zeros(masked.shape[0], self.layout.num_groups, dtype=torch.long, device=self.device)
        per_group.index_add_(1, self.groups, masked.long())
        in_phase = torch.zeros(self.layout.num_groups, dtype=torch.bool)
        in_phase[phase] = True
        return (per_group.cpu() > 0) & in_phase

    def _masked(self) -> torch.Tensor:
        return (self.canvas == self.model.spec.mask_id) & self.editable

    def _step(self, active: torch.Tensor, phase: list[int], cache, window_cache, step: int):
        """One step; returns the window's cache for the next step (None when not windowed)."""
        cfg, spec = self.config, self.model.spec
        t0 = self._clock()
        region = self.in_window
        if self.window_cap is not None and window_cache is None:  # a window's first step: what earlier ones left too
            region = self.up_to_window
        wanted = self._masked() & active.to(self.device)[:, self.groups] & region  # [B, C]
        logits_at, rows, cols = self._wanted_positions(wanted)  # [B, N]; flat (row, column) pairs
        t1 = self._clock()
        if self._windowed_cache and window_cache is None:
            logits, window_cache = self._refresh(phase, cache, logits_at)
        elif self._windowed_cache:
            columns = self.step_columns
            logits = self.model(self.canvas[:, columns], self.positions[:, columns], self.segments[:, columns],
                                cfg.attention, cache=window_cache, logits_at=logits_at, check_inputs=False)
        else:
            ids, positions, segments, _ = self._inputs(active, phase)
            logits = self.model(ids, positions, segments, cfg.attention, cache=cache, logits_at=logits_at,
                                check_inputs=False)  # [B, N, V]
        t2 = self._clock()
        vocab = logits.shape[-1]
        flat_rows = (logits_at.reshape(-1) >= 0).nonzero()[:, 0]  # [M] rows of the [B * N, V] logits
        group = self.groups[cols]  # [M]
        offset = cols - self.body_starts[group]
        bar = self._barred(group, offset)
        noise = None
        if cfg.temperature > 0:
            noise = self._draw(rows, group, offset, 0, vocab, torch.float64)
            noise.clamp_(min=torch.finfo(torch.float64).tiny)  # log(0) never
        scores = ops.score(logits.view(-1, vocab), flat_rows, spec.mask_id, self.stop_ids, bar, cfg.temperature,
                           noise, self.sampling)
        if self.fastdllm is not None:
            scores.confidence = self._vocab_confidence(logits.view(-1, vocab), flat_rows, scores)
        candidates = self._candidates(rows, cols, group, offset, scores)
        rule, ranking, param = self._plan(candidates)
        floor = candidates.floor
        if self.fastdllm is not None and rule == FACTOR:
            floor = self._factor_last_commits(candidates, ranking.float(), torch.ones_like(floor, dtype=torch.bool),
                                              param)
        ops.select_commit(self.canvas, self.trace, rows, cols, candidates.key, ranking.float(), scores.confidence,
                          candidates.quota, floor, scores.tokens, rule, param, step)
        t3 = self._clock()
        self.group_steps += active.long()
        self.window_steps += active.long()
        if cfg.eos_closes_block:
            self._fill_after_eos(step)
        t4 = self._clock()
        self.timings["bookkeeping"] += (t1 - t0) + (t4 - t3)
        self.timings["forward"] += t2 - t1
        self.timings["unmask"] += t3 - t2
        return window_cache

    def _refresh(self, phase: list[int], cache, logits_at: torch.Tensor) -> tuple[torch.Tensor, PromptCache]:
        """The window's first step: forwards what an unwindowed step forwards (every group of
        the phase, whole) and keeps the KV of all but the step columns."""
        b = self.canvas.shape[0]
        everything = torch.zeros(b, self.layout.num_groups, dtype=torch.bool)
        everything[:, phase] = True
        ids, positions, segments, columns = self._inputs(everything, phase)
        if columns is None:  # canvas attention: the prompt, then the whole canvas
            p = self.prompt_ids.shape[1]
            columns = torch.cat((torch.full((p,), -1, device=self.device),
                                 torch.arange(self.canvas.shape[1], device=self.device)))
        else:
            columns = columns[0]  # every row forwards the same groups
        keep = ~torch.isin(columns, self.step_columns)  # [T]
        return self.model.module.forward_and_cache(
            ids, positions, segments, self.config.attention, cache, logits_at, keep,
            reserve=len(self.step_columns), lengths=self.prompt_lens)

    # --- inputs ------------------------------------------------------------------------------
    def _inputs(self, active: torch.Tensor, phase: list[int]):
        """The tokens a step forwards: [B, T] ids, positions, segments, and canvas columns."""
        b = active.shape[0]
        if self.config.attention == "canvas":
            p = self.prompt_ids.shape[1]
            prompt_pos = torch.arange(p, device=self.device).expand(b, p)
            prompt_seg = torch.where(prompt_pos < self.prompt_lens[:, None], PROMPT, PAD)
            ids = torch.cat((self.prompt_ids, self.canvas), dim=1)
            positions = torch.cat((torch.where(prompt_seg == PAD, -1, prompt_pos), self.positions), dim=1)
            return ids, positions, torch.cat((prompt_seg, self.segments), dim=1), None
        needed = active.clone()
        summary = self.layout.summary_group
        if summary is not None and summary in phase and len(phase) > 1:
            # A concurrent summary attends to every think block: forward them all while it runs.
            needed[active[:, summary]] = True
        # A request whose groups are all done this phase forwards padding only.
        columns = [
            torch.cat([torch.arange(*self.layout.blocks[g]) for g in range(self.layout.num_groups) if needed[r, g]]
                      or [torch.zeros(0, dtype=torch.long)])
            for r in range(b)
        ]
        width = max(1, max(len(c) for c in columns))
        cols = torch.zeros(b, width, dtype=torch.long)
        valid = torch.zeros(b, width, dtype=torch.bool)
        for r, c in enumerate(columns):
            cols[r, : len(c)], valid[r, : len(c)] = c, True
        cols, valid = cols.to(self.device), valid.to(self.device)
        ids = torch.where(valid, self.canvas.gather(1, cols), 0)
        positions = torch.where(valid, self.positions.gather(1, cols), -1)
        segments = torch.where(valid, self.segments.gather(1, cols), PAD)
        return ids, positions, segments, cols

    def _wanted_positions(self, wanted: torch.Tensor):
        """wanted: [B, C] -> logits_at [B, N] (absolute positions, -1 padding), and the flat
        (row, column) pairs of the wanted positions in row-major order."""
        rows, cols = wanted.nonzero(as_tuple=True)
        counts = wanted.sum(1)
        n = int(counts.max())
        slot = torch.arange(len(rows), device=self.device) - (torch.cumsum(counts, 0) - counts)[rows]
        logits_at = torch.full((wanted.shape[0], n), -1, device=self.device)
        logits_at[rows, slot] = self.positions[rows, cols]
        return logits_at, rows, cols

    def _extend_with_blocks(self, cache):
        """Appends the finished think blocks' KV to the cache (exact under ``isolated``)."""
        end = self.layout.blocks[self.layout.num_think_blocks - 1][1]
        ids, positions, segments = self.canvas[:, :end], self.positions[:, :end], self.segments[:, :end]
        return self.model.module.extend(cache, ids, positions, segments, "isolated", reserve=self.layout.length - end)

    # --- scoring and selection ---------------------------------------------------------------
    def _barred(self, group: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """[M] bool: rows where EOS/EOT may not be chosen."""
        cfg, summary = self.config, self.layout.summary_group
        bar = torch.zeros_like(group, dtype=torch.bool)
        if summary is None:
            return bar
        if cfg.bar_eos_in_blocks:
            bar |= group != summary
        return bar | ((group == summary) & (offset < cfg.summary_min_tokens))

    def _draw(self, rows, group, offset, salt: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[M, width] uniform numbers. Each (request, group) draws one [body, width] table per
        step from its own stream (seed, group, step), and each row takes its body offset's line,
        so a position's numbers do not depend on what else is decoded or where."""
        out = torch.empty(len(rows), width, dtype=dtype, device=self.device)
        for r, g in torch.unique(torch.stack((rows, group), 1), dim=0).tolist():
            start, end = self.layout.bodies[g]
            seed = stream_seed(self.seeds[r], g, int(self.group_steps[r, g]), salt)
            generator = torch.Generator(device=self.device).manual_seed(seed)
            table = torch.rand(end - start, width, dtype=dtype, device=self.device, generator=generator)
            here = (rows == r) & (group == g)
            out[here] = table[offset[here]]
        return out

    def _candidates(self, rows, cols, group, offset, scores) -> Candidates:
        g_count = self.layout.num_groups
        key = rows * g_count + group
        masked_left = (self._masked() & self.in_window).long()
        per_group = torch.zeros(len(self.seeds), g_count, dtype=torch.long, device=self.device)
        per_group.index_add_(1, self.groups, masked_left)  # [B, G] masked positions left in the window
        quota = torch.zeros(len(self.seeds), g_count, dtype=torch.long)
        floor = torch.ones(len(self.seeds), g_count, dtype=torch.long)
        left = per_group.cpu()
        for g, schedules in self.schedules.items():
            if self.window_index >= len(schedules):
                continue
            schedule = schedules[self.window_index]
            for r in range(len(self.seeds)):
                s = int(self.window_steps[r, g])
                if s < len(schedule):
                    quota[r, g] = min(schedule[s], int(left[r, g]))
                    if self.config.steps is not None:
                        floor[r, g] = -(-int(left[r, g]) // (len(schedule) - s))
                else:  # EOS filling can never leave a group past its schedule; stay safe anyway
                    quota[r, g] = int(left[r, g])
                    floor[r, g] = int(left[r, g])
        quota = quota.clamp(min=1).to(self.device)[rows, group]
        floor = floor.clamp(min=1).to(self.device)[rows, group]
        priority = None
        if self.config.mode == "random":
            priority = self._draw(rows, group, offset, 1, 1, torch.float32)[:, 0]
        return Candidates(key=key, position=self.positions[rows, cols], scores=scores, quota=quota, floor=floor,
                          priority=priority)

    def _plan(self, candidates: Candidates) -> tuple[int, torch.Tensor, float]:
        """The decoding rule's choice: (commit rule, ranking score [M], rule parameter)."""
        cfg = self.config
        if cfg.mode == "ar_order":
            return ar_order.plan(candidates)
        if cfg.mode == "random":
            return random_order.plan(candidates)
        if cfg.policy == "threshold":
            return threshold.plan(candidates, cfg.threshold)
        if cfg.policy == "factor":
            return factor.plan(candidates, cfg.factor)
        return confidence.plan(candidates, cfg.policy)

    # --- Fast-dLLM's rules (FastDLLMRules), for the eager and the graphed steps alike --------------
    def _vocab_confidence(self, logits: torch.Tensor, rows: torch.Tensor, scores) -> torch.Tensor:
        """[N] the chosen tokens' probabilities over the whole vocabulary: the scores' confidence
        p' leaves the mask id's logit l_m out of the softmax, so p = p' / (1 + p' exp(l_m - l_t)),
        with l_t the chosen token's logit. logits: [R, V]; rows: [N]. O(N) work: two gathers."""
        mask_id = self.model.spec.mask_id
        tokens = scores.tokens.clamp(min=0)
        chosen = logits[rows, tokens].double()  # [N]
        masked_logit = logits[rows, mask_id].double()
        p = scores.confidence.double()
        return (p / (1.0 + p * torch.exp(masked_logit - chosen))).to(scores.confidence.dtype)

    def _factor_last_commits(self, candidates: Candidates, ranking: torch.Tensor, masked: torch.Tensor,
                             param: float) -> torch.Tensor:
        """[N] floors under Fast-dLLM's factor rule: a group whose masked positions all pass
        their bounds but the last one commits that one too (see ``factor.last_one_floor``)."""
        rank = rank_in_groups(candidates.key, ranking, candidates.position)
        return factor.last_one_floor(candidates.key, candidates.scores.confidence, rank, masked, candidates.floor,
                                     param, len(self.seeds) * self.layout.num_groups)

    # --- EOS ---------------------------------------------------------------------------------
    def _fill_after_eos(self, step: int | torch.Tensor) -> None:
        """An EOS committed at body position p means the text ends there: every masked
        position after p in that group becomes EOS, committed at this step (an int, or a 0-d
        device tensor inside a CUDA graph: nothing here waits for the host)."""
        spec = self.model.spec
        stops = self.stop_ids
        c = self.canvas.shape[1]
        column = torch.arange(c, device=self.device).expand_as(self.canvas)
        is_stop = torch.isin(self.canvas, stops) & self.editable & (self.trace >= 0)
        first = torch.full((self.canvas.shape[0], self.layout.num_groups), c, device=self.device)
        first.scatter_reduce_(1, self.groups.expand_as(self.canvas), torch.where(is_stop, column, c), "amin")
        fill = self._masked() & (column > first.gather(1, self.groups.expand_as(self.canvas)))
        self.canvas.copy_(torch.where(fill, spec.eos_id, self.canvas))
        self.trace.copy_(torch.where(fill, step, self.trace))

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _window_ranges(start: int, end: int, window: int | None) -> list[tuple[int, int]]:
    """[start, end) cut into windows of ``window`` columns (None: one window)."""
    ranges, cursor = [], start
    for length in window_lengths(end - start, window):
        ranges.append((cursor, cursor + length))
        cursor += length
    return ranges


def split_steps(steps: int, lengths: list[int]) -> list[int]:
    """``steps`` shared by windows of ``lengths`` tokens in proportion to their lengths (largest
    remainders first), each window at least 1 step and at most one per token."""
    total = sum(lengths)
    steps = min(steps, total)
    exact = [steps * n / total for n in lengths]
    shares = [min(n, max(1, int(e))) for n, e in zip(lengths, exact)]
    while sum(shares) < steps:
        i = max((i for i, n in enumerate(lengths) if shares[i] < n), key=lambda i: exact[i] - shares[i])
        shares[i] += 1
    while sum(shares) > steps:
        i = max((i for i in range(len(shares)) if shares[i] > 1), key=lambda i: shares[i] - exact[i])
        shares[i] -= 1
    return shares
