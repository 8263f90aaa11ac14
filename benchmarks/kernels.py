"""paradec's scoring and selection kernels against their torch twins.

On a GPU (bf16 logits, V = 126,464 unless told): the score kernel's time and achieved bandwidth
(logits bytes read once, over the device-to-device copy bandwidth measured in the same run)
against the eager twin (softmax + gather + topk) and ``torch.compile`` of it, for several row
counts; and a whole unmasking step — scoring 4 segments x 32 rows, selecting and committing in
place — captured in a CUDA graph. Each kernel figure is taken two ways: one call per timing
(the host's launch included, as an eager caller sees it) and replayed from a CUDA graph of one
call per input set (GPU time, as inside paradec's captured decoding steps). On a CPU: the
kernel against the twin at N = 64, V = 32,000.

    python benchmarks/kernels.py                      # GPU table, or the CPU one without a GPU
"""

from __future__ import annotations

import argparse

import torch

from harness import banner, capture_graph, copy_bandwidth_gbs, emit_json, median_ms
from paradec import ops
from paradec.ops.selection import TOPK

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inputs(n: int, vocab: int, dtype, device, sets: int):
    """Several input sets, rotated, so that small sizes are not timed from the L2 cache."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = [torch.randn(n, vocab, device=device, generator=g).mul_(4).to(dtype) for _ in range(sets)]
    rows = torch.arange(n, device=device)
    stops = torch.tensor([1, 2], device=device)
    bar = torch.zeros(n, dtype=torch.bool, device=device)
    return logits, rows, stops, bar


def rotating(fn, logits):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(logits)
        return fn(logits[state["i"]])

    return call


def graphed_ms(fn, logits, repeats: int) -> float:
    """Median time per call of ``fn`` over each input set in turn, replayed from one graph."""
    graph, _ = capture_graph(lambda: [fn(x) for x in logits])
    return median_ms(graph.replay, warmup=3, repeats=repeats) / len(logits)


def gpu_rows(args, dtype, bandwidth) -> list[dict]:
    twin = lambda x, rows, stops, bar: ops.score_twin(x, rows, 0, stops, bar)  # noqa: E731
    compiled = torch.compile(lambda x, rows, stops, bar: tuple(vars(ops.score_twin(x, rows, 0, stops, bar)).values()))
    out = []
    for n in args.rows:
        sets = max(2, (256 << 20) // (n * args.vocab * dtype.itemsize) + 1)
        logits, rows, stops, bar = inputs(n, args.vocab, dtype, "cuda", min(sets, 16))
        kernel = lambda x: torch.ops.paradec.score(x, rows, 0, stops, bar, 0.0, None)  # noqa: E731
        native = median_ms(rotating(kernel, logits), warmup=5, repeats=args.repeats)
        graphed = graphed_ms(kernel, logits, args.repeats)
        eager = median_ms(rotating(lambda x: twin(x, rows, stops, bar), logits), warmup=3, repeats=args.repeats)
        try:
            comp = median_ms(rotating(lambda x: compiled(x, rows, stops, bar), logits), warmup=3, repeats=args.repeats)
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            print(f"torch.compile of the twin failed at N={n}: {err}")
            comp = float("nan")
        size = n * args.vocab * dtype.itemsize
        gbs, graphed_gbs = size / native / 1e6, size / graphed / 1e6
        out.append({"rows": n, "kernel_ms": native, "eager_ms": eager, "compiled_ms": comp, "kernel_gbs": gbs,
                    "bandwidth_share": gbs / bandwidth, "vs_eager": eager / native, "vs_compiled": comp / native,
                    "graphed_ms": graphed, "graphed_gbs": graphed_gbs, "graphed_share": graphed_gbs / bandwidth})
    return out


def gpu_step(args, dtype) -> dict:
    """Score 4 segments x 32 rows, select the top 4 of each, commit in place: one graph replay."""
    n, segments = 128, 4
    logits, rows, stops, bar = inputs(n, args.vocab, dtype, "cuda", 1)
    canvas = torch.zeros(1, 4 * n, dtype=torch.long, device="cuda")
    trace = torch.full_like(canvas, -1)
    batch = torch.zeros(n, dtype=torch.long, device="cuda")
    column = torch.arange(n, device="cuda") * 2
    key = torch.arange(n, device="cuda") // (n // segments)
    quota = torch.full((n,), 4, device="cuda")
    floor = torch.ones(n, dtype=torch.long, device="cuda")

    def step():
        tokens, conf, _, _ = torch.ops.paradec.score(logits[0], rows, 0, stops, bar, 0.0, None)
        return torch.ops.paradec.select_commit(canvas, trace, batch, column, key, conf, conf, quota, floor, tokens,
                                               TOPK, 0.0, 1)

    graph, _ = capture_graph(step)
    chained = 10
    steps, _ = capture_graph(lambda: [step() for _ in range(chained)])
    return {"step_graph_us": 1e3 * median_ms(graph.replay, warmup=10, repeats=args.repeats),
            "step_in_graph_us": 1e3 * median_ms(steps.replay, warmup=3, repeats=args.repeats) / chained,
            "step_eager_us": 1e3 * median_ms(step, warmup=10, repeats=args.repeats)}


def cpu_rows(args) -> list[dict]:
    out = []
    for name in ("fp32", "bf16"):
        logits, rows, stops, bar = inputs(64, 32000, DTYPES[name], "cpu", 1)
        native = median_ms(lambda: torch.ops.paradec.score(logits[0], rows, 0, stops, bar, 0.0, None),
                           repeats=args.repeats)
        twin = median_ms(lambda: ops.score_twin(logits[0], rows, 0, stops, bar), repeats=args.repeats)
        out.append({"dtype": name, "rows": 64, "vocab": 32000, "kernel_ms": native, "twin_ms": twin,
                    "speedup": twin / native})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=126464)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 128, 256, 1024, 4096])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    info = banner()
    if not ops.NATIVE:
        raise SystemExit(f"paradec._C is not built: {ops.WHY}")
    record = {"benchmark": "kernels", **info, "cpu": cpu_rows(args)}
    print(f"{'CPU dtype':>9} {'N':>5} {'V':>6} {'kernel ms':>10} {'twin ms':>8} {'speedup':>8}")
    for r in record["cpu"]:
        print(f"{r['dtype']:>9} {r['rows']:>5} {r['vocab']:>6} {r['kernel_ms']:>10.3f} {r['twin_ms']:>8.3f} {r['speedup']:>8.1f}")
    if torch.cuda.is_available() and ops.native_on(torch.device("cuda")):
        bandwidth = copy_bandwidth_gbs()
        record |= {"copy_gbs": bandwidth, "gpu": gpu_rows(args, DTYPES[args.dtype], bandwidth),
                   "step": gpu_step(args, DTYPES[args.dtype])}
        print(f"device-to-device copy {bandwidth:.0f} GB/s; {args.dtype} logits, V = {args.vocab}")
        print(f"{'N':>5} {'kernel ms':>10} {'GB/s':>7} {'of copy':>8} {'graphed ms':>11} {'GB/s':>7} {'of copy':>8} "
              f"{'eager ms':>9} {'x eager':>8} {'compiled ms':>12} {'x compiled':>11}")
        for r in record["gpu"]:
            print(f"{r['rows']:>5} {r['kernel_ms']:>10.4f} {r['kernel_gbs']:>7.0f} {r['bandwidth_share']:>8.2f} "
                  f"{r['graphed_ms']:>11.4f} {r['graphed_gbs']:>7.0f} {r['graphed_share']:>8.2f} "
                  f"{r['eager_ms']:>9.3f} {r['vs_eager']:>8.1f} {r['compiled_ms']:>12.3f} {r['vs_compiled']:>11.1f}")
        s = record["step"]
        print(f"unmasking step, 4 segments x 32 rows: {s['step_graph_us']:.1f} us per graph replay of one step, "
              f"{s['step_in_graph_us']:.1f} us per step in a graph of 10, {s['step_eager_us']:.1f} us eager")
    emit_json(record)


if __name__ == "__main__":
    main()
