"""Constants shared by the ATMN kernels and their dispatch (importable without triton)."""

#: SpikingJelly surrogate class name -> kernel id (see ``atmn._sg_grad``). Others run on PyTorch.
SURROGATE_IDS = {"Sigmoid": 0, "ATan": 1, "Rect": 2, "PiecewiseQuadratic": 3, "Erf": 4}

#: the multi-step backward recomputes the potentials from x into registers up to this T (x read
#: once, T tiles of fp32 held per program); beyond it the forward saves them in fp32
RECOMPUTE_MAX_T = 8
