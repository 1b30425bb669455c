"""neuro-mar: MAR (Module-aware Architecture Refinement) for spiking state-space language models.

``import neuro_mar`` registers ``MARConfig`` / ``MARForCausalLM`` with transformers' Auto classes.
It needs neither CUDA, triton, cupy nor mamba_ssm's compiled parts.
"""
__version__ = "0.1.0"

from .models import MARConfig, MARForCausalLM  # noqa: E402
from .neurons import ATMN, SpikeSite, available, create, swap_neurons  # noqa: E402

__all__ = ["ATMN", "SpikeSite", "available", "create", "swap_neurons", "MARConfig", "MARForCausalLM",
           "__version__"]
