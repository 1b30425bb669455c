"""Placing a spiking MAR model's neurons and synapses on the cores of a neuromorphic target.

Each spiking projection and its site's neurons are cut into cores by
:func:`hardware_models.partition.partition_site` (the rule the energy report counts by): synapse
cores of an input group times an output group, neuron cores for the site's spiking units. Cores are
numbered in layer order and laid out row-major on one square 2-D mesh (``mesh_width`` =
ceil(sqrt(cores))); chips are consecutive runs of ``cores_per_chip`` cores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..hardware_models.counting import site_fanout
from ..hardware_models.partition import partition_site
from ..hardware_models.targets import CostTable


class MappingError(ValueError):
    """The model does not fit the target as asked; the message says what would."""


@dataclass
class Core:
    index: int
    kind: str  # "synapse" or "neuron"
    layer: int
    site: str
    in_lo: int
    in_hi: int
    out_lo: int = 0
    out_hi: int = 0

    @property
    def fan_out(self) -> int:
        return self.out_hi - self.out_lo


@dataclass
class Mapping:
    target: str
    cores: list[Core] = field(default_factory=list)
    mesh_width: int = 1
    cores_per_chip: int | None = None
    weight_bits: int | None = None

    def xy(self, core: int) -> tuple[int, int]:
        return core % self.mesh_width, core // self.mesh_width

    def hops(self, a: int, b: int) -> int:
        (xa, ya), (xb, yb) = self.xy(a), self.xy(b)
        return abs(xa - xb) + abs(ya - yb)

    @property
    def chips(self) -> int:
        return math.ceil(len(self.cores) / self.cores_per_chip) if self.cores_per_chip else 1

    def synapse_cores(self, layer: int, site: str) -> list[Core]:
        return [c for c in self.cores if c.kind == "synapse" and c.layer == layer and c.site == site]

    def neuron_cores(self, layer: int, site: str) -> list[Core]:
        return [c for c in self.cores if c.kind == "neuron" and c.layer == layer and c.site == site]


def map_onto_cores(model, table: CostTable, max_chips: int | None = None, model_weight_bits: int = 16,
                   quantize: bool = False) -> Mapping:
    """Partition the spiking sites of ``model`` onto ``table``'s cores. Raises :class:`MappingError`
    when weights are wider than the target's precision (unless ``quantize``) or when the cores
    exceed ``max_chips`` chips, saying what would fit."""
    if table.kind != "neuromorphic" or not (table.neurons_per_core or table.synapse_bits_per_core):
        raise MappingError(f"target {table.name!r} publishes no core limits to map onto; choose one of "
                           "loihi, truenorth, spinnaker2, odin or a custom table with neurons_per_core")
    if table.weight_bits is not None and model_weight_bits > table.weight_bits and not quantize:
        raise MappingError(f"{table.name} stores {table.weight_bits}-bit weights but the model's are "
                           f"{model_weight_bits}-bit: quantise them (simulate --quantize) to run on this target")
    wbits = table.weight_bits or model_weight_bits
    cfg = model.config
    fan = site_fanout(cfg)
    cores: list[Core] = []
    per_layer = 0
    for layer, kind, _, site in model.spike_sites():
        if site.is_dense:
            continue
        part = partition_site(*fan[kind], table, wbits)
        for lo, hi in part.neuron_groups:
            cores.append(Core(len(cores), "neuron", layer, kind, lo, hi))
        for ilo, ihi in part.in_groups:
            for olo, ohi in part.out_groups:
                cores.append(Core(len(cores), "synapse", layer, kind, ilo, ihi, olo, ohi))
        if layer == 0:
            per_layer = len(cores)
    if not cores:
        raise MappingError("the model has no spiking site to map (all sites are dense)")
    cpc = table.cores_per_chip or len(cores)
    m = Mapping(table.name, cores, mesh_width=max(1, math.ceil(math.sqrt(len(cores)))),
                cores_per_chip=table.cores_per_chip, weight_bits=wbits)
    if max_chips is not None and m.chips > max_chips:
        layers_fit = (max_chips * cpc) // max(per_layer, 1)
        raise MappingError(f"{table.name}: the model needs {len(cores)} cores = {m.chips} chips of {cpc}; with "
                           f"{max_chips} chip(s) ({max_chips * cpc} cores) {layers_fit} of its "
                           f"{cfg.num_hidden_layers} layers would fit ({per_layer} cores per layer)")
    return m
