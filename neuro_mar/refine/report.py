"""The refinement report: report.json, report.md and PNG plots, written atomically."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..io_utils import atomic_write_text
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
        fig.savefig(p, dpi=100)
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
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p.name)
    return paths


def build_report(cfg, out: Path, teacher, stage1, before, student, tok, held, timings, tokens, wall) -> dict:
    from ..hardware_models import estimate_energy
    from ..hardware_models.counting import measure_site_activity

    models = {"teacher": teacher, "stage1_ssm": stage1, "spiking_before_stage2": before, "spiking_student": student}
    rows = {}
    for name, m in models.items():
        r = {"heldout_perplexity": perplexity(m, held)}
        if name != "teacher":
            r.update(agreement(m, teacher, held))
        rows[name] = r
    activity = measure_site_activity(student, [held])
    firing = {f"L{k[0]:02d}.{k[1]}": v["firing_rate"] for k, v in activity.items() if isinstance(k, tuple)}
    energy = {}
    for ctx in cfg.energy_contexts:
        rep = estimate_energy(student, activity=activity, context=int(ctx))
        energy[str(ctx)] = {name: {k: t[k] for k in ("student_J_per_token", "stage1_J_per_token", "teacher_J_per_token",
                                                     "ratio_teacher", "ratio_stage1", "decode_ratio_teacher")}
                            for name, t in rep.targets.items()}
    plots = _plots(out, firing)
    report = {"teacher": cfg.teacher, "neuron": cfg.neuron, "models": rows, "firing_rates": firing,
              "mean_firing_rate": sum(firing.values()) / max(1, len(firing)), "energy_per_token": energy,
              "stage_seconds": timings, "stage_tokens": tokens, "wall_seconds": wall,
              "heldout_tokens": int(held.numel()), "plots": plots,
              "closer_to_teacher_after_stage2": (rows["spiking_student"]["kl_to_teacher"]
                                                 < rows["spiking_before_stage2"]["kl_to_teacher"]
                                                 and rows["spiking_student"]["top1_agreement"]
                                                 >= rows["spiking_before_stage2"]["top1_agreement"])}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def render_markdown(r: dict) -> str:
    lines = [f"# MAR refinement report", "",
             f"Teacher `{r['teacher']}`, neuron `{r['neuron']}`, held-out tokens {r['heldout_tokens']}, "
             f"wall time {r['wall_seconds']:.0f} s.", "",
             "| model | held-out perplexity | KL to teacher (nats/token) | top-1 agreement |", "|---|---|---|---|"]
    for name, m in r["models"].items():
        kl = m.get("kl_to_teacher")
        ag = m.get("top1_agreement")
        lines.append(f"| {name} | {m['heldout_perplexity']:.2f} | {'-' if kl is None else f'{kl:.4f}'} | "
                     f"{'-' if ag is None else f'{ag:.3f}'} |")
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
    lines += ["Stage wall time (s) and tokens: " + ", ".join(f"{k} {v:.0f} s / {r['stage_tokens'].get(k, 0)} tok"
                                                           for k, v in r["stage_seconds"].items()), "",
              "Energy: estimates from operation counts of a real run and sourced per-operation costs "
              "(neuro_mar.hardware_models), not measurements; neuromorphic targets bill non-synaptic work "
              "on a companion table.", ""]
    return "\n".join(lines)
