"""ATMN's input-once op when no gradient is wanted and the Triton kernels do not run (inference on
a CPU: decoding and prefill).

The reference (:mod:`atmn_ref`) is written for autograd: per micro-step it calls the surrogate's
autograd function twice, keeps every spike tensor, stacks them and casts them for the decoding.
Decoding one token on a CPU, those small tensor operations (about 40 per site and token, 120 sites
in SmolLM2-135M) cost more than the model's matrix products. Here one potential buffer is updated
in place, in blocks of rows that stay in the cache. The equations and their rounding are the
reference's: ``m = h * (1/V)``; a spike where ``m >= 1`` (and ``-1`` where ``m <= -1``,
ternary), which is exactly where the Heaviside forward of ``sg(m - 1)`` (``sg(-m - 1)``) is 1;
the reset ``h - s * V``; the charge ``u * (1/tau)``; fp32 math for half inputs. Spikes and counts
equal the reference's bit for bit, and so does the decoded value but for the order in which a
blocked input's T-term sum may round (1 ulp).
"""
from __future__ import annotations

import functools

import torch

from . import atmn_ref


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


#: elements of x per block of rows: the loop's buffers (potential, trace, temporaries) of one block
#: stay in the cache instead of streaming a prefill's activations through memory some 30 times,
#: and each operation is still large enough for PyTorch's threads (2^18: 155 ms against 490 ms
#: unblocked for a [4096, 1536] site on a 2-core machine; 2^12 to 2^22 measured)
BLOCK_ELEMENTS = 1 << 18


def atmn_once_nograd(x: torch.Tensor, V: torch.Tensor, T: int, tau: float, ternary: bool = True,
                     want_spikes: bool = False, count: bool = False):
    """``x [..., C]``, ``V [C]`` (or a scalar) -> ``(x_hat in x.dtype, spikes [T, *x.shape] in
    x.dtype or None, int64 [positive, negative] or None)``, as the reference's
    ``atmn_once_ref`` + counting gives them, without autograd. Large inputs run in blocks of
    rows (:data:`BLOCK_ELEMENTS`); every element's result is the same either way."""
    if x.dim() == 0 or x.numel() <= BLOCK_ELEMENTS or x.device.type != "cpu":
        return _once(x, V, T, tau, ternary, want_spikes, count)
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, BLOCK_ELEMENTS // x.shape[-1])
    x_hat = torch.empty_like(rows)
    spikes = torch.empty((T, *rows.shape), dtype=x.dtype, device=x.device) if want_spikes else None
    counts = torch.zeros(2, dtype=torch.int64, device=x.device) if count else None
    for i in range(0, rows.shape[0], step):
        h, s, c = _once(rows[i:i + step], V, T, tau, ternary, want_spikes, count)
        x_hat[i:i + step] = h
        if spikes is not None:
            spikes[:, i:i + step] = s
        if counts is not None:
            counts += c
    return (x_hat.reshape(x.shape), None if spikes is None else spikes.reshape(T, *x.shape), counts)


def _once(x, V, T, tau, ternary, want_spikes, count):
    """:func:`atmn_once_nograd` on one block."""
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
    """The reference's ``step_weights`` (``tau^t [T]``) in ``dtype`` on ``device``, made once."""
    return atmn_ref.step_weights(T, tau).to(device=device, dtype=dtype)
