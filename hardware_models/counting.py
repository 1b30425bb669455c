"""Counting operations of a model, per layer and per part, per token.

Conventions:

* a non-zero spike, +1 or -1, costs one accumulate (AC) per fan-out synapse of the projection it
  feeds (a subtraction costs what an addition costs); the + / - split is kept. SI-LIF's integer
  spikes arrive here as |n| unit spikes, so they cost |n| unit ACs;
* a projection behind a dense site costs d_in * d_out multiply-accumulates (MACs) per token;
* the scan, conv, gating, activations, norms and the LM head are counted explicitly:
  ``mul``/``add`` element-wise operations, ``act`` activation-function evaluations (exp, SiLU,
  softplus, rsqrt), ``mac`` for the small dense contractions (scan read-out, conv, LM head);
* a neuron update is one neuron for one micro-step (T per input element of a spiking site);
* ``dense_macs`` records what each spiking projection would cost dense: GPUs pay that.

The student costs the same for every token whatever the context (a recurrent state); the
Transformer teacher's attention grows with the position. ``prefill`` is the mean per token over a
context of L tokens, ``decode`` one generated token at context L.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

COMPONENTS = ("ac_pos", "ac_neg", "mac", "mul", "add", "act", "neuron_update", "mem_bytes", "dense_macs")


@dataclass
class Row:
    """Operations per token of one part of one layer (layer = -1 for the embedding/head)."""

    layer: int
    part: str
    ops: dict = field(default_factory=dict)

    def get(self, k: str) -> float:
        return float(self.ops.get(k, 0.0))


def _row(layer, part, **ops):
    return Row(layer, part, {k: float(v) for k, v in ops.items() if v})


def synaptic_ops(spikes: torch.Tensor, weight: torch.Tensor, effective: bool = True) -> int:
    """Accumulates triggered by ``spikes [..., d_in]`` (any values; non-zero = a spike) into a
    linear layer with ``weight [d_out, d_in]``: each non-zero input meets every synapse of its
    column, or with ``effective`` only the non-zero weights (NeuroBench's "effective" count)."""
    nz = (spikes != 0).reshape(-1, spikes.shape[-1]).sum(0).to(torch.float64)
    fan = (weight != 0).sum(0).to(torch.float64) if effective else torch.full_like(nz, weight.shape[0])
    return int((nz * fan).sum().item())


# ---------------------------------------------------------------------------------------------
# the MAR student
# ---------------------------------------------------------------------------------------------
def site_fanout(cfg) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of the projection(s) each site kind feeds."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    d_inner = cfg.expand * d
    conv_dim = d_inner + 2 * cfg.n_qk_heads * cfg.d_state
    return {"mixer.in": (d, conv_dim + d_inner + cfg.n_v_heads), "mixer.out": (d_inner, d),
            "mlp.in": (d, 2 * f), "mlp.down": (f, d)}


@torch.no_grad()
def measure_site_activity(model, batches) -> dict:
    """Run ``model`` (a MARForCausalLM) on ``batches`` of input_ids and return, per site,
    ``{(layer, kind): {"positive", "negative", "elements", "T", "dense"}}`` per token, plus
    ``"tokens"``. Counters are reset before and after."""
    model.reset_spike_counters()
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            ids = ids.to(model.device)
            model(input_ids=ids)
            tokens += ids.numel()
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("measure_site_activity: no tokens were given")
    out = {"tokens": tokens}
    for layer, kind, _, site in model.spike_sites():
        s = site.stats()
        out[(layer, kind)] = {"positive": s["positive"] / tokens, "negative": s["negative"] / tokens,
                              "elements": s["elements"] / tokens, "T": s["T"], "dense": site.is_dense,
                              "firing_rate": s["firing_rate"]}
    model.reset_spike_counters()
    return out


def student_rows(cfg, activity: dict | None = None, memory: bool = False, weight_bytes: int = 2) -> list[Row]:
    """Operations per token of a MAR model with config ``cfg``. ``activity`` (from
    :func:`measure_site_activity`) supplies the spikes per token of spiking sites; sites missing
    from it, or dense, are billed as dense MACs (``activity=None`` is the dense Stage-1 model).
    ``memory`` adds per-token weight and state traffic (batch-1 decode: every weight read once)."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    h, n, g = cfg.n_v_heads, cfg.d_state, cfg.n_qk_heads
    d_inner = cfg.expand * d
    p = d_inner // h
    conv_dim = d_inner + 2 * g * n
    fan = site_fanout(cfg)
    gain = getattr(cfg, "ssm_input_gain", "none") == "zoh"  # x scaled by 1 - exp(-dt): h*p mul, h exp, h add
    rows: list[Row] = []
    for layer in range(L):
        for kind, (din, dout) in fan.items():
            a = (activity or {}).get((layer, kind))
            mem = din * dout * weight_bytes if memory else 0
            if a is None or a["dense"]:
                rows.append(_row(layer, kind, mac=din * dout, dense_macs=din * dout, mem_bytes=mem))
            else:
                rows.append(_row(layer, kind, ac_pos=a["positive"] * dout, ac_neg=a["negative"] * dout,
                                 neuron_update=a["elements"] * a["T"], dense_macs=din * dout, mem_bytes=mem))
        rows.append(_row(layer, "conv", mac=conv_dim * cfg.d_conv, add=conv_dim, act=conv_dim,
                         mem_bytes=(2 * conv_dim * (cfg.d_conv - 1) * 4 if memory else 0)))
        rows.append(_row(layer, "scan", mul=h * p * n + h * p + gain * h * p, mac=2 * h * p * n + h * p,
                         add=h + gain * h, act=2 * h + gain * h,
                         mem_bytes=(2 * h * p * n * 4 if memory else 0)))
        rows.append(_row(layer, "gating", add=d_inner, act=d_inner + f, mul=d_inner + f))
        rows.append(_row(layer, "norms+residual", mac=2 * d, mul=4 * d, act=2, add=2 * d))
    rows.append(_row(-1, "head", mac=d * cfg.vocab_size + d, mul=2 * d, act=1,
                     mem_bytes=(d * cfg.vocab_size * weight_bytes if memory else 0)))
    return rows


# ---------------------------------------------------------------------------------------------
# a Llama-family Transformer
# ---------------------------------------------------------------------------------------------
def llama_rows(cfg, context: int, mode: str = "prefill", memory: bool = False, weight_bytes: int = 2,
               kv_bytes: int = 2) -> list[Row]:
    """Operations per token of a Llama-shaped Transformer (``cfg``: a LlamaConfig or a dict with
    its fields). ``mode="prefill"``: mean over the positions of a context of ``context`` tokens;
    ``"decode"``: one token attending to ``context`` previous tokens plus itself."""
    c = cfg if isinstance(cfg, dict) else cfg.to_dict()
    d, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    H, KV = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = c.get("head_dim") or d // H
    if mode == "prefill":
        keys = (context + 1) / 2  # mean of 1..context
    elif mode == "decode":
        keys = context + 1
    else:
        raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
    rows: list[Row] = []
    for layer in range(L):
        w = (d * H * hd + 2 * d * KV * hd + H * hd * d)
        rows.append(_row(layer, "attn.proj", mac=w, dense_macs=w, mem_bytes=w * weight_bytes if memory else 0))
        rows.append(_row(layer, "attn.rope", mul=2 * (H + KV) * hd, add=(H + KV) * hd))
        kv_mem = (2 * KV * hd * keys * kv_bytes) if memory else 0
        rows.append(_row(layer, "attn.scores", mac=2 * H * hd * keys, mul=2 * H * keys, act=H * keys,
                         add=H * keys, mem_bytes=kv_mem))
        m = 3 * d * f
        rows.append(_row(layer, "mlp", mac=m, dense_macs=m, act=f, mul=f, mem_bytes=m * weight_bytes if memory else 0))
        rows.append(_row(layer, "norms+residual", mac=2 * d, mul=4 * d, act=2, add=2 * d))
    rows.append(_row(-1, "head", mac=d * V + d, mul=2 * d, act=1, mem_bytes=(d * V * weight_bytes if memory else 0)))
    return rows


def totals(rows: list[Row]) -> dict:
    out = {k: 0.0 for k in COMPONENTS}
    for r in rows:
        for k, v in r.ops.items():
            out[k] += v
    return out
