"""State-space mixers: the Discrete Mamba-2 mixer and its SSD scans."""
from .backends import (BACKENDS, default_backend, load_mamba_chunk_scan, mamba_unavailable_reason,
                       set_default_backend, ssd_scan)
from .discrete_mamba2 import DiscreteMamba2, MixerState
from .scan import ssd_chunked, ssd_naive

__all__ = ["DiscreteMamba2", "MixerState", "ssd_naive", "ssd_chunked", "ssd_scan", "BACKENDS",
           "set_default_backend", "default_backend", "load_mamba_chunk_scan", "mamba_unavailable_reason"]
