"""Continuous batching: an engine that admits requests into the running batch and retires them
as they finish, each with its own settings, in the shape of vLLM's engine API (``add``,
``abort``, ``step``; ``paradec.batching.stream`` wraps it for asyncio).

Every engine step gives each live request one action of its own decode (``Sequence``): new
requests' prefills (at most ``max_prefill_tokens`` prompt tokens a step, so arrivals stall the
others by about one step; a longer prompt runs a chunk of its layers a step, since a
bidirectional prompt cannot be split by tokens exactly), the summary extensions and window
refreshes due (and steps far wider than the others'), and one step call over every live row; in
an engine step where every live row refreshes (a lone request, requests in lockstep), the
refreshes are that step call, and where the step call is busy enough to run called, the
refreshes beside it join it (``MERGED_WORK``). The host then reads which canvas positions are
still masked and each row's step count (one copy a look: after every step, or every few steps
when no request streams, stops or commits by a rule) and moves each request on. A finished
request's row goes back to the pool at once; a waiting request takes it at the next step.

Exactness (DESIGN.md contract 7): a request's tokens and trace equal ``paradec.generate`` of it
alone with the same seed, and so do its steps and nfe as ``generate()`` counts them stepping one
at a time (on a CPU, or with ``cuda_graphs=False``), whatever shares the batch and whenever it
joined: its keys sit in a row of its own, its queries see only its row, and its quotas, seeds
and counters are its own. Bit for bit on a CPU; on a GPU in bf16 only where the kernels are
batch-invariant (``batch_invariant=True``), as for any batch.

Not served here: several sequences per request (``add`` refuses ``num_return_sequences > 1``: add
one request per seed); an answerer, Fast-dLLM's rules and torchrun are ``generate()``'s alone
(``add`` takes none of them).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from paradec.api import (GenerationResult, build_layout, check_model, check_stop, encode_prompt, find_stop, make_result,
                         resolve_config, split_prompts, text_decoder)
from paradec.batching.pool import KVPool, RowGeometry, rows_that_fit
from paradec.batching.rows import Rows, to_device
from paradec.batching.sequence import Action, CommitClass, Sequence
from paradec.batching.step import BatchStep
from paradec.config import GenerationConfig, validate
from paradec.decoding import policies
from paradec.decoding.plan import make_plan
from paradec.decoding.step import captures
from paradec.errors import ConfigError, InputError
from paradec.models.loading import DiffusionModel
from paradec.ops import batch_invariant as bi

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
MAX_STEPS_PER_LOOK = 8  # step calls the host may run before it reads the masks again
# A step forwarding more than WIDE_STEP times the narrowest stepping row's columns and more than
# WIDE_COLUMNS (an unwindowed canvas: every column of its phase, or under canvas attention the
# prompt too) runs in a call of its own rather than widening the step call of every row. A
# narrower one shares the step call (its graph, or packed): NAP think blocks' windows (m x the
# window) beside a summary's (one window) are 4x as wide, and called apart each think row ran
# its steps called (the open-loop benchmark's staggered rows, session 13).
WIDE_STEP = 2
WIDE_COLUMNS = 256
WIDTH_BUCKET = 32  # step and commit widths round up to a multiple of this many columns
# A step call runs called with its queries packed, not as its graph, when its real columns
# alone keep the GPU busy well past the host's launches (PACK_WORK FLOPs: ~1,500 columns of an
# 8B model, ~35 ms of an H200's bf16 products, against an estimated ~12 ms of host time for a
# called 8B forward's ~800 ops) and the graph's padding (rows refreshing this step, a summary's
# window beside think blocks', a batch bucket) costs PACK_SAVING more (~250 columns of an 8B
# model). With the padding rule alone a 32-request batch gained 5 % on the H200, while the
# open-loop benchmark, whose few staggered rows then packed, ran slower than before (one likely
# cause of two; benchmarks/RESULTS.md, session 13).
# paradec-tiny's replayed steps never pack; a step call with no graph (on a CPU, or a shape
# not warmed up) always packs its padding away.
PACK_WORK = 24e12
PACK_SAVING = 4e12
# A step call whose padding reaches PACKED_STEP columns replays a packed graph instead, where
# warm-up captured one: its real columns and padding up to a packed bucket (a multiple of
# PACKED_STEP up to PACKED_FINE columns, of 4 x PACKED_STEP past them) go through the products.
# Rows in different phases pad each other: a NAP summary's window (32 columns) steps beside think
# blocks' (4 x 32), and rows refreshing or prefilling step nothing, so staggered requests (every
# served closed loop, any open loop) forwarded up to ~a quarter of their step columns as padding.
# Buckets stop past PACK_WORK's columns (~1,500 at 8B): a call of more keeps the GPU busy called.
PACKED_STEP = 128
PACKED_FINE = 1024
# Rows refreshing (under ``isolated``) beside rows that step join the step call, each row with
# its own slots, when the call's real columns keep the GPU busy past its launches anyway
# (MERGED_WORK FLOPs, as PACK_WORK): that call runs called with its queries packed, and each
# refresh forwarded apart would cost a called forward's ~800 launches more (staggered rows
# refresh a window apart, a few of them in most engine steps).
MERGED_WORK = PACK_WORK
SMALLEST_KEYS = 256  # the smallest key bucket: the keys a step call attends over double from it up to a row's slots
_QUERIES = {Action.PREFILL: Sequence.prompt_slots, Action.EXTEND: Sequence.extend_slots,
            Action.REFRESH: lambda s: s.columns().refresh, Action.STEP: lambda s: s.columns().step}


@dataclass
class RequestOutput:
    """What ``step`` reports for one request: its progress while it decodes (streamed requests,
    after every step: the steps that committed so far, ``committed`` tokens per group of
    ``lengths``), then once, ``finished``, its ``result``. An aborted request reports nothing more."""

    request_id: str
    step: int
    committed: list[int]
    lengths: list[int]
    finished: bool = False
    result: GenerationResult | None = None


@dataclass
class EngineStats:
    """Counts since the engine started: engine steps; step calls (of which ``refresh_calls``
    forwarded the refreshes of every live row), of which graph replays (``packed_replays`` of
    them packed graphs; the rest ran called: a bucket no warm-up captured, or one whose padding
    was worth packing away) and commit replays (a replayed call of one commit class); query
    columns forwarded per action (real ones; a delayed-KV step's its static width, the needed
    columns and the padding up to it) and by the step calls of steps in all (a replay's padding
    included: buckets, rows not stepping); seconds in ``step``."""

    steps: int = 0
    step_calls: int = 0
    refresh_calls: int = 0
    graph_replays: int = 0
    commit_replays: int = 0
    forwarded: dict[str, int] = field(default_factory=lambda: {a.value: 0 for a in Action})
    step_call_columns: int = 0
    packed_replays: int = 0
    seconds: float = 0.0
    profile: dict[str, float] = field(default_factory=dict)  # with ``profile``: seconds per part of a step


class BatchEngine:
    """Decodes many requests at once on one model (one device).

    max_batch: rows decoded at once, capped by the KV rows that ``kv_memory_fraction`` of free
    device memory holds (``kv_rows`` caps it further). max_prompt_tokens / max_canvas_tokens:
    a row's geometry; longer requests are refused. max_blocks: think blocks a canvas may have.
    cuda_graphs: replay step calls as CUDA graphs captured by ``warm_up``. batch_invariant: the
    kernel mode of every call (None: the process's); a request asking for the other is refused.
    profile: synchronise the device between the parts of a step and add up their seconds in
    ``stats.profile`` (slows the engine; for finding where a step's time goes).
    key_buckets_per_octave: the key widths step calls are captured for (``key_buckets``): more
    waste less attention on keys past the rows' (a 1,571-key row attends over 2,048 at 1, over
    1,728 at 4) and capture that many times the step graphs at warm-up.
    """

    def __init__(self, model: DiffusionModel, *, max_batch: int = 8, max_prompt_tokens: int = 1024,
                 max_canvas_tokens: int = 2048, max_blocks: int = 16, max_prefill_tokens: int = 4096,
                 kv_memory_fraction: float = 0.8, kv_rows: int | None = None, cuda_graphs: bool = True,
                 batch_invariant: bool | None = None, profile: bool = False, key_buckets_per_octave: int = 1):
        check_model(model)
        for name, value in (("max_batch", max_batch), ("max_prompt_tokens", max_prompt_tokens),
                            ("max_canvas_tokens", max_canvas_tokens), ("max_blocks", max_blocks),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if type(key_buckets_per_octave) is not int or key_buckets_per_octave not in range(1, 9):
            raise ConfigError(f"key_buckets_per_octave must be an int in [1, 8], got {key_buckets_per_octave!r}")
        if isinstance(kv_memory_fraction, bool) or not isinstance(kv_memory_fraction, (int, float)) \
                or not 0 < kv_memory_fraction <= 1:
            raise ConfigError(f"kv_memory_fraction must be a number in (0, 1], got {kv_memory_fraction!r}")
        for name, value in (("cuda_graphs", cuda_graphs), ("profile", profile)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}")
        if batch_invariant is not None and not isinstance(batch_invariant, bool):
            raise ConfigError(f"batch_invariant must be None, True or False, got {batch_invariant!r}")
        if kv_rows is not None and (isinstance(kv_rows, bool) or not isinstance(kv_rows, int) or kv_rows < 1):
            raise ConfigError(f"kv_rows must be None or an int >= 1, got {kv_rows!r}")
        self.model, self.module = model, model.module
        self.decode_text = text_decoder(model)
        self.max_blocks, self.max_prefill_tokens = max_blocks, max_prefill_tokens
        self.batch_invariant, self.profile = batch_invariant, profile
        cfg, device = self.module.cfg, model.device
        self.geometry = RowGeometry(max_prompt_tokens, max_canvas_tokens)
        self.key_buckets = key_buckets(self.geometry.slots, key_buckets_per_octave)
        fit = rows_that_fit(cfg, self.geometry, model.dtype, device, kv_memory_fraction)
        rows = min(x for x in (max_batch, fit, kv_rows) if x is not None)
        self.pool = KVPool(cfg, self.geometry, rows, self.module.embed.weight)
        spec = model.spec
        self.rows = Rows(rows, self.geometry, max_blocks + 1, cfg.hidden_size, spec.mask_id,
                         spec.pad_id if spec.pad_id is not None else 0, spec.stop_ids, model.dtype, device)
        self.capture = captures(GenerationConfig(cuda_graphs=cuda_graphs), device)
        self.calls = BatchStep(self.module, self.pool, self.rows, spec.eos_id, self.capture)
        self.column_flops = 2 * sum(p.numel() for p in self.module.layers.parameters())  # a query's products
        self.waiting: deque[Sequence] = deque()
        self.live: list[Sequence] = []  # live[i] decodes in pool row i
        self.ids: set[str] = set()
        self.stats = EngineStats()

    @property
    def max_batch(self) -> int:
        return self.pool.rows

    # --- requests -----------------------------------------------------------------------------
    def add(self, request_id: str, prompt, config: GenerationConfig | Mapping | None = None, *, stream: bool = False,
            **overrides) -> Sequence:
        """Queues one request (a prompt as ``generate`` takes one) with its own settings; checks
        everything now: a bad setting, a prompt or canvas a row cannot hold, an id that is not a
        non-empty string or is in use raise ``ConfigError`` / ``InputError`` naming it, and
        nothing is queued."""
        check_request_id(request_id)
        if request_id in self.ids:
            raise InputError(f"request id {request_id!r} is already in use")
        if not isinstance(stream, bool):
            raise InputError(f"stream must be True or False, got {stream!r}")
        config = resolve_config(self.model, _checked(config), **overrides)
        if config.num_return_sequences != 1:
            raise ConfigError("num_return_sequences must be 1 in the batching engine: add one request per sequence, "
                              "request i with seed + i")
        check_stop(self.model, config)
        layout = self.layout_for(config)
        ids = encode_prompt(self.model, prompt, config, layout)
        if len(ids) > self.geometry.max_prompt:
            raise InputError(f"the prompt is {len(ids)} tokens; this engine's rows hold max_prompt_tokens="
                             f"{self.geometry.max_prompt}")
        validate(config, layout=layout, prompt_tokens=len(ids), max_length=self.model.spec.max_length)
        plan = make_plan(config, layout, self.module.shift_logits)
        seq = Sequence(request_id, ids, config, layout, plan, stream=stream)
        self.waiting.append(seq)
        self.ids.add(request_id)
        return seq

    def layout_for(self, config: GenerationConfig):
        """The canvas layout a request of (resolved) ``config`` takes in a row, or a ``ConfigError``
        / ``InputError`` naming what this engine's rows cannot decode: a kernel mode other than the
        engine's, more think blocks than ``max_blocks``, a canvas past ``max_canvas_tokens``."""
        mode = bi.enabled() if self.batch_invariant is None else self.batch_invariant
        if config.batch_invariant is not None and config.batch_invariant != mode:
            whose = " (the process's mode: BatchEngine(batch_invariant=None))" if self.batch_invariant is None else ""
            raise ConfigError(f"batch_invariant={config.batch_invariant} but this engine decodes with "
                              f"batch_invariant={mode}{whose}")
        geo = self.geometry
        # the row's bounds before the canvas is built (a canvas of 10**9 tokens would take the memory first)
        if config.canvas and config.blocks > self.max_blocks:
            raise ConfigError(f"blocks={config.blocks}; this engine decodes at most max_blocks={self.max_blocks}")
        if config.body_tokens > geo.max_canvas:
            raise InputError(f"the canvas holds {config.body_tokens} body tokens; this engine's rows hold "
                             f"max_canvas_tokens={geo.max_canvas}")
        layout = build_layout(self.model, config)
        if layout.length > geo.max_canvas:
            raise InputError(f"the canvas is {layout.length} tokens; this engine's rows hold max_canvas_tokens="
                             f"{geo.max_canvas}")
        if layout.num_think_blocks > self.max_blocks:
            raise ConfigError(f"blocks={layout.num_think_blocks}; this engine decodes at most max_blocks="
                              f"{self.max_blocks}")
        return layout

    def abort(self, request_id: str) -> bool:
        """Stops a request (waiting or decoding); its row is free at once. False when unknown."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self.ids.discard(request_id)
                return True
        for seq in self.live:
            if seq.request_id == request_id:
                self._retire(seq)
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.live)

    def warm_up(self, configs: Iterable[GenerationConfig | Mapping | None] = (None,)) -> int:
        """Captures the step call's CUDA graphs for every batch bucket, every pair of step and
        commit widths the windows of ``configs`` use (None: the model's defaults) and every key
        bucket (``key_buckets``) a row holding one of their canvases can need, so that serving
        captures nothing; a bucket met later runs called (so does a ``canvas``-attention request
        without a window, whose steps forward its prompt: their width depends on the prompt),
        the same call of the windows' refreshes (under ``isolated`` attention: every live row
        refreshing at once) where its columns stay within ``PACK_WORK`` (past it a called
        forward keeps the GPU busy; at LLaDA-8B's size that is one row's full refresh, and
        refresh graphs for every batch bucket ran a served 8B engine out of memory on an H200),
        the step calls' packed graphs (``PACKED_STEP``; at the key buckets of rows holding the
        widest canvas, from ``least_packed`` of the call's width) and the commit of a step call
        for every batch bucket, commit width and ``CommitClass`` of ``configs``. On an idle
        engine. Returns the step graphs captured (0 on a CPU or with ``cuda_graphs=False``)."""
        if self.has_unfinished():
            raise ConfigError("warm_up runs on an idle engine: finish or abort the requests added first")
        # on every device: a config no request could decode is refused, not captured for
        configs = [resolve_config(self.model, _checked(config)) for config in _config_list(configs)]
        layouts = [self.layout_for(config) for config in configs]
        if not self.capture:
            return 0
        # (width, commit width) of each window's steps, of its refreshes that can run together and
        # of its delayed-KV steps (each step's bound), by (refresh, delayed)
        shapes = {(False, False): set(), (True, False): set(), (False, True): set()}
        canvas, widest = self.geometry.max_canvas, 0
        classes = set()
        geo = self.geometry
        for config, layout in zip(configs, layouts):
            classes.add(CommitClass.of(config))
            canvas, widest = min(canvas, layout.length), max(widest, layout.length)
            seq = Sequence("warm-up", [0], config, layout, make_plan(config, layout, self.module.shift_logits))
            for seq.phase, phase in enumerate(seq.plan.phases):
                for seq.window in range(seq.plan.num_windows(phase)):
                    columns, commit = seq.columns(), _round_up(len(seq.columns().commit), geo.max_canvas)
                    shapes[False, False].add((_round_up(len(columns.step), geo.slots), commit))
                    if seq.plan.windowed_cache and seq.isolated:
                        shapes[True, False].add((_round_up(len(columns.refresh), geo.slots), commit))
                    if seq.delayed:
                        seq.action = Action.STEP
                        for seq.window_step in range(1, max(map(len, columns.schedules.values())) + 1):
                            shapes[False, True].add((_round_up(seq.step_width(), geo.slots), commit))
        buckets = sorted({_bucket(n, self.pool.rows) for n in range(1, self.pool.rows + 1)})
        # a row's keys end past its canvas and a prompt token at least, and one spare slot follows
        keys = [k for k in self.key_buckets if k >= canvas + 2]
        # packed graphs only where the widest canvas's rows attend (~4x fewer graphs): padding
        # costs most in the longest calls, and shorter rows' calls replay padded as before
        packed_keys = [k for k in keys if k >= widest + 2]
        if shapes[False, True]:  # a delayed row's call may hold other rows too
            shapes[False, True] |= shapes[False, False]
        commits = {c for pairs in shapes.values() for _, c in pairs}
        before = len(self.calls.graphs)
        self.calls.reserve(max(buckets) * max(commits))
        most = PACK_WORK / self.column_flops  # (the most columns a packed graph need hold)
        with torch.no_grad(), self._kernel_mode():
            for (refresh, delayed), pairs in shapes.items():
                for b, (width, commit_width), k in itertools.product(buckets, sorted(_closed(pairs)), keys):
                    # (a wider call forwards slots past the keys: no row has such a window)
                    if width <= k and not (refresh and b * width * self.column_flops > PACK_WORK):
                        self.calls.capture_step(b, width, commit_width, k, refresh, delayed=delayed)
                        packed = [] if refresh or k not in packed_keys else packed_buckets(b * width, most)
                        least = least_packed(width)
                        for n in (n for n in packed if n >= least):
                            self.calls.capture_step(b, width, commit_width, k, refresh, n, delayed)
            for b, commit_width, cls in itertools.product(buckets, commits, classes):
                self.calls.capture_commit(b, commit_width, cls)
        return len(self.calls.graphs) - before

    # --- the loop -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """One engine step: admits waiting requests into free rows, runs one action of every live
        request, and returns their progress and the results of those that finished. If it raises,
        every request that was live is dropped (its state is half a step); waiting ones stay."""
        with self._kernel_mode():
            try:
                return self._step()
            except BaseException:
                # a step cut short leaves its rows half committed: the live requests are dropped
                # (their ids freed; the caller hears of it from this exception), those waiting stay
                for seq in list(self.live):
                    self._retire(seq)
                raise

    def _kernel_mode(self):
        """The engine's kernel mode for its calls (the process's when ``batch_invariant`` is None)."""
        return contextlib.nullcontext() if self.batch_invariant is None else bi.batch_invariant(self.batch_invariant)

    def generate(self, prompts: Iterable, configs: Iterable[GenerationConfig | Mapping | None] | None = None, *,
                 attention_mask=None, **overrides) -> list[GenerationResult]:
        """Adds ``prompts`` (one prompt or a list, as ``paradec.generate`` takes them, with its
        ``attention_mask``) and steps until they are done: a list of results in order. Without
        ``configs`` they share the overrides' settings and, as in ``paradec.generate``, prompt i
        decodes with ``seed + i``; ``configs`` gives each prompt its own (seed included). For an
        idle engine (the results of other requests would be lost here); if one prompt is refused,
        none is decoded."""
        if self.has_unfinished():
            raise ConfigError("BatchEngine.generate runs on an idle engine: step the requests already added "
                              "(or abort them) first")
        # one prompt (a text, token ids, chat messages) is a list of one; no prompts, no results
        prompts = [] if isinstance(prompts, list) and not prompts else split_prompts(prompts, attention_mask)[1]
        # one config for all: prompt i draws from seed + i, as generate()'s row i does
        seed = resolve_config(self.model, **overrides).seed if configs is None else None
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None  # else add() refuses it
        configs = _config_list(configs) if configs is not None else [None] * len(prompts)
        if len(configs) != len(prompts):
            raise ConfigError(f"configs must give one config per prompt: {len(configs)} for {len(prompts)} prompts")
        names = [f"generate-{time.perf_counter_ns()}-{i}" for i in range(len(prompts))]
        try:
            for i, (name, prompt, config) in enumerate(zip(names, prompts, configs)):
                self.add(name, prompt, config, **(overrides if seed is None else {**overrides, "seed": seed + i}))
        except BaseException:
            for name in names:
                self.abort(name)
            raise
        results = {}
        try:
            while len(results) < len(names):
                for out in self.step():
                    if out.finished:
                        results[out.request_id] = out.result
        except BaseException:  # a step that raised (or an interrupt): none of these stays queued
            for name in names:
                self.abort(name)
            raise
        return [results[n] for n in names]

    def _step(self) -> list[RequestOutput]:
        started = self._clock = time.perf_counter()
        self._admit()
        live, calls = self.live, self.calls
        by_action: dict[Action, list[Sequence]] = {a: [] for a in Action}
        for seq in live:
            by_action[seq.action].append(seq)
        loading = [s for s in by_action[Action.REFRESH] + by_action[Action.STEP] if s.loaded != s.window_key]
        self.rows.load_windows([(seq.row, seq.columns()) for seq in loading])
        for seq in loading:
            seq.loaded = seq.window_key
        self._mark("admit")
        calls.begin()
        by_action[Action.PREFILL] = self._prefill_chunks(by_action[Action.PREFILL])
        stepping = by_action[Action.STEP]
        narrowest = min((len(s.columns().step) for s in stepping), default=0)
        # (a delayed-KV row's step is packed on the device: always in the step call)
        wide = [s for s in stepping
                if not s.delayed and len(s.columns().step) > max(WIDE_STEP * narrowest, WIDE_COLUMNS)]
        by_action[Action.STEP] = [s for s in stepping if s not in wide]
        refreshing = by_action[Action.REFRESH]
        together = len(refreshing) == len(live) and all(s.isolated for s in refreshing)
        if refreshing and together:  # every live row refreshes (a lone request, or in lockstep): one step call
            self._step_call(refreshing, Action.REFRESH)
        merged = [] if together else self._merged_refreshes(by_action[Action.STEP], refreshing)
        apart = [] if together else [s for s in refreshing if s not in merged]
        for action, seqs in ((Action.PREFILL, by_action[Action.PREFILL]), (Action.EXTEND, by_action[Action.EXTEND]),
                             (Action.REFRESH, apart), (Action.STEP, wide)):
            if not seqs:
                continue
            width = self._commit_width(seqs) if action in (Action.REFRESH, Action.STEP) else None
            if action is Action.EXTEND:  # its last slot's state predicts a headerless summary's first token
                device = self.rows.device  # (device indices: a host list would sync with the stream)
                self.rows.hidden_slot.index_copy_(0, to_device([s.row for s in seqs], device),
                                                  to_device([s.extend_slots()[-1] for s in seqs], device))
            logits = calls.forward_rows([s.row for s in seqs], [_QUERIES[action](s) for s in seqs], width)
            self._mark(action.value)
            if logits is not None:
                self._commit(seqs, logits, list(range(len(seqs))))
                self._mark("commit")
        repeats = 1
        if by_action[Action.STEP]:
            repeats = self._repeats(by_action[Action.STEP])
            self._step_call(by_action[Action.STEP], refreshing=merged)
        for action, seqs in by_action.items():
            if action is Action.STEP:
                self.stats.forwarded[action.value] += sum(s.step_width(r) for s in seqs for r in range(repeats))
            else:
                self.stats.forwarded[action.value] += sum(len(_QUERIES[action](s)) for s in seqs)
        self.stats.forwarded[Action.STEP.value] += sum(len(s.columns().step) for s in wide)
        calls.end()
        for ahead in range(1, repeats):  # more steps before the host looks: no row's window can end before
            calls.begin()
            self._step_call(by_action[Action.STEP], ahead=ahead)
            calls.end()
        self._mark("end")
        for _ in range(repeats):
            for seq in live:
                seq.acted()
        n = len(live)
        looked = torch.cat((self.rows.masked(n).int(), self.rows.step[:n, None].int()), 1).cpu()  # the one sync
        masked, steps = looked[:, :-1].bool(), looked[:, -1].tolist()
        self._mark("sync")
        outputs = []
        for seq, row in [(s, s.row) for s in live]:  # rows as read: a finished request's row takes another
            seq.steps = steps[row]
            if seq.config.stop and self._stopped(seq, masked[row]):
                seq.action = None  # its answer text holds a stop string: done, as generate() stops early
            else:
                seq.advance(masked[row])
            if seq.finished:
                outputs.append(self._finish(seq, masked[row]))
            elif seq.stream:
                outputs.append(RequestOutput(seq.request_id, seq.steps, _committed(seq, masked[row]), _lengths(seq)))
        self.stats.steps += repeats
        self.stats.seconds += time.perf_counter() - started
        self._mark("advance")
        return outputs

    def _prefill_chunks(self, prefilling: list[Sequence]) -> list[Sequence]:
        """Runs the prefills longer than ``max_prefill_tokens`` a chunk of layers each (as many
        as keep a step's prefill work within that many tokens through every layer), so that a
        long prompt stalls the others by about one step at a time; returns the prefills that
        fit whole, which run batched."""
        layers = len(self.module.layers)
        whole = []
        for seq in prefilling:
            chunk = max(1, min(layers, self.max_prefill_tokens * layers // len(seq.prompt_ids)))
            if seq.prefill_layer == 0 and chunk == layers:
                whole.append(seq)
                continue
            end = min(layers, seq.prefill_layer + chunk)
            hidden = self.calls.prefill_layers(seq.row, seq.prompt_slots(), slice(seq.prefill_layer, end),
                                               seq.prefill_hidden)
            self.stats.forwarded[Action.PREFILL.value] += len(seq.prompt_ids) * (end - seq.prefill_layer) // layers
            seq.prefill_layer, seq.prefill_hidden = end, (hidden if end < layers else None)
        self._mark("prefill")
        return whole

    def _repeats(self, stepping: list[Sequence]) -> int:
        """Step calls to run before the host looks again: more than one only when every live
        request steps with a top-k schedule (no stop strings, no streamed progress), none waits for
        a row, and every window still has
        that many scheduled steps (a window that ends early steps on as a no-op, which changes
        nothing) before a periodic refresh."""
        if len(stepping) != len(self.live) or (self.waiting and len(self.live) < self.pool.rows):
            return 1  # (stop strings are looked for, and progress streams, after every step)
        repeats = MAX_STEPS_PER_LOOK
        for seq in stepping:
            if policies.of(seq.config).check_every is not None or seq.config.stop or seq.stream:
                return 1
            schedules = seq.columns().schedules.values()
            repeats = min(repeats, max(len(s) for s in schedules) - seq.window_step)
            every = seq.config.refresh_every
            if every:
                repeats = min(repeats, every - seq.window_step % every)
        return max(1, repeats)

    def _mark(self, name: str) -> None:
        """With ``profile``: the seconds since the last mark (the device caught up) go to ``name``."""
        if not self.profile:
            return
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        now = time.perf_counter()
        self.stats.profile[name] = self.stats.profile.get(name, 0.0) + now - self._clock
        self._clock = now

    def _admit(self) -> None:
        # a long prompt's prefill in layer chunks takes a step's budget until its last chunk
        chunking = any(s.prefill_hidden is not None for s in self.live)
        budget = 0 if chunking else self.max_prefill_tokens
        while self.waiting and len(self.live) < self.pool.rows:
            seq = self.waiting[0]
            if seq.isolated and len(seq.prompt_ids) > budget and budget < self.max_prefill_tokens:
                break  # this step's prefills are full; it comes in next step
            self.waiting.popleft()
            if seq.isolated:
                budget -= len(seq.prompt_ids)
            seq.row = len(self.live)
            seq.started = time.perf_counter()
            self.live.append(seq)
            self.rows.admit(seq.row, seq, seq.config.seed)

    def _merged_refreshes(self, stepping: list[Sequence], refreshing: list[Sequence]) -> list[Sequence]:
        """The refreshing rows that join this engine step's step call (``MERGED_WORK``): under
        ``isolated`` attention (a ``canvas`` row's refresh forwards its prompt, whose last state
        ``forward_rows`` keeps), when rows step too and the call's columns are worth it."""
        merged = [s for s in refreshing if s.isolated]
        if not (stepping and merged):
            return []
        columns = sum(s.step_width() for s in stepping) + sum(len(s.columns().refresh) for s in merged)
        return merged if columns * self.column_flops >= MERGED_WORK else []

    def _step_call(self, seqs: list[Sequence], action: Action = Action.STEP, ahead: int = 0,
                   refreshing: list[Sequence] = ()) -> None:
        """One call over the first b live rows (a batch bucket), stepping ``seqs``: their step
        columns (``ahead``: the step that many after their next, with no look between; a
        delayed-KV row's width follows it), or with ``action`` REFRESH their refresh columns;
        ``refreshing``: rows whose refresh columns the step call forwards too (called, packed)."""
        rows, refresh = self.rows, action is Action.REFRESH
        stepping = torch.zeros(rows.stepping.shape, dtype=torch.bool)
        stepping[[s.row for s in (*seqs, *refreshing)]] = True
        rows.stepping.copy_(to_device(stepping, rows.device))
        if refreshing:
            stepping[[s.row for s in seqs]] = False
            rows.refreshing.copy_(to_device(stepping, rows.device))
        b = _bucket(len(self.live), self.pool.rows)
        lengths = [0] * len(self.live)  # each row's real columns
        for seq in seqs:
            lengths[seq.row] = len(seq.columns().refresh) if refresh else seq.step_width(ahead)
        for seq in refreshing:
            lengths[seq.row] = len(seq.columns().refresh)
        delayed = not refresh and any(s.delayed for s in seqs)
        seqs = [*seqs, *refreshing]
        width = self._bucketed(max(lengths), self.geometry.slots)
        commit_width = self._commit_width(seqs)
        keys = self.calls.key_width(slice(0, b))
        if self.capture:
            keys = next(k for k in self.key_buckets if k >= keys)
        real = sum(lengths)
        padding, packed, packed_to = b * width - real, None, _packed_bucket(real)
        mixed = bool(refreshing)  # (never captured: such a call keeps the GPU busy called)
        graph = not mixed and (b, width, commit_width, keys, refresh, None, delayed) in self.calls.graphs
        packed_graph = not mixed and (b, width, commit_width, keys, refresh, packed_to, delayed) in self.calls.graphs
        worth = padding * self.column_flops >= PACK_SAVING and real * self.column_flops >= PACK_WORK
        if packed_graph:  # the real columns and a bucket's padding through the products, replayed
            packed = lengths + [0] * (b - len(lengths))
        elif padding and (not graph or worth):
            b, packed, packed_to = len(self.live), lengths, None  # called: only the real columns
        else:
            packed_to = None
        replayed = (graph and packed is None) or packed_graph
        self.stats.graph_replays += replayed
        self.stats.packed_replays += packed_graph
        self.stats.step_calls += 1
        self.stats.refresh_calls += refresh
        if not refresh:
            self.stats.step_call_columns += b * width if packed is None else packed_to or real
        logits = self.calls.step_logits(b, width, commit_width, keys, packed, refresh, packed_to, delayed, mixed)
        self._mark(action.value)
        classes = {s.commit_class for s in seqs}  # a replayed step's logits are what a commit graph reads
        if replayed and len(classes) == 1 and self.calls.commit_step(b, commit_width, classes.pop(), logits):
            self.stats.commit_replays += 1
        else:
            self._commit(seqs, logits, [s.row for s in seqs])
        self._mark("commit")

    def _commit(self, seqs: list[Sequence], logits: torch.Tensor, at: list[int]) -> None:
        """Commits ``seqs``, one call per class; ``seqs[i]``'s logits are ``logits[at[i]]``."""
        classes: dict[CommitClass, list[int]] = {}
        for i, seq in enumerate(seqs):
            classes.setdefault(seq.commit_class, []).append(i)
        device = self.rows.device
        for cls, members in classes.items():
            index = to_device([seqs[i].row for i in members], device)
            self.calls.commit(index, logits[to_device([at[i] for i in members], device)], cls)

    def _commit_width(self, seqs: list[Sequence]) -> int:
        return self._bucketed(max(len(s.columns().commit) for s in seqs), self.geometry.max_canvas)

    def _bucketed(self, n: int, limit: int) -> int:
        """A call's width: rounded up to a bucket where graphs replay (a few shapes serve every
        request), exact where steps are called (padding would only add work)."""
        return _round_up(n, limit) if self.capture else n

    # --- leaving ------------------------------------------------------------------------------
    def _finish(self, seq: Sequence, masked: torch.Tensor) -> RequestOutput:
        rows, c = self.rows, seq.layout.length
        canvas, trace = rows.canvas[seq.row, :c].tolist(), rows.trace[seq.row, :c].tolist()
        # nfe: the forwards that committed (= steps, as generate() one step at a time counts); a no-op
        # step of MAX_STEPS_PER_LOOK past a window's early end counts in neither
        seq.nfe = seq.steps
        seq.timings["queued"] = seq.started - seq.arrived
        seq.timings["total"] = time.perf_counter() - seq.started
        result = make_result(self.model, seq.layout, seq.prompt_ids, canvas, trace, _Decoded(seq), True,
                             seq.config.stop)
        self._retire(seq)
        return RequestOutput(seq.request_id, seq.steps, _committed(seq, masked), _lengths(seq), finished=True,
                             result=result)

    def _stopped(self, seq: Sequence, masked: torch.Tensor) -> bool:
        """Whether ``seq`` is done by its stop strings (``generate()``'s test, between steps): the
        committed left-to-right prefix of its answer text holds one and every other group is done."""
        layout = seq.layout
        group = layout.num_think_blocks  # the summary, or the answer region
        start, end = layout.bodies[group]
        if bool((masked[: layout.length] & (layout.groups != group)).any()):
            return False
        open_at = masked[start:end].nonzero()
        committed = int(open_at[0, 0]) if len(open_at) else end - start
        ids = self.rows.canvas[seq.row, start : start + committed].tolist()
        stops = set(self.model.spec.stop_ids)
        ids = ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]
        return find_stop(self.decode_text(ids), seq.config.stop) is not None

    def _retire(self, seq: Sequence) -> None:
        """Frees ``seq``'s row: the last live row moves into it."""
        row, last = seq.row, len(self.live) - 1
        if row != last:
            moved = self.live[last]
            self.pool.move(last, row)
            self.rows.move(last, row)
            moved.row = row
            self.live[row] = moved
        self.live.pop()
        self.rows.clear([last])
        self.ids.discard(seq.request_id)
        seq.row = -1


def check_request_id(request_id) -> None:
    if not isinstance(request_id, str) or not request_id:
        raise InputError(f"request_id must be a non-empty string, got {request_id!r}")


def _checked(config):
    """``config`` if it is a GenerationConfig, a mapping of settings (as ``paradec.generate``
    takes one) or None."""
    if config is not None and not isinstance(config, (GenerationConfig, Mapping)):
        raise ConfigError(f"config must be a GenerationConfig, a mapping of settings or None, got "
                          f"{type(config).__name__} (settings also go as keyword arguments)")
    return config


def _config_list(configs) -> list:
    """``configs`` (an iterable of GenerationConfig, mappings of settings or None) as a list; one
    config, a string or a mapping is refused by name (each would be iterated as configs)."""
    if isinstance(configs, (str, bytes, Mapping, GenerationConfig)) or not isinstance(configs, Iterable):
        raise ConfigError(f"configs must be an iterable of GenerationConfig, mappings of settings or None, got "
                          f"{type(configs).__name__}")
    return list(configs)


@dataclass
class _Decoded:
    """nfe, steps and timings of one request, as ``make_result`` reads them."""

    seq: Sequence

    @property
    def nfe(self) -> int:
        return self.seq.nfe

    @property
    def steps(self) -> int:
        return self.seq.steps

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.seq.timings)


def _committed(seq: Sequence, masked: torch.Tensor) -> list[int]:
    """Tokens committed in each group's body, from the row's ``masked`` [C] (host)."""
    layout = seq.layout
    done = (layout.editable & ~masked[: layout.length]).long()
    return torch.zeros(layout.num_groups, dtype=torch.long).index_add_(0, layout.groups, done).tolist()


def _lengths(seq: Sequence) -> list[int]:
    return [e - s for s, e in seq.layout.bodies]


def _bucket(n: int, limit: int) -> int:
    """The batch bucket of n live rows (never past the pool's ``limit`` rows)."""
    return min(next((b for b in BATCH_BUCKETS if b >= n), n), limit)


def key_buckets(slots: int, per_octave: int = 1) -> list[int]:
    """The key widths step graphs are captured for in rows of ``slots`` slots: ``per_octave``
    widths an octave from ``SMALLEST_KEYS`` (powers of two at 1; else rounded up to a multiple
    of 64), and ``slots`` (a width within an eighth of it is left out)."""
    widths = (SMALLEST_KEYS * 2 ** (i / per_octave) for i in itertools.count())
    buckets = []
    for width in (-(-int(w) // 64) * 64 for w in widths):
        if width + width // 8 >= slots:
            return sorted(set(buckets)) + [slots]
        buckets.append(width)
    raise AssertionError("unreachable: the widths grow past any slots")


def packed_buckets(columns: int, most: float) -> list[int]:
    """The packed graphs' query counts for a step call of ``columns`` columns (b x width):
    multiples of ``PACKED_STEP`` up to ``PACKED_FINE``, then of 4 x ``PACKED_STEP``, each at
    least ``PACKED_STEP`` short of ``columns``, and up to the first at or past ``most`` (a call
    of more real columns keeps the device busy called: ``PACK_WORK``)."""
    buckets = []
    for n in range(PACKED_STEP, columns - PACKED_STEP + 1, PACKED_STEP):
        if n <= PACKED_FINE or n % (4 * PACKED_STEP) == 0:
            buckets.append(n)
            if n >= most:
                break
    return buckets


def least_packed(width: int) -> int:
    """The smallest packed graph a step call ``width`` wide can replay: its widest row has more
    than ``width - WIDTH_BUCKET`` columns (else the call would be a bucket narrower)."""
    return _packed_bucket(width - WIDTH_BUCKET + 1)


def _packed_bucket(real: int) -> int:
    """The smallest packed graph's query count holding ``real`` columns (``packed_buckets``)."""
    step = PACKED_STEP if real <= PACKED_FINE else 4 * PACKED_STEP
    return -(-real // step) * step


def _closed(pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """(width, commit width) pairs closed under their elementwise max: a call of rows in
    different windows runs at their widest width and widest commit width."""
    while True:
        wider = {(max(a[0], b[0]), max(a[1], b[1])) for a in pairs for b in pairs} | pairs
        if wider == pairs:
            return pairs
        pairs = wider


def _round_up(n: int, limit: int) -> int:
    return min(-(-n // WIDTH_BUCKET) * WIDTH_BUCKET, limit)
