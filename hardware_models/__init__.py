"""Hardware cost models (installed as ``neuro_mar.hardware_models``): operation counting of MAR
students and Transformer teachers, cost tables of digital, neuromorphic and GPU targets with their
sources, core mapping, energy reports, and NVML measurement on a GPU."""
from .counting import (llama_rows, measure_site_activity, site_fanout, student_rows, synaptic_ops,
                       totals)
from .energy import EnergyReport, estimate_energy, map_model, row_energy, rows_energy
from .measure import NVMLUnavailable, measure_energy
from .targets import DEFAULT_TARGETS, TARGETS, CostTable, available_targets, get_target, load_table

__all__ = ["CostTable", "TARGETS", "DEFAULT_TARGETS", "get_target", "load_table", "available_targets",
           "EnergyReport", "estimate_energy", "map_model", "row_energy", "rows_energy", "student_rows",
           "llama_rows", "measure_site_activity", "site_fanout", "synaptic_ops", "totals", "measure_energy",
           "NVMLUnavailable"]
