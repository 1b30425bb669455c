"""Distillation data (detokenised WikiText, the teacher's special tokens, sampled teacher text) and
the mixer's memory at initialisation (attention spans, head memory, dt from spans)."""
import math
from types import SimpleNamespace

import pytest
import torch

from neuro_mar.convert import llama_to_mar, memory_dt
from neuro_mar.evaluation import attention_span, head_memory
from neuro_mar.refine.data import (DataError, builtin_prompts, clean_documents, continuation_prompts,
                                   looks_like_wikitext, teacher_generated_texts)
from neuro_mar.teachers import align_special_tokens
from tiny import tiny_llama

WIKI = (" \n = Lobster = \n \n The lobster , a species of 6 @,@ 000 kinds , is 10 @-@ 20 cm long ( 4 in ) . \n \n"
        " = = Habitat = = \n \n It lives in the sea . \n \n = Crab = \n \n Crabs walk sideways . \n")


def test_wikitext_is_split_into_pages_and_detokenised():
    assert looks_like_wikitext(WIKI) and not looks_like_wikitext("Plain text, as written.\n")
    docs = clean_documents([WIKI])
    assert len(docs) == 2
    assert docs[0].startswith("= Lobster =") and "6,000 kinds" in docs[0] and "10-20 cm long (4 in)." in docs[0]
    assert "== Habitat ==" in docs[0] and " , " not in docs[0] and "@" not in docs[0]
    assert docs[1] == "= Crab =\n\nCrabs walk sideways."
    assert clean_documents([WIKI], "none") == [WIKI]
    assert clean_documents(["Plain text."], "auto") == ["Plain text."]
    with pytest.raises(DataError, match="detokenize must be"):
        clean_documents([WIKI], "yes")


class _Tok:
    """Just enough of a tokenizer for align_special_tokens."""

    def __init__(self):
        self.vocab = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a"]
        self.eos_token, self.pad_token = "<|im_start|>", None

    def __len__(self):
        return len(self.vocab)

    def convert_ids_to_tokens(self, i):
        return self.vocab[i]

    @property
    def eos_token_id(self):
        return self.vocab.index(self.eos_token)

    @property
    def pad_token_id(self):
        return None if self.pad_token is None else self.vocab.index(self.pad_token)


def test_tokenizer_takes_the_models_eos_and_pad():
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 0], pad_token_id=None),
                            config=SimpleNamespace(eos_token_id=2, pad_token_id=2))
    tok = align_special_tokens(_Tok(), model)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 2)
    # no ids anywhere: the tokenizer keeps its eos and pads with it
    bare = SimpleNamespace(generation_config=None, config=SimpleNamespace(eos_token_id=None, pad_token_id=None))
    tok = align_special_tokens(_Tok(), bare)
    assert tok.eos_token_id == 1 and tok.pad_token_id == 1


def test_default_teachers_tokenizer_ends_documents_with_id_2():
    from neuro_mar.teachers import load_teacher

    _, tok = load_teacher()
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2


def test_prompts_are_diverse_and_continuations_open_paragraphs():
    prompts = builtin_prompts()
    assert len(set(prompts)) == len(prompts) >= 500
    text = "\n".join(" ".join(f"w{i}_{j}" for j in range(100)) for i in range(5)) + "\n = Heading = \n"
    conts = continuation_prompts([text], 20, seed=3)
    assert len(conts) == 20 and len(set(conts)) > 5
    for c in conts:
        words = c.split()
        assert 8 <= len(words) <= 40 and words[0].endswith("_0")
    assert continuation_prompts([text], 20, seed=3) == conts  # seeded


def test_teacher_text_has_no_template_boilerplate_and_is_cached(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(90)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    tok.chat_template = "{% for m in messages %}<s> system w1 w2 w3 {{ m['content'] }}{% endfor %}"
    teacher = tiny_llama()
    texts = [" ".join(words[(i * 3 + j) % 90] for j in range(100)) for i in range(6)]
    out = teacher_generated_texts(teacher, tok, 400, cache_dir=tmp_path, max_new=8, batch=4, seed=1, progress=False,
                                  texts=texts, continuation_share=0.5)
    assert sum(len(tok(t, add_special_tokens=False).input_ids) for t in out) >= 400
    assert not any("system w1 w2 w3" in t or "<s>" in t for t in out)  # the template is not in the documents
    assert any(t.split()[0] in words for t in out)  # continuations open with the data's words
    again = teacher_generated_texts(teacher, tok, 400, cache_dir=tmp_path, max_new=8, batch=4, seed=1,
                                    progress=False, texts=texts, continuation_share=0.5)
    assert again == out and len(list(tmp_path.glob("teacher-text-*.pt"))) == 1
    # the KV cache and the precision are settings of the corpus: another one is sampled and cached apart
    static = teacher_generated_texts(teacher, tok, 100, cache_dir=tmp_path, max_new=8, batch=4, seed=1,
                                     progress=False, texts=texts, cache="static", bf16=True)
    assert sum(len(tok(t, add_special_tokens=False).input_ids) for t in static) >= 100
    assert len(list(tmp_path.glob("teacher-text-*.pt"))) == 2
    with pytest.raises(ValueError, match="cache must be one of preallocated, static, dynamic or 'auto'"):
        teacher_generated_texts(teacher, tok, 100, cache_dir=tmp_path, cache="paged", progress=False)


def test_attention_span_of_uniform_attention_is_half_the_distance():
    teacher = tiny_llama()
    with torch.no_grad():
        for layer in teacher.model.layers:  # q = k = 0: every query attends uniformly to keys 0..t
            layer.self_attn.q_proj.weight.zero_()
    ids = torch.randint(3, 90, (2, 24))
    span, sink = attention_span(teacher, ids, min_position=12)
    t = torch.arange(12, 24, dtype=torch.float64)
    expected_span = ((t - 1) / 2).mean()  # keys 1..t: mean distance (t - 1) / 2
    expected_sink = (1 / (t + 1)).mean()
    assert torch.allclose(span.double(), torch.full_like(span.double(), float(expected_span)), atol=1e-4)
    assert torch.allclose(sink.double(), torch.full_like(sink.double(), float(expected_sink)), atol=1e-5)


def test_mixer_memory_from_the_teachers_spans():
    teacher = tiny_llama()
    memory = torch.tensor([[2.0, 10.0, 50.0, 400.0], [1.0, 3.0, 30.0, 3000.0]])
    student = llama_to_mar(teacher, head_memory=memory, normalize_memory=True)
    plain = llama_to_mar(teacher, head_memory=memory, normalize_memory=False)
    for l, (layer, ref) in enumerate(zip(student.model.layers, plain.model.layers)):
        dt = torch.nn.functional.softplus(layer.mixer.dt_bias.detach())
        a = torch.exp(-dt.double())
        assert torch.allclose(a / (1 - a), memory[l].double().clamp(0.5, 1024), rtol=1e-4)  # mean distance
        gain = (1 - a).float().repeat_interleave(layer.mixer.headdim)
        assert torch.allclose(layer.mixer.out_proj.weight, ref.mixer.out_proj.weight * gain[None, :])
    ids = torch.randint(3, 90, (2, 16))
    measured = head_memory(plain, ids)  # A_log's weights start at 0: dt is the bias alone
    assert torch.allclose(measured, 1 / torch.log1p(1 / memory.clamp(0.5, 1024)), rtol=1e-4)
    assert math.isclose(float(memory_dt(torch.tensor(1.0))), math.log(2), rel_tol=1e-6)
    with pytest.raises(ValueError, match="head_memory has shape"):
        llama_to_mar(teacher, head_memory=torch.ones(3, 4))


def test_zoh_gain_and_the_fixed_gain_are_exclusive():
    teacher = tiny_llama()
    s = llama_to_mar(teacher, head_memory=torch.full((2, 4), 50.0), ssm_input_gain="zoh")
    assert s.config.ssm_input_gain == "zoh" and all(l.mixer.input_gain == "zoh" for l in s.model.layers)
    with pytest.raises(ValueError, match="scale it twice"):
        llama_to_mar(teacher, normalize_memory=True, ssm_input_gain="zoh")
    from neuro_mar.models import MARConfig

    with pytest.raises(ValueError, match="ssm_input_gain must be"):
        MARConfig(ssm_input_gain="euler")
