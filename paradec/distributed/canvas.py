"""Canvas decoding across ranks (DESIGN.md contracts 3 and 4).

Each rank decodes its own think blocks with a copy of the prompt KV; ranks do not talk while
thinking. At summary time rank 0 gathers the blocks' tokens (and, with ``gather="kv"``, their
KV), decodes the summary over prompt + all blocks, and holds the result. Under ``isolated``
attention a block's tokens do not depend on where it was decoded, so the output equals the
one-process run token for token. The model's engine (``paradec.engine.Engine``) holds what
outlives a call: the kept runners, this rank's guard, the measured prompt-KV rates.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from paradec.canvas import CanvasLayout
from paradec.config import GenerationConfig
from paradec.decoding.runner import DecodeOutput, Runner
from paradec.distributed import prompt_kv
from paradec.distributed.env import DistEnv
from paradec.distributed.guard import Guard
from paradec.distributed.placement import SUMMARY_RANK, Placement
from paradec.errors import ConfigError
from paradec.models.cache import PromptCache
from paradec.models.loading import DiffusionModel

if TYPE_CHECKING:
    from paradec.engine import Engine


@dataclass
class DistributedOutput:
    output: DecodeOutput
    placement: dict
    rank_timings: list[dict]


def decode(engine: Engine, config: GenerationConfig, layout: CanvasLayout, prompts: list[list[int]],
           env: DistEnv, summary: bool = True) -> DistributedOutput | None:
    """Decodes on every rank with ``engine``'s model; returns the output on rank 0 (every rank
    with ``results_on="all"``), None elsewhere. summary: False leaves the summary undecoded (an
    AR answerer reads the gathered blocks instead). ``config`` must have passed
    ``validate(config, ranks=env.world_size)`` (``paradec.generate`` validates before any work)."""
    guard = engine.guard(env, config.rank_timeout_s)
    guard.new_run()
    try:
        with ExitStack() as runners:  # the engine's runners this call holds (kept ones wait for it)
            return _decode(engine, config, layout, prompts, env, guard, runners, summary)
    except BaseException as error:
        guard.report(error)
        raise


def _decode(engine: Engine, config: GenerationConfig, layout: CanvasLayout, prompts: list[list[int]], env: DistEnv,
            guard: Guard, runners: ExitStack, with_summary: bool) -> DistributedOutput | None:
    model = engine.model
    clock = _Clock(env)
    started = clock.last
    with guard.meeting("start"):
        _check_agreement(model, config, prompts, env)
    placement = Placement.plan(layout.num_think_blocks, env.world_size)
    mine = list(placement.blocks_of_rank[env.rank])
    local = runners.enter_context(engine.runner(config, layout, prompts, think_blocks=mine, summary=False, wait=True))
    timings = {"rank": env.rank, "blocks": mine}

    how = config.prompt_kv
    if how == "auto":
        with guard.meeting("measure"):
            costs = prompt_kv.estimate(engine.prompt_kv_rates(env), model, env, local.state.prompt_ids.shape[1])
        how = costs.choice
        timings |= {"predicted_broadcast_s": costs.broadcast_s, "predicted_recompute_s": costs.recompute_s}
    with guard.meeting("prompt-kv") if how == "broadcast" else nullcontext():
        clock.start()
        cache = prompt_kv.prefill(model, env, local.state.prompt_ids, local.state.prompt_lens, how, reserve=layout.length)
        timings["prefill"] = clock.lap()
        guard.tick()
        if how == "broadcast":
            cache = prompt_kv.broadcast(model, env, cache, local.state.prompt_ids, local.state.prompt_lens,
                                        reserve=layout.length)
            timings["broadcast"] = clock.lap()

    forwards = 0
    if mine:
        out = local.run(cache=cache, should_abort=guard.check)  # a step: progress
        forwards = out.nfe
    timings |= {"think": clock.lap(), "forwards": forwards}
    guard.tick()
    own_blocks = None
    if config.gather == "kv":  # before the meeting: every rank computes its blocks' KV (and last state) at once
        own_blocks = _own_blocks_kv(model, local, cache, placement, env, layout)
        timings["blocks_kv"] = clock.lap()
        guard.tick()

    with guard.meeting("gather"):
        timings["wait"] = clock.lap()  # for the slowest rank
        canvas, trace = _gather_tokens(local, env)
        blocks_kv = _gather_kv(local, cache, own_blocks, placement, env, layout) if config.gather == "kv" else None
    timings["gather"] = clock.lap()

    output = None
    if env.rank == SUMMARY_RANK:
        first_step = int(trace.max()) + 1
        if with_summary:
            summary = runners.enter_context(engine.runner(config, layout, prompts, think_blocks=[], summary=True,
                                                          wait=True))
            cache_for_summary = cache if blocks_kv is None else blocks_kv
            output = summary.run(cache=cache_for_summary, start=(canvas, trace, first_step),
                                 should_abort=guard.check)  # the others wait at "done": each step is progress
        else:
            output = DecodeOutput(canvas, trace, 0, first_step)
        output.nfe = first_step + output.nfe
        timings["summary"] = clock.lap()
        timings["forwards"] += output.nfe - first_step
        guard.tick()

    with guard.meeting("done"):
        rank_timings = [None] * env.world_size if env.rank == SUMMARY_RANK else None
        dist.gather_object(timings, rank_timings, dst=SUMMARY_RANK)
        result = None
        if output is not None:
            output.canvas, output.trace = output.canvas.cpu(), output.trace.cpu()  # travels as an object
            # Per phase: the slowest rank's prefill, thinking and blocks' KV; rank 0's broadcast,
            # gather and summary (what moves between ranks: broadcast and gather). Total: rank 0's
            # wall time, waits included.
            slowest = lambda key: max(t.get(key, 0.0) for t in rank_timings)  # noqa: E731
            mine = rank_timings[SUMMARY_RANK]
            output.timings = {
                "prefill": slowest("prefill"),
                "broadcast": mine.get("broadcast", 0.0),
                "think": slowest("think"),
                "blocks_kv": slowest("blocks_kv"),
                "gather": mine["gather"],
                "summary": mine["summary"],
                "total": clock.since(started),
            }
            result = DistributedOutput(output, placement.as_dict() | {"prompt_kv": how, "gather": config.gather},
                                       rank_timings)
        if config.results_on == "all":
            box = [result]
            dist.broadcast_object_list(box, src=SUMMARY_RANK)
            result = box[0]
        return result


def _gather_tokens(local: Runner, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 merges every rank's blocks: each position is taken from the rank that committed it."""
    both = torch.stack((local.canvas, local.trace))  # [2, B, C]
    parts = [torch.empty_like(both) for _ in range(env.world_size)] if env.rank == SUMMARY_RANK else None
    dist.gather(both, parts, dst=SUMMARY_RANK)
    if env.rank != SUMMARY_RANK:
        return local.canvas, local.trace
    canvas, trace = local.canvas.clone(), local.trace.clone()
    for part in parts:
        decoded = part[1] >= 0
        canvas[decoded], trace[decoded] = part[0][decoded], part[1][decoded]
    return canvas, trace


def _own_blocks_kv(model: DiffusionModel, local: Runner, cache: PromptCache, placement: Placement, env: DistEnv,
                   layout: CanvasLayout) -> tuple[torch.Tensor, torch.Tensor] | None:
    """This rank's blocks' KV (exact under ``isolated``: a block sees the prompt and itself),
    [L, 2, B, Hkv, T_rank, D], and its last column's final hidden state [B, d] (the last think
    block's predicts a headerless summary's first token); None for a rank without blocks."""
    span = _spans(placement, layout)[env.rank]
    if span is None:
        return None
    cols = slice(*span)
    state = local.state
    extended = model.module.extend(cache, state.canvas[:, cols], state.positions[:, cols], state.segments[:, cols],
                                   "isolated")
    return extended.kv[..., cache.num_tokens:, :].contiguous(), extended.last_hidden.contiguous()


def _gather_kv(local: Runner, cache: PromptCache, own: tuple[torch.Tensor, torch.Tensor] | None,
               placement: Placement, env: DistEnv, layout: CanvasLayout) -> PromptCache | None:
    """Every rank sends its blocks' KV to rank 0, which lays the prompt KV and all blocks' KV
    end to end (a cache for the summary), with the last think column's final state, which the
    rank holding that block sends as well (``PromptCache.last_hidden``)."""
    spans = _spans(placement, layout)
    end = layout.blocks[layout.num_think_blocks - 1][1]
    last_rank = next(rank for rank, span in enumerate(spans) if span is not None and span[1] == end)
    if env.rank != SUMMARY_RANK:
        if own is not None:
            dist.send(own[0], dst=SUMMARY_RANK)
            if env.rank == last_rank:
                dist.send(own[1], dst=SUMMARY_RANK)
        return None
    tails = []
    for rank, span in enumerate(spans):
        if span is None:
            continue
        if rank == SUMMARY_RANK:
            tails.append(own[0])
            continue
        shape = list(cache.kv.shape)
        shape[4] = span[1] - span[0]
        received = cache.kv.new_empty(shape)
        dist.recv(received, src=rank)
        tails.append(received)
    if last_rank == SUMMARY_RANK:
        last_hidden = own[1]
    else:
        last_hidden = torch.empty_like(cache.last_hidden)
        dist.recv(last_hidden, src=last_rank)
    p = cache.num_tokens
    reserve = layout.length - end
    kv = cache.kv.new_empty(*cache.kv.shape[:4], p + end + reserve, cache.kv.shape[5])
    kv[..., :p, :] = cache.kv[..., :p, :]
    kv[..., p : p + end, :] = torch.cat(tails, dim=4)
    segments = torch.cat((cache.segments, local.state.segments[:, :end]), dim=1)
    lengths = local.state.positions[:, end - 1] + 1
    return PromptCache(kv=kv, segments=segments, lengths=lengths, last_hidden=last_hidden)


def _spans(placement: Placement, layout: CanvasLayout) -> list[tuple[int, int] | None]:
    """Each rank's canvas columns: from its first block's start to its last block's end."""
    return [(layout.blocks[b[0]][0], layout.blocks[b[-1]][1]) if b else None for b in placement.blocks_of_rank]


def _check_agreement(model: DiffusionModel, config: GenerationConfig, prompts: list[list[int]], env: DistEnv) -> None:
    """Every rank must hold the same model, config and prompts: compare cheap fingerprints."""
    mine = _fingerprints(model, config, prompts)
    every = [None] * env.world_size
    dist.all_gather_object(every, mine)
    for part in ("model", "config", "prompts"):
        odd = [r for r, fp in enumerate(every) if fp[part] != every[SUMMARY_RANK][part]]
        if odd:
            raise ConfigError(
                f"ranks {odd} disagree with rank {SUMMARY_RANK} on the {part} (fingerprints differ); every "
                "rank must load the same checkpoint and pass the same config and prompts"
            )


def _fingerprints(model: DiffusionModel, config: GenerationConfig, prompts: list[list[int]]) -> dict[str, str]:
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    return {
        "model": _model_fingerprint(model),
        "config": digest(json.dumps(asdict(config), sort_keys=True)),
        "prompts": digest(json.dumps(prompts)),
    }


def _model_fingerprint(model: DiffusionModel) -> str:
    """A digest of the shapes and the first 4096 values of every weight, summed on the device
    with one synchronisation for all of them."""
    params = list(model.module.named_parameters())
    sums = torch.stack([param.detach().reshape(-1)[:4096].sum(dtype=torch.float64) for _, param in params])
    probe = [f"{name}:{tuple(param.shape)}:{value:.10e}" for (name, param), value in zip(params, sums.tolist())]
    return hashlib.sha256((repr(model.spec) + repr(model.module.cfg) + "|".join(probe)).encode()).hexdigest()


class _Clock:
    def __init__(self, env: DistEnv):
        self.env = env
        self.last = time.perf_counter()

    def _now(self) -> float:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        return time.perf_counter()

    def start(self) -> None:
        self.last = self._now()

    def since(self, start: float) -> float:
        return self._now() - start

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed
