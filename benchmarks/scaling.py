"""Stage-2 data-parallel scaling: the same Stage-2 training (SBDS from the dense teacher to the
spiking copy of its converted SSM, ATMN at the four sites) launched with ``torchrun --nproc-per-node N`` for each N,
at a fixed global batch, through the project's Trainer (DDP by default, ``--fsdp`` for FSDP2).

For each N it records tokens/s (global), peak memory per rank, and the per-step loss, and checks
the loss trajectory against N = 1's (same global batch, so it must agree up to reduction order).
Prints a table and a final JSON line; writes ``scaling.json`` (``scaling_fsdp.json`` with --fsdp) under
$OUT or benchmarks/results/.

    python benchmarks/scaling.py --nprocs 1 2 4            # GPUs (NCCL), default teacher
    python benchmarks/scaling.py --nprocs 1 2 --teacher DIR --seq-len 32 --global-batch 4   # CPU (gloo)

Scaling efficiency(N) = (tokens/s at N / N) / (tokens/s at 1).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, stage2_parts, stage2_trainer, write_results  # noqa: E402

RESULT = "SCALING_RESULT "


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    from neuro_mar.refine.trainer import init_distributed, shutdown_distributed, world

    init_distributed()
    rank, n = world()
    if args.global_batch % n:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {n} processes")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    teacher, student, rows = stage2_parts(args.teacher, device, args.seq_len, max(args.global_batch * 4, 8),
                                          args.neuron)
    trainer = stage2_trainer(teacher, student, rows, args.steps, args.global_batch // n, device, f"scaling-{n}",
                             fsdp=args.fsdp)
    cfg = trainer.cfg
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hist = trainer.run()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    peaks = [None] * n
    if n > 1:
        dist.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    timed = hist[args.warmup_steps:]
    if rank == 0:
        tok = sorted(r["tokens_per_s"] for r in timed)[len(timed) // 2]
        print(RESULT + json.dumps({"nprocs": n, "losses": [r["loss"] for r in hist], "tokens_per_s": tok,
                                   "peak_GiB_per_rank": peaks, "micro_batch": cfg.micro_batch,
                                   "fsdp": bool(args.fsdp)}), flush=True)
    del trainer  # its DDP wrapper must not outlive the process group (see shutdown_distributed)
    shutdown_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, n: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(_free_port()), os.path.abspath(__file__), "--worker", "--teacher", args.teacher, "--steps",
           str(args.steps), "--warmup-steps", str(args.warmup_steps), "--global-batch", str(args.global_batch),
           "--seq-len", str(args.seq_len), "--neuron", args.neuron] + (["--fsdp"] if args.fsdp else [])
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"N={n} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith(RESULT))
    res = json.loads(line[len(RESULT):])
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to run (first is the baseline)")
    p.add_argument("--teacher", default="smollm2-135m",
                   help="teacher spec (name, GGUF, HF folder) or a config.json: its shapes with random weights")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the tokens/s median")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, all ranks together")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--neuron", default="atmn")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.steps <= args.warmup_steps:
        p.error("--steps must exceed --warmup-steps")
    runs = [_launch(args, n) for n in args.nprocs]
    base = runs[0]
    rows = []
    for r in runs:
        per = r["tokens_per_s"] / r["nprocs"]
        r["efficiency"] = per / (base["tokens_per_s"] / base["nprocs"])
        scale = max(abs(b) for b in base["losses"])  # differences relative to the trajectory's size
        r["max_rel_loss_diff_vs_base"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"])) / scale
        peaks = [x for x in r["peak_GiB_per_rank"] if x is not None]
        rows.append({"N": r["nprocs"], "tokens/s": f"{r['tokens_per_s']:.0f}", "tokens/s per proc": f"{per:.0f}",
                     "efficiency": f"{r['efficiency']:.3f}", "peak GiB/rank": f"{max(peaks):.1f}" if peaks else "-",
                     "max rel loss diff": f"{r['max_rel_loss_diff_vs_base']:.2e}", "micro-batch": r["micro_batch"]})
    print(f"Stage-2 scaling, {'FSDP2' if args.fsdp else 'DDP'}, global batch {args.global_batch} x {args.seq_len} tokens, "
          f"{args.steps} steps ({args.warmup_steps} untimed), neuron {args.neuron}")
    print_table(rows, list(rows[0]))
    write_results("scaling_fsdp" if args.fsdp else "scaling", {"benchmark": "scaling", "env": environment(),
                              "config": {k: v for k, v in vars(args).items() if k != "worker"}, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
