"""Host (CPU) cost of one eager ATMN call, piece by piece (GPU).

At N = 2^25 the input-once kernels take ~0.3 ms of device time per fwd+bwd, and an eager call is
only that fast if the host enqueues it in less. This measures, on a small input (so the device
never holds the host back), the microseconds of CPU time per call of: the whole fwd+bwd of each
form with cached launches (kernels/launch.py) and with Triton's own launch path; the launchers;
a raw ``kernel[grid](...)`` launch against a cached one and against the bare compiled-kernel call;
the PyTorch pieces around them (empty, exp, sum, an autograd.Function that does nothing); and the
same fwd+bwd of SpikingJelly's LIFNode and of torch.compile'd PyTorch ATMN. Then cProfile's top
functions of one cached-launch fwd+bwd loop.

Prints a table and, last, a JSON line; writes atmn_host.json under $OUT (or benchmarks/results/).
Run: python benchmarks/atmn_host.py [--calls 2000]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, host_time, print_table, write_results  # noqa: E402

from neuro_mar.kernels import atmn_ops, atmn_ref, launch  # noqa: E402
from neuro_mar.neurons import resolve_surrogate  # noqa: E402

T, TAU, ROWS, COLS = 4, 0.5, 64, 1024


class _Nothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(g), None


def cases():
    from neuro_mar.kernels import atmn

    sg = resolve_surrogate("sigmoid")
    x = (torch.randn(ROWS, COLS, device="cuda") * 1.5).requires_grad_()
    xs = (torch.randn(T, ROWS, COLS, device="cuda") * 1.5).requires_grad_()
    a = torch.zeros(COLS, device="cuda", requires_grad=True)
    g, gs = torch.randn_like(x), torch.randn_like(xs)
    V = a.detach().exp()
    xd = x.detach()

    def once():
        torch.autograd.grad(atmn_ops.atmn_once(x, a, T, TAU, sg)[0], (x, a), g)

    def multi():
        torch.autograd.grad(atmn_ops.atmn_multistep(xs, a, TAU, sg)[0], (xs, a), gs)

    def once_fwd_nograd():
        with torch.no_grad():
            atmn_ops.atmn_once(x, a, T, TAU, sg)

    x_hat, empty8 = torch.empty_like(xd), torch.empty(0, device="cuda", dtype=torch.int8)
    empty32 = torch.empty(0, device="cuda", dtype=torch.int32)
    BR, BC, grid, warps = atmn._geometry("once_fwd", ROWS, COLS)
    args = (xd, V, x_hat, empty8, empty32, ROWS, COLS, xd.numel(), TAU, 1 / TAU, T, True, False, False, BR, BC)
    compiled = atmn._once_fwd_kernel[grid](*args, num_warps=warps)
    stream = torch.cuda.current_stream().cuda_stream

    def raw():
        atmn._once_fwd_kernel[grid](*args, num_warps=warps)

    def cached():
        atmn._launch_once_fwd(grid, *args, num_warps=warps)

    def bare():
        compiled.run(grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)

    lif_ = None
    try:
        from spikingjelly.activation_based import neuron as sjn

        lif_ = sjn.LIFNode(v_reset=None, step_mode="m").cuda()
    except ImportError as err:
        print(f"SpikingJelly LIFNode skipped: {err}")

    def lif():
        lif_.reset()
        torch.autograd.grad(lif_(xs), (xs,), gs)

    once_compiled = torch.compile(lambda x, a: atmn_ref.atmn_once_ref(x, a, T, TAU, sg)[0])

    def compiled_once():
        torch.autograd.grad(once_compiled(x, a), (x, a), g)

    rows16 = torch.randn(16, COLS, device="cuda")

    def nothing():
        torch.autograd.grad(_Nothing.apply(x, a), (x,), g)

    out = [
        ("input-once fwd+bwd", "1", once), ("input-once fwd+bwd", "0", once),
        ("multi-step fwd+bwd", "1", multi), ("multi-step fwd+bwd", "0", multi),
        ("input-once fwd (no grad)", "1", once_fwd_nograd), ("input-once fwd (no grad)", "0", once_fwd_nograd),
        ("once_fwd launch: kernel[grid](...)", "-", raw), ("once_fwd launch: CachedLaunch", "1", cached),
        ("once_fwd launch: compiled.run (floor)", "-", bare),
        ("torch.empty_like", "-", lambda: torch.empty_like(xd)), ("a.float().exp()", "-", lambda: a.float().exp()),
        ("sum(0) of [16, 1024]", "-", lambda: rows16.sum(0)),
        ("autograd.Function doing nothing, fwd+bwd", "-", nothing),
        ("torch.compile PyTorch input-once fwd+bwd", "-", compiled_once),
    ]
    if lif_ is not None:
        out.append(("SpikingJelly LIFNode fwd+bwd", "-", lif))
    return out, once


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("atmn_host: needs a CUDA device")
    rows, res = [], {}
    items, once = cases()
    for name, mode, fn in items:
        launch.fast_launch.set(mode if mode != "-" else "1")
        us = host_time(fn, args.calls, warmup=20) * 1e3
        label = name + {"1": " [cached launch]", "0": " [Triton launch]", "-": ""}[mode]
        res[label] = round(us, 2)
        rows.append({"what": label, "host us/call": f"{us:.1f}"})
    launch.fast_launch.set("1")
    print(f"T={T}, x [{ROWS} x {COLS}] fp32 (small: the host bounds every call)")
    print_table(rows, ["what", "host us/call"])
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        once()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    print(buf.getvalue())
    write_results("atmn_host", {"benchmark": "atmn_host", "env": environment(), "T": T, "shape": [ROWS, COLS],
                                "host_us_per_call": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
