"""Where the teacher's ability goes, stage by stage, on the dev suite (one GPU, short budgets).

One process: the teacher and the data are prepared once (as ``neuro-mar refine`` does), then

1. the teacher on the dev suite, its LAMBADA accuracy with the context cut to the last N tokens,
   and its attention span per head;
2. each Stage-1 variant (``--variant NAME:key=value,...``, RefineConfig fields, e.g. the mixer
   initialisation) from the same data and the same wall-time budgets for 1b and 1c: its head
   memory before and after training, the dev suite, the cut-context probe;
3. Stage 2 (ATMN, SBDS) from the Stage-1 model of each variant named in ``--stage2`` (with
   overrides of its own, e.g. ``new:gamma=0.1``; ``stage2_teacher=teacher`` distils from the
   dense teacher instead of the Stage-1 model): the suite and the firing rate.

The phases run in the order given on the command line, so ``--stage2 best`` placed after two
variants picks the better of those two and a run cut short still has its student.

A variant may set its own budgets (``seconds_1b``, ``seconds_1c``, ``seconds_2``; the flags give
the defaults; ``seconds_1a > 0`` adds Stage 1a, matrix orientation, before 1b), batch
(``micro_batch`` with its learning rates) and data (``generated_tokens`` and the other fields of
``DATA_FIELDS`` or ``gen_*``: its rows are prepared for it, and its Stage 2 trains on them too); ``base=best`` starts from the
overrides of the best variant run before it (e.g. ``long:base=best,seconds_1c=300``: the same
recipe at a longer budget, a point of a tokens-vs-quality curve). A variant that runs out of GPU
memory is recorded as such and the next one runs.

Results are written after every phase (``recipe_ablation.json``, ``recipe_ablation.md``) under
``--out``; the last line printed is the JSON summary. Usage on the GPU machine:

    python3 -P benchmarks/recipe_ablation.py --data DIR/wikitext-2-raw/train.txt --suite-dir DIR \\
        --variant "old:dt_init=range,normalize_memory=False" \
        --variant "new:dt_init=teacher,normalize_memory=True" --stage2 new --stage2 old
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch


#: RefineConfig fields that change the training rows: a variant setting one of them (or a gen_*
#: sampling field) gets rows of its own (the teacher's samples are cached, so the same settings
#: sample once)
DATA_FIELDS = ("data", "generated_tokens", "mix_generated", "max_tokens", "seq_len", "detokenize", "text_field")


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    over = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        over[k.strip()] = _value(v.strip())
    return name, over


def main(argv=None) -> dict:
    from neuro_mar.evaluation import (batching_for, compare, describe, evaluate_suite, head_memory, load_suite,
                                      render_suite_table)
    from neuro_mar.evaluation.probes import attention_span
    from neuro_mar.hardware_models.counting import measure_site_activity
    from neuro_mar.io_utils import atomic_write_text
    from neuro_mar.refine.pipeline import (PRESETS, RefineConfig, init_student, loss_1b, loss_1c, make_loss_1a,
                                           make_loss_2, make_trainer, prepare)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="training text (as refine --data)")
    ap.add_argument("--suite-dir", required=True, help="folder of the dev suite's files")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/recipe_ablation")
    ap.add_argument("--work", default="/tmp/recipe_ablation_runs", help="trainer checkpoints and metrics")
    ap.add_argument("--variant", dest="phases", action="append", type=lambda v: ("stage1", v), default=[], metavar="SPEC",
                    help="NAME[:field=value,...]: a Stage-1 variant (repeatable)")
    ap.add_argument("--stage2", dest="phases", action="append", type=lambda v: ("stage2", v), metavar="SPEC",
                    help="VARIANT[:field=value,...]: Stage 2 from that Stage-1 variant, with these overrides "
                         "('best': the variant run so far with the highest mean kept share)")
    ap.add_argument("--seconds-1b", type=float, default=40.0)
    ap.add_argument("--seconds-1c", type=float, default=100.0)
    ap.add_argument("--seconds-2", type=float, default=120.0)
    ap.add_argument("--generated-tokens", type=int, default=262144)
    ap.add_argument("--limit", type=int, default=0, help="documents per suite task (0 = all)")
    ap.add_argument("--tasks", nargs="*", default=None, metavar="LABEL",
                    help="score only these entries of the dev suite (default: all of them)")
    ap.add_argument("--best-by", nargs="*", default=None, metavar="LABEL",
                    help="accuracy tasks whose mean kept share picks 'best' (default: every accuracy task; "
                         "tasks of a few hundred questions with a small teacher margin make it noisy)")
    ap.add_argument("--cut", type=int, nargs="*", default=[16, 32, 64], help="LAMBADA context cuts (tokens)")
    ap.add_argument("--set", action="append", default=[], help="field=value for every run (RefineConfig)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(PRESETS["gpu"], data=args.data, generated_tokens=args.generated_tokens, ablation_neurons=[],
                  throughput_steps=0, ckpt_every=100000, seconds_1b=args.seconds_1b, seconds_1c=args.seconds_1c,
                  seconds_2=args.seconds_2)
    for item in args.set:
        k, _, v = item.partition("=")
        common[k] = _value(v)
    base = RefineConfig(**common)
    if not any(kind == "stage1" for kind, _ in args.phases):
        args.phases[:0] = [("stage1", "range:dt_init=range,ssm_input_gain=none"), ("stage1", "teacher:")]
    variants = [parse_variant(v) for kind, v in args.phases if kind == "stage1"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"config": dataclasses.asdict(base), "variants": dict(variants), "seconds": {}, "models": {},
                     "memory": {}, "cut_context": {}, "stage_tokens": {}, "firing_rate": {}, "failed": {},
                     "train_tokens_of": {}}
    t0 = time.time()

    def save():
        results["wall_seconds"] = time.time() - t0
        atomic_write_text(out / "recipe_ablation.json", json.dumps(results, indent=2))
        if "teacher" in results["models"]:
            info = results["tasks"]
            table = render_suite_table(results["models"], info, "teacher")
            atomic_write_text(out / "recipe_ablation.md", table + "\n")
            results["kept"] = compare(results["models"], info, "teacher")

    entries = load_suite("dev", args.suite_dir, None, args.limit or None)
    if args.tasks:
        unknown = sorted(set(args.tasks) - {e.label for e in entries})
        if unknown:
            raise SystemExit(f"error: --tasks {' '.join(unknown)}: not in the dev suite "
                             f"({' '.join(e.label for e in entries)})")
        entries = [e for e in entries if e.label in args.tasks]
    for label in args.best_by or []:
        match = [e for e in entries if e.label == label]
        if not match or match[0].task.kind == "rolling":
            raise SystemExit(f"error: --best-by {label}: not an accuracy task of the suite being scored")
    results["tasks"] = describe(entries)
    teacher, tok, train, _ = prepare(base)
    teacher.to(device).requires_grad_(False)
    results["seconds"]["prepare"] = time.time() - t0
    results["train_tokens"] = int(train.numel())
    lambada = [e for e in entries if e.task.kind == "target"]

    def evaluate(name, model):
        t = time.time()
        results["models"][name] = evaluate_suite(model, tok, entries, progress=True, model_name=name,
                                                 **batching_for(model))
        for n in args.cut:
            for e in lambada:
                r = evaluate_suite(model, tok, [e], context_tokens=n, **batching_for(model))[e.label]
                results["cut_context"].setdefault(name, {})[str(n)] = r
        results["seconds"][f"eval {name}"] = time.time() - t
        save()
        print(name, json.dumps({k: v for k, v in results["models"][name].items()}), flush=True)

    evaluate("teacher", teacher)
    ids = train[:4, :512].to(device)
    span, sink = attention_span(teacher, ids, min_position=ids.shape[1] // 2)
    results["memory"]["teacher_attention_span"] = span.tolist()
    results["memory"]["teacher_sink_mass"] = sink.tolist()
    stage1 = {}

    def best_stage1():
        kept = compare(results["models"], results["tasks"], "teacher")

        def score(v):
            row = kept[f"{v} stage1"]
            if not args.best_by:
                return row["mean_kept"] or 0.0
            vals = [row.get(label) for label in args.best_by]
            return sum(x for x in vals if x is not None) / len(vals)
        return max(stage1, key=score)

    def run_stage1(name, over):
        if over.get("base") == "best":
            over = {**results["variants"][best_stage1()], **{k: v for k, v in over.items() if k != "base"}}
            results["variants"][name] = over
        cfg = dataclasses.replace(base, **over)
        rows = train
        if any(k in DATA_FIELDS or k.startswith("gen_") for k in over):  # this variant's own training rows
            rows = prepare(cfg)[2]
            results["train_tokens_of"][name] = int(rows.numel())
        torch.manual_seed(cfg.seed)
        student = init_student(cfg, teacher, rows).to(device)
        results["memory"][f"{name}_init"] = head_memory(student, ids).tolist()
        subs = [("stage1a", make_loss_1a(cfg), cfg.seconds_1a, cfg.lr_1a)] if cfg.seconds_1a > 0 else []
        for st, fn, secs, lr in subs + [("stage1b", loss_1b, cfg.seconds_1b, cfg.lr_1b),
                                        ("stage1c", loss_1c, cfg.seconds_1c, cfg.lr_1c)]:
            t = time.time()
            tr = make_trainer(cfg, f"{name}-{st}", student, teacher, fn, 100000, lr, secs, rows, Path(args.work), device,
                              trainable=cfg.train_1)
            tr.run()
            student = tr.result().student
            results["seconds"][f"{name} {st}"] = time.time() - t
            width = cfg.seq_len_1a if st == "stage1a" else rows.shape[1]
            results["stage_tokens"][f"{name} {st}"] = tr.step * cfg.micro_batch * cfg.grad_accum * min(width, rows.shape[1])
        student.eval().requires_grad_(False)
        results["memory"][f"{name}_stage1"] = head_memory(student, ids).tolist()
        evaluate(f"{name} stage1", student)
        stage1[name] = (cfg, student, rows)

    def run_stage2(spec):
        name, over = parse_variant(spec)
        if name == "best":  # the Stage-1 variant (of those run so far) that keeps the most of the teacher's margin
            name = best_stage1()
            results.setdefault("best_stage1", {})[spec] = name
            spec = name + spec[len("best"):]
        cfg, s1, rows = stage1[name]
        cfg = dataclasses.replace(cfg, **over)
        name = spec
        spiking = copy.deepcopy(s1).requires_grad_(True)
        spiking.set_neurons(cfg.neuron, **cfg.neuron_options)
        spiking.to(device)
        spiking.calibrate_thresholds([rows[:cfg.micro_batch].to(device)], percentile=cfg.calib_percentile)
        t = time.time()
        teacher_2 = teacher if cfg.stage2_teacher == "teacher" else s1
        tr = make_trainer(cfg, f"{name}-stage2", spiking, teacher_2, make_loss_2(cfg), 100000, cfg.lr_2, cfg.seconds_2,
                          rows, Path(args.work), device, trainable=cfg.train_2)
        tr.run()
        spiking = tr.result().student.eval()
        results["seconds"][f"{name} stage2"] = time.time() - t
        results["stage_tokens"][f"{name} stage2"] = tr.step * cfg.micro_batch * cfg.grad_accum * rows.shape[1]
        activity = measure_site_activity(spiking, [rows[-2:].to(device)])
        rates = [v["firing_rate"] for k, v in activity.items() if isinstance(k, tuple)]
        results["firing_rate"][name] = sum(rates) / len(rates)
        evaluate(f"{name} student", spiking)

    def guarded(label, fn, *a):
        """Run one phase; out of GPU memory, record it and go on with the next."""
        try:
            fn(*a)
        except torch.OutOfMemoryError as err:
            results["failed"][label] = f"out of GPU memory: {str(err).splitlines()[0]}"
            print(f"{label}: out of GPU memory, skipped", flush=True)
            torch.cuda.empty_cache()
            save()

    for kind, spec in args.phases:
        if kind == "stage1":
            name, over = parse_variant(spec)
            guarded(name, run_stage1, name, over)
        elif stage1:
            guarded(f"{spec} stage2", run_stage2, spec)
    save()
    summary = {"kept": results.get("kept"), "wall_seconds": results["wall_seconds"]}
    print(json.dumps(summary))
    return results


if __name__ == "__main__":
    main()
