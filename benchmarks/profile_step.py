"""Where one graphed decoding step's time goes, at LLaDA-8B shape on one GPU.

Builds the model (random bf16 weights), decodes once with the given mode so that a step's
static buffers hold a real window, then profiles that step's forward run eagerly (the kernels a
graph replays) with torch.profiler, and times the same step replayed as a graph under each
attention backend that accepts it. Prints the top kernels and a table; ends with one JSON line.

    python benchmarks/profile_step.py --mode nap --blocks 4 --block-len 224 --summary-len 128 --window 32
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness import banner, capture_graph, emit_json, median_ms
from paradec import GenerationConfig
from paradec.api import build_layout
from paradec.decoding.runner import Runner
from paradec.models import build, reference_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llada-8b-instruct")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--mode", default="nap")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-len", type=int, default=224)
    parser.add_argument("--summary-len", type=int, default=128)
    parser.add_argument("--answer-len", type=int, default=1024)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--tokens-per-step", type=int, default=4)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    info = banner()
    model = build(reference_config(args.model), device="cuda", dtype=torch.bfloat16, seed=0)
    settings = dict(mode=args.mode, tokens_per_step=args.tokens_per_step, eos_closes_block=False)
    if args.mode == "nap":
        settings |= dict(blocks=args.blocks, block_len=args.block_len, summary_len=args.summary_len,
                         window=args.window)
        model.think_header_ids = lambda i: [100 + i]  # shape-only model: one-token headers
        model.summary_header_ids = lambda: [99]
    else:
        settings |= dict(answer_len=args.answer_len, block_len=args.window, attention="canvas")
    config = GenerationConfig(**settings)
    layout = build_layout(model, config)
    prompt = torch.randint(200, 30000, (args.prompt_len,)).tolist()
    runner = Runner(model, config, layout, [prompt])
    runner.run()
    steps = runner.steps[tuple(runner.phases[0])]
    forwarded = int(steps.step_cols.unique().numel())
    print(f"step: {forwarded} columns forwarded ({len(steps.step_cols)} with padding), "
          f"{int(steps.columns.valid.sum())} candidates, "
          f"{steps.blocks.kv.shape[3] if steps.per_block else steps.cache.capacity} keys, "
          f"attention {_attention(steps)}")
    rows = {"step_graph_ms": median_ms(steps.step_graph.replay)}
    for name, backends in (("default", None), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                           ("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("math", [SDPBackend.MATH])):
        try:
            if backends is None:
                graph, _ = capture_graph(steps.forward)
            else:
                with sdpa_kernel(backends):
                    graph, _ = capture_graph(steps.forward)
            rows[f"forward_graph_{name}_ms"] = median_ms(graph.replay)
            del graph
        except RuntimeError as err:
            rows[f"forward_graph_{name}_ms"] = f"refused: {str(err).splitlines()[0][:80]}"
    if steps.step_dense:  # the same forward with the mask it no longer needs: what dropping it saves
        steps.step_dense = False
        graph, _ = capture_graph(steps.forward)
        rows["forward_graph_masked_ms"] = median_ms(graph.replay)
        steps.step_dense = True
        del graph
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        steps.forward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            steps.forward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))
    for key, value in rows.items():
        print(f"{key:32} {value if isinstance(value, str) else f'{value:.3f}'}")
    emit_json({"benchmark": "profile_step", **info, **vars(args), **rows})


def _attention(steps) -> str:
    if steps.per_block:
        return "blocks side by side, " + ("unmasked" if steps.blocks.bias is None else "with a bias")
    return "unmasked" if steps.step_dense else "masked"


if __name__ == "__main__":
    main()
