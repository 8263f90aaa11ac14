"""Accuracy of a model on the synthetic task's held-out split, with the decoding diagnostics
the NAP paper reports (NFE, Global ARness@1 of the whole canvas and inside each block).

ARness counts decoded text only: the EOS padding that ``eos_closes_block`` writes after a
committed EOS is left out (the EOS itself counts), so filling a block's tail in one step
neither helps nor hurts the score."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import paradec
from paradec.api import build_layout, resolve_config
from paradec.metrics import global_arness, without_fill
from paradec.train.tasks import arith


@dataclass
class EvalReport:
    accuracy: float
    n: int
    nfe: float  # mean steps in which a problem had tokens committed (its own forwards)
    global_arness: float  # Global ARness@1 over the generated region (canvas or answer), fill excluded
    block_arness: float  # mean Global ARness@1 inside each think block (the answer region outside nap)
    seconds: float
    records: list[dict] = field(default_factory=list)
    first_trace: list[int] = field(default_factory=list)  # the first problem's whole trace, fill included


def evaluate(model, problems: list[arith.Problem], batch_size: int = 100, decode=None, **config) -> EvalReport:
    """Decodes every problem with ``config`` (GenerationConfig fields) in batches; a problem is
    right when the answer extracted from the summary (or the answer region) is its answer.
    decode: ``decode(model, questions, **config) -> results`` (default ``paradec.generate``; e.g.
    a ``paradec.batching.BatchEngine``'s decoding)."""
    if not problems:
        raise paradec.ConfigError("problems is empty: nothing to evaluate")
    # The layout generate() uses: the checkpoint's own defaults, then ``config``.
    layout = build_layout(model, resolve_config(model, **config))
    stops = set(model.spec.stop_ids)
    m = layout.num_think_blocks
    bodies = layout.bodies[:m] if m else layout.bodies  # think bodies, or the answer region
    records, traces, nfe, first = [], [], 0, None
    start = time.perf_counter()
    for lo in range(0, len(problems), batch_size):
        chunk = problems[lo : lo + batch_size]
        results = (decode or paradec.generate)(model, [p.question for p in chunk], **config)
        for p, r in zip(chunk, results):
            records.append({"question": p.question, "blocks": r.blocks, "summary": r.summary, "answer": r.answer,
                            "gold": p.answer, "correct": arith.check_answer(r.answer, p)})
            nfe += len({t for t in r.trace if t >= 0})  # steps that committed for this request (a batch waits for its slowest)
            first = r.trace if first is None else first
            decoded = without_fill(r.trace, r.token_ids, layout.bodies, stops)
            traces.append((decoded, [decoded[s:e] for s, e in bodies]))
    seconds = time.perf_counter() - start
    n = len(records)
    inner = [global_arness(t) for _, bodies in traces for t in bodies if any(s >= 0 for s in t)]
    return EvalReport(
        accuracy=sum(r["correct"] for r in records) / n,
        n=n,
        nfe=nfe / n,
        global_arness=sum(global_arness(t) for t, _ in traces) / n,
        block_arness=sum(inner) / max(1, len(inner)),
        seconds=seconds,
        records=records,
        first_trace=first,
    )

