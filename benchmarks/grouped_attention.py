"""The batching engine's attention at 8B shapes: a pool row holds the prompt, every think block
and the summary, and a step's queries (one window a block) see the prompt and their own block.
Times one attention call (a graph of 32 calls over 8 layers' keys, as a step's layers read
them) for SDPA with the row's additive mask (the default kernels), the batch-invariant kernel
with the queries grouped by segment (each group over its own keys), and, for the think step,
the blocks side by side with no mask (how ``generate()`` steps them: the floor); and building
the invariant kernel's key lists (``masked_keys``, once a call). Each variant is checked
against the plain-torch twin. Prints the device, versions, a table and one JSON line.

    cd benchmarks && python grouped_attention.py                     # needs CUDA and triton
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from harness import banner, capture_graph, emit_json, median_ms
from paradec.models.attention import PAD, PROMPT, SUMMARY, attention_mask
from paradec.ops import batch_invariant as bi

LAYERS, CALLS = 8, 32  # distinct layers' keys a graph cycles through (more than the L2 holds), calls a graph


def row_layout(prompt: int, blocks: int, block: int, summary: int, keys: int) -> list[int]:
    """The segments of one pool row's first ``keys`` slots (the rest padding)."""
    layout = [PROMPT] * prompt + [j + 1 for j in range(blocks) for _ in range(block)] + [SUMMARY] * summary
    return layout + [PAD] * (keys - len(layout))


def case_queries(case: str, prompt: int, blocks: int, block: int, summary: int, window: int) -> list[int]:
    """Query slots of one row: a think step (each block's fourth window), a summary step, or a
    refresh (every canvas column)."""
    if case == "think":
        return [prompt + j * block + 3 * window + i for j in range(blocks) for i in range(window)]
    if case == "summary":
        return [prompt + blocks * block + i for i in range(window)]
    return list(range(prompt, prompt + blocks * block + summary))


def timed_us(fn) -> float:
    graph, _ = capture_graph(lambda: [fn(i % LAYERS) for i in range(CALLS)][-1])
    return 1e3 * median_ms(graph.replay, warmup=3, repeats=20) / CALLS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--block", type=int, default=224)
    p.add_argument("--summary", type=int, default=128)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--refresh-batches", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    info = banner()
    assert torch.cuda.is_available() and bi.HAVE_TRITON, "needs CUDA and triton"
    dev, dtype = "cuda", torch.bfloat16
    used = args.prompt + args.blocks * args.block + args.summary
    keys = -(-(used + 1) // 64) * 64  # the row's keys, a spare slot and padding
    segs = torch.tensor(row_layout(args.prompt, args.blocks, args.block, args.summary, keys), device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, records = [], []
    cases = [("think", b) for b in args.batches] + [("summary", b) for b in args.batches if b <= 8]
    cases += [("refresh", b) for b in args.refresh_batches]
    for case, b in cases:
        cols = case_queries(case, args.prompt, args.blocks, args.block, args.summary, args.window)
        t = len(cols)
        kv = torch.randn(LAYERS, 2, b, args.kv_heads, keys, args.head_dim, device=dev, dtype=dtype, generator=gen)
        q = torch.randn(LAYERS, b, args.heads, t, args.head_dim, device=dev, dtype=dtype, generator=gen)
        q_segs = segs[cols][None].expand(b, t)
        mask = attention_mask(q_segs, segs[None].expand(b, keys), "isolated")
        additive = torch.zeros(mask.shape, device=dev, dtype=dtype).masked_fill_(~mask, float("-inf"))
        gqa = args.heads != args.kv_heads
        twin = bi.attention_twin(q[0], kv[0, 0], kv[0, 1], additive).float()

        def error(out: torch.Tensor) -> float:
            return float((out.float() - twin).abs().max())

        variants = {"sdpa, masked row": lambda i: F.scaled_dot_product_attention(
            q[i], kv[i, 0], kv[i, 1], attn_mask=additive, enable_gqa=gqa)}
        invariant = bi.masked_keys(mask, additive, q_segs - SUMMARY)
        variants["invariant, grouped"] = lambda i: bi.attention(q[i], kv[i, 0], kv[i, 1], invariant)
        if case == "think":  # generate(): each block's window in a row of its prompt and block
            keep = [torch.cat((torch.arange(args.prompt), torch.arange(args.prompt + j * args.block,
                                                                        args.prompt + (j + 1) * args.block)))
                    for j in range(args.blocks)]
            side = torch.stack([kv[:, :, :, :, k_j] for k_j in keep], 3)  # [L, 2, b, m, Hkv, P + block, D]
            side = side.flatten(2, 3)
            q_side = q.view(LAYERS, b, args.heads, args.blocks, args.window, -1).transpose(2, 3).flatten(1, 2)

            def blocks_side_by_side(i):
                out = F.scaled_dot_product_attention(q_side[i], side[i, 0], side[i, 1], enable_gqa=gqa)
                return out.view(b, args.blocks, args.heads, args.window, -1).transpose(1, 2).flatten(2, 3)
            variants["blocks side by side, no mask"] = blocks_side_by_side
        build_us = 1e3 * median_ms(lambda: bi.masked_keys(mask, additive, q_segs - SUMMARY))
        for name, fn in variants.items():
            err = error(fn(0))
            us = timed_us(fn)
            rows.append((case, b, t, name, us, err))
            records.append({"case": case, "batch": b, "queries": t, "variant": name, "us": us, "max_err": err})
        rows.append((case, b, t, "(masked_keys, eager)", build_us, 0.0))
        records.append({"case": case, "batch": b, "variant": "masked_keys", "us": build_us})
    print(f"\nLLaDA-8B attention shape: {args.heads} heads, {args.kv_heads} kv heads, d {args.head_dim}; a row of "
          f"{args.prompt} prompt + {args.blocks} x {args.block} + {args.summary} summary ({keys} keys), window "
          f"{args.window}, bf16; µs a call (graph of {CALLS} calls over {LAYERS} layers' keys)")
    print(f"{'case':>8} | {'b':>3} | {'T':>5} | {'variant':<34} | {'µs':>8} | {'max err':>8}")
    for case, b, t, name, us, err in rows:
        print(f"{case:>8} | {b:>3} | {t:>5} | {name:<34} | {us:>8.1f} | {err:>8.4f}")
    emit_json({**info, "benchmark": "grouped_attention", "rows": records})


if __name__ == "__main__":
    main()
