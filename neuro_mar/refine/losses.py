"""Distillation losses of MAR (shared/docs/mar-method.md §1 and §3), readable PyTorch references.

SBDS:  alpha * KL(p_teacher || q_student) + beta * KL(q_student || p_teacher)   on logits
       + gamma * mean_l || h_l^teacher - h_l^student ||^2                           on features

Logit terms are computed in fp32, chunked over tokens so that one chunk's [tokens, vocab] tensors
are all that exist at a time, averaged over valid (mask) positions and multiplied by T^2
(the usual temperature scaling, so gradients keep their size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Per-position (forward KL(p||q), reverse KL(q||p)) for logits [..., V]."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return fkl, rkl


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


def feature_loss(student_hidden, teacher_hidden, layers: list[int], features: str = "pre", norms=None) -> torch.Tensor:
    """Mean over ``layers`` of the mean squared distance of hidden states.

    ``features``: ``"pre"`` the pre-norm residual stream (the paper's choice), ``"post"`` the
    output of the next block's input norm (``norms[l]``, the student's and teacher's norm modules as
    a pair), ``"both"`` their sum."""
    if features not in ("pre", "post", "both"):
        raise ValueError(f"features must be pre, post or both, got {features!r}")
    terms = []
    for l in layers:
        hs, ht = student_hidden[l].float(), teacher_hidden[l].float()
        if features in ("pre", "both"):
            terms.append(F.mse_loss(hs, ht))
        if features in ("post", "both"):
            ns, nt = norms[l]
            terms.append(F.mse_loss(ns(hs).float(), nt(ht).float()))
    return torch.stack(terms).mean() if features != "both" else torch.stack(terms).sum() / len(layers)
