"""MARConfig: a Llama-shaped language model whose attention is a Discrete Mamba-2 mixer."""
from __future__ import annotations

from transformers import PretrainedConfig

#: The four spike sites of every layer, in the naming of the trace files (``L03.mixer.in``).
SITE_KINDS = ("mixer.in", "mixer.out", "mlp.in", "mlp.down")
#: How the mixer scales x before the scan: "none" (Discrete Mamba-2: S_t = a_t S + x_t B_t^T) or
#: "zoh" (x_t scaled by 1 - a_t, a_t = exp(-dt_t): every head's state is a normalised moving average).
SSM_INPUT_GAINS = ("none", "zoh")


class MARConfig(PretrainedConfig):
    """Configuration of :class:`~neuro_mar.models.MARForCausalLM`.

    Llama fields (``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``rms_norm_eps``, ``tie_word_embeddings``, ``hidden_act``) keep their meaning. Mixer fields:
    ``d_state`` (n), ``n_qk_heads`` (B/C groups), ``n_v_heads`` (heads of x), ``d_conv``,
    ``expand`` (d_inner = expand * hidden_size), ``chunk_size``, ``scan_backend``
    (``auto``/``chunked``/``naive``/``mamba_ssm``), ``ssm_input_gain`` (:data:`SSM_INPUT_GAINS`).

    Neurons: ``neurons`` maps each site kind (:data:`SITE_KINDS`) to a registry name
    (``"dense"`` everywhere is the Stage-1 model), ``neuron_options`` maps kinds to constructor
    options, and ``site_neurons`` overrides single sites by qualified module name
    (``{"model.layers.3.mlp.down_site": {"name": "binary", "options": {}}}``).
    """

    model_type = "neuro_mar"
    keys_to_ignore_at_inference = ["cache_params"]

    def __init__(self, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02,
                 d_state=64, n_qk_heads=9, n_v_heads=9, d_conv=4, expand=1, chunk_size=64,
                 mixer_bias=False, conv_bias=True, mlp_bias=False, dt_min=1e-3, dt_max=0.1,
                 scan_backend="auto", ssm_input_gain="none", neurons=None, neuron_options=None, site_neurons=None,
                 use_cache=True, bos_token_id=1, eos_token_id=2, pad_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.d_state = d_state
        self.n_qk_heads = n_qk_heads
        self.n_v_heads = n_v_heads
        self.d_conv = d_conv
        self.expand = expand
        self.chunk_size = chunk_size
        self.mixer_bias = mixer_bias
        self.conv_bias = conv_bias
        self.mlp_bias = mlp_bias
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.scan_backend = scan_backend
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "d_state", "n_qk_heads",
                     "n_v_heads", "d_conv", "expand", "chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if ssm_input_gain not in SSM_INPUT_GAINS:
            raise ValueError(f"ssm_input_gain must be one of {SSM_INPUT_GAINS}, got {ssm_input_gain!r}")
        self.ssm_input_gain = ssm_input_gain
        neurons = dict(neurons or {})
        unknown = set(neurons) - set(SITE_KINDS)
        if unknown:
            raise ValueError(f"neurons: unknown site kind(s) {sorted(unknown)}; kinds are {SITE_KINDS}")
        self.neurons = {k: neurons.get(k, "dense") for k in SITE_KINDS}
        self.neuron_options = {k: dict((neuron_options or {}).get(k, {})) for k in SITE_KINDS}
        self.site_neurons = dict(site_neurons or {})
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def neuron_for(self, kind: str, qualified_name: str | None = None) -> tuple[str, dict]:
        """(registry name, options) of the site ``qualified_name`` of kind ``kind``."""
        if qualified_name is not None and qualified_name in self.site_neurons:
            spec = self.site_neurons[qualified_name]
            return spec["name"], dict(spec.get("options", {}))
        return self.neurons[kind], dict(self.neuron_options.get(kind, {}))

    @property
    def is_spiking(self) -> bool:
        return any(n != "dense" for n in self.neurons.values()) or any(
            s["name"] != "dense" for s in self.site_neurons.values())
