"""Runners kept across generations, so that CUDA graphs are captured once per shape.

A model keeps at most one runner per role: ``blocks`` (the think blocks of a one-process run,
or this rank's share of them under torchrun) and ``summary`` (the summary that rank 0 decodes
from the gathered blocks). A request of the same config and batch shape resets the kept runner
in place and replays its graphs; a graphed request of another shape releases it first (its
buffers hold KV caches). Requests whose steps run eagerly (sampled, ``cuda_graphs=False``, CPU)
get a runner of their own and leave the kept ones alone. Kept runners hold their memory until
then, or until ``release_kept``.
"""

from __future__ import annotations

from paradec.canvas import CanvasLayout
from paradec.config import GenerationConfig
from paradec.decoding.fastdllm_rules import FastDLLMRules
from paradec.decoding.runner import Runner
from paradec.decoding.step import captures
from paradec.models.loading import DiffusionModel


def kept_runner(model: DiffusionModel, config: GenerationConfig, layout: CanvasLayout, prompts: list[list[int]],
                think_blocks: list[int] | None = None, summary: bool | None = None,
                fastdllm: FastDLLMRules | None = None) -> Runner:
    """A runner for these arguments (``Runner``'s); the kept one, reset, when it fits."""
    if not captures(config, model.device):
        return Runner(model, config, layout, prompts, think_blocks=think_blocks, summary=summary, fastdllm=fastdllm)
    role = "summary" if think_blocks == [] and summary else "blocks"
    weight = model.module.embed.weight  # graphs hold the addresses of these weights
    key = (config, layout.length, len(prompts), max(map(len, prompts)), weight.data_ptr(), weight.dtype,
           weight.device, None if think_blocks is None else tuple(think_blocks), summary, fastdllm)
    kept = _kept(model)
    if role in kept and kept[role][0] == key:
        runner = kept[role][1]
        runner.reset(prompts)
        return runner
    if role in kept:
        kept.pop(role)[1].release()
    runner = Runner(model, config, layout, prompts, think_blocks=think_blocks, summary=summary, fastdllm=fastdllm)
    kept[role] = (key, runner)
    return runner


def release_kept(model: DiffusionModel) -> None:
    """Frees the runners ``model`` keeps (their graphs and caches) now."""
    for _, runner in _kept(model).values():
        runner.release()
    _kept(model).clear()


def _kept(model: DiffusionModel) -> dict[str, tuple[tuple, Runner]]:
    if not hasattr(model, "_kept_runners"):
        model._kept_runners = {}
    return model._kept_runners
