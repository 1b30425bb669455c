"""Timing helpers shared by the GPU benchmarks: CUDA-event medians, copy bandwidth, bf16 rate."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import statistics
import time

import torch


def bench(fn, warmup: int = 3, rep: int = 5, inner: int = 10) -> float:
    """Milliseconds per fn() call: the median over ``rep`` windows of ``inner`` back-to-back calls
    between two CUDA events (so the host enqueues ahead, as in a training loop; a call whose host
    side is slower than its kernels is timed at its host speed)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / inner)
    return statistics.median(times)


def host_time(fn, calls: int = 10, warmup: int = 1) -> float:
    """Milliseconds of CPU time to enqueue one fn() call (the device may still be busy after):
    when it exceeds the device time, the host bounds eager training."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    ms = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return ms


def bench_graph(fn, warmup: int = 3) -> float | None:
    """Milliseconds per fn() replayed from a captured CUDA graph (device time without host
    overhead), or None when fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)
    except Exception as err:  # noqa: BLE001 - not capturable: reported as missing
        print(f"graph capture failed: {type(err).__name__}: {str(err)[:200]}")
        torch.cuda.synchronize()
        return None


def copy_bandwidth_TBps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus written (the memory roofline)."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e12


def bf16_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def environment() -> dict:
    """Versions and the device (``gpu`` is None on a CPU-only run, e.g. the gloo scaling check)."""
    triton = importlib.import_module("triton") if importlib.util.find_spec("triton") else None
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "triton": triton.__version__ if triton else None, "python": platform.python_version()}


def write_results(name: str, payload: dict) -> None:
    """Write JSON under $OUT (device runs) or benchmarks/results/, and print the final JSON line."""
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    print(json.dumps(payload))


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
