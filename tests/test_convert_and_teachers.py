"""llama_to_mar copies what it should; teachers load offline with clear errors."""
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from neuro_mar.convert import Z_STAR, llama_to_mar
from neuro_mar.teachers import load_teacher
from tiny import tiny_llama


def _rep(w, kv, heads):
    return w.reshape(kv, -1, *w.shape[1:]).repeat_interleave(heads // kv, 0).reshape(-1, *w.shape[1:])


@pytest.mark.parametrize("tie", [False, True])
def test_llama_to_mar_copies_tensors(tie):
    t = tiny_llama(tie=tie)
    s = llama_to_mar(t, neurons={"mlp.in": "atmn"})
    assert s.config.tie_word_embeddings == tie and s.config.neurons["mlp.in"] == "atmn"
    assert (s.config.d_state, s.config.n_qk_heads, s.config.n_v_heads, s.config.expand) == (8, 4, 4, 1)
    torch.testing.assert_close(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    torch.testing.assert_close(s.lm_head.weight, t.lm_head.weight)
    if tie:
        assert s.lm_head.weight.data_ptr() == s.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(s.model.norm.weight, t.model.norm.weight)
    for tl, sl in zip(t.model.layers, s.model.layers):
        mix, att = sl.mixer, tl.self_attn
        W = mix.in_proj.weight
        d, gn = mix.d_inner, mix.n_qk_heads * mix.d_state
        torch.testing.assert_close(W[:d], _rep(att.v_proj.weight, 2, 4))
        torch.testing.assert_close(W[d:d + gn], _rep(att.k_proj.weight, 2, 4))
        torch.testing.assert_close(W[d + gn:d + 2 * gn], att.q_proj.weight / mix.d_state**0.5)
        assert torch.all(W[d + 2 * gn:] == 0)
        assert torch.allclose(mix.z_bias, torch.full_like(mix.z_bias, Z_STAR))
        assert abs(Z_STAR / (1 + math.exp(-Z_STAR)) - 1) < 1e-12
        torch.testing.assert_close(mix.out_proj.weight, att.o_proj.weight)
        assert torch.all(mix.conv1d.weight[:, 0, -1] == 1) and torch.all(mix.conv1d.weight[:, 0, :-1] == 0)
        assert torch.all(mix.D == 0)
        for name in ("gate_proj", "up_proj", "down_proj"):
            torch.testing.assert_close(getattr(sl.mlp, name).weight, getattr(tl.mlp, name).weight)
        torch.testing.assert_close(sl.input_layernorm.weight, tl.input_layernorm.weight)
        torch.testing.assert_close(sl.post_attention_layernorm.weight, tl.post_attention_layernorm.weight)


def test_converted_mixer_is_causal_linear_attention_at_init():
    """With the converted weights the mixer's y at position t is sum_s decay * (q_t . k_s) v_s."""
    t = tiny_llama()
    s = llama_to_mar(t).double()
    mix = s.model.layers[0].mixer
    u = torch.randn(1, 6, 32, dtype=torch.float64)
    d, gn, H = mix.d_inner, mix.n_qk_heads * mix.d_state, mix.n_v_heads
    P = mix.in_proj(u)
    v, k, q = P[..., :d], P[..., d:d + gn], P[..., d + gn:d + 2 * gn]
    v, k, q = (torch.nn.functional.silu(z).reshape(1, 6, H, -1) for z in (v, k, q))
    dt = torch.nn.functional.softplus(mix.dt_bias)  # A_log rows are zero
    y = torch.zeros(1, 6, H, d // H, dtype=torch.float64)
    for i in range(6):
        for j in range(i + 1):
            w = torch.exp(-dt * (i - j)) * (q[0, i] * k[0, j]).sum(-1)  # [H] (q already carries 1/sqrt(hd))
            y[0, i] += w[:, None] * v[0, j]
    expected = mix.out_proj(y.reshape(1, 6, d))  # gate silu(Z_STAR) = 1, D = 0
    got, _ = mix(u)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_non_llama_teacher_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="not a Llama-shaped"):
        llama_to_mar(gpt2)


def test_missing_teacher_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_teacher(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(str(tmp_path / "x.gguf"))


def test_local_folder_teacher(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    t = tiny_llama()
    t.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 3, "[UNK]": 0}, unk_token="[UNK]")))
    tok.save_pretrained(tmp_path)
    m, tk = load_teacher(str(tmp_path))
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(m(ids).logits, t(ids).logits)
    assert not m.training


@pytest.mark.slow
def test_default_teacher_loads_generates_and_has_finite_perplexity():
    m, tok = load_teacher("smollm2-135m")
    assert m.config.num_hidden_layers == 30 and m.config.hidden_size == 576 and m.config.vocab_size == 49152
    text = ("The history of the city begins in the twelfth century, when a small market town grew up "
            "around the bridge over the river. Over the following centuries it became a centre of trade.")
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = m(ids, labels=ids).loss
    ppl = math.exp(loss.item())
    assert math.isfinite(ppl) and 1 < ppl < 200, ppl
    out = m.generate(ids[:, :12], max_new_tokens=8, do_sample=False)
    assert out.shape[1] == 20 and tok.decode(out[0, 12:]).strip()
    s = llama_to_mar(m)
    assert s.config.n_qk_heads == 9 and s.config.d_state == 64 and s.config.tie_word_embeddings
    dt = torch.nn.functional.softplus(torch.stack([l.mixer.dt_bias for l in s.model.layers]))
    assert dt.min() >= 0.3 - 1e-5 and dt.max() <= 3.0 + 1e-5
    with torch.no_grad():
        assert torch.isfinite(s(ids[:, :16]).logits).all()
