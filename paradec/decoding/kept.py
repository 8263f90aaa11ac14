"""Runners kept across generations, so that CUDA graphs are captured once per shape.

An engine (``paradec.engine.Engine``, one per model) keeps at most one runner per role:
``blocks`` (the think blocks of a one-process run, or this rank's share of them under torchrun)
and ``summary`` (the summary that rank 0 decodes from the gathered blocks). A request with the
same ``RunnerKey`` resets the kept runner in place and replays its graphs; a graphed request of
another key releases it first (its buffers hold KV caches). Requests whose steps are called,
not replayed (``cuda_graphs=False``, CPU), get a runner of their own and leave the kept ones alone.
Kept runners hold their memory until then, or until ``release``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec.canvas import CanvasLayout
from paradec.config import GenerationConfig, RequestParams, RuntimeSettings
from paradec.decoding.fastdllm_rules import FastDLLMRules
from paradec.decoding.runner import Runner
from paradec.decoding.step import captures
from paradec.models.loading import DiffusionModel


@dataclass(frozen=True)
class RunnerKey:
    """What fixes a runner's static buffers and captured graphs; a request of an equal key can
    replay them. The request's parameters and the runtime settings (a runner decodes with its
    own config, so it is handed only to a request of the same ones; the distributed settings
    never reach it), the canvas and batch shapes, the weights the graphs read, and the runner's
    role (its think blocks, its summary, Fast-dLLM's rules)."""

    request: RequestParams
    runtime: RuntimeSettings
    canvas_len: int
    batch: int
    prompt_len: int  # the longest prompt
    weights: tuple[int, torch.dtype, torch.device]  # the embedding's address, dtype and device
    think_blocks: tuple[int, ...] | None
    summary: bool | None
    fastdllm: FastDLLMRules | None

    @classmethod
    def of(cls, model: DiffusionModel, config: GenerationConfig, layout: CanvasLayout, prompts: list[list[int]],
           think_blocks: list[int] | None, summary: bool | None, fastdllm: FastDLLMRules | None) -> RunnerKey:
        weight = model.module.embed.weight  # graphs hold the addresses of the weights
        return cls(config.request, config.runtime, layout.length, len(prompts), max(map(len, prompts)),
                   (weight.data_ptr(), weight.dtype, weight.device),
                   None if think_blocks is None else tuple(think_blocks), summary, fastdllm)


class KeptRunners:
    """One model's kept runners, by role. Not thread-safe: its engine lends it to one thread at
    a time."""

    def __init__(self, model: DiffusionModel):
        self.model = model
        self.by_role: dict[str, tuple[RunnerKey, Runner]] = {}

    def runner(self, config: GenerationConfig, layout: CanvasLayout, prompts: list[list[int]],
               think_blocks: list[int] | None = None, summary: bool | None = None,
               fastdllm: FastDLLMRules | None = None) -> Runner:
        """A runner for these arguments (``Runner``'s); the kept one, reset, when its key matches."""
        model = self.model
        if not captures(config, model.device):
            return Runner(model, config, layout, prompts, think_blocks=think_blocks, summary=summary,
                          fastdllm=fastdllm)
        role = "summary" if think_blocks == [] and summary else "blocks"
        key = RunnerKey.of(model, config, layout, prompts, think_blocks, summary, fastdllm)
        if role in self.by_role and self.by_role[role][0] == key:
            runner = self.by_role[role][1]
            runner.reset(prompts)
            return runner
        if role in self.by_role:
            self.by_role.pop(role)[1].release()
        runner = Runner(model, config, layout, prompts, think_blocks=think_blocks, summary=summary, fastdllm=fastdllm)
        self.by_role[role] = (key, runner)
        return runner

    def release(self) -> None:
        """Frees the kept runners (their graphs and caches) now."""
        for _, runner in self.by_role.values():
            runner.release()
        self.by_role.clear()

