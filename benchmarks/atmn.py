"""ATMN kernel benchmark (GPU): forward, backward and both, against the anchors in the same run.

Compares, per case (T micro-steps, N neurons, dtype):
  ours, multi-step Triton kernel      x_seq [T, N] charging every step (SpikingJelly's form)
  ours, input-once Triton kernel      x [N] fired out over T steps, decoded x_hat (MAR's form)
  PyTorch reference (eager) of both, torch.compile of both,
  SpikingJelly 2.0 TernaryLIFNode (multi-step, soft reset) and LIFNode (its fused binary kernel),
  and the byte floor: 5 passes over T*N elements at the copy bandwidth measured in this run
  (shared/docs/performance-anchors.md).
Also the activation memory each holds for its backward, in bytes per element of its input.

Prints a table and, last, one JSON line; writes atmn.json under $OUT (or benchmarks/results/).
Run: python benchmarks/atmn.py  (PYTHONPATH with neuro_mar installed and spikingjelly).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench, bench_graph, host_time, copy_bandwidth_TBps, environment, print_table, write_results  # noqa: E402

from neuro_mar.kernels import atmn_ops, atmn_ref  # noqa: E402
from neuro_mar.neurons import resolve_surrogate  # noqa: E402

C = 1024
TAU = 0.5


def _impls(T):
    sg = resolve_surrogate("sigmoid")
    from spikingjelly.activation_based import neuron as sjn

    tern = sjn.TernaryLIFNode(v_reset=None, step_mode="m").cuda()
    lif = sjn.LIFNode(v_reset=None, step_mode="m").cuda()

    def sj(node):
        def run(x_seq, a):
            node.reset()
            return node(x_seq)
        return run

    multi_ref = lambda x_seq, a: atmn_ref.atmn_multistep_ref(x_seq, a, TAU, sg)[0]  # noqa: E731
    once_ref = lambda x, a: atmn_ref.atmn_once_ref(x, a, T, TAU, sg)[0]  # noqa: E731
    # the torch.compile entries come last: their CUDA-graph capture is tried after every other entry
    return [
        ("ours multi-step (Triton)", "multi", lambda x_seq, a: atmn_ops.atmn_multistep(x_seq, a, TAU, sg)[0]),
        ("ours input-once (Triton)", "once", lambda x, a: atmn_ops.atmn_once(x, a, T, TAU, sg)[0]),
        ("PyTorch ATMN multi-step (eager)", "multi", multi_ref),
        ("PyTorch ATMN input-once (eager)", "once", once_ref),
        ("SpikingJelly TernaryLIFNode", "multi", sj(tern)),
        ("SpikingJelly LIFNode (fused binary)", "multi", sj(lif)),
        ("torch.compile PyTorch ATMN multi-step", "multi", torch.compile(multi_ref)),
        ("torch.compile PyTorch ATMN input-once", "once", torch.compile(once_ref)),
    ]


def run_case(T, N, dtype, bw, rows):
    R = N // C
    x_seq0 = (torch.randn(T, R, C, device="cuda") * 1.5).to(dtype)
    x0 = (torch.randn(R, C, device="cuda") * 1.5).to(dtype)
    a = torch.zeros(C, device="cuda", requires_grad=True)
    el = 4 if dtype == torch.float32 else 2
    floor_ms = 5 * T * N * el / (bw * 1e12) * 1e3
    case = f"T={T} N=2^{N.bit_length() - 1} {str(dtype).replace('torch.', '')}"
    results = {}
    for name, form, fn in _impls(T):
        xin0 = x_seq0 if form == "multi" else x0
        xin = xin0.clone().requires_grad_()
        gy = torch.randn_like(xin0)
        try:
            def fwd():
                with torch.no_grad():
                    fn(xin0, a)

            def fwdbwd():  # autograd.grad: no accumulation into .grad (which would add a pass)
                y = fn(xin, a)
                torch.autograd.grad(y, (xin, a), gy, allow_unused=True)

            fwd_ms = bench(fwd)
            fb_ms = bench(fwdbwd)
            host_ms = host_time(fwdbwd)
            fb_graph = bench_graph(fwdbwd)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            y = fn(xin, a)
            held = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
            del y
            saved_B = held / xin0.numel()
        except Exception as err:  # noqa: BLE001 - a failing baseline is reported, not fatal
            print(f"[{case}] {name} failed: {type(err).__name__}: {str(err)[:300]}")
            continue
        results[name] = {"fwd_ms": round(fwd_ms, 4), "fwd_bwd_ms": round(fb_ms, 4),
                         "fwd_bwd_graph_ms": None if fb_graph is None else round(fb_graph, 4),
                         "bwd_ms": round(fb_ms - fwd_ms, 4), "host_ms": round(host_ms, 4),
                         "saved_bytes_per_elem": round(saved_B, 3)}
        rows.append({"case": case, "impl": name, "fwd ms": f"{fwd_ms:.3f}", "bwd ms": f"{fb_ms - fwd_ms:.3f}",
                     "fwd+bwd ms": f"{fb_ms:.3f}", "x floor": f"{fb_ms / floor_ms:.2f}",
                     "graph fwd+bwd ms": "-" if fb_graph is None else f"{fb_graph:.3f}",
                     "graph x floor": "-" if fb_graph is None else f"{fb_graph / floor_ms:.2f}",
                     "host ms": f"{host_ms:.3f}",
                     "saved B/elem": f"{saved_B:.2f}"})
        del xin, gy
        torch.cuda.empty_cache()
    return case, {"floor_ms": round(floor_ms, 4), "impls": results}


def main():
    torch.manual_seed(0)
    bw = copy_bandwidth_TBps()
    rows, cases = [], {}
    for T, N, dtype in [(4, 1 << 25, torch.float32), (8, 1 << 25, torch.float32), (4, 1 << 25, torch.bfloat16),
                        (4, 1 << 16, torch.float32)]:
        name, res = run_case(T, N, dtype, bw, rows)
        cases[name] = res
    print(f"copy bandwidth {bw:.2f} TB/s; floor = 5 passes over T*N elements")
    print("eager: host enqueues ahead (training-loop timing); graph: one CUDA graph replay of fwd+bwd "
          "(device time only; a capture that fails prints why and shows '-'); host: CPU time to enqueue one fwd+bwd")
    print_table(rows, ["case", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "x floor", "graph fwd+bwd ms",
                       "graph x floor", "host ms", "saved B/elem"])
    main_case = cases["T=4 N=2^25 float32"]
    im = main_case["impls"]
    ours = im["ours multi-step (Triton)"]["fwd_bwd_ms"]
    once = im["ours input-once (Triton)"]["fwd_bwd_ms"]

    def ratio(name, mine):
        return round(im[name]["fwd_bwd_ms"] / mine, 2) if name in im else None

    def gratio(name, mine_name):
        a, b = im.get(name, {}).get("fwd_bwd_graph_ms"), im[mine_name].get("fwd_bwd_graph_ms")
        return round(a / b, 2) if a and b else None

    goals = {
        "multi_step_x_floor": round(ours / main_case["floor_ms"], 3),
        "input_once_x_floor": round(once / main_case["floor_ms"], 3),
        "speedup_vs_sj_lif_multi": ratio("SpikingJelly LIFNode (fused binary)", ours),
        "speedup_vs_sj_ternary_lif_multi": ratio("SpikingJelly TernaryLIFNode", ours),
        "speedup_vs_sj_lif_once": ratio("SpikingJelly LIFNode (fused binary)", once),
        "speedup_vs_sj_ternary_lif_once": ratio("SpikingJelly TernaryLIFNode", once),
        "speedup_vs_torch_compile_multi": ratio("torch.compile PyTorch ATMN multi-step", ours),
        "speedup_vs_torch_compile_once": ratio("torch.compile PyTorch ATMN input-once", once),
        "graph_multi_step_x_floor": (round(im["ours multi-step (Triton)"]["fwd_bwd_graph_ms"] / main_case["floor_ms"], 3)
                                     if im["ours multi-step (Triton)"]["fwd_bwd_graph_ms"] else None),
        "graph_input_once_x_floor": (round(im["ours input-once (Triton)"]["fwd_bwd_graph_ms"] / main_case["floor_ms"], 3)
                                     if im["ours input-once (Triton)"]["fwd_bwd_graph_ms"] else None),
        "graph_speedup_vs_sj_lif_multi": gratio("SpikingJelly LIFNode (fused binary)", "ours multi-step (Triton)"),
        "graph_speedup_vs_sj_lif_once": gratio("SpikingJelly LIFNode (fused binary)", "ours input-once (Triton)"),
        "graph_speedup_vs_sj_ternary_multi": gratio("SpikingJelly TernaryLIFNode", "ours multi-step (Triton)"),
        "graph_speedup_vs_sj_ternary_once": gratio("SpikingJelly TernaryLIFNode", "ours input-once (Triton)"),
        "graph_speedup_vs_torch_compile_multi": gratio("torch.compile PyTorch ATMN multi-step", "ours multi-step (Triton)"),
        "graph_speedup_vs_torch_compile_once": gratio("torch.compile PyTorch ATMN input-once", "ours input-once (Triton)"),
        "saved_bytes_per_elem_multi": im["ours multi-step (Triton)"]["saved_bytes_per_elem"],
        "saved_bytes_per_elem_once": im["ours input-once (Triton)"]["saved_bytes_per_elem"],
        "targets": {"x_floor_max": 1.3, "vs_sj_lif_min": 2, "vs_sj_ternary_min": 10, "vs_compile_min": 3,
                    "saved_bytes_max": 1},
    }
    write_results("atmn", {"benchmark": "atmn", "env": environment(), "copy_TBps": round(bw, 3),
                           "cases": cases, "goals": goals})


if __name__ == "__main__":
    main()
