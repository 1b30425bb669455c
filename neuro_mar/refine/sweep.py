"""Neuron-swap sweeps (``neuro-mar sweep``): Stage 2 again and again from one Stage-1 model.

A runs file names the runs, each with overrides of Stage-2 options (:data:`SWEEP_FIELDS`, the
field names of a run's ``refine_config.json``)::

    {"runs": [{"name": "atmn-t4"},
              {"name": "atmn-t2", "neuron": "atmn", "neuron_options": {"T": 2}},
              {"name": "atmn-t4-rate", "rate_weight": 0.5, "description": "firing-rate penalty"},
              {"name": "binary", "neuron": "binary"}]}

Every run is :func:`~neuro_mar.refine.pipeline.run_refine` with ``from_stage1`` set to the sweep's
Stage-1 model and the common options (the command line's: preset, ``--config``, flags) with the
run's overrides, into its own refine run folder ``OUT/NAME/``: the same Stage-1 model, data, data
order (the seed) and budget for every run unless a run overrides a budget. A run's
``neuron_options`` replace the common ``--neuron-option`` (they are not merged). A finished run
(``student/`` and ``report.json`` written) is skipped and a started one resumed with ``--resume``,
so the same command continues a sweep. Ablations and the throughput check of a preset are not run.

Results, from every finished run of the runs file (also those another process ran into the same
``OUT``): ``OUT/sweep.csv`` and ``OUT/sweep.md`` (quality, KL and agreement on the held-out rows,
firing rates, synaptic operations against dense MACs, energy per token on every target the report
prices, wall time; the teacher and the Stage-1 model as reference rows) and the Pareto plot
``OUT/sweep_pareto.png`` / ``.pdf`` (quality against energy per token, one panel per target).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..io_utils import atomic_savefig, atomic_target, atomic_write_text, finite_or_none
from .clean import run_is_complete
from .pipeline import (RefineConfig, RefineError, RunLock, check_neurons, check_stage1_folder, config_changes,
                       option_flag, read_run_record, run_refine, validate_config)
from .trainer import TrainingDiverged

#: the RefineConfig fields a run of a sweep may set (Stage 2's); everything else is common to all runs
SWEEP_FIELDS = ("neuron", "neuron_options", "calib_percentile", "stage2_teacher", "train_2", "alpha", "beta",
                "gamma", "temperature", "features", "ce_weight", "rate_weight", "rate_target", "steps_2", "lr_2",
                "seconds_2")

#: what the sweep writes into OUT (a run may not take one of these names)
OUTPUTS = ("sweep.csv", "sweep.md", "sweep_pareto.png", "sweep_pareto.pdf")

#: a run's name, its folder under OUT
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

SITE_KINDS = ("mixer.in", "mixer.out", "mlp.in", "mlp.down")


class SweepError(RefineError):
    """A runs file or sweep option that cannot be run; the message names it and the fix."""


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its ``name`` (folder ``OUT/NAME``), ``overrides`` (RefineConfig fields
    of :data:`SWEEP_FIELDS`), an optional ``description``, and ``where`` it was read (for errors)."""

    name: str
    overrides: dict = field(default_factory=dict)
    description: str = ""
    where: str = ""


def _value_problem(key: str, value) -> str | None:
    """What a runs file's ``value`` for RefineConfig field ``key`` must be, None when it fits."""
    hint = typing.get_type_hints(RefineConfig)[key]
    integer = isinstance(value, int) and not isinstance(value, bool)
    if hint is int:
        return None if integer else "an integer"
    if hint is float:
        return None if integer or isinstance(value, float) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if hint is dict:
        return None if isinstance(value, dict) else 'a JSON object of neuron options, e.g. {"T": 2}'
    return None  # pragma: no cover - every field of SWEEP_FIELDS has one of the types above


def read_runs(path: str | Path) -> list[SweepRun]:
    """The runs of a runs file: ``{"runs": [{"name": NAME, FIELD: VALUE, ...}, ...]}`` (or the list
    alone), each run a unique name (letters, digits, ``.``, ``_``, ``-``), an optional
    ``description`` and values for :data:`SWEEP_FIELDS` of the right JSON type. :class:`SweepError`
    with one line naming the file, the run and the field otherwise."""
    import dataclasses
    import difflib

    p = Path(path).expanduser()
    where = f"--runs {path}"
    example = '{"runs": [{"name": "atmn-t2", "neuron": "atmn", "neuron_options": {"T": 2}}]}'
    if p.is_dir():
        raise SweepError(f"{where} is a folder; give the JSON file that lists the runs (docs/sweep.md)")
    if not p.is_file():
        raise SweepError(f"{where} does not exist; give a JSON file that lists the runs, such as "
                         "examples/sweep_neurons.json (format: docs/sweep.md)")
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise SweepError(f"{where} is not UTF-8 text, so not a runs file") from None
    except json.JSONDecodeError as err:
        raise SweepError(f"{where} is not JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"a runs file looks like {example}") from None
    if isinstance(data, dict):
        extra = sorted(set(data) - {"runs", "description"})
        if extra or "runs" not in data:
            what = f"unknown key(s) {', '.join(map(repr, extra))}" if extra else 'no "runs" key'
            raise SweepError(f'{where}: {what}; a runs file is an object with a "runs" list (and an optional '
                             f'"description"), e.g. {example}')
        data = data["runs"]
    if not isinstance(data, list):
        raise SweepError(f"{where}: \"runs\" holds a JSON {type(data).__name__}, not a list of runs, e.g. {example}")
    if not data:
        raise SweepError(f"{where} lists no runs; add at least one, e.g. {example}")
    fields = {f.name for f in dataclasses.fields(RefineConfig)}
    runs, seen = [], set()
    for i, entry in enumerate(data, 1):
        if not isinstance(entry, dict):
            raise SweepError(f"{where}: run {i} is a JSON {type(entry).__name__}, not an object with a \"name\"")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in OUTPUTS:
            raise SweepError(f"{where}: run {i} has {'no name' if name is None else f'the name {name!r}'}; each run "
                             "needs a \"name\" of 1 to 64 letters, digits, '.', '_' or '-' (its folder under --out), "
                             f"not one of {', '.join(OUTPUTS)}")
        if name in seen:
            raise SweepError(f"{where}: two runs are named {name!r}; each run needs its own name (its folder)")
        seen.add(name)
        at = f"{where}: run {name!r}"
        description = entry.get("description", "")
        if not isinstance(description, str):
            raise SweepError(f"{at}: \"description\" must be a string, got {description!r}")
        overrides = {}
        for key, value in entry.items():
            if key in ("name", "description"):
                continue
            if key not in fields:
                close = difflib.get_close_matches(key.replace("-", "_").lstrip("_"), SWEEP_FIELDS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise SweepError(f"{at}: unknown option {key!r}; {hint}a run sets any of {', '.join(SWEEP_FIELDS)} "
                                 "(field names as in a run's refine_config.json)")
            if key not in SWEEP_FIELDS:
                raise SweepError(f"{at}: {key!r} is not a Stage-2 option, so every run of a sweep shares it; give it "
                                 f"once on the command line ({option_flag(key)}) or in --config; a run sets any of "
                                 f"{', '.join(SWEEP_FIELDS)}")
            problem = _value_problem(key, value)
            if problem:
                raise SweepError(f"{at}: {key!r} must be {problem}, got {value!r}")
            overrides[key] = value
        runs.append(SweepRun(name, overrides, description, at))
    return runs


def run_config(base: RefineConfig, run: SweepRun) -> RefineConfig:
    """``base`` with ``run``'s overrides, checked (ranges, neuron and its options) as ``refine``
    checks its own; :class:`SweepError` naming the run otherwise."""
    cfg = replace(base, **run.overrides)
    try:
        validate_config(cfg)
        check_neurons(cfg)
    except RefineError as err:
        raise SweepError(f"{run.where or 'run ' + repr(run.name)}: {err}") from None
    return cfg


def _log(msg: str) -> None:
    print(f"sweep: {msg}", file=sys.stderr, flush=True)


def run_sweep(base: RefineConfig, runs: list[SweepRun], out: str | Path, only: list[str] | None = None,
              progress: bool = True) -> dict:
    """Run ``runs`` (those named in ``only``, if given) one after the other into ``out/NAME/``
    from ``base.from_stage1``, skipping finished runs and resuming started ones, then write the
    summary (:func:`write_summary`) of every finished run. Everything that can be checked without
    loading a model (every run's options and neuron, the Stage-1 folder, runs started with other
    options) is checked before the first run starts. A run that diverges is reported in
    ``"failed"`` and the sweep goes on. Returns :func:`write_summary`'s dict plus ``"failed"``
    (``["NAME: reason"]``) and ``"ran"`` (names of the runs trained or resumed now)."""
    out = Path(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SweepError("neuro-mar sweep runs one process per GPU, not under torchrun: start one sweep per GPU "
                         "(CUDA_VISIBLE_DEVICES=N) with its own --only subset (docs/sweep.md)")
    if base.from_stage1 is None:
        raise SweepError("a sweep needs --from-stage1 DIR, the Stage-1 model every run starts from (RUN/stage1)")
    base = replace(base, ablation_neurons=[], throughput_steps=0)
    names = [r.name for r in runs]
    if only is not None:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SweepError(f"--only: no run named {', '.join(map(repr, unknown))} in the runs file (its runs: "
                             f"{', '.join(names)})")
    selected = [r for r in runs if only is None or r.name in only]
    configs = {r.name: run_config(base, r) for r in runs}
    check_stage1_folder(base.from_stage1)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} exists and is not a folder; choose another path")
    for r in selected:  # refused now, not after the runs before them have trained
        folder = out / r.name
        record = folder / "refine_config.json"
        if record.is_file():
            changed = config_changes(read_run_record(record), configs[r.name])
            if changed:
                raise SweepError(f"{r.where}: {folder} was started with other options ({'; '.join(changed)}); put "
                                 "back the options it was started with (its refine_config.json), or give the run a "
                                 "new name")
        elif folder.is_dir() and any(p.name != RunLock.NAME for p in folder.iterdir()):
            raise SweepError(f"{r.where}: {folder} holds files but no refine_config.json, so it is not a run this "
                             "sweep can continue; move it away or give the run another name")
    created = not out.exists()
    failed, ran = [], []
    try:
        for i, r in enumerate(selected, 1):
            folder = out / r.name
            if run_is_complete(folder):
                _log(f"{r.name} ({i}/{len(selected)}) is finished, skipped")
                continue
            resume = folder.is_dir() and any(folder.iterdir())
            _log(f"{r.name} ({i}/{len(selected)}): {'resuming' if resume else 'starting'} into {folder}")
            try:
                run_refine(configs[r.name], folder, resume=resume, progress=progress)
                ran.append(r.name)
            except TrainingDiverged as err:
                failed.append(f"{r.name}: {err}")
                _log(f"{r.name} failed: {err}")
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a sweep refused at its first run leaves nothing behind
        raise
    result = write_summary(out, runs, base, failed=[f.split(":", 1)[0] for f in failed])
    result.update(failed=failed, ran=ran)
    return result


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def _synaptic_counts(student_dir: Path, firing: dict) -> tuple[float, float]:
    """(synaptic accumulates, dense MACs) per token of the four spiking projections of every layer
    of the saved student: a site of firing rate r (non-zero spikes / (elements x T)) and T
    micro-steps feeding a d_in x d_out projection triggers r x T x d_in x d_out ACs per token
    (the cost model's count, ``hardware_models.counting``), where a dense input costs d_in x d_out
    MACs."""
    import torch

    from ..hardware_models.counting import site_fanout
    from ..models import MARConfig, MARForCausalLM

    config = MARConfig.from_pretrained(student_dir)
    with torch.device("meta"):  # the sites' neurons and T, without weights
        model = MARForCausalLM(config)
    fan = site_fanout(config)
    acs = macs = 0.0
    for layer, kind, _, site in model.spike_sites():
        d_in, d_out = fan[kind]
        macs += d_in * d_out
        if not site.is_dense:
            acs += (firing.get(f"L{layer:02d}.{kind}") or 0.0) * site.T * d_in * d_out
    return acs, macs


def _suite_values(report: dict, model: str) -> dict:
    """``{"suite <label> (<metric>)": value, "suite mean kept": share}`` of ``model`` in a report."""
    from ..evaluation.suite import compare

    suite = report.get("suite") or {}
    results, info = suite.get("results") or {}, suite.get("tasks") or {}
    if model not in results:
        return {}
    row = {f"suite {label} ({meta['headline']})": results[model].get(label, {}).get(meta["headline"])
           for label, meta in info.items()}
    if "teacher" in results:
        row["suite mean kept"] = compare({"teacher": results["teacher"], model: results[model]}, info,
                                         "teacher")[model]["mean_kept"]
    return row


def _run_row(run: SweepRun, folder: Path) -> dict:
    """The summary row of a finished run (from its report.json, refine_config.json and student)."""
    report = json.loads((folder / "report.json").read_text())
    cfg = json.loads((folder / "refine_config.json").read_text())
    m = report["models"]["spiking_student"]
    firing = report.get("firing_rates") or {}
    acs, macs = _synaptic_counts(folder / "student", firing)
    row = {"name": run.name, "kind": "run", "status": "finished", "neuron": cfg["neuron"],
           "neuron_options": json.dumps(cfg.get("neuron_options") or {}, sort_keys=True),
           "rate_weight": cfg.get("rate_weight", 0.0), "rate_target": cfg.get("rate_target", 0.0),
           "steps_2": cfg.get("steps_2"), "lr_2": cfg.get("lr_2"), "seconds_2": cfg.get("seconds_2")}
    row.update(_suite_values(report, "spiking_student"))
    row.update({"heldout_perplexity": m.get("heldout_perplexity"), "kl_to_teacher": m.get("kl_to_teacher"),
                "top1_agreement": m.get("top1_agreement"), "mean_firing_rate": report.get("mean_firing_rate")})
    for kind in SITE_KINDS:
        rates = [v for k, v in firing.items() if k.endswith("." + kind) and v is not None]
        row[f"rate {kind}"] = sum(rates) / len(rates) if rates else None
    row.update({"ACs per token": acs, "dense MACs per token": macs, "ACs / dense MAC": acs / macs if macs else None})
    energy = report.get("energy_per_token") or {}
    first = next(iter(energy.values()), {})
    for target, t in first.items():
        row[f"pJ/token {target}"] = None if t.get("student_J_per_token") is None else t["student_J_per_token"] * 1e12
        row[f"x teacher {target}"] = t.get("ratio_teacher")
    row.update({"stage2_seconds": (report.get("stage_seconds") or {}).get("stage2"),
                "wall_seconds": report.get("wall_seconds"), "description": run.description})
    return row


def _reference_rows(report: dict) -> list[dict]:
    """The teacher and the Stage-1 model as rows, from a finished run's report (the same in every
    run of a sweep: one teacher, one Stage-1 model, the same held-out rows)."""
    energy = report.get("energy_per_token") or {}
    first = next(iter(energy.values()), {})
    rows = []
    for name, model, key in (("teacher", "teacher", "teacher_J_per_token"),
                             ("stage1", "stage1_ssm", "stage1_J_per_token")):
        m = report["models"].get(model, {})
        row = {"name": name, "kind": "reference", "status": "reference", "neuron": "dense" if name == "stage1" else "-"}
        row.update(_suite_values(report, model))
        if name == "teacher" and "suite mean kept" in row:
            row["suite mean kept"] = 1.0
        row.update({"heldout_perplexity": m.get("heldout_perplexity"), "kl_to_teacher": m.get("kl_to_teacher"),
                    "top1_agreement": m.get("top1_agreement", 1.0 if name == "teacher" else None)})
        for target, t in first.items():
            row[f"pJ/token {target}"] = None if t.get(key) is None else t[key] * 1e12
        rows.append(row)
    return rows


def _quality(rows: list[dict], suite_name: str | None) -> tuple[str, str, float]:
    """(column, axis label, scale to the axis unit) of the quality the Pareto plot uses: the
    suite's mean kept share of the teacher's margin when every finished run has one, else the
    top-1 agreement with the teacher on the held-out rows."""
    runs = [r for r in rows if r["kind"] == "run" and r["status"] == "finished"]
    if runs and all(r.get("suite mean kept") is not None for r in runs):
        return ("suite mean kept", f"{suite_name or 'zero-shot'} suite: mean share of the teacher's margin above "
                                   "the baseline kept (%)", 100.0)
    return "top1_agreement", "top-1 agreement with the teacher on the held-out rows (%)", 100.0


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(energy, quality)`` points (less energy and more quality are
    better; a point is dominated when another is at least as good in both and better in one),
    sorted by energy."""
    front = []
    for i, (e, q) in enumerate(points):
        dominated = any((e2 <= e and q2 >= q) and (e2 < e or q2 > q) for j, (e2, q2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _usable(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plot(rows: list[dict], targets: list[str], quality: tuple[str, str, float], context, png: Path, pdf: Path) -> dict:
    """The Pareto plot: one panel per target, quality against energy per token (log scale), one
    labelled point per finished run, the teacher and the Stage-1 model as reference marks, the
    non-dominated front of the runs as a step line. Returns ``{target: [names on the front]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    column, label, scale = quality
    runs = [r for r in rows if r["kind"] == "run" and r["status"] == "finished"]
    refs = {r["name"]: r for r in rows if r["kind"] == "reference"}
    cols = min(3, max(1, len(targets)))
    nrows = max(1, math.ceil(len(targets) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    fronts = {}
    for ax, target in zip(axes.flat, targets):
        key = f"pJ/token {target}"
        pts = [(r[key], r[column] * scale, r["name"]) for r in runs if _usable(r.get(key)) and r[key] > 0
               and _usable(r.get(column))]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3, label="sweep run")
            for i, (e, q, name) in enumerate(sorted(pts)):  # labels of neighbours above and below in turn
                ax.annotate(name, (e, q), textcoords="offset points", xytext=(4, 4 if i % 2 == 0 else -11), fontsize=7)
            front = pareto_front([(p[0], p[1]) for p in pts])
            fronts[target] = [pts[i][2] for i in front]
            ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="tab:blue",
                    linestyle="--", linewidth=1, alpha=0.7, label="non-dominated front")
        for name, marker, colour, text in (("teacher", "*", "tab:red", "teacher (Transformer)"),
                                           ("stage1", "s", "black", "Stage-1 model (dense SSM)")):
            r = refs.get(name, {})
            e = r.get(key)
            q = r.get(column)
            if _usable(e) and e > 0 and _usable(q):
                ax.scatter([e], [q * scale], marker=marker, s=120 if marker == "*" else 50, color=colour, zorder=4,
                           label=text)
        shown = [c for line in ax.collections for c in line.get_offsets()[:, 0]]
        log = bool(shown) and max(shown) / min(shown) > 10  # a narrow range reads better on a linear axis
        if log:
            ax.set_xscale("log")
        else:  # few ticks, in powers of ten past 10^4, so the labels never run into each other
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.set_xlabel(f"energy per token on {target} (pJ{', log scale' if log else ''})")
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{target}" + (f", context {context}" if context else ""), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(targets):]:
        ax.set_visible(False)
    fig.suptitle("Neuron sweep: quality against estimated energy per token (up and to the left is better)",
                 fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, png, dpi=110)
    with atomic_target(pdf, suffix=".pdf") as tmp:
        fig.savefig(tmp, format="pdf")
    plt.close(fig)
    return fronts


def _cell(v, col: str) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if not math.isfinite(v):
        return "-"
    if col.startswith(("pJ/token", "ACs per", "dense MACs")):
        return f"{v:.4g}"
    if col.startswith("x teacher"):
        return f"{v:.2f}"
    if col.endswith("seconds"):
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    if col == "suite mean kept":
        return f"{100 * v:.0f} %"
    if col.startswith("suite "):  # "suite LABEL (METRIC)": accuracies in %, perplexities as they are
        from ..evaluation.tasks import lower_is_better

        return f"{v:.2f}" if lower_is_better(col[col.rindex("(") + 1:-1]) else f"{100 * v:.1f}"
    if col == "kl_to_teacher":
        return f"{v:.4f}"
    if col == "top1_agreement":
        return f"{v:.3f}"
    if col.startswith("rate") or col == "mean_firing_rate" or col == "ACs / dense MAC":
        return f"{v:.3f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _markdown(rows: list[dict], columns: list[str], base: RefineConfig, runs: list[SweepRun], context, quality,
              fronts: dict) -> str:
    finished = [r for r in rows if r["kind"] == "run" and r["status"] == "finished"]
    head = [f"# Neuron sweep", "",
            f"Stage-1 model `{base.from_stage1}`, teacher `{base.teacher}`: {len(finished)} of {len(runs)} run(s) "
            f"finished. Held-out rows: KL (nats/token) and top-1 agreement with the teacher; suite scores in % "
            f"(perplexities as they are); firing rates are non-zero spikes / (elements x T); *ACs / dense MAC* is "
            f"the synaptic accumulates of the four spiking projections of every layer per dense multiply-accumulate "
            f"they replace; energy is the cost model's estimate per token"
            + (f" at context {context} (the students' does not depend on it, the teacher's grows with it)"
               if context else "") + ".", ""]
    shown = [c for c in columns if c not in ("kind", "description", "dense MACs per token", "steps_2", "lr_2",
                                             "seconds_2") and not c.startswith("x teacher")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        cells = [(f"*{r['name']}*" if r["kind"] == "reference" else r["name"]) if c == "name"
                 else _cell(r.get(c), c) for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    column, label, _ = quality
    tail = ["", f"Pareto plot `sweep_pareto.png` (and `.pdf`): {label} against energy per token, one panel per "
                "target; a run is on the front when no other run has at least its quality for at most its energy.", ""]
    for target, names in fronts.items():
        tail.append(f"- front on {target}: {', '.join(names)}")
    described = [r for r in runs if r.description]
    if described:
        tail += ["", "Runs:", ""] + [f"- `{r.name}`: {r.description}" for r in described]
    tail += ["", "Every run's own report: `NAME/report.md`; all columns: `sweep.csv`.", ""]
    return "\n".join(head + lines + tail)


def write_summary(out: str | Path, runs: list[SweepRun], base: RefineConfig, failed: list[str] = ()) -> dict:
    """Write ``sweep.csv``, ``sweep.md`` and ``sweep_pareto.png``/``.pdf`` into ``out`` from every
    finished run of ``runs`` (unfinished runs get a status row; ``failed``: names of runs that
    diverged now). Returns ``{"rows", "columns", "markdown", "fronts", "paths"}``."""
    out = Path(out)
    rows, reference, sources = [], None, {}
    for r in runs:
        folder = out / r.name
        if run_is_complete(folder):
            row = _run_row(r, folder)
            if reference is None:
                reference = json.loads((folder / "report.json").read_text())
            try:  # what the run trained from: one Stage-1 model and one set of rows for the whole sweep
                ident = json.loads((folder / "run_identity.json").read_text())
                sources.setdefault((ident.get("stage1_weights"), ident.get("training_rows")), []).append(r.name)
            except (OSError, ValueError):
                pass
        else:
            row = {"name": r.name, "kind": "run", "status": "diverged" if r.name in failed else "not finished",
                   "neuron": r.overrides.get("neuron", base.neuron), "description": r.description}
        rows.append(row)
    refs = _reference_rows(reference) if reference is not None else []
    rows = refs + rows
    columns = []
    for r in sorted(rows, key=lambda r: r["status"] != "finished"):  # a finished run's order first
        columns += [k for k in r if k not in columns]
    energy = (reference or {}).get("energy_per_token") or {}
    context = next(iter(energy), None)
    targets = list(energy.get(context, {})) if context is not None else []
    quality = _quality(rows, base.eval_suite)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "sweep.csv", "md": out / "sweep.md", "png": out / "sweep_pareto.png",
             "pdf": out / "sweep_pareto.pdf"}
    fronts = _plot(rows, targets, quality, context, paths["png"], paths["pdf"])
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in finite_or_none(r).items()})
    atomic_write_text(paths["csv"], buf.getvalue())
    md = _markdown(rows, columns, base, runs, context, quality, fronts)
    if len(sources) > 1:  # e.g. teacher text sampled anew (not from the cache) by processes on other machines
        groups = "; ".join(", ".join(names) for names in sources.values())
        md += (f"\nWarning: the finished runs did not all train from the same Stage-1 model and rows "
               f"(run_identity.json differs between the groups {groups}); their numbers are not a like-for-like "
               "comparison.\n")
    atomic_write_text(paths["md"], md)
    return {"rows": rows, "columns": columns, "markdown": md, "fronts": fronts, "paths": paths}
