"""Planning on the host, once per shape: which groups decode in which phase, each group's windows
and step quotas, and the canvas columns a window's steps forward and commit in. Nothing here
reads a token; the step body (``paradec.decoding.step``) reads the plan into static buffers.

Phases: for ``nap`` the think blocks, then the summary (or both at once with
``summary="concurrent"``); for the other modes the one answer region. A rank of a distributed run
decodes its own blocks and no summary; the summary owner then decodes the summary alone.
Windows (``block`` mode, ``nap`` with ``window``): each group decodes its body one window at a
time, all groups of a phase in step; a phase's step budget is shared by its windows in
proportion to their lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

from paradec.canvas import CanvasLayout
from paradec.config import GenerationConfig, window_lengths
from paradec.decoding.schedule import group_schedule


@dataclass(frozen=True)
class Plan:
    """phases: the groups each phase decodes, in order. windows: group -> its body's windows
    [start, end) in canvas columns, in order. schedules: group -> one quota list per window (the
    tokens each step commits; a rule policy reads the list's length as the step budget).
    windowed_cache: a ``prefix``/``dual`` cache (a window's first step forwards everything,
    later steps the step columns). shifted: the model predicts position p from p - 1's state."""

    layout: CanvasLayout
    phases: list[list[int]]
    windows: dict[int, list[tuple[int, int]]]
    schedules: dict[int, list[list[int]]]
    cache_mode: str | None
    windowed_cache: bool
    shifted: bool
    bar_eos_in_blocks: bool
    summary_min_tokens: int

    def num_windows(self, phase: list[int]) -> int:
        return max(len(self.windows[g]) for g in phase)

    def window_columns(self, phase: list[int], window: int) -> list[int]:
        """Canvas columns of window ``window`` of every group of the phase that has one (the
        columns a step may commit in)."""
        return [c for g in phase if window < len(self.windows[g]) for c in range(*self.windows[g][window])]

    def region_columns(self, phase: list[int], window: int) -> list[int]:
        """Each group's body from its start to the end of window ``window``: what Fast-dLLM's
        refresh step commits among (``FastDLLMRules.window_steps``)."""
        return [c for g in phase if window < len(self.windows[g])
                for c in range(self.layout.bodies[g][0], self.windows[g][window][1])]

    def block_columns(self, phase: list[int]) -> list[int]:
        """Every column of the phase's groups, headers included."""
        return [c for g in phase for c in range(*self.layout.blocks[g])]

    def partial_refresh_columns(self, phase: list[int], window: int) -> list[int]:
        """What a partial refresh of window ``window`` >= 1 forwards (``partial_refresh``), sorted:
        its step columns and the phase's columns the previous window's steps forwarded (the
        tokens committed since the last refresh, but for EOS filling, which can reach later
        windows: those keep their KV until their own window's steps); every other column keeps
        its KV."""
        previous = set(self.step_columns(phase, window - 1)) & set(self.block_columns(phase))
        return sorted(previous | set(self.step_columns(phase, window)))

    def step_columns(self, phase: list[int], window: int) -> list[int]:
        """Canvas columns a cached step of this window forwards, sorted: each group's window
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
            if self.cache_mode == "prefix":
                end = self.layout.bodies[g][1]
            columns.update(range(start, end))
            if len(self.windows[g]) == 1:
                columns.update(range(self.layout.blocks[g][0], self.layout.bodies[g][0]))
            if self.shifted and start > 0:
                columns.add(start - 1)
        return sorted(columns)

    def delayed_width(self, groups: list[int], window: int, action: int, by_rule: bool) -> int:
        """The most columns a step with delayed KV (``delayed_kv``) forwards for ``groups`` as
        action ``action`` >= 1 of window ``window`` (action 0 is the window's refresh): per group,
        what was masked before the previous action, at most its body's step columns less what
        the actions before that surely committed (a top-k schedule's quotas, or one an action
        under a rule policy, ``by_rule``); for a shifted model also each masked column's
        predecessor and a column before the window; never more than the group's step columns.
        Static, so that steps replay as graphs of this width."""
        width = 0
        for g in groups:
            if window >= len(self.windows[g]):
                continue
            columns = self.step_columns([g], window)
            start, end = self.layout.bodies[g]
            maskable = sum(start <= c < end for c in columns)
            schedule = self.schedules[g][window]  # (sums to the window's length)
            earlier = action - 1  # the actions before the previous one: what they committed is not forwarded
            committed = min(earlier, sum(schedule)) if by_rule else sum(schedule[:earlier])
            bound = max(0, maskable - committed)
            width += min(len(columns), 2 * bound + 1 if self.shifted else bound)
        return width

    def delayed_flags(self, phase: list[int], window: int, columns: list[int]) -> tuple[list[bool], list[bool]]:
        """Per step column of window ``window`` (canvas ``columns``), what delayed KV reads
        beyond its tokens (``paradec.decoding.delayed.needed``): whether a window column follows
        it (a shifted model's predecessor), and whether it lies outside the phase's blocks."""
        in_window, in_blocks = set(self.window_columns(phase, window)), set(self.block_columns(phase))
        return [self.shifted and c + 1 in in_window for c in columns], [c not in in_blocks for c in columns]

    def barred(self, columns: list[int]) -> list[bool]:
        """Whether EOS/EOT may not be chosen at each canvas column: in think blocks with
        ``bar_eos_in_blocks``, in the summary's first ``summary_min_tokens`` positions."""
        summary = self.layout.summary_group
        if summary is None:
            return [False] * len(columns)
        start, end = self.layout.bodies[summary]
        return [(self.bar_eos_in_blocks and not start <= c < end) or start <= c < start + self.summary_min_tokens
                for c in columns]

    def is_summary_phase(self, phase: list[int]) -> bool:
        return phase == [self.layout.summary_group]


def make_plan(config: GenerationConfig, layout: CanvasLayout, shifted: bool, think_blocks: list[int] | None = None,
              summary: bool | None = None) -> Plan:
    """The plan of a runner that decodes ``think_blocks`` (default all) and, when ``summary``
    (default: when it decodes every think block), the summary; the arguments validated
    (``paradec.config.validate``)."""
    m = layout.num_think_blocks
    groups = list(range(m)) if think_blocks is None else sorted(think_blocks)
    with_summary = m > 0 and (len(groups) == m if summary is None else summary)
    if m == 0:
        phases = [[0]]
    elif not with_summary:
        phases = [groups]
    elif not groups:
        phases = [[m]]
    elif config.summary == "concurrent":
        phases = [groups + [m]]
    else:
        phases = [groups, [m]]
    windows = {g: _window_ranges(start, end, config.window_len) for g, (start, end) in enumerate(layout.bodies)}
    budgets = config.phase_budgets()
    schedules = {}
    for g, ranges in windows.items():
        steps = budgets[-1][2] if g == layout.summary_group else budgets[0][2]
        shares = [None] * len(ranges) if steps is None else split_steps(steps, [e - s for s, e in ranges])
        schedules[g] = [group_schedule(end - start, share, config.tokens_per_step, config.schedule)
                        for (start, end), share in zip(ranges, shares)]
    return Plan(layout=layout, phases=phases, windows=windows, schedules=schedules, cache_mode=config.cache_mode,
                windowed_cache=config.cache_mode in ("prefix", "dual"), shifted=shifted,
                bar_eos_in_blocks=config.bar_eos_in_blocks, summary_min_tokens=config.summary_min_tokens)


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
