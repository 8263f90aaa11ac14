"""paradec.generate(): validate, lay out the canvas, run, return results."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field


from paradec import hybrid
from paradec.answers import extract_answer
from paradec.canvas import CanvasLayout, canvas_layout
from paradec.config import GenerationConfig
from paradec.decoding.kept import kept_runner
from paradec.decoding.runner import Runner
from paradec.distributed import canvas as distributed_canvas
from paradec.distributed.env import current_env
from paradec.errors import ConfigError, InputError
from paradec.models.loading import DiffusionModel

_PLACEHOLDER = "\u2063PARADEC_USER_TEXT\u2063"
_REUSE = threading.Lock()  # one generate() at a time uses a model's kept runner

Prompt = str | Sequence[int]


@dataclass
class GenerationResult:
    """One request's output.

    blocks: the think blocks' text (empty outside ``nap``); summary: the summary's text (the
    answer region's text outside ``nap``); answer: extracted from the summary (``#### N`` or
    ``\\boxed{}``), None when absent; token_ids: every position after the prompt; trace: for each
    of those positions the step that committed it, -1 for headers; nfe: model forwards;
    timings: seconds per phase (prefill, forward, unmask, bookkeeping, think, summary, total).
    """

    blocks: list[str]
    summary: str
    answer: str | None
    token_ids: list[int]
    trace: list[int]
    nfe: int
    steps: int
    timings: dict[str, float]
    prompt_ids: list[int]
    block_token_ids: list[list[int]] = field(default_factory=list)
    summary_token_ids: list[int] = field(default_factory=list)
    placement: dict | None = None  # under torchrun: blocks of each rank, idle ranks, prompt-KV and gather choices
    answerer: hybrid.AnswerOutput | None = None  # NAR→AR: what the AR answerer wrote
    rank_timings: list[dict] | None = None  # under torchrun: per rank, seconds per phase and forwards


def generate(
    model: DiffusionModel,
    prompts: Prompt | Sequence[Prompt],
    config: GenerationConfig | None = None,
    answerer=None,
    answer_tokens: int = 64,
    with_summary: bool = False,
    on_step=None,
    **overrides,
) -> GenerationResult | list[GenerationResult]:
    """Decode one prompt or a batch (strings, or token id lists) with ``config`` and overrides.
    Without ``config`` the checkpoint's own defaults (``paradec.generation`` in its config.json,
    e.g. the canvas it was trained on) come first, then paradec's.

    answerer: NAR→AR (``paradec.hybrid``): an ``ARModel`` that reads the question and the think
    blocks as text and writes the answer (up to ``answer_tokens`` tokens) after the diffusion
    model has decoded the blocks — and the summary too with ``with_summary`` (else it is left
    undecoded). ``result.answerer`` holds what it wrote; ``result.answer`` is its extracted
    answer. Under torchrun it runs on rank 0, where the results are.

    on_step: called as ``on_step(runner, step)`` between steps with the canvas so far
    (``runner.committed()`` counts each block's committed tokens); it may raise to stop. One
    process only (not under torchrun).

    A single prompt gives a single result; a list of prompts gives a list. Inside a torchrun job
    of several ranks every rank calls this with the same arguments; the think blocks are spread
    over the ranks and the result is returned on rank 0 (None elsewhere, unless
    ``results_on="all"``).
    """
    config = resolve_config(model, config, **overrides)
    summary = _check_answerer(answerer, answer_tokens, config, current_env()) or with_summary
    single = isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and len(prompts) > 0 and all(isinstance(t, int) for t in prompts)
    )
    batch = [prompts] if single else list(prompts)
    if not batch:
        raise InputError("prompts is empty")
    layout = build_layout(model, config)
    encoded = [encode_prompt(model, p, config, layout) for p in batch]
    longest = max(map(len, encoded))
    if longest + layout.length > model.spec.max_length:
        raise ConfigError(
            f"prompt ({longest} tokens) + canvas ({layout.length} tokens) exceeds the model's maximum "
            f"length {model.spec.max_length}; shorten blocks/block_len/summary_len/answer_len"
        )
    env = current_env()
    placement = rank_timings = None
    if on_step is not None and env.distributed:
        raise ConfigError("on_step runs in one process only; under torchrun progress is not reported per step")
    if env.distributed:
        with _REUSE:  # the kept runners are this process's
            spread = distributed_canvas.decode(model, config, layout, encoded, env, summary=summary)
        if spread is None:
            return None  # results live on rank 0 (results_on="all" sends them everywhere)
        output, placement, rank_timings = spread.output, spread.placement, spread.rank_timings
    elif _REUSE.acquire(blocking=False):
        try:
            output = kept_runner(model, config, layout, encoded, summary=None if summary else False).run(on_step=on_step)
        finally:
            _REUSE.release()
    else:  # another thread is decoding with the kept runner
        output = Runner(model, config, layout, encoded, summary=None if summary else False).run(on_step=on_step)
    results = [
        _result(model, layout, encoded[r], output.canvas[r].tolist(), output.trace[r].tolist(), output, summary)
        for r in range(len(batch))
    ]
    for result in results:
        result.placement, result.rank_timings = placement, rank_timings
    if answerer is not None:
        questions = [p if isinstance(p, str) else _text(model, list(p)) for p in batch]
        summaries = [r.summary if with_summary else None for r in results]
        if config.temperature == 0:  # greedy: the whole batch at once
            outs = hybrid.answer_batch(answerer, questions, [r.blocks for r in results], answer_tokens, summaries)
        else:  # sampled: each request from its own seed
            outs = [hybrid.answer(answerer, q, r.blocks, answer_tokens, summary=s, temperature=config.temperature,
                                  seed=config.seed + i)
                    for i, (q, r, s) in enumerate(zip(questions, results, summaries))]
        for result, out in zip(results, outs):
            result.answerer, result.answer = out, out.answer
    return results[0] if single else results


def _check_answerer(answerer, answer_tokens: int, config: GenerationConfig, env) -> bool:
    """Validates an answerer before any work; returns whether the summary is decoded anyway
    (True without an answerer)."""
    if answerer is None:
        return True
    if not isinstance(answerer, hybrid.ARModel):
        raise InputError(f"answerer must be a paradec.models.ar.ARModel (ARModel.load(path)), got "
                         f"{type(answerer).__name__}")
    if not config.canvas:
        raise ConfigError(f"an answerer reads think blocks: it needs mode='nap', got mode={config.mode!r}")
    if isinstance(answer_tokens, bool) or not isinstance(answer_tokens, int) or answer_tokens < 1:
        raise ConfigError(f"answer_tokens must be an int >= 1, got {answer_tokens!r}")
    if env.distributed and config.results_on != "rank0":
        raise ConfigError("an answerer runs on rank 0 where the results are: use results_on='rank0'")
    return False


def _text(model: DiffusionModel, ids: list[int]) -> str:
    if model.tokenizer is None:
        raise InputError("an answerer reads text: give string prompts or a model with a tokenizer")
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def resolve_config(model: DiffusionModel, config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """``config`` (default: the checkpoint's own ``paradec.generation`` defaults over paradec's)
    with ``overrides`` applied: the config ``generate`` decodes with."""
    if config is None:
        config = GenerationConfig.build(None, **model.generation)
    return GenerationConfig.build(config, **overrides)


def build_layout(model: DiffusionModel, config: GenerationConfig) -> CanvasLayout:
    headers = None
    if config.canvas:
        headers = [model.think_header_ids(i + 1) for i in range(config.blocks)] + [model.summary_header_ids()]
    return canvas_layout(config, model.spec.mask_id, headers)


def encode_prompt(model: DiffusionModel, prompt: Prompt, config: GenerationConfig, layout: CanvasLayout) -> list[int]:
    """Token ids of one prompt. Text goes through the chat template when the tokenizer has one
    (and ``config.chat_template``); user text is never tokenised into special tokens."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("a prompt is empty")
        if model.tokenizer is None:
            raise InputError("this model has no tokenizer; pass prompts as token ids")
        ids = encode_text(model.tokenizer, prompt, config.chat_template)
    else:
        ids = [int(t) for t in prompt]
        if not ids:
            raise InputError("a prompt is empty")
        bad = [t for t in ids if not 0 <= t < model.spec.vocab_size]
        if bad:
            raise InputError(f"prompt token ids must lie in [0, {model.spec.vocab_size}); got {bad[:5]}")
    structure = {model.spec.mask_id} | _single_token_headers(layout)
    found = sorted(structure & set(ids))
    if found:
        raise InputError(
            f"the prompt holds the mask id or a canvas structure token {found}; user input may not contain them"
        )
    return ids


def encode_text(tokenizer, text: str, chat_template: bool = True) -> list[int]:
    """Token ids of a user's text: through the chat template when the tokenizer has one (and
    ``chat_template``), never tokenised into special tokens. The trainer encodes prompts with
    this too, so a model sees the same ids in training and decoding."""

    def user(t: str) -> list[int]:
        return tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        return user(text)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], tokenize=False, add_generation_prompt=True
    )
    before, after = rendered.split(_PLACEHOLDER)
    encode = lambda t: tokenizer.encode(t, add_special_tokens=False) if t else []  # noqa: E731
    return encode(before) + user(text) + encode(after)


def _single_token_headers(layout: CanvasLayout) -> set[int]:
    """Header ids that are whole headers on their own (special tokens such as ``<summary>``)."""
    ids = set()
    for g in range(layout.num_groups):
        start, body = layout.blocks[g][0], layout.bodies[g][0]
        if body - start == 1:
            ids.add(int(layout.template[start]))
    return ids


def _result(model, layout: CanvasLayout, prompt_ids, canvas: list[int], trace: list[int], output,
            summary_decoded: bool = True) -> GenerationResult:
    stops = set(model.spec.stop_ids)

    def body(g: int) -> list[int]:
        start, end = layout.bodies[g]
        tokens = canvas[start:end]
        cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        return tokens[:cut]

    decode = (lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True)) if model.tokenizer else str
    m = layout.num_think_blocks
    block_ids = [body(g) for g in range(m)]
    summary_ids = body(m if m else 0) if summary_decoded or not m else []
    summary = decode(summary_ids)
    return GenerationResult(
        blocks=[decode(ids) for ids in block_ids],
        summary=summary,
        answer=extract_answer(summary),
        token_ids=canvas,
        trace=trace,
        nfe=output.nfe,
        steps=output.steps,
        timings=output.timings,
        prompt_ids=list(prompt_ids),
        block_token_ids=block_ids,
        summary_token_ids=summary_ids,
    )
