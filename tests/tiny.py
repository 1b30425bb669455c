"""Tiny random models for tests (no downloads)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from neuro_mar import MARConfig, MARForCausalLM


def tiny_mar_config(**kw) -> MARConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, d_state=8,
                n_qk_heads=2, n_v_heads=4, chunk_size=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return MARConfig(**base)


def tiny_mar(seed=0, **kw) -> MARForCausalLM:
    torch.manual_seed(seed)
    return MARForCausalLM(tiny_mar_config(**kw)).eval()


def tiny_llama(seed=0, tie=False, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    return LlamaForCausalLM(cfg).eval()
