"""Load on a paradec server: requests per second and p50/p99 latency at several concurrencies,
and the wire's overhead against a direct ``paradec.generate()`` of the same request.

A frontend and its engine (a spawned process) run on this machine; ``c`` client threads each
send requests one after another (greedy, one config, so the engine batches what arrives
together) until ``--requests`` per level are done. Overhead: the median end-to-end latency of
one request at concurrency 1 against the median of ``generate()`` on the same prompt and config
in this process (the model loaded here too), both after warm-up. Prints the device, versions, a
table and ends with one JSON line.

    cd benchmarks && python serve_load.py                                   # paradec-tiny on this CPU
    cd benchmarks && python serve_load.py --shape llada-8b-instruct --data ../../shared/data/gsm8k   # GPU
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from functools import partial
from pathlib import Path

import torch

import paradec
from harness import banner, emit_json
from paradec.serve import Client
from paradec.serve.frontend import BackgroundFrontend, EngineTarget

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
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_level(address: str, prompt, settings: dict, concurrency: int, requests: int) -> dict:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="paradec-tiny", help="checkpoint or built-in name (ignored with --shape)")
    p.add_argument("--shape", help="a random-weight model of this published shape, e.g. llada-8b-instruct")
    p.add_argument("--data", type=Path, default=Path("../../shared/data/gsm8k"), help="GSM8K, for --shape")
    p.add_argument("--prompt-len", type=int, default=512, help="with --shape: prompt tokens")
    p.add_argument("--canvas", type=int, default=1024, help="with --shape: canvas tokens (4 blocks + 128 summary)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="direct generate() calls for the overhead")
    args = p.parse_args()
    info = banner()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape:
        from latency import gsm8k_tokenizer, nap_shape, packed_prompt

        prompt = packed_prompt(gsm8k_tokenizer(args.data), args.data, args.prompt_len)  # token ids
        settings = nap_shape(args.canvas, 4) | {"tokens_per_step": 4, "window": 32}
        loader = partial(random_model, args.shape, args.data.resolve())
        name = f"{args.shape} (random bf16)"
    else:
        from paradec.train.tasks import arith

        prompt = arith.test_problems()[0].question
        settings = dict(TINY_CANVAS)
        loader, name = args.model, args.model
    server = BackgroundFrontend((f"tcp://127.0.0.1:{free_port()}",
                                 EngineTarget(loader, max_batch=args.max_batch, device=device)),
                                dict(max_pending=max(64, 2 * max(args.concurrency))))
    try:
        with Client(server.address, timeout_s=600) as client:
            for _ in range(3):  # warm-up: graphs captured, caches warm
                client.generate(prompt, **settings)
            served, engine, engine_generate, queued = [], [], [], []
            for _ in range(args.repeats):
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
        rows = [load_level(server.address, prompt, settings, c, args.requests) for c in args.concurrency]
    finally:
        server.stop()
    model = loader(device) if callable(loader) else paradec.load(loader, device=device)
    for _ in range(3):
        paradec.generate(model, prompt, **settings)
    direct, direct_decode = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = paradec.generate(model, prompt, **settings)
        if device == "cuda":
            torch.cuda.synchronize()
        direct.append(time.perf_counter() - start)
        direct_decode.append(result.timings["total"])
    served_s, direct_s = statistics.median(served), statistics.median(direct)
    engine_s, direct_decode_s = statistics.median(engine), statistics.median(direct_decode)
    engine_generate_s = statistics.median(engine_generate)
    overhead = (served_s - direct_s) / served_s
    wire = (served_s - engine_generate_s) / served_s  # outside generate() in the engine: wire, frontend, queue
    print(f"\n{name}, {settings}, max batch {args.max_batch}, {args.requests} requests per level")
    print(f"one request: served {served_s * 1e3:.1f} ms end to end, of which generate() in the engine "
          f"{engine_generate_s * 1e3:.1f} ms (its decode loop {engine_s * 1e3:.1f} ms); direct generate() "
          f"{direct_s * 1e3:.1f} ms (its decode loop {direct_decode_s * 1e3:.1f} ms)")
    print(f"overhead against direct generate(): {overhead * 100:.1f}% of end-to-end; outside generate() "
          f"(wire, frontend, queue): {wire * 100:.1f}% — of which waiting in the engine "
          f"{statistics.median(queued) * 1e3:.2f} ms; a client-frontend round trip {statistics.median(hops) * 1e3:.2f} ms")
    print(f"{'concurrency':>11} | {'req/s':>7} | {'p50 ms':>8} | {'p99 ms':>8}")
    for r in rows:
        print(f"{r['concurrency']:>11} | {r['rps']:>7.2f} | {r['p50_s'] * 1e3:>8.1f} | {r['p99_s'] * 1e3:>8.1f}")
    emit_json({"benchmark": "serve_load", **info, "model": name, "settings": settings, "max_batch": args.max_batch,
               "served_s": served_s, "direct_s": direct_s, "engine_decode_s": engine_s,
               "engine_generate_s": engine_generate_s, "engine_queued_s": statistics.median(queued),
               "frontend_round_trip_s": statistics.median(hops),
               "direct_decode_s": direct_decode_s, "overhead": overhead, "outside_decode": wire, "rows": rows})


if __name__ == "__main__":
    main()
