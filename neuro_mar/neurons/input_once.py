"""What every neuron of the registry offers for MAR's input-once use.

A spike site hands a dense activation ``x`` (channels in the last dimension) to a neuron once;
the neuron fires it out over ``T`` micro-steps as spikes ``s`` of shape ``[T, *x.shape]`` and
the next layer sees the decoded activation

    x_hat = V * sum_t w_t * s_t

with ``V = exp(a)`` the neuron's per-channel threshold and ``w_t`` its step weights
(:meth:`InputOnceMixin.step_weights`, in units of V). For ATMN ``w_t = tau^t``.
"""
from __future__ import annotations

import abc
import math

import torch
from spikingjelly.activation_based.base import MemoryModule
from torch import nn

from ..kernels import atmn_ref

#: Smallest threshold calibration may set (keeps log(V) finite for dead channels).
MIN_THRESHOLD = 1e-6


class InputOnceMixin(abc.ABC):
    """Shared threshold handling, decoding and calibration.

    Subclasses provide ``self.a`` (an ``nn.Parameter`` of shape ``[channels]`` or ``[]``),
    ``self.T``, :meth:`step_weights` and :meth:`encode`.
    """

    #: 'ternary' ({-1,0,1}), 'binary' ({0,1}) or 'dense' (no spikes).
    spike_levels: str = "ternary"
    #: the registry name this module was created under (set by the registry).
    registry_name: str | None = None

    # -- thresholds ---------------------------------------------------------------------
    @property
    def threshold(self) -> torch.Tensor:
        """V = exp(a), shape ``[channels]`` (or ``[]``), always > 0."""
        return self.a.exp()

    @property
    def channels(self) -> int | None:
        return None if self.a.dim() == 0 else self.a.shape[0]

    @abc.abstractmethod
    def step_weights(self) -> torch.Tensor:
        """Decoding weights w_t of the T micro-steps, in units of V (float64 [T])."""

    def representable_max(self) -> float:
        """Largest |x| / V the T positive micro-steps can express (sum of the step weights)."""
        return float(self.step_weights().sum())

    # -- input-once API -----------------------------------------------------------------
    def decode(self, spikes: torch.Tensor) -> torch.Tensor:
        """``spikes [T, *shape] -> x_hat [*shape] = V * sum_t w_t s_t`` (fp32 accumulation for
        half-precision spikes), returned in the spikes' dtype."""
        if spikes.shape[0] != self.T:
            raise ValueError(f"decode expects spikes of shape [T={self.T}, ...], got {tuple(spikes.shape)}")
        return atmn_ref.decode(spikes, self.threshold, self.step_weights())

    def site_forward(self, x: torch.Tensor, want_spikes: bool = False, count: bool = False):
        """What a :class:`SpikeSite` needs in one call: ``(x_hat in x.dtype, spikes or None,
        int64 tensor [positive, negative] or None)``. Neurons with a fused kernel override it."""
        spikes = self.encode(x)
        x_hat = self.decode(spikes).to(x.dtype)
        counts = None
        if count:
            with torch.no_grad():
                s = spikes.detach()
                counts = torch.stack([(s > 0).sum(), (s < 0).sum()])
        return x_hat, (spikes.detach() if want_spikes else None), counts

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode then decode: returns ``(x_hat, spikes)`` with ``x_hat`` in ``x.dtype``."""
        spikes = self.encode(x)
        return self.decode(spikes).to(x.dtype), spikes

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, percentile: float = 99.9, max_rows: int = 65536) -> torch.Tensor:
        """Set ``a`` from activation statistics: V covers the ``percentile`` of |x| per channel.

        ``x`` is a sample of dense activations ``[..., channels]``. Per channel,
        ``V = quantile(|x|, percentile) / representable_max()`` so the neuron can express the
        chosen percentile without saturating. At most ``max_rows`` rows (evenly strided) are
        used. Returns the new threshold V.
        """
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        xa = x.detach().float().abs()
        if self.a.dim() == 0:
            xa = xa.reshape(-1, 1)
        else:
            if xa.shape[-1] != self.a.shape[0]:
                raise ValueError(
                    f"calibrate: sample has {xa.shape[-1]} channels in its last dimension, "
                    f"the neuron has {self.a.shape[0]}"
                )
            xa = xa.reshape(-1, self.a.shape[0])
        if xa.shape[0] == 0:
            raise ValueError("calibrate: the activation sample is empty")
        bad = ~torch.isfinite(xa)
        if bad.any():  # one NaN would make that channel's threshold NaN for good
            chans = bad.reshape(-1, xa.shape[-1]).any(0).nonzero().flatten().tolist()
            raise ValueError(f"calibrate: the activation sample holds {int(bad.sum())} NaN or infinite values "
                             f"(channels {chans[:8]}{' ...' if len(chans) > 8 else ''}); what feeds this neuron is "
                             "not finite: check the model's weights and inputs")
        if xa.shape[0] > max_rows:
            step = math.ceil(xa.shape[0] / max_rows)
            xa = xa[::step]
        # kthvalue, not torch.quantile: the latter refuses inputs of more than 2^24 elements.
        k = min(max(1, math.ceil(percentile / 100.0 * xa.shape[0])), xa.shape[0])
        q = torch.kthvalue(xa, k, dim=0).values
        v = (q / self.representable_max()).clamp_min(MIN_THRESHOLD)
        self.a.copy_(v.log().reshape(self.a.shape).to(self.a))
        return self.threshold.detach()


def make_log_threshold(channels: int | None, init_threshold: float) -> nn.Parameter:
    """The learnable log-threshold ``a``: shape ``[channels]``, or ``[]`` if channels is None."""
    if init_threshold <= 0 or not math.isfinite(init_threshold):
        raise ValueError(f"init_threshold must be a finite positive number, got {init_threshold}")
    if channels is not None and (not isinstance(channels, int) or channels < 1):
        raise ValueError(f"channels must be a positive int or None, got {channels!r}")
    shape = () if channels is None else (channels,)
    return nn.Parameter(torch.full(shape, math.log(init_threshold)))


def check_T(T) -> int:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T (micro-steps) must be a positive int, got {T!r}")
    return T


class InputOnceModule(InputOnceMixin, MemoryModule):
    """Base of the registry's adapter neurons: a SpikingJelly ``MemoryModule``, so ``reset_net``,
    ``set_step_mode`` and monitors reach it as they reach ATMN. It keeps no membrane memory between
    calls (every call is one whole input-once encoding), so a reset has nothing to clear; it has no
    step-by-step form of its own, so calling it as a step-mode neuron is refused with a pointer to
    what it offers instead."""

    def __init__(self):
        MemoryModule.__init__(self)

    def single_step_forward(self, x: torch.Tensor):
        raise TypeError(f"{type(self).__name__} runs in MAR's input-once form only: use encode/decode/quantize, or "
                        "put it in a SpikeSite; for a step-mode neuron use ATMN or the wrapped library neuron")

    def multi_step_forward(self, x_seq: torch.Tensor):
        return self.single_step_forward(x_seq)
