"""The neuron registry and neuron swapping.

``available()`` lists the names, ``create(name, channels, **options)`` builds one, and
``swap_neurons(model, name, ...)`` replaces the neuron of every :class:`SpikeSite` in a model.
"""
from __future__ import annotations

import fnmatch
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .adapters import SILIF, Dense, SnnTorchLeaky, SpikingJellyInputOnce
from .atmn import ATMN
from .site import SpikeSite


def _sj(cls_name: str, levels: str, leaky: bool):
    def factory(channels=None, T=4, surrogate="sigmoid", init_threshold=1.0, **options):
        from spikingjelly.activation_based import neuron as sj_neuron

        allowed = {"tau", "decay_input", "detach_reset"} if leaky else {"detach_reset"}
        bad = set(options) - allowed
        if bad:
            raise TypeError(f"unexpected option(s) {sorted(bad)}")
        return SpikingJellyInputOnce(getattr(sj_neuron, cls_name), channels=channels, T=T, surrogate=surrogate,
                                     init_threshold=init_threshold, spike_levels=levels, **options)

    factory.accepted = ["channels", "T", "surrogate", "init_threshold", "detach_reset"] + (
        ["tau", "decay_input"] if leaky else [])
    return factory


def _binary(channels=None, T=4, tau=0.5, surrogate="sigmoid", init_threshold=1.0, detach_reset=False):
    return ATMN(channels=channels, T=T, tau=tau, surrogate=surrogate, init_threshold=init_threshold,
                ternary=False, detach_reset=detach_reset)


def _atmn(channels=None, T=4, tau=0.5, surrogate="sigmoid", init_threshold=1.0, detach_reset=False):
    return ATMN(channels=channels, T=T, tau=tau, surrogate=surrogate, init_threshold=init_threshold,
                detach_reset=detach_reset)


@dataclass(frozen=True)
class NeuronEntry:
    name: str
    factory: Callable[..., nn.Module]
    description: str

    def options(self) -> list[str]:
        accepted = getattr(self.factory, "accepted", None)
        if accepted is not None:
            return list(accepted)
        return list(inspect.signature(self.factory).parameters)


_REGISTRY: dict[str, NeuronEntry] = {}


def register(name: str, factory: Callable[..., nn.Module], description: str) -> None:
    """Add a neuron type. ``factory(channels=..., **options)`` must return a module with the
    input-once API (``encode``, ``decode``, ``T``, ``a``, ``calibrate``, ``config``)."""
    if name in _REGISTRY:
        raise ValueError(f"neuron {name!r} is already registered")
    _REGISTRY[name] = NeuronEntry(name, factory, description)


register("atmn", _atmn, "MAR's Adaptive Ternary Multi-step Neuron: ternary spikes, learned threshold exp(a), input once over T steps")
register("binary", _binary, "ATMN firing {0, 1} only (the paper's binary-spike ablation)")
register("sj-if", _sj("IFNode", "binary", False), "SpikingJelly 2.0 IFNode (binary), soft reset, driven input-once")
register("sj-lif", _sj("LIFNode", "binary", True), "SpikingJelly 2.0 LIFNode (binary, tau=2), soft reset, driven input-once")
register("sj-ternary-if", _sj("TernaryIFNode", "ternary", False), "SpikingJelly 2.0 TernaryIFNode, soft reset, driven input-once")
register("sj-ternary-lif", _sj("TernaryLIFNode", "ternary", True), "SpikingJelly 2.0 TernaryLIFNode (tau=2), soft reset, driven input-once")
register("snntorch-leaky", SnnTorchLeaky, "snntorch 1.0 Leaky (binary, beta=0.9), subtractive reset without delay, driven input-once")
register("si-lif", SILIF, "SpikingMamba's signed-integer neuron: clip(round(x/V), -D, D), fired as D binary micro-steps")
register("dense", Dense, "no spikes: identity (the dense Stage-1 model)")


def available() -> dict[str, str]:
    """Registered neuron names with one-line descriptions."""
    return {name: e.description for name, e in _REGISTRY.items()}


def _entry(name: str) -> NeuronEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown neuron {name!r}; available: {', '.join(_REGISTRY)} "
                         "(see `neuro-mar neurons`)")
    return _REGISTRY[name]


def create(name: str, channels: int | None = None, **options) -> nn.Module:
    """Build the neuron registered as ``name`` for ``channels`` channels.

    Unknown names and options raise ``ValueError`` listing what exists.
    """
    entry = _entry(name)
    accepted = entry.options()
    bad = [k for k in options if k not in accepted]
    if bad:
        raise ValueError(f"neuron {name!r} does not take option(s) {bad}; it accepts: "
                         f"{', '.join(k for k in accepted if k != 'channels')}")
    try:
        module = entry.factory(channels=channels, **options)
    except TypeError as err:
        raise ValueError(f"bad options for neuron {name!r}: {err}") from None
    module.registry_name = name
    return module


@dataclass
class SwapSummary:
    """What :func:`swap_neurons` changed: one row per site."""

    rows: list[dict] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        if not self.rows:
            return "swap_neurons: no SpikeSite matched"
        w = max(len(r["site"]) for r in self.rows)
        lines = [f"{'site':<{w}}  {'from':<15} {'to':<15} threshold"]
        for r in self.rows:
            lines.append(f"{r['site']:<{w}}  {r['from']:<15} {r['to']:<15} "
                         f"{'carried' if r['threshold_carried'] else 'fresh'}")
        return "\n".join(lines)


def swap_neurons(model: nn.Module, name: str, pattern: str | None = None, keep_threshold: bool = True,
                 calibrate_on=None, **options) -> SwapSummary:
    """Replace the neuron of every :class:`SpikeSite` of ``model`` by a new ``name`` neuron.

    Args:
        pattern: only sites whose qualified module name matches this ``fnmatch`` pattern
            (e.g. ``"*.mlp.*"``); all sites when ``None``.
        keep_threshold: carry the per-channel log-threshold ``a`` over where both neurons have
            one of the same shape (all spiking entries share the meaning "input scale of one
            spike", so a trained ATMN threshold survives atmn -> sj-lif -> atmn).
        calibrate_on: an iterable of ``input_ids`` tensors: the swapped sites' thresholds are set
            from the dense activations on them (``model.calibrate_thresholds``; a MAR model only).
            Without it, swapping a trained spiking neuron for one of another type warns: the
            carried thresholds were trained for the old type's firing, so the model must be
            recalibrated and distilled again (Stage 2) before its numbers mean anything.
        options: constructor options of the new neuron (see :func:`create`).
    """
    summary = replace_site_neurons(model, name, pattern, keep_threshold, options)
    finish_swap(model, summary, name, "swap_neurons", calibrate_on)
    return summary


def replace_site_neurons(model: nn.Module, name: str, pattern: str | None, keep_threshold: bool,
                         options: dict) -> SwapSummary:
    """The swap itself (:func:`swap_neurons` without calibration or warning)."""
    _entry(name)
    summary = SwapSummary()
    sites = [(n, m) for n, m in model.named_modules() if isinstance(m, SpikeSite)]
    if not sites:
        raise ValueError("swap_neurons: the model has no SpikeSite modules")
    for site_name, site in sites:
        if pattern is not None and not fnmatch.fnmatchcase(site_name, pattern):
            continue
        old = site.neuron
        new = create(name, channels=getattr(old, "channels", None), **options)
        old_a = getattr(old, "a", None)
        carried = False
        if keep_threshold and old_a is not None and getattr(new, "a", None) is not None and old_a.shape == new.a.shape:
            with torch.no_grad():
                new.a.copy_(old_a.detach())
            carried = True
        ref = old_a if old_a is not None else next(iter(site.buffers()), None)
        if ref is not None:
            new = new.to(device=ref.device)
            if old_a is not None:
                new = new.to(dtype=old_a.dtype)
        new.train(old.training)
        site.neuron = new
        site.reset_counters()
        summary.rows.append({"site": site_name, "from": getattr(old, "registry_name", None) or type(old).__name__,
                             "to": name, "threshold_carried": carried})
    return summary


def finish_swap(model: nn.Module, summary: SwapSummary, name: str, caller: str, calibrate_on) -> None:
    """After a swap: recalibrate the swapped sites on ``calibrate_on`` (input_ids batches; a model
    with ``calibrate_thresholds``), or warn where a trained spiking neuron was replaced by another
    type without it."""
    if calibrate_on is not None:
        if not hasattr(model, "calibrate_thresholds"):
            raise TypeError(f"{caller}: calibrate_on needs a MAR model (one with calibrate_thresholds); "
                            "call each new neuron's calibrate(activations) instead")
        model.calibrate_thresholds(calibrate_on, only={r["site"] for r in summary.rows})
        return
    changed = [r for r in summary.rows if r["from"] not in (name, "Dense", "dense") and name != "dense"]
    if changed:
        warnings.warn(f"{caller}: {len(changed)} site(s) changed from {', '.join(sorted({r['from'] for r in changed}))}"
                      f" to {name}; the carried thresholds were trained for the old neuron's firing, so the model is "
                      f"not yet usable: recalibrate ({caller}(..., calibrate_on=batches) or "
                      f"model.calibrate_thresholds(batches)) and distil it again (neuro-mar refine --neuron {name})",
                      stacklevel=4)
