"""The layout of what a generation writes after the prompt (DESIGN.md contract 1).

Positions are absolute: the prompt holds ``0..P-1``, then each think block's header and body,
then the summary's header and body. Headers are fixed tokens, never masked, never rewritten.
Every position belongs to a *group*: think block j is group j, the summary group m; the plain
answer region of the non-canvas modes is group 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from paradec.config import GenerationConfig
from paradec.models.attention import SUMMARY, AttentionSpec


@dataclass(frozen=True)
class CanvasLayout:
    """The generated region, relative to the end of the prompt.

    template: [C] header ids, the mask id on body positions; groups: [C] group per position;
    editable: [C] True on body positions; segments: [C] attention segment ids;
    bodies: each group's body range [start, end); blocks: each group's whole range incl. header.
    """

    template: torch.Tensor
    groups: torch.Tensor
    editable: torch.Tensor
    segments: torch.Tensor
    blocks: tuple[tuple[int, int], ...]
    bodies: tuple[tuple[int, int], ...]
    num_think_blocks: int  # m; 0 for a plain answer region

    @property
    def length(self) -> int:
        return self.template.numel()

    @property
    def num_groups(self) -> int:
        return len(self.blocks)

    @property
    def summary_group(self) -> int | None:
        return self.num_think_blocks if self.num_think_blocks else None

    def attention_spec(self, prompt_len: int, mode: str) -> AttentionSpec:
        """The absolute attention spec of this layout after a prompt of ``prompt_len`` tokens."""
        shifted = tuple((prompt_len + s, prompt_len + e) for s, e in self.blocks)
        if self.summary_group is None:
            return AttentionSpec(mode, prompt_len, shifted)
        return AttentionSpec(mode, prompt_len, shifted[:-1], shifted[-1])


def check_headers(headers: list[list[int]], unk_id: int | None, names: list[str]) -> None:
    """Warns when a tokenizer cannot hold the canvas headers apart: a header that tokenises to
    the unknown token, or two headers with the same ids (a model could not tell its blocks apart)."""
    for name, ids in zip(names, headers):
        if unk_id is not None and unk_id in ids:
            warnings.warn(f"the header {name!r} tokenises to the unknown token ({list(ids)}); add it to the "
                          f"tokenizer (as a special token) so the canvas headers mean something", stacklevel=3)
    seen: dict[tuple[int, ...], str] = {}
    for name, ids in zip(names, headers):
        if tuple(ids) in seen:
            warnings.warn(f"the headers {seen[tuple(ids)]!r} and {name!r} tokenise to the same ids {list(ids)}: "
                          f"the model cannot tell those blocks apart", stacklevel=3)
        seen.setdefault(tuple(ids), name)


def canvas_layout(config: GenerationConfig, mask_id: int, headers: list[list[int]] | None = None) -> CanvasLayout:
    """``nap``: m think blocks and a summary, each a header then a masked body; other modes: one
    masked answer region with no header. ``headers``: m + 1 header id lists (think blocks, then
    the summary), required for ``nap``."""
    if not config.canvas:
        n = config.answer_len
        return CanvasLayout(
            template=torch.full((n,), mask_id),
            groups=torch.zeros(n, dtype=torch.long),
            editable=torch.ones(n, dtype=torch.bool),
            segments=torch.ones(n, dtype=torch.long),
            blocks=((0, n),),
            bodies=((0, n),),
            num_think_blocks=0,
        )
    m = config.blocks
    assert headers is not None and len(headers) == m + 1
    body_lens = [config.block_len] * m + [config.summary_len]
    template, groups, editable, segments, blocks, bodies = [], [], [], [], [], []
    for g, (header, body_len) in enumerate(zip(headers, body_lens)):
        start = len(template)
        template += list(header) + [mask_id] * body_len
        groups += [g] * (len(header) + body_len)
        editable += [False] * len(header) + [True] * body_len
        segments += [SUMMARY if g == m else g + 1] * (len(header) + body_len)
        blocks.append((start, len(template)))
        bodies.append((start + len(header), len(template)))
    return CanvasLayout(
        template=torch.tensor(template),
        groups=torch.tensor(groups),
        editable=torch.tensor(editable),
        segments=torch.tensor(segments),
        blocks=tuple(blocks),
        bodies=tuple(bodies),
        num_think_blocks=m,
    )
