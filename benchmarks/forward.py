"""One cached forward of the native model at exact published shapes, random weights.

A step of canvas decoding is one forward over the active tokens with the prompt's KV cached.
This times that forward for LLaDA-8B-Instruct and Dream-v0-Instruct-7B shapes (random bf16
weights built on the GPU), eager and replayed as a CUDA graph, against the weight-read floor
(parameter bytes over the device-to-device copy bandwidth measured in the same run).
Two prompt caches are compared: one with reserved room where each forward writes its k/v in
place ("in place"), one without, where each layer concatenates the cache with the new k/v.

    python benchmarks/forward.py --models llada-8b-instruct dream-v0-instruct-7b --prompt-len 512 --new-tokens 1 32 128 256
"""

from __future__ import annotations

import argparse
import gc

import torch

from harness import banner, capture_graph, copy_bandwidth_gbs, emit_json, median_ms
from paradec.models import AttentionSpec, build, count_parameters, reference_config


def time_model(name: str, prompt_len: int, new_tokens: list[int], repeats: int, use_graphs: bool, dtype) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(reference_config(name), device=device, dtype=dtype, seed=0)
    params = count_parameters(model.module)
    weight_bytes = params * torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    vocab = model.spec.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), device=device, generator=g)
    lengths = torch.tensor([prompt_len], device=device)
    caches = {
        "in_place": model.prefill(prompt, lengths, reserve=max(new_tokens)),
        "concat": model.prefill(prompt, lengths),
    }
    rows = []
    for n in new_tokens:
        spec = AttentionSpec.from_lengths("isolated", prompt_len, [n])
        positions = torch.arange(prompt_len, prompt_len + n, device=device)[None]  # [1, n]
        segments = spec.segment_ids(positions[0])[None]
        ids = torch.randint(0, vocab, (1, n), device=device, generator=g)

        for kind, cache in caches.items():

            def step(cache=cache):
                return model(ids, positions, segments, "isolated", cache=cache, logits_at=positions, check_inputs=False)

            row = {"model": name, "cache": kind, "prompt_len": prompt_len, "new_tokens": n}
            row["eager_ms"] = median_ms(step, warmup=3, repeats=repeats)
            if use_graphs and device == "cuda":
                graph, out = capture_graph(step)
                expected = step()
                graph.replay()
                torch.cuda.synchronize()
                # Same kernels on the same inputs: a graph replay must reproduce eager exactly.
                row["graph_matches_eager"] = bool(torch.equal(out, expected))
                row["graph_ms"] = median_ms(graph.replay, warmup=3, repeats=repeats)
                del graph, out
            rows.append(row)
    for row in rows:
        row["params"] = params
        row["weight_bytes"] = weight_bytes
    del model, caches
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llada-8b-instruct"])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-graphs", action="store_true")
    args = parser.parse_args()
    info = banner()
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth_gbs() if torch.cuda.is_available() else None
    rows = []
    for name in args.models:
        rows += time_model(name, args.prompt_len, args.new_tokens, args.repeats, not args.no_graphs, dtype)
    if bandwidth:
        print(f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)")
    print(f"{'model':22} {'cache':>8} {'prompt':>6} {'new':>5} {'eager ms':>9} {'graph ms':>9} {'floor ms':>9} {'graph=eager':>11}")
    for row in rows:
        if bandwidth:
            row["floor_ms"] = row["weight_bytes"] / (bandwidth * 1e6)
        print(
            f"{row['model']:22} {row['cache']:>8} {row['prompt_len']:>6} {row['new_tokens']:>5} {row['eager_ms']:>9.2f} "
            f"{row.get('graph_ms', float('nan')):>9.2f} {row.get('floor_ms', float('nan')):>9.2f} "
            f"{str(row.get('graph_matches_eager', '-')):>11}"
        )
    emit_json({"benchmark": "forward", **info, "copy_gbs": bandwidth, "rows": rows})


if __name__ == "__main__":
    main()
