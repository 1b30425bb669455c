"""SpikeSite: the module MAR places before a projection."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Recorder = Callable[["SpikeSite", torch.Tensor], None]


class _RecorderHandle:
    def __init__(self, site: "SpikeSite", key: int):
        self._site, self._key = site, key

    def remove(self) -> None:
        self._site._recorders.pop(self._key, None)


class SpikeSite(nn.Module):
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
    """

    def __init__(self, neuron: nn.Module, counting: bool = True):
        super().__init__()
        self.neuron = neuron
        self.counting = counting
        self._recorders: dict[int, Recorder] = {}
        self._next_key = 0
        self._counts: torch.Tensor | None = None  # [positive, negative, elements], on x's device
        self.calls = 0

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_dense:
            if self.counting:
                self._counters(x.device)[2] += x.numel()
                self.calls += 1
            return x
        want = bool(self._recorders)
        x_hat, spikes, counts = self.neuron.site_forward(x, want_spikes=want, count=self.counting)
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
