"""paradec.generate(): validate, lay out the canvas, run, return results."""

from __future__ import annotations

import atexit
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from paradec import hybrid
from paradec.answers import extract_answer
from paradec.canvas import CanvasLayout, canvas_layout, check_headers
from paradec.config import GenerationConfig, settings_help, validate
from paradec.config.generation import merged_settings
from paradec.decoding.progress import Progress
from paradec.decoding.runner import DecodeOutput, Runner
from paradec.distributed import canvas as distributed_canvas
from paradec.distributed import teardown
from paradec.distributed.env import current_env, init_distributed, torchrun_without_group
from paradec.engine import engine_for
from paradec.errors import ConfigError, InputError
from paradec.models.loading import DiffusionModel

_PLACEHOLDER = "\u2063PARADEC_USER_TEXT\u2063"
log = logging.getLogger(__name__)
_ROLES = ("system", "user", "assistant")

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str, optional "name"}
Prompt = str | Sequence[int] | Sequence[Message]


@dataclass(repr=False)
class GenerationResult:
    """One request's output.

    text: the final answer text in every mode — the summary in ``nap``, the answer region
    elsewhere, what the answerer wrote with an ``answerer`` — cut before the earliest ``stop``
    string; finish_reason: ``"stop"`` when a stop string or an EOS ended the text, ``"length"``
    when it filled its region (``max_new_tokens``). blocks: the think blocks' text (empty outside
    ``nap``); summary: the summary's text (the answer region's text outside ``nap``; equal to
    ``text`` unless an answerer wrote the answer); answer: extracted from the text (``#### N`` or
    ``\\boxed{}``), None when absent; token_ids: every position after the prompt (cut with the
    text at a stop string: the whole tokens before it); trace: for each of those positions the
    step that committed it, -1 for headers; groups: each position's group (think block j is j, the
    summary m; the answer region 0), so ``paradec.plots.decode_order_png(result.trace,
    result.groups, path)`` draws the decode order; nfe: model forwards; timings: seconds per phase
    (prefill, forward, unmask, bookkeeping, think, summary, total). ``repr`` is one short line.
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
    text: str | None = None  # None: the summary's text
    finish_reason: str = "length"
    groups: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.text is None:
            self.text = self.summary

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        parts = [f"text={text!r}", f"finish_reason={self.finish_reason!r}"]
        if self.answer is not None:
            parts.append(f"answer={self.answer!r}")
        if self.blocks:
            parts.append(f"blocks={len(self.blocks)}")
        parts += [f"tokens={len(self.token_ids)}", f"steps={self.steps}", f"nfe={self.nfe}"]
        return f"GenerationResult({', '.join(parts)})"


def generate(
    model: DiffusionModel,
    prompts: Prompt | Sequence[Prompt],
    config: GenerationConfig | None = None,
    answerer=None,
    answer_tokens: int = 64,
    with_summary: bool = False,
    on_step=None,
    progress: bool = False,
    streamer=None,
    attention_mask=None,
    **overrides,
) -> GenerationResult | list[GenerationResult] | list[list[GenerationResult]]:
    """Decode one prompt or a batch with ``config`` and overrides (the settings below).

    prompts: one prompt — a string, token ids (a list or a 1-D integer tensor) or chat messages
    (``[{"role": "user", "content": ...}, ...]``, rendered by the tokenizer's chat template, their
    text never tokenised into special tokens) — or a list of prompts. A 2-D tensor ``[batch,
    length]`` is a batch, even of one row (a list of one result comes back); a 1-D tensor is
    one prompt. Padded rows take transformers' ``attention_mask`` (1: a prompt token, 0: padding,
    on the left or the right), or pass a tokenizer's output (``input_ids`` and ``attention_mask``)
    as ``prompts``; a row of a 2-D tensor batch that starts or ends with the pad id, without a
    mask, is warned about (as transformers warns of padding it sees): its pads would be read as
    prompt, though the row may hold that id as text.
    Without ``config`` the checkpoint's own defaults (``paradec.generation`` in its config.json,
    e.g. the canvas it was trained on) come first, then paradec's.

    answerer: NAR→AR (``paradec.hybrid``): an ``ARModel`` that reads the question and the think
    blocks as text and writes the answer (up to ``answer_tokens`` tokens) after the diffusion
    model has decoded the blocks — and the summary too with ``with_summary`` (else it is left
    undecoded). ``result.answerer`` holds what it wrote; ``result.answer`` is its extracted
    answer. Under torchrun it runs on rank 0, where the results are.

    on_step: called as ``on_step(progress)`` between steps with a read-only view of the decode
    (``paradec.decoding.progress.Progress``: ``step``; ``canvas`` and ``trace``, [B, C] copies of
    the tokens so far and of the step that committed each; ``committed()``, [B, G] committed
    tokens per block); it may raise to stop. One process only (not under torchrun). progress: a
    tqdm bar over the canvas's committed tokens (one process only).

    streamer: receives the answer text as it is committed, with transformers' streamer protocol
    (``TextStreamer``, ``TextIteratorStreamer``): ``put(prompt_ids)`` first (a ``[1, P]`` tensor, which
    ``skip_prompt=True`` skips), then ``put(ids)`` (1-D tensors) as the answer region's committed
    left-to-right prefix grows — diffusion commits out of order, so a token is streamed once every
    position before it is committed — and ``end()`` once. What it receives concatenates to the
    final ``text``'s tokens: ids stop at an EOS, and with ``stop`` strings ids that might begin a
    stop string are held back until they cannot (a token holding both the text's last characters
    and a stop string's first is not streamed). One prompt, one sequence, one process.

    stop strings: the text and token ids are cut before the earliest one (finish_reason
    ``"stop"``); in one process decoding ends as soon as every request's committed left-to-right
    answer prefix holds one (then ``nfe``/``steps`` count the steps made; the other groups must be
    done). max_new_tokens bounds ``text``'s tokens in every mode (see the settings).

    A single prompt gives a single result; a list of prompts gives a list. With
    ``num_return_sequences`` n > 1 a single prompt gives a list of n results, a batch a list of
    such lists (grouped per prompt). Inside a torchrun job
    of several ranks every rank calls this with the same arguments; the think blocks are spread
    over the ranks and the result is returned on rank 0 (None elsewhere, unless
    ``results_on="all"``). When torchrun started the process and nobody set up the process group,
    generate() sets it up (``paradec.distributed.init_distributed``) before decoding.

    Settings (keyword arguments, or fields of ``config``; unset: the checkpoint's own defaults,
    then paradec's):
    """
    check_model(model)
    config = resolve_config(model, config, **overrides)
    env = _process_env(model)
    summary = _check_answerer(answerer, answer_tokens) or with_summary
    single, batch = split_prompts(prompts, attention_mask)
    if attention_mask is None and not single and (isinstance(prompts, torch.Tensor)
                                                  or type(prompts).__module__ == "numpy"):
        _check_unpadded(model, batch)
    _check_text_options(model, config, env, streamer, answerer, single)
    layout = build_layout(model, config)
    n = config.num_return_sequences
    encoded = [ids for p in batch for ids in [encode_prompt(model, p, config, layout)] * n]
    batch = [p for p in batch for _ in range(n)]  # prompt-major: request p*n + i is prompt p's sample i
    validate(config, layout=layout, ranks=env.world_size, answerer=answerer is not None,
             prompt_tokens=max(map(len, encoded)), max_length=model.spec.max_length, shifted=model.spec.shift_logits)
    if config.seed + len(encoded) > 2**63:  # row r draws from seed + r
        raise ConfigError(f"seed must be an int in [0, 2**63 - {len(encoded)}] for {len(encoded)} rows (row r samples "
                          f"with seed + r), got {config.seed}")
    engine = engine_for(model)
    placement = rank_timings = None
    if on_step is not None and env.distributed:
        raise ConfigError("on_step runs in one process only; under torchrun progress is not reported per step")
    if not isinstance(progress, bool):
        raise ConfigError(f"progress must be a bool, got {progress!r}")
    if progress and env.distributed:
        raise ConfigError("progress=True shows a bar in one process only; under torchrun each rank's timings "
                          "come back in result.rank_timings")
    bar = _ProgressBar(on_step, layout, len(batch)) if progress else None
    on_step = bar or on_step
    watcher = None
    if answerer is None and not env.distributed and (streamer is not None or config.stop):
        watcher = _Watcher(on_step, model, layout, config, streamer, encoded[0])
        on_step = watcher
    try:
        if env.distributed:
            spread = distributed_canvas.decode(engine, config, layout, encoded, env, summary=summary)
            if spread is None:
                return None  # results live on rank 0 (results_on="all" sends them everywhere)
            output, placement, rank_timings = spread.output, spread.placement, spread.rank_timings
        else:
            with engine.runner(config, layout, encoded, summary=None if summary else False) as runner:
                output = _run(runner, on_step)
        if bar is not None:
            bar.close()
        results = [
            make_result(model, layout, encoded[r], output.canvas[r].tolist(), output.trace[r].tolist(), output, summary,
                    config.stop)
            for r in range(len(batch))
        ]
        if watcher is not None:
            watcher.finish(results[0])
    finally:
        if streamer is not None:
            streamer.end()
    for result in results:
        result.placement, result.rank_timings = placement, rank_timings
    if answerer is not None:
        questions = [_question(model, p, ids) for p, ids in zip(batch, encoded)]
        summaries = [r.summary if with_summary else None for r in results]
        if config.temperature == 0:  # greedy: the whole batch at once
            outs = hybrid.answer_batch(answerer, questions, [r.blocks for r in results], answer_tokens, summaries)
        else:  # sampled: each request from its own seed
            outs = [hybrid.answer(answerer, q, r.blocks, answer_tokens, summary=s, temperature=config.temperature,
                                  seed=config.seed + i)
                    for i, (q, r, s) in enumerate(zip(questions, results, summaries))]
        for result, out in zip(results, outs):
            text, cut = _cut_text(out.text, config.stop)
            result.answerer, result.text = out, text
            result.answer = extract_answer(text) if cut else out.answer
            result.finish_reason = "stop" if cut or out.stopped else "length"
    if n > 1:
        grouped = [results[p * n:(p + 1) * n] for p in range(len(results) // n)]
        return grouped[0] if single else grouped
    return results[0] if single else results


generate.__doc__ += settings_help() + "\n"


def _check_answerer(answerer, answer_tokens: int) -> bool:
    """Checks an answerer and its budget (``validate`` checks the config it needs); returns
    whether the summary is decoded anyway (True without an answerer)."""
    if answerer is None:
        return True
    if not isinstance(answerer, hybrid.ARModel):
        raise InputError(f"answerer must be a paradec.models.ar.ARModel (ARModel.load(path)), got "
                         f"{type(answerer).__name__}")
    if isinstance(answer_tokens, bool) or not isinstance(answer_tokens, int) or answer_tokens < 1:
        raise ConfigError(f"answer_tokens must be an int >= 1, got {answer_tokens!r}")
    return False


def _check_text_options(model: DiffusionModel, config: GenerationConfig, env, streamer, answerer,
                        single: bool) -> None:
    """stop strings need a tokenizer; a streamer follows one sequence of one prompt, in one
    process, of the diffusion model's own answer."""
    check_stop(model, config)
    if streamer is None:
        return
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise InputError(f"streamer must have put(token_ids) and end() (transformers' TextStreamer protocol), "
                         f"got {type(streamer).__name__}")
    if not single or config.num_return_sequences > 1:
        raise ConfigError("a streamer follows one sequence: give one prompt and num_return_sequences=1")
    if env.distributed:
        raise ConfigError("a streamer runs in one process only; under torchrun the result comes back on rank 0")
    if answerer is not None:
        raise ConfigError("a streamer follows the diffusion model's answer; with an answerer the text is written "
                          "after decoding (read result.text)")


def check_stop(model: DiffusionModel, config: GenerationConfig) -> None:
    """stop strings cut text: they need a tokenizer (``generate`` and ``BatchEngine.add`` check)."""
    if config.stop and model.tokenizer is None:
        raise InputError("stop strings cut text: this model has no tokenizer (give stop=None)")


def _run(runner: Runner, on_step) -> DecodeOutput:
    """runner.run, or the state it reached when the watcher ended it early (every answer settled)."""
    started = time.perf_counter()
    try:
        return runner.run(on_step=on_step)
    except _StopEarly as stopped:
        timings = dict(runner.timings)
        timings["total"] = time.perf_counter() - started
        return DecodeOutput(runner.canvas.clone(), runner.trace.clone(), stopped.step, stopped.step, timings)


class _StopEarly(Exception):
    """Raised between steps by ``_Watcher``: every request's answer text is settled."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}")
        self.step = step


class _Watcher:
    """on_step that follows the answer region's committed left-to-right prefix: it streams that
    prefix to a streamer and ends decoding once every request's prefix holds a stop string
    (and every other group is done)."""

    def __init__(self, inner, model: DiffusionModel, layout: CanvasLayout, config: GenerationConfig, streamer,
                 prompt_ids: list[int]):
        self.inner, self.streamer, self.stop = inner, streamer, config.stop
        self.decode = text_decoder(model)
        self.stop_ids = set(model.spec.stop_ids)
        group = layout.num_think_blocks  # the summary in nap, the answer region (group 0) elsewhere
        self.start, self.end = layout.bodies[group]
        self.others = (layout.editable & (layout.groups != group)).nonzero()[:, 0]  # [K] other body columns
        self.sent = 0
        if streamer is not None:
            streamer.put(torch.tensor([prompt_ids]))

    def __call__(self, progress: Progress) -> None:
        if self.inner is not None:
            self.inner(progress)
        trace = progress.trace[:, self.start:self.end].cpu()  # [B, L]
        ids = progress.canvas[:, self.start:self.end].cpu()
        settled = []
        for r in range(trace.shape[0]):
            committed = int((trace[r] >= 0).long().cumprod(0).sum())  # the left-to-right committed prefix
            prefix = ids[r, :committed].tolist()
            ended = next((i for i, t in enumerate(prefix) if t in self.stop_ids), None)
            prefix = prefix[:ended]
            text = self.decode(prefix)
            at = find_stop(text, self.stop)
            settled.append(at is not None)
            if r == 0 and self.streamer is not None:
                safe = at if at is not None else len(text) if ended is not None else len(text) - _held(text, self.stop)
                self._send(prefix, len(prefix) if safe == len(text) else _whole_tokens(self.decode, prefix, text[:safe]))
        others = progress.trace[:, self.others.to(progress.trace.device)]  # [B, K]
        if self.stop and all(settled) and bool((others >= 0).all()):
            raise _StopEarly(progress.step)

    def _send(self, ids: list[int], upto: int) -> None:
        if upto > self.sent:
            self.streamer.put(torch.tensor(ids[self.sent:upto]))
            self.sent = upto

    def finish(self, result: GenerationResult) -> None:
        """Streams what is left of the final text's tokens (``end()`` comes from generate)."""
        if self.streamer is not None:
            self._send(result.summary_token_ids, len(result.summary_token_ids))


def text_decoder(model: DiffusionModel):
    """ids -> text as results show it (special tokens skipped; ``str`` without a tokenizer)."""
    return (lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True)) if model.tokenizer else str


def find_stop(text: str, stop: tuple[str, ...] | None) -> int | None:
    """Where the earliest stop string begins in ``text``, None when none does."""
    hits = [i for i in (text.find(s) for s in stop or ()) if i >= 0]
    return min(hits) if hits else None


def _held(text: str, stop: tuple[str, ...] | None) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string."""
    longest = 0
    for s in stop or ():
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _whole_tokens(decode, ids: list[int], text: str) -> int:
    """The most leading tokens of ``ids`` whose decoded text is a prefix of ``text`` (scanning
    back from the end: the cut is usually near it)."""
    for k in range(len(ids), 0, -1):
        if text.startswith(decode(ids[:k])):
            return k
    return 0


def _cut_text(text: str, stop: tuple[str, ...] | None) -> tuple[str, bool]:
    at = find_stop(text, stop)
    return (text, False) if at is None else (text[:at], True)


def check_model(model) -> None:
    if isinstance(model, DiffusionModel):
        return
    if isinstance(model, (str, Path)):
        raise InputError(f"model must be a loaded model, got the path {str(model)!r}: "
                         f"load it first, model = paradec.load({str(model)!r})")
    if isinstance(model, torch.nn.Module):
        raise InputError(f"model must be the DiffusionModel that paradec.load() returns, got a torch module "
                         f"({type(model).__name__}); pass the loaded model itself, not its .module")
    raise InputError(f"model must be the DiffusionModel that paradec.load() returns, got {type(model).__name__}")


def _process_env(model: DiffusionModel):
    """This process's environment; inside a torchrun job whose process group nobody started,
    the group is started here (gloo for a CPU model, NCCL for a model on this rank's GPU), so
    the ranks share the work instead of each decoding everything."""
    env = current_env()
    if env.distributed or not torchrun_without_group():
        return env
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = model.device
    if device.type == "cuda" and device.index != local_rank:
        raise ConfigError(
            f"this torchrun rank (LOCAL_RANK={local_rank}) holds its model on {device}: call "
            f"paradec.distributed.init_distributed() before paradec.load(..., device=env.device), or load "
            f"onto cuda:{local_rank}, so each rank decodes on its own GPU"
        )
    init_distributed(str(device))
    atexit.register(teardown)
    log.info("generate(): started the process group for this torchrun job of %s ranks", os.environ["WORLD_SIZE"])
    return current_env()


class _ProgressBar:
    """on_step that advances a tqdm bar by the tokens committed since the last step."""

    def __init__(self, on_step, layout: CanvasLayout, batch: int):
        from tqdm.auto import tqdm

        self.inner, self.done = on_step, 0
        total = batch * sum(end - start for start, end in layout.bodies)
        self.bar = tqdm(total=total, unit="tok", desc="paradec.generate")

    def __call__(self, progress: Progress) -> None:
        done = int(progress.committed().sum())
        self.bar.update(done - self.done)
        self.done = done
        if self.inner is not None:
            self.inner(progress)

    def close(self) -> None:
        self.bar.update(self.bar.total - self.done)
        self.bar.close()


def _question(model: DiffusionModel, prompt: Prompt, ids: list[int]) -> str:
    """The question an answerer reads: the prompt's text (a chat's last user message)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
    return users[-1] if users else _text(model, ids)


def _text(model: DiffusionModel, ids: list[int]) -> str:
    if model.tokenizer is None:
        raise InputError("an answerer reads text: give string prompts or a model with a tokenizer")
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def resolve_config(model: DiffusionModel, config: GenerationConfig | Mapping | None = None,
                   **overrides) -> GenerationConfig:
    """``config`` (default: the checkpoint's own ``paradec.generation`` defaults over paradec's;
    a mapping: settings over those defaults) with ``overrides`` applied: the config ``generate``
    decodes with."""
    if isinstance(config, Mapping):
        config, overrides = None, merged_settings(config, overrides)
    if config is not None and not isinstance(config, GenerationConfig):
        hint = (" (transformers' GenerationConfig: paradec takes its own settings; README's table maps the names)"
                if type(config).__name__ == "GenerationConfig" else "")
        raise ConfigError(f"config must be a paradec GenerationConfig, a mapping of settings or None, got "
                          f"{type(config).__module__}.{type(config).__name__}{hint}")
    if config is None:
        config = GenerationConfig.build(None, **model.generation)
    return GenerationConfig.build(config, **overrides)


def build_layout(model: DiffusionModel, config: GenerationConfig) -> CanvasLayout:
    headers = None
    if config.canvas:
        headers = [model.think_header_ids(i + 1) for i in range(config.blocks)] + [model.summary_header_ids()]
        names = [model.spec.think_header.format(i=i + 1) for i in range(config.blocks)] + [model.spec.summary_header]
        check_headers(headers, getattr(model.tokenizer, "unk_token_id", None), names)
    return canvas_layout(config, model.spec.mask_id, headers)


def split_prompts(prompts, attention_mask=None) -> tuple[bool, list]:
    """(whether ``prompts`` is one prompt, the prompts as a list). One prompt is a string, a
    sequence or 1-D integer tensor of token ids, or chat messages (a list of ``{role, content}``);
    a batch is a list of those or a 2-D integer tensor ``[batch, length]``. ``attention_mask``
    (transformers'; or a tokenizer's output as ``prompts``) drops each row's padding."""
    if isinstance(prompts, Mapping) and "input_ids" in prompts:  # a tokenizer's output (BatchEncoding)
        if attention_mask is not None:
            raise InputError("attention_mask given twice: in the tokenizer's output (prompts) and as an argument")
        return split_prompts(prompts["input_ids"], prompts.get("attention_mask"))
    if attention_mask is not None:
        return _unpadded(prompts, attention_mask)
    if isinstance(prompts, (bytes, bytearray)):
        raise InputError("prompts: bytes were given; decode them to a string (text) or give token ids as a list "
                         "or a tensor")
    if isinstance(prompts, str):
        return True, [prompts]
    if isinstance(prompts, torch.Tensor) or type(prompts).__module__ == "numpy":
        ids = _id_tensor(prompts, "prompts")
        if ids.dim() == 1:
            return True, [ids.tolist()]
        return False, ids.tolist()
    if isinstance(prompts, Mapping):
        raise InputError("prompts: one chat message was given; a conversation is a list of messages "
                         "[{'role': 'user', 'content': ...}]")
    if not isinstance(prompts, Sequence):
        raise InputError(f"prompts must be a string, token ids, chat messages or a list of those; "
                         f"got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise InputError("prompts is empty")
    if any(isinstance(p, Mapping) for p in prompts):  # a conversation: every item a message
        return True, [[_message(m, i) for i, m in enumerate(prompts)]]
    if not any(isinstance(p, (str, Sequence, Mapping, torch.Tensor)) for p in prompts):
        return True, [list(prompts)]  # token ids; each is checked by encode_prompt
    return False, list(prompts)


def _unpadded(prompts, attention_mask) -> tuple[bool, list]:
    """Token ids ``[length]`` or ``[batch, length]`` and a mask of their shape (1: a prompt
    token, 0: padding, on either side of each row): each row's prompt tokens. Lists of rows of
    different lengths (a tokenizer called without padding) are taken row by row."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and any(isinstance(p, (str, Mapping))
                                                                           for p in prompts)):
        raise InputError("attention_mask applies to token ids (a tensor or lists of ids), not to text or chat "
                         "messages")
    if _ragged(prompts) or _ragged(attention_mask):
        if not (isinstance(attention_mask, Sequence) and len(attention_mask) == len(prompts)):
            raise InputError(f"attention_mask must give a row per prompt ({len(prompts)}), as the tokenizer does")
        single, pairs = False, [(_ids_of(p, f"prompts[{r}]"), _mask_tensor(m))
                                for r, (p, m) in enumerate(zip(prompts, attention_mask))]
    else:
        ids, mask = _ids_of(prompts, "prompts"), _mask_tensor(attention_mask)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {list(mask.shape)}, the prompts {list(ids.shape)}: give one "
                             f"mask entry per token")
        single, pairs = ids.dim() == 1, list(zip(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1])))
    rows = []
    for r, (row, keep) in enumerate(pairs):
        if keep.shape != row.shape:
            raise InputError(f"attention_mask row {r} has {keep.numel()} entries for {row.numel()} tokens: give one "
                             f"mask entry per token")
        if keep.dtype.is_complex or not bool(((keep == 0) | (keep == 1)).all()):
            raise InputError("attention_mask holds 1 (a prompt token) and 0 (padding) only")
        kept = keep.bool().nonzero().flatten().tolist()
        if not kept:
            raise InputError(f"attention_mask row {r} masks every token: the prompt would be empty")
        if kept[-1] - kept[0] + 1 != len(kept):
            raise InputError(f"attention_mask row {r} has padding between prompt tokens; pad on the left or the "
                             f"right only")
        rows.append(row[kept[0] : kept[-1] + 1].tolist())
    return single, rows


def _ragged(rows) -> bool:
    """Whether ``rows`` is a list of rows (ids or a mask's) of more than one length."""
    return (isinstance(rows, Sequence) and all(isinstance(row, Sequence) and not isinstance(row, str)
                                               or isinstance(row, torch.Tensor) and row.dim() > 0 for row in rows)
            and len({len(row) for row in rows}) > 1)


def _ids_of(prompts, name: str) -> torch.Tensor:
    try:
        return _id_tensor(prompts, name)
    except (ValueError, TypeError, RuntimeError) as e:  # not a list of ids, nor rows of them
        raise InputError(f"{name} with attention_mask must be token ids (a tensor, or lists of ids): {e}") from None


def _mask_tensor(mask) -> torch.Tensor:
    try:
        return torch.as_tensor(mask).cpu()
    except (ValueError, TypeError, RuntimeError) as e:
        raise InputError(f"attention_mask must be 0s and 1s, a row per prompt: {e}") from None


def _check_unpadded(model: DiffusionModel, rows: list[list[int]]) -> None:
    """The rows of a tensor batch ``[batch, length]`` (one row too: ``padding="max_length"``) given
    without a mask: one that starts or ends with the pad id looks padded, its pads read as prompt
    tokens; warned about once per call, as transformers warns (the id may be the row's own: random
    ids, a pad id that is EOS). Not where the pad id is BOS too."""
    pad = getattr(model.tokenizer, "pad_token_id", None)
    if pad is None or pad == getattr(model.tokenizer, "bos_token_id", None):
        return
    for r, ids in enumerate(rows):
        if ids[0] == pad or ids[-1] == pad:
            warnings.warn(f"prompt {r} {'starts' if ids[0] == pad else 'ends'} with the pad token id {pad}: "
                          f"if it is padding, it is read as prompt; pass attention_mask= (as the tokenizer returns "
                          f"it), the tokenizer's output itself as prompts, or the prompts unpadded", stacklevel=3)
            return


def _id_tensor(t, name: str) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise InputError(f"{name}: token ids must be integers, got a tensor of {t.dtype}")
    if t.dim() not in (1, 2):
        raise InputError(f"{name}: a tensor of token ids must be 1-D [length] (one prompt) or 2-D "
                         f"[batch, length], got {t.dim()}-D of shape {list(t.shape)}")
    return t.cpu()


def encode_prompt(model: DiffusionModel, prompt: Prompt, config: GenerationConfig, layout: CanvasLayout) -> list[int]:
    """Token ids of one prompt. Text goes through the chat template when the tokenizer has one
    (and ``config.chat_template``), chat messages always do; user text is never tokenised into
    special tokens."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("a prompt is empty")
        ids = encode_text(_tokenizer(model), prompt, config.chat_template)
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        ids = encode_messages(_tokenizer(model), prompt)
    else:
        ids = _token_ids(prompt)
        bad = [t for t in ids if not 0 <= t < model.spec.vocab_size]
        if bad:
            raise InputError(f"prompt token ids must lie in [0, {model.spec.vocab_size}); got {bad[:5]}")
    if not ids:  # (chat messages with empty content, or text the tokenizer drops, encode to nothing)
        raise InputError("a prompt encodes to no tokens: give text, token ids or messages with some content")
    structure = {model.spec.mask_id} | _single_token_headers(layout)
    found = sorted(structure & set(ids))
    if found:
        raise InputError(
            f"the prompt holds the mask id or a canvas structure token {found}; user input may not contain them"
        )
    return ids


def _tokenizer(model: DiffusionModel):
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer; pass prompts as token ids")
    return model.tokenizer


def _token_ids(prompt) -> list[int]:
    """A prompt given as token ids, checked to be integers."""
    if prompt is None:
        raise InputError("a prompt is None; give a string, token ids or chat messages")
    if isinstance(prompt, torch.Tensor) or type(prompt).__module__ == "numpy":
        prompt = _id_tensor(prompt, "a prompt")
        if prompt.dim() != 1:
            raise InputError(f"a prompt's token ids must be 1-D, got shape {list(prompt.shape)}")
        prompt = prompt.tolist()
    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
        raise InputError(f"a prompt must be a string, token ids or chat messages, got {type(prompt).__name__}")
    ids = []
    for t in prompt:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise InputError(f"a prompt's token ids must be ints, got {t!r} ({type(t).__name__}); "
                             "give text as one string and chat as a list of {role, content} messages")
        ids.append(int(t))
    if not ids:
        raise InputError("a prompt is empty")
    return ids


def encode_text(tokenizer, text: str, chat_template: bool = True) -> list[int]:
    """Token ids of a user's text: through the chat template when the tokenizer has one (and
    ``chat_template``), never tokenised into special tokens. The trainer encodes prompts with
    this too, so a model sees the same ids in training and decoding."""
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        return _plain(tokenizer, text)
    return encode_messages(tokenizer, [{"role": "user", "content": text}])


def encode_messages(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids of a chat: the tokenizer's chat template with a generation prompt, every
    message's content tokenised as plain text (its ``<|endoftext|>`` stays text, never the special
    id). Without a chat template the chat must be one user message, encoded as its text."""
    checked = [_message(m, i) for i, m in enumerate(messages)]
    if not checked:
        raise InputError("messages is empty")
    if not getattr(tokenizer, "chat_template", None):
        if len(checked) != 1 or checked[0]["role"] != "user":
            raise InputError("this model's tokenizer has no chat template: send one user message, or a plain prompt")
        return _plain(tokenizer, checked[0]["content"])
    marks = [f"{_PLACEHOLDER}{i}\u2063" for i in range(len(checked))]
    rendered = tokenizer.apply_chat_template(
        [{**m, "content": mark} for m, mark in zip(checked, marks)], tokenize=False, add_generation_prompt=True
    )
    ids: list[int] = []
    for i, mark in enumerate(marks):  # template text (its special tokens stay special), then the user's text
        if rendered.count(mark) > 1:
            raise InputError(f"the chat template repeats message {i}; paradec cannot keep its text plain")
        before, found, rendered = rendered.partition(mark)
        if not found:  # the template left this message out (some drop system messages): so do we
            rendered = before
            continue
        ids += _template(tokenizer, before) + _plain(tokenizer, checked[i]["content"])
    if _PLACEHOLDER in rendered:
        raise InputError("the chat template reordered the messages; paradec cannot keep their text plain")
    return ids + _template(tokenizer, rendered)


def _message(message, i: int) -> dict:
    if not isinstance(message, Mapping):
        raise InputError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
    unknown = sorted(set(message) - {"role", "content", "name"})
    if unknown:
        raise InputError(f"messages[{i}] has keys {unknown}; a message takes role, content and name")
    if message.get("role") not in _ROLES:
        raise InputError(f"messages[{i}]['role'] must be one of {list(_ROLES)}, got {message.get('role')!r}")
    if not isinstance(message.get("content"), str):
        raise InputError(f"messages[{i}]['content'] must be a string, got {type(message.get('content')).__name__}")
    if "name" in message and not isinstance(message["name"], str):
        raise InputError(f"messages[{i}]['name'] must be a string, got {type(message['name']).__name__}")
    return dict(message)


def _plain(tokenizer, text: str) -> list[int]:
    """User text as plain text: special-token strings inside it are split into ordinary tokens."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []


def _template(tokenizer, text: str) -> list[int]:
    """Chat-template text: its special tokens (``<|im_start|>``) are the special ids."""
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _single_token_headers(layout: CanvasLayout) -> set[int]:
    """Header ids that are whole headers on their own (special tokens such as ``<summary>``)."""
    ids = set()
    for g in range(layout.num_groups):
        start, body = layout.blocks[g][0], layout.bodies[g][0]
        if body - start == 1:
            ids.add(int(layout.template[start]))
    return ids


def make_result(model, layout: CanvasLayout, prompt_ids, canvas: list[int], trace: list[int], output,
                summary_decoded: bool = True, stop: tuple[str, ...] | None = None) -> GenerationResult:
    """One request's result from its decoded canvas and trace (lists of C ints); ``output`` gives
    nfe, steps and timings (a ``DecodeOutput`` or the like)."""
    stops = set(model.spec.stop_ids)

    def body(g: int) -> list[int]:
        start, end = layout.bodies[g]
        tokens = canvas[start:end]
        cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        return tokens[:cut]

    decode = text_decoder(model)
    m = layout.num_think_blocks
    groups = layout.groups.tolist()
    block_ids = [body(g) for g in range(m)]
    summary_ids = body(m if m else 0) if summary_decoded or not m else []
    summary = decode(summary_ids)
    start, end = layout.bodies[m]
    finish = "stop" if summary_decoded and len(summary_ids) < end - start else "length"
    text, cut = _cut_text(summary, stop)
    if cut:  # keep the whole tokens before the stop string, and the canvas up to them
        summary_ids = summary_ids[:_whole_tokens(decode, summary_ids, text)]
        canvas, trace, groups = (x[:start + len(summary_ids)] for x in (canvas, trace, groups))
        finish = "stop"
    return GenerationResult(
        blocks=[decode(ids) for ids in block_ids],
        summary=text,
        answer=extract_answer(text),
        token_ids=canvas,
        trace=trace,
        nfe=output.nfe,
        steps=output.steps,
        timings=output.timings,
        prompt_ids=list(prompt_ids),
        block_token_ids=block_ids,
        summary_token_ids=summary_ids,
        text=text,
        finish_reason=finish,
        groups=groups,
    )
