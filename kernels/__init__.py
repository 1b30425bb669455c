"""Triton GPU kernels of neuro-mar (installed as ``neuro_mar.kernels``), each beside its PyTorch
reference (``atmn.py`` / ``atmn_ref.py``). Importing this package never imports triton: the
kernels load on first use on a GPU (or with ``NEURO_MAR_KERNELS=triton``)."""
from . import atmn_ops, atmn_ref
from .atmn_ops import atmn_multistep, atmn_once, get_backend, set_backend, use_kernel

__all__ = ["atmn_ops", "atmn_ref", "atmn_once", "atmn_multistep", "set_backend", "get_backend", "use_kernel"]
