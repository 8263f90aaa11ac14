"""One request inside a batching engine: its plan and where it stands in it, on the host.

A request decodes exactly as a runner decodes it alone (``paradec.decoding.runner``): a prefill
under ``isolated`` attention, then each phase's windows in order; before the summary phase the
finished think blocks' KV is recomputed (``EXTEND``, the runner's cache extension); a window
starts with a refresh when the cache is windowed (and every ``refresh_every`` steps), its other
steps forward the window's step columns; a window ends when none of its positions is masked.
When the request refreshes partially (``GenerationConfig.refreshes_partially``: an
approximation, the default for ``nap`` windows) a window's refresh after the phase's first
forwards only ``Plan.partial_refresh_columns``, as ``generate()`` does.
The engine gives every live request one action per engine step and tells it, after the step,
which of its canvas positions are still masked (``advance``).

Columns are named by pool slot (``paradec.batching.pool.RowGeometry``): prompt token i in slot
i, canvas column c in slot ``P + c`` for a prompt of P tokens (the row's keys end at P + C).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from paradec.canvas import CanvasLayout
from paradec.config import GenerationConfig
from paradec.decoding import policies
from paradec.decoding.plan import Plan
from paradec.ops.selection import TOPK
from paradec.ops.scoring import Sampling


class Action(enum.Enum):
    PREFILL = "prefill"  # the prompt's KV (isolated attention), a long prompt in layer chunks
    EXTEND = "extend"  # the finished think blocks' KV, before the summary (isolated attention)
    REFRESH = "refresh"  # a windowed cache's refresh (every column of the phase, or a partial one), then a commit
    STEP = "step"  # the window's step columns, then a commit


@dataclass(frozen=True)
class CommitClass:
    """What a commit reads beyond the rows' own tensors: requests of one class commit in one
    call (the score and selection kernels take these as scalars)."""

    policy: str
    param: float
    temperature: float
    sampling: Sampling

    @classmethod
    def of(cls, config: GenerationConfig) -> CommitClass:
        policy = policies.of(config)
        param = float(getattr(config, policy.parameter)) if policy.parameter else 0.0
        return cls(policy.name, param, config.temperature, Sampling.of(config))


@dataclass
class WindowColumns:
    """The slots a window's actions forward and the canvas columns its steps commit in."""

    step: list[int]  # slots a step forwards
    step_successor: list[bool]  # per step slot, delayed KV: a window column follows it (a shifted model)
    step_always: list[bool]  # per step slot, delayed KV: outside the phase's blocks (forwarded every step)
    refresh: list[int]  # slots a refresh forwards
    commit: list[int]  # canvas columns a step may commit in (the window's)
    barred: list[bool]  # per commit column: EOS may not be chosen
    schedules: dict[int, list[int]]  # group -> the window's quota list
    commit_at: torch.Tensor  # [n] long, host: ``commit`` as a tensor (indexes the row's masks)
    commit_groups: torch.Tensor  # [n] long, host: each commit column's group
    commit_offsets: torch.Tensor  # [n] long, host: each commit column's offset in its group's body
    delayed_widths: dict[int, int] = field(default_factory=dict)  # action -> a delayed-KV step's width, as met


@dataclass(eq=False)
class Sequence:
    """request_id, prompt ids, config, layout and plan of one request; ``row``: its pool row
    while live. The cursor: ``phase``, ``window`` (indices into the plan), ``window_step``
    (actions taken in the window), ``action`` (the next one; None once finished); ``steps``: the
    steps that committed, as the device counts them (the engine reads them after every look)."""

    request_id: str
    prompt_ids: list[int]
    config: GenerationConfig
    layout: CanvasLayout
    plan: Plan
    stream: bool = False
    row: int = -1
    phase: int = 0
    window: int = 0
    window_step: int = 0
    steps: int = 0
    nfe: int = 0
    extended: bool = False
    prefill_layer: int = 0  # layers of the prompt's prefill done (a long prompt takes several engine steps)
    prefill_hidden: torch.Tensor | None = field(default=None, repr=False)  # [1, P, d] after them, between chunks
    action: Action | None = None
    loaded: tuple[int, int] | None = None  # the (phase, window) whose columns the row's buffers hold
    arrived: float = field(default_factory=time.perf_counter)
    started: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _columns: tuple[tuple[int, int], WindowColumns] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.commit_class = CommitClass.of(self.config)
        self.isolated = self.config.attention == "isolated"
        self.delayed = self.plan.windowed_cache and self.config.delayed_kv  # paradec.decoding.delayed
        self.action = Action.PREFILL if self.isolated else None
        if not self.isolated:
            self.advance(self.layout.editable.clone())

    @property
    def finished(self) -> bool:
        return self.action is None

    @property
    def window_key(self) -> tuple[int, int]:
        return self.phase, self.window

    def acted(self) -> None:
        """The engine ran ``action``."""
        if self.action is Action.EXTEND:
            self.extended = True
        elif self.action is not Action.PREFILL:
            self.window_step += 1

    def advance(self, masked: torch.Tensor) -> None:
        """Chooses the next action from ``masked`` ([C] bool, host: body positions still masked),
        moving on through windows and phases that have nothing left; None when done."""
        plan = self.plan
        if self.prefill_hidden is not None:
            return  # its prefill's next layers
        while self.phase < len(plan.phases):
            phase = plan.phases[self.phase]
            if self.isolated and plan.is_summary_phase(phase) and not self.extended:
                self.action = Action.EXTEND
                return
            if self.window < plan.num_windows(phase) and bool(masked[self.columns().commit_at].any()):
                every = self.config.refresh_every
                periodic = bool(every and self.window_step % every == 0)
                refresh = plan.windowed_cache and (self.window_step == 0 or periodic)
                self.action = Action.REFRESH if refresh else Action.STEP
                return
            self.window_step = 0
            if self.window + 1 < plan.num_windows(phase):
                self.window += 1
            else:
                self.phase, self.window = self.phase + 1, 0
        self.action = None

    # --- the columns of the current window, in pool slots -------------------------------------
    def columns(self) -> WindowColumns:
        """The current window's columns (computed once per window)."""
        if self._columns is None or self._columns[0] != self.window_key:
            self._columns = (self.window_key, self._window_columns())
        return self._columns[1]

    def _window_columns(self) -> WindowColumns:
        plan, phase, window = self.plan, self.plan.phases[self.phase], self.window
        canvas = self._canvas_slots
        if plan.windowed_cache:
            step = canvas(plan.step_columns(phase, window))
        elif self.isolated:
            step = canvas(plan.block_columns(phase))
        else:  # canvas attention with nothing cached: the prompt and the whole canvas, every step
            step = self.prompt_slots() + canvas(range(self.layout.length))
        if plan.windowed_cache and self.config.refreshes_partially and window > 0:
            refresh = canvas(plan.partial_refresh_columns(phase, window))
        elif self.isolated:
            refresh = canvas(plan.block_columns(phase))
        else:
            refresh = self.prompt_slots() + canvas(range(self.layout.length))
        commit = plan.window_columns(phase, window)
        schedules = {g: plan.schedules[g][window] for g in phase if window < len(plan.schedules[g])}
        commit_at = torch.tensor(commit, dtype=torch.long)
        groups = self.layout.groups[commit_at]
        body_starts = torch.tensor([start for start, _ in self.layout.bodies], dtype=torch.long)
        successor, always = plan.delayed_flags(phase, window, [s - len(self.prompt_ids) for s in step])
        return WindowColumns(step=step, step_successor=successor, step_always=always, refresh=refresh, commit=commit,
                             barred=plan.barred(commit), schedules=schedules,
                             commit_at=commit_at, commit_groups=groups, commit_offsets=commit_at - body_starts[groups])

    def step_width(self, ahead: int = 0) -> int:
        """The columns this request's next step forwards (``ahead``: the step that many after it,
        with no look between): its step columns, or with delayed KV the bound on the ones that
        can change (``Plan.delayed_width``), at least one."""
        columns = self.columns()
        if not self.delayed or self.action is not Action.STEP:
            return len(columns.step)
        action = self.window_step + ahead
        if action not in columns.delayed_widths:  # (asked for several times an engine step)
            by_rule = policies.of(self.config).rule != TOPK
            bound = self.plan.delayed_width(self.plan.phases[self.phase], self.window, action, by_rule)
            columns.delayed_widths[action] = max(1, min(len(columns.step), bound))
        return columns.delayed_widths[action]

    def prompt_slots(self) -> list[int]:
        return list(range(len(self.prompt_ids)))

    def extend_slots(self) -> list[int]:
        """The canvas up to the end of the last think block (headers included)."""
        return self._canvas_slots(range(self.layout.blocks[self.layout.num_think_blocks - 1][1]))

    def _canvas_slots(self, columns) -> list[int]:
        return [len(self.prompt_ids) + c for c in columns]
