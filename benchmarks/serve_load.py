"""Load on a paradec server: requests per second and p50/p99 latency at several concurrencies
(closed loop) and at several arrival rates (open loop), against batched AR decoding on the same
device, and the wire's overhead against a direct ``paradec.generate()`` of the same request.

A frontend and its engine (a spawned process) run on this machine. Closed loop: ``c`` client
threads each send requests one after another (greedy, one config, so the engine batches what
arrives together) until ``--requests`` per level are done. Open loop (``--open-loop RATE ...``):
``--requests`` requests per rate arrive at exponential intervals (a seeded Poisson process),
each sent at its arrival time from its own thread with streamed progress; per rate: achieved
throughput, p50/p99 latency, p50/p99 time from arrival to the first progress message, and
canvas body tokens per second. Overhead: the median end-to-end latency of one request at
concurrency 1 against the median of ``generate()`` on the same prompt and config in this
process (the model loaded here too), both after warm-up. AR baseline (after the server has
stopped; ``--no-ar`` skips it): paradec's ``StaticCausalDecoder`` on the same weights run as a
causal LM, at batch = each concurrency, the same prompt, ``--ar-new-tokens`` new tokens
(default: the request's canvas body), greedy, no EOS stop; AR req/s at concurrency c is c over
the latency of one batch of c. Prints the device, versions, tables and ends with one JSON line.

    cd benchmarks && python serve_load.py                                   # paradec-tiny on this CPU
    cd benchmarks && python serve_load.py --concurrency 1 2 --requests 4 --open-loop 1 3   # and open loop
    cd benchmarks && python serve_load.py --shape llada-8b-instruct --data ../../shared/data/gsm8k   # GPU
    cd benchmarks && python serve_load.py --shape llada-8b-instruct --data ../../shared/data/gsm8k \
        --open-loop 1 2 4 8 --requests 64                                  # GPU, open loop too
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import threading
import time
from functools import partial
from pathlib import Path

import torch

import paradec
from harness import banner, emit_json, synced
from paradec import GenerationConfig
from paradec.api import build_layout, encode_prompt
from paradec.decoding.causal import StaticCausalDecoder
from paradec.serve import Client, Progress, ServeError
from paradec.serve.frontend import BackgroundFrontend, EngineTarget
from paradec.serve.protocol import Limits

TINY_CANVAS = {"blocks": 4, "tokens_per_step": 2}


def random_model(shape: str, data: Path, device: str):
    """A random-weight bf16 model of a published shape with a GSM8K-trained BPE (for timing)."""
    from latency import gsm8k_tokenizer
    from paradec.models import build, reference_config

    return build(reference_config(shape), device=device, dtype=torch.bfloat16, seed=0, tokenizer=gsm8k_tokenizer(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- the server -----------------------------------------------------------------------------
def served_one(address: str, prompt, settings: dict, repeats: int) -> dict:
    """One request at a time after warm-up: medians of its end-to-end latency and of the engine's
    own times, and of a client-frontend round trip."""
    with Client(address, timeout_s=600) as client:
        for _ in range(3):  # warm-up: graphs captured, caches warm
            client.generate(prompt, **settings)
        served, engine, engine_generate, queued = [], [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            result = client.generate(prompt, **settings)
            served.append(time.perf_counter() - start)
            engine.append(result.timings["total"])  # the engine's own decode of it
            engine_generate.append(result.engine_s["generate"])  # generate() around it, in the engine
            queued.append(result.engine_s["queued"])  # from its arrival in the engine to its start
        hops = []
        for _ in range(20):  # client -> frontend -> client, no engine: the cost of the frontend's hop
            start = time.perf_counter()
            client.health()
            hops.append(time.perf_counter() - start)
    return {"served_s": statistics.median(served), "engine_decode_s": statistics.median(engine),
            "engine_generate_s": statistics.median(engine_generate), "engine_queued_s": statistics.median(queued),
            "frontend_round_trip_s": statistics.median(hops)}


def load_level(address: str, prompt, settings: dict, concurrency: int, requests: int) -> dict:
    """Closed loop: ``concurrency`` clients, each sending its next request when the last returns."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with Client(address, timeout_s=600) as client:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                start = time.perf_counter()
                client.generate(prompt, **settings)
                with lock:
                    latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(latencies), "wall_s": wall, "rps": len(latencies) / wall,
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99)}


def arrival_times(rate: float, requests: int, seed: int) -> list[float]:
    """Seconds from the first arrival: a Poisson process of ``rate`` requests per second."""
    rng = random.Random(seed)
    times = [0.0]
    for _ in range(requests - 1):
        times.append(times[-1] + rng.expovariate(rate))
    return times


def streamed_request(address: str, prompt, settings: dict, arrival: float) -> dict:
    """Sends one request at ``arrival`` (a perf_counter time) with streamed progress; times from
    the arrival: its first progress message and its result (or its error)."""
    record = {"first_progress_s": None}
    with Client(address, timeout_s=600) as client:
        time.sleep(max(0.0, arrival - time.perf_counter()))
        try:
            for event in client.stream(prompt, progress=True, **settings):
                if isinstance(event, Progress) and record["first_progress_s"] is None:
                    record["first_progress_s"] = time.perf_counter() - arrival
                    record["body_tokens"] = sum(event.lengths)  # the canvas's body, as the engine laid it out
        except (ServeError, TimeoutError) as e:
            record["error"] = getattr(e, "code", type(e).__name__)
    record["latency_s"] = time.perf_counter() - arrival
    return record


def open_loop_level(address: str, prompt, settings: dict, rate: float, requests: int, seed: int) -> dict:
    """Open loop: ``requests`` requests at Poisson arrivals of ``rate`` per second, each from its
    own thread (opened before its arrival), so none waits for an earlier one."""
    records: list[dict] = [{} for _ in range(requests)]
    start = time.perf_counter() + 0.5  # every thread has its client open before the first arrival

    def send(i: int, arrival: float) -> None:
        records[i] = streamed_request(address, prompt, settings, arrival)

    threads = [threading.Thread(target=send, args=(i, start + t)) for i, t in
               enumerate(arrival_times(rate, requests, seed))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = [r for r in records if "error" not in r]
    first = [r["first_progress_s"] for r in done if r["first_progress_s"] is not None]
    return {"rate": rate, "requests": requests, "completed": len(done),
            "errors": sorted({r["error"] for r in records if "error" in r}), "wall_s": wall,
            "rps": len(done) / wall, "p50_s": percentile([r["latency_s"] for r in done], 0.5),
            "p99_s": percentile([r["latency_s"] for r in done], 0.99),
            "first_progress_p50_s": percentile(first, 0.5), "first_progress_p99_s": percentile(first, 0.99),
            "tokens_per_s": sum(r.get("body_tokens", 0) for r in done) / wall}


# --- this process ---------------------------------------------------------------------------
def direct_generate(model, prompt, settings: dict, repeats: int) -> dict:
    """``paradec.generate()`` of the same request here, after warm-up: medians."""
    for _ in range(3):
        paradec.generate(model, prompt, **settings)
    direct, direct_decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = paradec.generate(model, prompt, **settings)
        direct.append(synced() - start)
        direct_decode.append(result.timings["total"])
    return {"direct_s": statistics.median(direct), "direct_decode_s": statistics.median(direct_decode)}


def ar_level(model, prompt_ids: list[int], new_tokens: int, batch: int, repeats: int) -> dict:
    """Greedy causal decoding of ``batch`` copies of the prompt together: the median latency of
    ``repeats`` batches after one warm-up (which captures the graph on a GPU)."""
    decoder = StaticCausalDecoder(model.module, batch, len(prompt_ids) + new_tokens)
    ids = torch.tensor([prompt_ids] * batch, device=model.device)
    decoder.generate(ids, new_tokens)
    latencies = []
    for _ in range(repeats):
        start = synced()
        decoder.generate(ids, new_tokens)
        latencies.append(synced() - start)
    decoder.graph = None
    latency = statistics.median(latencies)
    return {"concurrency": batch, "latency_s": latency, "rps": batch / latency}


# --- reporting ------------------------------------------------------------------------------
def compare(rows: list[dict], ar_rows: list[dict]) -> list[dict]:
    """paradec's closed-loop levels beside AR at batch = concurrency (none without AR rows)."""
    out = []
    for r, ar in zip(rows, ar_rows):
        out.append({"concurrency": r["concurrency"], "paradec_rps": r["rps"], "paradec_p50_s": r["p50_s"],
                    "paradec_p99_s": r["p99_s"], "ar_rps": ar["rps"], "ar_latency_s": ar["latency_s"],
                    "rps_over_ar": r["rps"] / ar["rps"], "p50_over_ar_latency": r["p50_s"] / ar["latency_s"]})
    return out


def print_closed_loop(rows: list[dict], comparison: list[dict]) -> None:
    if not comparison:
        print(f"{'concurrency':>11} | {'req/s':>7} | {'p50 s':>8} | {'p99 s':>8}")
        for r in rows:
            print(f"{r['concurrency']:>11} | {r['rps']:>7.2f} | {r['p50_s']:>8.3f} | {r['p99_s']:>8.3f}")
        return
    print(f"{'concurrency':>11} | {'req/s':>7} | {'p50 s':>8} | {'p99 s':>8} | {'AR req/s':>8} | "
          f"{'AR lat s':>8} | {'req/s / AR':>10} | {'p50 / AR lat':>12}")
    for r in comparison:
        print(f"{r['concurrency']:>11} | {r['paradec_rps']:>7.2f} | {r['paradec_p50_s']:>8.3f} | "
              f"{r['paradec_p99_s']:>8.3f} | {r['ar_rps']:>8.2f} | {r['ar_latency_s']:>8.3f} | "
              f"{r['rps_over_ar']:>10.2f} | {r['p50_over_ar_latency']:>12.2f}")


def print_open_loop(rows: list[dict]) -> None:
    print(f"{'rate /s':>7} | {'done':>7} | {'req/s':>7} | {'p50 s':>8} | {'p99 s':>8} | {'1st prog p50 s':>14} | "
          f"{'tokens/s':>9} | errors")
    for r in rows:
        print(f"{r['rate']:>7.2f} | {r['completed']:>3}/{r['requests']:<3} | {r['rps']:>7.2f} | {r['p50_s']:>8.3f} | "
              f"{r['p99_s']:>8.3f} | {r['first_progress_p50_s']:>14.3f} | {r['tokens_per_s']:>9.1f} | "
              f"{', '.join(r['errors']) or '-'}")


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The request these load benchmarks send (``workload``)."""
    p.add_argument("--model", default="paradec-tiny", help="checkpoint or built-in name (ignored with --shape)")
    p.add_argument("--shape", help="a random-weight model of this published shape, e.g. llada-8b-instruct")
    p.add_argument("--data", type=Path, default=Path("../../shared/data/gsm8k"), help="GSM8K, for --shape")
    p.add_argument("--prompt-len", type=int, default=512, help="with --shape: prompt tokens")
    p.add_argument("--canvas", type=int, default=1024, help="with --shape: canvas tokens (4 blocks + 128 summary)")
    p.add_argument("--full-refresh", action="store_true",
                   help="with --shape: requests asking the dual cache's full refresh (partial_refresh=False; "
                        "nap's default refreshes partially, with fewer columns per token)")
    p.add_argument("--delayed-kv", action="store_true",
                   help="requests asking delayed KV inside their windows (delayed_kv=True: a step forwards only "
                        "the masked columns and those committed at the previous step)")


def refresh_label(config) -> str:
    """How a dual cache's refreshes run, for a table's heading ('' without one)."""
    delayed = ", delayed KV" if config.delayed_kv else ""
    if config.cache_mode != "dual":
        return delayed
    return (", partial refresh" if config.refreshes_partially else ", full refresh") + delayed


def workload(args) -> tuple:
    """(prompt, settings, loader, name): with ``--shape`` a GSM8K-packed prompt of token ids and
    a 4-block canvas with windows of 32 (``--full-refresh``: refreshed in full; ``--delayed-kv``:
    with delayed KV) on a random-weight model (``loader(device)``), else an arith question on the built-in model."""
    if args.shape:
        from latency import gsm8k_tokenizer, nap_shape, packed_prompt

        prompt = packed_prompt(gsm8k_tokenizer(args.data), args.data, args.prompt_len)  # token ids
        settings = nap_shape(args.canvas, 4) | {"tokens_per_step": 4, "window": 32}
        settings |= {"partial_refresh": False} if args.full_refresh else {}
        settings |= {"delayed_kv": True} if args.delayed_kv else {}
        return prompt, settings, partial(random_model, args.shape, args.data.resolve()), f"{args.shape} (random bf16)"
    from paradec.train.tasks import arith

    return arith.test_problems()[0].question, dict(TINY_CANVAS), args.model, args.model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level and per open-loop rate")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="direct generate() calls for the overhead")
    p.add_argument("--open-loop", type=float, nargs="+", default=[], metavar="RATE",
                   help="open loop at these arrival rates (requests per second)")
    p.add_argument("--seed", type=int, default=0, help="the open loop's arrival times")
    p.add_argument("--no-ar", action="store_true", help="skip the AR baseline")
    p.add_argument("--ar-new-tokens", type=int, help="AR's new tokens (default: the request's canvas body)")
    p.add_argument("--ar-repeats", type=int, default=3, help="timed AR batches per concurrency (median)")
    args = p.parse_args()
    info = banner()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt, settings, loader, name = workload(args)
    # the engine's KV rows sized to this benchmark's requests (a server's default rows hold 8k + 8k tokens)
    limits = Limits(max_prompt_tokens=args.prompt_len + 64, max_canvas_tokens=args.canvas + 64) if args.shape \
        else Limits(max_prompt_tokens=256, max_canvas_tokens=512)
    server = BackgroundFrontend((f"tcp://127.0.0.1:{free_port()}",
                                 EngineTarget(loader, max_batch=args.max_batch, device=device, warm_up=(settings,),
                                              limits=limits)),
                                dict(max_pending=max(64, 2 * max(args.concurrency), args.requests)))
    try:
        served = served_one(server.address, prompt, settings, args.repeats)
        rows = [load_level(server.address, prompt, settings, c, args.requests) for c in args.concurrency]
        open_rows = [open_loop_level(server.address, prompt, settings, rate, args.requests, args.seed)
                     for rate in args.open_loop]
    finally:
        server.stop()
    model = loader(device) if callable(loader) else paradec.load(loader, device=device)
    direct = direct_generate(model, prompt, settings, args.repeats)
    config = GenerationConfig(**settings)
    layout = build_layout(model, config)
    prompt_ids = encode_prompt(model, prompt, config, layout)  # what the engine decoded after
    ar_new_tokens = args.ar_new_tokens or sum(end - start for start, end in layout.bodies)
    ar_rows = [] if args.no_ar else [ar_level(model, prompt_ids, ar_new_tokens, c, args.ar_repeats)
                                     for c in args.concurrency]
    comparison = compare(rows, ar_rows)
    overhead = (served["served_s"] - direct["direct_s"]) / served["served_s"]
    wire = (served["served_s"] - served["engine_generate_s"]) / served["served_s"]  # outside generate() in the engine
    print(f"\n{name}, {settings}{refresh_label(config)}, max batch {args.max_batch}, "
          f"{args.requests} requests per level")
    print(f"one request: served {served['served_s'] * 1e3:.1f} ms end to end, of which decoding in the engine "
          f"{served['engine_generate_s'] * 1e3:.1f} ms (its decode loop {served['engine_decode_s'] * 1e3:.1f} ms); "
          f"direct generate() {direct['direct_s'] * 1e3:.1f} ms "
          f"(its decode loop {direct['direct_decode_s'] * 1e3:.1f} ms)")
    print(f"overhead against direct generate(): {overhead * 100:.1f}% of end-to-end; outside the engine's decoding "
          f"(wire, frontend, queue): {wire * 100:.1f}% — of which waiting in the engine "
          f"{served['engine_queued_s'] * 1e3:.2f} ms; a client-frontend round trip "
          f"{served['frontend_round_trip_s'] * 1e3:.2f} ms")
    ar_model = None
    if ar_rows:
        ar_model = (f"paradec StaticCausalDecoder on {name}'s weights run as a causal LM (timing only: its tokens "
                    f"mean nothing), batch = concurrency, {len(prompt_ids)}-token prompt, {ar_new_tokens} new "
                    f"tokens, greedy, no EOS stop, median of {args.ar_repeats} after a warm-up")
        print(f"AR: {ar_model}")
    print(f"\nclosed loop ({layout.length}-token canvas, body {sum(e - s for s, e in layout.bodies)} tokens)")
    print_closed_loop(rows, comparison)
    if open_rows:
        print(f"\nopen loop (Poisson arrivals, seed {args.seed}; tokens/s: canvas body tokens of completed "
              f"requests over the wall from the first arrival to the last answer)")
        print_open_loop(open_rows)
    emit_json({"benchmark": "serve_load", **info, "model": name, "settings": settings,
               "partial_refresh": config.refreshes_partially, "delayed_kv": config.delayed_kv,
               "max_batch": args.max_batch,
               **served, **direct, "overhead": overhead, "outside_decode": wire, "rows": rows,
               "ar_model": ar_model, "ar_prompt_tokens": len(prompt_ids), "ar_new_tokens": ar_new_tokens,
               "ar_rows": ar_rows, "comparison": comparison, "open_loop_seed": args.seed, "open_loop": open_rows})


if __name__ == "__main__":
    main()
