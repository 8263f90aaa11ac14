"""Continuous batching in one process: ``paradec.batching.BatchEngine`` under closed-loop load
against batched AR on the same device, and a lone request against ``paradec.generate()``.

A closed-loop level of concurrency c keeps c requests in the engine (a finished one is replaced
at once) until ``--requests`` have finished: throughput, p50/p99 latency (from add to result),
and the engine's compute per committed token (query columns forwarded per body token, by action,
padding of the step call included). AR: paradec's ``StaticCausalDecoder`` on the same weights at
batch = c (``serve_load.ar_level``). ``--mixed`` alternates two settings (top-k 4 tokens a step,
and the threshold policy) so that every batch holds both. ``--open-loop RATE ...``: Poisson
arrivals, streamed, whose staggered requests sit in different phases (a closed loop's step in
lockstep): the step calls' padding shows there; ``--no-pack`` keeps every step call that has
a graph on it (the packing A/B); ``--no-refresh-graphs`` drops the refresh calls' graphs after
warm-up, so that refreshes run called (the A/B of replaying them); ``--no-packed-graphs`` drops
the packed step graphs (``PACKED_STEP``), so that staggered rows' step calls replay padded. ``PARADEC_ROPE_KV=0`` and
``PARADEC_SWIGLU_KERNEL=0`` in the environment turn the rotation/KV-write and SwiGLU Triton
kernels off (their A/B; the JSON line says which ran). Prints the device, versions, a table and one JSON line.

    cd benchmarks && python batch_engine.py                                 # paradec-tiny on this CPU
    cd benchmarks && python batch_engine.py --shape llada-8b-instruct --data ../../shared/data/gsm8k   # GPU
    cd benchmarks && python batch_engine.py --shape llada-8b-instruct --data ../../shared/data/gsm8k \
        --concurrency 8 --open-loop 1 2 [--no-pack]                                           # staggered
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import paradec
import paradec.batching.engine as batching_engine
from harness import banner, emit_json, synced
from paradec.api import resolve_config
from paradec.batching import BatchEngine
from paradec.ops import rope_kv, swiglu
from serve_load import add_workload_arguments, ar_level, arrival_times, percentile, refresh_label, workload


def closed_loop(engine: BatchEngine, prompt, configs: list, concurrency: int, requests: int) -> dict:
    """Keeps ``concurrency`` requests in the engine until ``requests`` finished."""
    added, latencies, started_at, committed = 0, [], {}, 0
    before, profile_before = _counts(engine), dict(engine.stats.profile)
    start = synced()
    while len(latencies) < requests:
        while added < requests and len(started_at) < concurrency:
            name = f"c{concurrency}-{added}"
            engine.add(name, prompt, configs[added % len(configs)])
            started_at[name] = time.perf_counter()
            added += 1
        for out in engine.step():
            if out.finished:
                latencies.append(time.perf_counter() - started_at.pop(out.request_id))
                committed += sum(len(ids) for ids in out.result.block_token_ids) + len(out.result.summary_token_ids)
    wall = synced() - start
    profile = {k: v - profile_before.get(k, 0.0) for k, v in engine.stats.profile.items()}
    spent, body = _spent(engine, before), requests * _body_tokens(engine, prompt, configs)
    return {"concurrency": concurrency, "requests": requests, "wall_s": wall, "rps": requests / wall,
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "engine_steps": spent["steps"], "ms_per_engine_step": 1e3 * wall / max(1, spent["steps"]),
            "graph_replays": spent["graph_replays"], "commit_replays": spent["commit_replays"],
            "step_calls": spent["step_calls"],
            "columns_per_body_token": {k: spent[k] / body for k in ("prefill", "extend", "refresh", "step")}
            | {"step_call_padded": spent["step_call_columns"] / body},
            "tokens_before_eos": committed, "profile_s": profile}


def open_loop(engine: BatchEngine, prompt, configs: list, rate: float, requests: int, seed: int) -> dict:
    """Poisson arrivals of ``rate`` a second (``serve_load.arrival_times``), each request
    streamed as a served stream is (progress after every step): throughput, latency from
    arrival, time to first progress, and the step calls' padding (staggered requests sit in
    different phases, unlike a closed loop's, which step in lockstep)."""
    arrivals = arrival_times(rate, requests, seed)
    before, arrived, progressed, first, latencies, added = _counts(engine), {}, set(), [], [], 0
    start = synced()
    while len(latencies) < requests:
        now = time.perf_counter() - start
        while added < requests and arrivals[added] <= now:
            name = f"open{rate}-{added}"
            engine.add(name, prompt, configs[added % len(configs)], stream=True)
            arrived[name] = start + arrivals[added]
            added += 1
        if not engine.has_unfinished():
            time.sleep(arrivals[added] - now)
            continue
        for out in engine.step():
            at = time.perf_counter() - arrived[out.request_id]
            if out.request_id not in progressed:  # its first output: progress after its first step
                progressed.add(out.request_id)
                first.append(at)
            if out.finished:
                latencies.append(at)
                del arrived[out.request_id]
    wall = synced() - start
    spent, body = _spent(engine, before), requests * _body_tokens(engine, prompt, configs)
    return {"rate": rate, "requests": requests, "wall_s": wall, "rps": requests / wall,
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "first_progress_p50_s": percentile(first, 0.5), "engine_steps": spent["steps"],
            "graph_replays": spent["graph_replays"], "packed_replays": spent["packed_replays"],
            "step_calls": spent["step_calls"], "step_call_padded": spent["step_call_columns"] / body,
            "step_real": spent["step"] / body}


def _spent(engine: BatchEngine, before: dict) -> dict:
    """The engine's counts since ``before`` (``_counts``)."""
    after = _counts(engine)
    return {k: after[k] - before[k] for k in after}


def _counts(engine: BatchEngine) -> dict:
    s = engine.stats
    return {"steps": s.steps, "graph_replays": s.graph_replays, "commit_replays": s.commit_replays,
            "packed_replays": s.packed_replays, "step_calls": s.step_calls,
            "step_call_columns": s.step_call_columns, **s.forwarded}


def _body_tokens(engine: BatchEngine, prompt, configs: list) -> float:
    """Body tokens of a request (the mean over ``configs``)."""
    from paradec.api import build_layout

    return statistics.mean(int(build_layout(engine.model, c).editable.sum()) for c in configs)


def lone_request(engine: BatchEngine, model, prompt, config, repeats: int) -> dict:
    """One request alone in the engine against ``paradec.generate()`` of it: medians."""
    engine_s, direct_s = [], []
    for _ in range(2):
        engine.generate([prompt], [config])
        paradec.generate(model, prompt, config)
    for _ in range(repeats):
        start = synced()
        engine.generate([prompt], [config])
        engine_s.append(synced() - start)
        start = synced()
        paradec.generate(model, prompt, config)
        direct_s.append(synced() - start)
    return {"engine_s": statistics.median(engine_s), "generate_s": statistics.median(direct_s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="finished requests per level")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="lone-request timings")
    p.add_argument("--mixed", action="store_true", help="alternate top-k and threshold requests")
    p.add_argument("--no-ar", action="store_true")
    p.add_argument("--batch-invariant", action="store_true")
    p.add_argument("--profile", action="store_true", help="time the parts of each engine step (synchronising)")
    p.add_argument("--open-loop", type=float, nargs="+", default=[], metavar="RATE",
                   help="also Poisson arrivals at these rates (requests per second), streamed")
    p.add_argument("--seed", type=int, default=0, help="the open loop's arrival times")
    p.add_argument("--no-refresh-graphs", action="store_true",
                   help="drop the refresh calls' graphs after warm-up (refreshes run called): that A/B")
    p.add_argument("--no-packed-graphs", action="store_true",
                   help="drop the packed step graphs after warm-up (padded replays): that A/B")
    p.add_argument("--no-pack", action="store_true",
                   help="never pack a step call that has a graph (PACK_SAVING = inf): the packing A/B")
    p.add_argument("--no-merged-refreshes", action="store_true",
                   help="refreshes beside a step call never join it (MERGED_WORK = inf): that A/B")
    args = p.parse_args()
    if args.no_pack:
        batching_engine.PACK_SAVING = float("inf")
    if args.no_merged_refreshes:
        batching_engine.MERGED_WORK = float("inf")
    info = banner()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt, settings, loader, name = workload(args)
    model = loader(device) if callable(loader) else paradec.load(loader, device=device)
    configs = [resolve_config(model, **settings)]
    if args.mixed:
        configs.append(resolve_config(model, **(settings | {"policy": "threshold", "threshold": 0.9,
                                                            "tokens_per_step": None})))
    prompt_ids = paradec.api.encode_prompt(model, prompt, configs[0], paradec.api.build_layout(model, configs[0]))
    canvas = max(paradec.api.build_layout(model, c).length for c in configs)
    engine = BatchEngine(model, max_batch=args.max_batch, max_prompt_tokens=len(prompt_ids), max_canvas_tokens=canvas,
                         batch_invariant=True if args.batch_invariant else None, profile=args.profile)
    start = time.perf_counter()
    graphs = engine.warm_up(configs)
    warm_s = time.perf_counter() - start
    if args.no_refresh_graphs:  # (key: batch, width, commit width, keys, refresh, packed to, delayed)
        engine.calls.graphs = {key: graph for key, graph in engine.calls.graphs.items() if not key[4]}
    if args.no_packed_graphs:
        engine.calls.graphs = {key: graph for key, graph in engine.calls.graphs.items() if key[5] is None}
    lone = lone_request(engine, model, prompt, configs[0], args.repeats)
    rows = [closed_loop(engine, prompt, configs, c, max(args.requests, c)) for c in args.concurrency]
    open_rows = [open_loop(engine, prompt, configs, rate, args.requests, args.seed) for rate in args.open_loop]
    engine.calls.release()
    del engine
    ar_rows = [] if args.no_ar else [ar_level(model, prompt_ids, canvas, c, 3) for c in args.concurrency]
    print(f"\n{name}, {settings}{' + threshold' if args.mixed else ''}"
          f"{refresh_label(configs[0])}, "
          f"rows {args.max_batch}; warm-up {warm_s:.1f} s, {graphs} graphs"
          f"{' (refresh graphs dropped)' if args.no_refresh_graphs else ''}"
          f"{' (packed graphs dropped)' if args.no_packed_graphs else ''}"
          f"{' (refreshes never merged)' if args.no_merged_refreshes else ''}")
    print(f"lone request: engine {lone['engine_s'] * 1e3:.1f} ms, generate() {lone['generate_s'] * 1e3:.1f} ms "
          f"({lone['engine_s'] / lone['generate_s']:.3f}x)")
    print(f"{'c':>3} | {'req/s':>6} | {'p50 s':>6} | {'p99 s':>6} | {'ms/step':>7} | {'cols/token':>10} | "
          f"{'AR req/s':>8} | {'AR s':>6} | {'x AR':>5} | {'p50/AR':>6}")
    for i, r in enumerate(rows):
        ar = ar_rows[i] if ar_rows else None
        cols = sum(v for k, v in r["columns_per_body_token"].items() if k != "step_call_padded")
        line = (f"{r['concurrency']:>3} | {r['rps']:>6.2f} | {r['p50_s']:>6.2f} | {r['p99_s']:>6.2f} | "
                f"{r['ms_per_engine_step']:>7.1f} | {cols:>10.2f} | ")
        if ar:
            line += (f"{ar['rps']:>8.2f} | {ar['latency_s']:>6.2f} | {r['rps'] / ar['rps']:>5.2f} | "
                     f"{r['p50_s'] / ar['latency_s']:>6.2f}")
        print(line)
        if r["profile_s"]:
            print("      " + ", ".join(f"{k} {v:.2f} s" for k, v in r["profile_s"].items()))
    if open_rows:
        print(f"open loop (Poisson, seed {args.seed}, streamed){', no packing' if args.no_pack else ''}")
        print(f"{'rate /s':>7} | {'req/s':>6} | {'p50 s':>6} | {'p99 s':>6} | {'1st prog s':>10} | "
              f"{'replays':>9} | {'step cols/token (real)':>22}")
        for r in open_rows:
            print(f"{r['rate']:>7.2f} | {r['rps']:>6.2f} | {r['p50_s']:>6.2f} | {r['p99_s']:>6.2f} | "
                  f"{r['first_progress_p50_s']:>10.2f} | {r['graph_replays']:>4}/{r['step_calls']:<4} | "
                  f"{r['step_call_padded']:>13.2f} ({r['step_real']:.2f})")
    emit_json({"benchmark": "batch_engine", **info, "model": name, "settings": settings, "mixed": args.mixed,
               "partial_refresh": configs[0].refreshes_partially, "delayed_kv": configs[0].delayed_kv,
               "rows": args.max_batch, "warm_up_s": warm_s, "graphs": graphs, "lone": lone, "levels": rows,
               "open_loop": open_rows, "open_loop_seed": args.seed, "pack": not args.no_pack,
               "merged_refreshes": not args.no_merged_refreshes,
               "refresh_graphs": not args.no_refresh_graphs, "packed_graphs": not args.no_packed_graphs,
               "rope_kv": device == "cuda" and rope_kv.HAVE_TRITON and "cuda" in rope_kv.DEVICES,
               "swiglu_kernel": device == "cuda" and swiglu.HAVE_TRITON and "cuda" in swiglu.DEVICES,
               "ar": ar_rows, "prompt_tokens": len(prompt_ids), "canvas": canvas})


if __name__ == "__main__":
    main()
