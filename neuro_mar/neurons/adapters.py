"""Other neurons driven input-once, with the same API as :class:`~neuro_mar.neurons.ATMN`.

Each adapter keeps a learnable per-channel log-threshold ``a`` and drives its neuron with the
normalised input ``x / V`` against a unit threshold (for linear soft-reset neurons this is the
same neuron with threshold V), so thresholds carry over between neuron types unchanged.

For a neuron with leak ``k`` (state multiplied by k per step) and input gain ``g`` (input
multiplied by g when charged), soft reset by the threshold gives the exact decoding
``x = V * sum_t k^-t / g * s_t + residual``: the step weights are ``w_t = k^-t / g``.
"""
from __future__ import annotations

import abc
import inspect
import math

import torch

from .input_once import InputOnceModule, check_T, make_log_threshold
from .surrogates import resolve_surrogate, surrogate_name


class _LinearSoftResetAdapter(InputOnceModule):
    """Base of the adapters around linear leaky/integrating soft-reset neurons."""

    def __init__(self, channels, T, init_threshold, leak: float, gain: float):
        super().__init__()
        self.T = check_T(T)
        self.leak = float(leak)
        self.gain = float(gain)
        if not (0 < self.leak <= 1) or self.gain <= 0:
            raise ValueError(f"leak must be in (0, 1] and gain > 0, got leak={leak}, gain={gain}")
        self.a = make_log_threshold(channels, init_threshold)
        self.init_log_threshold = math.log(init_threshold)

    def step_weights(self) -> torch.Tensor:
        return torch.tensor([self.leak ** (-t) / self.gain for t in range(self.T)], dtype=torch.float64)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Spikes ``[T, *x.shape]`` in x.dtype (computed in fp32 for half inputs)."""
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return self._run(xf / self.threshold.to(xf.dtype)).to(x.dtype)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Final membrane potential in units of V, so that
        ``x = V * (sum_t w_t s_t + w_{T-1} * residual(x))`` (no gradient)."""
        with torch.no_grad():
            return self._run(x / self.threshold.to(x.dtype), keep_state=True)[1]

    @abc.abstractmethod
    def _run(self, xn: torch.Tensor, keep_state: bool = False):
        """Spikes of the normalised input; with keep_state, (spikes, final potential)."""


class SpikingJellyInputOnce(_LinearSoftResetAdapter):
    """A SpikingJelly 2.0 neuron (IF, LIF, TernaryIF, TernaryLIF) fed ``[x/V, 0, ..., 0]``.

    The node runs in multi-step mode with soft reset (``v_reset=None``) and a unit threshold,
    and is reset after every call, so no state leaks between calls.
    """

    def __init__(self, node_cls, channels=None, T=4, surrogate="sigmoid", init_threshold=1.0,
                 spike_levels="binary", **node_options):
        sig = inspect.signature(node_cls.__init__).parameters
        tau = float(node_options.get("tau", sig["tau"].default)) if "tau" in sig else None
        decay_input = bool(node_options.get("decay_input", sig["decay_input"].default)) if "decay_input" in sig else False
        leak, gain = (1.0, 1.0) if tau is None else (1.0 - 1.0 / tau, 1.0 / tau if decay_input else 1.0)
        super().__init__(channels, T, init_threshold, leak, gain)
        self.node = node_cls(v_threshold=1.0, v_reset=None, surrogate_function=resolve_surrogate(surrogate),
                             step_mode="m", **node_options)
        self.spike_levels = spike_levels
        self._options = {"T": T, "surrogate": surrogate_name(self.node.surrogate_function), **node_options}

    def _run(self, xn, keep_state=False):
        x_seq = torch.cat([xn.unsqueeze(0), xn.new_zeros((self.T - 1, *xn.shape))])
        self.node.reset()
        try:
            spikes = self.node(x_seq)
            return (spikes, self.node.v) if keep_state else spikes
        finally:
            self.node.reset()

    def config(self) -> dict:
        return dict(self._options)


class SnnTorchLeaky(_LinearSoftResetAdapter):
    """snntorch 1.0's ``Leaky`` (binary, leak ``beta``), fed ``x/V`` once.

    Reset by subtraction without delay (``reset_delay=False``), so a spike's charge is removed in
    the step that fires it, as in every other neuron here.
    """

    spike_levels = "binary"

    def __init__(self, channels=None, T=4, beta=0.9, surrogate="atan", init_threshold=1.0):
        import snntorch
        from snntorch import surrogate as snn_surrogate

        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        super().__init__(channels, T, init_threshold, leak=beta, gain=1.0)
        grads = {"atan": snn_surrogate.atan, "sigmoid": snn_surrogate.sigmoid, "fast_sigmoid": snn_surrogate.fast_sigmoid,
                 "straight_through": snn_surrogate.straight_through_estimator}
        if surrogate not in grads:
            raise ValueError(f"snntorch-leaky surrogate must be one of {sorted(grads)}, got {surrogate!r}")
        # snntorch reads its buffers' values while it is built, which a meta device (Hugging Face's
        # from_pretrained builds the model there) cannot give: build it on the host; .to() moves it
        with torch.device("cpu"):
            self.lif = snntorch.Leaky(beta=beta, threshold=1.0, spike_grad=grads[surrogate](),
                                      reset_mechanism="subtract", reset_delay=False)
        self.leak = float(self.lif.beta)  # snntorch keeps beta as a float32 buffer: decode with that value
        self._options = {"T": T, "beta": beta, "surrogate": surrogate}

    def _run(self, xn, keep_state=False):
        mem = torch.zeros_like(xn)
        zero = torch.zeros_like(xn)
        out = []
        for t in range(self.T):
            spk, mem = self.lif(xn if t == 0 else zero, mem)
            out.append(spk)
        return (torch.stack(out), mem) if keep_state else torch.stack(out)

    def config(self) -> dict:
        return dict(self._options)


class _RoundClip(torch.autograd.Function):
    """clip(round(z), -D, D) with the straight-through gradient inside [-D, D]."""

    @staticmethod
    def forward(ctx, z, D):
        ctx.save_for_backward(z)
        ctx.D = D
        return z.round().clamp(-D, D)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * (z.abs() <= ctx.D + 0.5).to(g), None


class SILIF(InputOnceModule):
    """SpikingMamba's signed-integer neuron (arXiv 2510.04595), input-once.

    Training view: ``n = clip(round(x / V), -D, D)`` with a straight-through gradient.
    Spikes: n is fired as |n| unit spikes of its sign over ``T = D`` binary micro-steps
    (``s_t = sign(n) * [t < |n|]``), so ``x_hat = V * sum_t s_t = V * n``. Cost convention:
    |n| unit accumulates (one per unit spike), not one integer MAC.
    """

    spike_levels = "ternary"

    def __init__(self, channels=None, D=4, init_threshold=1.0):
        super().__init__()
        self.D = self.T = check_T(D)
        self.a = make_log_threshold(channels, init_threshold)
        self.init_log_threshold = math.log(init_threshold)

    def step_weights(self) -> torch.Tensor:
        return torch.ones(self.T, dtype=torch.float64)

    def encode(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        n = _RoundClip.apply(xf / self.threshold.to(xf.dtype), self.D)
        steps = torch.arange(self.T, device=x.device, dtype=xf.dtype).view(-1, *([1] * x.dim()))
        hard = torch.sign(n.detach()) * (steps < n.detach().abs()).to(xf.dtype)
        # exact spike values; gradient reaches n as if x_hat = V * n (sum over t of the extra term is n - n.detach() = 0)
        return (hard + (n - n.detach()).unsqueeze(0) / self.T).to(x.dtype)

    def residual(self, x):
        """``x / V - n`` (units of V): ``x = V * (sum_t s_t + residual(x))``."""
        with torch.no_grad():
            xn = x / self.threshold.to(x.dtype)
            return xn - xn.round().clamp(-self.D, self.D)

    def config(self) -> dict:
        return {"D": self.D}


class Dense(InputOnceModule):
    """No spikes: the site passes its input through unchanged (the Stage-1 model)."""

    spike_levels = "dense"

    def __init__(self, channels=None):
        super().__init__()
        self.T = 1
        self._channels = channels
        self.register_parameter("a", None)

    @property
    def channels(self):
        return self._channels

    @property
    def threshold(self):
        return None

    def step_weights(self):
        return torch.ones(1, dtype=torch.float64)

    def encode(self, x):
        return x.unsqueeze(0)

    def decode(self, spikes):
        return spikes[0]

    def quantize(self, x):
        return x, x.unsqueeze(0)

    def site_forward(self, x, want_spikes=False, count=False):
        return x, None, None

    def calibrate(self, x, percentile: float = 99.9, max_rows: int = 65536):
        return None

    def config(self) -> dict:
        return {}

