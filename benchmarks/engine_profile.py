"""Where the batching engine's time goes: kernel time by kind, and the device's idle time by
what the host was doing, for a lone request in the engine, the same request through
``generate()``, and ``--rows`` requests decoded in lockstep.

Each case runs once to warm up, is timed unprofiled (median of ``--repeats``), then runs once
under torch.profiler. On a GPU the timeline is the CUDA kernels (those inside graph replays
included); on the CPU, where ops run synchronously, it is the top-level operators (ATen's and
paradec's own). A gap of more than 20 µs between them is idle device time, attributed to the
innermost engine method the host was in at the gap's middle (methods wrapped in
``record_function`` while this script runs).

    cd benchmarks && python engine_profile.py                                  # paradec-tiny, this CPU
    cd benchmarks && python engine_profile.py --shape llada-8b-instruct --data ../../shared/data/gsm8k
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import statistics
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import paradec
import paradec.batching.engine as batching_engine
import paradec.batching.rows as batching_rows
import paradec.batching.sequence as batching_sequence
import paradec.batching.step as batching_step
from harness import banner, emit_json, synced
from paradec.api import resolve_config
from paradec.batching import BatchEngine
from serve_load import add_workload_arguments, workload

GAP_US = 20.0
# the host's parts of an engine step: (class, methods)
WRAPPED = [
    (batching_engine.BatchEngine, ("_step", "_admit", "_prefill_chunks", "_step_call", "_commit", "_finish",
                                   "_stopped", "_retire", "_repeats")),
    (batching_step.BatchStep, ("forward_rows", "step_logits", "commit", "commit_step", "key_width", "begin", "end",
                               "prefill_layers", "_forward")),
    (batching_rows.Rows, ("load_windows", "admit", "masked", "clear", "move")),
    (batching_sequence.Sequence, ("advance", "acted")),
]
KINDS = [  # (kind, substrings of a kernel's lower-cased name), first match wins
    ("attention", ("fmha", "flash", "attention", "attn", "sdpa")),
    ("GEMM", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "splitk", "aten::linear", "aten::mm", "aten::addmm")),
    ("paradec rope_kv", ("rope_kv",)),
    ("paradec swiglu", ("silu_mul_kernel",)),
    ("paradec score/select", ("paradec::", "score_", "select_")),
    ("compiled (inductor)", ("triton_",)),
    ("indexing", ("index", "scatter", "gather")),
    ("norm", ("norm",)),
    ("copy / fill", ("copy", "memcpy", "memset", "fill")),
    ("elementwise", ("elementwise",)),
]


def kind(name: str) -> str:
    lower = name.lower()
    return next((k for k, keys in KINDS if any(s in lower for s in keys)), "other")


@contextlib.contextmanager
def host_ranges():
    """Wraps the engine's host methods in ``record_function`` ranges named ``W:Class.method``."""
    saved = []
    for cls, names in WRAPPED:
        for name in names:
            method = cls.__dict__.get(name)
            if method is None:
                continue

            @functools.wraps(method)
            def ranged(*args, _method=method, _label=f"W:{cls.__name__}.{name}", **kwargs):
                with record_function(_label):
                    return _method(*args, **kwargs)

            saved.append((cls, name, method))
            setattr(cls, name, ranged)
    try:
        yield
    finally:
        for cls, name, method in saved:
            setattr(cls, name, method)


def innermost(t: float, spans: list[tuple[float, float, str]], starts: list[float]) -> str:
    """The innermost range holding time ``t``. The ranges (sorted by start, the longer first of
    two that start together) nest, as one thread's do, so it is the last one in that order that
    holds ``t``."""
    for i in range(bisect.bisect_right(starts, t) - 1, -1, -1):
        _, e, n = spans[i]
        if t <= e:
            return n
    return "(no engine method)"


def is_range(event) -> bool:
    """A ``record_function`` range (ours, or inductor's around a compiled graph): on the device's
    timeline it spans kernels, it is not one."""
    return getattr(event, "is_user_annotation", False) or event.name.startswith("W:")


def profile_case(run, cuda: bool, top: int) -> dict:
    """One profiled run: kernel ms by kind and name, device busy, idle gaps by host range (ms)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with host_ranges(), profile(activities=activities) as prof:
        start = synced()
        run()
        wall = synced() - start
    events = prof.events()
    if cuda:
        device = [(e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0
                  and not is_range(e)]
    else:  # top-level operators (ATen's and paradec's own): what a synchronous device runs
        ops = ("aten::", "paradec::")
        device = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name.startswith(ops)
                  and (e.cpu_parent is None or not e.cpu_parent.name.startswith(ops))]
    device.sort()
    spans = sorted(((e.time_range.start, e.time_range.end, e.name[2:]) for e in events if e.name.startswith("W:")),
                   key=lambda span: (span[0], -span[1]))
    starts = [s for s, _, _ in spans]
    by_kind, by_name, idle, busy = Counter(), Counter(), Counter(), 0.0
    end = device[0][0] if device else 0.0
    for s, e, n in device:
        by_kind[kind(n)] += (e - s) / 1e3
        by_name[n[:90]] += (e - s) / 1e3
        if s - end > GAP_US:
            idle[innermost((s + end) / 2, spans, starts)] += (s - end) / 1e3
        busy += max(0.0, e - max(s, end)) / 1e3
        end = max(end, e)
    return {"profiled_wall_ms": wall * 1e3, "busy_ms": busy, "idle_ms": sum(idle.values()),
            "kinds_ms": dict(by_kind.most_common()), "top_kernels_ms": dict(by_name.most_common(top)),
            "idle_by_host_ms": dict(idle.most_common(12))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(p)
    p.add_argument("--rows", type=int, default=8, help="requests decoded in lockstep (the engine's rows)")
    p.add_argument("--repeats", type=int, default=3, help="unprofiled timings per case (median)")
    p.add_argument("--top", type=int, default=12, help="kernels listed per case")
    p.add_argument("--row-tokens", type=int, nargs=2, metavar=("PROMPT", "CANVAS"),
                   help="a KV row's prompt and canvas slots (default: the request's; `paradec serve` sizes rows "
                        "at 4096 4096, whose key buckets are coarser)")
    p.add_argument("--key-buckets-per-octave", type=int, default=1,
                   help="BatchEngine's key_buckets_per_octave (the key widths step graphs are captured for)")
    args = p.parse_args()
    if args.rows < 1 or args.repeats < 1:
        p.error("--rows and --repeats must be at least 1")
    info = banner()
    cuda = torch.cuda.is_available()
    prompt, settings, loader, name = workload(args)
    device = "cuda" if cuda else "cpu"
    model = loader(device) if callable(loader) else paradec.load(loader, device=device)
    config = resolve_config(model, **settings)
    layout = paradec.api.build_layout(model, config)
    need = (len(paradec.api.encode_prompt(model, prompt, config, layout)), layout.length)
    row_prompt, row_canvas = args.row_tokens or need
    if row_prompt < need[0] or row_canvas < need[1]:
        p.error(f"--row-tokens must hold the request: at least {need[0]} {need[1]}")
    engine = BatchEngine(model, max_batch=args.rows, max_canvas_tokens=row_canvas, max_prompt_tokens=row_prompt,
                         key_buckets_per_octave=args.key_buckets_per_octave)
    start = synced()
    graphs = engine.warm_up([config])
    warm_up_s = synced() - start
    print(f"warm-up: {graphs} step graphs in {warm_up_s:.1f} s; key buckets {engine.key_buckets}")
    cases = {
        "engine, lone": lambda: engine.generate([prompt], [config]),
        "generate(), lone": lambda: paradec.generate(model, prompt, config),
        f"engine, {args.rows} in lockstep": lambda: engine.generate([prompt] * args.rows, [config] * args.rows),
    }
    results = {}
    for label, run in cases.items():
        run()
        times = []
        for _ in range(args.repeats):
            start = synced()
            run()
            times.append((synced() - start) * 1e3)
        results[label] = {"wall_ms": statistics.median(times), **profile_case(run, cuda, args.top)}
        r = results[label]
        print(f"\n== {label}: {r['wall_ms']:.1f} ms unprofiled; profiled {r['profiled_wall_ms']:.1f} ms, device busy "
              f"{r['busy_ms']:.1f} ms, idle in gaps over {GAP_US:.0f} µs {r['idle_ms']:.1f} ms")
        for section in ("top_kernels_ms", "idle_by_host_ms"):
            print(f"   {section}:")
            for n, ms in r[section].items():
                print(f"   {ms:9.1f}  {n}")
    kinds = sorted({k for r in results.values() for k in r["kinds_ms"]},
                   key=lambda k: -max(r["kinds_ms"].get(k, 0.0) for r in results.values()))
    print(f"\n{name}, {settings}; ms (profiled)")
    print(f"{'':<22}" + "".join(f" | {label:>24}" for label in results))
    for row in kinds + ["busy", "idle", "wall (unprofiled)"]:
        key = {"busy": "busy_ms", "idle": "idle_ms", "wall (unprofiled)": "wall_ms"}.get(row)
        cells = [r[key] if key else r["kinds_ms"].get(row, 0.0) for r in results.values()]
        print(f"{row:<22}" + "".join(f" | {c:>24.1f}" for c in cells))
    emit_json({"benchmark": "engine_profile", **info, "model": name, "settings": settings, "rows": args.rows,
               "row_tokens": [row_prompt, row_canvas], "key_buckets": engine.key_buckets, "step_graphs": graphs,
               "warm_up_s": warm_up_s,
               "timeline": "cuda kernels" if cuda else "top-level aten and paradec ops", "cases": results})


if __name__ == "__main__":
    main()
