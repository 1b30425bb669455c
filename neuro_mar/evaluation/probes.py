"""Where a model's context goes: the memory length of every SSM head and the attention span of
every teacher head, measured on the same tokens.

* An SSM head decays its state by ``exp(-dt_t)`` per token, so its e-folding memory is
  ``1 / mean(dt)`` tokens (mean over the positions of the given text);
* an attention head's span is the mean distance ``sum_s a_ts (t - s) / sum_s a_ts`` from each
  query to what it attends to, over keys ``s >= 1``: the mass on the first token (an attention
  sink, a place to put attention that reads nothing) is reported separately, not as distance.
  Averaged over query positions ``t >= min_position`` (early positions cannot look far).
  An exponential memory with decay ``exp(-dt)`` per token has mean distance ``~ 1 / dt``, so the
  two are in the same units.

``head_memory`` and ``attention_span`` return ``[layers, heads]`` tensors in tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def head_memory(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[layers, heads]`` e-folding memory ``1 / mean_t dt`` (tokens) of every mixer head of a
    MAR model on ``input_ids [b, l]``."""
    dts = []
    hooks = []
    for layer in model.model.layers:
        mixer = layer.mixer

        def hook(mod, args, out, mixer=mixer):
            a_log = out[..., -mixer.n_v_heads:]  # a hooked in_proj is called unpadded (see _project_in)
            dts.append(F.softplus(a_log.float() + mixer.dt_bias.float()).mean(dim=(0, 1)))

        hooks.append(mixer.in_proj.register_forward_hook(hook))
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return 1.0 / torch.stack(dts).cpu()


@torch.no_grad()
def attention_span(teacher, input_ids: torch.Tensor, min_position: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(span [layers, heads], sink [layers, heads])`` of a Hugging Face attention model on
    ``input_ids [b, l]``: mean query-to-key distance in tokens over keys after the first, and the
    mean attention mass on position 0, over query positions ``>= min_position``."""
    from ..teachers import eager_attention

    with eager_attention(teacher):
        out = teacher(input_ids=input_ids.to(next(teacher.parameters()).device), output_attentions=True)
    l = input_ids.shape[1]
    if l <= min_position:
        raise ValueError(f"sequences of {l} tokens are too short for min_position={min_position}")
    pos = torch.arange(l, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).clamp_min(0)  # [t, s]
    spans, sinks = [], []
    for att in out.attentions:  # [b, h, t, s]
        a = att.float().cpu()[:, :, min_position:]
        rest = a[..., 1:]
        d = (rest * dist[min_position:, 1:]).sum(-1) / rest.sum(-1).clamp_min(1e-12)
        spans.append(d.mean(dim=(0, 2)))
        sinks.append(a[..., 0].mean(dim=(0, 2)))
    return torch.stack(spans), torch.stack(sinks)
