"""Where a Stage-2 training step spends its time: torch.profiler over the project's Trainer on the
Stage-2 loss (teacher forward, spiking student forward + backward, SBDS logits and features, AdamW),
kernel time grouped by what the kernel does, against the step's wall time.

    python benchmarks/stage2_profile.py --teacher benchmarks/smollm2_135m_config.json   # GPU
    python benchmarks/stage2_profile.py --teacher DIR --seq-len 32 --global-batch 4      # CPU (op time)

Prints a table (device ms per step and share per group, then the top kernels) and a final JSON
line; writes ``stage2_profile.json`` under $OUT or benchmarks/results/. On a GPU, ``device busy``
is kernel time over wall time: well below 1 means the host, not the GPU, sets the pace. On a CPU
the groups are of CPU operator self-time instead (a smoke test of the script, not a profile).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, stage2_parts, stage2_trainer, write_results  # noqa: E402

#: (group, pattern on the lower-cased kernel or op name); the first that matches names the group
GROUPS = [
    ("SBDS logits (fused)", r"sbds"),
    ("ATMN neurons", r"atmn|_once_(fwd|bwd)|_multi_(fwd|bwd)"),
    ("SSD scan (mamba_ssm)", r"chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum|ssd"),
    ("causal conv1d", r"conv1d|causal_conv|_conv_(fwd|bwd)|convsilu|conv_depthwise|convolution"),
    ("teacher attention", r"flash|fmha|attention|sdpa"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|matmul|wgmma|aten::mm|aten::addmm|aten::bmm|aten::linear"),
    ("AdamW", r"multi_tensor|adam|foreach"),
    ("NCCL", r"nccl"),
    ("softmax / log-softmax", r"softmax"),
    ("reductions", r"reduce|aten::sum|aten::mean|aten::norm"),
    ("copies / casts / fills", r"copy|memcpy|memset|fill|(?<!no)cast|aten::to\b|aten::_to_copy|\bcat|catarray"),
    ("elementwise", r"elementwise|aten::(mul|add|sub|div|exp|where|silu|sigmoid|neg|pow|rsqrt)"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pat in GROUPS:
        if re.search(pat, low):
            return group
    return "other"


def _events(prof, on_gpu: bool):
    """(name, microseconds, calls) of every kernel (GPU) or CPU operator's self time (CPU). GPU-side
    user annotations (``Optimizer.step#AdamW.step``: the span of the step's kernels on the GPU
    timeline, gaps included) are left out: their kernels are counted as kernels."""
    spans = {e.name for e in prof.events() if getattr(e, "is_user_annotation", False)}
    out = []
    for e in prof.key_averages():
        if on_gpu and (e.device_type != torch.autograd.DeviceType.CUDA or e.key in spans):
            continue  # CPU operators: their device time is their kernels', counted once as kernels
        us = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if us > 0:
            out.append((e.key, us, e.count))
    return out


def _launchers(prof, top: int):
    """(operator, input shapes, device us, calls) of the CPU operators whose own kernels take the
    most device time: which call of the model the kernels above come from."""
    out = [(e.key, str(e.input_shapes)[:120], e.self_device_time_total, e.count)
           for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type == torch.autograd.DeviceType.CPU and e.self_device_time_total > 0]
    return sorted(out, key=lambda r: -r[2])[:top]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m",
                   help="teacher spec (name, GGUF, HF folder) or a config.json: its shapes with random weights")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps before anything is timed (kernel compilation)")
    p.add_argument("--steps", type=int, default=3, help="steps timed without the profiler, then as many profiled")
    p.add_argument("--neuron", default="atmn")
    p.add_argument("--top", type=int, default=20, help="kernels and operators listed one by one")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        p.error("--steps must be >= 1 and --warmup-steps >= 0")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    teacher, student, rows = stage2_parts(args.teacher, device, args.seq_len, max(args.global_batch * 2, 8),
                                          args.neuron)
    trainer = stage2_trainer(teacher, student, rows, args.warmup_steps + 2 * args.steps, args.global_batch, device,
                             "stage2-profile")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.run(stop_after=args.warmup_steps)
    timed = trainer.run(stop_after=args.steps)[-args.steps:]
    step_ms = sorted(r["seconds"] for r in timed)[args.steps // 2] * 1e3
    tok_s = sorted(r["tokens_per_s"] for r in timed)[args.steps // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        trainer.run(stop_after=args.steps)
        if on_gpu:
            torch.cuda.synchronize()
    events = _events(prof, on_gpu)
    per_group: dict[str, float] = {}
    for name, us, _ in events:
        per_group[group_of(name)] = per_group.get(group_of(name), 0.0) + us / 1e3 / args.steps
    total = sum(per_group.values())
    rows_out = [{"group": g, "ms/step": f"{ms:.2f}", "share": f"{ms / total:.1%}"}
                for g, ms in sorted(per_group.items(), key=lambda kv: -kv[1])]
    top = sorted(events, key=lambda e: -e[1])[:args.top]
    what = "kernel" if on_gpu else "CPU op self"
    print(f"Stage-2 step, {args.global_batch} x {args.seq_len} tokens, neuron {args.neuron}, teacher {args.teacher}: "
          f"{step_ms:.1f} ms/step, {tok_s:.0f} tokens/s (median of {args.steps} unprofiled steps); {what} time "
          f"{total:.1f} ms/step (busy {total / step_ms:.2f})" + (f"; peak {peak:.1f} GiB" if peak else ""))
    print_table(rows_out, ["group", "ms/step", "share"])
    print()
    print_table([{"kernel" if on_gpu else "op": n[:90], "group": group_of(n), "calls/step": f"{c / args.steps:g}",
                  "ms/step": f"{us / 1e3 / args.steps:.2f}"} for n, us, c in top],
                ["kernel" if on_gpu else "op", "group", "calls/step", "ms/step"])
    launchers = _launchers(prof, args.top) if on_gpu else []
    if launchers:
        print()
        print_table([{"operator": n, "input shapes": sh, "calls/step": f"{c / args.steps:g}",
                      "device ms/step": f"{us / 1e3 / args.steps:.2f}"} for n, sh, us, c in launchers],
                    ["operator", "input shapes", "calls/step", "device ms/step"])
    write_results("stage2_profile", {
        "benchmark": "stage2_profile", "env": environment(), "config": vars(args), "on_gpu": on_gpu,
        "step_ms": round(step_ms, 2), "tokens_per_s": round(tok_s), "peak_GiB": round(peak, 2) if peak else None,
        "busy_ms_per_step": round(total, 2), "busy_fraction": round(total / step_ms, 3),
        "groups_ms_per_step": {g: round(ms, 3) for g, ms in per_group.items()},
        "top": [{"name": n, "group": group_of(n), "calls_per_step": c / args.steps,
                 "ms_per_step": round(us / 1e3 / args.steps, 3)} for n, us, c in top],
        "launchers": [{"operator": n, "input_shapes": sh, "calls_per_step": c / args.steps,
                       "device_ms_per_step": round(us / 1e3 / args.steps, 3)} for n, sh, us, c in launchers]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
