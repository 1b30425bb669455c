"""SBDS loss benchmark (GPU): forward+backward time and peak extra memory of the fused linear
SBDS loss against, in the same run: naive materialised logits with F.kl_div both ways,
Liger-Kernel 0.8.5's LigerFusedLinearJSD (beta 0 and 0.5), the torch.compile chunked baseline,
and the compute floor (the four matmuls at the bf16 rate measured in this run).

Shapes (tokens, hidden, vocab): (8192, 576, 49152) and (8192, 2048, 128256), bf16.
Prints a table and, last, one JSON line; writes sbds.json under $OUT (or benchmarks/results/).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import bench, bf16_tflops, environment, print_table, write_results  # noqa: E402

from neuro_mar.kernels.sbds import chunked_linear_sbds, fused_linear_sbds  # noqa: E402


def naive(h_s, W_s, h_t, W_t, alpha=0.2, beta=0.7):
    s = (h_s @ W_s.t()).float()
    with torch.no_grad():
        t = (h_t @ W_t.t()).float()
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return alpha * F.kl_div(lq, lp, log_target=True, reduction="batchmean") + \
        beta * F.kl_div(lp, lq, log_target=True, reduction="batchmean")


def measure(fn, setup):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    args = setup()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = bench(lambda: fn(*args), warmup=2, rep=5, inner=3)
    return ms, peak


def main():
    tflops = bf16_tflops()
    rows, results = [], {}
    for N, H, V in [(8192, 576, 49152), (8192, 2048, 128256)]:
        floor_ms = 4 * 2 * N * H * V / (tflops * 1e12) * 1e3

        def setup():
            g = torch.Generator(device="cuda").manual_seed(0)
            mk = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
            return (mk(N, H).requires_grad_(), (mk(V, H) * 0.05).requires_grad_(), mk(N, H), mk(V, H) * 0.05)

        impls = {
            "ours fused linear SBDS (Triton)": lambda a, b, c, d: fused_linear_sbds(a, b, c, d).backward(),
            "ours, chunk 512": lambda a, b, c, d: fused_linear_sbds(a, b, c, d, chunk=512).backward(),
            "ours, chunk 2048": lambda a, b, c, d: fused_linear_sbds(a, b, c, d, chunk=2048).backward(),
            "naive materialised, F.kl_div both ways": lambda a, b, c, d: naive(a, b, c, d).backward(),
            "torch.compile chunked": lambda a, b, c, d: chunked_linear_sbds(a, b, c, d, chunk=1024),
        }
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD

            for beta in (0.0, 0.5):
                jsd = LigerFusedLinearJSD(jsd_beta=beta)
                impls[f"Liger LigerFusedLinearJSD beta={beta}"] = (
                    lambda a, b, c, d, jsd=jsd: jsd(a, b, c, d, None).backward())  # 0.8.5: shift_labels positional
        except Exception as err:  # noqa: BLE001
            print("liger unavailable:", err)
        case = f"{N}x{H}x{V}"
        results[case] = {"floor_ms": floor_ms, "impls": {}}
        for name, fn in impls.items():
            try:
                ms, peak = measure(fn, setup)
            except Exception as err:  # noqa: BLE001 - reported, not fatal (e.g. out of memory)
                print(f"[{case}] {name} failed: {type(err).__name__}: {str(err)[:200]}")
                continue
            results[case]["impls"][name] = {"ms": round(ms, 3), "peak_extra_MiB": round(peak)}
            rows.append({"case": case, "impl": name, "fwd+bwd ms": f"{ms:.2f}", "x floor": f"{ms / floor_ms:.2f}",
                         "peak extra MiB": f"{peak:.0f}"})
    print(f"bf16 matmul rate {tflops:.0f} TFLOP/s; floor = the four matmuls at that rate")
    print_table(rows, ["case", "impl", "fwd+bwd ms", "x floor", "peak extra MiB"])
    main_case = results["8192x576x49152"]["impls"]
    ours = main_case.get("ours fused linear SBDS (Triton)", {}).get("ms")
    goals = {}
    if ours:
        goals = {"x_floor": round(ours / results["8192x576x49152"]["floor_ms"], 2),
                 "vs_naive": round(main_case.get("naive materialised, F.kl_div both ways", {}).get("ms", float("nan")) / ours, 2),
                 "vs_liger_beta0.5": round(main_case.get("Liger LigerFusedLinearJSD beta=0.5", {}).get("ms", float("nan")) / ours, 2),
                 "peak_MiB": main_case["ours fused linear SBDS (Triton)"]["peak_extra_MiB"],
                 "targets": {"x_floor_max": 2.5, "vs_naive_min": 4, "vs_liger_min": 5, "peak_MiB_max": 300}}
    write_results("sbds", {"benchmark": "sbds", "env": environment(), "bf16_tflops": round(tflops, 1),
                           "cases": results, "goals": goals})


if __name__ == "__main__":
    main()
