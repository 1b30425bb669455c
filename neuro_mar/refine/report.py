"""The refinement report: report.json, report.md and PNG plots, written atomically."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..io_utils import atomic_savefig, atomic_write_text, finite_or_none
from .evaluate import agreement, perplexity


def _plots(out: Path, firing: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        stages = sorted({r["stage"] for r in recs}, key=lambda s: [r["stage"] for r in recs].index(s))
        fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3), squeeze=False)
        for ax, st in zip(axes[0], stages):
            rs = [r for r in recs if r["stage"] == st]
            ax.plot([r["step"] for r in rs], [r["loss"] for r in rs])
            ax.set_title(st, fontsize=9)
            ax.set_xlabel("step")
            ax.set_yscale("log")
        axes[0, 0].set_ylabel("loss")
        fig.tight_layout()
        p = out / "loss_curves.png"
        atomic_savefig(fig, p, dpi=100)
        plt.close(fig)
        paths.append(p.name)
    if firing:
        kinds = ["mixer.in", "mixer.out", "mlp.in", "mlp.down"]
        layers = sorted({int(k[1:3]) for k in firing})
        fig, ax = plt.subplots(figsize=(8, 3))
        for kind in kinds:
            ax.plot(layers, [firing.get(f"L{l:02d}.{kind}", float("nan")) for l in layers], marker="o", ms=3, label=kind)
        ax.set_xlabel("layer")
        ax.set_ylabel("firing rate")
        ax.set_title("firing rate per layer and site (non-zero spikes / (elements x T))", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "firing_rates.png"
        atomic_savefig(fig, p, dpi=100)
        plt.close(fig)
        paths.append(p.name)
    return paths


def _energy_rows(model, activity, contexts) -> dict:
    from ..hardware_models import estimate_energy

    energy = {}
    for ctx in contexts:
        rep = estimate_energy(model, activity=activity, context=int(ctx))
        energy[str(ctx)] = {name: {k: t[k] for k in ("student_J_per_token", "stage1_J_per_token", "teacher_J_per_token",
                                                     "ratio_teacher", "ratio_stage1", "decode_ratio_teacher")}
                            for name, t in rep.targets.items()}
    return energy


def _spiking_summary(model, held, contexts) -> tuple[dict, float, dict]:
    """(firing rate per layer and site, their mean, energy rows by context) of a spiking model,
    from its site activity on the held-out rows."""
    from ..hardware_models.counting import measure_site_activity

    activity = measure_site_activity(model, [held])
    firing = {f"L{k[0]:02d}.{k[1]}": v["firing_rate"] for k, v in activity.items() if isinstance(k, tuple)}
    return firing, sum(firing.values()) / max(1, len(firing)), _energy_rows(model, activity, contexts)


def _guarded(rows: dict, key: str, fn) -> None:
    """rows.update(fn()); an exception is recorded under ``key + "_error"`` and warned about instead
    of raised: the report of a long run (whose weights may live on a machine that is given back)
    is written whatever one evaluation does."""
    try:
        rows.update(fn())
    except Exception as err:  # noqa: BLE001 - recorded in the report, see docstring
        import warnings

        rows[f"{key}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        warnings.warn(f"evaluation {key!r} failed: {rows[f'{key}_error']}", stacklevel=2)


def _extended_eval(cfg, models: dict, teacher, tok, progress: bool = False) -> tuple[dict, dict]:
    """Perplexity, KL and agreement on ``cfg.eval_data`` and zero-shot accuracy on ``cfg.eval_tasks``
    for every model; returns (per-model rows, description of what was evaluated)."""
    from .data import clean_documents, read_texts, tokenize_and_pack
    from .evaluate import load_multiple_choice, score_multiple_choice

    rows = {name: {} for name in models}
    info = {}
    if cfg.eval_data:
        ev = tokenize_and_pack(clean_documents(read_texts(cfg.eval_data, cfg.text_field), cfg.detokenize), tok, cfg.seq_len,
                               cfg.eval_max_tokens if cfg.eval_max_tokens > 0 else None)
        info["eval_data"] = {"file": str(cfg.eval_data), "tokens": int(ev.numel()), "seq_len": cfg.seq_len}
        for name, m in models.items():
            bar = progress and f"{name}: --eval-data"
            _guarded(rows[name], "eval_perplexity",
                     lambda m=m, bar=bar: {"eval_perplexity": perplexity(m, ev, progress=bar)})
            if name != "teacher":
                _guarded(rows[name], "eval_agreement",
                         lambda m=m, bar=bar: {f"eval_{k}": v for k, v in agreement(m, teacher, ev, progress=bar).items()})
    for path in cfg.eval_tasks:
        task = Path(path).stem
        items = load_multiple_choice(path)
        info.setdefault("tasks", {})[task] = {"file": str(path), "items": len(items)}
        for name, m in models.items():
            def score(m=m, task=task, items=items):
                r = score_multiple_choice(m, tok, items, progress=progress)
                return {f"{task}_acc": r["acc"], f"{task}_acc_norm": r["acc_norm"]}
            _guarded(rows[name], task, score)
    return rows, info


def suite_report(cfg, models: dict, tok, progress: bool = False) -> dict | None:
    """The zero-shot suite (``cfg.eval_suite`` / ``eval_suite_tasks``) for every model:
    ``{"tasks": describe(...), "results": {model: {label: metrics}}, "kept": compare(...)}``
    with the teacher as reference; None when no suite is configured. A model whose evaluation
    fails is recorded under ``errors`` (the report is written whatever happens)."""
    from ..evaluation import batching_for, compare, describe, evaluate_suite
    from .pipeline import suite_entries

    entries = suite_entries(cfg)
    if not entries:
        return None
    results, errors = {}, {}
    for name, m in models.items():
        try:
            results[name] = evaluate_suite(m, tok, entries, max_length=cfg.eval_max_length, progress=progress,
                                           model_name=name, **batching_for(m))
        except Exception as err:  # noqa: BLE001 - recorded, see docstring
            errors[name] = f"{type(err).__name__}: {str(err)[:300]}"
    info = describe(entries)
    out = {"tasks": info, "results": results, "max_length": cfg.eval_max_length,
           "limit": cfg.eval_limit or None, "errors": errors}
    if "teacher" in results:
        out["kept"] = compare(results, info, "teacher")
    return out


def build_report(cfg, out: Path, teacher, stage1, before, student, tok, held, timings, tokens, wall,
                 ablations: dict | None = None, throughput: dict | None = None, progress: bool = False) -> dict:
    ablations = ablations or {}
    models = {"teacher": teacher, "stage1_ssm": stage1, "spiking_before_stage2": before, "spiking_student": student}
    models.update({f"ablation_{name}": m for name, m in ablations.items()})
    rows = {}
    for name, m in models.items():
        bar = progress and f"{name}: held-out rows"
        r = {"heldout_perplexity": perplexity(m, held, progress=bar)}
        if name != "teacher":
            r.update(agreement(m, teacher, held, progress=bar))
        rows[name] = r
    suite = suite_report(cfg, {k: v for k, v in models.items() if k != "spiking_before_stage2"}, tok, progress)
    extra, eval_info = _extended_eval(cfg, models, teacher, tok, progress)
    for name, r in extra.items():
        rows[name].update(r)
    firing, mean_rate, energy = _spiking_summary(student, held, cfg.energy_contexts)
    ablation_info = {}
    for name, m in ablations.items():
        _, rate, e = _spiking_summary(m, held, cfg.energy_contexts)
        ablation_info[name] = {"mean_firing_rate": rate, "energy_per_token": e}
    plots = _plots(out, firing)
    report = {"teacher": cfg.teacher, "neuron": cfg.neuron, "suite": suite, "models": rows, "evaluation": eval_info,
              "firing_rates": firing, "mean_firing_rate": mean_rate, "energy_per_token": energy,
              "ablations": ablation_info, "throughput": throughput,
              "stage_seconds": timings, "stage_tokens": tokens, "wall_seconds": wall,
              "heldout_tokens": int(held.numel()), "plots": plots,
              "closer_to_teacher_after_stage2": (rows["spiking_student"]["kl_to_teacher"]
                                                 < rows["spiking_before_stage2"]["kl_to_teacher"]
                                                 and rows["spiking_student"]["top1_agreement"]
                                                 >= rows["spiking_before_stage2"]["top1_agreement"])}
    atomic_write_text(out / "report.json", json.dumps(finite_or_none(report), indent=2, allow_nan=False))
    atomic_write_text(out / "report.md", render_markdown(report))
    for folder, which in (("stage1", "stage1_ssm"), ("student", "spiking_student")):
        if (out / folder / "config.json").is_file():
            atomic_write_text(out / folder / "README.md", model_card(report, cfg, which, folder))
    return report


#: what each saved model of a run is, in a model card's words
_CARD_TITLES = {"stage1_ssm": "Stage-1 SSM (attention replaced by Discrete Mamba-2, dense activations)",
                "spiking_student": "spiking student (Discrete Mamba-2 with ternary ATMN spike sites)"}


def model_card(r: dict, cfg, which: str, folder: str) -> str:
    """The README.md (Hugging Face model card) of one saved model of a run: metadata, how to load
    and evaluate it, the recipe, its zero-shot suite and held-out numbers against the teacher, and
    for the student its firing rate and estimated energy."""
    from ..teachers import TEACHER_SOURCES

    base = TEACHER_SOURCES.get(cfg.teacher, cfg.teacher if "/" in cfg.teacher and not Path(cfg.teacher).exists() else None)
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation",
            "tags: [neuro-mar, state-space-model, mamba2, distillation"
            + (", spiking-neural-network]" if which == "spiking_student" else "]")]
    if base:
        meta.append(f"base_model: {base}")
    meta.append("---")
    m = r["models"].get(which, {})
    t = r["models"].get("teacher", {})
    lines = meta + ["", f"# {_CARD_TITLES[which]} refined from `{cfg.teacher}`", "",
                    "Made by `neuro-mar refine` (the neuro-mar package; MAR, "
                    "arXiv 2601.21503): the teacher's attention replaced by a linear-time Discrete Mamba-2 mixer "
                    "distilled from it (Stage 1)" + (", then ATMN spiking neurons at the inputs of the four big "
                    "projections of every layer, distilled with SBDS (Stage 2)." if which == "spiking_student"
                                                  else "."), "",
                    "## Use", "", "```python",
                    "from transformers import AutoModelForCausalLM, AutoTokenizer  # needs `pip install neuro-mar`",
                    f'model = AutoModelForCausalLM.from_pretrained("{folder}", trust_remote_code=True)',
                    f'tok = AutoTokenizer.from_pretrained("{folder}")', "```", "",
                    f"`neuro-mar eval {folder} --suite dev --suite-dir DATA` scores it with lm-evaluation-harness "
                    f"task definitions; `lm_eval --model hf --model_args pretrained={folder},trust_remote_code=True` "
                    "works as for any causal LM. A padded batch (`attention_mask`) gives each row what it gives "
                    "alone; generation keeps a constant-size recurrent state instead of a KV cache.", "",
                    "## Recipe", "",
                    f"Teacher `{cfg.teacher}`; data {', '.join(f'`{Path(d).name}`' for d in cfg.data) or 'teacher samples'}"
                    + (f" + {cfg.generated_tokens} teacher-sampled tokens" if cfg.data and cfg.mix_generated else "")
                    + f"; {cfg.seq_len}-token sequences, {cfg.micro_batch * cfg.grad_accum} per step; mixer "
                    f"initialisation `dt_init={cfg.dt_init}`, `ssm_input_gain={cfg.ssm_input_gain}`. Stage tokens: "
                    + ", ".join(f"{k} {v:,}" for k, v in r["stage_tokens"].items()
                                if which == "spiking_student" or k.startswith("stage1")) + ".", ""]
    if which == "spiking_student":
        opts = f" (options {json.dumps(cfg.neuron_options)})" if cfg.neuron_options else ""
        lines += [f"Neuron `{cfg.neuron}`{opts} at the four sites, thresholds calibrated at "
                  f"the {cfg.calib_percentile}th percentile; SBDS alpha {cfg.alpha} (forward KL), beta {cfg.beta} "
                  f"(reverse KL), gamma {cfg.gamma} (pre-norm hidden states), temperature {cfg.temperature}, from "
                  f"the {'Stage-1 model' if cfg.stage2_teacher == 'stage1' else 'teacher'}.", ""]
    suite = r.get("suite") or {}
    if suite.get("results") and which in suite["results"]:
        from ..evaluation import render_suite_table

        keep = {k: v for k, v in suite["results"].items() if k in ("teacher", which)}
        lines += ["## Zero-shot suite", "", "Accuracies in %; *kept*: the share of the teacher's margin above the "
                  "baseline, or the perplexity ratio to the teacher.", "",
                  render_suite_table(keep, suite["tasks"], "teacher" if "teacher" in keep else None), ""]
    lines += ["## Held-out split of the training data", "", "| model | perplexity | KL to teacher | top-1 agreement |",
              "|---|---|---|---|", f"| teacher | {_fmt(t.get('heldout_perplexity'), '.2f')} | - | - |",
              f"| this model | {_fmt(m.get('heldout_perplexity'), '.2f')} | {_fmt(m.get('kl_to_teacher'), '.4f')} | "
              f"{_fmt(m.get('top1_agreement'), '.3f')} |", ""]
    if which == "spiking_student":
        lines += ["## Spikes and energy", "", f"Mean firing rate {_fmt(r.get('mean_firing_rate'), '.3f')} (spikes per "
                  "input element and micro-step). Estimated energy per token, teacher / this model (counted "
                  "operations at sourced per-operation costs, not a measurement):", ""]
        for ctx, targets in (r.get("energy_per_token") or {}).items():
            lines.append(f"- context {ctx}: " + ", ".join(f"{name} {tt['ratio_teacher']:.2f}x"
                                                           for name, tt in targets.items()))
        lines.append("")
    lines += ["## Limitations", "", "Distilled on a small corpus within a fixed time budget: it keeps part of the "
              "teacher's ability (the tables above), and inherits the teacher's biases and licence.", ""]
    return "\n".join(lines)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render_markdown(r: dict) -> str:
    lines = [f"# MAR refinement report", "",
             f"Teacher `{r['teacher']}`, neuron `{r['neuron']}`, held-out tokens {r['heldout_tokens']}, "
             f"wall time {r['wall_seconds']:.0f} s.", ""]
    suite = r.get("suite")
    if suite and suite.get("results"):
        from ..evaluation import render_suite_table

        lines += ["Zero-shot suite (lm-evaluation-harness definitions; accuracies in %, baseline = always the "
                  "most frequent answer position; *kept* = share of the teacher's margin above the baseline, "
                  "or the perplexity ratio to the teacher)"
                  + (f", first {suite['limit']} documents per task" if suite.get("limit") else "") + ":", "",
                  render_suite_table(suite["results"], suite["tasks"], "teacher" if "teacher" in suite["results"]
                                     else None), ""]
        for name, err in (suite.get("errors") or {}).items():
            lines += [f"Suite evaluation of {name} failed: {err}", ""]
    lines += ["Held-out split of the training data:", "",
              "| model | held-out perplexity | KL to teacher (nats/token) | top-1 agreement |", "|---|---|---|---|"]
    for name, m in r["models"].items():
        lines.append(f"| {name} | {m['heldout_perplexity']:.2f} | {_fmt(m.get('kl_to_teacher'), '.4f')} | "
                     f"{_fmt(m.get('top1_agreement'), '.3f')} |")
    ev = r.get("evaluation") or {}
    if ev:
        tasks = list(ev.get("tasks", {}))
        head = ["model"]
        if "eval_data" in ev:
            head += ["eval perplexity", "eval KL", "eval agreement"]
        for t in tasks:
            head += [f"{t} acc", f"{t} acc_norm"]
        lines += ["", "Evaluation" + (f" on `{ev['eval_data']['file']}` ({ev['eval_data']['tokens']} tokens)"
                                      if "eval_data" in ev else "")
                  + ("; zero-shot: " + ", ".join(f"{t} ({ev['tasks'][t]['items']} items)" for t in tasks) if tasks else "")
                  + ":", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, m in r["models"].items():
            cells = [name]
            if "eval_data" in ev:
                cells += [_fmt(m.get("eval_perplexity"), ".2f"), _fmt(m.get("eval_kl_to_teacher"), ".4f"),
                          _fmt(m.get("eval_top1_agreement"), ".3f")]
            for t in tasks:
                cells += [_fmt(m.get(f"{t}_acc"), ".4f"), _fmt(m.get(f"{t}_acc_norm"), ".4f")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean firing rate {r['mean_firing_rate']:.3f} (per layer and site: `firing_rates.png`, report.json).", ""]
    for ctx, targets in r["energy_per_token"].items():
        lines += [f"Estimated energy per token at context {ctx} (ratios = reference / spiking student):", "",
                  "| target | student pJ | Stage-1 pJ | teacher pJ | x teacher | x Stage-1 | decode x teacher |",
                  "|---|---|---|---|---|---|---|"]
        for name, t in targets.items():
            lines.append(f"| {name} | {t['student_J_per_token'] * 1e12:.4g} | {t['stage1_J_per_token'] * 1e12:.4g} | "
                         f"{t['teacher_J_per_token'] * 1e12:.4g} | {t['ratio_teacher']:.2f} | {t['ratio_stage1']:.2f} | "
                         f"{t['decode_ratio_teacher']:.2f} |")
        lines.append("")
    for name, a in (r.get("ablations") or {}).items():
        e = ", ".join(f"{ctx}: {t['45nm-fp32']['ratio_teacher']:.2f}x" for ctx, t in a["energy_per_token"].items()
                      if "45nm-fp32" in t)
        lines += [f"Ablation `{name}`: mean firing rate {a['mean_firing_rate']:.3f}; 45 nm fp32 energy vs teacher "
                  f"by context {e or '-'}.", ""]
    tp = r.get("throughput")
    if tp:
        lines += [f"Stage-2 training throughput ({tp['micro_batch']} x {tp['seq_len']} tokens per step, median of "
                  f"{tp['timed_steps']} steps):", "", "| paths | tokens/s | s/step | peak GiB |", "|---|---|---|---|"]
        for mode in ("fused", "reference"):
            m = tp.get(mode, {})
            if "error" in m:
                lines.append(f"| {mode} | {m['error']} | | |")
            else:
                lines.append(f"| {mode} | {m['tokens_per_s']:.0f} | {m['seconds_per_step']:.3f} | "
                             f"{_fmt(m.get('peak_memory_GiB'), '.1f')} |")
        if "speedup" in tp:
            lines += ["", f"Fused / reference: {tp['speedup']:.2f}x."]
        lines.append("")
    lines += ["Stage wall time (s) and tokens: " + ", ".join(f"{k} {v:.0f} s / {r['stage_tokens'].get(k, 0)} tok"
                                                           for k, v in r["stage_seconds"].items()), "",
              "Energy: estimates from operation counts of a real run and sourced per-operation costs "
              "(neuro_mar.hardware_models), not measurements; neuromorphic targets bill non-synaptic work "
              "on a companion table.", ""]
    return "\n".join(lines)
