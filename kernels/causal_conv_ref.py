"""PyTorch reference of the Discrete Mamba-2 mixer's causal depthwise convolution followed by SiLU
(the Triton kernels in ``causal_conv.py`` compute the same thing, channels-last)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [b, l, C]``, ``weight [C, 1, K]`` (nn.Conv1d's depthwise layout), ``bias [C]`` or None,
    ``prev [b, C, K-1]`` the K-1 inputs before x (zeros when None) ->
    ``(silu(y) [b, l, C], window [b, C, K-1])`` with ``y[t, c] = bias[c] + sum_k weight[c, 0, k] *
    x[t - (K-1) + k, c]`` and ``window`` the last K-1 inputs (the state a next call continues from)."""
    C, K = weight.shape[0], weight.shape[-1]
    xt = x.transpose(1, 2)  # [b, C, l]
    prev = prev.to(xt.dtype) if prev is not None else xt.new_zeros(xt.shape[0], C, K - 1)
    full = torch.cat([prev, xt], dim=-1)
    out = F.conv1d(full, weight, bias, groups=C)
    return F.silu(out).transpose(1, 2), full[..., full.shape[-1] - (K - 1):]
