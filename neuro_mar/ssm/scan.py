"""The SSD scan of Discrete Mamba-2, three ways.

Shapes (b batch, l length, h heads, p head dim, g groups of B/C with h % g == 0, n state):

    x          [b, l, h, p]   input, *not* scaled by dt (the "discrete" parametrisation)
    log_decay  [b, l, h]      a_t = -dt_t <= 0 (A = -1, dt = softplus(A_log + dt_bias))
    B, C       [b, l, g, n]   head i reads group i // (h // g)
    state      [b, h, p, n]

    S_t = exp(a_t) * S_{t-1} + x_t B_t^T          y_t = S_t C_t       ([b, l, h, p])

* :func:`ssd_naive` - the per-step recurrence: the oracle, and the decode step.
* :func:`ssd_chunked` - the chunked (SSD) algorithm in pure PyTorch, default on CPU.
* ``mamba_ssm``'s Triton SSD kernels on CUDA when importable (:mod:`neuro_mar.ssm.backends`).

All three accept an initial state and return ``(y, final_state)``; y is in x's dtype, the state
in fp32. Internally half-precision inputs are computed in fp32 on the PyTorch paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(x, log_decay, B, C, initial_state):
    if x.dim() != 4 or log_decay.shape != x.shape[:3] or B.dim() != 4 or B.shape != C.shape:
        raise ValueError(f"ssd scan: expected x [b,l,h,p], log_decay [b,l,h], B=C [b,l,g,n]; got "
                         f"{tuple(x.shape)}, {tuple(log_decay.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")
    b, l, h, p = x.shape
    if B.shape[:2] != (b, l) or h % B.shape[2]:
        raise ValueError(f"ssd scan: B/C {tuple(B.shape)} do not match x {tuple(x.shape)} (heads must be a multiple of groups)")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[-1]):
        raise ValueError(f"ssd scan: initial_state {tuple(initial_state.shape)} != {(b, h, p, B.shape[-1])}")


def expand_groups(B: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, l, g, n] -> [b, l, heads, n] (head i reads group i // (heads // g))."""
    g = B.shape[2]
    return B if g == heads else B.repeat_interleave(heads // g, dim=2)


def _f32(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ssd_naive(x, log_decay, B, C, initial_state=None):
    """Step-by-step recurrence (the oracle). Returns ``(y [b,l,h,p], state [b,h,p,n])``."""
    _check(x, log_decay, B, C, initial_state)
    b, l, h, p = x.shape
    xf, af = _f32(x), _f32(log_decay)
    Bf, Cf = _f32(expand_groups(B, h)), _f32(expand_groups(C, h))
    S = (xf.new_zeros(b, h, p, Bf.shape[-1]) if initial_state is None else _f32(initial_state))
    ys = []
    for t in range(l):
        S = af[:, t, :, None, None].exp() * S + xf[:, t, :, :, None] * Bf[:, t, :, None, :]
        ys.append((S * Cf[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    return y.to(x.dtype), S


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., T] -> [..., T, T] with out[i, j] = sum_{k=j+1..i} a_k for i >= j, -inf above the
    diagonal (computed by a masked cumsum, which is exact on the diagonal and stable)."""
    T = a.shape[-1]
    rep = a[..., :, None].expand(*a.shape, T)
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = rep.masked_fill(~strict, 0).cumsum(dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return seg.masked_fill(~lower, float("-inf"))


def ssd_chunked(x, log_decay, B, C, initial_state=None, chunk_size: int = 64):
    """Chunked SSD scan in pure PyTorch (quadratic within chunks, recurrent across them).

    Same contract as :func:`ssd_naive`; any length, any chunk size >= 1.
    """
    _check(x, log_decay, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, l, h, p = x.shape
    n = B.shape[-1]
    xf, af = _f32(x), _f32(log_decay)
    Bf, Cf = _f32(expand_groups(B, h)), _f32(expand_groups(C, h))
    Q = chunk_size
    pad = (-l) % Q
    if pad:  # padded steps carry x = 0 and no decay, so they change neither y[:l] nor the state
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        af = F.pad(af, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // Q
    xc = xf.view(b, c, Q, h, p)
    Bc = Bf.view(b, c, Q, h, n)
    Cc = Cf.view(b, c, Q, h, n)
    ac = af.view(b, c, Q, h).permute(0, 3, 1, 2)  # [b, h, c, Q]
    a_cum = ac.cumsum(-1)

    # 1. within each chunk: y = (C B^T * decay) x
    decay_in = _segsum(ac).exp()  # [b, h, c, Q, Q]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay_in, xc)
    # 2. each chunk's contribution to the state at its end
    decay_to_end = (a_cum[..., -1:] - a_cum).exp()  # [b, h, c, Q]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xc)
    # 3. pass states across chunks (a short recurrence written as a (c+1)x(c+1) decay matrix)
    S0 = xf.new_zeros(b, 1, h, p, n) if initial_state is None else _f32(initial_state).unsqueeze(1)
    states = torch.cat([S0, chunk_states], dim=1)  # [b, c+1, h, p, n]
    decay_chunks = _segsum(F.pad(a_cum[..., -1], (1, 0))).exp()  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, states)
    entering, final = states[:, :-1], states[:, -1]
    # 4. the state entering each chunk, read out inside it
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, entering, a_cum.exp())
    y = (y_diag + y_off).reshape(b, c * Q, h, p)[:, :l]
    return y.to(x.dtype), final
