"""PyTorch reference of the SBDS logit loss (the oracle of ``sbds.py``).

    loss = T^2 * mean_valid [ alpha * KL(p || q) + beta * KL(q || p) ],
    p = softmax(teacher_logits / T), q = softmax(student_logits / T)

computed in fp32, chunked over tokens so one chunk's [tokens, vocab] tensors are all that exist at
a time. Its gradient with respect to the student logits z (per valid row, before the mean):

    dL/dz = T * [ alpha * (q - p) + beta * q * (log q - log p - KL(q || p)) ]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-position KL(a || b) in nats from log-probabilities [..., V]."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def kl_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Per-position (forward KL(p||q), reverse KL(q||p)) for logits [..., V]."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return kl(log_p, log_q), kl(log_q, log_p)


def sbds_logit_loss(student_logits, teacher_logits, alpha: float = 0.2, beta: float = 0.7,
                    temperature: float = 1.0, mask: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """alpha * forward KL + beta * reverse KL, mean over valid positions, times T^2."""
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = teacher_logits.reshape(-1, V)
    m = mask.reshape(-1).to(torch.bool) if mask is not None else None
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk):
        fkl, rkl = kl_terms(s[i:i + chunk], t[i:i + chunk], temperature)
        term = alpha * fkl + beta * rkl
        if m is not None:
            term = term[m[i:i + chunk]]
        total = total + term.sum()
    n = int(m.sum()) if m is not None else s.shape[0]
    if n == 0:
        raise ValueError("sbds_logit_loss: the mask leaves no valid position")
    return total / n * temperature**2


def linear_sbds_ref(h_s, W_s, h_t=None, W_t=None, teacher_logits=None, alpha=0.2, beta=0.7, temperature=1.0,
                    mask=None):
    """The fused op's reference: logits formed in fp32 from hidden states and LM-head weights
    (student trainable; teacher frozen, or its logits given)."""
    s = h_s.float() @ W_s.float().t()
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = h_t.float() @ W_t.float().t()
    return sbds_logit_loss(s, teacher_logits.float(), alpha, beta, temperature, mask)
