"""Constants shared by the ATMN kernels and their dispatch (importable without triton)."""

#: SpikingJelly surrogate class name -> kernel id (see ``atmn._sg_grad``). Others run on PyTorch.
SURROGATE_IDS = {"Sigmoid": 0, "ATan": 1, "Rect": 2, "PiecewiseQuadratic": 3, "Erf": 4}
