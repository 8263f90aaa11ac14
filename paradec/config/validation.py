"""``validate``: the one place that decides whether a config can decode, and where.

It runs every check: each part's own (``paradec.config.params``), those across parts (windows
are a runtime setting over the request's canvas), and, given the context they need, those of
the place the config decodes in — the canvas layout and which of its groups a runner decodes,
Fast-dLLM's window bound, the ranks the think blocks are spread over, an AR answerer, the
model's maximum length. ``GenerationConfig`` runs it without context when it is made; the code
that has the context (``paradec.generate``, a runner, the distributed canvas) runs it with.
Every refusal is a ``ConfigError`` naming the setting and what it may be.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from paradec.config.params import check_budgets, check_distributed, check_request, check_runtime
from paradec.errors import ConfigError

if TYPE_CHECKING:
    from paradec.canvas import CanvasLayout
    from paradec.config.generation import GenerationConfig


def validate(config: GenerationConfig, *, layout: CanvasLayout | None = None,
             think_blocks: Sequence[int] | None = None, summary: bool | None = None,
             window_steps: int | None = None, ranks: int = 1, answerer: bool = False,
             prompt_tokens: int = 0, max_length: int | None = None, shifted: bool = False) -> None:
    """Raises ``ConfigError`` unless ``config`` can decode in this context.

    layout: the canvas it decodes (needed by ``think_blocks``, ``summary`` and ``max_length``).
    think_blocks, summary: what one runner decodes, as ``Runner`` takes them (default: every
    think block, and the summary when it decodes all of them). window_steps: Fast-dLLM's bound
    on a window's steps (``FastDLLMRules.window_steps``). ranks: how many ranks the think blocks
    are spread over. answerer: an AR answerer reads the think blocks. max_length, prompt_tokens:
    the model's maximum length, which the longest prompt and the canvas must fit in. shifted: the
    model predicts a position from the one before it (Dream; spreading its blocks needs headers).
    """
    check_request(config)
    check_runtime(config)
    check_distributed(config)
    _check_windows(config)
    if think_blocks is not None or summary is not None:
        _check_runner_groups(config, _needs(layout, "think_blocks and summary"), think_blocks, summary)
    if window_steps is not None and config.cache_mode not in ("prefix", "dual"):
        raise ConfigError("FastDLLMRules.window_steps bounds a windowed cache's windows (cache='prefix' or 'dual')")
    if window_steps is not None and config.delayed_kv:
        raise ConfigError("delayed_kv does not combine with Fast-dLLM's rules (their refresh commits over a region "
                          "of its own)")
    if window_steps is not None and config.partial_refresh:
        raise ConfigError("partial_refresh does not combine with Fast-dLLM's rules (their refresh commits over a "
                          "region of its own)")
    if ranks > 1:
        _check_spread(config, ranks)
        if shifted:
            _check_spread_headers(_needs(layout, "shifted"), ranks)
    if answerer:
        _check_answerer(config, ranks)
    if max_length is not None:
        _check_length(config, _needs(layout, "max_length"), prompt_tokens, max_length)


def _check_windows(config: GenerationConfig) -> None:
    """Windows (runtime) over the request's canvas: nap's windows, a cache only where windowed,
    and every phase's steps enough for its windows."""
    if config.window is not None and config.mode != "nap":
        hint = " (block mode's window is block_len)" if config.mode == "block" else ""
        raise ConfigError(f"window applies to mode='nap' only{hint}, got mode={config.mode!r}")
    if config.window is not None and config.summary == "concurrent":
        raise ConfigError("window needs summary='after' (a concurrent summary attends to whole blocks)")
    if config.cache is not None and config.window_len is None:
        raise ConfigError(
            f"cache={config.cache!r} applies to windowed decoding (mode='block', or mode='nap' with window set)"
        )
    if config.refresh_every is not None and config.cache_mode in (None, "none"):
        raise ConfigError("refresh_every applies to a windowed cache (cache='prefix' or 'dual')")
    if config.partial_refresh and config.cache_mode != "dual":
        raise ConfigError(f"partial_refresh applies to the dual cache (cache='dual' with mode='block', or mode='nap' "
                          f"with window set), got cache={config.cache_mode!r}")
    if config.delayed_kv and config.cache_mode not in ("prefix", "dual"):
        raise ConfigError(f"delayed_kv applies to a windowed cache (cache='prefix' or 'dual' with mode='block', or "
                          f"mode='nap' with window set), got cache={config.cache_mode!r}")
    if config.window is not None:  # block mode's windows are the request's own: checked with it
        check_budgets(config, config.window)


def _check_runner_groups(config: GenerationConfig, layout: CanvasLayout, think_blocks: Sequence[int] | None,
                         summary: bool | None) -> None:
    """A runner decodes a subset of the think blocks; apart from the others (some blocks, or
    the summary on its own) only under ``isolated`` attention."""
    m = layout.num_think_blocks
    groups = list(range(m)) if think_blocks is None else sorted(think_blocks)
    if not set(groups) <= set(range(m)) or (m == 0 and think_blocks):
        raise ConfigError(f"think_blocks must be a subset of range({m}), got {think_blocks}")
    if (len(groups) < m or summary is not None) and config.attention == "canvas":
        raise ConfigError(
            "attention='canvas' needs every think block on one device (each block attends to all "
            "the others); decoding blocks apart needs attention='isolated'"
        )


def _check_spread(config: GenerationConfig, ranks: int) -> None:
    """Think blocks spread over ranks: each must be decodable apart from the others."""
    if config.attention != "isolated":
        raise ConfigError(
            f"attention={config.attention!r} cannot be spread over {ranks} ranks: every block "
            "attends to every other, so all blocks must sit on one device; use attention='isolated' "
            "or run one process"
        )
    if not config.canvas:
        raise ConfigError(f"mode={config.mode!r} has no think blocks to spread; run it in one process")
    if config.summary == "concurrent":
        raise ConfigError(
            "summary='concurrent' attends to every think block at every step, so it cannot be spread "
            "over ranks; use summary='after' or run one process"
        )


def _check_spread_headers(layout: CanvasLayout, ranks: int) -> None:
    """A shifted model predicts a headerless block's first token from the column before it, the
    previous block's last: with the blocks on other ranks that column is still masked there."""
    headerless = [j + 1 for j in range(1, layout.num_think_blocks) if layout.bodies[j][0] == layout.blocks[j][0]]
    if headerless:
        raise ConfigError(
            f"think blocks {headerless} have no header (the checkpoint's paradec.think_header is empty), so a "
            "shifted model (Dream) predicts each one's first token from the previous block's last column, which "
            f"another of the {ranks} ranks may decode; give the blocks a header or run one process"
        )


def _check_answerer(config: GenerationConfig, ranks: int) -> None:
    if not config.canvas:
        raise ConfigError(f"an answerer reads think blocks: it needs mode='nap', got mode={config.mode!r}")
    if ranks > 1 and config.results_on != "rank0":
        raise ConfigError("an answerer runs on rank 0 where the results are: use results_on='rank0'")


def _check_length(config: GenerationConfig, layout: CanvasLayout, prompt_tokens: int, max_length: int) -> None:
    if prompt_tokens + layout.length > max_length:
        canvas = ("blocks, block_len or summary_len (max_new_tokens)" if config.canvas
                  else "max_new_tokens (answer_len; gen_length in paradec.compat's LLaDA and Fast-dLLM calls)")
        raise ConfigError(
            f"prompt ({prompt_tokens} tokens) + canvas ({layout.length} tokens) exceeds the model's maximum "
            f"length {max_length}; lower {canvas} or shorten the prompt"
        )


def _needs(layout: CanvasLayout | None, what: str) -> CanvasLayout:
    if layout is None:
        raise TypeError(f"validate: {what} need the layout (layout=...)")
    return layout
