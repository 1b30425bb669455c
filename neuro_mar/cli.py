"""The ``neuro-mar`` command line."""
from __future__ import annotations

import argparse
import os
import sys
import warnings


def _cmd_neurons(args) -> int:
    from .neurons import available, create

    rows = []
    for name, desc in available().items():
        n = create(name, channels=4)
        rows.append((name, getattr(n, "spike_levels", "?"), str(n.T), desc))
    widths = [max(len(r[i]) for r in rows + [("name", "spikes", "T", "")]) for i in range(3)]
    print(f"{'name':<{widths[0]}}  {'spikes':<{widths[1]}}  {'T':>{widths[2]}}  description")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    return 0


def _token_batches(tokenizer, texts: list[str] | None, seq_len: int, max_tokens: int):
    """Token batches [1, seq_len] of ``texts`` (``--data`` read as refine reads it, or ``[--text]``), or of
    the built-in sample. Several texts (documents of a .jsonl, .parquet or datasets folder) are
    joined with the end-of-text token between documents, as refine packs them."""
    from pathlib import Path

    import torch

    if texts is None:
        texts = [(Path(__file__).parent / "data" / "sample.txt").read_text(encoding="utf-8")]
    if len(texts) == 1:
        ids = tokenizer(texts[0], return_tensors="pt").input_ids[0][:max_tokens]
    else:
        flat: list[int] = []
        for t in texts:
            flat += tokenizer(t, add_special_tokens=False).input_ids
            if tokenizer.eos_token_id is not None:
                flat.append(tokenizer.eos_token_id)
            if len(flat) >= max_tokens:
                break
        ids = torch.tensor(flat[:max_tokens], dtype=torch.long)
    if ids.numel() < 1:
        raise SystemExit("error: the text gives no tokens")
    return [ids[i:i + seq_len].unsqueeze(0) for i in range(0, ids.numel(), seq_len)]


def load_student(spec: str, neuron: str | None):
    """A MAR checkpoint folder, or a teacher spec converted on the fly with llama_to_mar; with
    ``neuron`` set at all four sites (thresholds still to calibrate). Returns (model, tokenizer)."""
    from pathlib import Path

    from .models import MARForCausalLM
    from .models.checks import load_tokenizer

    p = Path(spec)
    if _is_mar_checkpoint(spec):
        model = MARForCausalLM.from_pretrained(p).eval()
        if neuron:
            with warnings.catch_warnings():  # the callers recalibrate; say what remains undone
                warnings.simplefilter("ignore")
                summary = model.set_neurons(neuron)
            trained = sorted({r["from"] for r in summary.rows} - {"dense", neuron})
            if trained:
                print(f"note: {spec}'s {', '.join(trained)} neurons are replaced by {neuron} and recalibrated on the "
                      f"data, not distilled: its numbers are those of an untrained swap", file=sys.stderr)
        tok = load_tokenizer(p) if (p / "tokenizer_config.json").is_file() else None
        return model, tok
    from .convert import llama_to_mar
    from .teachers import load_teacher

    teacher, tok = load_teacher(spec)
    model = llama_to_mar(teacher).eval()
    if neuron:
        model.set_neurons(neuron)
    return model, tok


def _model_and_tokenizer(spec: str, neuron: str | None, tokenizer_spec: str, mar: bool = False):
    """A MAR model (``mar``: teachers converted) or any model, with the tokenizer of
    ``tokenizer_spec`` when MODEL has none."""
    model, tok = load_student(spec, neuron) if (mar or neuron or _is_mar_checkpoint(spec)) else _load_any(spec)
    if tok is None:
        from .teachers import load_teacher

        _, tok = load_teacher(tokenizer_spec)
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tok) > rows:  # its ids would index past the embedding
            raise ValueError(f"{spec} has no tokenizer of its own, and the fallback --tokenizer {tokenizer_spec}'s "
                             f"{len(tok)} tokens do not fit its {rows}-row embedding: pass --tokenizer with the "
                             "tokenizer the model was trained with")
    return model, tok


def _cmd_energy(args) -> int:
    import torch

    from .hardware_models import estimate_energy
    from .hardware_models.targets import DEFAULT_TARGETS, get_target

    targets = args.target or list(DEFAULT_TARGETS)
    for t in targets:
        try:
            get_target(t)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"error: {err}") from None
    from .refine.data import read_texts

    texts = read_texts(args.data, args.text_field) if args.data else None  # checked before the model loads
    torch.manual_seed(0)
    model, tok = _model_and_tokenizer(args.model, args.neuron, args.tokenizer, mar=True)
    batches = _token_batches(tok, texts, args.seq_len, args.max_tokens)
    if args.neuron:  # a freshly set neuron needs thresholds from the data
        model.calibrate_thresholds(batches[:1])
    reports = {}
    for ctx in args.context:
        rep = estimate_energy(model, batches, targets=targets, context=ctx, memory=args.memory)
        print(rep.table())
        print()
        reports[ctx] = rep
        if args.out:
            paths = rep.write(args.out, stem=f"energy_ctx{ctx}")
            print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _is_mar_checkpoint(spec: str) -> bool:
    from .models.checks import read_config

    config = read_config(spec)
    return config is not None and config.get("model_type") == "neuro_mar"


def _cmd_trace(args) -> int:
    from pathlib import Path

    from .traces import export_nir, export_nwb, record_trace

    if (args.text is None) == (args.data is None):
        raise SystemExit("error: give exactly one of --text or --data")
    from .refine.data import read_texts

    texts = [args.text] if args.text is not None else read_texts(args.data, args.text_field)
    model, tok = _model_and_tokenizer(args.model, args.neuron, args.tokenizer, mar=True)
    batches = _token_batches(tok, texts, args.seq_len, args.max_tokens)
    if args.neuron:
        model.calibrate_thresholds(batches[:1])
    out = Path(args.out)
    sonata = out if args.format == "sonata" else out.with_suffix(".sonata.h5")
    try:
        try:
            record_trace(model, batches, sonata, sites=args.sites, model_name=str(args.model), progress=True)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        if args.format == "nwb":
            export_nwb(sonata, out)
        elif args.format == "nir":
            export_nir(sonata, out)
    except BaseException:  # a failed write (or its rename) leaves no .NAME.PID.RANDOM.part behind
        from .io_utils import remove_own_temps

        for p in {sonata, out}:
            remove_own_temps(p)
        raise
    print(f"wrote {out}" + (f" (and {sonata})" if sonata != out else ""))
    return 0


def _cmd_plot_trace(args) -> int:
    from .traces import TraceFormatError, plot_trace

    try:
        paths = plot_trace(args.trace, args.out, max_tokens=args.max_tokens, max_channels=args.max_channels)
    except (TraceFormatError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


def _refine_config(args):
    import dataclasses

    from .refine import PRESETS, RefineConfig

    values = dict(PRESETS[args.preset])
    for f in dataclasses.fields(RefineConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("data",):
            values[f.name] = v
    values["data"] = args.data or []
    if args.neuron_option:
        import json

        example = '\'{"T": 8, "tau": 0.5}\''
        try:
            options = json.loads(args.neuron_option)
        except ValueError as err:
            raise ValueError(f"--neuron-option must be a JSON object such as {example}; {args.neuron_option!r} is not "
                             f"valid JSON ({err})") from None
        if not isinstance(options, dict):
            raise ValueError(f"--neuron-option must be a JSON object such as {example}; got "
                             f"{type(options).__name__} {args.neuron_option!r}")
        values["neuron_options"] = options
    return RefineConfig(**values)


def _cmd_refine(args) -> int:
    from .refine import RefineError, run_refine
    from .refine.data import DataError

    cfg = _refine_config(args)
    try:
        report = run_refine(cfg, args.out, resume=args.resume)
    except (RefineError, DataError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if report is not None:
        from pathlib import Path

        print((Path(args.out) / "report.md").read_text())
    return 0


def _cmd_clean(args) -> int:
    from pathlib import Path

    from .refine import RefineError
    from .refine.clean import clean_run, run_is_complete
    from .refine.pipeline import RunLock

    out = Path(args.run)
    if not (out / "refine_config.json").is_file():
        raise SystemExit(f"error: {out} is not a refine run folder (no refine_config.json); give the --out of a run")
    try:
        lock = RunLock(out)
    except RefineError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        gone = clean_run(out, dry_run=args.dry_run)
    finally:
        lock.release()
    verb = "would remove" if args.dry_run else "removed"
    for p, size in gone:
        print(f"{verb} {p} ({size / 2**30:.2f} GiB)")
    total = sum(size for _, size in gone) / 2**30
    state = "complete: --resume has nothing left to continue" if run_is_complete(out) else \
        "unfinished: what --resume needs is kept"
    print(f"{out}: {verb} {len(gone)} checkpoint(s), {total:.2f} GiB; the run is {state}")
    return 0


def _cmd_eval(args) -> int:
    import json

    from .evaluation import TaskFileError, describe, evaluate_suite, load_suite, render_suite_table
    from .io_utils import finite_or_none, non_finite_paths
    from .refine import load_multiple_choice, perplexity, score_multiple_choice
    from .refine.data import DataError, read_texts, tokenize_and_pack

    entries = []
    if args.suite or args.task:
        try:
            entries = load_suite(args.suite, args.suite_dir, args.task, args.limit)  # all files checked first
        except TaskFileError as err:
            raise SystemExit(f"error: {err}") from None
    elif not (args.data or args.tasks):
        raise SystemExit("error: give --suite NAME --suite-dir DIR or --task NAME=FILE (zero-shot suite), "
                         "--data FILE (perplexity) or --tasks FILE.jsonl (multiple choice)")
    if len(args.model) > 1 and (args.data or args.tasks):
        raise SystemExit("error: --data and --tasks take one MODEL; compare several models with --suite/--task")
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise SystemExit(f"error: --out {out} exists and is not a folder")
    results = {}
    suite_results = {}
    for spec in args.model:
        model, tok = _model_and_tokenizer(spec, None, args.tokenizer)
        if args.device:
            model.to(args.device)
        if entries:
            suite_results[spec] = evaluate_suite(model, tok, entries, max_length=args.max_length,
                                                 batch_tokens=args.batch_tokens, context_tokens=args.context_tokens,
                                                 progress=True, model_name=spec)
        try:
            if args.data:
                rows = tokenize_and_pack(read_texts(args.data, args.text_field), tok, args.seq_len, args.max_tokens)
                results["perplexity"] = perplexity(model, rows)
                if args.teacher:
                    from .refine import agreement

                    teacher, _ = _load_any(args.teacher)
                    results.update(agreement(model, teacher, rows))
            for path in args.tasks or []:
                results[path] = score_multiple_choice(model, tok, load_multiple_choice(path), progress=True)
        except (DataError, FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {err}") from None
    if entries:
        info = describe(entries)
        results = {"suite": args.suite, "tasks": info, "max_length": args.max_length, "limit": args.limit,
                   "context_tokens": args.context_tokens, "results": suite_results, **results}
        table = render_suite_table(suite_results, info, args.model[0])
        print(table)
        if args.out:
            from .io_utils import atomic_write_text

            atomic_write_text(out / "suite.json", json.dumps(finite_or_none(results), indent=2, allow_nan=False))
            atomic_write_text(out / "suite.md", table + "\n")
            print(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")
    else:
        print(json.dumps(finite_or_none(results), indent=2, allow_nan=False))
    bad = non_finite_paths(results)
    if bad:
        raise SystemExit(f"error: {len(bad)} result(s) are NaN or infinite ({', '.join(bad[:4])}"
                         f"{', ...' if len(bad) > 4 else ''}): the model's outputs are not finite; check its weights")
    return 0


def _load_any(spec: str):
    if _is_mar_checkpoint(spec):
        return load_student(spec, None)
    from .teachers import load_teacher

    return load_teacher(spec)


def _cmd_generate(args) -> int:
    import torch

    model, tok = _model_and_tokenizer(args.model, None, args.tokenizer)
    text = args.prompt
    if args.chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:  # an empty prompt: start a new document, as training documents are joined
        start = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
        if start is None:
            raise SystemExit("error: --prompt is empty and the tokenizer has neither an end-of-text nor a BOS "
                             "token to start from; give a prompt")
        ids = torch.tensor([[start]])
    with torch.no_grad():
        first = model(input_ids=ids.to(model.device)).logits[0, -1]
    if not bool(torch.isfinite(first).all()):
        raise SystemExit(f"error: {args.model} gives NaN or infinite logits for the prompt: its weights are broken "
                         "(a diverged training step or a damaged file); nothing was generated")
    torch.manual_seed(args.seed)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature if args.temperature > 0 else None,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def _cmd_simulate(args) -> int:
    import json
    from pathlib import Path

    from .hardware_models.targets import get_target
    from .io_utils import atomic_write_text
    from .simulate import EventDrivenExecutor, MappingError

    get_target(args.target)  # a bad --target (name or cost table file) is refused before the model loads
    model, tok = _model_and_tokenizer(args.model, args.neuron, args.tokenizer, mar=True)
    ids = tok(args.text, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise SystemExit("error: --text gives no tokens")
    if args.neuron:
        model.calibrate_thresholds([ids])
    try:
        ex = EventDrivenExecutor(model, args.target, max_chips=args.chips, quantize=args.quantize)
    except (MappingError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    logits = ex.run(ids[0])
    import torch

    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    rep = ex.report()
    rep["max_abs_logit_difference_vs_model"] = float((logits - ref).abs().max())
    print(f"{rep['target']}: {rep['cores']} cores on {rep['chips']} chip(s), {rep['tokens']} tokens, "
          f"max |logit difference| vs the model {rep['max_abs_logit_difference_vs_model']:.3g}")
    print(f"{'layer':>5} {'syn events/tok':>15} {'neuron upd/tok':>15} {'messages/tok':>13} {'hops/tok':>10} {'cores':>6}")
    for layer, d in rep["per_layer_per_token"].items():
        print(f"{layer:>5} {d['synaptic_events']:>15.1f} {d['neuron_updates']:>15.1f} {d['messages']:>13.1f} "
              f"{d['hops']:>10.1f} {d['cores']:>6}")
    e = rep["energy_pJ_per_token"]
    print(f"energy per token (counted events): {e['total']:.4g} pJ = synaptic {e['synaptic']:.4g} + neuron updates "
          f"{e['neuron_updates']:.4g} + routing {e['routing']:.4g}; analytic estimate {rep['analytic_pJ_per_token']:.4g} pJ")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "simulate.json", json.dumps(rep, indent=2))
        ex.plot_core_map(out / "core_map.png")
        print(f"wrote {out / 'simulate.json'} and {out / 'core_map.png'}")
    return 0


# ---------------------------------------------------------------------------------------------
# option checks: every command's numbers, --device and --out, checked in main() before a command
# loads a model or writes anything; each bad value is one `error:` line naming the option
# ---------------------------------------------------------------------------------------------
_INT_GE1 = (lambda v: v >= 1, "an integer >= 1")
_SEED = (lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")

# per command: (options, ok, what they must be), as refine's _RANGES (refine's own options are
# checked there, by validate_config); an option left unset (None) is not checked
_OPTION_RANGES = {
    "energy": [(("context", "seq_len", "max_tokens"), *_INT_GE1)],
    "trace": [(("seq_len", "max_tokens"), *_INT_GE1)],
    "plot-trace": [(("max_tokens", "max_channels"), *_INT_GE1)],
    "eval": [(("limit", "context_tokens", "batch_tokens", "max_tokens"), *_INT_GE1),
             (("max_length", "seq_len"), lambda v: v >= 2, "an integer >= 2")],
    "generate": [(("max_new_tokens",), *_INT_GE1), (("temperature",), lambda v: v >= 0, "a number >= 0"),
                 (("seed",), *_SEED)],
    "simulate": [(("chips",), *_INT_GE1)],
    "refine": [(("seed",), *_SEED)],
}

# per command: (option, what is written there): "folder" (files written into it) or "file"
_OUT_KINDS = {"energy": "folder", "eval": "folder", "simulate": "folder", "plot-trace": "folder",
              "refine": "folder", "trace": "file"}


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_ranges(args) -> None:
    """The numeric options of ``args.command`` against :data:`_OPTION_RANGES`."""
    import math

    for keys, ok, what in _OPTION_RANGES.get(args.command, []):
        integer = what.startswith("an integer")
        for key in keys:
            value = getattr(args, key, None)
            for v in value if isinstance(value, list) else [value]:
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)) \
                        or not math.isfinite(v) or not ok(v):
                    raise SystemExit(f"error: {_option(key)} must be {what}, got {v!r}")
    if args.command == "eval" and args.max_tokens < args.seq_len:
        raise SystemExit(f"error: --max-tokens must be an integer >= --seq-len ({args.seq_len}), got "
                         f"{args.max_tokens!r}")


def _check_device(spec: str) -> None:
    """``--device``: a torch device that exists on this machine."""
    import torch

    choices = "(cpu, cuda, cuda:N)"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise SystemExit(f"error: --device: {spec!r} is not a torch device {choices}") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise SystemExit(f"error: --device: {spec!r} is not a device the models can run on {choices}")
    if not torch.cuda.is_available():
        raise SystemExit(f"error: --device {spec}: CUDA is not available on this machine (torch "
                         f"{torch.__version__}, {'no GPU visible' if torch.version.cuda else 'a build without CUDA'});"
                         " use --device cpu")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise SystemExit(f"error: --device {spec}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")


def _check_out(path: str, kind: str, option: str = "--out") -> None:
    """``option`` PATH names something ``kind`` ("folder" or "file") can be written at: an existing
    folder (or file) of that kind, or a new path whose nearest existing parent is a folder that
    takes new files. Nothing is created (the probe is an unnamed temporary file)."""
    import tempfile
    from pathlib import Path

    p = Path(path).expanduser()
    fix = "choose another path"
    if kind == "folder" and p.exists() and not p.is_dir():
        raise SystemExit(f"error: {option} {path} exists and is not a folder (files are written into it); {fix}")
    if kind == "file" and p.is_dir():
        raise SystemExit(f"error: {option} {path} is a folder, but a file is written there; {fix}, e.g. "
                         f"{p / 'trace.h5'}")
    parent = p if kind == "folder" and p.is_dir() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SystemExit(f"error: {option} {path}: {parent} is a file, not a folder, so {path} cannot be "
                         f"created; {fix}")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as err:
        raise SystemExit(f"error: {option} {path}: {parent} takes no new files ({err.strerror or err}), so "
                         f"{'it cannot be written' if parent == p else 'it cannot be created there'}; {fix}") from None


def _check_options(args) -> None:
    """Every option of the command that can be checked without loading anything."""
    _check_ranges(args)
    if getattr(args, "device", None):
        _check_device(args.device)
    kind = _OUT_KINDS.get(args.command)
    if kind and getattr(args, "out", None) is not None:
        _check_out(args.out, kind)
        if args.command == "trace" and args.format != "sonata":
            from pathlib import Path

            _check_out(str(Path(args.out).with_suffix(".sonata.h5")), "file")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and its subparsers) whose usage errors are one ``error:`` line, exit
    status 2, without the usage block."""

    def error(self, message):  # noqa: D401 - argparse's hook
        import re

        m = re.fullmatch(r"argument (\S+): invalid (int|float) value: (.*)", message)
        if m:
            name = m.group(1).split("/")[-1]
            message = f"{name} must be {'an integer' if m.group(2) == 'int' else 'a number'}, got {m.group(3)}"
        elif message.endswith("expected one argument"):
            name = message.split(":")[0].removeprefix("argument ").split("/")[-1]
            message += f"; a value that starts with '-' is written {name}=VALUE"
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="neuro-mar",
        description="MAR: refine a dense Transformer LLM into a spiking state-space language model "
                    "(ATMN neurons, SBDS distillation), and measure what it costs.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    n = sub.add_parser("neurons", help="list the registered neuron types (names for --neuron and swap_neurons)",
                       description="Print the neuron registry: name, spike levels, default micro-steps T, description.")
    n.set_defaults(func=_cmd_neurons)

    e = sub.add_parser(
        "energy", help="estimate synaptic operations and energy per token on neuromorphic targets and a GPU",
        description="Count every operation of a MAR model on real text (spikes from a real run; scan, conv, "
                    "gating, norms and LM head included) and price it on cost tables with sourced constants. "
                    "Compares against the Transformer teacher and the dense Stage-1 model at the same context. "
                    "MODEL is a MAR checkpoint folder, or a teacher (smollm2-135m, HF folder, .gguf) converted "
                    "on the fly with --neuron and calibrated thresholds.")
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--target", action="append", metavar="NAME|FILE",
                   help="cost table name (repeatable; default: 45nm-fp32 45nm-int8 loihi truenorth spinnaker2 "
                        "h200-bf16) or a .toml/.json table")
    e.add_argument("--context", type=int, action="append", metavar="N",
                   help="context length of the comparison (repeatable; default 512)")
    e.add_argument("--data", metavar="FILE", help=".txt, .jsonl, .parquet or a saved datasets folder to run, read "
                                                  "as refine --data reads it (default: a built-in English sample)")
    e.add_argument("--text-field", default="text", help="the text field of a .jsonl/.parquet/datasets --data")
    e.add_argument("--neuron", help="set this neuron at all four sites and calibrate thresholds on the data")
    e.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer when MODEL has none (a teacher spec)")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--max-tokens", type=int, default=2048)
    e.add_argument("--memory", action="store_true", help="also count weight and state memory traffic")
    e.add_argument("--out", metavar="DIR", help="write energy_ctxN.{json,csv,png} here")
    e.set_defaults(func=_cmd_energy)

    t = sub.add_parser("trace", help="record spike traces to HDF5 (SONATA), NWB or NIR",
                       description="Run MODEL on text and record the ternary spikes of its sites, streamed to a "
                                   "SONATA-compatible HDF5 file (one population per site, polarity as a dataset); "
                                   "--format nwb/nir also writes that view. MODEL as for `neuro-mar energy`.")
    t.add_argument("model", metavar="MODEL")
    t.add_argument("--text", help="text to run")
    t.add_argument("--data", metavar="FILE", help=".txt, .jsonl, .parquet or a saved datasets folder to run, read "
                                                  "as refine --data reads it")
    t.add_argument("--text-field", default="text", help="the text field of a .jsonl/.parquet/datasets --data")
    t.add_argument("--out", required=True, metavar="FILE")
    t.add_argument("--sites", default="*", metavar="PATTERN",
                   help="fnmatch pattern on population names like L03.mlp.down (default: all spiking sites)")
    t.add_argument("--format", choices=["sonata", "nwb", "nir"], default="sonata")
    t.add_argument("--neuron", help="set this neuron at all four sites and calibrate thresholds on the text")
    t.add_argument("--tokenizer", default="smollm2-135m")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--max-tokens", type=int, default=4096)
    t.set_defaults(func=_cmd_trace)

    pt = sub.add_parser("plot-trace", help="PNG rasters per site and a firing-rate heatmap of a trace",
                        description="Plot a SONATA trace written by `neuro-mar trace`: raster_<site>.png (tokens on "
                                    "the x axis, +1 red, -1 blue) and firing_rates.png (layer x site kind).")
    pt.add_argument("trace")
    pt.add_argument("--out", default=".", metavar="DIR")
    pt.add_argument("--max-tokens", type=int, default=64)
    pt.add_argument("--max-channels", type=int, default=128)
    pt.set_defaults(func=_cmd_plot_trace)

    from .evaluation import SUITES, TASKS
    from .refine import PRESETS

    r = sub.add_parser(
        "refine", help="the main job: refine a dense teacher into a spiking SSM student (Stage 1 + Stage 2)",
        description="MAR refinement. Stage 1: attention -> Discrete Mamba-2 (1a matrix orientation, 1b per-layer "
                    "alignment, 1c end-to-end KL). Stage 2: a spiking neuron at the four projections of every layer, "
                    "calibrated, distilled with SBDS. Writes the Stage-1 model and the spiking student (HF "
                    "checkpoints), report.md/json and plots into --out. Without --data the teacher generates the "
                    "training text from built-in prompts (cached). Multi-process: torchrun --nproc-per-node N "
                    "$(which neuro-mar) refine ...")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--teacher", help="smollm2-135m (default), a local HF folder or a .gguf file")
    r.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick: about 20 min on a 2-core CPU; gpu: one H200 in ~20 min (time budgets per stage, "
                        "binary ablation, throughput check); tiny: smoke test")
    r.add_argument("--data", action="append", metavar="FILE",
                   help=".txt, .jsonl, .parquet or a saved datasets folder (repeatable)")
    r.add_argument("--text-field")
    r.add_argument("--mix-generated", action="store_true", default=None, help="add teacher-generated text to --data")
    r.add_argument("--neuron", help="registry name for the four sites (default atmn; see `neuro-mar neurons`)")
    r.add_argument("--neuron-option", metavar="JSON", help='neuron options, e.g. \'{"T": 8, "tau": 0.5}\'')
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    r.add_argument("--keep-checkpoints", action="store_true", default=None,
                   help="keep every stage's checkpoint (default: Stage 1's are removed once stage1/ is saved, "
                        "since a resume needs only stage1/; Stage 2's stay for --resume)")
    r.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP")
    for name, typ, hlp in [("seq_len", int, "tokens per training sequence"), ("generated_tokens", int, None),
                           ("max_tokens", int, None), ("steps_1a", int, "matrix orientation steps (0 = skip)"),
                           ("seq_len_1a", int, "tokens of each row that Stage 1a aligns (its l x l matrices)"),
                           ("steps_1b", int, "per-layer alignment steps"), ("steps_1c", int, "end-to-end KL steps"),
                           ("steps_2", int, "Stage-2 SBDS steps"), ("lr_1a", float, None), ("lr_1b", float, None),
                           ("lr_1c", float, None), ("lr_2", float, None), ("micro_batch", int, None),
                           ("grad_accum", int, None), ("warmup", int, None), ("seed", int, None),
                           ("ckpt_every", int, None), ("eval_rows", int, None),
                           ("alpha", float, "SBDS forward-KL weight (paper: 0.2)"),
                           ("beta", float, "SBDS reverse-KL weight (paper: 0.7)"),
                           ("gamma", float, "SBDS feature-alignment weight"), ("temperature", float, None),
                           ("ce_weight", float, "add next-token cross-entropy"),
                           ("calib_percentile", float, None),
                           ("seconds_1a", float, "wall-time budget of Stage 1a in s: steps are cut to fit (0 = none)"),
                           ("seconds_1b", float, "wall-time budget of Stage 1b in s"),
                           ("seconds_1c", float, "wall-time budget of Stage 1c in s"),
                           ("seconds_2", float, "wall-time budget of Stage 2 in s"),
                           ("seconds_ablation", float, "wall-time budget of each ablation's Stage 2 (0: as Stage 2)"),
                           ("eval_max_tokens", int, "tokens of --eval-data to evaluate (default 65536; 0 = all)"),
                           ("throughput_steps", int, "time N Stage-2 steps with the fused kernels and with the "
                                                     "PyTorch reference paths (0 = skip)"),
                           ("throughput_micro_batch", int, "sequences per step of that measurement"),
                           ("gen_max_new", int, "tokens per teacher sample (default 256)"),
                           ("gen_batch", int, "sequences per sampling batch (default: 1024 on a GPU, 16 on a CPU)"),
                           ("gen_continuation_share", float, "share of sampling prompts that open --data paragraphs "
                                                             "(default 0.75; the rest: built-in instructions)"),
                           ("gen_temperature", float, "teacher sampling temperature (default 1.0)"),
                           ("gen_top_p", float, "teacher sampling nucleus (default 0.95)"),
                           ("gen_cache", str, "KV cache of teacher sampling: auto, static or dynamic (default auto: "
                                              "dynamic)"),
                           ("gen_precision", str, "teacher sampling precision: auto (default: bf16 on a GPU, fp32 "
                                                  "elsewhere), fp32 or bf16 (a bf16 copy of the teacher samples)"),
                           ("eval_limit", int, "documents per suite task (default 0 = all)"),
                           ("eval_max_length", int, "model window of the suite in tokens (default 2048)")]:
        r.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, help=hlp)
    r.add_argument("--eval-data", metavar="FILE",
                   help="text file for perplexity, KL and agreement of every model (e.g. WikiText-2 valid)")
    r.add_argument("--eval-task", dest="eval_tasks", action="append", metavar="FILE.jsonl",
                   help="zero-shot multiple-choice set (ARC, PIQA, HellaSwag jsonl) for every model (repeatable)")
    r.add_argument("--ablation-neuron", dest="ablation_neurons", action="append", metavar="NAME",
                   help="also run Stage 2 with this neuron from the same Stage-1 model (repeatable)")
    r.add_argument("--eval-suite", choices=sorted(SUITES),
                   help="zero-shot suite the report leads with (dev: development sets; general: the held-out "
                        "benchmarks); needs --eval-suite-dir")
    r.add_argument("--eval-suite-dir", metavar="DIR", help="folder holding the suite's files (docs/evaluation.md)")
    r.add_argument("--eval-suite-task", dest="eval_suite_tasks", action="append", metavar="NAME=FILE",
                   help="add a task to the suite, e.g. piqa=piqa/validation.jsonl (repeatable)")
    r.add_argument("--detokenize", choices=["auto", "wikitext", "none"],
                   help="undo WikiText's tokenisation of --data (default auto: files that look like WikiText)")
    r.add_argument("--dt-init", choices=["range", "teacher"],
                   help="mixer memory at initialisation: each head's dt from the teacher's attention span "
                        "(default teacher) or log-uniform in --dt-range (see docs/quality.md)")
    r.add_argument("--dt-range", nargs=2, type=float, metavar=("MIN", "MAX"),
                   help="dt range for --dt-init range (default 0.3 3.0: a memory of 0.3 to 3 tokens)")
    r.add_argument("--normalize-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="start each mixer head as a normalised moving average, gain fixed at initialisation; "
                        "needs --ssm-input-gain none (default off)")
    r.add_argument("--ssm-input-gain", choices=["none", "zoh"],
                   help="zoh: the mixer scales x_t by 1 - exp(-dt_t), so each head is a normalised moving "
                        "average whatever dt does (default zoh; none: plain Discrete Mamba-2)")
    r.add_argument("--train-1", choices=["all", "blocks", "mixers"],
                   help="what Stage 1 trains: everything, the decoder blocks, or only the SSM mixers (the "
                        "teacher's MLPs, norms and embeddings frozen) (default all)")
    r.add_argument("--train-2", choices=["all", "blocks", "mixers"],
                   help="what Stage 2 trains, as --train-1; the spike thresholds always train (default all)")
    r.add_argument("--features", choices=["pre", "post", "both"], help="SBDS feature position (paper: pre)")
    r.add_argument("--stage2-teacher", choices=["stage1", "teacher"], help="distil Stage 2 from (default stage1)")
    r.set_defaults(func=_cmd_refine)

    c = sub.add_parser("clean", help="remove the checkpoints of a run that --resume no longer needs",
                       description="Remove the checkpoints (weights and optimizer state) of refine run RUN that "
                                   "a --resume does not need: Stage 1's once stage1/ is saved, and all of them "
                                   "once the run is complete (student/ and report.json written). The models, "
                                   "report and metrics stay.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("run", metavar="RUN", help="the --out folder of a neuro-mar refine run")
    c.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    c.set_defaults(func=_cmd_clean)

    ev = sub.add_parser(
        "eval", help="zero-shot suite (lm-eval definitions), perplexity, agreement with a teacher",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate one or more MODELs (MAR checkpoints or teacher specs). --suite/--task: zero-shot "
                    "tasks with lm-evaluation-harness 0.4 definitions from local files, one column per model and "
                    "the share of the first model's margin above the baseline that each other model keeps. "
                    f"Tasks: {', '.join(TASKS)}. --data: perplexity (and KL/agreement with --teacher); --tasks: "
                    "multiple-choice jsonl files (ARC, PIQA, HellaSwag).")
    ev.add_argument("model", metavar="MODEL", nargs="+", help="the first is the reference of the comparison")
    ev.add_argument("--suite", choices=sorted(SUITES), help="a built-in suite (dev: development sets; general: "
                                                             "the held-out benchmarks); needs --suite-dir")
    ev.add_argument("--suite-dir", metavar="DIR", help="folder holding the suite's files (see docs/evaluation.md)")
    ev.add_argument("--task", action="append", metavar="NAME=FILE",
                    help="a task from a file, e.g. lambada_openai=lambada_test.jsonl (repeatable; replaces the "
                         "suite's entry of the same name; LABEL:NAME=FILE to label it)")
    ev.add_argument("--limit", type=int, help="first N documents of each task")
    ev.add_argument("--max-length", type=int, default=2048, help="model window in tokens (lm-eval's max_length)")
    ev.add_argument("--context-tokens", type=int,
                    help="cut every context to its last N tokens (probe: how much context a model uses)")
    ev.add_argument("--batch-tokens", type=int, default=8192, help="input tokens per forward")
    ev.add_argument("--device", help="run the models here (e.g. cuda)")
    ev.add_argument("--out", metavar="DIR", help="write suite.json and suite.md here")
    ev.add_argument("--data", metavar="FILE", help="text for perplexity: .txt, .jsonl, .parquet or a saved datasets "
                                                   "folder")
    ev.add_argument("--text-field", default="text", help="the text field of a .jsonl/.parquet/datasets --data")
    ev.add_argument("--teacher", help="with --data: KL and top-1 agreement with this teacher")
    ev.add_argument("--tasks", action="append", metavar="FILE.jsonl", help="multiple-choice jsonl (ARC/PIQA/HellaSwag)")
    ev.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer when MODEL has none")
    ev.add_argument("--seq-len", type=int, default=256, help="--data sequence length")
    ev.add_argument("--max-tokens", type=int, default=65536, help="--data tokens to evaluate")
    ev.set_defaults(func=_cmd_eval)

    g = sub.add_parser("generate", help="generate text with a model", description="Generate from MODEL.")
    g.add_argument("model", metavar="MODEL")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokenizer", default="smollm2-135m")
    g.set_defaults(func=_cmd_generate)

    sm = sub.add_parser("simulate", help="execute a spiking model as synaptic events on a neuromorphic target's cores",
                        description="Map MODEL's spiking projections onto the target's cores and run TEXT token by "
                                    "token as events (spikes add or subtract weight columns; scan, norms, gating and "
                                    "LM head run as in the model). Prints per-layer events, cores, traffic and energy "
                                    "per token; --out writes simulate.json and core_map.png.")
    sm.add_argument("model", metavar="MODEL")
    sm.add_argument("--text", required=True)
    sm.add_argument("--target", default="loihi")
    sm.add_argument("--chips", type=int, help="chip budget: fail with what fits if the model needs more")
    sm.add_argument("--quantize", action="store_true", help="quantise weights to the target's precision")
    sm.add_argument("--neuron", help="set this neuron at all four sites and calibrate thresholds on the text")
    sm.add_argument("--tokenizer", default="smollm2-135m")
    sm.add_argument("--out", metavar="DIR")
    sm.set_defaults(func=_cmd_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "context", None) is None and getattr(args, "func", None) is _cmd_energy:
        args.context = [512]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .refine import TrainingDiverged

    _check_options(args)  # numbers, --device, --out: before any model loads or anything is written
    try:
        return args.func(args)
    except (TrainingDiverged, ValueError, OSError) as err:
        # bad input, unreadable files, a diverged stage: one line, not a traceback
        # (NEURO_MAR_DEBUG=1 shows the traceback)
        if os.environ.get("NEURO_MAR_DEBUG"):
            raise
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
