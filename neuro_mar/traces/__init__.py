"""Spike traces: streamed recording, SONATA HDF5 export (+ NWB and NIR views), reader, plots."""
from .exports import export_nir, export_nwb, to_nir
from .plots import plot_trace
from .recorder import population_name, record_trace, select_sites
from .sonata import Population, SonataWriter, Trace, TraceFormatError, read_trace

__all__ = ["record_trace", "select_sites", "population_name", "read_trace", "Trace", "Population",
           "SonataWriter", "TraceFormatError", "export_nwb", "export_nir", "to_nir", "plot_trace"]
