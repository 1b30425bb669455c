"""Event-driven neuromorphic simulation of spiking MAR models on mapped cores."""
from .executor import EventDrivenExecutor
from .mapping import Core, Mapping, MappingError, map_onto_cores

__all__ = ["EventDrivenExecutor", "map_onto_cores", "Mapping", "MappingError", "Core"]
