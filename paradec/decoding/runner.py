"""The step loop. It owns the canvas, the prompt cache, budgets, EOS and the trace; a policy only
decides which masked positions a step commits (DESIGN.md contract 5).

A runner decodes a batch of prompts on one layout with one config: the plan
(``paradec.decoding.plan``) says which groups decode in which phase and window; for each phase
the step bodies (``paradec.decoding.step``) run the steps on static shapes, called directly or
replayed as CUDA graphs; the host looks between batches of steps to see what is left. Under
``isolated`` attention the prompt KV is computed once and, before the summary decodes, the
finished blocks' KV is appended to it once, so a summary step forwards the summary alone. Under
``canvas`` every step forwards the prompt and the whole canvas (or, with a windowed cache, a
window's first step does).

Windows (``block`` mode, ``nap`` with ``window``): each group of a phase decodes its body one
window at a time, all groups in step; a step commits only inside the current windows. With a
``prefix``/``dual`` cache the window's first step forwards what an unwindowed step would and
keeps the KV of everything the later steps of the window do not recompute.

``FastDLLMRules`` (``paradec.compat.fastdllm``) makes a runner decide as Fast-dLLM v1's own code
does where that differs from paradec's rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from paradec.canvas import CanvasLayout
from paradec.config import GenerationConfig, validate
from paradec.decoding import policies
from paradec.decoding.fastdllm_rules import FastDLLMRules
from paradec.decoding.plan import make_plan
from paradec.decoding.progress import Progress
from paradec.decoding.state import DecodeState
from paradec.decoding.step import PhaseSteps, captures
from paradec.errors import ConfigError
from paradec.models.cache import PromptCache
from paradec.models.loading import DiffusionModel
from paradec.ops import batch_invariant as bi
from paradec.ops.scoring import Sampling


@dataclass
class DecodeOutput:
    canvas: torch.Tensor  # [B, C] final tokens after each prompt
    trace: torch.Tensor  # [B, C] global step that committed each position; -1 for headers
    nfe: int  # model forwards made by the steps (prefill and cache extension not counted)
    steps: int
    timings: dict[str, float] = field(default_factory=dict)


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
        self.model, self.config, self.layout, self.fastdllm = model, config, layout, fastdllm
        self.device = model.device
        self.window_cap = None if fastdllm is None else fastdllm.window_steps  # steps a window may take at most
        validate(config, layout=layout, think_blocks=think_blocks, summary=summary, window_steps=self.window_cap)
        self.plan = make_plan(config, layout, model.module.shift_logits, think_blocks, summary)
        self.policy = policies.of(config)
        self.sampling = Sampling.of(config)  # the request's top_k / top_p / score_on / rank_temperature
        self.capture = captures(config, self.device)
        self.graph_pool = torch.cuda.graph_pool_handle() if self.capture else None
        spec = model.spec
        self.state = DecodeState(layout, len(prompts), max(map(len, prompts)), spec.mask_id,
                                 spec.pad_id if spec.pad_id is not None else 0, spec.stop_ids, self.device)
        self.steps: dict[tuple[int, ...], PhaseSteps] = {}  # phase -> its step bodies, kept across resets
        self._in_window: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}  # (phase, window) -> [C] bool
        self.reset(prompts)

    @property
    def phases(self) -> list[list[int]]:
        return self.plan.phases

    @property
    def canvas(self) -> torch.Tensor:
        return self.state.canvas

    @property
    def trace(self) -> torch.Tensor:
        return self.state.trace

    def reset(self, prompts: list[list[int]]) -> None:
        """Starts over on ``prompts`` (as many as before, the longest as long as before), every
        buffer refilled in place, so the CUDA graphs already captured replay for them too (a
        server decoding many requests of one shape captures once)."""
        b, p = self.state.prompt_ids.shape
        if len(prompts) != b or max(map(len, prompts)) != p:
            raise ConfigError(f"reset needs {b} prompts, the longest {p} tokens; got {len(prompts)}, "
                              f"the longest {max(map(len, prompts), default=0)}")
        self.state.reset(prompts, [self.config.seed + r for r in range(b)])
        self.timings = {"prefill": 0.0}

    # --- the loop ----------------------------------------------------------------------------
    @torch.no_grad()  # the step bodies call the layers directly: no autograd graph may hold their buffers
    def run(self, cache=None, start: tuple[torch.Tensor, torch.Tensor, int] | None = None,
            should_abort=None, on_step=None) -> DecodeOutput:
        """Decode this runner's phases.

        cache: a prompt cache made elsewhere (received from another rank), else one is made here
        under ``isolated``; it may already hold the think blocks' KV (then the summary uses it as
        is). start: (canvas [B, C], trace [B, C], first step) to continue from, such as the
        gathered think blocks. should_abort: called between steps; it raises to stop the run
        (another rank failed). on_step: called as ``on_step(progress)`` between steps (between
        batches of graph replays when steps replay as CUDA graphs) with a read-only view
        (``paradec.decoding.progress.Progress``: the step, copies of the canvas and trace as
        committed so far); it may raise to stop the run (a server's abort). With the config's
        ``batch_invariant`` set, the run (prefill, captures, steps) uses that kernel mode, which is
        process-wide while it lasts (``paradec.ops.batch_invariant``).
        """
        if self.config.batch_invariant is None:
            return self._run(cache, start, should_abort, on_step)
        with bi.batch_invariant(self.config.batch_invariant):
            return self._run(cache, start, should_abort, on_step)

    def _run(self, cache, start, should_abort, on_step) -> DecodeOutput:
        state = self.state
        t_start = self._clock()
        if cache is None and self.config.attention == "isolated":
            cache = self.model.prefill(state.prompt_ids, state.prompt_lens, reserve=self.layout.length)
        self.timings["prefill"] = self._clock() - t_start
        step, nfe = 0, 0
        if start is not None:
            canvas, trace, step = start
            state.canvas.copy_(canvas)
            state.trace.copy_(trace)
            state.step.fill_(step)
        timer = "graphs" if self.capture else "steps"
        self.timings[timer] = 0.0
        for phase in self.phases:
            t_phase = self._clock()
            blocks_cached = cache is not None and cache.num_tokens > state.prompt_ids.shape[1]
            if self.plan.is_summary_phase(phase) and cache is not None and not blocks_cached:
                cache = self._extend_with_blocks(cache)
            steps = self._phase_steps(phase, cache)
            for window in range(self.plan.num_windows(phase)):
                state.window_steps.zero_()
                loaded, window_step = False, 0
                while True:
                    active = self._active(phase, window)  # [B, G] host bool
                    if not active.any() or (self.window_cap is not None and window_step >= self.window_cap):
                        break
                    if should_abort is not None:
                        should_abort()
                    if on_step is not None:
                        on_step(Progress(self, step))
                    if not loaded:
                        steps.load(window, cache, with_phase_cache=window == 0)
                        loaded = True
                    t_steps = self._clock()
                    every = self.config.refresh_every
                    if self.plan.windowed_cache and (window_step == 0 or bool(every and window_step % every == 0)):
                        count = 1
                        steps.refresh()
                    else:
                        count = self._count(active, window, window_step)
                        steps.step(count, window_step)
                    after = int(state.step)
                    self.timings[timer] += self._clock() - t_steps
                    nfe += count
                    window_step += after - step
                    step = after
            if self.layout.num_think_blocks == 0:
                name = "answer"
            else:
                name = "summary" if self.plan.is_summary_phase(phase) else "think"
            self.timings[name] = self.timings.get(name, 0.0) + self._clock() - t_phase
        self.timings["total"] = self._clock() - t_start
        return DecodeOutput(state.canvas.clone(), state.trace.clone(), nfe, step, dict(self.timings))

    def committed(self) -> torch.Tensor:
        """[B, G] tokens committed so far in each group's body (host tensor; one device sync)."""
        return self.state.committed()

    def release(self) -> None:
        """Frees the captured graphs and their static buffers (caches included) now, rather
        than whenever the garbage collector gets to this runner."""
        for steps in self.steps.values():
            steps.release()
        self.steps.clear()

    def _phase_steps(self, phase: list[int], cache: PromptCache | None) -> PhaseSteps:
        key = tuple(phase)
        if key not in self.steps:
            self.steps[key] = PhaseSteps(self.model, self.config, self.plan, self.state, phase, cache, self.policy,
                                         self.sampling, self.fastdllm, self.capture, self.graph_pool)
        return self.steps[key]

    def _count(self, active: torch.Tensor, window: int, window_step: int) -> int:
        """Steps to run before the host looks again. Called steps: one (looking costs little and
        a step past the end would cost a forward). Replayed ones: the steps the top-k schedules
        still need (each commits in every active group), or the policy's cadence for rule
        policies; never past a periodic refresh or Fast-dLLM's window bound."""
        if not self.capture:
            return 1
        if self.policy.check_every is not None:
            count = self.policy.check_every
        else:
            done = self.state.window_steps.cpu()
            count = max(1, max(len(self.plan.schedules[g][window]) - int(done[r, g])
                               for r, g in active.nonzero().tolist()))
        every = self.config.refresh_every
        if every:
            count = min(count, every - window_step % every)
        if self.window_cap is not None:
            count = min(count, self.window_cap - window_step)
        return count

    def _active(self, phase: list[int], window: int) -> torch.Tensor:
        """[B, G] bool on the host: groups of this phase that still have masked positions in
        window ``window``."""
        key = (tuple(phase), window)
        if key not in self._in_window:
            in_window = torch.zeros(self.layout.length, dtype=torch.bool)
            in_window[self.plan.window_columns(phase, window)] = True
            self._in_window[key] = in_window.to(self.device)
        in_window = self._in_window[key]  # [C]
        in_phase = torch.zeros(self.layout.num_groups, dtype=torch.bool)
        in_phase[phase] = True
        return (self.state.per_group(self.state.masked() & in_window).cpu() > 0) & in_phase

    def _extend_with_blocks(self, cache: PromptCache) -> PromptCache:
        """Appends the finished think blocks' KV to the cache (exact under ``isolated``)."""
        state = self.state
        end = self.layout.blocks[self.layout.num_think_blocks - 1][1]
        ids, positions, segments = state.canvas[:, :end], state.positions[:, :end], state.segments[:, :end]
        return self.model.module.extend(cache, ids, positions, segments, "isolated", reserve=self.layout.length - end)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
