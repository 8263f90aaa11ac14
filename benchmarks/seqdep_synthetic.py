"""SeqDep (NAP Eq. 4) of the synthetic task's NAP-format data against its long-CoT serialisation:
the toy analogue of the NAP paper's data diagnosis. Scorer: a tiny causal LM trained as a
language model of both serialisations (``python -m paradec.train answerer --objective scorer``,
shipped as paradec-tiny-scorer), so every text below is on its training distribution.

Each held-out problem gets m independent clean paths (the built-in model's data recipe) and:
- NAP format, segments = its m paths then the answer: how much a path is predicted by the
  paths before it, beyond the question;
- one path, segments = its steps (``a op b = c .``): the chain inside a single path;
- long CoT (the m paths written as one chain), segments = its steps;
- long CoT, segments = its m paths.
Prints a table and ends with one JSON line.

    cd benchmarks && python seqdep_synthetic.py --problems 200
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from harness import banner, emit_json
from paradec.eval.seqdep import segment
from paradec.metrics import segment_gains
from paradec.models.ar import ARModel
from paradec.train.answerer import longcot_text, nap_text
from paradec.train.tasks import arith


def texts(problem: arith.Problem, m: int, rng: random.Random) -> dict[str, list[tuple[str, list[str]]]]:
    """(prompt, segments) per framing; several texts where a framing scores paths one by one."""
    paths = [p.text for p in arith.solution_paths(problem, m, rng)]
    chain_prompt, chain = longcot_text(problem.question, paths)
    singles = [longcot_text(problem.question, [p]) for p in paths]
    return {
        "NAP format, segments = paths + answer": [nap_text(problem.question, paths, problem.answer)],
        "one path, segments = steps": [(q, segment(text, "sentences")) for q, text in singles],
        "long CoT, segments = steps": [(chain_prompt, segment(chain, "sentences"))],
        "long CoT, segments = paths": [(chain_prompt, [" " + p for p in paths])],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="paradec-tiny-scorer")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--paths", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    info = banner()
    torch.manual_seed(args.seed)
    scorer = ARModel.load(args.model)
    rng = random.Random(args.seed)
    scores: dict[str, list[tuple[float, float, int]]] = {}
    for problem in arith.test_problems()[: args.problems]:
        for name, items in texts(problem, args.paths, rng).items():
            for prompt, segments in items:
                if len(segments) < 2:
                    continue
                gains = segment_gains(scorer, segments, prompt)
                scores.setdefault(name, []).append((statistics.fmean(g.total for g in gains),
                                                    statistics.fmean(g.per_token for g in gains), len(segments)))
    rows = []
    print(f"\nSeqDep under {args.model}, {args.problems} held-out problems, {args.paths} paths each")
    print(f"{'text, segmentation':<40} | {'texts':>5} | {'segments':>8} | {'SeqDep (nats/segment)':>21} | "
          f"{'per token':>9}")
    for name, values in scores.items():
        row = {"framing": name, "texts": len(values), "segments": statistics.fmean(v[2] for v in values),
               "seqdep": statistics.fmean(v[0] for v in values), "seqdep_sd": statistics.pstdev(v[0] for v in values),
               "seqdep_per_token": statistics.fmean(v[1] for v in values)}
        rows.append(row)
        print(f"{name:<40} | {row['texts']:>5} | {row['segments']:>8.1f} | "
              f"{row['seqdep']:>12.2f} ± {row['seqdep_sd']:<6.2f} | {row['seqdep_per_token']:>9.3f}")
    emit_json({"benchmark": "seqdep_synthetic", **info, "scorer": args.model, "problems": args.problems,
               "paths": args.paths, "rows": rows})


if __name__ == "__main__":
    main()
