"""neuro-mar: MAR (Module-aware Architecture Refinement) for spiking state-space language models.

``import neuro_mar`` registers ``MARConfig`` / ``MARForCausalLM`` with transformers' Auto classes.
It needs neither CUDA, triton, cupy nor mamba_ssm's compiled parts.
"""
__version__ = "0.1.0"

import os as _os

# ``kernels/`` and ``hardware_models/`` live beside this package in the repository and install as
# ``neuro_mar.kernels`` / ``neuro_mar.hardware_models``; in a plain source checkout (on sys.path
# without installing) the repository root joins this package's search path so they resolve too.
_here = _os.path.dirname(__file__)
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(_os.path.join(_root, "kernels", "atmn_ops.py")):
    __path__.append(_root)

from .models import MARConfig, MARForCausalLM  # noqa: E402
from .neurons import ATMN, SpikeSite, available, create, swap_neurons  # noqa: E402

__all__ = ["ATMN", "SpikeSite", "available", "create", "swap_neurons", "MARConfig", "MARForCausalLM",
           "__version__"]
