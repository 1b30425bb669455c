"""Evaluation suites: named sets of zero-shot tasks, scored for several models side by side.

A suite is a list of entries ``(label, task, file)``, the file relative to a data folder the user
gives (``--suite-dir``). Two suites are built in:

* ``dev`` - development data a recipe may be tuned on: WikiText-2 valid, LAMBADA's development
  split (the original release), ARC-Easy/Challenge validation and ARC-Easy train, and the Mosaic
  Eval Gauntlet's COPA, Social IQa (2 choices), CommonsenseQA (4 choices) and WSC273 packagings;
* ``general`` - the held-out judge, the public benchmarks as papers report them (WikiText-2
  test, LAMBADA-OpenAI, PIQA, ARC test, HellaSwag, WinoGrande, BoolQ, OpenBookQA): never train
  or tune on these.

The folder layout each expects is :data:`SUITES`; ``--suite-task NAME=FILE`` adds or replaces an entry.
Every file is read and checked before any model runs. Results compare each model with a
reference (the teacher): for accuracies the share of the reference's margin above the task's
baseline that the model keeps, ``(model - baseline) / (reference - baseline)``; for perplexities
the ratio ``model / reference``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .scorer import Scorer
from .tasks import TASKS, Task, TaskFileError, load_task, lower_is_better, metrics_of, requests_of

SUITES = {
    "dev": [
        ("wikitext_valid", "wikitext", "wikitext-2-raw/valid.txt"),
        ("lambada_dev", "lambada_standard", "dev-tasks/lambada-dev/lambada_development_plain_text.txt"),
        ("arc_easy_val", "arc_easy", "arc/ARC-Easy-validation.jsonl"),
        ("arc_easy_train", "arc_easy", "dev-tasks/arc-train/ARC-Easy-train.jsonl"),
        ("arc_challenge_val", "arc_challenge", "arc/ARC-Challenge-validation.jsonl"),
        ("copa_gauntlet", "copa", "dev-tasks/copa/copa.jsonl"),
        ("siqa_gauntlet", "social_iqa", "dev-tasks/siqa/siqa.jsonl"),
        ("csqa_gauntlet", "commonsense_qa", "dev-tasks/commonsense_qa/commonsense_qa.jsonl"),
        ("wsc273_gauntlet", "wsc273", "dev-tasks/winograd_wsc/winograd_wsc.jsonl"),
    ],
    "general": [
        ("wikitext", "wikitext", "wikitext-2-raw/test.txt"),
        ("lambada_openai", "lambada_openai", "lambada_openai/test.jsonl"),
        ("piqa", "piqa", "piqa/validation.jsonl"),
        ("arc_easy", "arc_easy", "arc/ARC-Easy-test.jsonl"),
        ("arc_challenge", "arc_challenge", "arc/ARC-Challenge-test.jsonl"),
        ("hellaswag", "hellaswag", "hellaswag/validation.jsonl"),
        ("winogrande", "winogrande", "winogrande/validation.jsonl"),
        ("boolq", "boolq", "boolq/validation.jsonl"),
        ("openbookqa", "openbookqa", "openbookqa/test.jsonl"),
    ],
}


@dataclass
class SuiteEntry:
    label: str
    task: Task


def parse_task_option(spec: str) -> tuple[str, str, str]:
    """``"NAME=FILE"`` or ``"LABEL:NAME=FILE"`` -> (label, task name, file)."""
    if "=" not in spec:
        raise TaskFileError(f"--suite-task {spec!r}: expected NAME=FILE (NAME one of {', '.join(TASKS)})")
    name, path = spec.split("=", 1)
    label, _, task = name.rpartition(":")
    task = task.strip()
    if task not in TASKS:
        raise TaskFileError(f"--suite-task {spec!r}: unknown task {task!r}; known: {', '.join(TASKS)}")
    return (label.strip() or task), task, path


def load_suite(suite: str | None = None, suite_dir: str | Path | None = None, tasks: list[str] | None = None,
               limit: int | None = None) -> list[SuiteEntry]:
    """The suite's entries with their documents read (every file checked before returning).
    ``tasks``: ``NAME=FILE`` options added (or replacing the entry of the same label)."""
    specs: list[tuple[str, str, str]] = []
    if suite is not None:
        if suite not in SUITES:
            raise TaskFileError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
        if suite_dir is None:
            raise TaskFileError(f"suite {suite!r} needs --suite-dir DIR, the folder holding its files "
                                f"({', '.join(p for _, _, p in SUITES[suite])})")
        root = Path(suite_dir).expanduser()
        if not root.is_dir():
            raise TaskFileError(f"--suite-dir {root} is not a folder")
        specs = [(label, task, str(root / rel)) for label, task, rel in SUITES[suite]]
    for spec in tasks or []:
        label, task, path = parse_task_option(spec)
        specs = [s for s in specs if s[0] != label] + [(label, task, path)]
    if not specs:
        raise TaskFileError("no tasks: give --suite NAME with --suite-dir DIR, or --suite-task NAME=FILE")
    return [SuiteEntry(label, load_task(task, path, limit)) for label, task, path in specs]


def batching_for(model) -> dict:
    """Batch limits for scoring ``model`` where its parameters live: up to 256 requests and 32768
    input tokens per forward on a GPU, 32 and 4096 on a CPU (``evaluate_suite`` keywords)."""
    cuda = next(model.parameters()).device.type == "cuda"
    return {"batch_size": 256, "batch_tokens": 32768} if cuda else {"batch_size": 32, "batch_tokens": 4096}


def evaluate_suite(model, tokenizer, entries: list[SuiteEntry], max_length: int = 2048, batch_size: int = 32,
                   batch_tokens: int = 16384, context_tokens: int | None = None, progress: bool = False,
                   model_name: str = "model") -> dict:
    """``{label: metrics}`` of ``model`` on every entry (lm-eval definitions; see tasks.py)."""
    results = {}
    for i, entry in enumerate(entries, 1):  # progress: one bar per task, "model: label (i/n)"
        scorer = Scorer(model, tokenizer, max_length=max_length, batch_size=batch_size, batch_tokens=batch_tokens,
                        context_tokens=context_tokens, progress=progress,
                        desc=f"{model_name}: {entry.label} ({i}/{len(entries)})")
        reqs = requests_of(entry.task)
        out = scorer.loglikelihood_rolling(reqs) if entry.task.kind == "rolling" else scorer.loglikelihood(reqs)
        results[entry.label] = metrics_of(entry.task, out)
    return results


def describe(entries: list[SuiteEntry]) -> dict:
    """What was evaluated: per label the task, file, layout, documents, headline metric, baseline."""
    return {e.label: {"task": e.task.name, "file": e.task.source, "layout": e.task.layout, "docs": len(e.task.docs),
                      "headline": e.task.headline,
                      "baseline": None if math.isnan(e.task.baseline) else e.task.baseline}
            for e in entries}


def kept(value: float, reference: float, baseline: float | None, lower_is_better: bool) -> float | None:
    """Share of the reference's margin above the baseline that ``value`` keeps (accuracies), or
    ``value / reference`` (perplexities). None where the reference has no margin."""
    if lower_is_better:
        return value / reference if reference else None
    if baseline is None or reference - baseline <= 0:
        return None
    return (value - baseline) / (reference - baseline)


def compare(results: dict, info: dict, reference: str) -> dict:
    """``{model: {label: kept share or ratio}}`` against ``results[reference]`` (see :func:`kept`),
    plus ``mean_kept`` over the accuracy entries where the reference beats the baseline."""
    out = {}
    ref = results[reference]
    for name, res in results.items():
        row = {}
        for label, meta in info.items():
            h = meta["headline"]
            if label not in res or label not in ref:
                continue
            row[label] = kept(res[label][h], ref[label][h], meta["baseline"], lower_is_better(h))
        accs = [v for label, v in row.items() if v is not None and not lower_is_better(info[label]["headline"])]
        row["mean_kept"] = sum(accs) / len(accs) if accs else None
        out[name] = row
    return out


def render_suite_table(results: dict, info: dict, reference: str | None = None) -> str:
    """Markdown: one row per entry (headline metric and baseline), one column per model, and for
    each model after the reference its kept share / perplexity ratio."""
    models = list(results)
    reference = reference or models[0]
    cmp = compare(results, info, reference)
    others = [m for m in models if m != reference]
    head = ["task (metric)", "docs", "baseline"] + models + [f"{m} kept" for m in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v, h):
        if v is None:
            return "-"
        return f"{v:.2f}" if lower_is_better(h) else f"{100 * v:.1f}"

    for label, meta in info.items():
        h = meta["headline"]
        row = [f"{label} ({h})", str(meta["docs"]), "-" if meta["baseline"] is None else f"{100 * meta['baseline']:.1f}"]
        row += [cell(results[m].get(label, {}).get(h), h) for m in models]
        for m in others:
            k = cmp[m].get(label)
            row.append("-" if k is None else (f"{k:.2f}x" if lower_is_better(h) else f"{100 * k:.0f} %"))
        lines.append("| " + " | ".join(row) + " |")
    mean = ["mean kept (accuracy tasks)", "", ""] + [""] * len(models)
    mean += ["-" if cmp[m]["mean_kept"] is None else f"{100 * cmp[m]['mean_kept']:.0f} %" for m in others]
    lines.append("| " + " | ".join(mean) + " |")
    return "\n".join(lines)
