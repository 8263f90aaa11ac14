"""Same-run A/B of step latency: this checkout against another (a baseline commit), on one GPU.

Each round runs every tree once, in alternating order, each in a fresh subprocess that imports
that tree's paradec and its own ``benchmarks/latency.py`` (so each side is timed by the code
that shipped with it). A worker builds LLaDA-8B's shape with random bf16 weights and times, with
CUDA graphs: one step of block mode with the dual cache (32 rows a step), NAP windowed with m = 4
(four 32-token windows side by side), one think block alone, and AR (ms a token). The figure is
the median over rounds of each tree's step time (a replayed step graph, median of 20 replays);
the ratio is this tree's over the baseline's.

    git archive <commit> | tar -x -C /tmp/base   # a baseline tree (its paradec/_C built or copied)
    python benchmarks/ab_latency.py --baseline /tmp/base --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("block_dual", "nap_windowed", "one_block", "ar")


def worker(prompt_len: int, canvas: int, ar_tokens: int) -> dict:
    """Runs in the tree under test: the step times of every mode, in ms."""
    import torch
    from latency import ar, decode, nap_shape

    import paradec
    from paradec.models import build, reference_config
    from paradec.train.tasks import arith

    tiny = paradec.load("paradec-tiny")
    model = build(reference_config("llada-8b-instruct"), device="cuda", dtype=torch.bfloat16, seed=0,
                  tokenizer=tiny.tokenizer)
    ids: list[int] = []
    for p in arith.test_problems():
        ids += tiny.tokenizer.encode(p.question + " ", add_special_tokens=False)
        if len(ids) >= prompt_len:
            break
    prompt = ids[:prompt_len]
    k, window = 4, 32
    cases = {
        "block_dual": dict(mode="block", answer_len=canvas, block_len=32, cache="dual", tokens_per_step=k,
                           attention="canvas"),
        "nap_windowed": nap_shape(canvas, 4) | dict(window=window, tokens_per_step=k),
        "one_block": dict(mode="nap", blocks=1, block_len=(canvas - 128) // 4, summary_len=8, window=window,
                          tokens_per_step=k),
    }
    out = {"paradec": paradec.__file__}
    for mode in MODES:
        if mode == "ar":
            out[mode] = ar(model, prompt, ar_tokens, 2)["token_ms"]
        else:
            row = decode(model, prompt, 2, True, **cases[mode])
            out[mode] = row["step_ms"]
            out[f"{mode}_wall_s"] = row["wall_s"]
    return out


def run_tree(tree: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / 'benchmarks'}")
    # This file is loaded by path, so that ``latency`` and ``paradec`` resolve in the tree under test.
    code = ("import importlib.util, json; "
            f"spec = importlib.util.spec_from_file_location('ab_latency', {str(Path(__file__).resolve())!r}); "
            "ab = importlib.util.module_from_spec(spec); spec.loader.exec_module(ab); "
            f"print('AB_RESULT ' + json.dumps(ab.worker({args.prompt_len}, {args.canvas}, {args.ar_tokens})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree / "benchmarks", capture_output=True,
                          text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("AB_RESULT "):
            return json.loads(line[len("AB_RESULT "):])
    raise SystemExit(f"worker in {tree} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another paradec checkout (built)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--canvas", type=int, default=1024)
    parser.add_argument("--ar-tokens", type=int, default=128)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from harness import banner, emit_json

    info = banner()
    trees = {"this": HERE.parent, "baseline": args.baseline.resolve()}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
        for name in order:
            runs[name].append(run_tree(trees[name], args))
            print(f"round {round_} {name}: " + ", ".join(f"{m} {runs[name][-1][m]:.3f}" for m in MODES), flush=True)
    table = {}
    print(f"\nstep ms (median of {args.rounds} rounds; AR: ms a token), prompt {args.prompt_len}, canvas {args.canvas}")
    print(f"  {'mode':13} {'baseline':>9} {'this':>9} {'ratio':>7}")
    for mode in MODES:
        base = statistics.median(r[mode] for r in runs["baseline"])
        this = statistics.median(r[mode] for r in runs["this"])
        table[mode] = {"baseline_ms": base, "this_ms": this, "ratio": this / base}
        print(f"  {mode:13} {base:>9.3f} {this:>9.3f} {this / base:>7.3f}")
    emit_json({"benchmark": "ab_latency", **info, "baseline": str(args.baseline), "rounds": args.rounds,
               "table": table, "runs": runs})


if __name__ == "__main__":
    main()
