"""Tile-size sweep of the raw ATMN kernels (no autograd, no host overhead: CUDA-graph replays),
T = 4, x [32768 x 1024] fp32. Prints TB/s of DRAM traffic per configuration and kernel, then, last,
a JSON line with each kernel's best configuration: what goes into kernels/atmn.py TILES.

Run: python benchmarks/atmn_tune.py  (writes atmn_tune.json under $OUT or benchmarks/results/)"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_graph, environment, print_table, write_results  # noqa: E402

from neuro_mar.kernels import atmn  # noqa: E402

R, C, T = 1 << 15, 1024, 4
x = torch.randn(R, C, device="cuda") * 1.5
xs = torch.randn(T, R, C, device="cuda") * 1.5
g = torch.randn(R, C, device="cuda")
gs = torch.randn(T, R, C, device="cuda")
V = torch.ones(C, device="cuda")
CALLS = {  # kernel -> (call, DRAM bytes it must move)
    "once_fwd": (lambda: atmn.once_fwd(x, V, T, 0.5), 8 * R * C),  # x read, x_hat written
    "once_bwd": (lambda: atmn.once_bwd(g, x, V, T, 0.5, 0, 4.0), 12 * R * C),  # x and grad read, dx written
    # x read and spikes written per step, v_last written once
    "multi_fwd": (lambda: atmn.multi_fwd(xs, V, 0.5), (8 * T + 4) * R * C),
    # x and the spike gradient read, dx written per step (T <= RECOMPUTE_MAX_T: x read once, recomputed)
    "multi_bwd": (lambda: atmn.multi_bwd(gs, None, None, xs, None, V, 0.5, 0, 4.0), 12 * T * R * C),
}
default = {k: dict(v) for k, v in atmn.TILES.items()}
rows, best = [], {}
for elems, cols, warps in itertools.product([1024, 2048, 4096, 8192], [128, 256, 1024], [4, 8]):
    if cols > elems:
        continue
    row = {"elems": elems, "cols": cols, "warps": warps}
    for name, (call, nbytes) in CALLS.items():
        atmn.TILES[name] = {"elems": elems, "max_cols": cols, "num_warps": warps}
        ms = bench_graph(call)
        row[name] = f"{ms:.3f}ms {nbytes / ms / 1e9:.2f}TB/s" if ms else "-"
        if ms and (name not in best or ms < best[name]["ms"]):
            best[name] = {"ms": round(ms, 4), "TBps": round(nbytes / ms / 1e9, 3), **atmn.TILES[name]}
    rows.append(row)
atmn.TILES.update(default)
print_table(rows, ["elems", "cols", "warps", *CALLS])
write_results("atmn_tune", {"benchmark": "atmn_tune", "env": environment(), "T": T, "shape": [R, C], "best": best,
                            "current": default})
