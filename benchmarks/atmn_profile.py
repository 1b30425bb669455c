"""Where the host time of one eager ATMN fwd+bwd goes (GPU): torch.profiler over a loop of
input-once (or multi-step) calls, printing the ops by self CPU time and the host vs device time
per call. The input-once kernel runs in 0.34 ms of device time at N = 2^25 but 0.73 ms per call
in eager timing (benchmarks/results/atmn.json): this shows what the host spends it on.

    python benchmarks/atmn_profile.py [--form once|multi] [--T 4] [--rows 32768] [--cols 1024]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from neuro_mar.kernels import atmn_ops
from neuro_mar.neurons import resolve_surrogate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--form", choices=["once", "multi"], default="once")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--rows", type=int, default=1 << 15)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    sg = resolve_surrogate("sigmoid")
    shape = (args.T, args.rows, args.cols) if args.form == "multi" else (args.rows, args.cols)
    x = (torch.randn(*shape, device="cuda") * 1.5).requires_grad_()
    a = torch.zeros(args.cols, device="cuda", requires_grad=True)
    g = torch.randn(*shape, device="cuda")

    def call():
        y = (atmn_ops.atmn_multistep(x, a, 0.5, sg)[0] if args.form == "multi"
             else atmn_ops.atmn_once(x, a, args.T, 0.5, sg)[0])
        torch.autograd.grad(y, (x, a), g)

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    host = (time.perf_counter() - t0) / args.calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.calls
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    dev = sum(e.self_device_time_total for e in prof.key_averages()) / 10 / 1e3
    print(f"{args.form} T={args.T} [{args.rows} x {args.cols}]: host {host * 1e3:.3f} ms/call to enqueue, "
          f"wall {wall * 1e3:.3f} ms/call, device {dev:.3f} ms/call (profiled)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
