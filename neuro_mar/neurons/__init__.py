"""Spiking neurons for MAR: ATMN, the neuron registry, SpikeSite and neuron swapping."""
try:
    import spikingjelly.activation_based  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "neuro_mar.neurons needs spikingjelly 2.0.0, installed without its declared dependencies "
        "(they pull CUDA torchvision/torchaudio builds): `pip install --no-deps spikingjelly==2.0.0` "
        "(scripts/bootstrap.sh does this)"
    ) from err

from .adapters import SILIF, Dense, SnnTorchLeaky, SpikingJellyInputOnce
from .atmn import ATMN
from .registry import SwapSummary, available, create, register, swap_neurons
from .site import NonFiniteSiteInput, SpikeSite, check_finite_enabled, name_sites, set_check_finite
from .surrogates import resolve_surrogate, surrogate_names

__all__ = [
    "ATMN", "SILIF", "Dense", "SnnTorchLeaky", "SpikingJellyInputOnce", "SpikeSite", "SwapSummary",
    "NonFiniteSiteInput", "check_finite_enabled", "name_sites", "set_check_finite", "available", "create", "register", "swap_neurons", "resolve_surrogate", "surrogate_names",
]
