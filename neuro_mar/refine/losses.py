"""Distillation losses of MAR (MAR, arXiv 2601.21503), readable PyTorch references.

SBDS:  alpha * KL(p_teacher || q_student) + beta * KL(q_student || p_teacher)   on logits
       + gamma * mean_l || h_l^teacher - h_l^student ||^2                           on features

The logit terms live in ``neuro_mar.kernels.sbds_ref`` (the reference of the fused kernel):
fp32, chunked over tokens, averaged over valid (mask) positions and multiplied by T^2 (the usual
temperature scaling, so gradients keep their size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


from ..kernels.sbds_ref import kl_terms, sbds_logit_loss  # noqa: E402,F401  (the one definition)


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
