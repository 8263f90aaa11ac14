"""Shared timing helpers for benchmark scripts: device/version banner, medians, CUDA graphs."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch


def banner() -> dict:
    """Print and return the device and library versions."""
    import transformers

    info = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    return info


def synced() -> float:
    """The host clock after the device has caught up (a plain host clock on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def median_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on GPU (launch gaps included), a host
    clock on CPU. Warm-up calls are not timed."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def capture_graph(fn: Callable[[], torch.Tensor], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture ``fn`` (static inputs) in a CUDA graph; returns the graph and its output tensor."""
    for _ in range(warmup):  # on the current stream: a side stream's warm-up memory outlives the graph
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def copy_bandwidth_gbs(n_bytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, repeats=20)
    return 2 * n_bytes / ms / 1e6


def emit_json(record: dict) -> None:
    """The one JSON line a benchmark ends with."""
    print(json.dumps(record, sort_keys=True))
