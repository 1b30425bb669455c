"""ATMN's input-once op when no gradient is wanted and the Triton kernels do not run (inference on
a CPU: decoding and prefill).

The reference (:mod:`atmn_ref`) is written for autograd: per micro-step it calls the surrogate's
autograd function twice, keeps every spike tensor, stacks them and casts them for the decoding.
Decoding one token on a CPU, those small tensor operations (about 40 per site and token, 120 sites
in SmolLM2-135M) cost more than the model's matrix products. Here one potential buffer is updated
in place and the decoded value accumulated as it goes. The equations and their rounding are the
reference's: ``m = h * (1/V)``; a spike where ``m >= 1`` (and ``-1`` where ``m <= -1``, ternary),
which is exactly where the Heaviside forward of ``sg(m - 1)`` (``sg(-m - 1)``) is 1; the reset
``h - s * V``; the charge ``u * (1/tau)``; fp32 math for half inputs.
"""
from __future__ import annotations

import functools

import torch


def _count(trace: torch.Tensor) -> torch.Tensor:
    """``int64 [positive, negative]`` spikes of a trace of -1/0/1 values. A large trace (up to 2^24
    elements, where an fp32 sum of them is an exact integer) is counted from its non-zeros and
    its sum, two reductions with no temporary; a small one (a decoding step's, where each
    operation's fixed cost is what counts) and a huge one by counting each sign."""
    if 2**16 < trace.numel() < 2**24:
        spikes, net = torch.count_nonzero(trace), trace.sum().to(torch.int64)
        positive = (spikes + net).div_(2, rounding_mode="floor")
        return torch.stack([positive, spikes - positive])
    return torch.stack([torch.count_nonzero(trace > 0), torch.count_nonzero(trace < 0)])


def atmn_once_nograd(x: torch.Tensor, V: torch.Tensor, T: int, tau: float, ternary: bool = True,
                     want_spikes: bool = False, count: bool = False):
    """``x [..., C]``, ``V [C]`` (or a scalar) -> ``(x_hat in x.dtype, spikes [T, *x.shape] in
    x.dtype or None, int64 [positive, negative] or None)``, as the reference's
    ``atmn_once_ref`` + counting gives them, without autograd."""
    with torch.no_grad():
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x.clone()
        Vf = V.to(h.dtype)
        inv = Vf.reciprocal()
        k = 1.0 / tau
        m, neg = torch.empty_like(h), torch.empty_like(h)
        trace = torch.empty((T, *h.shape), dtype=h.dtype, device=h.device)
        for t in range(T):
            if t:
                h.mul_(k)
            torch.mul(h, inv, out=m)
            s = trace[t]
            torch.ge(m, 1.0, out=s)  # the comparisons write 1.0 / 0.0 straight into s
            if ternary:
                s.sub_(torch.le(m, -1.0, out=neg))
            if t < T - 1:  # the last reset only makes the residual, which is not returned
                h.addcmul_(s, Vf, value=-1)  # h - s * V (s * V is exact)
        w = _weights(T, tau, h.dtype, h.device).view(-1, *([1] * h.dim()))
        acc = (trace * w).sum(0)  # the reference's decoding, term for term
        x_hat = (acc * Vf).to(x.dtype)
        return x_hat, (trace.to(x.dtype) if want_spikes else None), (_count(trace) if count else None)


@functools.lru_cache(maxsize=64)
def _weights(T: int, tau: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tau^t [T]`` as the reference's ``step_weights`` rounds them."""
    return torch.tensor([tau**t for t in range(T)], dtype=torch.float64).to(device=device, dtype=dtype)
