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


def load_bench_teacher(spec: str, device):
    """The teacher of a training benchmark: a spec :func:`neuro_mar.teachers.load_teacher` takes, or
    a model ``config.json`` (a model of those shapes with random weights, seeded: the same
    throughput and memory, and no weights to carry to the GPU machine)."""
    from neuro_mar.teachers import load_teacher

    if not spec.endswith(".json"):
        return load_teacher(spec)[0].to(device)
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(spec) as f:
        fields = json.load(f)
    if "model_type" not in fields:
        raise SystemExit(f"{spec}: not a model config.json (no model_type)")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**fields)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device).eval()


def stage2_parts(teacher_spec: str, device, seq_len: int, n_rows: int, neuron: str = "atmn"):
    """``(teacher, student, rows)``: Stage 2 as the refine pipeline starts it (the teacher frozen,
    the student its Discrete Mamba-2 conversion with ``neuron`` at the four sites, thresholds
    calibrated) on ``n_rows`` random token rows of ``seq_len``."""
    import copy

    from neuro_mar.convert import llama_to_mar

    torch.manual_seed(0)
    teacher = load_bench_teacher(teacher_spec, device).requires_grad_(False).eval()
    stage1 = llama_to_mar(teacher).eval()
    rows = torch.randint(0, stage1.config.vocab_size, (n_rows, seq_len), generator=torch.Generator().manual_seed(1))
    student = copy.deepcopy(stage1).requires_grad_(True)
    student.set_neurons(neuron)
    student.to(device)
    student.calibrate_thresholds([rows[:2].to(device)])
    return teacher, student, rows


def stage2_trainer(teacher, student, rows, steps: int, micro_batch: int, device, name: str, fsdp: bool = False):
    """The project's Trainer on the Stage-2 loss (SBDS logits + pre-norm features), no checkpoints."""
    from neuro_mar.refine import RefineConfig, TrainConfig, Trainer
    from neuro_mar.refine.pipeline import _Bound, make_loss_2

    cfg = TrainConfig(steps=steps, lr=1e-4, warmup=0, micro_batch=micro_batch, seed=0, ckpt_every=10**9, fsdp=fsdp)
    return Trainer(_Bound(student, teacher, make_loss_2(RefineConfig())), lambda m, b: m(b), rows, cfg, None, name,
                   progress=False, device=device, shard_units=lambda bound: list(bound.student.model.layers))
