"""Triton GPU kernels of neuro-mar (installed as ``neuro_mar.kernels``), each beside its PyTorch
reference. Importing this package never imports triton; kernels load on first GPU use."""
