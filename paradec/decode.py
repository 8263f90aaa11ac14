"""``paradec decode``: decode one canvas, on one process or spread over torchrun ranks.

    torchrun --nproc-per-node 4 -m paradec decode            # paradec-tiny, a held-out problem, 4 ranks
    paradec decode --model PATH --prompt "..."              # one process, your checkpoint
    torchrun --nproc-per-node 4 -m paradec decode --model PATH --gsm8k-index 0

(``examples/decode.py`` in a checkout runs the same.)

Each think block goes to a rank (several per rank when there are more blocks than ranks); the
ranks share the prompt KV and meet only when the summary starts. Rank 0 prints the blocks, the
summary, the extracted answer, per-phase and per-rank timings and ARness.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

import paradec
from paradec import GenerationConfig
from paradec.answers import extract_gsm8k
from paradec.api import build_layout, resolve_config
from paradec.cli import DTYPES, add_generation_flags, generation_overrides
from paradec.distributed import init_distributed, print0, teardown
from paradec.metrics import global_arness, local_arness
from paradec.eval.tasks import gsm8k_test_path
from paradec.plots import decode_order_png
from paradec.train.tasks import arith


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="paradec-tiny",
                   help="checkpoint directory (LLaDA or Dream format) or a built-in model's name")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the question to decode")
    source.add_argument("--gsm8k-index", type=int, help="decode this GSM8K test question")
    source.add_argument("--task-index", type=int, help="decode this held-out problem of the synthetic task "
                        "(the default, index 0, when no question is given)")
    p.add_argument("--gsm8k-file", type=Path, help="GSM8K JSONL for --gsm8k-index (default: the test split "
                   "shipped with paradec)")
    p.add_argument("--answerer", help="NAR→AR: a transformers causal LM directory that reads the blocks and answers")
    p.add_argument("--answer-tokens", type=int, default=64, help="with --answerer: the answer's token budget")
    p.add_argument("--with-summary", action="store_true", help="with --answerer: decode the summary too")
    p.add_argument("--device", help="default: this rank's GPU, else the CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--plot", type=Path, help="write the decode-order PNG here")
    add_generation_flags(p)  # --blocks, --window, --tokens-per-step, --prompt-kv, ...: every GenerationConfig field


def question(args) -> tuple[str, str | None]:
    """The prompt and its gold answer (None for a free prompt)."""
    if args.prompt is not None:
        return args.prompt, None
    if args.gsm8k_index is None:
        problems = arith.test_problems()
        index = args.task_index or 0
        if not 0 <= index < len(problems):
            raise SystemExit(f"--task-index must lie in [0, {len(problems)}), got {index}")
        return problems[index].question, str(problems[index].answer)
    lines = (args.gsm8k_file or gsm8k_test_path()).read_text().splitlines()
    if not 0 <= args.gsm8k_index < len(lines):
        raise SystemExit(f"--gsm8k-index must lie in [0, {len(lines)}), got {args.gsm8k_index}")
    row = json.loads(lines[args.gsm8k_index])
    return row["question"], extract_gsm8k(row["answer"])


@record  # under torchrun: a rank that raises writes its error file, so the launcher names it
def run(args: argparse.Namespace) -> int:
    overrides = generation_overrides(args)  # unset flags: the checkpoint's own settings
    rank_timeout_s = overrides.get("rank_timeout_s", GenerationConfig().rank_timeout_s)
    env = init_distributed(args.device, timeout_s=max(120.0, 2 * rank_timeout_s))
    try:
        model = paradec.load(args.model, device=env.device, dtype=DTYPES.get(args.dtype))
        prompt, gold = question(args)
        config = resolve_config(model, **overrides)
        answerer = None
        if args.answerer:
            from paradec.models.ar import ARModel

            answerer = ARModel.load(args.answerer, device=env.device)
        result = paradec.generate(model, prompt, config, answerer=answerer, answer_tokens=args.answer_tokens,
                                  with_summary=args.with_summary)
        if result is not None:
            report(model, config, prompt, gold, result, args.plot)
    finally:
        teardown()
    return 0


def report(model, config, prompt, gold, result, plot) -> None:
    print0(f"question: {prompt}")
    if result.placement:
        p = result.placement
        print0(f"placement: {p['world_size']} ranks, blocks per rank {p['blocks_of_rank']}, idle {p['idle_ranks']}, "
               f"prompt KV by {p['prompt_kv']}, summary gathers {p['gather']}")
    for i, text in enumerate(result.blocks, 1):
        print0(f"--- think {i}\n{text}")
    print0(f"--- summary\n{result.summary}")
    if result.answerer is not None:
        a = result.answerer
        flags = ", ".join(f for f, on in (("traces truncated", a.truncated), ("said nothing", a.empty),
                                          ("hit the token budget", not a.stopped)) if on) or "ok"
        print0(f"--- answerer ({a.prompt_tokens} prompt tokens, {a.seconds:.3f} s; {flags})\n{a.text}")
    verdict = "" if gold is None else f" (gold {gold}: {'right' if result.answer == gold else 'wrong'})"
    print0(f"answer: {result.answer}{verdict}")
    t = result.timings
    print0(f"steps {result.steps}, NFE {result.nfe}; seconds: " +
           ", ".join(f"{k} {t[k]:.3f}" for k in ("prefill", "broadcast", "think", "blocks_kv", "gather", "summary", "total") if k in t))
    for r in result.rank_timings or []:
        phases = ", ".join(f"{k} {r[k]:.3f}" for k in ("prefill", "broadcast", "think", "blocks_kv", "wait", "gather", "summary") if k in r)
        print0(f"  rank {r['rank']} blocks {r['blocks']} forwards {r['forwards']}: {phases}")
    print0(f"Global ARness@1 {global_arness(result.trace):.3f}, Local ARness@1 {local_arness(result.trace):.3f}")
    if plot:
        layout = build_layout(model, config)
        decode_order_png(result.trace, layout.groups.tolist(), plot, "decode order", layout.summary_group)
        print0(f"decode order written to {plot}")
