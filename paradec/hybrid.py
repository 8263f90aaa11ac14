"""NAR→AR (arXiv 2509.20744): a diffusion model thinks in parallel, an autoregressive model
answers. The think blocks reach the answerer as **text**, so the two vocabularies need not match.

The answerer's prompt (``answer_prompt``)::

    {question}

    Reasoning 1: {think block 1}
    ...
    Reasoning m: {think block m}
    Summary: {summary}            <- only when the summary was decoded

    Answer:

If it does not fit the answerer's context with room for ``max_new_tokens``, the traces are cut
(``fit_traces``): every trace keeps its first tokens, all cut to the same length, the longest
that fits; the result says ``truncated=True``. A question that alone does not fit is an error.

The AR→AR baseline (``ar_to_ar``) lets the AR model write one trace itself from
``{question}\\n\\nReasoning 1:`` with the same token budget, then answer with the same template.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from paradec.answers import extract_answer
from paradec.errors import InputError
from paradec.models.ar import ARModel


@dataclass
class AnswerOutput:
    """What the answerer wrote. answer: extracted (``#### N`` or ``\\boxed{}``), None when
    absent; stopped: a stop token ended it (else ``max_new_tokens`` did); truncated: the traces
    were cut to fit the context; empty: the answerer wrote nothing before its stop token."""

    text: str
    answer: str | None
    token_ids: list[int]
    stopped: bool
    truncated: bool
    empty: bool
    prompt_tokens: int
    seconds: float


def answer_prompt(question: str, traces: list[str], summary: str | None = None) -> str:
    parts = [question.strip(), ""]
    parts += [f"Reasoning {i}: {trace.strip()}" for i, trace in enumerate(traces, 1)]
    if summary is not None:
        parts.append(f"Summary: {summary.strip()}")
    return "\n".join(parts) + "\n\nAnswer:"


def fit_traces(answerer: ARModel, question: str, traces: list[str], summary: str | None,
               max_new_tokens: int) -> tuple[list[int], bool]:
    """The answerer's prompt ids, traces cut (first tokens kept, all to one length) until it
    fits ``max_length - max_new_tokens``; returns (ids, truncated)."""
    tokenizer = answerer.tokenizer
    encode = lambda text: tokenizer.encode(text, add_special_tokens=True)  # noqa: E731
    ids = encode(answer_prompt(question, traces, summary))
    if answerer.max_length is None or len(ids) + max_new_tokens <= answerer.max_length:
        return ids, False
    room = answerer.max_length - max_new_tokens
    pieces = [tokenizer.encode(t, add_special_tokens=False) for t in traces]
    lo, hi = 0, max(map(len, pieces), default=0)  # the longest per-trace length that fits
    best = None
    while lo <= hi:
        cap = (lo + hi) // 2
        cut = [tokenizer.decode(p[:cap]) for p in pieces]
        trial = encode(answer_prompt(question, cut, summary))
        if len(trial) <= room:
            best, lo = trial, cap + 1
        else:
            hi = cap - 1
    if best is None:
        raise InputError(
            f"the question (and summary) alone take more than the answerer's {answerer.max_length} tokens "
            f"minus max_new_tokens={max_new_tokens}; shorten it or lower max_new_tokens"
        )
    return best, True


def answer(answerer: ARModel, question: str, traces: list[str], max_new_tokens: int = 64,
           summary: str | None = None, temperature: float = 0.0, seed: int | None = None,
           stop_ids: tuple[int, ...] | None = None) -> AnswerOutput:
    """The answerer reads the question and the traces and writes the answer (KV-cached)."""
    if not isinstance(answerer, ARModel):
        raise InputError(f"answerer must be a paradec.models.ar.ARModel (ARModel.load(path)), got "
                         f"{type(answerer).__name__}")
    start = time.perf_counter()
    ids, truncated = fit_traces(answerer, question, traces, summary, max_new_tokens)
    out = answerer.generate(ids, max_new_tokens, temperature=temperature, seed=seed, stop_ids=stop_ids)
    return _output(answerer, out, len(ids), truncated, time.perf_counter() - start)


def answer_batch(answerer: ARModel, questions: list[str], traces: list[list[str]], max_new_tokens: int = 64,
                 summaries: list[str | None] | None = None) -> list[AnswerOutput]:
    """Greedy ``answer`` for several questions in one batch (``ARModel.generate_batch``): the same
    outputs, one forward per token for all of them. ``seconds`` is each one's share of the batch."""
    if not isinstance(answerer, ARModel):
        raise InputError(f"answerer must be a paradec.models.ar.ARModel (ARModel.load(path)), got "
                         f"{type(answerer).__name__}")
    start = time.perf_counter()
    summaries = summaries or [None] * len(questions)
    fitted = [fit_traces(answerer, q, t, s, max_new_tokens) for q, t, s in zip(questions, traces, summaries)]
    outs = answerer.generate_batch([ids for ids, _ in fitted], max_new_tokens)
    share = (time.perf_counter() - start) / len(questions)
    return [_output(answerer, out, len(ids), truncated, share) for (ids, truncated), out in zip(fitted, outs)]


def _output(answerer: ARModel, out, prompt_tokens: int, truncated: bool, seconds: float) -> AnswerOutput:
    """An ``ARResult`` as text and flags (a stop token ends ``token_ids`` when ``stopped``)."""
    body = out.token_ids[:-1] if out.stopped else out.token_ids
    text = answerer.tokenizer.decode(body, skip_special_tokens=True)
    return AnswerOutput(text=text, answer=extract_answer(text), token_ids=out.token_ids, stopped=out.stopped,
                        truncated=truncated, empty=not text.strip(), prompt_tokens=prompt_tokens, seconds=seconds)


def ar_to_ar(model: ARModel, question: str, trace_tokens: int, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int | None = None) -> tuple[str, AnswerOutput]:
    """The baseline: the AR model writes one trace of up to ``trace_tokens`` tokens, then
    answers from it with the same template. Returns (trace, answer)."""
    if not isinstance(model, ARModel):
        raise InputError(f"model must be a paradec.models.ar.ARModel, got {type(model).__name__}")
    start = time.perf_counter()
    head = model.tokenizer.encode(f"{question.strip()}\n\nReasoning 1:", add_special_tokens=True)
    written = model.generate(head, trace_tokens, temperature=temperature, seed=seed)
    stops = set(model.stop_ids)
    trace_ids = [t for t in written.token_ids if t not in stops]
    trace = model.tokenizer.decode(trace_ids, skip_special_tokens=True)
    result = answer(model, question, [trace], max_new_tokens, temperature=temperature, seed=seed)
    result.seconds = time.perf_counter() - start
    return trace, result
