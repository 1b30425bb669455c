"""MARForCausalLM: the spiking SSM student as a Hugging Face model.

Block (pre-norm, Llama-shaped):  h = h + mixer(norm1(h));  h = h + mlp(norm2(h)).
Spike sites, one before each of the four big projections: ``mixer.in_site`` (before in_proj),
``mixer.out_site`` (before out_proj), ``mlp.in_site`` (before gate_proj and up_proj, shared),
``mlp.down_site`` (before down_proj).

``output_hidden_states=True`` returns the *pre-norm residual stream*: entry i < L is the input of
layer i (entry 0 the embeddings), entry L the residual after the last layer, before the final
norm. These are the features SBDS aligns.

Generation keeps a recurrent cache (:class:`MARCache`) whose size does not depend on context.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..neurons import SpikeSite, create, name_sites
from ..neurons.registry import SwapSummary, finish_swap, replace_site_neurons
from ..neurons.input_once import InputOnceMixin
from ..ssm import DiscreteMamba2, MixerState
from ..ssm.discrete_mamba2 import dt_bias_init
from .configuration_mar import SITE_KINDS, MARConfig

#: ``config.auto_map`` of a saved model, and the files it names: one-line modules that take the
#: classes from the installed package (so a checkpoint never carries a copy of the code that can
#: drift from it)
AUTO_MAP = {"AutoConfig": "configuration_mar.MARConfig", "AutoModel": "modeling_mar.MARModel",
            "AutoModelForCausalLM": "modeling_mar.MARForCausalLM"}
REMOTE_CODE = {
    "configuration_mar.py": '"""MAR checkpoint configuration: the class comes from the installed neuro-mar package '
                            '(pip install neuro-mar)."""\nfrom neuro_mar.models.configuration_mar import MARConfig  '
                            '# noqa: F401\n',
    "modeling_mar.py": '"""MAR checkpoint model classes: they come from the installed neuro-mar package '
                       '(pip install neuro-mar)."""\nfrom neuro_mar.models.modeling_mar import MARForCausalLM, '
                       'MARModel  # noqa: F401\n',
}

#: parameter groups of :meth:`MARForCausalLM.set_trainable` (the refine stages' ``--train-*`` choices)
TRAINABLE_GROUPS = ("all", "blocks", "mixers")


class MARRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _site(config: MARConfig, kind: str, qualname: str, channels: int) -> SpikeSite:
    name, options = config.neuron_for(kind, qualname)
    return SpikeSite(create(name, channels=channels, **options))


class MARMLP(nn.Module):
    """SwiGLU MLP with spike sites before gate/up (shared input) and before down."""

    def __init__(self, config: MARConfig, layer_idx: int):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        prefix = f"model.layers.{layer_idx}.mlp"
        self.in_site = _site(config, "mlp.in", f"{prefix}.in_site", d)
        self.gate_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.down_site = _site(config, "mlp.down", f"{prefix}.down_site", f)
        self.down_proj = nn.Linear(f, d, bias=config.mlp_bias)
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (SwiGLU with silu only)")

    def forward(self, x):
        xs = self.in_site(x)
        return self.down_proj(self.down_site(F.silu(self.gate_proj(xs)) * self.up_proj(xs)))


class MARBlock(nn.Module):
    def __init__(self, config: MARConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        prefix = f"model.layers.{layer_idx}.mixer"
        in_name, in_opts = config.neuron_for("mixer.in", f"{prefix}.in_site")
        out_name, out_opts = config.neuron_for("mixer.out", f"{prefix}.out_site")
        self.input_layernorm = MARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = DiscreteMamba2(
            config.hidden_size, d_state=config.d_state, n_qk_heads=config.n_qk_heads,
            n_v_heads=config.n_v_heads, d_conv=config.d_conv, expand=config.expand,
            chunk_size=config.chunk_size, bias=config.mixer_bias, conv_bias=config.conv_bias,
            dt_min=config.dt_min, dt_max=config.dt_max, neuron_in=in_name, neuron_out=out_name,
            neuron_in_options=in_opts, neuron_out_options=out_opts, scan_backend=config.scan_backend,
            input_gain=getattr(config, "ssm_input_gain", "none"))
        self.post_attention_layernorm = MARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MARMLP(config, layer_idx)

    def forward(self, h, state: MixerState | None = None, mask: torch.Tensor | None = None):
        mixed, new_state = self.mixer(self.input_layernorm(h), state, mask=mask)
        h = h + mixed
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, new_state


class MARCache:
    """Recurrent generation cache: one :class:`MixerState` per layer and the number of tokens seen.
    Its size is independent of the context length."""

    is_compileable = False

    def __init__(self, num_layers: int):
        self.states: list[MixerState | None] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for i, s in enumerate(self.states):
            if s is not None:
                self.states[i] = MixerState(s.conv.index_select(0, beam_idx.to(s.conv.device)),
                                            s.ssm.index_select(0, beam_idx.to(s.ssm.device)))

    def nbytes(self) -> int:
        return sum(s.conv.numel() * s.conv.element_size() + s.ssm.numel() * s.ssm.element_size()
                   for s in self.states if s is not None)


@dataclass
class MARCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache_params: MARCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None

    @property
    def past_key_values(self) -> MARCache | None:
        """The recurrent cache under the name most callers look for (the same object as
        ``cache_params``; a recurrent state, not keys and values)."""
        return self.cache_params


@dataclass
class MARModelOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    cache_params: MARCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class MARPreTrainedModel(PreTrainedModel):
    config_class = MARConfig
    config: MARConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MARBlock"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DiscreteMamba2):
            init.copy_(module.dt_bias, dt_bias_init(module.n_v_heads, module.dt_min, module.dt_max))
            init.ones_(module.D)
            init.zeros_(module.z_bias)
        elif isinstance(module, MARRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, InputOnceMixin) and getattr(module, "a", None) is not None:
            init.constant_(module.a, getattr(module, "init_log_threshold", 0.0))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the recurrent MARCache is created by the model itself

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, check_finite: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained``, strict: a checkpoint whose weights do not match its
        ``config.json`` (missing, unexpected or differently shaped tensors, e.g. an edited
        ``num_hidden_layers``, ``hidden_size`` or ``d_state``), a damaged or truncated
        ``model.safetensors``, or weights holding NaN or infinite values (``check_finite=False``
        loads those anyway, for inspection) raise ``ValueError`` naming them instead of loading a
        model with random, dropped or poisoned layers. Shapes and files are checked from the
        safetensors headers before any weight is read."""
        from .checks import (check_finite_weights, check_loading_info, check_weights_files, expected_shapes,
                             load_weights, read_config)

        want_info = kwargs.pop("output_loading_info", False)
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        if folder.is_dir():
            config = kwargs.get("config")
            if not isinstance(config, MARConfig):
                source = Path(config) if isinstance(config, (str, Path)) else folder
                read_config(source)
                try:
                    config = cls.config_class.from_pretrained(source)
                except (ValueError, TypeError) as err:  # a field out of range (chunk_size, ...)
                    raise ValueError(f"{source / 'config.json'}: {err}; restore the config.json saved with the model "
                                     "(or re-save the model)") from None
                kwargs["config"] = config
            try:  # the model the config describes, on the meta device (neurons, options, sites checked)
                expected = expected_shapes(lambda: cls(config))
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{folder / 'config.json'}: {err}; restore the config.json saved with the model "
                                 "(or re-save the model)") from None
            check_weights_files(folder, expected=expected)
        model, info = load_weights(lambda: super(MARPreTrainedModel, cls).from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs), pretrained_model_name_or_path)
        check_loading_info(info, pretrained_model_name_or_path, "re-save it from the run that made it")
        if check_finite:
            check_finite_weights(model, pretrained_model_name_or_path)
        return (model, info) if want_info else model


def _token_mask(attention_mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """The ``[b, l]`` mask of the tokens being fed (the last ``l`` columns of ``attention_mask``),
    or None when there is none or nothing is masked (the unmasked path stays the fast one)."""
    if attention_mask is None:
        return None
    b, l = shape
    if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < l:
        raise ValueError(f"attention_mask must be [batch, length] with at least the {l} positions being fed for "
                         f"batch {b}, got {tuple(attention_mask.shape)}")
    mask = attention_mask[:, attention_mask.shape[1] - l:]
    return None if bool(mask.all()) else mask


class MARModel(MARPreTrainedModel):
    def __init__(self, config: MARConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MARBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = MARRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, inputs_embeds=None, cache_params: MARCache | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """``attention_mask [b, l]`` (or ``[b, seen + l]`` when continuing a cache: its last ``l``
        columns are used): padded positions neither enter nor change any mixer's state, so left
        padding gives each row what it gives alone (see :class:`~neuro_mar.ssm.DiscreteMamba2`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        mask = _token_mask(attention_mask, h.shape[:2])
        use_cache = use_cache if use_cache is not None else False
        if use_cache and cache_params is None:
            cache_params = MARCache(len(self.layers))
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if hidden is not None:
                hidden.append(h)
            state = cache_params.states[i] if cache_params is not None else None
            if self.gradient_checkpointing and self.training and cache_params is None:
                h, new_state = torch.utils.checkpoint.checkpoint(layer, h, None, mask, use_reentrant=False)
            else:
                h, new_state = layer(h, state, mask)
            if cache_params is not None:
                cache_params.states[i] = new_state
        if hidden is not None:
            hidden.append(h)
        if cache_params is not None:
            cache_params.seen_tokens += h.shape[1]
        out = self.norm(h)
        return MARModelOutput(last_hidden_state=out, cache_params=cache_params if use_cache else None,
                              hidden_states=tuple(hidden) if hidden is not None else None)


class MARForCausalLM(MARPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MARConfig):
        super().__init__(config)
        self.model = MARModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        name_sites(self)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, cache_params=None,
                labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """Causal LM forward. ``attention_mask [b, l]`` (1 = token, 0 = padding, left or right):
        padded positions neither enter nor change the recurrent state, so a padded batch gives
        each row what it gives alone (logits at padded positions are not meaningful).
        ``use_cache=True`` returns the recurrent cache (``cache_params``, also readable as
        ``past_key_values``); pass it back as ``cache_params`` or ``past_key_values`` to continue."""
        if cache_params is None and isinstance(kwargs.get("past_key_values"), MARCache):
            cache_params = kwargs.pop("past_key_values")
        kwargs.pop("past_key_values", None)
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache_params=cache_params,
                         use_cache=use_cache, output_hidden_states=output_hidden_states,
                         attention_mask=attention_mask)
        h = out.last_hidden_state
        sl = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, sl, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MARCausalLMOutput(loss=loss, logits=logits, cache_params=out.cache_params,
                                 hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, cache_params=None, use_cache=None, inputs_embeds=None,
                                      attention_mask=None, **kwargs):
        if use_cache is None:
            use_cache = True
        if cache_params is not None and cache_params.seen_tokens > 0:
            inputs = {"input_ids": input_ids[:, cache_params.seen_tokens:]}
        elif inputs_embeds is not None:
            inputs = {"inputs_embeds": inputs_embeds}
        else:
            inputs = {"input_ids": input_ids}
        inputs.update(cache_params=cache_params, use_cache=use_cache, attention_mask=attention_mask)
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    # -- what trains --------------------------------------------------------------------
    def set_trainable(self, which: str) -> int:
        """Freeze everything but one group of parameters; returns how many elements train.

        ``"all"``: every parameter. ``"blocks"``: the decoder blocks (mixers, MLPs, norms, spike
        sites), not the embeddings, final norm or LM head (tied in SmolLM2: the vocabulary's
        geometry stays the teacher's). ``"mixers"``: the SSM mixers and every spike site's
        parameters (thresholds); the teacher's MLPs, norms and embeddings stay frozen, which is
        where a small distillation corpus can overwrite what the teacher knows."""
        if which not in TRAINABLE_GROUPS:
            raise ValueError(f"set_trainable: group must be one of {', '.join(TRAINABLE_GROUPS)}, got {which!r}")
        self.requires_grad_(which == "all")
        if which == "blocks":
            self.model.layers.requires_grad_(True)
        elif which == "mixers":
            for layer in self.model.layers:
                layer.mixer.requires_grad_(True)
            for *_, site in self.spike_sites():
                site.requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- spike sites ----------------------------------------------------------------------
    def spike_sites(self):
        """Yield ``(layer_idx, kind, qualified_name, SpikeSite)`` for every site, in layer order."""
        for i, layer in enumerate(self.model.layers):
            yield i, "mixer.in", f"model.layers.{i}.mixer.in_site", layer.mixer.in_site
            yield i, "mixer.out", f"model.layers.{i}.mixer.out_site", layer.mixer.out_site
            yield i, "mlp.in", f"model.layers.{i}.mlp.in_site", layer.mlp.in_site
            yield i, "mlp.down", f"model.layers.{i}.mlp.down_site", layer.mlp.down_site

    def set_neurons(self, name: str, kinds=None, pattern: str | None = None, keep_threshold: bool = True,
                    calibrate_on=None, **options):
        """Swap the neuron of the sites of the given kinds (default all four) and/or matching an
        fnmatch pattern on the qualified name; keeps ``config`` in step. ``calibrate_on`` (input_ids
        batches) recalibrates the swapped sites; without it a trained neuron swapped for another
        type warns (:func:`~neuro_mar.neurons.swap_neurons`). Returns the
        :class:`~neuro_mar.neurons.SwapSummary`."""
        kinds = tuple(SITE_KINDS if kinds is None else ([kinds] if isinstance(kinds, str) else kinds))
        bad = set(kinds) - set(SITE_KINDS)
        if bad:
            raise ValueError(f"unknown site kind(s) {sorted(bad)}; kinds are {SITE_KINDS}")
        selected = {q for _, k, q, _ in self.spike_sites()
                    if k in kinds and (pattern is None or fnmatch.fnmatchcase(q, pattern))}
        summary = SwapSummary()
        for q in sorted(selected):
            summary.rows += replace_site_neurons(self, name, q, keep_threshold, options).rows
        self.sync_neuron_config()
        finish_swap(self, summary, name, "set_neurons", calibrate_on)
        return summary

    def sync_neuron_config(self) -> None:
        """Write the neurons actually in the sites into ``config`` (kind-level where uniform)."""
        per_kind: dict[str, list] = {k: [] for k in SITE_KINDS}
        for _, kind, q, site in self.spike_sites():
            n = site.neuron
            per_kind[kind].append((q, n.registry_name or "dense", n.config()))
        neurons, options, overrides = {}, {}, {}
        for kind, rows in per_kind.items():
            first = rows[0][1:] if rows else ("dense", {})
            if all(r[1:] == first for r in rows):
                neurons[kind], options[kind] = first
            else:
                neurons[kind], options[kind] = self.config.neurons[kind], self.config.neuron_options[kind]
                for q, name, opts in rows:
                    overrides[q] = {"name": name, "options": opts}
        self.config.neurons, self.config.neuron_options, self.config.site_neurons = neurons, options, overrides

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` with the neurons written into ``config``, and the
        remote-code files and ``auto_map`` (:data:`REMOTE_CODE`) so that
        ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads the model
        wherever neuro-mar is installed, imported or not (lm-eval's ``--model hf``, pipelines)."""
        self.sync_neuron_config()
        self.config.auto_map = dict(AUTO_MAP)
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from ..io_utils import atomic_write_text

            for name, text in REMOTE_CODE.items():
                atomic_write_text(Path(save_directory) / name, text)
        return out

    def reset_spike_counters(self) -> None:
        for *_, site in self.spike_sites():
            site.reset_counters()

    @torch.no_grad()
    def calibrate_thresholds(self, batches, percentile: float = 99.9, max_rows: int = 65536, only=None) -> dict:
        """Set every spiking site's threshold (or those whose qualified names are in ``only``) from
        the dense activations it sees on ``batches`` (an iterable of input_ids tensors). The sites
        are bypassed (dense) while sampling, so the statistics are those of the dense model.
        Returns ``{qualified_name: mean threshold}``."""
        sites = [(q, s) for *_, q, s in self.spike_sites() if not s.is_dense and (only is None or q in only)]
        samples: dict[str, list] = {q: [] for q, _ in sites}
        saved = {}
        hooks = []
        for q, s in sites:
            saved[q] = s.neuron
            dense = create("dense", channels=s.neuron.channels)
            s.neuron = dense
            hooks.append(s.register_forward_pre_hook(
                lambda mod, args, q=q: samples[q].append(args[0].detach().reshape(-1, args[0].shape[-1])[:max_rows])))
        try:
            for ids in batches:
                self(input_ids=ids.to(self.device))
        finally:
            for h in hooks:
                h.remove()
            for q, s in sites:
                s.neuron = saved[q]
                s.reset_counters()
        out = {}
        for q, s in sites:
            if not samples[q]:
                raise ValueError("calibrate_thresholds: no calibration batches were given")
            try:
                V = s.neuron.calibrate(torch.cat(samples[q])[:max_rows * 4], percentile=percentile, max_rows=max_rows)
            except ValueError as err:
                raise ValueError(f"{q}: {err}") from None
            out[q] = float(V.float().mean())
        return out
