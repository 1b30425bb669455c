"""ATMN's Triton kernels as ``torch.library`` custom ops with autograd and fake implementations,
and the dispatch that decides when they are used.

Backend knob (``NEURO_MAR_KERNELS`` or :func:`set_backend`): ``"auto"`` uses the kernels for CUDA
tensors when triton imports and the surrogate has a kernel id, and elsewhere, where no gradient is
wanted (inference), the in-place loop of ``atmn_infer``; ``"torch"`` uses neither (the reference);
``"triton"`` always does (also on CPU tensors, which needs ``TRITON_INTERPRET=1``: the tests'
way to run the kernels without a GPU). On CPU with ``"auto"`` nothing here imports triton.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from neuro_mar.knobs import Knob
from .atmn_constants import SURROGATE_IDS

BACKENDS = ("auto", "torch", "triton")
_backend = Knob("kernel backend", "NEURO_MAR_KERNELS", BACKENDS, "auto")


def set_backend(name: str) -> None:
    """Choose how ATMN runs: ``auto`` (Triton on CUDA), ``torch`` (reference) or ``triton`` (forced)."""
    _backend.set(name)


def get_backend() -> str:
    return _backend.value


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: import deliberately blocked
        return False


_atmn = None


def _kernels():
    """The kernel module, imported (with triton) on first use."""
    global _atmn
    if _atmn is None:
        from . import atmn

        _atmn = atmn
    return _atmn


def _compiling() -> bool:
    """Under torch.compile the custom ops (with their fake implementations) are traced; in eager
    mode the launchers are called directly, which saves the custom-op dispatch on every call."""
    return torch.compiler.is_compiling()


def surrogate_kernel_id(surrogate) -> int | None:
    """Kernel id of a SpikingJelly surrogate module, or None when the kernels do not cover it."""
    if not getattr(surrogate, "spiking", True):
        return None
    return SURROGATE_IDS.get(type(surrogate).__name__)


def forced() -> bool:
    """Whether ``NEURO_MAR_KERNELS=triton`` forces the kernels (an ImportError when triton is missing)."""
    if _backend.value != "triton":
        return False
    if not triton_available():
        raise ImportError("NEURO_MAR_KERNELS=triton needs triton (pip install triton)")
    return True


def use_kernel(x: Tensor, surrogate) -> bool:
    """Whether the Triton path runs for input x under the current backend knob."""
    if _backend.value == "torch":
        return False
    sg = surrogate_kernel_id(surrogate)
    if _backend.value == "triton":
        if sg is None:
            raise ValueError(f"NEURO_MAR_KERNELS=triton, but surrogate {type(surrogate).__name__} has no kernel; "
                             "kernels cover Sigmoid, ATan, Rect (straight_through), PiecewiseQuadratic and Erf in spiking mode")
        return forced()
    return x.is_cuda and sg is not None and triton_available() and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def lean_inference(x: Tensor, a: Tensor) -> bool:
    """Whether the input-once op runs as ``atmn_infer``'s no-autograd loop: backend ``auto``, and
    no gradient wanted of ``x`` or the log-threshold ``a``."""
    return _backend.value == "auto" and not (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad))


# ---------------------------------------------------------------------------------------------
# input-once
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("neuro_mar::atmn_once_fwd", mutates_args=())
def _once_fwd_op(x: Tensor, V: Tensor, T: int, tau: float, ternary: bool, write_spikes: bool,
                 count: bool) -> tuple[Tensor, Tensor, Tensor]:
    x_hat, spikes, counts = _kernels().once_fwd(x, V, T, tau, ternary, write_spikes, count)
    return (x_hat, x.new_empty(0, dtype=torch.int8) if spikes is None else spikes,
            x.new_empty(0, dtype=torch.int64) if counts is None else counts)


@_once_fwd_op.register_fake
def _(x, V, T, tau, ternary, write_spikes, count):
    spikes = x.new_empty((T, *x.shape) if write_spikes else (0,), dtype=torch.int8)
    return torch.empty_like(x), spikes, x.new_empty((2,) if count else (0,), dtype=torch.int64)


@torch.library.custom_op("neuro_mar::atmn_once_bwd", mutates_args=())
def _once_bwd_op(grad: Tensor, x: Tensor, V: Tensor, T: int, tau: float, sg_id: int, alpha: float,
                 ternary: bool, detach_reset: bool) -> tuple[Tensor, Tensor]:
    return _kernels().once_bwd(grad, x, V, T, tau, sg_id, alpha, ternary, detach_reset)


@_once_bwd_op.register_fake
def _(grad, x, V, T, tau, sg_id, alpha, ternary, detach_reset):
    return torch.empty_like(x), torch.empty_like(V, dtype=torch.float32)


class _OnceFn(torch.autograd.Function):
    """Takes the log-threshold a itself (V = exp(a) is formed here and the kernel returns dL/da),
    so one call adds one autograd node; carries the surrogate id into the backward."""

    @staticmethod
    def forward(ctx, x, a, T, tau, ternary, write_spikes, count, sg_id, alpha, detach_reset):
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the spikes and counts
        V = a.float().exp()
        fwd = _once_fwd_op if _compiling() else _kernels().once_fwd
        x_hat, spikes, counts = fwd(x, V, T, tau, ternary, write_spikes, count)
        ctx.save_for_backward(x, V)
        ctx.args = (T, tau, sg_id, alpha, ternary, detach_reset, a.dtype)
        if write_spikes or count:
            ctx.mark_non_differentiable(*(t for t in (spikes, counts) if t is not None))
        return x_hat, spikes, counts

    @staticmethod
    def backward(ctx, g_xhat, g_spikes, g_counts):
        if g_xhat is None:
            return (None,) * 10
        x, V = ctx.saved_tensors
        T, tau, sg_id, alpha, ternary, detach_reset, a_dtype = ctx.args
        bwd = _once_bwd_op if _compiling() else _kernels().once_bwd
        dx, da = bwd(g_xhat, x, V, T, tau, sg_id, alpha, ternary, detach_reset)
        return dx, da if da.dtype == a_dtype else da.to(a_dtype), None, None, None, None, None, None, None, None


def atmn_once(x: Tensor, a: Tensor, T: int, tau: float, surrogate, ternary: bool = True,
              detach_reset: bool = False, write_spikes: bool = False, count: bool = False):
    """Fused input-once ATMN: ``(x_hat, spikes int8 or None, counts [2] int64 or None)``.
    Gradients reach x and a (through V = exp(a))."""
    sg_id = surrogate_kernel_id(surrogate)
    x_hat, spikes, counts = _OnceFn.apply(x, a, T, float(tau), bool(ternary), bool(write_spikes), bool(count),
                                          sg_id, float(getattr(surrogate, "alpha", 1.0)), bool(detach_reset))
    return x_hat, (spikes if write_spikes else None), (counts if count else None)  # traced: empty tensors


# ---------------------------------------------------------------------------------------------
# multi-step
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("neuro_mar::atmn_multi_fwd", mutates_args=())
def _multi_fwd_op(x_seq: Tensor, V: Tensor, v0: Tensor | None, tau: float, ternary: bool) -> tuple[Tensor, Tensor, Tensor]:
    spikes, h_seq, v_last = _kernels().multi_fwd(x_seq, V, tau, ternary, v0)
    return spikes, x_seq.new_empty(0, dtype=torch.float32) if h_seq is None else h_seq, v_last


@_multi_fwd_op.register_fake
def _(x_seq, V, v0, tau, ternary):
    from .atmn_constants import RECOMPUTE_MAX_T

    h_shape = x_seq.shape if x_seq.shape[0] > RECOMPUTE_MAX_T else (0,)
    return (torch.empty_like(x_seq), x_seq.new_empty(h_shape, dtype=torch.float32),
            x_seq.new_empty(x_seq.shape[1:], dtype=torch.float32))


@torch.library.custom_op("neuro_mar::atmn_multi_bwd", mutates_args=())
def _multi_bwd_op(grad_spikes: Tensor, grad_v_last: Tensor | None, h_seq: Tensor | None, x_seq: Tensor, v0: Tensor | None,
                  V: Tensor, tau: float, sg_id: int, alpha: float, ternary: bool, detach_reset: bool,
                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    dx, dv0, da = _kernels().multi_bwd(grad_spikes, grad_v_last, h_seq, x_seq, v0, V, tau, sg_id, alpha, ternary,
                                       detach_reset, out_dtype)
    return dx, x_seq.new_empty(0, dtype=torch.float32) if dv0 is None else dv0, da


@_multi_bwd_op.register_fake
def _(grad_spikes, grad_v_last, h_seq, x_seq, v0, V, tau, sg_id, alpha, ternary, detach_reset, out_dtype):
    return (torch.empty_like(x_seq, dtype=out_dtype),
            x_seq.new_empty(x_seq.shape[1:] if v0 is not None else (0,), dtype=torch.float32),
            torch.empty_like(V, dtype=torch.float32))


class _MultiFn(torch.autograd.Function):
    """Takes a (V = exp(a) formed here; the kernel returns dL/da), as :class:`_OnceFn`."""

    @staticmethod
    def forward(ctx, x_seq, a, v0, tau, ternary, sg_id, alpha, detach_reset):
        # an unused v_last must not cost a zero-filled [N] gradient and the kernel's read of it
        ctx.set_materialize_grads(False)
        V = a.float().exp()
        if _compiling():
            spikes, h_seq, v_last = _multi_fwd_op(x_seq, V, v0, tau, ternary)
        else:
            spikes, h_seq, v_last = _kernels().multi_fwd(x_seq, V, tau, ternary, v0)
        ctx.save_for_backward(h_seq, x_seq, v0, V)
        ctx.args = (tau, sg_id, alpha, ternary, detach_reset, x_seq.dtype, None if v0 is None else v0.dtype, a.dtype)
        return spikes, v_last

    @staticmethod
    def backward(ctx, g_spikes, g_v_last):
        h_seq, x_seq, v0, V = ctx.saved_tensors
        tau, sg_id, alpha, ternary, detach_reset, x_dtype, v0_dtype, a_dtype = ctx.args
        if g_spikes is None and g_v_last is None:
            return (None,) * 8
        if g_spikes is None:
            g_spikes = torch.zeros_like(x_seq)
        if g_v_last is not None:
            g_v_last = g_v_last.float()
        bwd = _multi_bwd_op if _compiling() else _kernels().multi_bwd
        dx, dv0, da = bwd(g_spikes, g_v_last, h_seq, x_seq, v0, V, tau, sg_id, alpha, ternary, detach_reset, x_dtype)
        return (dx, da if da.dtype == a_dtype else da.to(a_dtype), None if v0_dtype is None else dv0.to(v0_dtype),
                None, None, None, None, None)


def atmn_multistep(x_seq: Tensor, a: Tensor, tau: float, surrogate, ternary: bool = True,
                   detach_reset: bool = False, v0: Tensor | None = None):
    """Fused multi-step ATMN: ``x_seq [T, ..., C] -> (spikes [T, ..., C] in x dtype, v_last fp32)``."""
    sg_id = surrogate_kernel_id(surrogate)
    return _MultiFn.apply(x_seq, a, v0, float(tau), bool(ternary), sg_id,
                          float(getattr(surrogate, "alpha", 1.0)), bool(detach_reset))
