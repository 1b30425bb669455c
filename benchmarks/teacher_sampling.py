"""Teacher sampling speed: ``teacher_generated_texts`` (the refine pipeline's teacher corpus) under
several batch / KV-cache / precision settings, each from a cold cache, compilation included (what a
run pays). The first setting is the anchor of the ratios.

    python3 -P benchmarks/teacher_sampling.py --data DIR/wikitext-2-raw/train.txt --tokens 262144 \\
        --setting "dynamic-bf16-1024:batch=1024,cache=dynamic,bf16=True" \\
        --setting "preallocated-bf16-1024:batch=1024,cache=preallocated,bf16=True"

Prints a table and, last, one JSON line (also written to ``$OUT/teacher_sampling.json``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, print_table, write_results  # noqa: E402

DEFAULT_SETTINGS = [
    "dynamic-bf16-1024:batch=1024,cache=dynamic,bf16=True",
    "preallocated-bf16-1024:batch=1024,cache=preallocated,bf16=True",
    "preallocated-bf16-4096:batch=4096,cache=preallocated,bf16=True",
]


def parse_setting(spec: str) -> tuple[str, dict]:
    label, _, rest = spec.partition(":")
    over = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if k not in ("batch", "cache", "bf16", "max_new"):
            raise SystemExit(f"error: --setting {spec!r}: unknown key {k!r}; keys are batch, cache, bf16, max_new")
        over[k] = int(v) if k in ("batch", "max_new") else (v == "True" if k == "bf16" else v)
    return label, over


def main(argv=None) -> dict:
    from neuro_mar.refine.data import clean_documents, read_texts, teacher_generated_texts
    from neuro_mar.teachers import load_teacher

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--data", help="text whose paragraph openings prompt continuations (as refine --data)")
    ap.add_argument("--tokens", type=int, default=262144, help="tokens to sample per setting")
    ap.add_argument("--setting", action="append", metavar="LABEL:key=value,...",
                    help=f"batch, cache (preallocated|static|dynamic), bf16, max_new; default {DEFAULT_SETTINGS}")
    args = ap.parse_args(argv)
    settings = [parse_setting(s) for s in (args.setting or DEFAULT_SETTINGS)]
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA device")
    teacher, tok = load_teacher(args.teacher)
    teacher = teacher.cuda().eval()
    texts = clean_documents(read_texts(args.data), "auto") if args.data else None
    rows = []
    for label, over in settings:
        with tempfile.TemporaryDirectory() as cache:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            docs = teacher_generated_texts(teacher, tok, args.tokens, cache_dir=cache, progress=False, texts=texts,
                                           **over)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        n = sum(len(tok(d, add_special_tokens=False).input_ids) for d in docs)
        rows.append({"setting": label, **over, "tokens": n, "docs": len(docs), "seconds": round(dt, 1),
                     "tokens_per_s": round(n / dt), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)})
        torch.cuda.reset_peak_memory_stats()
        print(f"[sampling] {label}: {n} tokens in {dt:.1f} s", flush=True)
    anchor = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_anchor"] = round(r["tokens_per_s"] / anchor, 2)
    print_table(rows, ["setting", "batch", "cache", "bf16", "tokens", "docs", "seconds", "tokens_per_s", "ratio_anchor",
                       "peak_gib"])
    payload = {"benchmark": "teacher_sampling", "anchor": rows[0]["setting"], "rows": rows, "env": environment()}
    write_results("teacher_sampling", payload)
    return payload


if __name__ == "__main__":
    main()
