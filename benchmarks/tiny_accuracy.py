"""The NAP paper's Table 3 at toy scale: held-out accuracy of paradec-tiny (canvas, ``nap``)
against paradec-tiny-longcot (the same paths as one chain of thought, decoded by ``ao`` and,
for reference, ``ar_order``) as the tokens committed per forward grow, with Global ARness@1
(the paper's Table 1) and decode-order PNGs.

Matched budgets: ``nap`` commits k tokens per step in each of m think blocks (m * k per forward);
the long-CoT model commits m * k tokens per step in its one region, so both spend about the
same number of forwards (the NFE column says how many).

    python benchmarks/tiny_accuracy.py --tokens-per-step 1 2 3 4 --plots plots/

``--window W`` also decodes the canvas model W tokens of each block at a time under each of
``--caches``, refreshed in full (what the reused KV costs in accuracy); with ``--partial-refresh``
also with the dual cache's partial refresh (``-partial``, nap's default for windows); with
``--delayed-kv`` also with delayed KV on top of that default (``-delayed``);
``--engine`` decodes every setting through ``paradec.batching.BatchEngine`` (the same tokens as
``generate()``); ``--only-nap`` skips the long-CoT model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harness import banner, emit_json
import paradec
from paradec.api import build_layout
from paradec.plots import decode_order_png
from paradec.train.data import CanvasFormat
from paradec.train.evaluate import evaluate
from paradec.train.recipe import BLOCK_LEN, SUMMARY_LEN
from paradec.train.tasks import arith


def engine_decode(rows: int):
    """``evaluate``'s decode through a ``BatchEngine``."""
    from paradec.batching import BatchEngine

    def decode(model, questions, **config):
        engine = BatchEngine(model, max_batch=min(rows, 64), max_prompt_tokens=256, max_canvas_tokens=1024)
        return engine.generate(questions, **config)

    return decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nap", default="paradec-tiny", help="the canvas model")
    p.add_argument("--longcot", default="paradec-tiny-longcot", help="the long-CoT model")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--tokens-per-step", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--limit", type=int, help="the first N held-out problems (default: all)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plots", type=Path, help="write decode-order PNGs of the first problem here")
    p.add_argument("--records", type=Path, help="write every decoded problem here (JSONL)")
    p.add_argument("--window", type=int, help="also decode the canvas model with windows of this many tokens")
    p.add_argument("--caches", nargs="+", default=["dual", "prefix"], choices=["none", "prefix", "dual"])
    p.add_argument("--only-nap", action="store_true", help="skip the long-CoT model")
    p.add_argument("--partial-refresh", action="store_true",
                   help="with --window: also decode with the dual cache's partial_refresh")
    p.add_argument("--delayed-kv", action="store_true",
                   help="with --window: also decode with the dual cache's default (partial) refresh and delayed_kv")
    p.add_argument("--engine", action="store_true", help="decode through paradec.batching.BatchEngine")
    args = p.parse_args()
    info = banner()
    problems = arith.test_problems()[: args.limit]
    m = args.blocks
    runs = []
    for name, path in (("nap", args.nap),) + ((("longcot", args.longcot),) if not args.only_nap else ()):
        model = paradec.load(path, device=args.device, dtype=torch.float32)
        for k in args.tokens_per_step:
            if name == "nap":
                canvas = dict(mode="nap", blocks=m, block_len=BLOCK_LEN, summary_len=SUMMARY_LEN, tokens_per_step=k)
                settings = [("nap", canvas)]
                if args.window:
                    settings += [(f"w{args.window}-{cache}",  # the full refresh: dual's default is partial
                                  canvas | dict(window=args.window, cache=cache, partial_refresh=False))
                                 for cache in args.caches]
                if args.window and args.partial_refresh:
                    settings.append((f"w{args.window}-dual-partial",
                                     canvas | dict(window=args.window, cache="dual", partial_refresh=True)))
                if args.window and args.delayed_kv:
                    settings.append((f"w{args.window}-dual-delayed",
                                     canvas | dict(window=args.window, cache="dual", delayed_kv=True)))
            else:
                length = CanvasFormat(BLOCK_LEN, SUMMARY_LEN).longcot_len(m)
                settings = [(rule, dict(mode=rule, answer_len=length, tokens_per_step=m * k)) for rule in ("ao", "ar_order")]
            decode = engine_decode(args.batch_size) if args.engine else None
            for rule, config in settings:
                report = evaluate(model, problems, batch_size=args.batch_size, decode=decode, **config)
                row = {"model": name, "rule": rule, "k": k, "per_forward": m * k, "accuracy": report.accuracy,
                       "n": report.n, "nfe": report.nfe, "global_arness": report.global_arness,
                       "block_arness": report.block_arness, "seconds": report.seconds}
                runs.append(row)
                print(f"{name:8s} {rule:9s} k={k} acc {report.accuracy:.3f} nfe {report.nfe:.1f} "
                      f"ARness {report.global_arness:.3f}/{report.block_arness:.3f} {report.seconds:.1f}s", flush=True)
                if args.records:
                    with args.records.open("a") as f:
                        for rec in report.records:
                            f.write(json.dumps({"model": name, "rule": rule, "k": k} | rec) + "\n")
                if args.plots:
                    args.plots.mkdir(parents=True, exist_ok=True)
                    layout = build_layout(model, paradec.GenerationConfig(**config))
                    decode_order_png(report.first_trace, layout.groups.tolist(), args.plots / f"order_{name}_{rule}_k{k}.png",
                                     f"{name} ({rule}), {m * k} tokens per forward", layout.summary_group)
    print(f"\nheld-out problems: {len(problems)}, think blocks m = {m}; k: tokens per step per block "
          f"(nap) — the long-CoT rules commit m * k per step")
    print(f"{'model':8s} | {'rule':9s} | {'k':>2s} | {'tok/fwd':>7s} | {'accuracy':>8s} | {'NFE':>6s} | "
          f"{'G-ARness@1':>10s} | {'in-block':>8s}")
    for r in runs:
        print(f"{r['model']:8s} | {r['rule']:9s} | {r['k']:2d} | {r['per_forward']:7d} | {r['accuracy']:8.3f} | "
              f"{r['nfe']:6.1f} | {r['global_arness']:10.3f} | {r['block_arness']:8.3f}")
    emit_json({"benchmark": "tiny_accuracy", **info, "blocks": m, "runs": runs})


if __name__ == "__main__":
    main()
