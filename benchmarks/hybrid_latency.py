"""NAR→AR latency at 8B shapes on one GPU: the diffusion model's think blocks (LLaDA-8B shape),
then an AR answer stage at the same size, against AR→AR (the AR model writes the trace itself)
and NAP alone (the diffusion model writes the summary). Random bf16 weights: time only, fixed
commits per step; the AR stages are paradec's static-cache causal decoder at the same shape
(one CUDA graph per token). The answer stage reads the prompt plus the m × block_len trace
tokens (the answerer's prompt; the template's few words are not counted). Prints a table and
ends with one JSON line.

    python benchmarks/hybrid_latency.py --data ../shared/data/gsm8k
    python benchmarks/hybrid_latency.py --tiny      # a 2-layer model, to check the script on a CPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness import banner, emit_json
from latency import NOTE, ar, decode, gsm8k_tokenizer, nap_shape, packed_prompt
from paradec.models import build, reference_config

TINY = {"d_model": 128, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 256}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llada-8b-instruct")
    p.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k"))
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--canvas", type=int, default=1024)
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--tokens-per-step", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (CPU check)")
    args = p.parse_args()
    info = banner()
    print(NOTE)
    config = reference_config(args.model) | (TINY if args.tiny else {})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = gsm8k_tokenizer(args.data)
    prompt = packed_prompt(tokenizer, args.data, args.prompt_len)
    model = build(config, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32, seed=0,
                  tokenizer=tokenizer)
    rows = []
    for m in args.blocks:
        shape = nap_shape(args.canvas, m) | dict(window=args.window, tokens_per_step=args.tokens_per_step)
        trace_tokens = m * shape["block_len"]
        think = decode(model, prompt, args.repeats, False, summary=False, **shape)
        nap = decode(model, prompt, args.repeats, False, **shape)
        trace = (prompt * (1 + trace_tokens // len(prompt)))[:trace_tokens]  # stands in for the traces' tokens
        answer = ar(model, prompt + trace, args.answer_tokens, args.repeats)
        ar_trace = ar(model, prompt, trace_tokens + args.answer_tokens, args.repeats)
        row = {"model": args.model + (" (tiny)" if args.tiny else ""), "blocks": m, "block_len": shape["block_len"],
               "trace_tokens": trace_tokens, "answer_tokens": args.answer_tokens,
               "nar_think_s": think["wall_s"], "ar_answer_s": answer["wall_s"],
               "nar_ar_s": think["wall_s"] + answer["wall_s"], "nap_alone_s": nap["wall_s"],
               "ar_ar_s": ar_trace["wall_s"]}
        row["ar_ar_over_nar_ar"] = row["ar_ar_s"] / row["nar_ar_s"]
        rows.append(row)
        print(f"m={m}: think {row['nar_think_s'] * 1e3:.1f} ms + answer {row['ar_answer_s'] * 1e3:.1f} ms = "
              f"{row['nar_ar_s'] * 1e3:.1f} ms; NAP alone {row['nap_alone_s'] * 1e3:.1f} ms; "
              f"AR→AR {row['ar_ar_s'] * 1e3:.1f} ms", flush=True)
    print(f"\nprompt {args.prompt_len} tokens, canvas {args.canvas}, k {args.tokens_per_step}, window {args.window}, "
          f"answer {args.answer_tokens} tokens")
    print(f"{'m':>2} | {'trace':>5} | {'NAR think ms':>12} | {'AR answer ms':>12} | {'NAR→AR ms':>9} | "
          f"{'NAP ms':>8} | {'AR→AR ms':>9} | {'AR→AR / NAR→AR':>15}")
    for r in rows:
        print(f"{r['blocks']:>2} | {r['trace_tokens']:>5} | {r['nar_think_s'] * 1e3:12.1f} | {r['ar_answer_s'] * 1e3:12.1f} | "
              f"{r['nar_ar_s'] * 1e3:9.1f} | {r['nap_alone_s'] * 1e3:8.1f} | {r['ar_ar_s'] * 1e3:9.1f} | "
              f"{r['ar_ar_over_nar_ar']:15.2f}")
    emit_json({"benchmark": "hybrid_latency", **info, "note": NOTE, "rows": rows})


if __name__ == "__main__":
    main()
