"""Fused linear SBDS loss: forward and reverse KL over the vocabulary without materialising the
whole batch's logits (reference: ``sbds_ref.py``).

Tokens are processed in chunks (default 1024 rows). Per chunk the student's and the teacher's
logits are formed by matmuls in the compute dtype (bf16 under autocast or for bf16 inputs: tensor
cores, fp32 accumulation) into two reused buffers; one Triton program per row then walks the
vocabulary in tiles twice:

1. online statistics of both tempered distributions: running max and sum of exponentials, and
   the running sums of ``e^(t - m_t) * d`` and ``e^(s - m_s) * d`` with ``d = (t - s) / T``,
   which give both KL divergences without a second look at the logits::

       KL(p||q) = E_p[d] - (lse_t - lse_s),     KL(q||p) = (lse_t - lse_s) - E_q[d]

2. the gradient with respect to the student logits, already scaled, written over the student
   logits in place.

Two more matmuls turn it into the gradients of the student's hidden states (written into place)
and LM-head weight (accumulated in place: fp32 when the weight is fp32, else in the weight's
dtype, as Liger-Kernel does). The gradients are computed in the forward (as Liger-Kernel does),
so the loss must be the last op before ``backward``, its backward runs once, and the teacher gets
none. Memory beyond the inputs: two ``[chunk, V]`` buffers, the weight gradient and ``dh``.
"""
from __future__ import annotations

import torch

from .atmn_ops import triton_available


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _sbds_rows(S, Tl, LOSS, SCALE, V, s_stride, t_stride, alpha, beta, inv_t, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_ptr = S + row * s_stride
        t_ptr = Tl + row * t_stride
        cols = tl.arange(0, BLOCK)
        NEG = -1e30  # finite: lanes past V never make inf - inf
        m_s = tl.full([BLOCK], NEG, tl.float32)
        m_t = tl.full([BLOCK], NEG, tl.float32)
        l_s = tl.zeros([BLOCK], tl.float32)
        l_t = tl.zeros([BLOCK], tl.float32)
        a_s = tl.zeros([BLOCK], tl.float32)  # sum e^(s - m_s) * d
        a_t = tl.zeros([BLOCK], tl.float32)  # sum e^(t - m_t) * d
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            s = tl.load(s_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            t = tl.load(t_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            d = t - s
            s = tl.where(mask, s, NEG)
            t = tl.where(mask, t, NEG)
            nm_s = tl.maximum(m_s, s)
            nm_t = tl.maximum(m_t, t)
            r_s = tl.exp(m_s - nm_s)
            r_t = tl.exp(m_t - nm_t)
            e_s = tl.where(mask, tl.exp(s - nm_s), 0.0)
            e_t = tl.where(mask, tl.exp(t - nm_t), 0.0)
            l_s = l_s * r_s + e_s
            l_t = l_t * r_t + e_t
            a_s = a_s * r_s + e_s * d
            a_t = a_t * r_t + e_t * d
            m_s = nm_s
            m_t = nm_t
        M_s = tl.max(m_s, 0)
        M_t = tl.max(m_t, 0)
        w_s = tl.exp(m_s - M_s)
        w_t = tl.exp(m_t - M_t)
        L_s = tl.sum(l_s * w_s, 0)
        L_t = tl.sum(l_t * w_t, 0)
        lse_s = M_s + tl.log(L_s)
        lse_t = M_t + tl.log(L_t)
        gap = lse_t - lse_s
        FKL = tl.sum(a_t * w_t, 0) / L_t - gap
        RKL = gap - tl.sum(a_s * w_s, 0) / L_s
        tl.store(LOSS + row, alpha * FKL + beta * RKL)
        # d loss / d student logits, times the row's scale, over the student logits
        sc = tl.load(SCALE + row)
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            ls = tl.load(s_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s
            lt = tl.load(t_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
            q = tl.exp(ls)
            g = alpha * (q - tl.exp(lt)) + beta * q * (ls - lt - RKL)
            tl.store(s_ptr + off + cols, (g * sc).to(S.dtype.element_ty), mask=mask)

    return _sbds_rows


_ROWS = None


def sbds_rows_(s: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, alpha: float, beta: float,
               temperature: float) -> torch.Tensor:
    """Row-wise SBDS on logits ``s, t [R, V]`` (rows contiguous): returns ``loss [R]`` (fp32,
    ``alpha KL(p||q) + beta KL(q||p)``) and overwrites ``s`` with ``scale_r * dloss_r / d(s / T)``."""
    import triton

    global _ROWS
    if _ROWS is None:
        _ROWS = _kernel()
    R, V = s.shape
    if s.stride(1) != 1 or t.stride(1) != 1:
        raise ValueError("sbds_rows_: rows must be contiguous")
    loss = torch.empty(R, device=s.device, dtype=torch.float32)
    if R:
        BLOCK = min(2048, triton.next_power_of_2(V))
        _ROWS[(R,)](s, t, loss, scale.float().contiguous(), V, s.stride(0), t.stride(0), float(alpha), float(beta),
                    1.0 / temperature, BLOCK=BLOCK, num_warps=8 if BLOCK >= 2048 else 4)
    return loss


_MIXED_ADDMM: bool | None = None  # does this build have addmm(bf16, bf16 -> fp32 out) on this device?


def _accumulate_dW(dW: torch.Tensor, g: torch.Tensor, hs: torch.Tensor) -> None:
    """``dW += g^T hs`` in place, without a [V, H] temporary where the build allows."""
    global _MIXED_ADDMM
    if dW.dtype == g.dtype:
        dW.addmm_(g.t(), hs)
        return
    if _MIXED_ADDMM is not False and dW.is_cuda:
        try:
            torch.addmm(dW, g.t(), hs, out_dtype=dW.dtype, out=dW)
            _MIXED_ADDMM = True
            return
        except (RuntimeError, TypeError):
            _MIXED_ADDMM = False
    dW += (g.t() @ hs).to(dW.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FusedLinearSBDS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, W_s, h_t, W_t, t_logits, alpha, beta, temperature, mask, chunk):
        cdt = _compute_dtype(h_s)
        with torch.autocast(h_s.device.type, enabled=False):
            H = h_s.shape[-1]
            hs_all = h_s.reshape(-1, H).to(cdt)
            Ws = W_s.to(cdt)
            N, V = hs_all.shape[0], W_s.shape[0]
            valid = (mask.reshape(-1).to(torch.bool) if mask is not None
                     else torch.ones(N, dtype=torch.bool, device=h_s.device))
            n = int(valid.sum())
            if n == 0:
                raise ValueError("fused_linear_sbds: the mask leaves no valid position")
            dh = torch.empty_like(hs_all)
            dW = torch.zeros(W_s.shape, device=W_s.device, dtype=torch.float32 if W_s.dtype == torch.float32 else cdt)
            total = torch.zeros((), device=h_s.device, dtype=torch.float32)
            if t_logits is None:
                ht_all = h_t.reshape(-1, h_t.shape[-1]).to(cdt)
                Wt = W_t.to(cdt)
                t_buf = torch.empty(min(chunk, N), V, device=h_s.device, dtype=cdt)
            else:
                tl_all = t_logits.reshape(-1, V)
                if tl_all.stride(-1) != 1:
                    tl_all = tl_all.contiguous()
            s_buf = torch.empty(min(chunk, N), V, device=h_s.device, dtype=cdt)
            scale_all = valid.float() * (temperature / n)  # T^2 * (1/T) / n
            for i in range(0, N, chunk):
                r = min(chunk, N - i)
                hs, s = hs_all[i:i + r], s_buf[:r]
                torch.mm(hs, Ws.t(), out=s)
                if t_logits is None:
                    t = torch.mm(ht_all[i:i + r], Wt.t(), out=t_buf[:r])
                else:
                    t = tl_all[i:i + r]
                rows = sbds_rows_(s, t, scale_all[i:i + r], alpha, beta, temperature)  # s now holds the gradient
                total += rows @ scale_all[i:i + r]
                torch.mm(s, Ws, out=dh[i:i + r])
                _accumulate_dW(dW, s, hs)
            del s_buf, Ws
        ctx.save_for_backward(dh, dW)
        ctx.meta = (h_s.shape, h_s.dtype, W_s.dtype)
        ctx.used = False
        return total * temperature  # sum_r loss_r * T / n * T = T^2 * mean

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("fused_linear_sbds: backward ran twice (its gradients are computed in the forward "
                               "and scaled in place); recompute the loss instead of retain_graph")
        ctx.used = True
        dh, dW = ctx.saved_tensors
        shape, hdtype, wdtype = ctx.meta
        dh = dh.mul_(grad.to(dh.dtype)).reshape(shape).to(hdtype)
        dW = dW.mul_(grad.to(dW.dtype)).to(wdtype)
        return dh, dW, None, None, None, None, None, None, None, None


def fused_linear_sbds(h_s, W_s, h_t=None, W_t=None, teacher_logits=None, alpha: float = 0.2, beta: float = 0.7,
                      temperature: float = 1.0, mask=None, chunk: int | None = None) -> torch.Tensor:
    """SBDS loss from hidden states and LM-head weights (student trainable, teacher frozen or its
    logits given), with gradients for the student's hidden states and weight. Shapes:
    ``h_s [..., H_s]``, ``W_s [V, H_s]``, ``h_t [..., H_t]``, ``W_t [V, H_t]`` or
    ``teacher_logits [..., V]``, ``mask [...]`` (True = counted). ``chunk``: token rows per step
    (default 1024; memory ~ 2 * chunk * V elements of the compute dtype)."""
    if (teacher_logits is None) == (h_t is None or W_t is None):
        raise ValueError("fused_linear_sbds: give either (h_t, W_t) or teacher_logits")
    if not triton_available():
        raise ImportError("fused_linear_sbds needs triton; use neuro_mar.kernels.sbds_ref.linear_sbds_ref instead")
    if teacher_logits is not None and teacher_logits.shape[-1] != W_s.shape[0]:
        raise ValueError(f"fused_linear_sbds: teacher logits have {teacher_logits.shape[-1]} words, the student's "
                         f"head {W_s.shape[0]}")
    if h_t is not None and W_t.shape[0] != W_s.shape[0]:
        raise ValueError(f"fused_linear_sbds: teacher head has {W_t.shape[0]} words, the student's {W_s.shape[0]}")
    chunk = 1024 if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"fused_linear_sbds: chunk must be >= 1, got {chunk}")
    return _FusedLinearSBDS.apply(h_s, W_s, h_t, W_t, teacher_logits, float(alpha), float(beta), float(temperature),
                                  mask, chunk)


def chunked_linear_sbds(h_s, W_s, h_t, W_t, alpha=0.2, beta=0.7, temperature=1.0, chunk: int = 1024, compile=True):
    """The torch.compile baseline: per token chunk, logits and the SBDS loss in a compiled function,
    gradients taken chunk by chunk (so only one chunk's logits live). Returns (loss, dh, dW)."""
    from .sbds_ref import kl_terms

    def chunk_loss(hs, Ws, ht, Wt):
        fkl, rkl = kl_terms(hs @ Ws.t(), ht @ Wt.t(), temperature)
        return (alpha * fkl + beta * rkl).sum()

    fn = torch.compile(chunk_loss) if compile else chunk_loss
    H = h_s.shape[-1]
    hs_all, ht_all = h_s.reshape(-1, H), h_t.reshape(-1, h_t.shape[-1])
    N = hs_all.shape[0]
    Ws = W_s.detach().requires_grad_()
    dh = torch.empty_like(hs_all)
    dW = torch.zeros_like(W_s, dtype=torch.float32)
    total = 0.0
    for i in range(0, N, chunk):
        hs = hs_all[i:i + chunk].detach().requires_grad_()
        loss = fn(hs, Ws, ht_all[i:i + chunk], W_t) * (temperature**2 / N)
        ghs, gW = torch.autograd.grad(loss, (hs, Ws))
        dh[i:i + chunk] = ghs
        dW += gW.float()
        total += loss.detach()
    return total, dh, dW
