"""Energy from operation counts, mapping onto neuromorphic cores, and the report.

``estimate_energy(model, batches, ...)`` is the Python API; ``neuro-mar energy`` prints the same
report and writes JSON, CSV and a PNG (stacked energy by component per layer).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..io_utils import atomic_savefig, atomic_write_text
from .counting import Row, llama_rows, measure_site_activity, site_fanout, student_rows, totals
from .partition import partition_site
from .targets import DEFAULT_TARGETS, PJ, CostTable, get_target

#: energy components of a report, in plot order, with fixed plot colours
ENERGY_PARTS = ("synaptic AC", "neuron updates", "dense MAC", "elementwise", "activations", "memory",
                "companion (non-synaptic)")
_COLOURS = dict(zip(ENERGY_PARTS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                                   "tab:gray")))


def row_energy(row: Row, table: CostTable) -> dict[str, float]:
    """Energy in joules of one row under ``table``, by component."""
    e = dict.fromkeys(ENERGY_PARTS, 0.0)
    ac = row.get("ac_pos") + row.get("ac_neg")
    if table.kind == "gpu":
        # a GPU multiplies the decoded activations densely: spikes save nothing
        e["dense MAC"] = (row.get("mac") + (row.get("dense_macs") if ac or row.get("neuron_update") else 0)) * table.e_mac * PJ
        e["neuron updates"] = row.get("neuron_update") * table.neuron_update() * PJ
        e["elementwise"] = (row.get("mul") * table.e_mul + row.get("add") * table.e_add) * PJ
        e["activations"] = row.get("act") * table.act() * PJ
        e["memory"] = row.get("mem_bytes") * table.e_mem_byte * PJ
        return e
    e["synaptic AC"] = ac * table.e_ac * PJ
    e["neuron updates"] = row.get("neuron_update") * table.neuron_update() * PJ
    if table.kind == "neuromorphic":
        host = get_target(table.dense_fallback or "45nm-fp32")
        e["companion (non-synaptic)"] = (row.get("mac") * host.e_mac + row.get("mul") * host.e_mul
                                         + row.get("add") * host.e_add + row.get("act") * host.act()) * PJ
        return e
    e["dense MAC"] = row.get("mac") * table.e_mac * PJ
    e["elementwise"] = (row.get("mul") * table.e_mul + row.get("add") * table.e_add) * PJ
    e["activations"] = row.get("act") * table.act() * PJ
    e["memory"] = row.get("mem_bytes") * table.e_mem_byte * PJ
    return e


def rows_energy(rows: list[Row], table: CostTable) -> float:
    return sum(sum(row_energy(r, table).values()) for r in rows)


# ---------------------------------------------------------------------------------------------
# mapping onto cores
# ---------------------------------------------------------------------------------------------
def map_model(cfg, table: CostTable, model_weight_bits: int = 16) -> dict:
    """Cores and chips a MAR model's spiking projections need on ``table``'s chip.

    Each projection and its site's spiking neurons are cut into cores by
    :func:`hardware_models.partition.partition_site`, the rule the event-driven simulator places
    by (so both count the same cores). Returns per-projection and total core counts, chips, whether
    the model fits one chip, and whether its weights must be quantised to the chip's precision.
    """
    if table.kind != "neuromorphic":
        return {"target": table.name, "applicable": False}
    fan = site_fanout(cfg)
    wbits = table.weight_bits or model_weight_bits
    per_proj = {}
    total = 0
    for kind, (din, dout) in fan.items():
        cores = partition_site(din, dout, table, wbits).cores
        per_proj[kind] = {"neurons": dout, "fan_in": din, "synapses": din * dout, "cores": cores}
        total += cores
    total *= cfg.num_hidden_layers
    published = table.neurons_per_core or table.synapse_bits_per_core
    chips = math.ceil(total / table.cores_per_chip) if (table.cores_per_chip and published) else None
    quantise = table.weight_bits is not None and model_weight_bits > table.weight_bits
    return {"target": table.name, "applicable": True, "limits_published": bool(published),
            "per_layer": per_proj, "cores": total if published else None, "chips": chips,
            "fits_one_chip": (chips == 1) if chips is not None else None,
            "weights_must_be_quantised": quantise, "weight_bits": table.weight_bits,
            "model_weight_bits": model_weight_bits,
            "message": _mapping_message(table, total if published else None, chips, quantise, model_weight_bits)}


def _mapping_message(table, cores, chips, quantise, model_bits) -> str:
    if cores is None:
        return f"{table.name}: mapping limits not published; energy only"
    parts = [f"{table.name}: {cores} cores on {chips} chip(s) of {table.cores_per_chip} cores"]
    if chips and chips > 1:
        parts.append(f"does NOT fit one chip (needs {chips})")
    if quantise:
        parts.append(f"weights must be quantised from {model_bits} to {table.weight_bits} bits")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
@dataclass
class EnergyReport:
    """Per target: energy per token (prefill mean and decode at the context), per layer and part,
    ratios against the Transformer teacher and the dense Stage-1 model, and the core mapping."""

    context: int
    tokens_measured: int
    targets: dict = field(default_factory=dict)
    firing: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"context": self.context, "tokens_measured": self.tokens_measured, "targets": self.targets,
                "firing": self.firing, "counts": self.counts}

    def table(self) -> str:
        lines = [f"energy per token at context {self.context} (tokens measured: {self.tokens_measured})",
                 f"{'target':<18} {'student pJ/tok':>15} {'stage-1 pJ/tok':>15} {'teacher pJ/tok':>15} "
                 f"{'x teacher':>10} {'x stage-1':>10} {'decode x teacher':>17}  mapping"]
        for name, t in self.targets.items():
            lines.append(f"{name:<18} {t['student_J_per_token'] / PJ:>15.4g} {t['stage1_J_per_token'] / PJ:>15.4g} "
                         f"{t['teacher_J_per_token'] / PJ:>15.4g} {t['ratio_teacher']:>10.2f} "
                         f"{t['ratio_stage1']:>10.2f} {t['decode_ratio_teacher']:>17.2f}  "
                         f"{t['mapping'].get('message', '-') if t['mapping'].get('applicable') else '-'}")
        lines.append("ratios: energy of the reference / energy of the spiking student (higher = student saves more)")
        return "\n".join(lines)

    def write(self, out_dir: str | Path, stem: str = "energy") -> dict[str, Path]:
        """Write ``energy.json``, ``energy.csv`` and ``energy.png`` atomically under out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=2))
        rows = []
        for name, t in self.targets.items():
            for r in t["per_part"]:
                rows.append({"target": name, **r})
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(paths["csv"], buf.getvalue())
        self.plot(paths["png"])
        return paths

    def plot(self, path: str | Path, target: str | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [target] if target else list(self.targets)
        fig, axes = plt.subplots(len(names), 1, figsize=(11, 2.8 * len(names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            per_layer = self.targets[name]["per_layer_components"]
            layers = sorted(per_layer, key=lambda k: (k == "head", int(k) if k != "head" else 0))
            bottom = [0.0] * len(layers)
            for part in ENERGY_PARTS:
                vals = [per_layer[k].get(part, 0.0) / PJ for k in layers]
                if any(vals):
                    ax.bar(range(len(layers)), vals, bottom=bottom, label=part, color=_COLOURS[part])
                    bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_xticks(range(len(layers)), layers, fontsize=7)
            ax.set_ylabel("pJ / token")
            ax.set_title(f"{name}: spiking student, energy per token by layer (context {self.context})", fontsize=9)
            ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        atomic_savefig(fig, path)
        plt.close(fig)


def teacher_config_of(model) -> dict | None:
    """The Llama teacher's config saved by llama_to_mar (``config.teacher_config``), if any."""
    return getattr(model.config, "teacher_config", None) or None


def estimate_energy(model, batches=None, targets=DEFAULT_TARGETS, context: int = 512, teacher_config=None,
                    memory: bool = False, activity: dict | None = None) -> EnergyReport:
    """Count a MARForCausalLM's operations on real inputs and price them on each target.

    Args:
        batches: iterable of input_ids tensors run to measure spikes (or pass ``activity`` from
            :func:`measure_site_activity`). A dense model needs none.
        targets: names or .toml/.json paths of cost tables.
        context: the context length L of the comparison (prefill mean per token over L tokens, and
            one decoded token at context L).
        teacher_config: the Llama teacher's config (dict/LlamaConfig); default: the one saved in
            the student's config by ``llama_to_mar``.
        memory: also count weight and state traffic (per token, batch 1).
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    cfg = model.config
    if activity is None:
        spiking = any(not s.is_dense for *_, s in model.spike_sites())
        if spiking and batches is None:
            raise ValueError("estimate_energy: a spiking model needs input batches (real inputs) to count spikes")
        activity = measure_site_activity(model, batches) if batches is not None else {"tokens": 0}
    tcfg = teacher_config if teacher_config is not None else teacher_config_of(model)
    student = student_rows(cfg, activity, memory)
    stage1 = student_rows(cfg, None, memory)
    teacher = llama_rows(tcfg, context, "prefill", memory) if tcfg else None
    teacher_dec = llama_rows(tcfg, context, "decode", memory) if tcfg else None
    rep = EnergyReport(context=context, tokens_measured=int(activity.get("tokens", 0)))
    rep.counts = {"student": totals(student), "stage1": totals(stage1),
                  "teacher_prefill": totals(teacher) if teacher else None,
                  "teacher_decode": totals(teacher_dec) if teacher_dec else None}
    rep.firing = {f"L{k[0]:02d}.{k[1]}": v["firing_rate"] for k, v in activity.items() if isinstance(k, tuple)}
    for spec in targets:
        table = get_target(spec)
        per_part, per_layer = [], {}
        for r in student:
            e = row_energy(r, table)
            key = "head" if r.layer < 0 else str(r.layer)
            acc = per_layer.setdefault(key, dict.fromkeys(ENERGY_PARTS, 0.0))
            for k, v in e.items():
                acc[k] += v
            per_part.append({"layer": key, "part": r.part, "J_per_token": sum(e.values()),
                             **{k: r.get(k) for k in ("ac_pos", "ac_neg", "mac", "mul", "add", "act", "neuron_update", "mem_bytes")}})
        s = rows_energy(student, table)
        s1 = rows_energy(stage1, table)
        te = rows_energy(teacher, table) if teacher else float("nan")
        td = rows_energy(teacher_dec, table) if teacher_dec else float("nan")
        mapping = map_model(cfg, table)
        static = None
        if mapping.get("chips") and table.static_power_w_per_chip and table.timestep_hz:
            T = max((v["T"] for k, v in activity.items() if isinstance(k, tuple) and not v["dense"]), default=1)
            static = table.static_power_w_per_chip * mapping["chips"] * T / table.timestep_hz
        rep.targets[table.name] = {
            "kind": table.kind, "source": table.source, "scope": table.scope,
            "student_J_per_token": s, "stage1_J_per_token": s1, "teacher_J_per_token": te,
            "teacher_decode_J_per_token": td, "ratio_teacher": te / s if s else float("nan"),
            "ratio_stage1": s1 / s if s else float("nan"), "decode_ratio_teacher": td / s if s else float("nan"),
            "static_J_per_token": static, "mapping": mapping, "per_part": per_part,
            "per_layer_components": per_layer,
            "components": {k: sum(v[k] for v in per_layer.values()) for k in ENERGY_PARTS},
        }
    return rep
