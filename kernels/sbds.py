"""Fused linear SBDS loss: forward and reverse KL over the vocabulary without materialising the
whole batch's logits (reference: ``sbds_ref.py``).

Tokens are processed in chunks. Per chunk the student's and the teacher's logits are formed by
matmuls in the input dtype (bf16 on GPU: tensor cores, fp32 accumulation); one Triton program
per row then walks the vocabulary in tiles three times (online log-sum-exp of both
distributions; both KL sums; the gradient) and writes the row's loss and the gradient of the
loss with respect to the student logits, already scaled; two more matmuls turn it into the
gradients of the student's hidden states and LM-head weight. The gradients are computed in the
forward (as Liger-Kernel does), so the loss must be the last op before ``backward`` and the
teacher gets none. Only one chunk of logits exists at a time.
"""
from __future__ import annotations

import torch

from .atmn_ops import triton_available


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _sbds_rows(S, Tl, G, LOSS, SCALE, V, stride, alpha, beta, inv_t, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_ptr = S + row * stride
        t_ptr = Tl + row * stride
        g_ptr = G + row * stride
        cols = tl.arange(0, BLOCK)
        # pass 1: online log-sum-exp of both (tempered) distributions
        NEG = -1e30  # finite: lanes past V never make inf - inf
        m_s = tl.full([BLOCK], NEG, tl.float32)
        m_t = tl.full([BLOCK], NEG, tl.float32)
        l_s = tl.zeros([BLOCK], tl.float32)
        l_t = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            s = tl.where(mask, tl.load(s_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t, NEG)
            t = tl.where(mask, tl.load(t_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t, NEG)
            nm_s = tl.maximum(m_s, s)
            nm_t = tl.maximum(m_t, t)
            l_s = l_s * tl.exp(m_s - nm_s) + tl.where(mask, tl.exp(s - nm_s), 0.0)
            l_t = l_t * tl.exp(m_t - nm_t) + tl.where(mask, tl.exp(t - nm_t), 0.0)
            m_s = nm_s
            m_t = nm_t
        M_s = tl.max(m_s, 0)
        M_t = tl.max(m_t, 0)
        lse_s = M_s + tl.log(tl.sum(l_s * tl.exp(m_s - M_s), 0))
        lse_t = M_t + tl.log(tl.sum(l_t * tl.exp(m_t - M_t), 0))
        # pass 2: both KL sums
        fkl = tl.zeros([BLOCK], tl.float32)
        rkl = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            ls = tl.load(s_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s
            lt = tl.load(t_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
            d = tl.where(mask, lt - ls, 0.0)
            fkl += tl.exp(lt) * d
            rkl -= tl.exp(ls) * d
        FKL = tl.sum(fkl, 0)
        RKL = tl.sum(rkl, 0)
        tl.store(LOSS + row, alpha * FKL + beta * RKL)
        # pass 3: d loss / d student logits, times the row's scale
        sc = tl.load(SCALE + row)
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            ls = tl.load(s_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s
            lt = tl.load(t_ptr + off + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
            q = tl.exp(ls)
            g = alpha * (q - tl.exp(lt)) + beta * q * (ls - lt - RKL)
            tl.store(g_ptr + off + cols, (g * sc).to(G.dtype.element_ty), mask=mask)

    return _sbds_rows


_ROWS = None


def sbds_rows(s: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, alpha: float, beta: float, temperature: float):
    """Row-wise SBDS on logits ``[R, V]``: ``(grad [R, V] in s.dtype, loss [R] fp32)`` with
    ``grad = scale_r * dloss_r / d(s / T)`` and ``loss_r = alpha KL(p||q) + beta KL(q||p)``."""
    import triton

    global _ROWS
    if _ROWS is None:
        _ROWS = _kernel()
    s, t = s.contiguous(), t.contiguous()
    R, V = s.shape
    g = torch.empty_like(s)
    loss = torch.empty(R, device=s.device, dtype=torch.float32)
    if R:
        BLOCK = min(4096, triton.next_power_of_2(V))
        _ROWS[(R,)](s, t, g, loss, scale.float().contiguous(), V, s.stride(0), float(alpha), float(beta),
                    1.0 / temperature, BLOCK=BLOCK, num_warps=8 if BLOCK >= 2048 else 4)
    return g, loss


class _FusedLinearSBDS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, W_s, h_t, W_t, t_logits, alpha, beta, temperature, mask, chunk):
        H = h_s.shape[-1]
        hs_all = h_s.reshape(-1, H)
        N = hs_all.shape[0]
        valid = (mask.reshape(-1).to(torch.bool) if mask is not None
                 else torch.ones(N, dtype=torch.bool, device=h_s.device))
        n = int(valid.sum())
        if n == 0:
            raise ValueError("fused_linear_sbds: the mask leaves no valid position")
        dh = torch.empty_like(hs_all)
        dW = torch.zeros(W_s.shape, device=W_s.device, dtype=torch.float32)
        total = torch.zeros((), device=h_s.device, dtype=torch.float32)
        ht_all = h_t.reshape(-1, h_t.shape[-1]) if h_t is not None else None
        tl_all = t_logits.reshape(-1, t_logits.shape[-1]) if t_logits is not None else None
        for i in range(0, N, chunk):
            hs = hs_all[i:i + chunk]
            s = hs @ W_s.t()
            t = (ht_all[i:i + chunk] @ W_t.t()) if tl_all is None else tl_all[i:i + chunk]
            v = valid[i:i + chunk]
            scale = v.float() * (temperature / n)  # T^2 * (1/T) / n
            g, rows = sbds_rows(s, t, scale, alpha, beta, temperature)
            total += (rows * v).sum()
            dh[i:i + chunk] = g @ W_s
            dW += (g.t() @ hs).float()
        ctx.save_for_backward(dh, dW)
        ctx.shapes = (h_s.shape, W_s.dtype)
        return total * (temperature**2 / n)

    @staticmethod
    def backward(ctx, grad):
        dh, dW = ctx.saved_tensors
        shape, wdtype = ctx.shapes
        return ((dh * grad).reshape(shape), (dW * grad).to(wdtype), None, None, None, None, None, None, None, None)


def fused_linear_sbds(h_s, W_s, h_t=None, W_t=None, teacher_logits=None, alpha: float = 0.2, beta: float = 0.7,
                      temperature: float = 1.0, mask=None, chunk: int | None = None) -> torch.Tensor:
    """SBDS loss from hidden states and LM-head weights (student trainable, teacher frozen or its
    logits given), with gradients for the student's hidden states and weight. Shapes:
    ``h_s [..., H_s]``, ``W_s [V, H_s]``, ``h_t [..., H_t]``, ``W_t [V, H_t]`` or
    ``teacher_logits [..., V]``, ``mask [...]`` (True = counted)."""
    if (teacher_logits is None) == (h_t is None or W_t is None):
        raise ValueError("fused_linear_sbds: give either (h_t, W_t) or teacher_logits")
    if not triton_available():
        raise ImportError("fused_linear_sbds needs triton; use neuro_mar.kernels.sbds_ref.linear_sbds_ref instead")
    V = W_s.shape[0]
    if chunk is None:  # one chunk of logits ~ 25M elements at most (a few hundred MB over s, t, g)
        chunk = max(16, min(4096, (1 << 25) // max(V, 1)))
    return _FusedLinearSBDS.apply(h_s, W_s, h_t, W_t, teacher_logits, float(alpha), float(beta), float(temperature),
                                  mask, int(chunk))


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
