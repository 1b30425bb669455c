"""neuro-mar: MAR (Module-aware Architecture Refinement) for spiking state-space language models."""
__version__ = "0.1.0"

from .neurons import ATMN, SpikeSite, available, create, swap_neurons  # noqa: E402

__all__ = ["ATMN", "SpikeSite", "available", "create", "swap_neurons", "__version__"]
