"""Runners kept across generations, so that CUDA graphs are captured once per shape.

A model keeps at most one runner per role: ``blocks`` (the think blocks of a one-process run,
or this rank's share of them under torchrun) and ``summary`` (the summary that rank 0 decodes
from the gathered blocks). A request of the same config and batch shape resets the kept runner
in place and replays its graphs; anything else releases it first (its buffers hold a KV cache).
Runners without graphs are never kept: building them again costs nothing worth saving.
"""

from __future__ import annotations

from paradec.canvas import CanvasLayout
from paradec.config import GenerationConfig
from paradec.decoding.runner import Runner
from paradec.models.loading import DiffusionModel


def kept_runner(model: DiffusionModel, config: GenerationConfig, layout: CanvasLayout, prompts: list[list[int]],
                think_blocks: list[int] | None = None, summary: bool | None = None) -> Runner:
    """A runner for these arguments (``Runner``'s); the kept one, reset, when it fits."""
    role = "summary" if think_blocks == [] else "blocks"
    weight = model.module.embed.weight  # graphs hold the addresses of these weights
    key = (config, layout.length, len(prompts), max(map(len, prompts)), weight.data_ptr(), weight.dtype,
           weight.device, None if think_blocks is None else tuple(think_blocks), summary)
    kept = _kept(model)
    if role in kept and kept[role][0] == key:
        runner = kept[role][1]
        runner.reset(prompts)
        return runner
    if role in kept:
        kept.pop(role)[1].release()
    runner = Runner(model, config, layout, prompts, think_blocks=think_blocks, summary=summary)
    if runner.graphs is not None:
        kept[role] = (key, runner)
    return runner


def _kept(model: DiffusionModel) -> dict[str, tuple[tuple, Runner]]:
    if not hasattr(model, "_kept_runners"):
        model._kept_runners = {}
    return model._kept_runners
