"""Batched sampling from a Llama-family teacher with a preallocated KV cache.

HF ``generate`` spends most of a teacher-sampling run on the host and on its dynamic cache (on an
H200 a 135M teacher samples about 10k tokens/s at 1024 sequences per batch, where the GPU could do
tens of times more). :class:`BatchSampler` does the same sampling with the teacher's own modules
(embeddings, RMSNorms, rotary embedding, projections, MLPs, head) and a hand-written attention over
one preallocated KV cache per layer, so that every decode step has the same shapes: on CUDA the
step (forward, temperature, nucleus, sampling) is captured once in a CUDA graph and replayed.

Sequences of a batch are left-padded to the longest prompt: a padded position never enters
attention (``valid``) and each row's positions count from its first real token, so a row samples
what it would sample alone. Tokens are drawn with the Gumbel-max trick from the temperature-scaled
logits restricted to the ``top_k`` most probable tokens and then to the nucleus (the smallest set
whose probability reaches ``top_p``), as HF's ``TopKLogitsWarper`` and ``TopPLogitsWarper`` keep them,
on the device; ``temperature = 0`` is greedy. A row stops at
its first EOS.

Shapes: ``B`` sequences, ``P`` the padded prompt length, ``L = P + max_new`` cache positions,
``H`` query heads, ``K`` key/value heads (``G = H / K`` queries per key), ``D`` head size.
"""
from __future__ import annotations

import math

import torch

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


def supports(model) -> bool:
    """Whether :class:`BatchSampler` can run ``model``: a Llama-family causal LM (``model_type`` in
    :data:`SUPPORTED_TYPES`) without sliding-window attention or per-head q/k norms."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return False
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return False
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "rotary_emb") or not hasattr(base, "layers"):
        return False
    att = base.layers[0].self_attn
    return not (hasattr(att, "q_norm") or hasattr(att, "k_norm"))


def nucleus_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits [B, V]`` with every token outside the nucleus set to ``-inf``: the most probable
    tokens whose summed probability first reaches ``top_p`` stay (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop_sorted = nucleus_logits_sorted(sorted_logits, top_p).isinf() & ~sorted_logits.isinf()
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (fp32): greedy at ``temperature = 0``, else a sample
    of the temperature-scaled distribution restricted to the ``top_k`` most probable tokens (0: no
    limit) and then to the nucleus ``top_p``, as HF's ``TopKLogitsWarper`` and ``TopPLogitsWarper``
    restrict it, drawn by Gumbel-max with the device's default generator."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits / temperature
    if 0 < top_k < z.shape[-1]:  # the nucleus within the top k: a sort of k values, not of the vocabulary
        vals, idx = torch.topk(z, top_k, dim=-1)
        vals = nucleus_logits_sorted(vals, top_p)
        u = torch.rand_like(vals).clamp_(min=1e-20)
        pick = (vals - torch.log(-torch.log(u))).argmax(-1, keepdim=True)
        return idx.gather(-1, pick)[:, 0]
    z = nucleus_logits(z, top_p)
    u = torch.rand_like(z).clamp_(min=1e-20)
    return (z - torch.log(-torch.log(u))).argmax(-1)


def nucleus_logits_sorted(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """:func:`nucleus_logits` of logits already sorted in descending order along the last axis."""
    if top_p >= 1.0:
        return sorted_logits
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p  # the tokens ranked above already reach top_p
    drop[..., 0] = False
    return sorted_logits.masked_fill(drop, float("-inf"))


class BatchSampler:
    """Samples continuations of token-id prompts from ``model`` (a Llama-family causal LM, see
    :func:`supports`), ``batch`` rows at a time, with a KV cache of ``max_len`` positions per row.

    ``graph``: capture the decode step in a CUDA graph (default: on CUDA). The model's weights are
    used as they are (pass a bf16 copy for bf16 sampling); the model is not modified."""

    def __init__(self, model, batch: int, max_len: int, graph: bool | None = None):
        if not supports(model):
            raise ValueError(f"BatchSampler runs Llama-family teachers ({', '.join(SUPPORTED_TYPES)}) without "
                             f"sliding windows or q/k norms; {type(model).__name__} is not one: use HF generate")
        self.model = model
        self.base = model.model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        att = self.base.layers[0].self_attn
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(att, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = getattr(att, "scaling", self.head_dim ** -0.5)
        self.batch, self.max_len = int(batch), int(max_len)
        shape = (len(self.base.layers), self.batch, self.kv_heads, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.valid = torch.zeros(self.batch, self.max_len, device=self.device, dtype=torch.bool)
        self.pad = torch.zeros(self.batch, device=self.device, dtype=torch.long)
        self.index = torch.zeros((), device=self.device, dtype=torch.long)  # cache position being written
        self.token = torch.zeros(self.batch, device=self.device, dtype=torch.long)
        self.done = torch.zeros(self.batch, device=self.device, dtype=torch.bool)
        self.eos = torch.zeros((), device=self.device, dtype=torch.long)
        self.use_graph = (self.device.type == "cuda") if graph is None else bool(graph)
        if self.use_graph and self.device.type != "cuda":
            raise ValueError("BatchSampler: graph=True needs the model on a CUDA device")
        self._graph = None
        self._graph_key = None

    # -- the model, written out with the teacher's modules ------------------------------------------

    def _attend(self, layer: int, att, h: torch.Tensor, positions: torch.Tensor, write: torch.Tensor,
                allowed: torch.Tensor) -> torch.Tensor:
        """Attention of ``h [B, l, C]`` at ``positions [B, l]``: its keys and values go into the cache
        at ``write [l]``; each query attends the cache positions ``allowed [B, l, L]``."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, l, _ = h.shape
        q = att.q_proj(h).view(b, l, self.heads, self.head_dim).transpose(1, 2)
        k = att.k_proj(h).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
        v = att.v_proj(h).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.base.rotary_emb(v, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        self.k_cache[layer].index_copy_(2, write, k.to(self.dtype))
        self.v_cache[layer].index_copy_(2, write, v.to(self.dtype))
        g = self.heads // self.kv_heads
        q = q.reshape(b, self.kv_heads, g * l, self.head_dim)  # query heads of one key head side by side
        scores = torch.matmul(q, self.k_cache[layer].transpose(-1, -2)).float() * self.scaling  # [B, K, G*l, L]
        scores = scores.view(b, self.kv_heads, g, l, self.max_len)
        scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
        w = scores.softmax(-1).to(self.dtype).view(b, self.kv_heads, g * l, self.max_len)
        out = torch.matmul(w, self.v_cache[layer]).view(b, self.heads, l, self.head_dim)
        return att.o_proj(out.transpose(1, 2).reshape(b, l, self.heads * self.head_dim))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, write: torch.Tensor,
                 allowed: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` (fp32) of the last of ``ids [B, l]``, the cache updated at ``write``."""
        h = self.base.embed_tokens(ids)
        for i, layer in enumerate(self.base.layers):
            h = h + self._attend(i, layer.self_attn, layer.input_layernorm(h), positions, write, allowed)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.base.norm(h[:, -1:])
        return self.model.lm_head(h)[:, 0].float()

    # -- prefill and decode --------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]], pad_id: int) -> int:
        """Writes the left-padded prompts into the cache; returns the padded prompt length ``P`` and
        leaves the first sampled token's logits in ``self._logits``."""
        width = max(len(p) for p in prompts)
        ids = torch.full((self.batch, width), pad_id, dtype=torch.long)
        pad = torch.full((self.batch,), width, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            pad[r] = width - len(p)
        ids, pad = ids.to(self.device), pad.to(self.device)
        self.pad.copy_(pad)
        cols = torch.arange(self.max_len, device=self.device)
        self.valid.copy_(cols[None, :] >= pad[:, None])
        self.valid[len(prompts):] = cols[None, :] >= width  # rows without a prompt: no real keys to attend
        positions = (torch.arange(width, device=self.device)[None, :] - pad[:, None]).clamp(min=0)
        causal = cols[None, :] <= torch.arange(width, device=self.device)[:, None]  # [P, L]
        allowed = causal[None] & self.valid[:, None, :]
        allowed |= torch.eye(width, self.max_len, device=self.device, dtype=torch.bool)[None]  # pad rows: no NaN
        self._logits = self._forward(ids, positions, torch.arange(width, device=self.device), allowed)
        return width

    def _step(self, temperature: float, top_p: float, top_k: int) -> None:
        """One decode step in place: ``self.token`` (the last sampled token, at cache position
        ``self.index``) in, the next token out; rows that met EOS keep giving EOS."""
        cols = torch.arange(self.max_len, device=self.device)
        allowed = (self.valid & (cols[None, :] <= self.index))[:, None, :]
        positions = (self.index - self.pad)[:, None]
        logits = self._forward(self.token[:, None], positions, self.index.view(1), allowed)
        nxt = draw(logits, temperature, top_p, top_k)
        nxt = torch.where(self.done, self.eos, nxt)
        self.done |= nxt == self.eos
        self.token.copy_(nxt)

    def _captured_step(self, temperature: float, top_p: float, top_k: int):
        """``_step`` captured in a CUDA graph (once per temperature and top_p). Called with the cache
        position of the first step set: the warm-up steps write only there, which the first replay
        overwrites, and the token and EOS flags are put back."""
        key = (temperature, top_p, top_k)
        if self._graph is None or self._graph_key != key:
            saved = [t.clone() for t in (self.token, self.done)]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph (lazy initialisation, library handles)
                    self._step(temperature, top_p, top_k)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(temperature, top_p, top_k)
            for t, s in zip((self.token, self.done), saved):
                t.copy_(s)
            self._graph, self._graph_key = graph, key
        return self._graph.replay

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new: int, eos_id: int, pad_id: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 check_every: int = 16) -> list[list[int]]:
        """The sampled continuation of each prompt (token ids, up to ``max_new``, without the EOS
        that ended it). ``prompts``: at most ``batch`` non-empty lists of token ids whose length
        plus ``max_new`` fits ``max_len``."""
        if not prompts or len(prompts) > self.batch:
            raise ValueError(f"BatchSampler.generate: give 1 to {self.batch} prompts, got {len(prompts)}")
        if min(len(p) for p in prompts) == 0:
            raise ValueError("BatchSampler.generate: every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        if width + max_new > self.max_len:
            raise ValueError(f"BatchSampler.generate: prompts of {width} tokens + max_new {max_new} exceed the "
                             f"cache's {self.max_len} positions")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"BatchSampler.generate: temperature must be >= 0, top_p in (0, 1] and top_k >= 0, "
                             f"got {temperature}, {top_p} and {top_k}")
        vocab = self.model.config.vocab_size
        pad_id = eos_id if pad_id is None else pad_id
        if not (0 <= eos_id < vocab and 0 <= pad_id < vocab):
            raise ValueError(f"BatchSampler.generate: eos_id {eos_id} and pad_id {pad_id} must be token ids "
                             f"(0 to {vocab - 1})")
        n = len(prompts)
        self.eos.fill_(eos_id)
        width = self._prefill(prompts, pad_id)
        first = draw(self._logits, temperature, top_p, top_k)
        self.done.zero_()
        self.done[n:] = True
        first = torch.where(self.done, self.eos, first)
        self.done |= first == self.eos
        self.token.copy_(first)
        out = torch.empty(self.batch, max_new, device=self.device, dtype=torch.long)
        out[:, 0] = first
        self.index.fill_(width)
        step = self._captured_step(temperature, top_p, top_k) if self.use_graph else \
            (lambda: self._step(temperature, top_p, top_k))
        made = 1
        for k in range(1, max_new):
            self.index.fill_(width + k - 1)
            step()
            out[:, k] = self.token
            made += 1
            if k % check_every == 0 and bool(self.done[:n].all()):
                break
        rows = out[:n, :made].cpu().tolist()
        return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


def cache_positions(prompt_lengths: list[int], max_new: int, multiple: int = 64) -> int:
    """Cache length for prompts of these lengths and ``max_new`` new tokens, rounded up to a
    ``multiple`` so that nearby batches share one captured graph."""
    return int(math.ceil((max(prompt_lengths) + max_new) / multiple) * multiple)


__all__ = ["BatchSampler", "supports", "nucleus_logits", "nucleus_logits_sorted", "draw", "cache_positions", "SUPPORTED_TYPES"]
