"""Triton kernels for ATMN, with the PyTorch reference in ``atmn_ref.py`` beside them.

Two forms, each a forward/backward kernel pair, registered as ``torch.library`` custom ops (with
fake implementations, so models trace under ``torch.compile``):

* **input-once** (MAR's use, ``neuro_mar::atmn_once_fwd`` / ``_bwd``): reads x once and writes the
  decoded ``x_hat = V * sum_t tau^t s_t`` in x's dtype; optionally the int8 spikes ``[T, *x.shape]``
  and the +/- spike counts (for the cost model, no second pass). The backward recomputes the T
  micro-steps from x and needs no other saved tensor: the reverse-mode recursion over the steps is
  linear in the adjoints, so dx and dV are accumulated in *forward* step order
  (``dx = G * sum_t w_t g_t P_t``, ``P_{t+1} = k (1 - c g_t) P_t``; see ``_once_bwd_kernel``).
* **multi-step** (``neuro_mar::atmn_multi_fwd`` / ``_bwd``): ``x_seq [T, ..., C]`` charging at every
  step as SpikingJelly neurons do, spikes in x's dtype. The backward walks the steps in reverse and,
  for T <= RECOMPUTE_MAX_T, first recomputes every pre-fire potential from x into registers (x read
  once, nothing saved but x itself); for longer T the forward saves the potentials in fp32.

State and accumulation are fp32 for fp32/bf16/fp16 inputs; V = exp(a) comes from PyTorch, 1/V is
computed correctly rounded in the kernel (as torch.reciprocal), and the steps multiply by 1/tau and
1/V as the reference does, so spikes equal it bit for bit. The surrogate reaches the kernel as a
compile-time id (``_spike_slope``: the ternary Sigmoid and ATan slopes take one special-function
op fewer per term); T is a compile-time constant, unrolled up to 16 and looped beyond. Tiles are
[rows, channels]; the per-channel gradient of a (V = exp(a)) is reduced per tile and summed on the
host (deterministic, no atomics).

Importing this module imports triton; :mod:`neuro_mar.kernels` only does so on first GPU use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


from .atmn_constants import RECOMPUTE_MAX_T, SURROGATE_IDS  # noqa: F401  (ids of _sg_grad)
from .launch import CachedLaunch, next_pow2


@triton.jit
def _sg_grad(z, SG: tl.constexpr, alpha):
    """Derivative of SpikingJelly's surrogate primitive at z."""
    if SG == 0:  # Sigmoid
        sg = 1.0 / (1.0 + tl.exp(-alpha * z))
        g = alpha * sg * (1.0 - sg)
    elif SG == 1:  # ATan
        ax = 1.5707963267948966 * alpha * z
        g = (0.5 * alpha) / (1.0 + ax * ax)
    elif SG == 2:  # Rect (straight-through)
        g = tl.where(tl.abs(z) < 0.5 / alpha, alpha, 0.0)
    elif SG == 3:  # PiecewiseQuadratic
        az = tl.abs(z)
        g = tl.where(az > 1.0 / alpha, 0.0, alpha - alpha * alpha * az)
    else:  # Erf
        az = alpha * z
        g = (alpha * 0.5641895835477563) * tl.exp(-az * az)
    return g


@triton.jit
def _spike_slope(m, SG: tl.constexpr, alpha, TERNARY: tl.constexpr):
    """d s / d m of the (ternary) spike at normalised potential m: g(m - 1) [+ g(-m - 1)].

    The ternary Sigmoid and ATan sums take one exponential and one reciprocal instead of two of
    each (the backward kernels are bound by instruction issue, and special-function ops issue at
    a fraction of the FMA rate). Sigmoid, with d = |m|,
    e = exp(-alpha |d - 1|) and c = exp(-2 alpha): the far threshold's exponential is c e (d >= 1)
    or c / e (d < 1), so g(m-1) + g(-m-1) = alpha e (1/A^2 + c/B^2), A = 1 + e,
    B = 1 + c e or e + c; no term overflows (e <= 1, e / B <= 1). ATan: with p, q the two scaled
    arguments, 1/(1+p^2) + 1/(1+q^2) = (2 + p^2 + q^2) / ((1+p^2)(1+q^2)) (m clamped to +-1e6,
    where the slope is below 1e-12, so the product stays finite)."""
    if TERNARY and SG == 0:
        d = tl.abs(m)
        e = tl.exp2((-1.4426950408889634 * alpha) * tl.abs(d - 1.0))  # log2(e) folded into the scalar
        c = tl.exp(-2.0 * alpha)
        A = 1.0 + e
        B = tl.where(d < 1.0, e + c, 1.0 + c * e)
        r = 1.0 / (A * B)
        g = alpha * (e * r) * ((B * B + c * A * A) * r)
    elif TERNARY and SG == 1:
        mc = tl.minimum(tl.maximum(m, -1e6), 1e6)
        p = 1.5707963267948966 * alpha * (mc - 1.0)
        q = 1.5707963267948966 * alpha * (mc + 1.0)
        p2 = p * p
        q2 = q * q
        g = (0.5 * alpha) * (2.0 + p2 + q2) / ((1.0 + p2) * (1.0 + q2))
    else:
        g = _sg_grad(m - 1.0, SG, alpha)
        if TERNARY:
            g += _sg_grad(-m - 1.0, SG, alpha)
    return g


@triton.jit
def _fire(h, iV, TERNARY: tl.constexpr):
    m = h * iV
    s = tl.where(m >= 1.0, 1.0, 0.0)
    if TERNARY:
        s = s - tl.where(m <= -1.0, 1.0, 0.0)
    return m, s


@triton.jit
def _thresholds(Vp, cols, C):
    """V and 1/V of the tile's channels, as [1, BC] rows. 1/V is correctly rounded (div_rn), as
    torch.reciprocal is, so the spikes equal the reference's bit for bit."""
    V = tl.load(Vp + cols, mask=cols < C, other=1.0)[None, :]
    return V, tl.math.div_rn(tl.full([1, 1], 1.0, tl.float32), V)


@triton.jit
def _tile(R, C, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    return cols, mask, offs


# ---------------------------------------------------------------------------------------------
# input-once
# ---------------------------------------------------------------------------------------------
@triton.jit
def _once_step(h, V, iV, w, acc, tau, k, TERNARY: tl.constexpr):
    m, s = _fire(h, iV, TERNARY)
    acc += w * s
    h = (h - s * V) * k
    return h, s, w * tau, acc


@triton.jit
def _once_fwd_step(t, h, V, iV, w, acc, npos, nneg, tau, k, SPK, numel, offs, mask,
                   TERNARY: tl.constexpr, WRITE_SPIKES: tl.constexpr, COUNT: tl.constexpr):
    """One forward micro-step: fire, accumulate, and write / count the step's spikes."""
    h, s, w, acc = _once_step(h, V, iV, w, acc, tau, k, TERNARY)
    if WRITE_SPIKES:
        tl.store(SPK + t * numel + offs, s.to(tl.int8), mask=mask)
    if COUNT:
        npos += (s > 0).to(tl.int32)
        nneg += (s < 0).to(tl.int32)
    return h, w, acc, npos, nneg


@triton.jit
def _once_fwd_kernel(X, Vp, XHAT, SPK, CNT, R, C, numel, tau, k,
                     T: tl.constexpr, TERNARY: tl.constexpr, WRITE_SPIKES: tl.constexpr,
                     COUNT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    cols, mask, offs = _tile(R, C, BR, BC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    V, iV = _thresholds(Vp, cols, C)
    h = x
    w = tau * 0.0 + 1.0  # an fp32 scalar, so the looped variant carries a fixed type
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    npos = tl.zeros([BR, BC], dtype=tl.int32)
    nneg = tl.zeros([BR, BC], dtype=tl.int32)
    if T <= 16:
        for t in tl.static_range(T):
            h, w, acc, npos, nneg = _once_fwd_step(t, h, V, iV, w, acc, npos, nneg, tau, k, SPK, numel, offs, mask,
                                                   TERNARY, WRITE_SPIKES, COUNT)
    else:
        for t in range(T):
            h, w, acc, npos, nneg = _once_fwd_step(t, h, V, iV, w, acc, npos, nneg, tau, k, SPK, numel, offs, mask,
                                                   TERNARY, WRITE_SPIKES, COUNT)
    tl.store(XHAT + offs, (acc * V).to(XHAT.dtype.element_ty), mask=mask)
    if COUNT:
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(CNT + 2 * pid, tl.sum(tl.sum(tl.where(mask, npos, 0), axis=1), axis=0))
        tl.store(CNT + 2 * pid + 1, tl.sum(tl.sum(tl.where(mask, nneg, 0), axis=1), axis=0))


@triton.jit
def _once_bwd_step(h, V, iV, w, P, Q, ax, bv, tau, k, alpha,
                   SG: tl.constexpr, TERNARY: tl.constexpr, DETACH: tl.constexpr):
    m, s = _fire(h, iV, TERNARY)
    gz = _spike_slope(m, SG, alpha, TERNARY)
    ax += w * gz * P
    bv += w * (s - m * gz) + w * gz * Q
    if DETACH:
        a_t = k
        gamma = -s
    else:
        a_t = k * (1.0 - gz)
        gamma = m * gz - s
    Q = a_t * Q + k * gamma
    P = a_t * P
    h = (h - s * V) * k
    return h, w * tau, P, Q, ax, bv


@triton.jit
def _once_bwd_kernel(X, Vp, G, DX, DAP, R, C, tau, k, alpha,
                     T: tl.constexpr, SG: tl.constexpr, TERNARY: tl.constexpr, DETACH: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr):
    """Reverse mode of the T steps, in forward order. With k = 1/tau, g_t the surrogate slope
    d s_t / d m_t and c = 0 if the reset is detached else 1, the adjoint of h obeys
    hh_t = a_t hh_{t+1} + G w_t g_t with a_t = k (1 - c g_t), so
        dx = G * sum_t w_t g_t P_t,               P_0 = 1, P_{t+1} = a_t P_t
        dV = G * sum_t w_t (s_t - m_t g_t + g_t Q_t),   Q_0 = 0, Q_{t+1} = a_t Q_t + k (c m_t g_t - s_t).
    The tile's per-channel sums of dV, times V (= d/da of V = exp(a)), go to row program_id(0)
    of DAP [row tiles, C]."""
    cols, mask, offs = _tile(R, C, BR, BC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g_up = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    V, iV = _thresholds(Vp, cols, C)
    h = x
    w = tau * 0.0 + 1.0
    P = tl.full([BR, BC], 1.0, dtype=tl.float32)
    Q = tl.zeros([BR, BC], dtype=tl.float32)
    ax = tl.zeros([BR, BC], dtype=tl.float32)
    bv = tl.zeros([BR, BC], dtype=tl.float32)
    if T <= 16:
        for t in tl.static_range(T):
            h, w, P, Q, ax, bv = _once_bwd_step(h, V, iV, w, P, Q, ax, bv, tau, k, alpha, SG, TERNARY, DETACH)
    else:
        for t in range(T):
            h, w, P, Q, ax, bv = _once_bwd_step(h, V, iV, w, P, Q, ax, bv, tau, k, alpha, SG, TERNARY, DETACH)
    tl.store(DX + offs, (g_up * ax).to(DX.dtype.element_ty), mask=mask)
    _store_da_partial(DAP, tl.where(mask, g_up * bv, 0.0), V, cols, C)


# ---------------------------------------------------------------------------------------------
# multi-step
# ---------------------------------------------------------------------------------------------
@triton.jit
def _multi_charge_fire(x, u, V, iV, k, TERNARY: tl.constexpr):
    """One multi-step update: ``(h_t, s_t, u_t)`` from x_t and u_{t-1} (the forward and the
    backward's recompute share it, so the recomputed potentials are the forward's bit for bit)."""
    h = x + u * k
    m, s = _fire(h, iV, TERNARY)
    return h, s, h - s * V


@triton.jit
def _multi_fwd_step(t, x, u, V, iV, k, SPK, H, numel, offs, mask, TERNARY: tl.constexpr, SAVE_H: tl.constexpr):
    h, s, u = _multi_charge_fire(x, u, V, iV, k, TERNARY)
    if SAVE_H:
        tl.store(H + t * numel + offs, h, mask=mask)
    tl.store(SPK + t * numel + offs, s.to(SPK.dtype.element_ty), mask=mask)
    return u


@triton.jit
def _multi_fwd_kernel(X, V0, Vp, SPK, H, VLAST, R, C, numel, k,
                      T: tl.constexpr, TERNARY: tl.constexpr, HAS_V0: tl.constexpr, SAVE_H: tl.constexpr,
                      BR: tl.constexpr, BC: tl.constexpr):
    cols, mask, offs = _tile(R, C, BR, BC)
    V, iV = _thresholds(Vp, cols, C)
    u = _initial_state(V0, offs, mask, HAS_V0, BR, BC)
    if T <= 16:  # unrolled: the step loads are independent of the recurrence and issue early
        for t in tl.static_range(T):
            x = tl.load(X + t * numel + offs, mask=mask, other=0.0).to(tl.float32)
            u = _multi_fwd_step(t, x, u, V, iV, k, SPK, H, numel, offs, mask, TERNARY, SAVE_H)
    else:
        for t in range(T):
            x = tl.load(X + t * numel + offs, mask=mask, other=0.0).to(tl.float32)
            u = _multi_fwd_step(t, x, u, V, iV, k, SPK, H, numel, offs, mask, TERNARY, SAVE_H)
    tl.store(VLAST + offs, u, mask=mask)


@triton.jit
def _initial_state(V0, offs, mask, HAS_V0: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    if HAS_V0:
        u = tl.load(V0 + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        u = tl.zeros([BR, BC], dtype=tl.float32)
    return u


@triton.jit
def _store_da_partial(DAP, dv, V, cols, C):
    """Row program_id(0) of DAP [row tiles, C]: the tile's column sums of dV times V (dL/da)."""
    da = tl.sum(dv, axis=0) * tl.sum(V, axis=0)
    tl.store(DAP + tl.program_id(0).to(tl.int64) * C + cols, da, mask=cols < C)


@triton.jit
def _multi_bwd_step(t, h, uh, dv, V, iV, k, alpha, GS, DX, numel, offs, mask,
                    SG: tl.constexpr, TERNARY: tl.constexpr, DETACH: tl.constexpr):
    """Step t of the reverse walk: uh is the adjoint of u_t; writes dx_t and returns the adjoint
    of u_{t-1} and the running dV."""
    g_up = tl.load(GS + t * numel + offs, mask=mask, other=0.0).to(tl.float32)
    m, s = _fire(h, iV, TERNARY)
    gz = _spike_slope(m, SG, alpha, TERNARY)
    if DETACH:
        sh = g_up
    else:
        sh = g_up - V * uh
    mh = sh * gz
    hh = uh + mh * iV
    tl.store(DX + t * numel + offs, hh.to(DX.dtype.element_ty), mask=mask)
    dv += -s * uh - m * mh * iV
    return hh * k, dv


@triton.jit
def _multi_bwd_kernel(GS, GV, H, X, V0, Vp, DX, DV0, DAP, R, C, numel, k, alpha,
                      T: tl.constexpr, SG: tl.constexpr, TERNARY: tl.constexpr, DETACH: tl.constexpr,
                      HAS_GV: tl.constexpr, HAS_V0: tl.constexpr, RECOMPUTE: tl.constexpr,
                      BR: tl.constexpr, BC: tl.constexpr):
    """Reverse walk over the steps. With RECOMPUTE (T <= RECOMPUTE_MAX_T) the tile's x_0..x_{T-1}
    are read once and the pre-fire potentials h_t recomputed into registers (a tuple, the steps
    unrolled); otherwise h_t is read from the h_seq the forward saved."""
    cols, mask, offs = _tile(R, C, BR, BC)
    V, iV = _thresholds(Vp, cols, C)
    if HAS_GV:
        uh = tl.load(GV + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        uh = tl.zeros([BR, BC], dtype=tl.float32)
    dv = tl.zeros([BR, BC], dtype=tl.float32)
    if RECOMPUTE:
        u = _initial_state(V0, offs, mask, HAS_V0, BR, BC)
        hs = ()
        for t in tl.static_range(T):
            x = tl.load(X + t * numel + offs, mask=mask, other=0.0).to(tl.float32)
            h, s, u = _multi_charge_fire(x, u, V, iV, k, TERNARY)
            hs = hs + (h,)
        for t in tl.static_range(T - 1, -1, -1):
            uh, dv = _multi_bwd_step(t, hs[t], uh, dv, V, iV, k, alpha, GS, DX, numel, offs, mask, SG, TERNARY, DETACH)
    elif T <= 16:
        for t in tl.static_range(T - 1, -1, -1):
            h = tl.load(H + t * numel + offs, mask=mask, other=0.0)
            uh, dv = _multi_bwd_step(t, h, uh, dv, V, iV, k, alpha, GS, DX, numel, offs, mask, SG, TERNARY, DETACH)
    else:
        for i in range(T):
            t = T - 1 - i
            h = tl.load(H + t * numel + offs, mask=mask, other=0.0)
            uh, dv = _multi_bwd_step(t, h, uh, dv, V, iV, k, alpha, GS, DX, numel, offs, mask, SG, TERNARY, DETACH)
    if HAS_V0:
        tl.store(DV0 + offs, uh, mask=mask)
    _store_da_partial(DAP, tl.where(mask, dv, 0.0), V, cols, C)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
_launch_once_fwd = CachedLaunch(_once_fwd_kernel)
_launch_once_bwd = CachedLaunch(_once_bwd_kernel)
_launch_multi_fwd = CachedLaunch(_multi_fwd_kernel)
_launch_multi_bwd = CachedLaunch(_multi_bwd_kernel)

#: tile elements per program and warps; benchmarks/atmn_tune.py measures alternatives
TILES = {  # each kernel's best of benchmarks/atmn_tune.py on an H200 (T=4, [32768 x 1024] fp32, 2026-11-29)
    "once_fwd": {"elems": 2048, "max_cols": 1024, "num_warps": 8},
    "once_bwd": {"elems": 1024, "max_cols": 128, "num_warps": 4},
    "multi_fwd": {"elems": 1024, "max_cols": 1024, "num_warps": 4},
    "multi_bwd": {"elems": 2048, "max_cols": 1024, "num_warps": 8},
}


def _geometry(kernel: str, R: int, C: int) -> tuple[int, int, tuple[int, int], int]:
    """Tile rows and channels, the grid and the warps of ``kernel`` for R rows of C channels (plain
    integer arithmetic: triton.cdiv and next_power_of_2 cost microseconds of host time per call)."""
    tile = TILES[kernel]
    BC = min(tile["max_cols"], next_pow2(C))
    while BC > 32 and (-(-C // BC) * BC - C) * 8 > C:  # at most 1/8 of a row's lanes masked off (C = 576: 128)
        BC //= 2
    BR = max(1, tile["elems"] // BC)
    return BR, BC, (-(-R // BR), -(-C // BC)), tile["num_warps"]


def _as_2d(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    x = x.contiguous()
    C = x.shape[-1] if x.dim() else 1
    return x, x.numel() // max(C, 1), C


def _channel_thresholds(V, C: int) -> torch.Tensor:
    """V as a contiguous fp32 [C] (a scalar threshold is shared by every channel)."""
    V = V.float()
    return V if V.shape == (C,) and V.is_contiguous() else V.expand(C).contiguous()


def _da(dap: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """dL/da of V = exp(a) from the per-tile partials [row tiles, C], shaped like V (a scalar
    threshold gets the sum over channels)."""
    da = dap.sum(0)
    if V.dim() == 0:
        return da.sum()
    return da if da.shape == V.shape else da.reshape(V.shape)


def once_fwd(x, V, T, tau, ternary=True, write_spikes=False, count=False):
    """``(x_hat, spikes int8 [T, *x.shape] or None, counts int64 [2] (+, -) or None)``: the spikes
    and counts only when asked for (nothing is allocated for them otherwise)."""
    x, R, C = _as_2d(x)
    x_hat = torch.empty_like(x)
    spikes = torch.empty((T, *x.shape), device=x.device, dtype=torch.int8) if write_spikes else None
    BR, BC, grid, warps = _geometry("once_fwd", R, C)
    cnt = torch.empty((grid[0] * grid[1], 2), device=x.device, dtype=torch.int32) if count else None
    n = x.numel()
    if n:  # unwritten outputs get x_hat as a placeholder pointer (their stores are compiled out)
        _launch_once_fwd(grid, x, _channel_thresholds(V, C), x_hat, x_hat if spikes is None else spikes,
                         x_hat if cnt is None else cnt, R, C, n, float(tau), 1.0 / tau, T, ternary, write_spikes,
                         count, BR, BC, num_warps=warps)
    counts = None
    if count:
        counts = cnt.sum(0, dtype=torch.int64) if n else torch.zeros(2, dtype=torch.int64, device=x.device)
    return x_hat, spikes, counts


def once_bwd(grad, x, V, T, tau, sg_id, alpha, ternary=True, detach_reset=False):
    """``(dx [x.shape] in x.dtype, da fp32 shaped like V)``: da is the gradient of the log-threshold
    a (V = exp(a)), i.e. dL/dV * V."""
    x, R, C = _as_2d(x)
    grad = grad.contiguous()
    dx = torch.empty_like(x)
    if not x.numel():
        return dx, torch.zeros_like(V, dtype=torch.float32)
    BR, BC, grid, warps = _geometry("once_bwd", R, C)
    dap = torch.empty((grid[0], C), device=x.device, dtype=torch.float32)
    _launch_once_bwd(grid, x, _channel_thresholds(V, C), grad, dx, dap, R, C, float(tau), 1.0 / tau, float(alpha), T,
                     sg_id, ternary, detach_reset, BR, BC, num_warps=warps)
    return dx, _da(dap, V)


def _rows(x_seq: torch.Tensor) -> tuple[int, int, int]:
    """T, rows R and channels C of a [T, ..., C] sequence."""
    T, C = x_seq.shape[0], x_seq.shape[-1]
    return T, (x_seq.numel() // (T * C) if T * C else 0), C


def multi_fwd(x_seq, V, tau, ternary=True, v0=None):
    """``(spikes [T, ...] in x.dtype, h_seq fp32 or None (saved for backward), v_last fp32)``;
    h_seq is only written when T > RECOMPUTE_MAX_T."""
    x_seq = x_seq.contiguous()
    T, R, C = _rows(x_seq)
    spikes = torch.empty_like(x_seq)
    save_h = T > RECOMPUTE_MAX_T
    h_seq = torch.empty(x_seq.shape, device=x_seq.device, dtype=torch.float32) if save_h else None
    v_last = torch.empty(x_seq.shape[1:], device=x_seq.device, dtype=torch.float32)
    BR, BC, grid, warps = _geometry("multi_fwd", R, C)
    if x_seq.numel():
        _launch_multi_fwd(grid, x_seq, v0.contiguous() if v0 is not None else x_seq, _channel_thresholds(V, C), spikes,
                          h_seq if save_h else spikes, v_last, R, C, R * C, 1.0 / tau, T, ternary, v0 is not None,
                          save_h, BR, BC, num_warps=warps)
    return spikes, h_seq, v_last


def multi_bwd(grad_spikes, grad_v_last, h_seq, x_seq, v0, V, tau, sg_id, alpha, ternary=True, detach_reset=False,
              out_dtype=torch.float32):
    """``(dx_seq [T, ...] in out_dtype, dv0 fp32 (None without v0), da fp32 shaped like V)``; h_seq
    as :func:`multi_fwd` returned it (None or empty: recompute from x_seq and v0); da = dL/dV * V."""
    x_seq = x_seq.contiguous()
    T, R, C = _rows(x_seq)
    recompute = h_seq is None or h_seq.numel() == 0
    dx = torch.empty(x_seq.shape, device=x_seq.device, dtype=out_dtype)
    dv0 = torch.empty(x_seq.shape[1:], device=x_seq.device, dtype=torch.float32) if v0 is not None else None
    if not x_seq.numel():
        return dx, dv0, torch.zeros_like(V, dtype=torch.float32)
    BR, BC, grid, warps = _geometry("multi_bwd", R, C)
    dap = torch.empty((grid[0], C), device=x_seq.device, dtype=torch.float32)
    _launch_multi_bwd(grid, grad_spikes.contiguous(), grad_v_last.contiguous() if grad_v_last is not None else x_seq,
                      x_seq if recompute else h_seq, x_seq, v0.contiguous() if v0 is not None else x_seq,
                      _channel_thresholds(V, C), dx, dv0 if v0 is not None else dx, dap, R, C, R * C, 1.0 / tau,
                      float(alpha), T, sg_id, ternary, detach_reset, grad_v_last is not None, v0 is not None,
                      recompute, BR, BC, num_warps=warps)
    return dx, dv0, _da(dap, V)
