"""The eval loop: decode a task's examples with ``paradec.generate``, grade them, append one
JSON line per example to a results file, and resume from it.

Counting (the mistakes users reported in Fast-dLLM's and dInfer's throughput figures):
- answer tokens: tokens the model wrote in its regions (think blocks and summary, or the answer
  region; plus the answerer's tokens in NAR→AR) up to each region's first stop token, the stop
  itself not counted; never the prompt, the headers or the EOS fill after a stop;
- NFE: the decoding steps in which the example had tokens committed (what it needed; a batch
  runs until its slowest member is done, recorded as ``batch_nfe``), plus one per token the AR
  answerer wrote in NAR→AR;
- tokens per step: answer tokens / NFE; tokens/s: answer tokens / seconds of ``generate``, a
  batch's seconds shared equally by its examples (loading and grading not counted); with examples
  spread over ranks the seconds are summed over ranks (device-seconds), so tokens/s is per device;
- Global ARness@1 over the decoded text of the canvas (EOS fill left out).

The results file starts with a header line (task, data, model, the settings that change outputs);
a rerun with the same header skips the examples already there and reports over all of them; a
different header is refused, naming what differs. A truncated last line (a killed run) is
dropped and decoded again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

import paradec
from paradec.api import build_layout
from paradec.config import GenerationConfig
from paradec.config.generation import DEFAULTS
from paradec.distributed.env import current_env, single_process
from paradec.eval.tasks import DataError, Example, Task
from paradec.metrics import global_arness, without_fill

log = logging.getLogger(__name__)

HEADER = "paradec_eval"
SPREADS = ("examples", "canvas")
# Settings that never change the decoded tokens (placement and speed only: DESIGN contract 3).
_NOT_IN_HEADER = ("cuda_graphs", "prompt_kv", "gather", "results_on", "rank_timeout_s")


@dataclass
class EvalReport:
    task: str
    n: int
    accuracy: float  # strict extraction
    accuracy_flexible: float  # with the last-number fallback where the task allows it
    unparsed: list[int]  # indices of examples whose text held no answer (counted wrong)
    nfe: float  # mean per example
    tokens_per_step: float
    answer_tokens: int
    wall_s: float  # seconds of generate() (summed over ranks when examples are spread)
    tokens_per_s: float
    global_arness: float  # mean Global ARness@1 per example
    resumed: int  # examples read back from the results file
    skipped_lines: list[tuple[int, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def header(task: Task, data: str | None, model_name: str, config: GenerationConfig, prompt_template: str,
           answerer: str | None, answer_tokens: int) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_HEADER}
    settings["refreshes_partially"] = config.refreshes_partially  # what partial_refresh=None resolved to
    return {HEADER: 1, "task": task.name, "data": data, "model": model_name, "prompt_template": prompt_template,
            "answerer": answerer, "answer_tokens": answer_tokens if answerer else None, "config": settings}


def read_results(path: Path, expected: dict) -> dict[int, dict]:
    """Records already in ``path`` by example index (empty when it does not exist). Refuses a
    file written with another header; drops a truncated last line."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return {}
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: line %d is truncated (a killed run?); decoding that example again", path, number)
                continue
            raise DataError(f"{path}: line {number} is not JSON; it is not a results file paradec can resume "
                            f"(use another --out)") from None
    if not rows:  # only a truncated header: nothing was decoded
        return {}
    if not isinstance(rows[0], dict) or rows[0].get(HEADER) != 1:
        raise DataError(f"{path} does not start with a paradec eval header; use another --out")
    written = dict(rows[0])
    if isinstance(written.get("config"), dict):  # a setting added since the file was written: its default
        written["config"] = {k: v for k, v in DEFAULTS.items() if k in expected["config"]} | written["config"]
    if written != expected:
        differ = sorted(k for k in expected if written.get(k) != expected[k])
        if "config" in differ:
            old, new = written.get("config") or {}, expected["config"]
            differ += [f"config.{k}" for k in sorted(new) if old.get(k) != new[k]]
        raise DataError(f"{path} was written by a run with other settings ({', '.join(differ)} differ); "
                        f"use another --out, or --no-resume to start it again")
    bad = [n for n, r in enumerate(rows[1:], start=2) if not (isinstance(r, dict) and isinstance(r.get("index"), int))]
    if bad:
        raise DataError(f"{path}: line {bad[0]} is not an example record; use another --out")
    return {r["index"]: r for r in rows[1:]}


def evaluate(model, task: Task, examples: list[Example], config: GenerationConfig, out: Path | None = None,
             batch_size: int = 8, resume: bool = True, spread: str = "examples", prompt_template: str = "{question}",
             answerer=None, answer_tokens: int = 64, model_name: str = "", answerer_name: str | None = None,
             data: str | None = None, progress: bool = True) -> EvalReport | None:
    """Decodes ``examples`` not yet in ``out`` in batches of ``batch_size`` and grades them.
    Under torchrun, ``spread="examples"`` gives each rank its own share of the examples (each
    decodes whole canvases on its device); ``"canvas"`` decodes every batch across all ranks
    (think blocks spread, as ``paradec.generate`` does). Rank 0 writes ``out`` and returns the
    report; other ranks return None."""
    if spread not in SPREADS:
        raise DataError(f"spread must be one of {list(SPREADS)}, got {spread!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if "{question}" not in prompt_template:
        raise DataError(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
    env = current_env()
    head = header(task, data, model_name, config, prompt_template, answerer_name, answer_tokens)
    done = _done_on_rank0(out, head, env) if out is not None and resume else {}
    todo = [e for e in examples if e.index not in done]
    writer = None
    if env.is_rank0 and out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        fresh = not done
        if fresh or not resume:
            out.write_text(json.dumps(head) + "\n", encoding="utf-8")
        else:  # rewrite without a truncated tail before appending
            out.write_text("".join(json.dumps(r) + "\n" for r in [head, *done.values()]), encoding="utf-8")
        writer = out.open("a", encoding="utf-8")
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"eval {task.name}",
               disable=not (progress and env.is_rank0))
    decoder = _Decoder(model, task, config, prompt_template, answerer, answer_tokens)
    per_rank = env.distributed and spread == "examples"
    share = todo[env.rank :: env.world_size] if per_rank else todo
    rounds = -(-len(todo) // (batch_size * (env.world_size if per_rank else 1)))
    try:
        for r in range(rounds):
            batch = share[r * batch_size : (r + 1) * batch_size]
            if per_rank:
                with single_process():
                    records = decoder(batch) if batch else []
                gathered = [None] * env.world_size if env.is_rank0 else None
                dist.gather_object(records, gathered, dst=0)
                records = [rec for part in gathered for rec in part] if env.is_rank0 else []
            else:
                records = decoder(batch)
            for rec in records:
                done[rec["index"]] = rec
                if writer is not None:
                    writer.write(json.dumps(rec) + "\n")
            if writer is not None:
                writer.flush()
            bar.update(len(records) if env.is_rank0 else 0)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if not env.is_rank0:
        return None
    resumed = len(examples) - len(todo)
    return summarise(task.name, [done[e.index] for e in examples], resumed)


def _done_on_rank0(out: Path, head: dict, env) -> dict[int, dict]:
    """Rank 0 reads the results file; the other ranks learn which indices are done (or the
    error that stops the run) from it, so that no rank reads while rank 0 rewrites."""
    if not env.distributed:
        return read_results(out, head)
    done, error = {}, None
    if env.is_rank0:
        try:
            done = read_results(out, head)
        except DataError as e:
            error = str(e)
    shared = [(sorted(done), error)]
    dist.broadcast_object_list(shared, src=0)
    indices, error = shared[0]
    if error is not None:
        raise DataError(error)
    return done if env.is_rank0 else dict.fromkeys(indices)


class _Decoder:
    """One batch of examples -> their records (rank 0 gets them under a canvas spread; others [])."""

    def __init__(self, model, task: Task, config: GenerationConfig, prompt_template: str, answerer, answer_tokens):
        self.model, self.task, self.config = model, task, config
        self.template, self.answerer, self.answer_tokens = prompt_template, answerer, answer_tokens
        self.layout = build_layout(model, config)
        self.stops = set(model.spec.stop_ids)

    def __call__(self, batch: list[Example]) -> list[dict]:
        prompts = [self.template.format(question=e.question) for e in batch]
        start = time.perf_counter()
        results = paradec.generate(self.model, prompts, self.config, answerer=self.answerer,
                                   answer_tokens=self.answer_tokens)
        seconds = (time.perf_counter() - start) / len(batch)
        if results is None:  # a canvas spread: the results live on rank 0
            return []
        return [self.record(e, p, r, seconds) for e, p, r in zip(batch, prompts, results)]

    def record(self, example: Example, prompt: str, result, seconds: float) -> dict:
        text = result.answerer.text if result.answerer is not None else result.summary
        grade = self.task.grade(text, example.gold)
        tokens = sum(map(len, result.block_token_ids)) + len(result.summary_token_ids)
        if result.answerer is not None:
            tokens += len(result.answerer.token_ids) - int(result.answerer.stopped)
        nfe = len({s for s in result.trace if s >= 0})
        if result.answerer is not None:  # one AR forward per token it wrote
            nfe += len(result.answerer.token_ids)
        decoded = without_fill(result.trace, result.token_ids, self.layout.bodies, self.stops)
        record = {"index": example.index, "prompt": prompt, "blocks": result.blocks, "summary": result.summary,
                  "answer": grade.answer, "flexible_answer": grade.flexible_answer, "gold": example.gold,
                  "correct": grade.correct, "flexible_correct": grade.flexible_correct, "answer_tokens": tokens,
                  "nfe": nfe, "batch_nfe": result.nfe, "seconds": seconds, "global_arness": global_arness(decoded)}
        if result.answerer is not None:
            a = result.answerer
            record["answerer"] = {"text": a.text, "truncated": a.truncated, "empty": a.empty, "stopped": a.stopped}
        return record


def summarise(task: str, records: list[dict], resumed: int = 0) -> EvalReport:
    n = len(records)
    tokens = sum(r["answer_tokens"] for r in records)
    nfe = sum(r["nfe"] for r in records)
    wall = sum(r["seconds"] for r in records)
    return EvalReport(
        task=task,
        n=n,
        accuracy=sum(r["correct"] for r in records) / n,
        accuracy_flexible=sum(r["flexible_correct"] for r in records) / n,
        unparsed=[r["index"] for r in records if r["answer"] is None],
        nfe=nfe / n,
        tokens_per_step=tokens / max(1, nfe),
        answer_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        global_arness=sum(r["global_arness"] for r in records) / n,
        resumed=resumed,
    )
