"""NAR→AR against AR→AR and NAP alone on the synthetic task's held-out problems.

- NAP alone: paradec-tiny decodes the canvas, the summary's ``#### N`` is the answer;
- NAR→AR: paradec-tiny decodes the think blocks only, the tiny AR answerer reads them as text
  (``paradec.hybrid``) and writes the answer;
- AR→AR: the AR answerer writes one trace itself (up to the canvas's think tokens), then
  answers from it with the same template.
Accuracy and wall time per problem, at several tokens-per-step budgets of the diffusion model
(AR→AR does not depend on them). Under torchrun the think blocks are spread over the ranks (the
summary and the answerer run on rank 0; AR→AR runs on rank 0 alone). Prints a table; ends with
one JSON line.

    python benchmarks/hybrid.py --answerer paradec-tiny-answerer --limit 200
    torchrun --nproc-per-node 4 benchmarks/hybrid.py --answerer paradec-tiny-answerer --limit 200
"""

from __future__ import annotations

import argparse

import torch

from harness import banner, emit_json, synced
import paradec
from paradec.distributed import init_distributed, teardown
from paradec.hybrid import ar_to_ar
from paradec.models.ar import ARModel
from paradec.train.tasks import arith


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="paradec-tiny")
    p.add_argument("--answerer", required=True)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--tokens-per-step", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    env = init_distributed("cpu" if args.device == "cpu" else None)
    try:
        run(args, env)
    finally:
        teardown()


def run(args, env) -> None:
    info = banner() if env.rank == 0 else {}
    device = env.device if env.distributed else args.device
    model = paradec.load(args.model, device=device, dtype=torch.float32)
    answerer = ARModel.load(args.answerer, device=device, dtype=torch.float32)
    problems = arith.test_problems()[: args.limit]
    questions = [q.question for q in problems]
    canvas = paradec.api.resolve_config(model)
    rows = []

    def record(pipeline: str, k, answers, seconds, flags=None, ranks=env.world_size):
        if env.rank != 0:
            return
        right = sum(arith.check_answer(a, q) for a, q in zip(answers, problems))
        row = {"pipeline": pipeline, "k": k, "accuracy": right / len(problems), "n": len(problems),
               "ms_per_problem": seconds / len(problems) * 1e3, "ranks": ranks, **(flags or {})}
        rows.append(row)
        print(f"{pipeline:8s} k={k!s:4s} ranks={ranks} acc {row['accuracy']:.3f}  {row['ms_per_problem']:.1f} ms/problem", flush=True)

    for k in args.tokens_per_step:
        answers, t0 = [], synced()
        for lo in range(0, len(questions), args.batch_size):
            out = paradec.generate(model, questions[lo : lo + args.batch_size], tokens_per_step=k)
            answers += [r.answer for r in out or []]  # None on ranks other than 0
        record("NAP", k, answers, synced() - t0)
        results, t0 = [], synced()
        for lo in range(0, len(questions), args.batch_size):
            results += paradec.generate(model, questions[lo : lo + args.batch_size], tokens_per_step=k,
                                        answerer=answerer, answer_tokens=args.answer_tokens) or []
        flags = {"truncated": sum(r.answerer.truncated for r in results),
                 "empty": sum(r.answerer.empty for r in results)}
        record("NAR->AR", k, [r.answer for r in results], synced() - t0, flags)
    if env.rank != 0:
        return
    trace_tokens = canvas.blocks * canvas.block_len
    answers, truncated, t0 = [], 0, synced()
    for q in questions:
        _, out = ar_to_ar(answerer, q, trace_tokens, args.answer_tokens)
        answers.append(out.answer)
        truncated += out.truncated
    record("AR->AR", "-", answers, synced() - t0, {"truncated": truncated, "trace_tokens": trace_tokens}, ranks=1)
    print(f"\nheld-out problems: {len(problems)}; canvas {canvas.blocks} x {canvas.block_len} think tokens + "
          f"{canvas.summary_len} summary; answerer: {args.answerer}")
    print(f"{'pipeline':8s} | {'k':>3s} | {'ranks':>5s} | {'accuracy':>8s} | {'ms/problem':>10s}")
    for r in rows:
        print(f"{r['pipeline']:8s} | {r['k']!s:>3s} | {r['ranks']:>5} | {r['accuracy']:8.3f} | {r['ms_per_problem']:10.1f}")
    emit_json({"benchmark": "hybrid", **info, "rows": rows})


if __name__ == "__main__":
    main()
