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


def _progress(iterable, desc: str, unit: str = "it", total: int | None = None):
    """``iterable`` under a tqdm bar on stderr, shown once the phase takes over 2 s."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, delay=2.0)


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
    from .hardware_models import measure_site_activity

    # spikes are measured once (the same for every context), then priced per context and target
    activity = measure_site_activity(model, _progress(batches, "measuring spikes", unit="seq"))
    reports = {}
    for ctx in args.context:
        rep = estimate_energy(model, batches, targets=targets, context=ctx, memory=args.memory, activity=activity)
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


def _config_value_problem(key: str, value, hint, default) -> str | None:
    """What is wrong with a --config file's ``value`` for RefineConfig field ``key`` of type ``hint``
    (resolved annotation) whose default is ``default``; None when it fits. JSON has no tuples:
    a tuple field takes a list, of numbers like its default's (``dt_range``: two of them)."""
    import types
    import typing

    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        problems = [_config_value_problem(key, value, h, default) for h in options if h is not type(None)]
        return None if None in problems else problems[0]
    integer = isinstance(value, int) and not isinstance(value, bool)
    number = integer or isinstance(value, float)
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if integer else "an integer"
    if hint is float:
        return None if number else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if hint is dict:
        return None if isinstance(value, dict) else "a JSON object"
    if hint in (list, tuple):
        if not isinstance(value, list):
            return "a list"
        if hint is tuple and default:  # numbers, as the default's (dt_range, energy_contexts)
            if any(isinstance(d, int) for d in default):
                ok, what = all(isinstance(v, int) and not isinstance(v, bool) for v in value), "integers"
            else:
                ok, what = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value), "numbers"
            if not ok:
                return f"a list of {what}"
            if key == "dt_range" and len(value) != 2:  # MIN MAX
                return "a list of two numbers, MIN and MAX"
        elif hint is list and not all(isinstance(v, str) for v in value):  # paths, names, NAME=FILE specs
            return "a list of strings"
    return None


def read_refine_config(path: str) -> dict:
    """The RefineConfig fields of a --config FILE (a run's refine_config.json, or any JSON object of
    its fields); SystemExit with one ``error:`` line naming the file (and the field) when the file
    is missing, unreadable, not JSON, not an object, or has an unknown field or a value of the wrong
    type. Values are returned as RefineConfig takes them (lists of tuple fields as tuples)."""
    import dataclasses
    import difflib
    import json
    import typing
    from pathlib import Path

    from .refine import RefineConfig

    p = Path(path).expanduser()
    where = f"--config {path}"
    if p.is_dir():
        hint = f"; give the file: --config {p / 'refine_config.json'}" if (p / "refine_config.json").is_file() else ""
        raise SystemExit(f"error: {where} is a folder, not a refine_config.json file{hint}")
    if not p.is_file():
        raise SystemExit(f"error: {where} does not exist (give a run's refine_config.json)")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SystemExit(f"error: {where} is not UTF-8 text, so not a refine_config.json") from None
    except OSError as err:
        raise SystemExit(f"error: {where} cannot be read ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {where} is not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {where} holds a JSON {type(data).__name__}, not an object of refine options "
                         "(field names as in a run's refine_config.json, e.g. {\"steps_2\": 200})")
    fields = {f.name: f for f in dataclasses.fields(RefineConfig)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key.replace("-", "_").lstrip("_"), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; fields: {', '.join(fields)}"
            raise SystemExit(f"error: {where}: unknown field {key!r} (not an option of this neuro-mar refine){hint}")
    hints = typing.get_type_hints(RefineConfig)
    defaults = RefineConfig()
    values = {}
    for key, value in data.items():
        default = getattr(defaults, key)
        problem = _config_value_problem(key, value, hints[key], default)
        if problem:
            raise SystemExit(f"error: {where}: field {key!r} must be {problem}, got {value!r}")
        values[key] = tuple(value) if isinstance(default, tuple) else value
    return values


def _refine_config(args):
    """The run's RefineConfig. Precedence, lowest first: RefineConfig's defaults, ``--preset``,
    ``--config FILE``, the options given on the command line (every refine option defaults to None,
    so an option that is not None was given)."""
    import dataclasses

    from .refine import PRESETS, RefineConfig

    values = dict(PRESETS[args.preset])
    if getattr(args, "config", None):
        values.update(read_refine_config(args.config))
    for f in dataclasses.fields(RefineConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
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
    defaults = RefineConfig()
    for key, v in values.items():  # --dt-range gives a list; the file's lists were converted already
        if isinstance(getattr(defaults, key), tuple) and isinstance(v, list):
            values[key] = tuple(v)
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


def _cmd_sweep(args) -> int:
    from .refine import RefineError
    from .refine.data import DataError
    from .refine.sweep import read_runs, run_sweep

    cfg = _refine_config(args)
    only = None
    if args.only is not None:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        if not only:
            raise SystemExit(f"error: --only {args.only!r} names no run; give NAME,NAME,... from --runs")
    try:
        runs = read_runs(args.runs)
        result = run_sweep(cfg, runs, args.out, only=only)
    except (RefineError, DataError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(result["markdown"])
    if result["failed"]:
        raise SystemExit(f"error: {len(result['failed'])} run(s) failed ({'; '.join(result['failed'])}); the others "
                         "are in the tables")
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
    if args.suite or args.suite_task:
        try:
            entries = load_suite(args.suite, args.suite_dir, args.suite_task, args.limit)  # all files checked first
        except TaskFileError as err:
            raise SystemExit(f"error: {err}") from None
    elif not (args.data or args.multiple_choice):
        raise SystemExit("error: give --suite NAME --suite-dir DIR or --suite-task NAME=FILE (zero-shot suite), "
                         "--data FILE (perplexity) or --multiple-choice FILE.jsonl (multiple choice)")
    if len(args.model) > 1 and (args.data or args.multiple_choice):
        raise SystemExit("error: --data and --multiple-choice take one MODEL; compare several models with "
                         "--suite/--suite-task")
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
                results["perplexity"] = perplexity(model, rows, progress="perplexity")
                if args.teacher:
                    from .refine import agreement

                    teacher, _ = _load_any(args.teacher)
                    results.update(agreement(model, teacher, rows, progress="agreement with the teacher"))
            for path in args.multiple_choice or []:
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
    logits = ex.run(ids[0], progress=True)
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
    "sweep": [(("seed",), *_SEED)],
}

# per command: (option, what is written there): "folder" (files written into it) or "file"
_OUT_KINDS = {"energy": "folder", "eval": "folder", "simulate": "folder", "plot-trace": "folder",
              "refine": "folder", "sweep": "folder", "trace": "file"}


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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default: ``(default: X)`` after its help, ``(required)`` for a
    required option. ``X`` is an action's ``default_text`` where it has one (a default computed
    elsewhere: refine's presets, the fallback of an unset option), else its default written for
    people (``on``/``off``, lists space-separated, ``none``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS:
            return text
        if not action.option_strings:  # positionals: required, no default
            return text
        if action.required:
            return f"{text} (required)"
        shown = getattr(action, "default_text", None)
        if shown is None:
            shown = _show_default(action.default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    # option names are never split at their hyphens (textwrap's default breaks "--multiple-choice")
    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        import textwrap

        return textwrap.fill(self._whitespace_matcher.sub(" ", text).strip(), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


def _show_default(value) -> str:
    if value is None or (isinstance(value, (list, tuple, dict)) and not value):
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(_show_default(v) for v in value)
    return str(value)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and its subparsers) whose usage errors are one ``error:`` line, exit
    status 2, without the usage block, and whose ``--help`` shows every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

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


def _arg(parser, *flags, aliases=(), default_text=None, **kwargs):
    """``parser.add_argument(*flags, **kwargs)``; ``aliases``: older spellings that still work, hidden
    from ``--help`` (same dest, type and action; they set no default of their own);
    ``default_text``: the default as ``--help`` shows it, where the option's own default is None."""
    action = parser.add_argument(*flags, **kwargs)
    if default_text is not None:
        action.default_text = default_text
    hidden = {k: v for k, v in kwargs.items() if k not in ("help", "default", "required", "dest")}
    for old in aliases:
        parser.add_argument(old, dest=action.dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **hidden)
    return action


def _version() -> str:
    """The package's version: ``neuro_mar.__version__`` (the code that runs), else the installed
    distribution's metadata."""
    version = getattr(sys.modules[__package__], "__version__", None)
    if version:
        return version
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neuro-mar")
    except PackageNotFoundError:
        return "unknown"


def _refine_default(dest: str, preset: str) -> str:
    """The value refine uses for ``dest`` when neither the command line nor --config sets it: the
    ``preset``'s (the --preset default), else RefineConfig's; other presets' values where they differ."""
    from .refine import PRESETS, RefineConfig

    base = getattr(RefineConfig(), dest)
    value = PRESETS[preset].get(dest, base)
    others = [f"{name} {_show_default(PRESETS[name].get(dest, base))}" for name in sorted(PRESETS)
              if name != preset and PRESETS[name].get(dest, base) != value]
    return _show_default(value) + (f"; --preset {', '.join(others)}" if others else "")


def _refine_adder(preset: str = "quick"):
    """``add(group, *flags, **kwargs)``, which adds one refine option to an argument group: its dest
    is a RefineConfig field whose flag is ``option_flag(field)``, its default None (unset: the
    preset, --config or RefineConfig decide); --help shows what it resolves to under ``preset``."""
    import dataclasses

    from .refine import RefineConfig
    from .refine.pipeline import option_flag

    fields = {f.name for f in dataclasses.fields(RefineConfig)}

    def add(group, *flags, dest=None, **kwargs):
        dest = dest or flags[0].lstrip("-").replace("-", "_")
        assert dest in fields and flags[0] == option_flag(dest), (dest, flags[0])  # errors name this flag
        shown = kwargs.pop("default_text", None) or _refine_default(dest, preset)
        return _arg(group, *flags, dest=dest, default=None, default_text=shown, **kwargs)

    return add


def _add_config_and_preset(group, preset: str = "quick") -> None:
    """refine's (and sweep's) --config FILE and --preset NAME."""
    from .refine import PRESETS

    _arg(group, "--config", metavar="FILE", default_text="none",
         help="replay a run: take every option from FILE, a run's refine_config.json (or any JSON object of its "
              "fields, e.g. {\"steps_2\": 200}); options given on the command line override the file's values, and "
              "the file's override the --preset's (precedence: preset < config file < command line). Paths in it "
              "are read as written (relative to the current folder)")
    _arg(group, "--preset", choices=sorted(PRESETS), default=preset,
         help="quick: about 20 min on a 2-core CPU; gpu: one H200 in ~20 min (time budgets per stage, binary "
              "ablation, throughput check); tiny: smoke test. With --config, it fills only what the file leaves out")


def _add_refine_parser(sub) -> None:
    r = sub.add_parser(
        "refine", help="the main job: refine a dense teacher into a spiking SSM student (Stage 1 + Stage 2)",
        description="MAR refinement. Stage 1: attention -> Discrete Mamba-2 (1a matrix orientation, 1b per-layer "
                    "alignment, 1c end-to-end KL). Stage 2: a spiking neuron at the four projections of every layer, "
                    "calibrated, distilled with SBDS. Writes the Stage-1 model and the spiking student (HF "
                    "checkpoints), refine_config.json, report.md/json and plots into --out. Without --data the "
                    "teacher generates the training text from built-in prompts (cached). Every option's value comes "
                    "from, in rising precedence: RefineConfig's defaults, the --preset, the --config file, the "
                    "command line; the defaults shown are those of --preset quick. Options named --eval-X do what "
                    "`neuro-mar eval --X` does. Multi-process: torchrun --nproc-per-node N $(which neuro-mar) "
                    "refine ...",
        usage="%(prog)s --out DIR [--preset NAME] [--config FILE] [--data FILE ...] [OPTION ...]",
        epilog="Replay or vary a run: neuro-mar refine --config runs/a/refine_config.json --out runs/b --steps-2 200. "
               "Stage 2 only, from a finished run's Stage-1 model: neuro-mar refine --from-stage1 runs/a/stage1 "
               "--out runs/c --neuron binary (many such runs: neuro-mar sweep, docs/sweep.md)")
    add = _refine_adder()
    run = r.add_argument_group("run")
    _arg(run, "--out", required=True, metavar="DIR", help="run folder: models, report, checkpoints and the run's "
                                                          "refine_config.json are written here")
    _add_config_and_preset(run)
    _arg(run, "--resume", action="store_true", help="continue an interrupted run in --out (same options)")
    add(run, "--from-stage1", metavar="DIR", default_text="none: run Stage 1",
        help="skip Stage 1: start Stage 2 from this saved Stage-1 model (a run's stage1/ folder, made from "
             "--teacher); the Stage-1 options are then unused and stage1/ is not copied into --out")
    _add_refine_options(r, run, add)
    r.set_defaults(func=_cmd_refine)


def _add_refine_options(r, run, add, stage2_only: bool = False) -> None:
    """Every refine option but those of the "run" group's own (--out, --config, --preset, --resume,
    --from-stage1), into ``r``'s argument groups (``run`` takes --teacher, --seed, ...).
    ``stage2_only`` (sweep): without the Stage-1 options, the ablations, the throughput check and --fsdp."""
    from .refine import data as refine_data

    add(run, "--teacher", metavar="SPEC",
        help="the dense Llama-family teacher: smollm2-135m, a local HF folder or a .gguf file")
    add(run, "--seed", type=int, metavar="N", help="random seed: initialisation, data order, teacher sampling")
    add(run, "--ckpt-every", type=int, metavar="N", help="save a resumable checkpoint every N optimizer steps")
    add(run, "--keep-checkpoints", action="store_true",
        help="keep every stage's checkpoint (off: Stage 1's are removed once stage1/ is saved, since a resume "
             "needs only stage1/; Stage 2's stay for --resume)")
    if not stage2_only:  # a sweep runs one process per GPU, never under torchrun
        add(run, "--fsdp", action="store_true",
            help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP")

    data = r.add_argument_group("training data")
    add(data, "--data", action="append", metavar="FILE",
        default_text="none: the teacher generates the training text",
        help=".txt, .jsonl, .parquet or a saved datasets folder (repeatable)")
    add(data, "--text-field", metavar="NAME", help="the text field of a .jsonl/.parquet/datasets --data")
    add(data, "--detokenize", choices=["auto", "wikitext", "none"],
        help="undo WikiText's tokenisation of --data (auto: files that look like WikiText)")
    add(data, "--mix-generated", action="store_true", help="add teacher-generated text to --data")
    add(data, "--generated-tokens", type=int, metavar="N",
        help="tokens of teacher-generated text (without --data, or with --mix-generated)")
    add(data, "--seq-len", type=int, metavar="N", help="tokens per training (and evaluation) sequence")
    add(data, "--max-tokens", type=int, metavar="N", default_text="all",
        help="use at most N tokens of the training text (held-out split included)")

    gen = r.add_argument_group("teacher sampling (generated training text; --gen-X as `neuro-mar generate --X`)")
    add(gen, "--gen-max-new-tokens", dest="gen_max_new", type=int, metavar="N", aliases=["--gen-max-new"],
        help="tokens per teacher sample")
    add(gen, "--gen-batch", type=int, metavar="N",
        help="sequences per sampling batch (0: 1024 on a GPU, 16 on a CPU)")
    add(gen, "--gen-continuation-share", type=float, metavar="SHARE",
        help="share of sampling prompts that open --data paragraphs (the rest: built-in instructions)")
    add(gen, "--gen-temperature", type=float, metavar="T", help="teacher sampling temperature")
    add(gen, "--gen-top-p", type=float, metavar="P", help="teacher sampling nucleus (top-p)")
    add(gen, "--gen-top-k", type=int, metavar="K", help="teacher sampling: the K most probable tokens, cut to "
                                                        "the nucleus (0: no limit)")
    add(gen, "--gen-cache", metavar="|".join(("auto", *refine_data.GEN_CACHES)),
        help="KV cache of teacher sampling: preallocated (one cache for the run, the decode step captured in a "
             "CUDA graph), or HF generate's static or dynamic cache (auto: preallocated on a GPU for Llama-family "
             "teachers, else dynamic)")
    add(gen, "--gen-precision", metavar="auto|fp32|bf16",
        help="teacher sampling precision: auto (bf16 on a GPU, fp32 elsewhere), fp32 or bf16 (a bf16 copy of "
             "the teacher samples)")

    if not stage2_only:
        _add_stage1_options(r, add)
    _add_stage2_options(r, add, stage2_only)
    _add_run_options(r, add, stage2_only)


def _add_stage1_options(r, add) -> None:
    s1 = r.add_argument_group("Stage 1: attention -> Discrete Mamba-2")
    add(s1, "--dt-init", choices=["range", "teacher"],
        help="mixer memory at initialisation: each head's dt from the teacher's attention span (teacher) or "
             "log-uniform in --dt-range (range) (see docs/quality.md)")
    add(s1, "--dt-range", nargs=2, type=float, metavar=("MIN", "MAX"),
        help="dt range for --dt-init range (0.3 3.0: a memory of 0.3 to 3 tokens)")
    add(s1, "--ssm-input-gain", choices=["none", "zoh"],
        help="zoh: the mixer scales x_t by 1 - exp(-dt_t), so each head is a normalised moving average whatever "
             "dt does; none: plain Discrete Mamba-2")
    add(s1, "--normalize-memory", action=argparse.BooleanOptionalAction,
        help="start each mixer head as a normalised moving average, gain fixed at initialisation; needs "
             "--ssm-input-gain none")
    add(s1, "--train-1", choices=["all", "blocks", "mixers"],
        help="what Stage 1 trains: everything, the decoder blocks, or only the SSM mixers (the teacher's MLPs, "
             "norms and embeddings frozen)")
    add(s1, "--steps-1a", type=int, metavar="N", help="Stage 1a (matrix orientation) steps (0 = skip)")
    add(s1, "--seq-len-1a", type=int, metavar="N", help="tokens of each row that Stage 1a aligns (its l x l matrices)")
    add(s1, "--steps-1b", type=int, metavar="N", help="Stage 1b (per-layer alignment) steps (0 = skip)")
    add(s1, "--steps-1c", type=int, metavar="N", help="Stage 1c (end-to-end KL) steps (0 = skip)")
    for sub_stage in ("1a", "1b", "1c"):
        add(s1, f"--lr-{sub_stage}", type=float, metavar="LR", help=f"peak learning rate of Stage {sub_stage} (AdamW; "
                                                                    "linear warm-up, then cosine decay)")
    add(s1, "--seconds-1a", type=float, metavar="S",
        help="wall-time budget of Stage 1a in s: steps are cut to fit (0 = none)")
    add(s1, "--seconds-1b", type=float, metavar="S", help="wall-time budget of Stage 1b in s (0 = none)")
    add(s1, "--seconds-1c", type=float, metavar="S", help="wall-time budget of Stage 1c in s (0 = none)")


def _add_stage2_options(r, add, stage2_only: bool = False) -> None:
    s2 = r.add_argument_group("Stage 2: spiking neurons, SBDS distillation")
    add(s2, "--neuron", metavar="NAME", help="registry name of the neuron at the four sites (see `neuro-mar neurons`)")
    _arg(s2, "--neuron-option", metavar="JSON", default_text="none: the neuron's own defaults",
         help='neuron options as a JSON object, e.g. \'{"T": 8, "tau": 0.5}\'')
    add(s2, "--calib-percentile", type=float, metavar="P",
        help="percentile of the dense activations that sets each spike threshold at calibration")
    add(s2, "--stage2-teacher", choices=["stage1", "teacher"],
        help="distil Stage 2 from the Stage-1 model or the original teacher")
    add(s2, "--train-2", choices=["all", "blocks", "mixers"],
        help="what Stage 2 trains, as --train-1; the spike thresholds always train")
    add(s2, "--alpha", type=float, metavar="W", help="SBDS forward-KL weight (paper: 0.2)")
    add(s2, "--beta", type=float, metavar="W", help="SBDS reverse-KL weight (paper: 0.7)")
    add(s2, "--gamma", type=float, metavar="W", help="SBDS feature-alignment weight")
    add(s2, "--distill-temperature", dest="temperature", type=float, metavar="T", aliases=["--temperature"],
        help="distillation temperature: both KL terms compare softmax(logits / T) of teacher and student "
             "(the loss is scaled by T^2)")
    add(s2, "--ce-weight", type=float, metavar="W", help="add next-token cross-entropy with this weight")
    add(s2, "--rate-weight", type=float, metavar="W",
        help="activity regulariser: add W x the mean over spiking sites of (firing rate - --rate-target)^2, or "
             "with --rate-target 0 the mean firing rate (0 = off; rate: non-zero spikes / (elements x T))")
    add(s2, "--rate-target", type=float, metavar="R", help="firing rate in [0, 1] that --rate-weight pulls towards")
    add(s2, "--features", choices=["pre", "post", "both"], help="SBDS feature position (paper: pre)")
    add(s2, "--steps-2", type=int, metavar="N", help="Stage-2 SBDS steps (0 = skip)")
    add(s2, "--lr-2", type=float, metavar="LR", help="peak learning rate of Stage 2 (as --lr-1a)")
    add(s2, "--seconds-2", type=float, metavar="S", help="wall-time budget of Stage 2 in s (0 = none)")
    if not stage2_only:
        add(s2, "--ablation-neuron", dest="ablation_neurons", action="append", metavar="NAME",
            help="also run Stage 2 with this neuron from the same Stage-1 model (repeatable)")
        add(s2, "--seconds-ablation", type=float, metavar="S",
            help="wall-time budget of each ablation's Stage 2 in s (0: as --seconds-2)")


def _add_run_options(r, add, stage2_only: bool = False) -> None:
    """The optimisation and evaluation groups of refine's options."""
    from .evaluation import SUITES

    tr = r.add_argument_group("optimisation (every stage)")
    add(tr, "--micro-batch", type=int, metavar="N", help="sequences per forward/backward pass")
    add(tr, "--grad-accum", type=int, metavar="N", help="micro-batches accumulated per optimizer step")
    add(tr, "--warmup", type=int, metavar="N", help="linear learning-rate warm-up steps of each stage")

    ev = r.add_argument_group("evaluation (--eval-X as `neuro-mar eval --X`)")
    add(ev, "--eval-rows", type=int, metavar="N",
        help="rows of the held-out split (of --seq-len tokens) for perplexity, KL and agreement")
    add(ev, "--eval-data", metavar="FILE",
        help="text file for perplexity, KL and agreement of every model (e.g. WikiText-2 valid)")
    add(ev, "--eval-max-tokens", type=int, metavar="N", help="tokens of --eval-data to evaluate (0 = all)")
    add(ev, "--eval-multiple-choice", dest="eval_tasks", action="append", metavar="FILE.jsonl",
        aliases=["--eval-task"],
        help="zero-shot multiple-choice set (ARC, PIQA, HellaSwag jsonl) for every model (repeatable)")
    add(ev, "--eval-suite", choices=sorted(SUITES),
        help="zero-shot suite the report leads with (dev: development sets; general: the held-out benchmarks); "
             "needs --eval-suite-dir")
    add(ev, "--eval-suite-dir", metavar="DIR", help="folder holding the suite's files (docs/evaluation.md)")
    add(ev, "--eval-suite-task", dest="eval_suite_tasks", action="append", metavar="NAME=FILE",
        help="add a task to the suite, e.g. piqa=piqa/validation.jsonl (repeatable)")
    add(ev, "--eval-limit", type=int, metavar="N", help="documents per suite task (0 = all)")
    add(ev, "--eval-max-length", type=int, metavar="N", help="model window of the suite in tokens")
    if not stage2_only:
        add(ev, "--throughput-steps", type=int, metavar="N",
            help="time N Stage-2 steps with the fused kernels and with the PyTorch reference paths (0 = skip)")
        add(ev, "--throughput-micro-batch", type=int, metavar="N", help="sequences per step of that measurement")


def _add_sweep_parser(sub) -> None:
    from .refine.sweep import SWEEP_FIELDS

    s = sub.add_parser(
        "sweep", help="Stage 2 again and again from one Stage-1 model: neuron configurations, a table and a "
                      "Pareto plot",
        description="Run every run of --runs FILE.json in turn: Stage 2 from the --from-stage1 model (a refine "
                    "run's stage1/), each with its own overrides of the Stage-2 options, the same data, data order "
                    "and budget otherwise, each into its own refine run folder OUT/NAME/. A finished run is skipped "
                    "and an interrupted one resumed, so the same command continues a sweep. Then OUT/sweep.csv, "
                    "OUT/sweep.md and the Pareto plot OUT/sweep_pareto.png/.pdf (quality against energy per "
                    "token) are written from every finished run. The common options are refine's; the preset's "
                    "ablations and throughput check are not run (list those neurons as runs). Several GPUs: one "
                    "sweep per GPU on the same --out, each with its own --only subset (docs/sweep.md). A run sets "
                    f"any of: {', '.join(SWEEP_FIELDS)}.",
        usage="%(prog)s --from-stage1 DIR --runs FILE.json --out DIR [--only NAME,...] [--preset NAME] "
              "[--config FILE] [OPTION ...]",
        epilog="Example: neuro-mar sweep --from-stage1 runs/a/stage1 --runs examples/sweep_neurons.json --out "
               "sweeps/neurons --config runs/a/refine_config.json")
    add = _refine_adder()
    run = s.add_argument_group("sweep")
    _arg(run, "--from-stage1", dest="from_stage1", required=True, metavar="DIR",
         help="the Stage-1 model every run starts from: a refine run's stage1/ folder, made from --teacher")
    _arg(run, "--runs", required=True, metavar="FILE.json",
         help='the runs: {"runs": [{"name": "atmn-t2", "neuron": "atmn", "neuron_options": {"T": 2}}, ...]} '
              "(format: docs/sweep.md)")
    _arg(run, "--out", required=True, metavar="DIR",
         help="sweep folder: one refine run folder per run (OUT/NAME/), sweep.csv, sweep.md, sweep_pareto.png/.pdf")
    _arg(run, "--only", metavar="NAME,...", default_text="every run of --runs",
         help="run only these runs (comma-separated names), e.g. one subset per GPU; the tables and the plot "
              "still list every finished run")
    _add_config_and_preset(run)
    _add_refine_options(s, run, add, stage2_only=True)
    s.set_defaults(func=_cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    from .hardware_models.targets import DEFAULT_TARGETS

    p = _Parser(
        prog="neuro-mar",
        description="MAR: refine a dense Transformer LLM into a spiking state-space language model "
                    "(ATMN neurons, SBDS distillation), and measure what it costs.",
        epilog="`neuro-mar COMMAND --help` lists a command's options with their defaults. Start with "
               "`neuro-mar refine --preset tiny --out runs/smoke` (a smoke test).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    n = sub.add_parser("neurons", help="list the registered neuron types (names for --neuron and swap_neurons)",
                       description="Print the neuron registry: name, spike levels, default micro-steps T, description.")
    n.set_defaults(func=_cmd_neurons)

    model_help = ("a MAR checkpoint folder, or a teacher (smollm2-135m, an HF folder, a .gguf) converted on the fly "
                  "(set --neuron to make it spike)")
    tokenizer_help = "tokenizer when MODEL has none of its own (a teacher spec)"
    e = sub.add_parser(
        "energy", help="estimate synaptic operations and energy per token on neuromorphic targets and a GPU",
        description="Count every operation of a MAR model on real text (spikes from a real run; scan, conv, "
                    "gating, norms and LM head included) and price it on cost tables with sourced constants. "
                    "Compares against the Transformer teacher and the dense Stage-1 model at the same context. "
                    "MODEL is a MAR checkpoint folder, or a teacher (smollm2-135m, HF folder, .gguf) converted "
                    "on the fly with --neuron and calibrated thresholds. Your own chip: --target FILE.toml "
                    "(examples/my_chip.toml; fields in docs/cost-tables.md).")
    e.add_argument("model", metavar="MODEL", help=model_help)
    _arg(e, "--target", action="append", metavar="NAME|FILE", default_text=" ".join(DEFAULT_TARGETS),
         help="cost table: a registered name or a .toml/.json table (repeatable; fields: docs/cost-tables.md)")
    _arg(e, "--context", type=int, action="append", metavar="N", default_text="512",
         help="context length of the comparison (repeatable)")
    _arg(e, "--data", metavar="FILE", default_text="a built-in English sample",
         help=".txt, .jsonl, .parquet or a saved datasets folder to run, read as refine --data reads it")
    _arg(e, "--text-field", default="text", metavar="NAME", help="the text field of a .jsonl/.parquet/datasets --data")
    _arg(e, "--neuron", metavar="NAME", default_text="none: the model's own",
         help="set this neuron at all four sites and calibrate thresholds on the data")
    _arg(e, "--tokenizer", default="smollm2-135m", metavar="SPEC", help=tokenizer_help)
    _arg(e, "--seq-len", type=int, default=256, metavar="N", help="tokens per forward pass of the measurement")
    _arg(e, "--max-tokens", type=int, default=2048, metavar="N", help="tokens of the text to run")
    _arg(e, "--memory", action="store_true", help="also count weight and state memory traffic")
    _arg(e, "--out", metavar="DIR", default_text="none: print only", help="write energy_ctxN.{json,csv,png} here")
    e.set_defaults(func=_cmd_energy)

    t = sub.add_parser("trace", help="record spike traces to HDF5 (SONATA), NWB or NIR",
                       description="Run MODEL on text and record the ternary spikes of its sites, streamed to a "
                                   "SONATA-compatible HDF5 file (one population per site, polarity as a dataset); "
                                   "--format nwb/nir also writes that view. Give exactly one of --text or --data.")
    t.add_argument("model", metavar="MODEL", help=model_help)
    _arg(t, "--text", help="text to run")
    _arg(t, "--data", metavar="FILE", help=".txt, .jsonl, .parquet or a saved datasets folder to run, read as "
                                           "refine --data reads it")
    _arg(t, "--text-field", default="text", metavar="NAME", help="the text field of a .jsonl/.parquet/datasets --data")
    _arg(t, "--out", required=True, metavar="FILE",
         help="the trace file (with --format nwb/nir the SONATA file is written beside it as NAME.sonata.h5)")
    _arg(t, "--sites", default="*", metavar="PATTERN",
         help="fnmatch pattern on population names like L03.mlp.down (*: all spiking sites)")
    _arg(t, "--format", choices=["sonata", "nwb", "nir"], default="sonata", help="file format of --out")
    _arg(t, "--neuron", metavar="NAME", default_text="none: the model's own",
         help="set this neuron at all four sites and calibrate thresholds on the text")
    _arg(t, "--tokenizer", default="smollm2-135m", metavar="SPEC", help=tokenizer_help)
    _arg(t, "--seq-len", type=int, default=256, metavar="N", help="tokens per recorded sequence")
    _arg(t, "--max-tokens", type=int, default=4096, metavar="N", help="tokens of the text to record")
    t.set_defaults(func=_cmd_trace)

    pt = sub.add_parser("plot-trace", help="PNG rasters per site and a firing-rate heatmap of a trace",
                        description="Plot a SONATA trace written by `neuro-mar trace`: raster_<site>.png (tokens on "
                                    "the x axis, +1 red, -1 blue) and firing_rates.png (layer x site kind).")
    pt.add_argument("trace", metavar="TRACE", help="a SONATA .h5 file written by `neuro-mar trace`")
    _arg(pt, "--out", default=".", metavar="DIR", help="write the PNG files here")
    _arg(pt, "--max-tokens", type=int, default=64, metavar="N", help="tokens on each raster's x axis")
    _arg(pt, "--max-channels", type=int, default=128, metavar="N", help="channels on each raster's y axis")
    pt.set_defaults(func=_cmd_plot_trace)

    _add_refine_parser(sub)
    _add_sweep_parser(sub)

    c = sub.add_parser("clean", help="remove the checkpoints of a run that --resume no longer needs",
                       description="Remove the checkpoints (weights and optimizer state) of refine run RUN that "
                                   "a --resume does not need: Stage 1's once stage1/ is saved, and all of them "
                                   "once the run is complete (student/ and report.json written). The models, "
                                   "report and metrics stay.")
    c.add_argument("run", metavar="RUN", help="the --out folder of a neuro-mar refine run")
    _arg(c, "--dry-run", action="store_true", help="list what would go, remove nothing")
    c.set_defaults(func=_cmd_clean)

    from .evaluation import SUITES, TASKS

    ev = sub.add_parser(
        "eval", help="zero-shot suite (lm-eval definitions), perplexity, agreement with a teacher",
        description="Evaluate one or more MODELs (MAR checkpoints or teacher specs). --suite/--suite-task: "
                    "zero-shot tasks with lm-evaluation-harness 0.4 definitions from local files, one column per "
                    "model and the share of the first model's margin above the baseline that each other model "
                    f"keeps. Tasks: {', '.join(TASKS)}. --data: perplexity (and KL/agreement with --teacher); "
                    "--multiple-choice: multiple-choice jsonl files (ARC, PIQA, HellaSwag). refine's --eval-X "
                    "options do what eval's --X do.")
    ev.add_argument("model", metavar="MODEL", nargs="+", help="the first is the reference of the comparison")
    _arg(ev, "--suite", choices=sorted(SUITES), help="a built-in suite (dev: development sets; general: the held-out "
                                                     "benchmarks); needs --suite-dir")
    _arg(ev, "--suite-dir", metavar="DIR", help="folder holding the suite's files (see docs/evaluation.md)")
    _arg(ev, "--suite-task", action="append", metavar="NAME=FILE", aliases=["--task"],
         help="a suite task from a file, e.g. lambada_openai=lambada_test.jsonl (repeatable; replaces the suite's "
              "entry of the same name; LABEL:NAME=FILE to label it)")
    _arg(ev, "--limit", type=int, metavar="N", default_text="all", help="first N documents of each task")
    _arg(ev, "--max-length", type=int, default=2048, metavar="N", help="model window in tokens (lm-eval's max_length)")
    _arg(ev, "--context-tokens", type=int, metavar="N", default_text="whole contexts",
         help="cut every context to its last N tokens (probe: how much context a model uses)")
    _arg(ev, "--batch-tokens", type=int, default=8192, metavar="N", help="input tokens per forward")
    _arg(ev, "--device", default_text="cpu", help="run the models here (cpu, cuda, cuda:N)")
    _arg(ev, "--out", metavar="DIR", default_text="none: print only", help="write suite.json and suite.md here")
    _arg(ev, "--data", metavar="FILE", help="text for perplexity: .txt, .jsonl, .parquet or a saved datasets folder")
    _arg(ev, "--text-field", default="text", metavar="NAME", help="the text field of a .jsonl/.parquet/datasets --data")
    _arg(ev, "--teacher", metavar="SPEC", help="with --data: KL and top-1 agreement with this teacher")
    _arg(ev, "--multiple-choice", action="append", metavar="FILE.jsonl", aliases=["--tasks"],
         help="multiple-choice jsonl (ARC/PIQA/HellaSwag), acc and acc_norm (repeatable)")
    _arg(ev, "--tokenizer", default="smollm2-135m", metavar="SPEC", help=tokenizer_help)
    _arg(ev, "--seq-len", type=int, default=256, metavar="N", help="--data sequence length")
    _arg(ev, "--max-tokens", type=int, default=65536, metavar="N", help="--data tokens to evaluate")
    ev.set_defaults(func=_cmd_eval)

    g = sub.add_parser("generate", help="generate text with a model", description="Generate a continuation of "
                                                                                   "--prompt with MODEL.")
    g.add_argument("model", metavar="MODEL", help="a MAR checkpoint folder or a teacher spec")
    _arg(g, "--prompt", required=True, metavar="TEXT", help="the text to continue ('' starts a new document)")
    _arg(g, "--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate")
    _arg(g, "--temperature", type=float, default=0.0, metavar="T", help="sampling temperature (0: greedy decoding)")
    _arg(g, "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _arg(g, "--seed", type=int, default=0, metavar="N", help="random seed of the sampling")
    _arg(g, "--tokenizer", default="smollm2-135m", metavar="SPEC", help=tokenizer_help)
    g.set_defaults(func=_cmd_generate)

    sm = sub.add_parser("simulate", help="execute a spiking model as synaptic events on a neuromorphic target's cores",
                        description="Map MODEL's spiking projections onto the target's cores and run TEXT token by "
                                    "token as events (spikes add or subtract weight columns; scan, norms, gating and "
                                    "LM head run as in the model). Prints per-layer events, cores, traffic and energy "
                                    "per token; --out writes simulate.json and core_map.png.")
    sm.add_argument("model", metavar="MODEL", help=model_help)
    _arg(sm, "--text", required=True, help="text to run, token by token")
    _arg(sm, "--target", default="loihi", metavar="NAME|FILE",
         help="a neuromorphic cost table with core limits: a registered name or a .toml/.json table "
              "(docs/cost-tables.md)")
    _arg(sm, "--chips", type=int, metavar="N", default_text="no limit",
         help="chip budget: fail with what fits if the model needs more")
    _arg(sm, "--quantize", action="store_true", help="quantise weights to the target's precision")
    _arg(sm, "--neuron", metavar="NAME", default_text="none: the model's own",
         help="set this neuron at all four sites and calibrate thresholds on the text")
    _arg(sm, "--tokenizer", default="smollm2-135m", metavar="SPEC", help=tokenizer_help)
    _arg(sm, "--out", metavar="DIR", default_text="none: print only", help="write simulate.json and core_map.png here")
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
