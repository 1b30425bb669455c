"""The causal depthwise conv + SiLU kernels as ``torch.library`` custom ops with autograd and fake
implementations, and when the mixer uses them.

The same knob as ATMN's (``NEURO_MAR_KERNELS``, :func:`neuro_mar.kernels.set_backend`): ``auto``
runs the kernels on CUDA tensors when triton imports, ``torch`` never, ``triton`` always (on CPU
with ``TRITON_INTERPRET=1``, as the tests do). A call that continues from a state (prefill after a
prefix, decoding) takes the reference path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .atmn_ops import _backend, _compiling, forced, triton_available

_conv = None


def _kernels():
    global _conv
    if _conv is None:
        from . import causal_conv

        _conv = causal_conv
    return _conv


def use_conv_kernel(x: Tensor) -> bool:
    """Whether the Triton path runs for the mixer input ``x [b, l, C]`` under the backend knob. The
    kernels compute in fp32: fp64 inputs keep the reference even when the kernels are forced."""
    if _backend.value == "torch" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return forced() or (x.is_cuda and triton_available())


@torch.library.custom_op("neuro_mar::causal_conv_silu_fwd", mutates_args=())
def _fwd_op(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return _kernels().conv_fwd(x, w, bias)


@_fwd_op.register_fake
def _(x, w, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("neuro_mar::causal_conv_silu_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _kernels().conv_bwd(dy, x, w, bias)
    return dx, dw, w.new_empty(0) if db is None else db


@_bwd_op.register_fake
def _(dy, x, w, bias):
    return x.new_empty(x.shape), torch.empty_like(w), w.new_empty(0) if bias is None else torch.empty_like(bias)


class _ConvSiluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        C, K = weight.shape[0], weight.shape[-1]
        w = weight.detach().reshape(C, K).float().contiguous()
        b = None if bias is None else bias.detach().float().contiguous()
        y = (_fwd_op if _compiling() else _kernels().conv_fwd)(x, w, b)
        ctx.save_for_backward(x, w, b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b = ctx.saved_tensors
        dx, dw, db = (_bwd_op if _compiling() else _kernels().conv_bwd)(dy, x, w, b)
        w_dtype, b_dtype = ctx.dtypes
        return (dx, dw.to(w_dtype).reshape(w.shape[0], 1, w.shape[1]),
                None if b_dtype is None else db.to(b_dtype))


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Fused ``silu(causal depthwise conv)`` of ``x [b, l, C]`` (channel stride 1, or copied) with
    nn.Conv1d's ``weight [C, 1, K]`` and ``bias [C]``: ``[b, l, C]`` contiguous in x's dtype, fp32
    arithmetic. Gradients reach x, weight and bias. See ``causal_conv_ref.causal_conv1d_silu_ref``."""
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[1] != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"causal_conv1d_silu: x [b, l, C] and weight [C, 1, K] expected, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    return _ConvSiluFn.apply(x, weight, bias)
