"""Cost tables of hardware targets, each constant with its source and scope.

Sources and scopes are given per constant below. The
tables are not like-for-like: a neuromorphic chip's "energy per synaptic op" may include neuron
updates and routing (TrueNorth) or not (Loihi); work that is not synaptic (the selective scan,
norms, gating, the LM head) does not run on a chip's synapses and is billed at the table named by
``dense_fallback`` (a companion processor), reported as its own component so nothing hides.

A user table is a TOML or JSON file with the same fields (:func:`load_table`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

PJ = 1e-12


@dataclass(frozen=True)
class CostTable:
    """Energy per operation in picojoules, and (for chips) the mapping limits.

    ``kind`` is ``"digital"`` (per-operation CMOS costs), ``"neuromorphic"`` or ``"gpu"``
    (GPUs run spiking projections as dense matmuls on the decoded activations: no sparsity gain).
    """

    name: str
    kind: str
    source: str
    scope: str
    e_ac: float  # one accumulate (a synaptic op driven by a spike) [pJ]
    e_mac: float  # one multiply-accumulate [pJ]
    e_mul: float  # one multiply [pJ]
    e_add: float  # one add [pJ]
    e_act: float | None = None  # one activation function evaluation (exp, SiLU, softplus); None: e_mac
    e_neuron_update: float | None = None  # one neuron, one micro-step; None: e_mul + 2 e_add
    e_mem_byte: float = 0.0  # per byte of weight/state traffic when memory traffic is counted [pJ]
    dense_fallback: str | None = None  # table for non-synaptic work (neuromorphic targets)
    # mapping limits (neuromorphic targets); None = unconstrained / not published
    neurons_per_core: int | None = None
    fanin_per_core: int | None = None
    synapse_bits_per_core: int | None = None
    weight_bits: int | None = None
    cores_per_chip: int | None = None
    static_power_w_per_chip: float | None = None
    timestep_hz: float | None = None
    notes: str = ""

    def act(self) -> float:
        return self.e_mac if self.e_act is None else self.e_act

    def neuron_update(self) -> float:
        return self.e_mul + 2 * self.e_add if self.e_neuron_update is None else self.e_neuron_update

    def to_dict(self) -> dict:
        return asdict(self)


_HOROWITZ = "Horowitz, ISSCC 2014, doi:10.1109/ISSCC.2014.6757323 (45 nm, 0.9 V)"

TARGETS: dict[str, CostTable] = {}


def _add(t: CostTable) -> None:
    TARGETS[t.name] = t


_add(CostTable("45nm-fp32", "digital", _HOROWITZ, "arithmetic only (fp32 add 0.9, mult 3.7, MAC 4.6 pJ); "
               "memory 64-bit SRAM 32 KB read 20 pJ -> 2.5 pJ/byte when counted",
               e_ac=0.9, e_mac=4.6, e_mul=3.7, e_add=0.9, e_mem_byte=2.5))
_add(CostTable("45nm-fp16", "digital", _HOROWITZ + "; SpikingJelly presets E_AC 0.4, E_MAC 1.5",
               "arithmetic only (fp16 add 0.4, mult 1.1 pJ)", e_ac=0.4, e_mac=1.5, e_mul=1.1, e_add=0.4,
               e_mem_byte=2.5))
_add(CostTable("45nm-int8", "digital", _HOROWITZ + "; SpikingJelly presets E_AC 0.03, E_MAC 0.23",
               "arithmetic only (int8 add 0.03, mult 0.2 pJ)", e_ac=0.03, e_mac=0.23, e_mul=0.2, e_add=0.03,
               e_mem_byte=2.5))
_add(CostTable("loihi", "neuromorphic", "Davies et al., IEEE Micro 2018, Table 2",
               "23.6 pJ per synaptic op (minimum, pre-silicon), 81 pJ per active neuron update; "
               "spike within tile 1.7 pJ, per tile hop 3.0-4.0 pJ (used by neuro_mar.simulate)",
               e_ac=23.6, e_mac=23.6, e_mul=23.6, e_add=23.6, e_neuron_update=81.0, dense_fallback="45nm-fp32",
               neurons_per_core=1024, fanin_per_core=4096, synapse_bits_per_core=128 * 1024 * 8, weight_bits=8,
               cores_per_chip=128, static_power_w_per_chip=None, timestep_hz=None,
               notes="weights 1-9 bit; 128 KB synapse memory per core"))
_add(CostTable("truenorth", "neuromorphic", "Merolla et al., Science 2014",
               "26 pJ per synaptic event all-in (neuron updates, routing, leakage included: neuron updates "
               "billed 0 to avoid double counting)",
               e_ac=26.0, e_mac=26.0, e_mul=26.0, e_add=26.0, e_neuron_update=0.0, dense_fallback="45nm-fp32",
               neurons_per_core=256, fanin_per_core=256, synapse_bits_per_core=256 * 256, weight_bits=1,
               cores_per_chip=4096, static_power_w_per_chip=0.063, timestep_hz=1000.0,
               notes="binary 256x256 crossbars (4 axon types with 9-bit signed weights), 1 ms tick"))
_add(CostTable("spinnaker1", "neuromorphic", "keras-spiking preset, citing arXiv 1903.08941",
               "13.3 nJ per synop, 26 nJ per neuron update; 1 W per 18-core chip",
               e_ac=13300.0, e_mac=13300.0, e_mul=13300.0, e_add=13300.0, e_neuron_update=26000.0,
               dense_fallback="45nm-fp32", neurons_per_core=1024, fanin_per_core=None,
               synapse_bits_per_core=None, weight_bits=16, cores_per_chip=16, static_power_w_per_chip=1.0,
               timestep_hz=1000.0, notes="synapses live in 128 MB shared SDRAM per chip"))
_add(CostTable("spinnaker2", "neuromorphic", "keras-spiking preset; Hoeppner et al. 2021",
               "450 pJ per synop, 2.19 nJ per neuron update; 152 Cortex-M4F PEs per chip",
               e_ac=450.0, e_mac=450.0, e_mul=450.0, e_add=450.0, e_neuron_update=2190.0, dense_fallback="45nm-fp32",
               neurons_per_core=None, fanin_per_core=None, synapse_bits_per_core=128 * 1024 * 8, weight_bits=8,
               cores_per_chip=152, notes="128 KB SRAM per PE"))
_add(CostTable("odin", "neuromorphic", "Frenkel et al., IEEE TBioCAS 2019",
               "12.7 pJ per SOP (8.43 incremental); one 256-neuron core, 64 k 4-bit synapses",
               e_ac=12.7, e_mac=12.7, e_mul=12.7, e_add=12.7, e_neuron_update=0.0, dense_fallback="45nm-fp32",
               neurons_per_core=256, fanin_per_core=256, synapse_bits_per_core=64 * 1024 * 4, weight_bits=4,
               cores_per_chip=1, notes="SOP energy includes the neuron update (billed 0)"))
_add(CostTable("darwin3", "neuromorphic", "Ma et al., Natl. Sci. Rev. 2024",
               "5.47 pJ per SOP, measured average; mapping limits not published (not checked)",
               e_ac=5.47, e_mac=5.47, e_mul=5.47, e_add=5.47, e_neuron_update=0.0, dense_fallback="45nm-fp32"))
_add(CostTable("h200-bf16", "gpu", "measured on an H200, NVML energy counter (energy-and-formats.md §4)",
               "board level, bf16 GEMM 8192^3 at 661 TFLOP/s: 2.1 pJ/MAC (1.04 pJ/FLOP); every projection runs "
               "as a dense matmul (no sparsity gain); other ops billed as one MAC each",
               e_ac=2.1, e_mac=2.1, e_mul=1.04, e_add=1.04, e_act=2.1, e_neuron_update=2.1))
_add(CostTable("h200-bf16-decode", "gpu", "measured on an H200, NVML energy counter (energy-and-formats.md §4)",
               "board level, batch-1 bf16 GEMV 1x8192x8192: 311 pJ/MAC (weights streamed from HBM each token)",
               e_ac=311.0, e_mac=311.0, e_mul=155.5, e_add=155.5, e_act=311.0, e_neuron_update=311.0))

DEFAULT_TARGETS = ("45nm-fp32", "45nm-int8", "loihi", "truenorth", "spinnaker2", "h200-bf16")


def get_target(name_or_path: str) -> CostTable:
    """A registered table by name, or a user table from a ``.toml`` / ``.json`` file."""
    if name_or_path in TARGETS:
        return TARGETS[name_or_path]
    if name_or_path.endswith((".toml", ".json")):
        return load_table(name_or_path)
    raise ValueError(f"unknown target {name_or_path!r}; registered: {', '.join(TARGETS)}; "
                     "or give a .toml/.json cost table (see hardware_models/targets.py for the fields)")


#: the schema of a user table's fields beyond the required name / kind / source / scope
TEXT_FIELDS = ("name", "kind", "source", "scope", "dense_fallback", "notes")
ENERGY_FIELDS = ("e_ac", "e_mac", "e_mul", "e_add", "e_act", "e_neuron_update", "e_mem_byte")  # pJ, >= 0
COUNT_FIELDS = ("neurons_per_core", "fanin_per_core", "synapse_bits_per_core", "weight_bits", "cores_per_chip")
RATE_FIELDS = {"static_power_w_per_chip": "watts", "timestep_hz": "hertz"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_table(path: str | Path) -> CostTable:
    """Read a user cost table; errors name the file and the field. Energies are finite pJ >= 0,
    mapping limits whole numbers >= 1 (a limit that is not published is left out or null, never
    0), power and tick rate finite and > 0, text fields strings; booleans are not numbers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cost table {path} does not exist")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except Exception as err:  # noqa: BLE001 - any parse error is reported with the file name
        raise ValueError(f"cost table {path}: cannot parse ({type(err).__name__}: {err})") from None
    known = {f.name: f for f in fields(CostTable)}
    if not isinstance(data, dict):
        raise ValueError(f"cost table {path}: holds {type(data).__name__}, not a JSON object; a table is one object "
                         f"of fields, e.g. {{\"name\": \"mychip\", \"kind\": \"neuromorphic\", \"source\": ..., "
                         f"\"scope\": ..., \"e_ac\": 2.0, \"e_mac\": ..., \"e_mul\": ..., \"e_add\": ...}} "
                         f"(fields: {', '.join(known)})")
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"cost table {path}: unknown field(s) {sorted(unknown)}; fields are {sorted(known)}")
    required = ["name", "kind", "source", "scope", "e_ac", "e_mac", "e_mul", "e_add"]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"cost table {path}: missing field(s) {missing} (every constant needs a source and scope)")
    for k in required:
        if data[k] is None:
            raise ValueError(f"cost table {path}: {k} is required, got null (every constant needs a value, a source "
                             "and a scope)")
    if data["kind"] not in ("digital", "neuromorphic", "gpu"):
        raise ValueError(f"cost table {path}: kind must be digital, neuromorphic or gpu, got {data['kind']!r}")
    for k in TEXT_FIELDS:
        v = data.get(k)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"cost table {path}: {k} must be a string, got {v!r}")
    for k in ENERGY_FIELDS:
        v = data.get(k)
        if v is not None and not (_is_number(v) and math.isfinite(v) and v >= 0):
            raise ValueError(f"cost table {path}: {k} must be a finite non-negative number of pJ, got {v!r}")
    for k in COUNT_FIELDS:
        v = data.get(k)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"cost table {path}: {k} must be a whole number >= 1, got {v!r} "
                             "(leave it out, or null, for a limit that is not published)")
    for k, unit in RATE_FIELDS.items():
        v = data.get(k)
        if v is not None and not (_is_number(v) and math.isfinite(v) and v > 0):
            raise ValueError(f"cost table {path}: {k} must be a finite number > 0 of {unit}, got {v!r} "
                             "(leave it out, or null, when not published)")
    if data.get("dense_fallback") and data["dense_fallback"] not in TARGETS:
        raise ValueError(f"cost table {path}: dense_fallback {data['dense_fallback']!r} is not a registered target")
    return CostTable(**data)


def available_targets() -> dict[str, str]:
    return {n: f"{t.kind}: {t.scope} [{t.source}]" for n, t in TARGETS.items()}


__all__ = ["CostTable", "TARGETS", "DEFAULT_TARGETS", "get_target", "load_table", "available_targets", "PJ"]
