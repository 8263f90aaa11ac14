"""Where one generation's time goes: prefill, model forward, unmasking, bookkeeping.

A profile of the engine on a small random LLaDA-layout model on the CPU (or the GPU when one is
there), not a timed test. Median over repeats of each phase, per decoding setting.

    python benchmarks/profile_generate.py --blocks 4 --block-len 32 --summary-len 16 --tokens-per-step 1 2 4
"""

from __future__ import annotations

import argparse
import statistics

import torch

from harness import banner, emit_json
import paradec
from paradec.models import build

PHASES = ("prefill", "forward", "unmask", "bookkeeping", "total")


def small_model(device: str, vocab_size: int = 2048):
    """A random LLaDA-layout model (4 layers, d=256) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|mask|>", "<|eot_id|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", mask_token="<|mask|>",
                                        unk_token="<unk>", pad_token="<|endoftext|>")
    config = {
        "model_type": "llada", "d_model": 256, "n_heads": 8, "n_kv_heads": 8, "n_layers": 4,
        "mlp_hidden_size": 768, "vocab_size": vocab_size, "max_sequence_length": 4096, "rope_theta": 500000.0,
        "mask_token_id": 1, "eos_token_id": 0, "pad_token_id": 0,
    }
    return build(config, device=device, dtype=torch.float32, tokenizer=tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-len", type=int, default=32)
    parser.add_argument("--summary-len", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    info = banner()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = small_model(device)
    prompt = " ".join(f"w{i % 500}" for i in range(args.prompt_len))
    rows = []
    for k in args.tokens_per_step:
        config = paradec.GenerationConfig(blocks=args.blocks, block_len=args.block_len,
                                          summary_len=args.summary_len, tokens_per_step=k, eos_closes_block=False)
        paradec.generate(model, prompt, config)  # warm-up
        runs = [paradec.generate(model, prompt, config) for _ in range(args.repeats)]
        row = {"tokens_per_step": k, "nfe": runs[0].nfe}
        for phase in PHASES:
            row[f"{phase}_ms"] = statistics.median(r.timings[phase] for r in runs) * 1e3
        rows.append(row)
    print(f"model: LLaDA layout, 4 layers, d=256, V=2048, random fp32 weights, on {device}")
    print(f"canvas: {args.blocks} blocks x {args.block_len} + summary {args.summary_len}, prompt {args.prompt_len} tokens; median of {args.repeats}")
    header = f"{'tok/step':>8} {'nfe':>5} " + " ".join(f"{p + ' ms':>15}" for p in PHASES) + f" {'forward %':>9}"
    print(header)
    for row in rows:
        cells = " ".join(f"{row[p + '_ms']:>15.1f}" for p in PHASES)
        share = 100 * row["forward_ms"] / row["total_ms"]
        print(f"{row['tokens_per_step']:>8} {row['nfe']:>5} {cells} {share:>9.0f}")
    emit_json({"benchmark": "profile_generate", **info, "device_kind": device, "rows": rows})


if __name__ == "__main__":
    main()
