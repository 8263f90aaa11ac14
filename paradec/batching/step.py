"""The calls of one engine step over the pool's rows, and their commits.

Every forward is the same: each row's query slots [b, T] are gathered from the rows' ids,
positions and segments, their k/v written into the row's own slots first, and each query attends
to its row's keys under its row's attention (``isolated`` or ``canvas``); a padding query sits in
the scratch slot. Two ways to address rows:

- ``step``: the first b rows of the pool, read in place (a view), every row at once with its
  window's step slots (rows not stepping this engine step forward only padding), attending over
  the rows' first K slots. This is the call that repeats; on a GPU it replays a CUDA graph
  captured per (batch bucket, width bucket, commit width bucket, key bucket) at warm-up, and a
  bucket not captured runs called. An engine step in which every live row refreshes (a lone
  request, or requests in lockstep) makes the same call of the rows' refresh slots, with graphs
  of its own (``refresh``, where warm-up captured one): a called refresh's ~800 launches left
  the GPU idle (a lone 8B request on an H200: 1279 ms with its refreshes called, 906 ms
  replayed). A step call with rows decoding with delayed KV (``delayed``) first packs each such
  row's step slots that can change to the front (``paradec.decoding.delayed``; the other rows
  keep all of theirs), on the device, so it replays as a graph of its own too. The key buckets
  keep short requests in long rows from attending over every slot of the row (a served
  LLaDA-8B row holds 4k + 4k slots; a 512-token prompt and its canvas use 1.5k). Every graph
  writes its logits into one buffer (``reserve``), so that the graphs' outputs do not each keep
  [b, commit width, V] of device memory. A step call whose padding
  costs more than its launches runs called with its queries packed (``PackedQueries``: the
  products see only real columns); one of staggered rows (a summary's window beside think
  blocks', rows refreshing) replays a packed graph where warm-up captured one: its real queries
  and padding up to a bucket, their indices in a static buffer (``packed_index``).
- ``forward_rows``: any rows (a prefill, the summary's extension, the refreshes of an engine
  step in which not every live row refreshes or one attends under ``canvas``, unless they join
  a step call busy enough to run called, ``mixed``: each such row then forwards its refresh
  slots there), each run of consecutive rows as a view of the pool. These are wide and rare
  (one per window), so they run called.

A commit takes the logits of some rows at their window's commit columns and runs the score
kernel, the policy's ranking and the selection kernel once per ``CommitClass`` present (the
kernels take the temperature, the rule and its bound as scalars); quotas, floors, seeds, window
counters and EOS filling are per row, with the runner's arithmetic
(``paradec.decoding.step.PhaseSteps``), so a request commits what it commits alone. When every
row of a step call that replayed its graph is of one class, its commit replays too: a graph per
(batch bucket, commit width, class) that warm-up captured, reading the logits buffer (called, a
commit's ~40 launches took ~1 ms a step of a lone 8B request on an H200, synchronised).
"""

from __future__ import annotations

import numpy as np
import torch

from paradec import ops
from paradec.batching.pool import KVPool
from paradec.batching.rows import Rows, to_device
from paradec.batching.sequence import CommitClass
from paradec.decoding import delayed as delayed_kv, policies, sampler
from paradec.decoding.policies import Candidates
from paradec.decoding.step import PENDING, fill_after_eos
from paradec.models.attention import attention_mask
from paradec.models.cache import PackedQueries, PromptCache
from paradec.models.transformer import DiffusionTransformer



class BatchStep:
    def __init__(self, module: DiffusionTransformer, pool: KVPool, rows: Rows, eos_id: int, capture: bool):
        self.module, self.pool, self.rows, self.eos_id, self.capture = module, pool, rows, eos_id, capture
        # (b, width, commit width, keys, refresh, packed to, delayed) -> the graph and its logits (a
        # view of logits_buffer); packed to: None, or the queries a packed graph forwards
        # (``packed_index``); delayed: rows with delayed KV step (their slots packed first)
        self.graphs: dict[tuple[int, int, int, int, bool, int | None, bool],
                          tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if capture else None
        self.logits_buffer: torch.Tensor | None = None  # flat: every graph's logits, a view of its start
        self.commit_graphs: dict[tuple[int, int, CommitClass], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.all_rows = torch.arange(rows.stepping.shape[0], device=rows.device)  # a commit graph's rows: [:b]
        self.active = torch.zeros_like(rows.group_steps, dtype=torch.bool)  # [R, G] groups that committed this step
        self.acting = torch.zeros_like(rows.stepping)  # [R] rows that committed this step
        # a packed step's queries as indices into its flattened [b, width] slots: the real ones,
        # then distinct padding ones up to the call's bucket (what a packed graph reads)
        self.packed_index = torch.zeros(rows.stepping.shape[0] * rows.geometry.slots, dtype=torch.long,
                                        device=rows.device)

    # --- forwards -----------------------------------------------------------------------------
    def step_logits(self, b: int, width: int, commit_width: int, keys: int, packed: list[int] | None = None,
                    refresh: bool = False, packed_to: int | None = None, delayed: bool = False,
                    mixed: bool = False) -> torch.Tensor:
        """Logits [b, commit_width, V] of the first b rows' step columns (``refresh``: refresh
        columns; ``delayed``: a delayed-KV row's those that can change, ``width`` at most;
        ``mixed``: the ``refreshing`` rows' refresh columns, called; rows not ``stepping``
        forward padding only), attending over their first ``keys``
        slots (past every row's keys: ``key_width``): a graph replay where one was captured for
        these buckets, else called. ``packed``: each row's real columns (0 for a row not
        stepping): the queries packed (``PackedQueries``), no padding forwarded but in attention
        (called), or with ``packed_to`` padding up to that many queries in all (a packed graph's
        bucket: replayed where warm-up captured it)."""
        if packed_to is not None:
            self._pack(packed, width, packed_to)
        key = (b, width, commit_width, keys, refresh, packed_to, delayed)
        if (packed is None or packed_to is not None) and key in self.graphs:
            graph, logits = self.graphs[key]
            graph.replay()
            return logits
        return self._step_body(b, width, commit_width, keys, packed, refresh, packed_to, delayed, mixed)

    def reserve(self, logits: int) -> None:
        """The graphs' logits buffer: room for ``logits`` rows of V (the most a graph captured
        next writes, b * commit width), before capturing. A graph keeps the buffer it was
        captured with; a larger one later is new memory (warm-up reserves once, for all)."""
        weight = self.module.lm_head.weight  # [V, d]: the logits' width and dtype
        if self.logits_buffer is None or self.logits_buffer.numel() < logits * weight.shape[0]:
            self.logits_buffer = weight.new_empty(logits * weight.shape[0])

    def capture_step(self, b: int, width: int, commit_width: int, keys: int, refresh: bool = False,
                     packed_to: int | None = None, delayed: bool = False) -> None:
        """Captures the step call (``refresh``: of refresh slots; ``packed_to``: of that many
        packed queries, ``step_logits``) for these buckets (warm-up, on an idle engine: never
        while serving). The state it reads is put back: the warm-up runs write keys into the
        rows' scratch slots only (no row steps), and commit nothing. The logits land in the
        reserved buffer (``reserve``; reserved here when too small)."""
        key = (b, width, commit_width, keys, refresh, packed_to, delayed)
        if not self.capture or key in self.graphs:
            return
        self.reserve(b * commit_width)
        stepping = self.rows.stepping.clone()
        self.rows.stepping.zero_()
        if packed_to is not None:
            self._pack([0] * b, width, packed_to)  # padding only (no row steps); replays fill it first
        body = dict(refresh=refresh, packed_to=packed_to, delayed=delayed)
        for _ in range(2):
            self._step_body(*key[:4], **body)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = self._step_body(*key[:4], **body)
            out = self.logits_buffer[: logits.numel()].view(logits.shape)
            out.copy_(logits)  # the body's own logits are freed after capture, for the next graph's use
        del logits
        self.rows.stepping.copy_(stepping)
        self.graphs[key] = (graph, out)

    def commit_step(self, b: int, commit_width: int, cls: CommitClass, logits: torch.Tensor) -> bool:
        """Replays the commit of the first b rows' step ``logits`` (what a replayed step graph
        returned: a view of the logits buffer) for rows ``stepping``, all of class ``cls``.
        False, committing nothing, when warm-up captured no such graph or the graph reads other
        memory than ``logits`` (a buffer reserved anew since): the caller commits called."""
        graph, read = self.commit_graphs.get((b, commit_width, cls), (None, None))
        if graph is None or read.data_ptr() != logits.data_ptr() or read.shape != logits.shape:
            return False
        graph.replay()
        return True

    def capture_commit(self, b: int, commit_width: int, cls: CommitClass) -> None:
        """Captures the commit of a replayed step call's logits for rows of class ``cls`` (warm-up,
        on an idle engine: no row has a masked commit column, so the runs commit nothing)."""
        key = (b, commit_width, cls)
        if not self.capture or key in self.commit_graphs:
            return
        self.reserve(b * commit_width)
        vocab = self.module.lm_head.weight.shape[0]
        logits = self.logits_buffer[: b * commit_width * vocab].view(b, commit_width, vocab)
        index = self.all_rows[:b]
        self.commit(index, logits, cls, stepping_only=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            self.commit(index, logits, cls, stepping_only=True)
        self.begin()
        self.commit_graphs[key] = (graph, logits)

    def release(self) -> None:
        for graph, _ in self.graphs.values():
            graph.reset()
        for graph, _ in self.commit_graphs.values():
            graph.reset()
        self.graphs.clear()
        self.commit_graphs.clear()

    def _step_body(self, b: int, width: int, commit_width: int, keys: int, packed: list[int] | None = None,
                   refresh: bool = False, packed_to: int | None = None, delayed: bool = False,
                   mixed: bool = False) -> torch.Tensor:
        rows = self.rows
        stepping = rows.stepping[:b, None]
        if delayed:
            table = self._delayed_slots(b, width, rows.refreshing[:b] if mixed else None)
        else:
            table = (rows.refresh_slots if refresh else rows.step_slots)[:b, :width]
        if mixed:  # some rows refresh in this step call: their refresh slots
            table = torch.where(rows.refreshing[:b, None], rows.refresh_slots[:b, :width], table)
        # [b, T]; padding queries write the last slot attended over (past every row's keys)
        slots = torch.where(stepping, table, keys - 1)
        slots = torch.where(slots == rows.geometry.scratch, keys - 1, slots)
        kv = self.pool.kv[:, :, :b, :, :keys]  # a view: writes land in the pool
        if packed_to is not None:
            real = self.packed_index[:packed_to]  # as ``_pack`` left it
        else:
            real = None if packed is None else self._real(packed, width)
        hidden, positions, segments, cache = self._forward(slice(0, b), kv, slots, keys, real=real)
        valid = rows.commit_valid[:b, :commit_width] & stepping
        return self._logits(slice(0, b), hidden, positions, segments, cache, valid, commit_width)

    def _delayed_slots(self, b: int, width: int, refreshing: torch.Tensor | None = None) -> torch.Tensor:
        """[b, width] the first b rows' step slots to forward: a delayed-KV row's that can change
        (``paradec.decoding.delayed.needed``) first, in order, then scratch; another row's all
        (``refreshing`` [b]: rows whose refresh slots the call forwards instead)."""
        rows = self.rows
        c = rows.canvas.shape[1]
        table = rows.step_slots[:b]  # [b, S]
        valid = table != rows.geometry.scratch
        cols = (table - rows.prompt_lens[:b, None]).clamp(0, c - 1)  # [b, S] their canvas columns (a delayed row's)
        canvas = rows.canvas[:b]
        keep = delayed_kv.needed(canvas.gather(1, cols), rows.trace[:b].gather(1, cols), rows.step[:b, None],
                                 rows.mask_id, valid, canvas.gather(1, (cols + 1).clamp(max=c - 1)),
                                 rows.step_successor[:b], rows.step_always[:b])
        keep = torch.where(rows.delayed[:b, None], keep, valid)
        if not self.capture:  # (rows that still commit: a no-op step past a window's end may drop some)
            masked = (canvas.gather(1, rows.commit_cols[:b]) == rows.mask_id) & rows.commit_valid[:b]
            live = rows.stepping[:b] & masked.any(1)
            delayed_kv.check_width(keep, width, live if refreshing is None else live & ~refreshing)
        return delayed_kv.compact(table, keep, width, rows.geometry.scratch)

    def forward_rows(self, index: list[int], queries: list[list[int]], commit_width: int | None) -> torch.Tensor | None:
        """Forwards each listed row's query slots (scratch-padded to the longest of a call) and,
        with ``commit_width``, returns logits [b, commit_width, V] at the rows' commit columns, in
        ``index``'s order. Consecutive rows run as one call over a view of the pool (a row's KV
        is 2 * L * Hkv * S * D values, 0.8 GB at LLaDA-8B's: a gather and put-back of it cost
        more than a refresh's launches)."""
        runs, start = [], 0
        for i in range(1, len(index) + 1):
            if i == len(index) or index[i] != index[i - 1] + 1:
                runs.append((start, i))
                start = i
        logits = [self._forward_run(index[a], queries[a:b], commit_width) for a, b in runs]
        return None if commit_width is None else torch.cat(logits)

    def _forward_run(self, first: int, queries: list[list[int]], commit_width: int | None) -> torch.Tensor | None:
        """``forward_rows`` for pool rows [first, first + len(queries))."""
        rows, device = self.rows, self.rows.device
        at = slice(first, first + len(queries))
        width = max(map(len, queries))
        slots = to_device([q + [rows.geometry.scratch] * (width - len(q)) for q in queries], device)
        keys = self.key_width(at)
        kv = self.pool.kv[:, :, at, :, :keys]  # [L, 2, b, Hkv, K, D], a view: the rows' keys and one spare slot
        slots = torch.where(slots == rows.geometry.scratch, keys - 1, slots)  # padding queries write the spare
        lengths = [len(q) for q in queries]
        real = self._real(lengths, width) if sum(lengths) < len(queries) * width else None
        hidden, positions, segments, cache = self._forward(at, kv, slots, keys, real=real)
        arange = torch.arange(len(queries), device=device)
        last = slots == rows.hidden_slot[at, None]  # the prompt's last token, or the extension's, if forwarded
        state = hidden[arange, last.float().argmax(1)]
        rows.last_hidden[at] = torch.where(last.any(1)[:, None], state, rows.last_hidden[at])
        if commit_width is None:
            return None
        return self._logits(at, hidden, positions, segments, cache, rows.commit_valid[at, :commit_width], commit_width)

    def prefill_layers(self, row: int, queries: list[int], layers: slice, x: torch.Tensor | None) -> torch.Tensor:
        """One row's prefill (its prompt slots ``queries``) through ``layers`` only, from ``x``
        [1, P, d], the hidden state before them (None: the embedded prompt), writing their keys
        and values into the row: a long prompt's prefill in layer chunks over several engine
        steps, exact (a bidirectional prompt cannot be split by tokens). Returns the hidden
        state after them; after the last layer the row's last prompt state is kept as well."""
        rows, device = self.rows, self.rows.device
        at = slice(row, row + 1)
        keys = self.key_width(at)
        slots = to_device([queries], device)
        hidden, *_ = self._forward(at, self.pool.kv[:, :, at, :, :keys], slots, keys, x, layers)
        if layers.stop is None or layers.stop >= len(self.module.layers):
            rows.last_hidden[row] = hidden[0, len(queries) - 1]
        return hidden

    def key_width(self, at) -> int:
        """Slots a call over rows ``at`` attends over: every row's keys and one slot past the
        longest row's, a key of none, where its padding queries write."""
        return min(int(self.rows.extent[at].max()) + 1, self.rows.geometry.slots)

    def _pack(self, lengths: list[int], width: int, n: int) -> None:
        """``packed_index[:n]``: the real queries of rows padded to ``width`` (row i's first
        ``lengths[i]`` columns, as indices into the flattened [b, width] layout), then the first
        padding ones, distinct, up to ``n`` (their keys go to the spare slot, their outputs are
        never read)."""
        b = len(lengths)
        real = np.arange(width)[None, :] < np.asarray(lengths)[:, None]  # [b, width]
        if not int(real.sum()) <= n <= b * width:
            raise ValueError(f"{int(real.sum())} real queries cannot pack into {n} of {b} x {width}")
        index = np.concatenate((np.flatnonzero(real), np.flatnonzero(~real)))[:n]
        self.packed_index[:n].copy_(to_device(torch.from_numpy(index), self.rows.device))

    def _real(self, lengths: list[int], width: int) -> torch.Tensor:
        """[N] the real queries of rows padded to ``width``, as indices into the flattened
        [b, width] layout: row i's first ``lengths[i]`` columns."""
        real = torch.cat([torch.arange(n) + i * width for i, n in enumerate(lengths)])
        return to_device(real, self.rows.device)

    def _forward(self, at, kv: torch.Tensor, slots: torch.Tensor, width: int, x: torch.Tensor | None = None,
                 layers: slice = slice(None), real: torch.Tensor | None = None):
        """The model over rows ``at`` (a slice or index tensor) whose first ``width`` slots are
        ``kv`` (a padding query's slot is the last of them, or the scratch slot): its ``layers``
        on ``x``, the hidden state before the first of them (None: the embedded ids). ``real``:
        [N] the real queries' indices in the flattened [b, T] slots (the rest padding): only they
        are forwarded (``PackedQueries``, from the embedded ids: not with ``x``); the hidden
        state of a padding query is then zero."""
        rows, module = self.rows, self.module
        rows.ids.scatter_(1, rows.canvas_slots, rows.canvas)  # the canvas as committed so far, after each prompt
        ids, positions, segments = (x[at].gather(1, slots) for x in (rows.ids, rows.positions, rows.segments))
        keys = rows.segments[at, :width]  # [b, K]
        mask = torch.where(rows.canvas_attention[at, None, None, None], attention_mask(segments, keys, "canvas"),
                           attention_mask(segments, keys, "isolated"))
        cache = PromptCache(kv=kv, segments=keys, lengths=rows.hidden_slot[at] + 1,  # (a slot is its position)
                            last_hidden=rows.last_hidden[at])
        if real is None:
            x = module.embed(ids.clamp(min=0)) if x is None else x
            hidden, _ = module.run_layers(x, positions, mask, cache, slots, segments, layers)
            return hidden, positions, segments, cache
        b, t = slots.shape
        packed = PackedQueries(rows=real // t, slots=slots.reshape(-1)[real], padded=real, batch=b, width=t)
        x = module.embed(ids.reshape(-1)[real].clamp(min=0))[None]  # [1, N, d]
        out, _ = module.run_layers(x, positions.reshape(-1)[real][None], mask, cache, packed, segments, layers)
        hidden = out.new_zeros(b * t, out.shape[-1]).index_copy_(0, real, out[0]).view(b, t, -1)
        return hidden, positions, segments, cache

    def _logits(self, at, hidden, positions, segments, cache, valid: torch.Tensor, commit_width: int) -> torch.Tensor:
        rows = self.rows
        logits_at = torch.where(valid, rows.prompt_lens[at, None] + rows.commit_cols[at, :commit_width], -1)
        return self.module.head(self.module.gather_rows(hidden, positions, segments, logits_at, cache, False))

    # --- commits ------------------------------------------------------------------------------
    def begin(self) -> None:
        self.active.zero_()
        self.acting.zero_()

    def commit(self, index: torch.Tensor, logits: torch.Tensor, cls: CommitClass, stepping_only: bool = False) -> None:
        """Commits rows ``index`` ([b] pool rows) of one class from their logits [b, N, V] at
        their commit columns (with ``stepping_only``, only those of the rows ``stepping``: the
        others commit nothing, and what they committed this engine step stands)."""
        rows = self.rows
        b, n, vocab = logits.shape
        g_count = rows.num_groups
        policy = policies.get(cls.policy)
        cols, group = rows.commit_cols[index, :n], rows.commit_groups[index, :n]  # [b, N]
        masked = (rows.canvas[index].gather(1, cols) == rows.mask_id) & rows.commit_valid[index, :n]
        if stepping_only:
            masked = masked & rows.stepping[index, None]
        left = torch.zeros(b, g_count, dtype=torch.long, device=rows.device).scatter_add_(1, group, masked.long())
        active = left > 0  # [b, G]
        masked = masked & active.gather(1, group)
        noise = priority = None
        if cls.temperature > 0:
            noise = self._uniform(index, group, n, sampler.TOKENS, vocab)  # [b * N, V]
        if policy.draws_order:
            priority = self._uniform(index, group, n, sampler.ORDER, 1)[:, 0].float()
        flat = logits.reshape(-1, vocab)
        scores = ops.score(flat, torch.arange(b * n, device=rows.device), rows.mask_id, rows.stop_ids,
                           rows.barred[index, :n].reshape(-1), cls.temperature, noise, cls.sampling, checked=False)
        done, length = rows.window_steps[index], rows.schedule_len[index]  # [b, G]
        scheduled = rows.quotas[index].gather(2, done.clamp(max=rows.quotas.shape[2] - 1)[..., None])[..., 0]
        quota = torch.where(done < length, torch.minimum(scheduled, left), left)
        remaining = (length - done).clamp(min=1)
        budget_floor = torch.where(done < length, (left + remaining - 1) // remaining, left)
        floor = torch.where(rows.budgeted[index, None], budget_floor, torch.ones_like(left))
        floor = torch.where(active, floor.clamp(min=1), 0)
        flat_masked = masked.reshape(-1)
        key = (index[:, None] * g_count + group).reshape(-1)
        positions = rows.prompt_lens[index, None] + cols
        candidates = Candidates(key=key, position=positions.reshape(-1), scores=scores,
                                quota=quota.gather(1, group).reshape(-1), floor=floor.gather(1, group).reshape(-1),
                                priority=priority)
        lowest = torch.finfo(torch.float32).min
        ranking = policy.rank(candidates).float().nan_to_num(nan=lowest, neginf=lowest)
        ranking = torch.where(flat_masked, ranking, -torch.inf)
        confidence = torch.where(flat_masked, scores.confidence, -torch.inf)
        ops.select_commit(rows.canvas, rows.trace, index.repeat_interleave(n), cols.reshape(-1), key, ranking,
                          confidence, candidates.quota, candidates.floor, scores.tokens, policy.rule, cls.param,
                          PENDING, checked=False)
        self.active[index] |= active  # (a row commits once an engine step: at most a refresh's commit stands)
        self.acting[index] |= active.any(1)

    def end(self) -> None:
        """After every commit of the engine step: the committing step's number in the trace, EOS
        filling, the counters."""
        rows = self.rows
        rows.trace.copy_(torch.where(rows.trace == PENDING, rows.step[:, None], rows.trace))
        fill_after_eos(rows.canvas, rows.trace, rows.groups, rows.editable, rows.stop_ids, rows.mask_id,
                       rows.num_groups, self.eos_id, rows.step[:, None], rows.eos_fill[:, None])
        rows.group_steps += self.active.long()
        rows.window_steps += self.active.long()
        rows.step += self.acting.long()

    def _uniform(self, index: torch.Tensor, group: torch.Tensor, n: int, salt: int, width: int) -> torch.Tensor:
        rows = self.rows
        b = index.shape[0]
        seeds = rows.seeds[index, None].expand(b, n).reshape(-1)
        steps = rows.group_steps[index].gather(1, group).reshape(-1)
        return sampler.uniform(seeds, group.reshape(-1), steps, rows.commit_offsets[index, :n].reshape(-1), salt, width)
