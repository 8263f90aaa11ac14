"""A plain, slow, obviously-correct decoder for paradec's exact modes: the tests' oracle.

paradec's decoding core has one step body (``paradec.decoding.step``): static shapes, a prompt
KV cache, flattened candidates, fused kernels for scoring and commit. This module decodes the
same requests the long way, so the tests have a second implementation to compare it against:

- one request at a time (a batch of one), one step at a time, in Python loops over groups;
- every step forwards the model on the whole sequence — the prompt, then the whole canvas — with
  no cache at all; ``isolated`` attention comes from the attention mask of the sequence's
  segments (``paradec.models.attention.attention_mask``: the prompt sees itself, think block j
  the prompt and itself, the summary everything), ``canvas`` attention from the same function;
- the logit shift of a Dream-style model is done here on the full sequence's logits (column c
  of the canvas is predicted from the hidden state at the sequence position before it);
- tokens and scores come from ``paradec.ops.scoring.score_logits`` (the plain-torch twin of the
  score kernel), noise from ``paradec.decoding.sampler.uniform`` keyed by (request seed, group,
  the group's steps so far, body offset, salt) as DESIGN.md contract 3 says;
- rankings, quotas, floors and the commit rules are written out below with sorts and loops (not
  with ``paradec.ops.select_commit`` nor ``rank_in_groups``), EOS filling likewise; phases and
  windows are cut here; only the host planning arithmetic is shared: a phase's step budget
  (``RequestParams.phase_budgets``), its windows' shares (``plan.split_steps``) and a window's
  quotas (``schedule.group_schedule``).

What it shares with the code under test is therefore the model's layers (the forward itself),
the canvas layout (contract 1, pinned by other tests), the score twin and the sampler's hash
(each compared with their own references in ``test_ops.py``), and that planning arithmetic. What
it does not share is everything the step body does: the static buffers and their padding, the
prompt cache and its extension with the think blocks, the windowed column bookkeeping, the
logit-row gathering, the flattened ranking and the commit kernel, the EOS fill, the counters.

Scope: ``cache="none"`` (or no window at all), ``attention`` ``isolated`` or ``canvas``, modes
``nap`` / ``ao`` / ``ar_order`` / ``random`` / ``block``, every policy, ``tokens_per_step`` and
``steps`` budgets (``uniform`` / ``linspace``), nap windows and block mode's blocks, sampling
(temperature, top_k, top_p, score_on, rank_temperature), ``eos_closes_block``,
``bar_eos_in_blocks``, ``summary_min_tokens``, summary ``after`` / ``concurrent``. Not covered:
the windowed caches (``prefix`` / ``dual``: an approximation, not exact), ``stop`` strings (they
end decoding early), Fast-dLLM's rules (``FastDLLMRules``), distributed placement.

Near ties. The reference forwards a different shape than the step body (the whole sequence at
once, rather than the canvas over a cached prompt), so in float32 its logits can differ from the
runner's in the last bits. Each step therefore records its *margin*: the smallest gap on which
one of its decisions turned (a token's lead over the runner-up, a ranking's lead at the quota's
boundary, a confidence's distance from its threshold or factor bound). A disagreement at a step
whose margin is below ``TIE_TOL`` is a near tie, not evidence of a bug; anywhere else it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from paradec.api import build_layout
from paradec.config import GenerationConfig
from paradec.decoding import sampler
from paradec.decoding.plan import split_steps
from paradec.decoding.schedule import group_schedule
from paradec.models.attention import PROMPT, attention_mask
from paradec.models.loading import DiffusionModel
from paradec.ops.scoring import Scores, score_logits

# A decision closer than this (in probability, score or logit units) is a near tie. Measured on the
# tests' tiny models: the reference's logits and the runner's (prompt cache + canvas) differ by up
# to 2e-6; a temperature of 0.5 or a rank temperature of 0.2 scales that by 2 or 5.
TIE_TOL = 1e-4
TOPK_POLICIES = ("confidence", "margin", "entropy")
ORDER_MODES = ("ar_order", "random")


@dataclass
class StepNote:
    """What one step of the reference decided on: its tightest margin and where it was."""

    step: int
    margin: float
    where: str


@dataclass
class ReferenceResult:
    """canvas: [C] final tokens after the prompt; trace: [C] the step that committed each
    position (-1 for headers); steps: steps taken (one forward each); notes: one per step."""

    canvas: list[int]
    trace: list[int]
    steps: int
    notes: list[StepNote] = field(default_factory=list)

    def margin_at(self, step: int) -> StepNote | None:
        return self.notes[step] if 0 <= step < len(self.notes) else None


@dataclass
class _Plan:
    """phases: groups decoded together, in order; windows: group -> [(start, end)] canvas
    columns; schedules: group -> one quota list per window."""

    phases: list[list[int]]
    windows: dict[int, list[tuple[int, int]]]
    schedules: dict[int, list[list[int]]]


def reference_plan(config: GenerationConfig, layout) -> _Plan:
    """Phases, windows and quotas of one request, cut here from the config (nap: the think
    blocks, then the summary — or all at once with ``summary="concurrent"``; other modes: the
    answer region; windows of ``window`` (nap) or ``block_len`` (block mode) body tokens, the
    last one shorter)."""
    m = layout.num_think_blocks
    if m == 0:
        phases = [[0]]
    elif config.summary == "concurrent":
        phases = [list(range(m + 1))]
    else:
        phases = [list(range(m)), [m]]
    width = config.block_len if config.mode == "block" else config.window
    windows = {}
    for g, (start, end) in enumerate(layout.bodies):
        step = end - start if width is None else width
        windows[g] = [(s, min(s + step, end)) for s in range(start, end, step)]
    budgets = config.phase_budgets()  # [(phase name, body length, steps or None)]
    schedules = {}
    for g, ranges in windows.items():
        steps = budgets[-1][2] if g == layout.summary_group else budgets[0][2]
        lengths = [e - s for s, e in ranges]
        shares = [None] * len(ranges) if steps is None else split_steps(steps, lengths)
        schedules[g] = [group_schedule(n, share, config.tokens_per_step, config.schedule)
                        for n, share in zip(lengths, shares)]
    return _Plan(phases, windows, schedules)


def sequence_logits(model: DiffusionModel, prompt: list[int], canvas: list[int], canvas_segments: list[int],
                    mode: str) -> torch.Tensor:
    """[C, V] float32 logits predicting each canvas column: one forward of prompt + canvas with no
    cache, attention by segments; the shift of a Dream-style model done here (column c, at
    sequence position P + c, is predicted from the state at P + c - 1)."""
    module = model.module
    p, c = len(prompt), len(canvas)
    ids = torch.tensor([prompt + canvas], device=model.device)  # [1, P + C]
    positions = torch.arange(p + c, device=model.device)[None]
    segments = torch.tensor([[PROMPT] * p + canvas_segments], device=model.device)
    allowed = attention_mask(segments, segments, mode)  # [1, 1, T, T]
    # An all-true mask is passed as None: the same attention, on the unmasked kernel path.
    hidden, _ = module.run_layers(module.embed(ids), positions, None if bool(allowed.all()) else allowed, None)
    logits = module.head(hidden[0]).float()  # [P + C, V]: the state at each sequence position
    if model.spec.shift_logits:
        return logits[p - 1 : p + c - 1]
    return logits[p:]


def _uniform(seed: int, group: int, group_step: int, offsets: list[int], salt: int, width: int) -> torch.Tensor:
    """[N, width] the sampler's numbers for one group's positions at one of its steps."""
    n = len(offsets)
    full = lambda v: torch.full((n,), v, dtype=torch.long)  # noqa: E731
    return sampler.uniform(full(seed), full(group), full(group_step), torch.tensor(offsets, dtype=torch.long),
                           salt, width)


def _token_margin(logits: torch.Tensor, barred: torch.Tensor, mask_id: int, stop_ids: list[int],
                  temperature: float, noise: torch.Tensor | None) -> torch.Tensor:
    """[N] the chosen token's lead over the runner-up in the domain it was chosen in (logits when
    greedy, logits / T + Gumbel when sampled); top_k / top_p's kept sets are not examined."""
    x = logits.double().clone()
    x[:, mask_id] = -math.inf
    for s in stop_ids:
        x[:, s] = torch.where(barred, -math.inf, x[:, s])
    if temperature > 0:
        x = x / temperature - torch.log(-torch.log(noise))
    top2 = x.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def _f32(x: float) -> float:
    return float(np.float32(x))


@torch.no_grad()
def reference_decode(model: DiffusionModel, config: GenerationConfig, prompt: list[int],
                     request: int = 0) -> ReferenceResult:
    """Decodes one request (token ids ``prompt``) alone, step by step, with no cache.
    ``request``: its index in the batch of the config (its seed is ``config.seed + request``)."""
    if config.window_len is not None and config.cache_mode != "none":
        raise ValueError(f"the reference decodes exact modes only: a window needs cache='none', got {config.cache!r}")
    if config.stop:
        raise ValueError("the reference does not stop early at stop strings")
    spec = model.spec
    layout = build_layout(model, config)
    plan = reference_plan(config, layout)
    mask_id, eos_id, stop_ids = spec.mask_id, spec.eos_id, list(spec.stop_ids)
    seed = config.seed + request
    policy = config.mode if config.mode in ORDER_MODES else config.policy
    canvas = layout.template.tolist()
    trace = [-1] * len(canvas)
    editable = layout.editable.tolist()
    segments = layout.segments.tolist()
    bodies = layout.bodies
    num_groups = layout.num_groups
    summary = layout.summary_group

    def barred(c: int) -> bool:
        """EOS / EOT may not be chosen at canvas column c."""
        if summary is None:
            return False
        s_start, s_end = bodies[summary]
        in_summary = s_start <= c < s_end
        return (config.bar_eos_in_blocks and not in_summary) or (in_summary and c < s_start + config.summary_min_tokens)

    group_steps = [0] * num_groups
    step = 0
    notes: list[StepNote] = []
    for phase in plan.phases:
        for w in range(max(len(plan.windows[g]) for g in phase)):
            window_steps = {g: 0 for g in phase}
            while True:
                masked = {}  # group -> its masked columns in its window w
                for g in phase:
                    if w < len(plan.windows[g]):
                        cols = [c for c in range(*plan.windows[g][w]) if canvas[c] == mask_id]
                        if cols:
                            masked[g] = cols
                if not masked:
                    break
                logits = sequence_logits(model, prompt, canvas, segments, config.attention)  # [C, V]
                margin, where = math.inf, "no decision"
                commits = []  # (column, token) of every group, applied after all groups chose
                for g, cols in masked.items():
                    chosen, g_margin, g_where = _choose(config, policy, g, cols, logits, seed, group_steps[g],
                                                        window_steps[g], plan.schedules[g][w], bodies[g][0],
                                                        len(prompt), [barred(c) for c in cols], mask_id, stop_ids)
                    commits += chosen
                    if g_margin < margin:
                        margin, where = g_margin, f"group {g}: {g_where}"
                for c, token in commits:
                    canvas[c], trace[c] = token, step
                if config.eos_closes_block:
                    _fill_after_eos(canvas, trace, bodies, editable, stop_ids, mask_id, eos_id, step)
                for g in masked:
                    group_steps[g] += 1
                    window_steps[g] += 1
                notes.append(StepNote(step, margin, where))
                step += 1
    return ReferenceResult(canvas, trace, step, notes)


def _choose(config: GenerationConfig, policy: str, g: int, cols: list[int], logits: torch.Tensor, seed: int,
            group_step: int, window_step: int, schedule: list[int], body_start: int, prompt_len: int,
            bar: list[bool], mask_id: int, stop_ids: list[int]) -> tuple[list[tuple[int, int]], float, str]:
    """One group's choice at one step: [(column, token)] to commit, the step's tightest margin in
    this group and where it was. cols: the group's masked columns in its current window."""
    n = len(cols)
    offsets = [c - body_start for c in cols]
    temperature = config.temperature
    noise = _uniform(seed, g, group_step, offsets, sampler.TOKENS, logits.shape[1]) if temperature > 0 else None
    rows = logits[cols]  # [n, V]
    bar_t = torch.tensor(bar)
    scores: Scores = score_logits(rows.clone(), mask_id, tuple(stop_ids), bar_t, temperature, noise,
                                  config.top_k, config.top_p, config.score_on)
    tokens = scores.tokens.tolist()
    token_gaps = _token_margin(rows, bar_t, mask_id, stop_ids, temperature, noise).tolist()
    margin, where = min((gap, f"token at column {c}") for gap, c in zip(token_gaps, cols))

    # The ranking, higher first, as float32 values (the precision the step compares in).
    if policy == "ar_order":
        ranking = [-float(prompt_len + c) for c in cols]
    elif policy == "random":
        ranking = _uniform(seed, g, group_step, offsets, sampler.ORDER, 1)[:, 0].float().tolist()
    elif policy in TOPK_POLICIES:
        score = {"confidence": scores.confidence, "margin": scores.margin, "entropy": scores.neg_entropy}[policy]
        if config.rank_temperature > 0:  # Gumbel-top-k over score / rank_temperature, noise at the mask id
            score = score.double() / config.rank_temperature - torch.log(-torch.log(noise[:, mask_id]))
        ranking = score.float().tolist()
    else:  # threshold, factor: by confidence
        ranking = scores.confidence.tolist()
    lowest = float(np.finfo(np.float32).min)
    ranking = [lowest if math.isnan(r) or r == -math.inf else r for r in ranking]
    order = sorted(range(n), key=lambda i: (-ranking[i], cols[i]))  # ties to the lower position

    # Budget: the schedule's quota while it lasts, then everything left; with a step budget the
    # floor spreads what is left over the steps left.
    left = n
    if window_step < len(schedule):
        quota = min(schedule[window_step], left)
    else:
        quota = left
    if config.steps is not None:
        remaining = max(len(schedule) - window_step, 1)
        floor = -(-left // remaining) if window_step < len(schedule) else left
    else:
        floor = 1
    floor = max(floor, 1)

    def boundary_gap(k: int) -> float:
        """The ranking's lead of the k-th best over the (k+1)-th (inf when nothing is cut)."""
        if 0 < k < n and policy not in ORDER_MODES:  # order modes rank by exact numbers
            return ranking[order[k - 1]] - ranking[order[k]]
        return math.inf

    confidence = scores.confidence.tolist()
    if policy in TOPK_POLICIES or policy in ORDER_MODES:
        take = set(order[:quota])
        gap, what = boundary_gap(quota), f"ranking at the quota {quota}"
    elif policy == "threshold":
        tau = _f32(config.threshold)
        take = {i for i in range(n) if confidence[i] >= tau} | set(order[:floor])
        gap = min(abs(confidence[i] - tau) for i in range(n))
        what = f"confidence vs threshold {config.threshold}"
        if sum(confidence[i] >= tau for i in range(n)) < floor and boundary_gap(floor) < gap:
            gap, what = boundary_gap(floor), f"ranking at the floor {floor}"
    else:  # factor: the rank-th best passes if confidence >= 1 - f / (rank + 2), in float32
        f = np.float32(config.factor)
        take = set(order[:floor])
        gap, what = math.inf, "factor bound"
        for rank, i in enumerate(order):
            bound = float(np.float32(1.0) - f / np.float32(rank + 2))
            if confidence[i] >= bound:
                take.add(i)
            if abs(confidence[i] - bound) < gap:
                gap, what = abs(confidence[i] - bound), f"confidence vs factor bound at rank {rank}"
            if rank + 1 < n and ranking[i] - ranking[order[rank + 1]] < gap:  # the order sets the bounds
                gap, what = ranking[i] - ranking[order[rank + 1]], f"ranking between ranks {rank} and {rank + 1}"
    if gap < margin:
        margin, where = gap, what
    chosen = [(cols[i], tokens[i]) for i in sorted(take)]
    assert chosen and all(t != mask_id and t >= 0 for _, t in chosen), (policy, chosen)
    return chosen, margin, where


def _fill_after_eos(canvas: list[int], trace: list[int], bodies, editable: list[bool], stop_ids: list[int],
                    mask_id: int, eos_id: int, step: int) -> None:
    """A committed EOS / EOT at body position p ends its group's text: every still-masked position
    after p in that body becomes EOS, committed at ``step``."""
    for start, end in bodies:
        first = next((c for c in range(start, end) if editable[c] and trace[c] >= 0 and canvas[c] in stop_ids), None)
        if first is None:
            continue
        for c in range(first + 1, end):
            if canvas[c] == mask_id:
                canvas[c], trace[c] = eos_id, step
