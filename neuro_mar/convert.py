"""Initialise a MAR student from a Llama-family teacher ("Mamba in the Llama" initialisation).

Per layer: C <- W_q / sqrt(head_dim) (attention's score scale), B <- W_k, x <- W_v (grouped KV
heads repeated to the query heads), out_proj <- W_o; the gate z starts constant (weights 0, bias z*
with silu(z*) = 1), A_log's weights start at 0 with per-head dt log-uniform in ``dt_init_range``
(default 0.3 to 3: a memory of a few tokens; with no softmax normalisation, long memories start far
from the teacher - measured on SmolLM2-135M, the per-layer alignment error at initialisation drops
from ~2e5 to ~2), the conv starts as the identity and D at 0, so at initialisation each mixer is a
causal linear attention with per-head decay. Embeddings, norms, MLPs and the LM head are copied.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .models import MARConfig, MARForCausalLM
from .ssm.discrete_mamba2 import dt_bias_init, inverse_softplus

#: silu(Z_STAR) == 1: a gate that passes y unchanged at initialisation.
Z_STAR = 1.2784645427610738


def _layers(teacher):
    base = getattr(teacher, "model", None)
    layers = getattr(base, "layers", None)
    needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    if layers is None or not len(layers) or not hasattr(base, "embed_tokens") or not hasattr(base, "norm"):
        raise ValueError(f"llama_to_mar: {type(teacher).__name__} is not a Llama-shaped causal LM "
                         "(expected model.embed_tokens, model.layers[i].self_attn.{q,k,v,o}_proj, "
                         "model.layers[i].mlp.{gate,up,down}_proj, model.norm, lm_head)")
    for name in needed:
        obj = layers[0]
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"llama_to_mar: {type(teacher).__name__} layers have no {name}; only Llama-shaped "
                             "teachers (Llama, SmolLM, Mistral, Qwen2-style) are supported")
    act = getattr(teacher.config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"llama_to_mar: MLP activation {act!r} is not SwiGLU/silu")
    return base, layers


def mar_config_from_llama(cfg, **overrides) -> MARConfig:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inner = heads * head_dim
    if inner % cfg.hidden_size:
        raise ValueError(f"llama_to_mar: heads*head_dim={inner} is not a multiple of hidden_size={cfg.hidden_size}")
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), hidden_act="silu",
        d_state=head_dim, n_qk_heads=heads, n_v_heads=heads, expand=inner // cfg.hidden_size,
        mixer_bias=bool(getattr(cfg, "attention_bias", False)), mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    # what the cost model needs to price the teacher without loading it
    kwargs["teacher_config"] = {k: getattr(cfg, k, None) for k in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size")}
    kwargs.update(overrides)
    return MARConfig(**kwargs)


def _repeat_kv(w: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """[kv*hd, ...] -> [heads*hd, ...], each KV head repeated for its query heads."""
    return w.reshape(kv_heads, -1, *w.shape[1:]).repeat_interleave(heads // kv_heads, dim=0).reshape(-1, *w.shape[1:])


def memory_dt(memory: torch.Tensor, max_memory: float = 1024.0) -> torch.Tensor:
    """Per-head dt whose exponential memory ``exp(-dt)`` per token has mean distance ``memory``
    tokens (``exp(-dt) / (1 - exp(-dt)) = memory``), memory clamped to ``[0.5, max_memory]``."""
    m = memory.double().clamp(0.5, max_memory)
    return torch.log1p(1.0 / m).float()


@torch.no_grad()
def llama_to_mar(teacher: nn.Module, dt_init_range: tuple[float, float] = (0.3, 3.0), seed: int = 0,
                 head_memory: torch.Tensor | None = None, normalize_memory: bool = False,
                 **config_overrides) -> MARForCausalLM:
    """A :class:`MARForCausalLM` (fp32) initialised from a Llama-family teacher; config fields
    (e.g. ``neurons``, ``chunk_size``) can be overridden.

    ``head_memory [layers, heads]`` (tokens, e.g. the teacher's attention spans from
    :func:`neuro_mar.evaluation.attention_span`) sets each head's dt so that its memory matches
    (:func:`memory_dt`) instead of drawing dt from ``dt_init_range``. ``normalize_memory`` scales
    each head's output (out_proj's columns) by ``1 - exp(-dt)``, so each head starts as an exponential moving average
    whose weights sum to at most 1 whatever the memory length (without it a head of memory m sums
    about m past inputs, and long memories start far from the teacher's normalised attention). The
    gain is fixed from the initial dt; ``ssm_input_gain="zoh"`` (a config field) normalises with
    the input-dependent dt instead, in the mixer itself (the two are exclusive)."""
    base, layers = _layers(teacher)
    cfg = teacher.config
    # the biases the layers actually have (Qwen2 has q/k/v biases but no `attention_bias` field)
    found = {"mixer_bias": any(getattr(l.self_attn, n).bias is not None for l in layers
                               for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
             "mlp_bias": any(getattr(l.mlp, n).bias is not None for l in layers
                             for n in ("gate_proj", "up_proj", "down_proj"))}
    for key, has in found.items():
        if has and config_overrides.get(key) is False:
            raise ValueError(f"llama_to_mar: {key}=False would drop the teacher's biases; leave it unset")
        config_overrides.setdefault(key, has)
    mcfg = mar_config_from_llama(cfg, **config_overrides)
    if normalize_memory and mcfg.ssm_input_gain != "none":
        raise ValueError(f"llama_to_mar: ssm_input_gain={mcfg.ssm_input_gain!r} already normalises every head's "
                         "memory; normalize_memory would scale it twice")
    if mcfg.d_state != (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) or \
            mcfg.n_qk_heads != cfg.num_attention_heads or mcfg.n_v_heads != cfg.num_attention_heads:
        raise ValueError("llama_to_mar: d_state, n_qk_heads and n_v_heads must match the teacher's attention "
                         "(head_dim and num_attention_heads) for the attention initialisation")
    student = MARForCausalLM(mcfg).float()
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    f32 = lambda t: t.detach().float()  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    if head_memory is not None and tuple(head_memory.shape) != (len(layers), heads):
        raise ValueError(f"llama_to_mar: head_memory has shape {tuple(head_memory.shape)}, expected "
                         f"[layers, heads] = [{len(layers)}, {heads}]")
    student.model.embed_tokens.weight.copy_(f32(base.embed_tokens.weight))
    student.model.norm.weight.copy_(f32(base.norm.weight))
    if not mcfg.tie_word_embeddings:
        student.lm_head.weight.copy_(f32(teacher.lm_head.weight))
    for li, (tl, sl) in enumerate(zip(layers, student.model.layers)):
        att, mix = tl.self_attn, sl.mixer
        d_inner, gn = mix.d_inner, mix.n_qk_heads * mix.d_state
        W = mix.in_proj.weight
        W.zero_()
        W[:d_inner] = _repeat_kv(f32(att.v_proj.weight), kv, heads)
        W[d_inner:d_inner + gn] = _repeat_kv(f32(att.k_proj.weight), kv, heads)
        W[d_inner + gn:d_inner + 2 * gn] = f32(att.q_proj.weight) / math.sqrt(mix.d_state)
        if mix.in_proj.bias is not None:
            bias = mix.in_proj.bias
            bias.zero_()
            for rows, lin, rep in ((slice(0, d_inner), att.v_proj, True), (slice(d_inner, d_inner + gn), att.k_proj, True),
                                   (slice(d_inner + gn, d_inner + 2 * gn), att.q_proj, False)):
                if lin.bias is not None:
                    bias[rows] = _repeat_kv(f32(lin.bias), kv, heads) if rep else f32(lin.bias) / math.sqrt(mix.d_state)
        if head_memory is None:
            mix.dt_bias.copy_(dt_bias_init(mix.n_v_heads, *dt_init_range, generator=gen))
        else:
            mix.dt_bias.copy_(inverse_softplus(memory_dt(head_memory[li].float())))
        mix.z_bias.fill_(Z_STAR)
        mix.conv1d.weight.zero_()
        mix.conv1d.weight[:, 0, -1] = 1.0
        if mix.conv1d.bias is not None:
            mix.conv1d.bias.zero_()
        mix.D.zero_()
        mix.out_proj.weight.copy_(f32(att.o_proj.weight))
        if mix.out_proj.bias is not None:
            mix.out_proj.bias.zero_()
            if att.o_proj.bias is not None:
                mix.out_proj.bias.copy_(f32(att.o_proj.bias))
        if normalize_memory:  # y is linear in x (D = 0): scaling out_proj's columns scales each head's sum
            gain = -torch.expm1(-torch.nn.functional.softplus(mix.dt_bias))  # 1 - exp(-dt), per head
            mix.out_proj.weight *= gain.repeat_interleave(mix.headdim)[None, :]
        sl.input_layernorm.weight.copy_(f32(tl.input_layernorm.weight))
        sl.post_attention_layernorm.weight.copy_(f32(tl.post_attention_layernorm.weight))
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(sl.mlp, name).weight.copy_(f32(getattr(tl.mlp, name).weight))
            b = getattr(tl.mlp, name).bias
            if b is not None:
                getattr(sl.mlp, name).bias.copy_(f32(b))
    return student
