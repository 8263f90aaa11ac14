"""``Progress``: what ``on_step`` sees of a decode between two steps — read, never the runner."""

from __future__ import annotations

import torch


class Progress:
    """A read-only view of a running decode, handed to ``on_step`` between steps (between
    batches of graph replays when steps replay as CUDA graphs).

    step: the global step about to run. canvas, trace: [B, C] copies, taken at first read, of the
    tokens after each prompt and of the step that committed each position (-1: not yet, or a
    header). Copies, not views: torch has no read-only tensors, and a view would let a callback
    write into the buffers the runner (and its captured graphs) decodes from, and would change
    under a caller that keeps it past the call; a copy costs one [B, C] device copy, small next
    to a step, and only when read. committed(): [B, G] tokens committed so far in each group's
    body (a host tensor; one device sync). A view is meant for the call it is handed to.
    """

    def __init__(self, runner, step: int):
        self._runner = runner
        self.step = step
        self._canvas: torch.Tensor | None = None
        self._trace: torch.Tensor | None = None

    @property
    def canvas(self) -> torch.Tensor:
        if self._canvas is None:
            self._canvas = self._runner.canvas.clone()
        return self._canvas

    @property
    def trace(self) -> torch.Tensor:
        if self._trace is None:
            self._trace = self._runner.trace.clone()
        return self._trace

    def committed(self) -> torch.Tensor:
        return self._runner.committed()

    def __repr__(self) -> str:
        return f"Progress(step={self.step})"
