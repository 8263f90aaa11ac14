"""The peer, timed: NVlabs/Fast-dLLM's own v1 LLaDA code at LLaDA-8B shape, random bf16 weights.

Fast-dLLM is not part of paradec and is never committed: bring it with the ``fetch`` tool (or a
git clone) and point ``--repo`` at its ``llada/`` folder. It wants transformers 4.49 (it
imports that version's cache classes), so run this script in an environment that has it;
``latency.py --fastdllm`` starts it in a subprocess with such a ``PYTHONPATH``.

It runs Fast-dLLM's ``generate_with_dual_cache`` and ``generate_with_prefix_cache`` as published
(eager) with fixed commits per step (``steps = gen_length / tokens_per_step``; random weights make
confidence meaningless) and times every model call with the same clock as paradec's harness
(host clock after a device synchronise). A *step* is the time from one cached call's start to
the next one's inside a block (the forward plus Fast-dLLM's own selection and commit); a
*refresh* is a block's first, full forward. Prints a table and ends with one JSON line.

    python benchmarks/fastdllm_peer.py --repo /path/to/Fast-dLLM/llada --prompt prompt.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "paradec" / "models" / "configs" / "llada-8b-instruct.json"


def build(repo: Path):
    """Fast-dLLM's LLaDAModelLM at the published LLaDA-8B-Instruct config, built on the GPU."""
    sys.path.insert(0, str(repo))
    from model.configuration_llada import LLaDAConfig
    from model.modeling_llada import LLaDAModel, LLaDAModelLM, create_model_config_from_pretrained_config

    config = LLaDAConfig(**json.loads(CONFIG.read_text()))
    inner_config = create_model_config_from_pretrained_config(config)
    inner_config.init_device = "cuda"  # its wrapper would build 8B parameters on the CPU first
    torch.set_default_dtype(torch.bfloat16)
    inner = LLaDAModel(inner_config, init_params=False)
    torch.set_default_dtype(torch.float32)
    model = LLaDAModelLM(config, model=inner).eval()
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model


class CallClock:
    """Wraps the model's forward: (start time, kind) of every call, host clock after a sync."""

    def __init__(self, model):
        self.calls: list[tuple[float, str]] = []
        self.forward = model.forward

        def timed(*args, **kwargs):
            torch.cuda.synchronize()
            kind = "step" if kwargs.get("past_key_values") is not None else "refresh"
            self.calls.append((time.perf_counter(), kind))
            return self.forward(*args, **kwargs)

        model.forward = timed

    def split(self, end: float) -> dict:
        """Median step and refresh times: each call until the next call starts (or ``end``)."""
        spans = {"step": [], "refresh": []}
        starts = [t for t, _ in self.calls] + [end]
        for (t, kind), nxt in zip(self.calls, starts[1:]):
            spans[kind].append((nxt - t) * 1e3)
        return {f"{k}_ms": statistics.median(v) for k, v in spans.items() if v} | {
            "calls": len(self.calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="Fast-dLLM's llada/ folder")
    parser.add_argument("--prompt", type=Path, required=True, help="a JSON list of prompt token ids")
    parser.add_argument("--gen-length", type=int, default=1024)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--tokens-per-step", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["dual", "prefix"])
    args = parser.parse_args()
    import transformers

    print(f"device: {torch.cuda.get_device_name()} | torch: {torch.__version__} | "
          f"transformers: {transformers.__version__} | Fast-dLLM: {args.repo}")
    sys.path.insert(0, str(args.repo))
    import generate as fast  # Fast-dLLM's llada/generate.py

    model = build(args.repo)
    prompt = torch.tensor([json.loads(args.prompt.read_text())], device="cuda")
    steps = args.gen_length // args.tokens_per_step
    run = {"dual": fast.generate_with_dual_cache, "prefix": fast.generate_with_prefix_cache}
    rows = []
    for mode in args.modes:
        call = lambda: run[mode](model, prompt, steps=steps, gen_length=args.gen_length,  # noqa: E731
                                 block_length=args.block_length, temperature=0.0)
        with torch.no_grad():
            call()  # warm-up
            clock = CallClock(model)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, nfe = call()
            torch.cuda.synchronize()
            end = time.perf_counter()
            model.forward = clock.forward
        row = {"peer": "Fast-dLLM v1", "mode": f"block_{mode}", "prompt_len": prompt.shape[1],
               "answer_len": args.gen_length, "block_len": args.block_length, "tokens_per_step": args.tokens_per_step,
               "steps": int(nfe), "wall_s": end - t0, **clock.split(end)}
        rows.append(row)
        print(f"  fast-dllm {mode:6} steps={nfe} wall={row['wall_s'] * 1e3:.0f} ms step={row.get('step_ms', 0):.2f} ms "
              f"refresh={row.get('refresh_ms', 0):.2f} ms", flush=True)
    print(json.dumps({"benchmark": "fastdllm_peer", "rows": rows}))


if __name__ == "__main__":
    main()
