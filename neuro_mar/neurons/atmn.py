"""ATMN: the Adaptive Ternary Multi-step Neuron (MAR, arXiv 2601.21503).

Per channel, over micro-steps t = 0..T-1 with u_{-1} = 0::

    h_t = x_t + u_{t-1} / tau          charge (MAR's input-once use: x_t = x * [t == 0])
    s_t = +1 if h_t >= V; -1 if h_t <= -V; 0 otherwise
    u_t = h_t - s_t * V                soft reset by subtraction
    V   = exp(a), a learnable per channel

Unrolled: ``x = V * sum_t tau^t s_t + tau^(T-1) u_{T-1}``, so ``x_hat = V * sum_t tau^t s_t``
is the decoded activation and the remainder its quantisation error.

Gradients: spikes are fired on the normalised potential ``m = h / V`` through a SpikingJelly
surrogate, ``s = sg(m - 1) - sg(-m - 1)``; the threshold parameter ``a`` receives gradient
through V in the fire, the reset and the decoding (learned-step-size style).
"""
from __future__ import annotations

import math

import torch
from spikingjelly.activation_based import neuron as sj_neuron

from ..kernels import atmn_infer, atmn_ops, atmn_ref
from .input_once import InputOnceMixin, check_T, make_log_threshold
from .surrogates import resolve_surrogate, surrogate_name


class ATMN(InputOnceMixin, sj_neuron.BaseNode):
    """Adaptive Ternary Multi-step Neuron, a SpikingJelly 2.0 ``BaseNode``.

    Args:
        channels: number of channels (last input dimension) with their own threshold;
            ``None`` for one scalar threshold.
        T: micro-steps of the input-once form (:meth:`encode`).
        tau: leak factor; the state is divided by tau at each charge. 1 gives signed count
            coding (|x| up to T*V), 1/2 binary-expansion coding (step t weighs 2^-t).
        surrogate: SpikingJelly surrogate by name (``neuro_mar.neurons.surrogate_names()``,
            ``"straight_through"`` included) or a ``SurrogateFunctionBase`` instance.
        init_threshold: initial V (before :meth:`calibrate`).
        ternary: ``False`` gives the binary ablation neuron (fires {0, 1} only).
        detach_reset: detach the spike in the reset path from the graph.
        step_mode: SpikingJelly step mode, ``'s'`` ([N, *]) or ``'m'`` ([T, N, *]).
        store_v_seq: keep the post-reset potential of every step in ``v_seq``.

    In the step modes the input charges at every step, exactly as SpikingJelly neurons do;
    MAR's input-once use is :meth:`encode` / :meth:`decode`, which never build the T-1 zero
    inputs and do not touch the module's membrane memory.
    """

    def __init__(
        self,
        channels: int | None = None,
        T: int = 4,
        tau: float = 0.5,
        surrogate="sigmoid",
        init_threshold: float = 1.0,
        ternary: bool = True,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
    ):
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite positive number, got {tau!r}")
        super().__init__(
            v_threshold=1.0,  # nominal: the real threshold is exp(a), per channel
            v_reset=None,  # soft reset
            surrogate_function=resolve_surrogate(surrogate),
            detach_reset=bool(detach_reset),
            step_mode=step_mode,
            store_v_seq=store_v_seq,
        )
        self.T = check_T(T)
        self.tau = float(tau)
        self.ternary = bool(ternary)
        self.spike_levels = "ternary" if self.ternary else "binary"
        self.a = make_log_threshold(channels, init_threshold)
        self.init_log_threshold = math.log(init_threshold)

    # -- SpikingJelly functional transition (step modes 's' and 'm') -------------------
    def single_step_functional_forward(self, inputs, states):
        x, v = inputs[0], states[0]
        V = self.threshold.to(x.dtype)
        h = atmn_ref.charge(x, v, self.tau)
        s = atmn_ref.fire(h, V, self.surrogate_function, self.ternary)
        return (s,), (atmn_ref.reset(h, s, V, self.detach_reset), *states[1:])

    def multi_step_functional_forward(self, inputs, states):
        """Fused Triton kernel on CUDA (see ``neuro_mar.kernels``), else SpikingJelly's loop."""
        x_seq = inputs[0]
        if len(inputs) == 1 and atmn_ops.use_kernel(x_seq, self.surrogate_function) and x_seq.dim() >= 2:
            spikes, v_last = atmn_ops.atmn_multistep(x_seq, self.a, self.tau, self.surrogate_function,
                                                      self.ternary, self.detach_reset, v0=states[0].float())
            return (spikes,), (v_last.to(x_seq.dtype), *states[1:])
        return super().multi_step_functional_forward(inputs, states)

    # -- MAR's input-once form ----------------------------------------------------------
    def step_weights(self) -> torch.Tensor:
        return atmn_ref.step_weights(self.T, self.tau)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Fire ``x [*, channels]`` out over T micro-steps: spikes ``[T, *x.shape]`` in x.dtype.

        Equal (outputs and gradients) to multi-step mode fed ``[x, 0, ..., 0]`` from a reset
        state, without building the zeros. Computed in fp32 for half-precision inputs.
        """
        return atmn_ref.encode_once(x, self.threshold, self.T, self.tau, self.surrogate_function,
                                    self.ternary, self.detach_reset)

    def site_forward(self, x: torch.Tensor, want_spikes: bool = False, count: bool = False):
        """``(x_hat, spikes or None, (positive, negative) counts or None)`` in one pass: the fused
        Triton kernel on CUDA; without autograd (inference) elsewhere, the in-place loop of
        ``atmn_infer``; else encode + decode on the PyTorch reference path."""
        if atmn_ops.use_kernel(x, self.surrogate_function):
            return atmn_ops.atmn_once(x, self.a, self.T, self.tau, self.surrogate_function, self.ternary,
                                      self.detach_reset, write_spikes=want_spikes, count=count)
        if atmn_ops.lean_inference(x, self.a):
            return atmn_infer.atmn_once_nograd(x, self.threshold, self.T, self.tau, self.ternary, want_spikes, count)
        return super().site_forward(x, want_spikes, count)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The final potential of the input-once run in units of V, ``u_{T-1} / V``, so that
        ``x = V * (sum_t tau^t s_t + tau^(T-1) * residual(x))`` (no gradient)."""
        V = self.threshold.detach()
        return atmn_ref.residual_once(x, V, self.T, self.tau, self.surrogate_function, self.ternary) / V.to(x.dtype)

    def config(self) -> dict:
        """Registry options (for saving and swapping); ternary/binary is the registry name."""
        return {
            "T": self.T,
            "tau": self.tau,
            "surrogate": surrogate_name(self.surrogate_function),
            "detach_reset": self.detach_reset,
        }

    def extra_repr(self) -> str:
        ch = "scalar" if self.a.dim() == 0 else self.a.shape[0]
        return (
            f"channels={ch}, T={self.T}, tau={self.tau}, ternary={self.ternary}, "
            f"surrogate={type(self.surrogate_function).__name__}, detach_reset={self.detach_reset}, "
            f"step_mode={self.step_mode}"
        )
