"""The Discrete Mamba-2 mixer (Llamba / phi-mamba semantics), with MAR's two mixer spike sites.

    u [b, l, d_model] -> in_site -> in_proj -> [xBC | z | A_log]
    xBC -> causal depthwise conv (kernel d_conv) -> SiLU -> x [b,l,h,p], B, C [b,l,g,n]
    dt = softplus(A_log + dt_bias), A = -1:  S_t = exp(-dt_t) S_{t-1} + g_t x_t B_t^T,  y_t = S_t C_t + D x_t
    g_t = 1 (``input_gain="none"``, Discrete Mamba-2) or 1 - exp(-dt_t) (``"zoh"``: the weights of
    every head's moving average sum to at most 1, whatever its memory length)
    out = out_proj(out_site(y * silu(z + z_bias)))

With an ``attention_mask [b, l]`` (1 = token, 0 = padding) masked positions neither enter nor change
the state: their conv inputs are zero (what a zero initial window holds) and their dt is 0 (no decay,
no input), so a left-padded row computes exactly what the row alone computes, and a right-padded
row's final state is the one after its last token. Outputs at masked positions are not meaningful.

h = n_v_heads, g = n_qk_heads, n = d_state, p = d_inner / h. ``dt_bias`` (per head, [ours]) is
phi-mamba's A_log with a learnable offset, so a mixer initialised from attention starts with a
long memory rather than dt = softplus(0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.causal_conv_ops import causal_conv1d_silu, use_conv_kernel
from ..kernels.causal_conv_ref import causal_conv1d_silu_ref
from ..neurons import SpikeSite, create
from .backends import ssd_scan
from .scan import ssd_naive


#: device types on which in_proj's output is padded to a multiple of 8 columns (see _project_in)
PAD_IN_PROJ_ON = ("cuda",)


@dataclass
class MixerState:
    """Recurrent state of one mixer: conv window [b, conv_dim, d_conv-1], SSM state [b, h, p, n]."""

    conv: torch.Tensor
    ssm: torch.Tensor


def scan_input(x: torch.Tensor, dt: torch.Tensor, input_gain: str) -> torch.Tensor:
    """x as the scan takes it: ``x [b, l, h, p]`` itself, or scaled per head and token by
    ``1 - exp(-dt) [b, l, h]`` (``"zoh"``), computed in dt's precision, returned in x's dtype."""
    if input_gain == "none":
        return x
    return (x.to(dt.dtype) * (-torch.expm1(-dt))[..., None]).to(x.dtype)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def dt_bias_init(heads: int, dt_min: float, dt_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """dt_bias such that softplus(dt_bias) is log-uniform in [dt_min, dt_max], one per head."""
    dt = torch.exp(torch.rand(heads, generator=generator) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(dt)


class DiscreteMamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 64, n_qk_heads: int = 32, n_v_heads: int = 32,
                 d_conv: int = 4, expand: int = 1, chunk_size: int = 64, bias: bool = False,
                 conv_bias: bool = True, dt_min: float = 1e-3, dt_max: float = 0.1,
                 neuron_in: str = "dense", neuron_out: str = "dense", neuron_in_options: dict | None = None,
                 neuron_out_options: dict | None = None, scan_backend: str | None = None,
                 input_gain: str = "none"):
        super().__init__()
        if input_gain not in ("none", "zoh"):
            raise ValueError(f"input_gain must be 'none' or 'zoh', got {input_gain!r}")
        self.input_gain = input_gain
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.n_qk_heads, self.n_v_heads = n_qk_heads, n_v_heads
        if self.d_inner % n_v_heads or n_v_heads % n_qk_heads:
            raise ValueError(f"d_inner={self.d_inner} must be a multiple of n_v_heads={n_v_heads}, "
                             f"and n_v_heads a multiple of n_qk_heads={n_qk_heads}")
        self.headdim = self.d_inner // n_v_heads
        self.conv_dim = self.d_inner + 2 * n_qk_heads * d_state
        self.chunk_size = chunk_size
        self.scan_backend = scan_backend
        self.dt_min, self.dt_max = dt_min, dt_max

        self.in_site = SpikeSite(create(neuron_in, channels=d_model, **(neuron_in_options or {})))
        self.in_proj = nn.Linear(d_model, self.conv_dim + self.d_inner + n_v_heads, bias=bias)
        self.z_bias = nn.Parameter(torch.zeros(self.d_inner))
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=0, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(n_v_heads))
        self.D = nn.Parameter(torch.ones(n_v_heads))
        self.out_site = SpikeSite(create(neuron_out, channels=self.d_inner, **(neuron_out_options or {})))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba-2 style: dt = softplus(dt_bias) log-uniform in [dt_min, dt_max]; D = 1; z_bias = 0."""
        self.dt_bias.copy_(dt_bias_init(self.n_v_heads, self.dt_min, self.dt_max))
        self.D.fill_(1.0)
        self.z_bias.zero_()

    # -- pieces ---------------------------------------------------------------------------
    def _project_in(self, u: torch.Tensor):
        """``(xBC, z, A_log)``: in_proj(u) split. On a GPU, an output width that is not a multiple of
        8 (2313 = 1728 + 576 + 9 for SmolLM2-135M) makes cuBLAS fall back to unaligned kernels for
        the product and both its gradients (39 ms of a 470 ms Stage-2 step; ~6 once aligned), so the
        weight is zero-padded to the next multiple and the extra columns are split off unused (the
        same values and gradients)."""
        W, bias = self.in_proj.weight, self.in_proj.bias
        pad = -W.shape[0] % 8
        plain = type(self.in_proj) is not nn.Linear or bool(self.in_proj._forward_hooks or self.in_proj._forward_pre_hooks)
        if not pad or u.device.type not in PAD_IN_PROJ_ON or plain:  # a wrapped or hooked in_proj is called as is
            return torch.split(self.in_proj(u), [self.conv_dim, self.d_inner, self.n_v_heads], dim=-1)
        proj = F.linear(u, F.pad(W, (0, 0, 0, pad)), None if bias is None else F.pad(bias, (0, pad)))
        return torch.split(proj, [self.conv_dim, self.d_inner, self.n_v_heads, pad], dim=-1)[:3]

    def _conv(self, xBC: torch.Tensor, state: MixerState | None, mask: torch.Tensor | None = None):
        """Causal depthwise conv + SiLU over ``xBC [b, l, conv_dim]``; returns (out [b, l, conv_dim],
        new conv window [b, conv_dim, d_conv-1]). From a zero state, on CUDA, the fused Triton kernel
        (channels-last, no transposed copies); otherwise the PyTorch reference. With ``mask [b, l]``
        (``xBC`` already zero where it is 0) the window holds the last d_conv-1 unmasked inputs."""
        if state is None and use_conv_kernel(xBC):
            out = causal_conv1d_silu(xBC, self.conv1d.weight, self.conv1d.bias)
            k, l = self.d_conv - 1, xBC.shape[1]
            xt = xBC.transpose(1, 2)
            window = xt[..., l - k:] if l >= k else F.pad(xt, (k - l, 0))
        elif state is not None and xBC.shape[1] == 1:
            out, window = conv_step_silu(xBC, self.conv1d.weight, self.conv1d.bias, state.conv)
        else:
            out, window = causal_conv1d_silu_ref(xBC, self.conv1d.weight, self.conv1d.bias,
                                                 None if state is None else state.conv)
        if mask is not None:
            window = self._last_unmasked(xBC, state, mask)
        return out, window

    def _last_unmasked(self, xBC: torch.Tensor, state: MixerState | None, mask: torch.Tensor) -> torch.Tensor:
        """The conv window ``[b, conv_dim, d_conv-1]`` after ``xBC [b, l, conv_dim]``: the last
        d_conv-1 inputs whose mask is 1, the previous window's counting as unmasked (zeros where a
        row has fewer)."""
        k = self.d_conv - 1
        b = xBC.shape[0]
        prev = state.conv.to(xBC.dtype) if state is not None else xBC.new_zeros(b, self.conv_dim, k)
        full = torch.cat([prev, xBC.transpose(1, 2)], dim=-1)  # [b, C, k + l]
        keep = torch.cat([torch.ones(b, k, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        pos = torch.arange(full.shape[-1], device=mask.device).expand(b, -1)
        idx = torch.where(keep, pos, -1).topk(k, dim=1).values.flip(1)  # ascending; the k prefix slots always qualify
        return full.gather(2, idx[:, None, :].expand(-1, self.conv_dim, -1))

    def forward(self, u: torch.Tensor, state: MixerState | None = None, backend: str | None = None,
                mask: torch.Tensor | None = None):
        """``u [b, l, d_model] -> (out [b, l, d_model], new_state)``.

        With ``state`` the call continues from it (prefill after a prefix, or one decode step);
        the returned state is the one after the last token (always returned, detached from
        nothing: it carries gradients if inputs do). ``mask [b, l]`` (1 = token, 0 = padding):
        masked positions neither enter nor change the state (see the module docstring).
        """
        b, l, _ = u.shape
        xBC, z, A_log = self._project_in(self.in_site(u))
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        xBC, conv_state = self._conv(xBC, state, mask)
        x, B, C = torch.split(xBC, [self.d_inner, self.n_qk_heads * self.d_state, self.n_qk_heads * self.d_state], dim=-1)
        x = x.reshape(b, l, self.n_v_heads, self.headdim)
        B = B.reshape(b, l, self.n_qk_heads, self.d_state)
        C = C.reshape(b, l, self.n_qk_heads, self.d_state)
        acc = torch.float64 if A_log.dtype == torch.float64 else torch.float32
        dt = F.softplus(A_log.to(acc) + self.dt_bias.to(acc))
        init = state.ssm if state is not None else None
        xs = scan_input(x, dt, self.input_gain)
        if mask is not None:  # no decay and no input at a masked position
            keep = mask[..., None].to(dt.dtype)
            dt = dt * keep
            xs = xs * keep[..., None].to(xs.dtype)
        if l == 1 and init is not None:
            y, ssm_state = ssd_naive(xs, -dt, B, C, init)  # one decode step: the recurrence itself
        else:
            y, ssm_state = ssd_scan(xs, -dt, B, C, init, self.chunk_size, backend or self.scan_backend)
        y = y + self.D.to(y.dtype)[:, None] * x
        y = y.reshape(b, l, self.d_inner)
        out = self.out_proj(self.out_site(y * F.silu(z + self.z_bias.to(z.dtype))))
        return out, MixerState(conv_state, ssm_state)

    def step(self, u: torch.Tensor, state: MixerState):
        """One token: ``u [b, d_model] -> (out [b, d_model], new_state)``; constant-size state."""
        out, new_state = self.forward(u.unsqueeze(1), state)
        return out.squeeze(1), new_state

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> MixerState:
        """Zero state; the SSM state is kept in fp32 (fp64 for fp64 models)."""
        sdtype = torch.float64 if dtype == torch.float64 else torch.float32
        return MixerState(torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch, self.n_v_heads, self.headdim, self.d_state, device=device, dtype=sdtype))


def conv_step_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prev: torch.Tensor):
    """One decode step of the causal conv + SiLU: ``x [b, 1, C]``, ``prev [b, C, K-1]`` ->
    ``(out [b, 1, C], window [b, C, K-1])``, what ``causal_conv1d_silu_ref`` gives for ``l = 1``:
    a dot product of each channel's window with its K taps instead of a convolution call (which
    costs a decoding CPU more than the product)."""
    full = torch.cat([prev.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [b, C, K]
    y = (full * weight[:, 0, :].to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return F.silu(y)[:, None, :], full[..., 1:]


def mixing_matrix(mixer: DiscreteMamba2, u: torch.Tensor) -> torch.Tensor:
    """The mixer's materialised sequence-mixing matrix ``[b, h, l, l]`` for input ``u [b, l, d]``:
    ``M[t, s] = (C_t . B_s) * exp(-sum_{k=s+1..t} dt_k) * g_s`` for s <= t (0 above the diagonal;
    ``g_s`` the input gain, 1 without one) - the
    SSD counterpart of an attention matrix (MOHAWK's matrix orientation aligns the two). The
    spike sites and the D skip are left out."""
    b, l, _ = u.shape
    proj = mixer.in_proj(u)
    xBC, _, A_log = torch.split(proj, [mixer.conv_dim, mixer.d_inner, mixer.n_v_heads], dim=-1)
    xBC, _ = mixer._conv(xBC, None)
    _, B, C = torch.split(xBC, [mixer.d_inner, mixer.n_qk_heads * mixer.d_state, mixer.n_qk_heads * mixer.d_state], dim=-1)
    from .scan import expand_groups

    B = expand_groups(B.reshape(b, l, mixer.n_qk_heads, mixer.d_state), mixer.n_v_heads).float()
    C = expand_groups(C.reshape(b, l, mixer.n_qk_heads, mixer.d_state), mixer.n_v_heads).float()
    dt = F.softplus(A_log.float() + mixer.dt_bias.float())  # [b, l, h]
    cum = torch.cumsum(-dt, dim=1).permute(0, 2, 1)  # [b, h, l]
    decay = cum[..., :, None] - cum[..., None, :]
    mask = torch.tril(torch.ones(l, l, dtype=torch.bool, device=u.device))
    decay = torch.exp(decay.masked_fill(~mask, float("-inf")))
    if mixer.input_gain == "zoh":
        decay = decay * (-torch.expm1(-dt)).permute(0, 2, 1)[:, :, None, :]
    return torch.einsum("bthn,bshn->bhts", C, B) * decay
