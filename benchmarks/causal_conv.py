"""The mixer's causal depthwise conv + SiLU, forward + backward, at SmolLM2-135M's Stage-2 shape:
xBC [16, 1024, 1728] bf16 as a column slice of in_proj's [16, 1024, 2320] output, K = 4.

Compares the Triton kernels (``kernels/causal_conv.py``; every backward tile of a small sweep,
each checked against the first) with the PyTorch reference path the mixer took before
(``causal_conv_ref``: transpose, cat, depthwise conv1d, SiLU, under bf16 autocast as in training).
Floor: the kernels' DRAM bytes (x and y forward; x, dy read and dx written backward: 10 B per
element) at the copy bandwidth measured in the same run. Prints a table and a final JSON line;
writes ``causal_conv.json`` under $OUT or benchmarks/results/.

    python benchmarks/causal_conv.py
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, bench_graph, copy_bandwidth_TBps, environment, print_table, write_results  # noqa: E402

from neuro_mar.kernels import causal_conv  # noqa: E402
from neuro_mar.kernels.causal_conv_ops import causal_conv1d_silu  # noqa: E402
from neuro_mar.kernels.causal_conv_ref import causal_conv1d_silu_ref  # noqa: E402

B, L, C, K, WIDE = 16, 1024, 1728, 4, 2320


def r4(v):
    return round(v, 4) if v else None


proj = torch.randn(B, L, WIDE, device="cuda", dtype=torch.bfloat16)
x = proj[..., :C].detach().requires_grad_()
w = (torch.randn(C, 1, K, device="cuda") / 2).requires_grad_()
bias = (torch.randn(C, device="cuda") * 0.1).requires_grad_()
gy = torch.randn(B, L, C, device="cuda", dtype=torch.bfloat16)


def step(fn):
    def run():
        for t in (x, w, bias):
            t.grad = None
        fn().backward(gy)
        return x.grad, w.grad, bias.grad
    return run


def ours():
    return causal_conv1d_silu(x, w, bias)


def reference():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return causal_conv1d_silu_ref(x, w, bias)[0]


bw = copy_bandwidth_TBps()
floor_ms = 10 * B * L * C / (bw * 1e12) * 1e3
ref_grads = [g.float().clone() for g in step(reference)()]
rows, first = [], None
default = dict(causal_conv.TILES["bwd"]), causal_conv.MAX_LOOP
for rws, warps, loop in itertools.product([4, 8, 16], [2, 4, 8], [1, 8]):
    causal_conv.TILES["bwd"] = {"rows": rws, "cols": 128, "num_warps": warps}
    causal_conv.MAX_LOOP = loop
    grads = [g.float().clone() for g in step(ours)()]
    first = first or grads
    diff = max((a - b).abs().max().item() / (b.abs().max().item() or 1) for a, b in zip(grads, first))
    ms = bench_graph(step(ours))
    rows.append({"bwd rows": rws, "warps": warps, "max loop": loop, "fwd+bwd ms (graph)": r4(ms),
                 "x floor": round(ms / floor_ms, 2) if ms else None, "rel diff vs first": f"{diff:.1e}"})
causal_conv.TILES["bwd"], causal_conv.MAX_LOOP = default
ref_diff = max((a - b).abs().max().item() / (b.abs().max().item() or 1) for a, b in zip(first, ref_grads))
ref_ms, ref_graph = bench(step(reference)), bench_graph(step(reference))
cur_ms, cur_graph = bench(step(ours)), bench_graph(step(ours))
print(f"causal conv + SiLU fwd+bwd, x [{B}, {L}, {C}] bf16 (row stride {WIDE}), K = {K}; floor {floor_ms:.3f} ms "
      f"({bw:.2f} TB/s); gradients vs the bf16 reference: max rel diff {ref_diff:.1e}")
print_table(rows, list(rows[0]))
valid = [r for r in rows if r["fwd+bwd ms (graph)"]]
best = min(valid, key=lambda r: r["fwd+bwd ms (graph)"])


summary = [{"impl": "ours (current TILES)", "eager ms": r4(cur_ms), "graph ms": r4(cur_graph)},
           {"impl": "PyTorch reference (autocast bf16)", "eager ms": r4(ref_ms), "graph ms": r4(ref_graph)}]
print()
print_table(summary, ["impl", "eager ms", "graph ms"])
write_results("causal_conv", {"benchmark": "causal_conv", "env": environment(), "shape": [B, L, C], "row_stride": WIDE,
                              "K": K, "copy_TBps": round(bw, 3), "floor_ms": round(floor_ms, 4), "sweep": rows,
                              "best": best, "current": {"bwd": default[0], "max_loop": default[1]},
                              "ours_ms": {"eager": r4(cur_ms), "graph": r4(cur_graph)},
                              "reference_ms": {"eager": r4(ref_ms), "graph": r4(ref_graph)},
                              "speedup_vs_reference": round(ref_ms / cur_ms, 2),
                              "speedup_vs_reference_graph": round(ref_graph / cur_graph, 2) if ref_graph and cur_graph else None,
                              "grad_rel_diff_vs_reference": ref_diff})
