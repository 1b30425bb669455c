"""Distillation losses of MAR (MAR, arXiv 2601.21503), readable PyTorch references.

SBDS:  alpha * KL(p_teacher || q_student) + beta * KL(q_student || p_teacher)   on logits
       + gamma * mean_l || h_l^teacher - h_l^student ||^2                           on features

Stage 2 may add an activity regulariser, ``rate_weight * firing_rate_penalty(rates, rate_target)``:
the rates are recorded with gradient, per spiking site, during the student's forward
(:func:`site_firing_rates`).

The logit terms live in ``neuro_mar.kernels.sbds_ref`` (the reference of the fused kernel):
fp32, chunked over tokens, averaged over valid (mask) positions and multiplied by T^2 (the usual
temperature scaling, so gradients keep their size).
"""
from __future__ import annotations

import contextlib

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


#: rows (token positions) of each site's input on which :func:`site_firing_rates` fires the neuron
#: again, with gradient, per forward: an evenly strided subset, so the regulariser's memory stays
#: bounded (rows x channels x T per site) whatever the batch
RATE_SAMPLE_ROWS = 1024


def differentiable_firing_rate(neuron, x: torch.Tensor, max_rows: int = RATE_SAMPLE_ROWS) -> torch.Tensor:
    """The firing rate of ``neuron`` on ``x [..., channels]``: non-zero spikes / (elements x T), a
    0-dim fp32 tensor that carries gradient to ``x`` and the neuron's threshold through its
    surrogate (``neuron.encode``, the PyTorch reference path, fired again on up to ``max_rows``
    evenly strided rows of ``x``).

    Its value is the rate the site's counters record (on those rows). Its gradient is that of
    ``sum |s_t|``, where ``|s|`` at a silent step (s = 0) is read as ``s * sign(x)`` for ternary
    neurons and ``s`` for binary ones, so the surrogate's gradient reaches sub-threshold elements
    too (``abs`` would give them none)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > max_rows:
        rows = rows[torch.arange(max_rows, device=rows.device) * rows.shape[0] // max_rows]
    s = neuron.encode(rows)  # [T, n, channels], spikes in rows.dtype, surrogate gradients
    hard = s.detach()
    silent = torch.sign(rows.detach()).expand_as(hard) if getattr(neuron, "spike_levels", "") == "ternary" \
        else torch.ones_like(hard)
    direction = torch.where(hard != 0, torch.sign(hard), silent)
    return (s.float() * direction.float()).mean()


@contextlib.contextmanager
def site_firing_rates(model, enabled: bool = True, max_rows: int = RATE_SAMPLE_ROWS):
    """While the block runs, append one :func:`differentiable_firing_rate` per call of every
    spiking (not dense) site of ``model`` (a MARForCausalLM) to the yielded list: one 0-dim
    tensor per site and forward. ``enabled=False`` yields an empty list and adds no hook."""
    rates: list[torch.Tensor] = []
    handles = []
    if enabled:
        for *_, site in model.spike_sites():
            if not site.is_dense:
                handles.append(site.register_forward_pre_hook(
                    lambda mod, args: rates.append(differentiable_firing_rate(mod.neuron, args[0], max_rows))))
    try:
        yield rates
    finally:
        for h in handles:
            h.remove()


def firing_rate_penalty(rates: list[torch.Tensor], target: float = 0.0) -> torch.Tensor:
    """The activity regulariser over spike sites: ``mean_s (rate_s - target)^2``, or with
    ``target`` 0 the mean rate ``mean_s rate_s`` (rates are in [0, 1], so the mean keeps a
    gradient where the square of a small rate would have almost none). 0 without sites."""
    if not rates:
        return torch.zeros(())
    r = torch.stack([v.float() for v in rates])
    return r.mean() if target == 0 else (r - target).pow(2).mean()
