"""The zero-shot suite against lm-evaluation-harness 0.4 itself: same requests, same numbers.

Each task's lm-eval definition is lm-eval's own YAML (included from the installed package), pointed
at a local file that this test writes in the task's public layout; lm-eval's HFLM and our scorer
run the same model (a small random Llama with SmolLM2's tokenizer, fp32) and every request's
arguments and log-likelihood must agree (< 1e-4), as must the aggregated metrics.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from neuro_mar.evaluation import (Scorer, TaskFileError, compare, evaluate_suite, kept, load_suite, load_task,
                                  metrics_of, requests_of, rolling_windows, wikitext_pages)
from neuro_mar.evaluation.suite import SuiteEntry

MAX_LENGTH = 48  # small, so that contexts are truncated and pages need several windows

PAGE_A = (" = Homarus gammarus = \n \n Homarus gammarus , known as the European lobster , is a species of clawed "
          "lobster from the eastern Atlantic Ocean , Mediterranean Sea and parts of the Black Sea . It may grow to "
          "a length of 60 cm ( 24 in ) and a mass of 6 @,@ 000 g , and bears a conspicuous pair of claws . \n \n "
          "= = Description = = \n \n In life , the lobsters are blue , only becoming \" lobster red \" on cooking "
          ". Mating occurs in the summer @-@ time . \n")
PAGE_B = (" = The Ship = \n \n The ship 's crew sailed in 1890 . They were n't afraid ; the captain said : \" go "
          "on ! \" and they did . \n")

DOCS = {
    "piqa": [{"goal": "How do you open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
             {"goal": "To dry wet shoes,", "sol1": "stuff them with newspaper.", "sol2": "fill them with water.",
              "label": 0}],
    "arc_easy": [{"id": "a", "question": "Which is a gas at room temperature?",
                  "choices": {"text": ["iron", "oxygen", "wood", "salt"], "label": ["A", "B", "C", "D"]},
                  "answerKey": "B"},
                 {"id": "b", "question": "What do plants need to make food?",
                  "choices": {"text": ["sunlight", "sand", "noise"], "label": ["1", "2", "3"]}, "answerKey": "1"}],
    "hellaswag": [{"ctx_a": "A man is standing on a ladder.", "ctx_b": "he", "activity_label": "Painting",
                   "endings": ["paints the wall [title] white.", "eats a sandwich.", "flies away.", "sleeps."],
                   "label": "0"}],
    "winogrande": [{"sentence": "The trophy didn't fit in the suitcase because the _ was too big.",
                    "option1": "trophy", "option2": "suitcase", "answer": "1"}],
    "boolq": [{"question": "is the sky blue", "passage": "The sky appears blue because of scattering.",
               "label": 1}],
    "openbookqa": [{"id": "o", "question_stem": "The sun is responsible for",
                    "choices": {"text": ["puppies learning new tricks", "plants sprouting and growing"],
                                "label": ["A", "B"]}, "answerKey": "B"}],
    "copa": [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
              "choice2": "Water flowed from the spout.", "question": "effect", "label": 1, "idx": 0}],
    "social_iqa": [{"context": "Tracy didn't go home that evening.", "question": "What does Tracy need to do?",
                    "answerA": "make a new plan", "answerB": "go home", "answerC": "find a place", "label": "1"}],
    "commonsense_qa": [{"id": "c", "question": "Where would you find a revolving door? ", "question_concept": "door",
                        "choices": {"label": ["A", "B", "C", "D", "E"],
                                    "text": ["bank", "lake", "forest", "desert", "sky"]}, "answerKey": "A"}],
    "wsc273": [{"text": "The city councilmen refused the demonstrators a permit because they feared violence.",
                "pronoun": "they", "pronoun_loc": 63, "quote": "they feared violence", "quote_loc": 63,
                "options": ["The city councilmen", "The demonstrators"], "label": 0, "source": "x"}],
    "lambada_openai": [{"text": "She opened the door and saw her old friend standing in the rain, holding a "
                                "small box. It was a gift from her mother"},
                       {"text": "The keys were on the table where he had left them the night before, next to "
                                "the lamp"}],
    "wikitext": [{"page": PAGE_A}, {"page": PAGE_B}],
}


@pytest.fixture(scope="module")
def tokenizer():
    from neuro_mar.teachers import load_teacher

    _, tok = load_teacher()
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=MAX_LENGTH)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # logits spread enough that rankings are not ties
        m.model.embed_tokens.weight.mul_(40)
    return m


def _write_jsonl(path: Path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    paths = {}
    for name, recs in DOCS.items():
        paths[name] = root / f"{name}.jsonl"
        _write_jsonl(paths[name], recs)
    return paths


def _lm_eval_yaml(root: Path, name: str, path: Path) -> str:
    import lm_eval

    tasks = Path(lm_eval.__file__).parent / "tasks"
    source = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
              "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml",
              "openbookqa": "openbookqa/openbookqa.yaml", "copa": "super_glue/copa/default.yaml",
              "social_iqa": "siqa/siqa.yaml", "commonsense_qa": "commonsense_qa/default.yaml",
              "wsc273": "wsc273/default.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
              "wikitext": "wikitext/wikitext.yaml"}[name]
    local = f"local_{name}"
    (root / f"{local}.yaml").write_text(
        f"include: {tasks / source}\ntask: {local}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {path}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\nfewshot_split: null\n")
    return local


@pytest.fixture(scope="module")
def lm_eval_samples(model, tokenizer, task_files, tmp_path_factory):
    pytest.importorskip("lm_eval")
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval_yaml")
    names = {_lm_eval_yaml(root, name, path): name for name, path in task_files.items()}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=MAX_LENGTH, device="cpu")
    out = simple_evaluate(model=lm, tasks=list(names), task_manager=TaskManager(include_path=str(root)),
                          log_samples=True, bootstrap_iters=0)
    return {names[k]: v for k, v in out["samples"].items()}, {names[k]: v for k, v in out["results"].items()}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_requests_and_loglikelihoods_equal_lm_eval(name, model, tokenizer, task_files, lm_eval_samples):
    samples, aggregated = lm_eval_samples
    task = load_task(name if name != "social_iqa" else "social_iqa", task_files[name])
    ours_reqs = requests_of(task)
    scorer = Scorer(model, tokenizer, max_length=MAX_LENGTH, batch_size=2)
    docs = sorted(samples[name], key=lambda s: s["doc_id"])
    theirs_reqs, theirs_ll = [], []
    for s in docs:
        for args, resp in zip(s["arguments"], s["resps"]):
            arg = tuple(args.values()) if isinstance(args, dict) else tuple(args)
            theirs_reqs.append(arg[0] if task.kind == "rolling" else (arg[0], arg[1]))
            theirs_ll.append(resp[0])
    if task.kind == "rolling":
        assert ours_reqs == theirs_reqs  # the detokenised pages
        ours = scorer.loglikelihood_rolling(ours_reqs)
        for a, b in zip(ours, theirs_ll):
            assert abs(a - float(b)) < 1e-4
        res = metrics_of(task, ours)
    else:
        assert ours_reqs == theirs_reqs
        ours = scorer.loglikelihood(ours_reqs)
        for (ll, greedy), b in zip(ours, theirs_ll):
            assert abs(ll - float(b[0])) < 1e-4
            assert greedy == bool(b[1])
        res = metrics_of(task, ours)
    agg = aggregated[name]
    for metric in task.metrics:
        assert res[metric] == pytest.approx(agg[f"{metric},none"], rel=1e-6, abs=1e-9), metric


def test_rolling_windows_cover_every_token_once():
    toks = list(range(10, 27))  # 17 tokens
    w = rolling_windows(toks, 1, 5)
    assert [c for _, c in w] == [toks[0:5], toks[5:10], toks[10:15], toks[15:17]]
    assert w[0][0] == [1]
    for ctx, cont in w[1:]:
        assert len(ctx) + len(cont) - 1 <= 5  # fits the window: inputs are ctx + cont[:-1]
    assert w[1][0] == [toks[4]] and w[3][0] == toks[11:15]


def test_wikitext_pages_split_at_top_level_headings():
    raw = " \n = A = \n \n text a \n = = Sub = = \n more \n = B = \n text b \n"
    pages = wikitext_pages(raw)
    assert [p.strip().splitlines()[0].strip() for p in pages] == ["= A =", "= B ="]
    assert "= = Sub = =" in pages[0]


def test_gauntlet_layouts_score_what_the_file_holds(tmp_path):
    p = tmp_path / "copa.jsonl"
    _write_jsonl(p, [{"query": "The man turned on the faucet, therefore", "choices": ["the sink filled.", "it rained."],
                      "gold": 0}])
    t = load_task("copa", p)
    assert t.layout == "gauntlet_choice"
    assert requests_of(t) == [("The man turned on the faucet, therefore", " the sink filled."),
                              ("The man turned on the faucet, therefore", " it rained.")]
    w = tmp_path / "wsc.jsonl"
    _write_jsonl(w, [{"context_options": ["A because x", "A because y"], "continuation": "feared it.", "gold": 1}])
    t = load_task("wsc273", w)
    assert requests_of(t) == [("A because x", " feared it."), ("A because y", " feared it.")]
    lam = tmp_path / "lambada.txt"
    lam.write_text("the cat sat on the mat\nhe said hello to his friend\n")
    t = load_task("lambada_standard", lam)
    assert requests_of(t) == [("the cat sat on the", " mat"), ("he said hello to his", " friend")]


def test_bad_task_files_name_the_file_and_the_fields(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TaskFileError, match="does not exist"):
        load_task("piqa", missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "x", "sol1": "a", "sol2": "b", "label": 0}\nnot json\n')
    with pytest.raises(TaskFileError, match=r"bad.jsonl:2: not valid JSON"):
        load_task("piqa", bad)
    other = tmp_path / "other.jsonl"
    _write_jsonl(other, [{"question": "q", "answer": "a"}])
    with pytest.raises(TaskFileError, match=r"unknown layout for task 'piqa'.*goal, sol1, sol2, label"):
        load_task("piqa", other)
    partial = tmp_path / "partial.jsonl"
    _write_jsonl(partial, [{"goal": "x", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "y", "sol1": "a"}])
    with pytest.raises(TaskFileError, match="record 2 lacks sol2, label"):
        load_task("piqa", partial)
    gold = tmp_path / "gold.jsonl"
    _write_jsonl(gold, [{"goal": "x", "sol1": "a", "sol2": "b", "label": 5}])
    with pytest.raises(TaskFileError, match="gold answer 5"):
        load_task("piqa", gold)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TaskFileError, match="not UTF-8"):
        load_task("piqa", binary)
    with pytest.raises(TaskFileError, match="needs --suite-dir"):
        load_suite("dev")
    with pytest.raises(TaskFileError, match="does not exist"):
        load_suite("dev", tmp_path)  # the folder lacks the suite's files


def test_cli_eval_refuses_a_bad_task_before_loading_a_model(tmp_path, capsys):
    from neuro_mar.cli import main

    bad = tmp_path / "x.jsonl"
    _write_jsonl(bad, [{"a": 1}])
    with pytest.raises(SystemExit) as err:
        main(["eval", "no-such-model", "--suite-task", f"piqa={bad}", "--out", str(tmp_path / "out")])
    assert str(err.value).startswith("error: ") and "goal, sol1, sol2, label" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_kept_share_and_comparison():
    assert kept(0.6, 0.7, 0.5, False) == pytest.approx(0.5)
    assert kept(40.0, 20.0, None, True) == pytest.approx(2.0)
    assert kept(0.6, 0.45, 0.5, False) is None  # the reference is below the baseline: no margin to keep
    info = {"t": {"headline": "acc", "baseline": 0.25}, "w": {"headline": "word_perplexity", "baseline": None}}
    res = {"teacher": {"t": {"acc": 0.75}, "w": {"word_perplexity": 10.0}},
           "student": {"t": {"acc": 0.5}, "w": {"word_perplexity": 15.0}}}
    c = compare(res, info, "teacher")
    assert c["student"] == {"t": pytest.approx(0.5), "w": pytest.approx(1.5), "mean_kept": pytest.approx(0.5)}


def test_context_cut_shortens_contexts(model, tokenizer, task_files):
    task = load_task("lambada_openai", task_files["lambada_openai"])
    full = evaluate_suite(model, tokenizer, [SuiteEntry("l", task)], max_length=MAX_LENGTH)["l"]
    cut = evaluate_suite(model, tokenizer, [SuiteEntry("l", task)], max_length=MAX_LENGTH, context_tokens=2)["l"]
    scorer = Scorer(model, tokenizer, max_length=MAX_LENGTH)
    pairs = [scorer.encode_pair(c, k) for c, k in requests_of(task)]
    by_hand = scorer.score_tokens([(c[-2:], k) for c, k in pairs])
    assert cut["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in by_hand) / len(by_hand)))
    assert cut["perplexity"] != pytest.approx(full["perplexity"])
