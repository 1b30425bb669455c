"""Tile-size sweep of the raw ATMN kernels (no autograd, no host overhead: CUDA-graph replays).
Prints GB/s per configuration; the best goes into kernels/atmn.py TILE."""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_graph, print_table  # noqa: E402

from neuro_mar.kernels import atmn  # noqa: E402

R, C, T = 1 << 15, 1024, 4
x = torch.randn(R, C, device="cuda") * 1.5
xs = torch.randn(T, R, C, device="cuda") * 1.5
g = torch.randn(R, C, device="cuda")
gs = torch.randn(T, R, C, device="cuda")
V = torch.ones(C, device="cuda")
rows = []
for elems, cols, warps in itertools.product([1024, 2048, 4096, 8192], [128, 256, 1024], [4, 8]):
    if cols > elems:
        continue
    atmn.TILE.update(elems=elems, max_cols=cols, num_warps=warps)
    _, h, _ = atmn.multi_fwd(xs, V, 0.5)  # h is empty at T <= RECOMPUTE_MAX_T: the backward recomputes from x
    res = {
        "once_fwd": (bench_graph(lambda: atmn.once_fwd(x, V, T, 0.5)), 8 * R * C),
        "once_bwd": (bench_graph(lambda: atmn.once_bwd(g, x, V, T, 0.5, 0, 4.0)), 12 * R * C),
        # DRAM bytes: x read and spikes written per step, v_last written once
        "multi_fwd": (bench_graph(lambda: atmn.multi_fwd(xs, V, 0.5)), (8 * T + 4) * R * C),
        # x and the spike gradient read, dx written per step (the repeated x loads of the recompute hit L2)
        "multi_bwd": (bench_graph(lambda: atmn.multi_bwd(gs, None, h, xs, None, V, 0.5, 0, 4.0)), 12 * T * R * C),
    }
    row = {"elems": elems, "cols": cols, "warps": warps}
    for k, (ms, nbytes) in res.items():
        row[k] = f"{ms:.3f}ms {nbytes / ms / 1e9:.2f}TB/s" if ms else "-"
    rows.append(row)
print_table(rows, ["elems", "cols", "warps", "once_fwd", "once_bwd", "multi_fwd", "multi_bwd"])
