"""Triton kernels of the mixer's causal depthwise convolution + SiLU, channels-last, with the
PyTorch reference in ``causal_conv_ref.py`` beside them.

``y[b, t, c] = silu(bias[c] + sum_k w[c, k] x[b, t - (K-1) + k, c])`` (zeros before t = 0). The
input may be a strided view (the mixer's xBC is a column slice of in_proj's output): only its
channel stride must be 1, so no transpose, padding copy or concatenation is made. The forward
writes y in x's dtype and saves nothing but x; the backward recomputes the pre-activations it
needs from x (the 2K-1 shifted input tiles are loaded once) and writes dx, with the weight and bias
gradients reduced per program and summed on the host (deterministic, no atomics). Accumulation is
fp32 for every input dtype.

Importing this module imports triton; :mod:`neuro_mar.kernels.causal_conv_ops` does so on first use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import CachedLaunch, next_pow2


@triton.jit
def _shifted(xb, t, c, shift, L, C, sxl):
    """x[t + shift, c] as an fp32 [BT, BC] tile (0 outside 0 <= t + shift < L)."""
    tt = t + shift
    m = ((tt >= 0) & (tt < L))[:, None] & (c < C)[None, :]
    return tl.load(xb + tt[:, None].to(tl.int64) * sxl + c[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _conv_fwd_kernel(X, W, BIAS, Y, L, C, sxb, sxl, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=cm, other=0.0)[None, :]
    for k in tl.static_range(K):
        acc += _shifted(X + b * sxb, t, c, k - (K - 1), L, C, sxl) * tl.load(W + c * K + k, mask=cm, other=0.0)[None, :]
    y = acc / (1.0 + tl.exp(-acc))
    m = (t < L)[:, None] & cm[None, :]
    tl.store(Y + b * L * C + t[:, None].to(tl.int64) * C + c[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_kernel(X, W, BIAS, DY, DX, DWP, DBP, L, C, sxb, sxl, K: tl.constexpr, KP: tl.constexpr,
                     HAS_BIAS: tl.constexpr, LOOP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dx[t] = sum_j w[K-1-j] g[t+j] with g = dy * silu'(pre), pre recomputed at t..t+K-1 from
    x[t-K+1 .. t+K-1]; dw[k] = sum_t g[t] x[t-K+1+k], db = sum_t g[t], summed over this program's
    LOOP time tiles into row (b * programs along t + program_id(0)) of DWP [rows, K, C] and DBP [rows, C]."""
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    xb = X + b * sxb
    ws = ()
    for k in tl.static_range(K):
        ws = ws + (tl.load(W + c * K + k, mask=cm, other=0.0)[None, :],)
    bias = tl.zeros([1, BC], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(BIAS + c, mask=cm, other=0.0)[None, :]
    kk = tl.arange(0, KP)[:, None]  # the weight gradient's taps as rows of one [KP, BC] accumulator
    dw = tl.zeros([KP, BC], dtype=tl.float32)
    db = tl.zeros([BC], dtype=tl.float32)
    for i in range(LOOP):
        t = (tl.program_id(0) * LOOP + i) * BT + tl.arange(0, BT)
        xs = ()
        for s in tl.static_range(2 * K - 1):
            xs = xs + (_shifted(xb, t, c, s - (K - 1), L, C, sxl),)
        dx = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(K):
            pre = bias
            for k in tl.static_range(K):
                pre = pre + ws[k] * xs[j + k]
            dy = _shifted(DY + b * L * C, t, c, j, L, C, C)
            sig = 1.0 / (1.0 + tl.exp(-pre))
            g = dy * sig * (1.0 + pre * (1.0 - sig))
            dx += ws[K - 1 - j] * g
            if j == 0:
                db += tl.sum(g, axis=0)
                for k in tl.static_range(K):
                    dw += tl.where(kk == k, tl.sum(g * xs[k], axis=0)[None, :], 0.0)
        m = (t < L)[:, None] & cm[None, :]
        tl.store(DX + b * L * C + t[:, None].to(tl.int64) * C + c[None, :], dx.to(DX.dtype.element_ty), mask=m)
    row = b * tl.num_programs(0) + tl.program_id(0)
    tl.store(DWP + (row * K + kk) * C + c[None, :], dw, mask=(kk < K) & cm[None, :])
    tl.store(DBP + row * C + c, db, mask=cm)


_launch_fwd = CachedLaunch(_conv_fwd_kernel)
_launch_bwd = CachedLaunch(_conv_bwd_kernel)

#: [time rows, channels] per program and warps; the backward's from benchmarks/causal_conv.py's
#: sweep on an H200 ([16, 1024, 1728] bf16, K = 4, 2026-11-29: 0.395 ms fwd+bwd, 4 warps 0.597)
TILES = {"fwd": {"rows": 32, "cols": 128, "num_warps": 4}, "bwd": {"rows": 16, "cols": 128, "num_warps": 2}}
#: the backward may give each program up to MAX_LOOP time tiles while that leaves MIN_PROGRAMS
#: programs (fewer weight-gradient partials); at the tile above one was fastest (8: 0.489 ms)
MAX_LOOP, MIN_PROGRAMS = 1, 2048


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x [b, l, C] with channel stride 1 (a strided view is used as is)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _geometry(kernel: str, L: int, C: int) -> tuple[int, int, int]:
    """Time rows and channels per program and the warps of ``kernel`` for L steps of C channels."""
    tile = TILES[kernel]
    return min(tile["rows"], next_pow2(L)), min(tile["cols"], next_pow2(C)), tile["num_warps"]


def conv_fwd(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [b, l, C]`` (channel stride 1 or copied), ``w [C, K]`` fp32 contiguous, ``bias [C]`` fp32
    or None -> ``silu(conv) [b, l, C]`` contiguous in x's dtype."""
    x = _channels_last(x)
    B, L, C = x.shape
    K = w.shape[1]
    y = torch.empty((B, L, C), device=x.device, dtype=x.dtype)
    if y.numel():
        BT, BC, warps = _geometry("fwd", L, C)
        _launch_fwd((-(-L // BT), -(-C // BC), B), x, w, w if bias is None else bias, y, L, C, x.stride(0),
                    x.stride(1), K, bias is not None, BT, BC, num_warps=warps)
    return y


def conv_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
    """``(dx [b, l, C] in x's dtype, dw [C, K] fp32, db [C] fp32 or None)`` for ``dy [b, l, C]``."""
    x, dy = _channels_last(x), dy.contiguous()
    B, L, C = x.shape
    K = w.shape[1]
    dx = torch.empty((B, L, C), device=x.device, dtype=x.dtype)
    if not dx.numel():
        return dx, torch.zeros_like(w), None if bias is None else torch.zeros_like(bias)
    BT, BC, warps = _geometry("bwd", L, C)
    t_tiles, c_tiles = -(-L // BT), -(-C // BC)
    loop = MAX_LOOP
    while loop > 1 and -(-t_tiles // loop) * c_tiles * B < MIN_PROGRAMS:
        loop //= 2
    grid = (-(-t_tiles // loop), c_tiles, B)
    dwp = torch.empty((B * grid[0], K, C), device=x.device, dtype=torch.float32)
    dbp = torch.empty((B * grid[0], C), device=x.device, dtype=torch.float32)
    _launch_bwd(grid, x, w, w if bias is None else bias, dy, dx, dwp, dbp, L, C, x.stride(0), x.stride(1), K,
                next_pow2(K), bias is not None, loop, BT, BC, num_warps=warps)
    return dx, dwp.sum(0).t().contiguous(), None if bias is None else dbp.sum(0)
