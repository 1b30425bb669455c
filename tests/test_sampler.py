"""The batched teacher sampler (neuro_mar.refine.sampler) against HF generate and HF's nucleus."""
import pytest
import torch
from tiny import tiny_llama
from transformers.generation.logits_process import TopPLogitsWarper

from neuro_mar.refine.sampler import BatchSampler, cache_positions, draw, nucleus_logits, supports

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [11, 12], [40], [3, 4, 50, 60], [70, 71, 72]]


def hf_greedy(model, prompt, max_new, eos=2):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)[0, len(prompt):].tolist()
    return out[: out.index(eos)] if eos in out else out


@pytest.mark.parametrize("tie", [False, True])
def test_greedy_equals_hf_generate_row_by_row(tie):
    """Left padding in a batch changes nothing: every row is what HF generates for it alone."""
    model = tiny_llama(seed=3, tie=tie)
    sampler = BatchSampler(model, batch=7, max_len=cache_positions([len(p) for p in PROMPTS], 24, multiple=16),
                           graph=False)
    got = sampler.generate(PROMPTS, max_new=24, eos_id=2, pad_id=0, temperature=0)
    assert got == [hf_greedy(model, p, 24) for p in PROMPTS]
    again = sampler.generate(PROMPTS[:2], max_new=24, eos_id=2, temperature=0)  # stale cache of the first batch
    assert again == got[:2]


def test_prefill_logits_equal_the_model_forward():
    model = tiny_llama(seed=5)
    sampler = BatchSampler(model, batch=len(PROMPTS), max_len=16, graph=False)
    sampler._prefill(PROMPTS, pad_id=0)
    for r, p in enumerate(PROMPTS):
        ref = model(torch.tensor([p])).logits[0, -1].float()
        assert torch.allclose(sampler._logits[r], ref, atol=1e-5, rtol=1e-5), r


def test_stops_at_eos_and_keeps_max_new():
    model = tiny_llama(seed=3)
    sampler = BatchSampler(model, batch=5, max_len=64, graph=False)
    ref = next(r for r in (sampler.generate(PROMPTS, 40, eos_id=e, pad_id=0, temperature=0) for e in range(96, 0, -1))
               if [len(x) for x in r] == [40] * 5)  # with an EOS no row makes
    first = next(k for k, t in enumerate(ref[0]) if t not in ref[0][:k] and k >= 2)
    eos = ref[0][first]
    got = sampler.generate(PROMPTS, max_new=40, eos_id=eos, pad_id=0, temperature=0, check_every=1)
    assert got[0] == ref[0][:first]
    for g, r in zip(got, ref):  # every row: its greedy tokens up to its first EOS
        assert g == (r[: r.index(eos)] if eos in r else r)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 1.0])
def test_nucleus_keeps_what_hf_keeps(top_p):
    torch.manual_seed(0)
    logits = torch.randn(16, 97) * 3
    ours = nucleus_logits(logits, top_p).isinf()
    hf = TopPLogitsWarper(top_p)(None, logits.clone()).isinf()
    assert torch.equal(ours, hf)
    assert (~ours).sum(-1).min() >= 1


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (3, 0.9), (3, 1.0), (50, 0.95)])
def test_draw_samples_what_hf_warpers_keep(top_k, top_p):
    """Gumbel-max over top-k then nucleus: frequencies match the probabilities that HF's
    TopKLogitsWarper and TopPLogitsWarper leave (temperature 0.8)."""
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0, 0.2]])
    z = logits / 0.8
    if top_k:
        z = TopKLogitsWarper(top_k)(None, z)
    p = TopPLogitsWarper(top_p)(None, z).softmax(-1)[0]
    torch.manual_seed(0)
    n = 40000
    draws = draw(logits.expand(n, -1).contiguous(), 0.8, top_p, top_k)
    freq = torch.bincount(draws, minlength=6).float() / n
    assert torch.allclose(freq, p, atol=0.01), (freq, p)
    assert freq[p == 0].sum() == 0
    assert torch.equal(draw(logits, 0.0, top_p, top_k), torch.tensor([0]))


def test_sampling_is_deterministic_for_a_seed():
    model = tiny_llama(seed=2)
    sampler = BatchSampler(model, batch=5, max_len=48, graph=False)
    torch.manual_seed(7)
    a = sampler.generate(PROMPTS, max_new=16, eos_id=2, temperature=1.0, top_p=0.95, top_k=20)
    torch.manual_seed(7)
    b = sampler.generate(PROMPTS, max_new=16, eos_id=2, temperature=1.0, top_p=0.95, top_k=20)
    torch.manual_seed(8)
    c = sampler.generate(PROMPTS, max_new=16, eos_id=2, temperature=1.0, top_p=0.95, top_k=20)
    assert a == b and a != c


def test_bad_input_is_refused():
    model = tiny_llama()
    sampler = BatchSampler(model, batch=2, max_len=10, graph=False)
    with pytest.raises(ValueError, match="give 1 to 2 prompts"):
        sampler.generate(PROMPTS, max_new=2, eos_id=2)
    with pytest.raises(ValueError, match="exceed the cache's 10 positions"):
        sampler.generate([[1] * 8], max_new=4, eos_id=2)
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate([[]], max_new=4, eos_id=2)
    with pytest.raises(ValueError, match="top_p in"):
        sampler.generate([[3]], max_new=4, eos_id=2, top_p=0)
    with pytest.raises(ValueError, match="must be token ids"):
        sampler.generate([[3]], max_new=4, eos_id=97)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        BatchSampler(model, batch=2, max_len=10, graph=True)


def test_supports_only_llama_family():
    from neuro_mar import MARForCausalLM

    assert supports(tiny_llama())
    from tiny import tiny_mar_config

    mar = MARForCausalLM(tiny_mar_config())
    assert not supports(mar)
    with pytest.raises(ValueError, match="use HF generate"):
        BatchSampler(mar, batch=1, max_len=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_equals_eager():
    model = tiny_llama(seed=3).cuda()
    eager = BatchSampler(model, batch=6, max_len=48, graph=False)
    graphed = BatchSampler(model, batch=6, max_len=48, graph=True)
    assert graphed.generate(PROMPTS, 30, eos_id=2, temperature=0) == \
        eager.generate(PROMPTS, 30, eos_id=2, temperature=0) == [hf_greedy(model.cpu(), p, 30) for p in PROMPTS]
    model.cuda()
    graphed.generate(PROMPTS, 30, eos_id=2, temperature=1.0, top_p=0.9, top_k=50)  # captures the sampling step
    runs = []
    for sampler in (graphed, graphed, eager):
        torch.manual_seed(3)
        runs.append(sampler.generate(PROMPTS, 30, eos_id=2, temperature=1.0, top_p=0.9, top_k=50))
    assert runs[0] == runs[1] == runs[2]  # replays draw what the eager steps draw, seed for seed
    assert len(graphed.generate(PROMPTS[:3], 30, eos_id=2, temperature=1.0, top_p=0.9, top_k=50)) == 3
