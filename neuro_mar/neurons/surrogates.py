"""Surrogate gradients by name.

Every spiking neuron of this package fires on a *normalised* membrane potential
``m = h / V`` (V the per-channel threshold), so a surrogate's width is in units of the
threshold whatever the scale of the activations. The functions themselves are
SpikingJelly 2.0's (`spikingjelly.activation_based.surrogate`), so the same names work for
the SpikingJelly neurons of the registry.

``straight_through`` is SpikingJelly's ``Rect(alpha=1)``: gradient 1 inside half a threshold
of each firing threshold, 0 elsewhere. For the input-once neurons this makes the decoded
activation's gradient exactly 1 with respect to its input whenever some micro-step lands in
that window (the straight-through estimator of the whole quantiser).
"""
from __future__ import annotations

from typing import Callable

from spikingjelly.activation_based import surrogate as sj_surrogate

# name -> (factory, short description). Defaults are SpikingJelly's.
_SURROGATES: dict[str, tuple[Callable[..., sj_surrogate.SurrogateFunctionBase], str]] = {
    "sigmoid": (lambda **kw: sj_surrogate.Sigmoid(**{"alpha": 4.0, **kw}), "sigmoid'(alpha*z), alpha=4"),
    "atan": (lambda **kw: sj_surrogate.ATan(**{"alpha": 2.0, **kw}), "arctan surrogate, alpha=2"),
    "erf": (lambda **kw: sj_surrogate.Erf(**{"alpha": 2.0, **kw}), "Gaussian surrogate, alpha=2"),
    "piecewise_quadratic": (
        lambda **kw: sj_surrogate.PiecewiseQuadratic(**{"alpha": 1.0, **kw}),
        "triangle of half-width 1/alpha",
    ),
    "soft_sign": (lambda **kw: sj_surrogate.SoftSign(**{"alpha": 2.0, **kw}), "soft-sign surrogate, alpha=2"),
    "super_spike": (lambda **kw: sj_surrogate.SuperSpike(**{"alpha": 1.0, **kw}), "SuperSpike, alpha=1"),
    "straight_through": (
        lambda **kw: sj_surrogate.Rect(**{"alpha": 1.0, **kw}),
        "straight-through: gradient 1 within half a threshold of firing",
    ),
}


def surrogate_names() -> list[str]:
    """Names accepted by :func:`resolve_surrogate`."""
    return sorted(_SURROGATES)


def resolve_surrogate(spec, **options) -> sj_surrogate.SurrogateFunctionBase:
    """Return a SpikingJelly surrogate module for ``spec``.

    ``spec`` is a name from :func:`surrogate_names` (options such as ``alpha`` or
    ``spiking=False`` are passed on) or an existing
    ``spikingjelly.activation_based.surrogate.SurrogateFunctionBase`` instance.
    """
    if isinstance(spec, sj_surrogate.SurrogateFunctionBase):
        if options:
            raise ValueError("surrogate options can only be given together with a surrogate name")
        return spec
    if not isinstance(spec, str) or spec.lower() not in _SURROGATES:
        raise ValueError(
            f"unknown surrogate {spec!r}; choose one of {', '.join(surrogate_names())} "
            "or pass a spikingjelly.activation_based.surrogate.SurrogateFunctionBase instance"
        )
    factory, _ = _SURROGATES[spec.lower()]
    try:
        return factory(**options)
    except TypeError as err:
        raise ValueError(f"bad options {options} for surrogate {spec!r}: {err}") from None


def surrogate_name(fn: sj_surrogate.SurrogateFunctionBase) -> str:
    """Best-effort registry name of a surrogate module (for configs and reports)."""
    cls = type(fn).__name__
    for name, (factory, _) in _SURROGATES.items():
        if type(factory()).__name__ == cls:
            return name
    return cls
