"""attention_mask: padded positions neither enter nor change a mixer's state, so a padded batch
gives every row what the row gives alone (logits, the cache it leaves, batched generation), for
both input gains, dense and spiking sites, every scan backend on the CPU."""
import pytest
import torch

from tiny import tiny_mar

SPIKING = {"mixer.in": "atmn", "mixer.out": "atmn", "mlp.in": "atmn", "mlp.down": "binary"}


def _model(gain="zoh", neurons=None, seed=0):
    m = tiny_mar(seed=seed, neurons=neurons, ssm_input_gain=gain).double()
    if neurons:
        m.calibrate_thresholds([torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(5))])
    return m


def _rows(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g) for n in lengths]


def _pad(rows, side, pad_id=0):
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def _assert_states_equal(a, b, row):
    for sa, sb in zip(a.states, b.states):
        torch.testing.assert_close(sa.conv[row], sb.conv[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(sa.ssm[row], sb.ssm[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("gain,neurons", [("zoh", None), ("none", None), ("zoh", SPIKING)])
@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_a_padded_row_equals_the_row_alone(side, gain, neurons, backend):
    m = _model(gain, neurons)
    m.config.scan_backend = backend
    for layer in m.model.layers:
        layer.mixer.scan_backend = backend
    rows = _rows([11, 4, 2, 9])  # shorter than, and longer than, the conv window
    ids, mask = _pad(rows, side)
    ids[mask == 0] = 7  # whatever sits under the padding must not matter
    with torch.no_grad():
        batch = m(ids, attention_mask=mask, use_cache=True)
        for i, r in enumerate(rows):
            alone = m(r[None], use_cache=True)
            pos = mask[i].bool()
            torch.testing.assert_close(batch.logits[i, pos], alone.logits[0], rtol=0, atol=1e-10)
            _assert_states_equal(batch.cache_params, alone.cache_params, i)


def test_without_the_mask_padding_changes_the_rows():
    """The check above can fail: without attention_mask, left padding changes a row's logits."""
    m = _model()
    rows = _rows([11, 4])
    ids, mask = _pad(rows, "left")
    ids[mask == 0] = 7  # a pad id whose embedding is not zero (id 0 is the embedding's padding_idx)
    with torch.no_grad():
        plain = m(ids).logits[1, -4:]
        masked = m(ids, attention_mask=mask).logits[1, -4:]
        alone = m(rows[1][None]).logits[0]
    assert (plain - alone).abs().max() > 1e-6  # the masked batch below agrees to 1e-10
    torch.testing.assert_close(masked, alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("neurons", [None, SPIKING])
def test_batched_greedy_generate_equals_per_row_generate(neurons):
    m = _model(neurons=neurons)
    rows = _rows([7, 3, 5], seed=3)
    ids, mask = _pad(rows, "left")
    out = m.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None)
    for i, r in enumerate(rows):
        one = m.generate(r[None], max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out[i, ids.shape[1]:].tolist() == one[0, len(r):].tolist()


def test_forward_returns_a_cache_that_continues():
    """forward(use_cache=True) returns the recurrent cache (also as past_key_values); feeding it back
    under either name continues exactly where a full forward would be."""
    m = _model(neurons=SPIKING)
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = m(ids).logits
        first = m(ids[:, :8], use_cache=True)
        assert first.past_key_values is first.cache_params is not None
        rest = m(ids[:, 8:], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=0, atol=1e-10)
        assert rest.cache_params.seen_tokens == 13
        assert m(ids, use_cache=False).cache_params is None


def test_mask_continuing_a_cache_uses_its_last_columns():
    """generate passes the whole mask [b, seen + l] with each step; the model takes the last l."""
    m = _model()
    rows = _rows([6, 3])
    ids, mask = _pad(rows, "left")
    nxt = torch.tensor([[11], [12]])
    with torch.no_grad():
        pre = m(ids, attention_mask=mask, use_cache=True)
        step = m(nxt, cache_params=pre.cache_params, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                 use_cache=True)
        alone = m(torch.cat([rows[1], nxt[1]])[None]).logits[0, -1]
    torch.testing.assert_close(step.logits[1, -1], alone, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="attention_mask must be"):
        m(nxt, attention_mask=torch.ones(3, 1))


def test_beam_search_scores_match_a_full_forward():
    """Beam search reorders the recurrent cache (MARCache.reorder_cache): the score generate gives a
    returned beam is the log-probability a full forward of that sequence gives it."""
    m = _model(neurons=SPIKING)
    rows = _rows([6, 4], seed=8)
    ids, mask = _pad(rows, "left")
    out = m.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, length_penalty=0.0,
                     early_stopping=True, pad_token_id=0, eos_token_id=None, output_scores=True,
                     return_dict_in_generate=True)
    L = ids.shape[1]
    for i, r in enumerate(rows):
        seq = torch.cat([r, out.sequences[i, L:]])[None]
        with torch.no_grad():
            logp = torch.log_softmax(m(seq).logits[0, :-1], -1)
        want = sum(float(logp[t - 1, seq[0, t]]) for t in range(len(r), seq.shape[1]))
        # generate keeps scores in fp32; a cache left unreordered is off by 6e-6 to 3e-5 here
        assert abs(float(out.sequences_scores[i]) - want) < 2e-6, (float(out.sequences_scores[i]), want)


def test_num_return_sequences_and_assisted_decoding():
    """num_return_sequences expands the rows with their masks and caches: with beams, each returned
    sequence's score is the full forward's log-probability of it, the best first; with sampling,
    each copy starts from its row's prompt. Assisted decoding, which crops a cache a recurrent
    state cannot roll back, is refused by generate with the reason."""
    m = _model(neurons=SPIKING)
    rows = _rows([6, 4], seed=8)
    ids, mask = _pad(rows, "left")
    out = m.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, num_return_sequences=2,
                     do_sample=False, length_penalty=0.0, early_stopping=True, pad_token_id=0, eos_token_id=None,
                     output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (4, ids.shape[1] + 4)
    L = ids.shape[1]
    for j in range(4):
        r = rows[j // 2]
        seq = torch.cat([r, out.sequences[j, L:]])[None]
        with torch.no_grad():
            logp = torch.log_softmax(m(seq).logits[0, :-1], -1)
        want = sum(float(logp[t - 1, seq[0, t]]) for t in range(len(r), seq.shape[1]))
        assert abs(float(out.sequences_scores[j]) - want) < 2e-6
    assert out.sequences_scores[0] >= out.sequences_scores[1] and out.sequences_scores[2] >= out.sequences_scores[3]
    torch.manual_seed(0)
    sampled = m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True, num_return_sequences=3,
                         pad_token_id=0, eos_token_id=None)
    assert sampled.shape == (6, L + 3) and torch.equal(sampled[:, :L], ids.repeat_interleave(3, 0))
    with pytest.raises(ValueError, match="assisted generation is not supported with stateful models"):
        m.generate(ids[:1], max_new_tokens=3, assistant_model=_model(neurons=SPIKING, seed=3), pad_token_id=0,
                   eos_token_id=None)


def test_text_generation_pipeline_batched_equals_one_by_one(tmp_path, monkeypatch):
    """transformers' text-generation pipeline on a saved spiking checkpoint loaded through
    AutoModelForCausalLM(trust_remote_code=True): prompts of different lengths, batch_size=2 with
    the tokenizer's left padding, give the texts that batch_size=1 gives (greedy). The weights are
    drawn wide enough that a model ignoring the mask generates other texts (checked too)."""
    from transformers import AutoModelForCausalLM, pipeline

    from neuro_mar.models import modeling_mar
    from test_refine import WORDS, _tokenizer

    m = tiny_mar(neurons=SPIKING, initializer_range=0.2)
    m.calibrate_thresholds([torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(5))])
    m.save_pretrained(tmp_path / "m")
    tok = _tokenizer()
    tok.pad_token, tok.padding_side = "</s>", "left"  # not id 0, whose embedding the tiny config zeroes
    tok.save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    prompts = [" ".join(WORDS[i:i + n]) for i, n in ((0, 2), (5, 7), (11, 4), (20, 1))]
    gen = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    kw = dict(max_new_tokens=6, do_sample=False, return_tensors=True)
    alone = [gen(p, **kw)[0]["generated_token_ids"] for p in prompts]

    def unpadded(rows):  # the batch's ids keep their left padding
        return [r[0]["generated_token_ids"][-len(a):] for r, a in zip(rows, alone)]

    assert unpadded(gen(prompts, batch_size=2, **kw)) == alone and len({tuple(a) for a in alone}) == len(alone)
    monkeypatch.setattr(modeling_mar, "_token_mask", lambda *a, **k: None)
    assert unpadded(gen(prompts, batch_size=2, **kw)) != alone
