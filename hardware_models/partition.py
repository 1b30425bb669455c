"""How one spiking projection is cut into neuromorphic cores: the single rule behind the energy
report's core and chip counts (:func:`hardware_models.energy.map_model`) and the event-driven
simulator's placement (:func:`neuro_mar.simulate.map_onto_cores`).

A projection (the layer behind a spike site, ``d_in`` axons into ``d_out`` neurons) is cut into
synapse cores: a core holds an input group (at most ``fanin_per_core`` axons) times an output group
(at most ``neurons_per_core`` neurons), the output group shrunk until the core's synapses fit
``synapse_bits_per_core`` at the weight precision. The site's own spiking neurons (``d_in`` ATMN
units firing into the projection) sit on neuron cores of at most ``neurons_per_core`` channels.
Every core is a rectangle of the weight matrix, so the count is what a placement can realise (not
the synapse-memory lower bound ``d_in * d_out * bits / synapse_bits_per_core``, which rectangles
rarely pack to).
"""
from __future__ import annotations

from dataclasses import dataclass

from .targets import CostTable


def groups(n: int, size: int | None) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges cutting ``n`` channels into runs of at most ``size`` (one run without a limit)."""
    size = n if not size else size
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


@dataclass(frozen=True)
class SitePartition:
    """Channel ranges of one site's cores: its neuron cores, and the synapse cores, one per pair of
    an input group and an output group."""

    neuron_groups: list[tuple[int, int]]
    in_groups: list[tuple[int, int]]
    out_groups: list[tuple[int, int]]

    @property
    def synapse_cores(self) -> int:
        return len(self.in_groups) * len(self.out_groups)

    @property
    def cores(self) -> int:
        return len(self.neuron_groups) + self.synapse_cores


def partition_site(d_in: int, d_out: int, table: CostTable, weight_bits: int) -> SitePartition:
    """Cut a ``d_in -> d_out`` projection and its ``d_in`` spiking neurons into ``table``'s cores,
    weights stored at ``weight_bits`` bits."""
    in_groups = groups(d_in, table.fanin_per_core)
    out_size = table.neurons_per_core or d_out
    if table.synapse_bits_per_core:
        widest = max(hi - lo for lo, hi in in_groups)
        out_size = max(1, min(out_size, table.synapse_bits_per_core // (widest * weight_bits)))
    return SitePartition(groups(d_in, table.neurons_per_core), in_groups, groups(d_out, out_size))
