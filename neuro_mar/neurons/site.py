"""SpikeSite: the module MAR places before a projection.

A neuron turns a NaN or infinite input into some spike pattern without complaint, so a model gone
bad upstream of a site can look finite downstream. The debug knob ``NEURO_MAR_CHECK_FINITE=1`` (or
:func:`set_check_finite`) makes every site check its input and raise :class:`NonFiniteSiteInput`
naming the site; it costs one host synchronisation per site call, so it is off by default.
"""
from __future__ import annotations

from typing import Callable

import torch
from spikingjelly.activation_based.base import StepModule
from torch import nn

from ..knobs import Knob

Recorder = Callable[["SpikeSite", torch.Tensor], None]

_check_finite = Knob("spike-site non-finite check", "NEURO_MAR_CHECK_FINITE", ("0", "1"), "0")


def set_check_finite(on: bool) -> None:
    """Turn the spike sites' non-finite input check on or off for this process."""
    _check_finite.set("1" if on else "0")


def check_finite_enabled() -> bool:
    return _check_finite.value == "1"


class NonFiniteSiteInput(ValueError):
    """A spike site's input held NaN or infinite values (raised only with the check on)."""


def name_sites(model: nn.Module) -> None:
    """Give every SpikeSite of ``model`` its qualified module name (used in error messages)."""
    for name, mod in model.named_modules():
        if isinstance(mod, SpikeSite):
            mod.site_name = name


class _RecorderHandle:
    def __init__(self, site: "SpikeSite", key: int):
        self._site, self._key = site, key

    def remove(self) -> None:
        self._site._recorders.pop(self._key, None)


class SpikeSite(nn.Module, StepModule):
    """Turn a dense activation into spikes and hand the next layer their decoded value.

    ``forward(x [..., d]) -> x_hat [..., d]`` (same shape and dtype) with
    ``x_hat = neuron.decode(neuron.encode(x))``; gradients flow through the neuron's surrogate.

    Counters (read by the cost model; cleared by :meth:`reset_counters`), summed over calls
    since the last reset, kept as device tensors so counting adds no host synchronisation:

    * ``positive`` / ``negative``: number of +1 and -1 spikes,
    * ``elements``: number of dense input elements, ``calls``: forward calls,
    * :meth:`stats` derives the firing rate ``(positive + negative) / (elements * T)``.

    Recording: :meth:`add_recorder` registers ``fn(site, spikes_int8 [T, *x.shape])`` called on
    every forward; without recorders no spike tensor outlives the forward call.

    SpikingJelly: the neuron's forward hooks and pre-hooks (``monitor.OutputMonitor``,
    ``InputMonitor``) see each call as the neuron's multi-step forward would present it, input
    ``x`` and output the spikes ``[T, *x.shape]``; ``functional.reset_net`` reaches the neuron; the
    site is a ``StepModule`` of single-step mode only, and ``functional.set_step_mode(model, "m")``
    is refused with the reason (the T micro-steps already run inside every call).
    """

    def __init__(self, neuron: nn.Module, counting: bool = True):
        super().__init__()
        self.neuron = neuron
        self.counting = counting
        self._recorders: dict[int, Recorder] = {}
        self._next_key = 0
        self._counts: torch.Tensor | None = None  # [positive, negative, elements], on x's device
        self.calls = 0
        self.site_name: str | None = None  # set by name_sites (MARForCausalLM does it)

    def supported_step_mode(self) -> tuple[str, ...]:
        return ("s",)

    @property
    def step_mode(self) -> str:
        return "s"

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        if value != "s":
            raise ValueError(f"{self.site_name or 'a spike site'}: step mode {value!r} does not apply: a MAR spike "
                             "site fires its neuron over T micro-steps inside every call (input once), one call per "
                             "token; the model takes token ids [batch, length], not [T, batch, ...] sequences")

    @property
    def is_dense(self) -> bool:
        return getattr(self.neuron, "spike_levels", None) == "dense"

    @property
    def T(self) -> int:
        return self.neuron.T

    def _counters(self, device) -> torch.Tensor:
        if self._counts is None or self._counts.device != device:
            self._counts = torch.zeros(3, dtype=torch.long, device=device)
        return self._counts

    def _check_input(self, x: torch.Tensor) -> None:
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            channels = bad.reshape(-1, x.shape[-1]).any(0).nonzero().flatten()
            shown = channels[:8].tolist()
            more = f" and {channels.numel() - 8} more" if channels.numel() > 8 else ""
            raise NonFiniteSiteInput(
                f"{self.site_name or 'a spike site'}: the input holds {int(bad.sum())} NaN or infinite values "
                f"(channels {shown}{more}); the model is broken upstream of this site (weights, data or a "
                "diverged step)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _check_finite.value == "1":
            self._check_input(x)
        if self.is_dense:
            if self.counting:
                self._counters(x.device)[2] += x.numel()
                self.calls += 1
            return x
        hooks, pre_hooks = self.neuron._forward_hooks, self.neuron._forward_pre_hooks
        for hook in list(pre_hooks.values()):  # e.g. SpikingJelly's InputMonitor
            hook(self.neuron, (x,))
        want = bool(self._recorders) or bool(hooks)
        x_hat, spikes, counts = self.neuron.site_forward(x, want_spikes=want, count=self.counting)
        for hook in list(hooks.values()):  # e.g. SpikingJelly's OutputMonitor: the spikes of this call
            hook(self.neuron, (x,), spikes)
        if self.counting:
            c = self._counters(x.device)
            c[:2] += counts
            c[2] += x.numel()
            self.calls += 1
        if want:
            s8 = spikes.to(torch.int8)
            for fn in list(self._recorders.values()):
                fn(self, s8)
        return x_hat

    # -- recording ----------------------------------------------------------------------
    def add_recorder(self, fn: Recorder) -> _RecorderHandle:
        """Call ``fn(site, spikes)`` with the int8 spikes ``[T, *x.shape]`` of each forward.
        Returns a handle whose ``remove()`` stops it."""
        key = self._next_key
        self._next_key += 1
        self._recorders[key] = fn
        return _RecorderHandle(self, key)

    # -- counters -------------------------------------------------------------------------
    def reset_counters(self) -> None:
        self._counts = None
        self.calls = 0

    def stats(self) -> dict:
        """Counters as Python numbers: positive, negative, elements, T, calls, firing_rate."""
        pos, neg, el = (int(v) for v in self._counts.tolist()) if self._counts is not None else (0, 0, 0)
        T = self.T
        return {
            "positive": pos,
            "negative": neg,
            "elements": el,
            "T": T,
            "calls": self.calls,
            "firing_rate": (pos + neg) / (el * T) if el and not self.is_dense else 0.0,
        }

    def extra_repr(self) -> str:
        return f"neuron={getattr(self.neuron, 'registry_name', None) or type(self.neuron).__name__}"
