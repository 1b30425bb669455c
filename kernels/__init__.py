"""Triton GPU kernels of neuro-mar (installed as ``neuro_mar.kernels``), each beside its PyTorch
reference: ATMN (``atmn.py`` / ``atmn_ref.py``, ops in ``atmn_ops.py``), the fused linear SBDS loss
(``sbds.py`` / ``sbds_ref.py``) and the mixer's causal conv + SiLU (``causal_conv.py`` /
``causal_conv_ref.py``, ops in ``causal_conv_ops.py``). Importing this package never imports
triton: the kernels load on first use on a GPU (or with ``NEURO_MAR_KERNELS=triton``)."""
if __name__ == "neuro_mar.kernels":
    from . import atmn_ops, atmn_ref
    from .atmn_ops import atmn_multistep, atmn_once, get_backend, set_backend, use_kernel

    __all__ = ["atmn_ops", "atmn_ref", "atmn_once", "atmn_multistep", "set_backend", "get_backend", "use_kernel"]
# Imported under any other name (``kernels``: transformers probes for Hugging Face's ``kernels``
# package by importing it, and a source checkout's root on sys.path offers this folder) the package
# stays empty: no second copy of the custom ops, no import of neuro_mar from inside transformers'.
