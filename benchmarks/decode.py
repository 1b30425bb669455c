"""Prefill and batch-1 decoding: the spiking student against its teacher.

For each context length: the prefill (one forward over the prompt, the last position's logits,
as ``generate`` runs it) and greedy decoding of ``--new-tokens`` tokens from its cache (the
forward calls ``generate`` makes, timed apart from the prefill), teacher and student interleaved
``--repeats`` times (medians). The student is the teacher converted
(``llama_to_mar``) with ``--neuron`` at the four sites and calibrated thresholds: its speed does
not depend on trained weights. On CUDA the teacher is also timed with a static KV cache (which
``generate`` compiles), and with ``pynvml`` the board energy per decoded token is read from NVML's
energy counter. Runs on a CPU too (the 2-core machine's numbers are in docs).

    python3 -P benchmarks/decode.py --contexts 512 4096 --new-tokens 64

Prints a table and, last, one JSON line (also written to ``$OUT/decode_<device>.json``).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, load_bench_teacher, print_table, write_results  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _energy_mj(device):
    """NVML's board energy counter in mJ, or None without pynvml or off CUDA."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(device.index or 0))
    except Exception:  # noqa: BLE001 - no NVML: no energy column
        return None


def time_model(model, ids, new_tokens: int, device, extra: dict) -> dict:
    """Seconds of the prefill (the prompt, last position's logits, the cache kept) and of
    ``new_tokens`` greedy decoding steps from that cache, each timed on its own; with ``extra``
    (``generate`` options, e.g. a static cache) the decoding is ``generate``'s instead, timed as
    the difference of ``new_tokens + 1`` and 1 new tokens (both with their prefill)."""
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill = time.perf_counter() - t0
        e0 = _energy_mj(device)
        if extra:
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **extra)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kw)
            _sync(device)
            one = time.perf_counter() - t0
            e0 = _energy_mj(device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kw)
            _sync(device)
            decode = max(time.perf_counter() - t0 - one, 1e-9)
        else:
            cache = out.past_key_values
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                nxt = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            _sync(device)
            decode = time.perf_counter() - t0
        e1 = _energy_mj(device)
    row = {"prefill_s": prefill, "decode_s": decode}
    if e0 is not None and e1 is not None and not extra:
        row["J_per_token"] = (e1 - e0) / 1000 / new_tokens
    return row


def main(argv=None) -> dict:
    from neuro_mar.convert import llama_to_mar

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m",
                    help="a teacher spec, or a model config.json (random weights of those shapes)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--neuron", default="atmn")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: bfloat16 on CUDA, float32 on a CPU")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    teacher = load_bench_teacher(args.teacher, torch.device("cpu")).eval()
    student = llama_to_mar(copy.deepcopy(teacher)).eval()
    student.set_neurons(args.neuron)
    student.calibrate_thresholds([torch.randint(100, teacher.config.vocab_size, (1, 256))])
    teacher, student = teacher.to(device, dtype), student.to(device, dtype)
    models = {"teacher": (teacher, {})}
    if device.type == "cuda":
        models["teacher-static"] = (teacher, {"cache_implementation": "static"})
    models["student"] = (student, {})
    rows = []
    for ctx in args.contexts:
        ids = torch.randint(100, teacher.config.vocab_size, (1, ctx), device=device)
        for name, (m, extra) in models.items():  # warm-up (and compilation) outside the timing
            time_model(m, ids[:, :64], 2, device, extra)
        runs = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, (m, extra) in models.items():
                runs[name].append(time_model(m, ids, args.new_tokens, device, extra))
        for name, rs in runs.items():
            row = {"model": name, "context": ctx}
            for key in rs[0]:
                row[key] = statistics.median(r[key] for r in rs)
            row["prefill_tok_s"] = round(ctx / row["prefill_s"], 1)
            row["decode_tok_s"] = round(args.new_tokens / row["decode_s"], 2)
            rows.append(row)
            print(f"[decode] ctx {ctx} {name}: prefill {row['prefill_s']:.3f} s, decode {row['decode_tok_s']} tok/s",
                  flush=True)
    for r in rows:
        anchor = next(a for a in rows if a["model"] == "teacher" and a["context"] == r["context"])
        r["decode_vs_teacher"] = round(r["decode_tok_s"] / anchor["decode_tok_s"], 2)
        r["prefill_vs_teacher"] = round(anchor["prefill_s"] / r["prefill_s"], 2)
        r["prefill_s"], r["decode_s"] = round(r["prefill_s"], 3), round(r["decode_s"], 3)
    cols = ["model", "context", "prefill_s", "prefill_tok_s", "prefill_vs_teacher", "decode_tok_s", "decode_vs_teacher"]
    if any("J_per_token" in r for r in rows):
        cols.append("J_per_token")
    print_table(rows, cols)
    payload = {"benchmark": "decode", "device": device.type, "dtype": str(dtype).replace("torch.", ""),
               "threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "neuron": args.neuron,
               "anchor": "teacher (HF generate, dynamic KV cache)", "rows": rows, "env": environment()}
    write_results(f"decode_{device.type}", payload)
    return payload


if __name__ == "__main__":
    main()
