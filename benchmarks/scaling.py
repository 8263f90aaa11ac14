"""Distributed canvas decoding on N GPUs, at LLaDA-8B shapes with random bf16 weights.

    torchrun --standalone --nproc-per-node N benchmarks/scaling.py --data ../shared/data/gsm8k

N ranks decode m = N think blocks, one per rank (weak scaling: each rank's work stays that of
one block), and rank 0 decodes the summary over all of them. Measured, each as the median of
``--repeats`` generations after a first one that captures the CUDA graphs:

- ``spread``: the canvas over N ranks, exact (whole blocks forwarded) and windowed; prompt KV
  broadcast, the blocks' KV gathered for the summary (and, exact only, the tokens gathered and
  the summary prefilled again);
- on rank 0 alone (the other ranks wait): ``batched``, the same m blocks on one GPU, and
  ``one_block``, a canvas of one such block and the same summary. Efficiency = time(one block,
  one GPU) / time(m blocks, m GPUs), for the whole generation and for the think phase;
- prompt KV for prompts of ``--kv-prompts`` tokens: broadcast from rank 0 against a prefill on
  every rank (the slowest rank's time), and what the cost model (``prompt_kv.estimate``) picks;
- the share of wall time spent moving data (prompt-KV broadcast + gather) for the exact run;
- identity: the spread canvas equals the one-GPU canvas token for token (DESIGN.md contract 3).

Random weights: every block commits a fixed ``--tokens-per-step`` tokens per step; EOS does not
close blocks. The model's maximum length is raised to fit the longest prompt-KV prompt (random
weights: positions beyond the published 4096 cost the same). Prompts are GSM8K test problems
packed by latency.py's GSM8K BPE. ``--tiny`` swaps in a 2-layer model of the same family, to
try the script on CPU ranks (gloo).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from transformers import PreTrainedTokenizerFast

from harness import banner, emit_json, synced
from latency import gsm8k_tokenizer, packed_prompt
from paradec import GenerationConfig, generate
from paradec.distributed import init_distributed, prompt_kv, teardown
from paradec.distributed.env import current_env, print0, single_process
from paradec.models import build, count_parameters, reference_config

NOTE = ("random weights: every block commits a fixed number of tokens per step; EOS does not close blocks; "
        "spread = one think block per GPU, batched and one_block run on rank 0's GPU alone")
TINY = {"n_layers": 2, "num_hidden_layers": 2, "d_model": 128, "hidden_size": 128, "n_heads": 4,
        "num_attention_heads": 4, "n_kv_heads": 4, "num_key_value_heads": 4, "mlp_hidden_size": 256,
        "intermediate_size": 256}  # LLaDA's and Dream's names; only those the config has are used


def timed_generations(model, prompt: list[int], config: GenerationConfig, repeats: int) -> dict:
    """First generation (captures graphs) and the median of ``repeats`` more, on every rank of
    the current group (or alone, inside ``single_process``); rank 0's results."""
    first, walls, out = None, [], None
    for i in range(repeats + 1):
        if current_env().distributed:  # not inside single_process: the other ranks wait elsewhere
            dist.barrier()
        t0 = synced()
        out = generate(model, [prompt], config)
        wall = synced() - t0
        first, walls = (wall, walls) if i == 0 else (first, walls + [wall])
    if out is None:
        return {}
    result = out[0]
    return {"first_s": first, "wall_s": statistics.median(walls), "phases_s": dict(result.timings),
            "token_ids": result.token_ids, "steps": result.steps, "nfe": result.nfe,
            "rank_timings": result.rank_timings, "placement": result.placement}


def shared_prompt_kv(model, env, prompt: list[int], how: str, repeats: int) -> float:
    """Seconds until every rank holds the prompt KV (the slowest rank), median of repeats."""
    ids = torch.tensor([prompt], device=env.device)
    lengths = torch.tensor([len(prompt)], device=env.device)
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        t0 = synced()
        cache = prompt_kv.prefill(model, env, ids, lengths, how, reserve=0)
        if how == "broadcast":
            cache = prompt_kv.broadcast(model, env, cache, ids, lengths, reserve=0)
        elapsed = torch.tensor([synced() - t0], dtype=torch.float64, device=env.device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        del cache
        if i:
            times.append(float(elapsed))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llada-8b-instruct")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k"))
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--block-len", type=int, default=224, help="each think block (m = 4: a 1024-token canvas)")
    parser.add_argument("--summary-len", type=int, default=128)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--tokens-per-step", type=int, default=4)
    parser.add_argument("--kv-prompts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (CPU trial runs)")
    parser.add_argument("--out-dir", type=Path, default=Path("scaling-out"))
    args = parser.parse_args()

    env = init_distributed(timeout_s=900)
    if not env.distributed:
        raise SystemExit("scaling.py spreads a canvas over ranks: run it under torchrun with --nproc-per-node >= 2")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info = banner() if env.is_rank0 else {}
    print0(NOTE)
    m = env.world_size
    saved = args.out_dir / "tokenizer"
    if env.is_rank0 and not saved.exists():  # trained once; every rank loads it (the headers are its tokens)
        gsm8k_tokenizer(args.data).save_pretrained(saved)
    dist.barrier()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(saved)
    prompts = {n: packed_prompt(tokenizer, args.data, n) for n in sorted({args.prompt_len, *args.kv_prompts})}

    config = reference_config(args.model)
    config |= {k: v for k, v in TINY.items() if k in config} if args.tiny else {}
    room = max(args.kv_prompts + [args.prompt_len]) + m * (args.block_len + 8) + args.summary_len + 64
    config[next(k for k in ("max_sequence_length", "max_position_embeddings") if k in config)] = room
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    model = build(config, device=env.device, dtype=dtype, seed=0, tokenizer=tokenizer)
    print0(f"{args.model}{' (tiny)' if args.tiny else ''}: {count_parameters(model.module) / 1e9:.3f} B parameters, "
           f"{m} ranks, device {env.device.type}")

    shape = dict(mode="nap", blocks=m, block_len=args.block_len, summary_len=args.summary_len,
                 tokens_per_step=args.tokens_per_step, attention="isolated", eos_closes_block=False,
                 chat_template=False, prompt_kv="broadcast")
    variants = {
        "exact": GenerationConfig(**shape, gather="kv"),
        "exact_gather_tokens": GenerationConfig(**shape, gather="tokens"),
        "windowed": GenerationConfig(**shape, gather="kv", window=args.window),
    }
    prompt = prompts[args.prompt_len]
    rows = []
    for name, variant in variants.items():
        spread = timed_generations(model, prompt, variant, args.repeats)
        alone = {}
        if env.is_rank0 and name != "exact_gather_tokens":
            with single_process():
                alone["batched"] = timed_generations(model, prompt, variant, args.repeats)
                one = GenerationConfig(**(shape | dict(blocks=1)), gather=variant.gather, window=variant.window)
                alone["one_block"] = timed_generations(model, prompt, one, args.repeats)
        dist.barrier()
        if not env.is_rank0:
            continue
        row = {"variant": name, "m": m, "canvas": len(spread["token_ids"]), "spread_s": spread["wall_s"],
               "spread_first_s": spread["first_s"], "spread_phases_s": spread["phases_s"],
               "rank_timings": spread["rank_timings"], "steps": spread["steps"]}
        phases = spread["phases_s"]
        row["moving_share"] = (phases["broadcast"] + phases["gather"]) / phases["total"]
        if alone:
            batched, one = alone["batched"], alone["one_block"]
            row |= {"batched_s": batched["wall_s"], "one_block_s": one["wall_s"],
                    "efficiency": one["wall_s"] / spread["wall_s"],
                    "think_efficiency": one["phases_s"]["think"] / phases["think"],
                    "speedup_over_batched": batched["wall_s"] / spread["wall_s"],
                    "identical_to_one_gpu": spread["token_ids"] == batched["token_ids"],
                    "batched_phases_s": batched["phases_s"], "one_block_phases_s": one["phases_s"]}
        rows.append(row)
        print0(f"  {name:20} spread {row['spread_s'] * 1e3:8.1f} ms  "
               + (f"batched {row['batched_s'] * 1e3:8.1f} ms  one block {row['one_block_s'] * 1e3:8.1f} ms  "
                  f"eff {row['efficiency']:.3f}  identical {row['identical_to_one_gpu']}" if alone else "")
               + f"  moving {row['moving_share'] * 100:.1f} %")

    kv_rows = []
    for length in args.kv_prompts:
        costs = prompt_kv.estimate(model, env, length)
        measured = {how: shared_prompt_kv(model, env, prompts[length], how, args.repeats)
                    for how in ("broadcast", "recompute")}
        better = min(measured, key=measured.get)
        kv_rows.append({"prompt_len": length, "broadcast_s": measured["broadcast"],
                        "recompute_s": measured["recompute"], "better": better, "chosen": costs.choice,
                        "predicted_broadcast_s": costs.broadcast_s, "predicted_recompute_s": costs.recompute_s,
                        "chosen_over_better": measured[costs.choice] / measured[better]})
        print0(f"  prompt KV P={length:<5} broadcast {measured['broadcast'] * 1e3:8.2f} ms  recompute "
               f"{measured['recompute'] * 1e3:8.2f} ms  chosen {costs.choice}  better {better}")

    if env.is_rank0:
        (args.out_dir / f"scaling_{m}.json").write_text(json.dumps({"rows": rows, "prompt_kv": kv_rows}, indent=1))
        print(f"\n{'variant':20} {'m':>2} {'canvas':>6} {'spread ms':>9} {'batched ms':>10} {'one blk ms':>10} "
              f"{'eff':>5} {'think eff':>9} {'moving %':>8} {'same':>5}")
        for r in rows:
            print(f"{r['variant']:20} {r['m']:>2} {r['canvas']:>6} {r['spread_s'] * 1e3:>9.1f} "
                  f"{r.get('batched_s', float('nan')) * 1e3:>10.1f} {r.get('one_block_s', float('nan')) * 1e3:>10.1f} "
                  f"{r.get('efficiency', float('nan')):>5.3f} {r.get('think_efficiency', float('nan')):>9.3f} "
                  f"{r['moving_share'] * 100:>8.2f} {str(r.get('identical_to_one_gpu', '-')):>5}")
        print(f"\n{'prompt':>6} {'broadcast ms':>12} {'recompute ms':>12} {'predicted b/r ms':>17} {'chosen':>10} "
              f"{'chosen/better':>13}")
        for r in kv_rows:
            predicted = f"{r['predicted_broadcast_s'] * 1e3:.2f}/{r['predicted_recompute_s'] * 1e3:.2f}"
            print(f"{r['prompt_len']:>6} {r['broadcast_s'] * 1e3:>12.2f} {r['recompute_s'] * 1e3:>12.2f} "
                  f"{predicted:>17} {r['chosen']:>10} {r['chosen_over_better']:>13.3f}")
        emit_json({"benchmark": "scaling", **info, "model": args.model, "tiny": args.tiny, "ranks": m,
                   "note": NOTE, "rows": [{k: v for k, v in r.items() if k != "rank_timings"} for r in rows],
                   "prompt_kv": kv_rows})
    teardown()


if __name__ == "__main__":
    main()
