"""PyTorch reference of ATMN's equations (the oracle of the Triton kernels in ``atmn.py``).

These functions are what :class:`neuro_mar.neurons.ATMN` runs on its PyTorch path; autograd
through them defines the reference gradients. Per channel (last dimension), V = exp(a) > 0:

    h_t = x_t + (1/tau) * u_{t-1}      (u_{-1} = v0, zero by default)
    m_t = h_t * (1/V)                  (normalised potential; 1/tau and 1/V are rounded once)
    s_t = sg(m_t - 1) - [ternary] sg(-m_t - 1)      (Heaviside forward, surrogate backward)
    u_t = h_t - s_t * V                (s_t detached here when detach_reset)

Input-once: x_0 = x, x_t = 0 for t > 0, decoded ``x_hat = V * sum_t tau^t s_t``.
"""
from __future__ import annotations

import torch


def charge(x: torch.Tensor | None, u: torch.Tensor | None, tau: float) -> torch.Tensor:
    k = 1.0 / tau
    if u is None:
        return x
    return u * k if x is None else x + u * k


def fire(h: torch.Tensor, V: torch.Tensor, surrogate, ternary: bool) -> torch.Tensor:
    m = h * V.reciprocal()
    s = surrogate(m - 1.0)
    if ternary:
        s = s - surrogate(-m - 1.0)
    return s


def reset(h: torch.Tensor, s: torch.Tensor, V: torch.Tensor, detach_reset: bool) -> torch.Tensor:
    return h - (s.detach() if detach_reset else s) * V


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def encode_once(x, V, T, tau, surrogate, ternary=True, detach_reset=False):
    """Spikes ``[T, *x.shape]`` (in x.dtype) of the input-once run; fp32 math for half inputs."""
    xf = _compute_dtype(x)
    Vf = V.to(xf.dtype)
    u = None
    out = []
    for t in range(T):
        h = charge(xf if t == 0 else None, u, tau)
        s = fire(h, Vf, surrogate, ternary)
        u = reset(h, s, Vf, detach_reset)
        out.append(s)
    return torch.stack(out).to(x.dtype)


def residual_once(x, V, T, tau, surrogate, ternary=True):
    """Final potential u_{T-1} of the input-once run (no gradient)."""
    with torch.no_grad():
        xf = _compute_dtype(x)
        Vf = V.to(xf.dtype)
        u = None
        for t in range(T):
            h = charge(xf if t == 0 else None, u, tau)
            u = reset(h, fire(h, Vf, surrogate, ternary), Vf, False)
    return u


def step_weights(T: int, tau: float) -> torch.Tensor:
    return torch.tensor([tau**t for t in range(T)], dtype=torch.float64)


def decode(spikes, V, weights):
    """``x_hat = V * sum_t w_t s_t`` accumulated in fp32 (or fp64), returned in spikes' dtype."""
    acc_dtype = torch.float32 if spikes.dtype in (torch.float16, torch.bfloat16) else spikes.dtype
    w = weights.to(device=spikes.device, dtype=acc_dtype).view(-1, *([1] * (spikes.dim() - 1)))
    acc = (spikes.to(acc_dtype) * w).sum(0)
    return (acc * V.to(acc_dtype)).to(spikes.dtype)


def atmn_once_ref(x, a, T, tau, surrogate, ternary=True, detach_reset=False):
    """Fused reference of the input-once op: ``(x_hat, spikes)``; gradients reach x and a."""
    V = a.exp()
    spikes = encode_once(x, V, T, tau, surrogate, ternary, detach_reset)
    return decode(spikes, V, step_weights(T, tau)).to(x.dtype), spikes


def atmn_multistep_ref(x_seq, a, tau, surrogate, ternary=True, detach_reset=False, v0=None):
    """Multi-step form: ``x_seq [T, ..., C] -> (spikes [T, ..., C] in x dtype, v_last)``, charging
    at each step; fp32 state for half inputs (as the kernel keeps it)."""
    xf = _compute_dtype(x_seq)
    V = a.exp().to(xf.dtype)
    u = v0.to(xf.dtype) if v0 is not None else torch.zeros_like(xf[0])
    out = []
    for t in range(xf.shape[0]):
        h = charge(xf[t], u, tau)
        s = fire(h, V, surrogate, ternary)
        u = reset(h, s, V, detach_reset)
        out.append(s)
    return torch.stack(out).to(x_seq.dtype), u
