"""Hardware cost models of neuro-mar (installed as ``neuro_mar.hardware_models``)."""
