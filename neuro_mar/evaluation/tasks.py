"""Zero-shot tasks with lm-evaluation-harness 0.4 definitions, read from local files.

Each task reads one file in one of the public layouts its data set is distributed in (the fields
of lm-eval's Hugging Face data sets, or the Mosaic Eval Gauntlet's packaging), and turns every
document into requests with lm-eval's prompt, target delimiter and metrics:

=============== ============================================= =========================================
task            prompt -> continuation                        layouts (fields)
=============== ============================================= =========================================
wikitext        the page, detokenised (rolling windows)       raw WikiText text (``.txt``, pages split
                                                              at `` = Title = ``) or jsonl ``page``
lambada_openai  text minus its last word -> " " + last word   jsonl ``text``, or one passage per line
lambada_standard  (same; the original tokenised release)      (``.txt``)
piqa            "Question: {goal}\\nAnswer:" -> " " + sol     ``goal, sol1, sol2, label``
arc_easy,       "Question: {question}\\nAnswer:" -> " " + text ``question, choices{text,label},
arc_challenge                                                 answerKey``
hellaswag       preprocess(activity_label: ctx_a Ctx_b)        ``ctx_a, ctx_b`` (or ``ctx``), ``endings,
                -> " " + preprocess(ending)                   label``, ``activity_label``
winogrande      sentence up to "_" with each option            ``sentence, option1, option2, answer``
                -> " " + the rest (partial scoring)
boolq           "{passage}\\nQuestion: {question}?\\nAnswer:"  ``question, passage, label``
                -> " no" / " yes"
openbookqa      question_stem -> " " + text                   ``question_stem, choices, answerKey``
copa            premise minus "." + " because"/" therefore"   ``premise, choice1, choice2, question,
                -> "  " + choice, lower-cased first letter    label``; Gauntlet ``query, choices, gold``
social_iqa      "Q: {context} {question}\\nA:" -> " " + answer ``context, question, answerA..C, label``;
                                                              Gauntlet ``query, choices, gold``
commonsense_qa  "Question: ...\\nA. ..\\nAnswer:" -> " A".." E" ``question, choices, answerKey`` (5);
                                                              Gauntlet ``query, choices, gold``
wsc273          text up to the pronoun with each option       ``text, pronoun, pronoun_loc, options,
                -> " " + the rest (partial scoring)           label``; Gauntlet ``context_options,
                                                              continuation, gold``
=============== ============================================= =========================================

Metrics as lm-eval computes them: ``acc`` (argmax of the summed log-likelihood), ``acc_norm``
(argmax of log-likelihood / length of the choice in characters), LAMBADA ``acc`` (the last word
is the greedy continuation) and ``perplexity`` (exp of minus the mean log-likelihood), WikiText
``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte`` (summed log-likelihood over the
words / UTF-8 bytes of the page *before* detokenisation). The Gauntlet layouts score what the
file holds (its query and choices, a space as delimiter), so their numbers are comparable with each
other, not with the Hugging Face layouts' (the README of each data set says how it differs).

A file that is missing, not UTF-8, not JSON lines, empty, or of no layout the task reads raises
:class:`TaskFileError` naming the file, the line and the fields expected.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..io_utils import jsonl_objects


class TaskFileError(ValueError):
    """A task file that cannot be read: the message names the file and what was expected."""


@dataclass
class ChoiceDoc:
    """One multiple-choice document: a request ``(context, continuation)`` per choice, the gold
    index, and each choice's length in characters (for ``acc_norm``)."""

    requests: list[tuple[str, str]]
    gold: int
    lengths: list[int]


@dataclass
class TargetDoc:
    """One LAMBADA document: the context and the continuation to predict."""

    context: str
    continuation: str


@dataclass
class PageDoc:
    """One WikiText page: the text the model reads (detokenised) and the words and bytes that
    perplexity is normalised by (counted on the original page, as lm-eval does)."""

    text: str
    words: int
    bytes: int


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (perplexities, bits per byte)."""
    return "perplexity" in metric or metric == "bits_per_byte"


@dataclass
class Task:
    """A task definition: its name, kind (``choice``, ``target`` or ``rolling``), the metrics it
    reports and the one the suite leads with."""

    name: str
    kind: str
    metrics: tuple
    headline: str
    docs: list = field(default_factory=list)
    source: str = ""
    layout: str = ""

    @property
    def baseline(self) -> float:
        """The score of a model that knows nothing: for choice tasks the accuracy of always
        answering the most frequent gold position (1/k for balanced data; 40.3 % on the Gauntlet's
        CommonsenseQA, 62 % on BoolQ), 0 for LAMBADA's accuracy; None for perplexities."""
        if self.kind == "choice":
            counts = Counter(d.gold for d in self.docs)
            return max(counts.values()) / len(self.docs)
        if self.headline == "acc":
            return 0.0
        return float("nan")

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.headline)


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise TaskFileError(f"{path}: not UTF-8 text (byte {err.start}); task files are UTF-8 JSON lines or text") from None
    if not text.strip():
        raise TaskFileError(f"task file {path} is empty")
    return text


def _records(path: Path) -> list[dict]:
    text = _read_text(path)
    if path.suffix == ".json":  # a JSON array of records
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as err:
            raise TaskFileError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
            raise TaskFileError(f"{path}: a .json task file must hold an array of objects")
        return recs
    return [rec for _, rec in jsonl_objects(text.splitlines(), path, TaskFileError)]


# ---------------------------------------------------------------------------------------------
# lm-eval's preprocessing
# ---------------------------------------------------------------------------------------------
def wikitext_detokenize(page: str) -> str:
    """lm-eval's WikiText detokenizer: undoes the data set's tokenisation (`` @-@ ``, spaces
    before punctuation, spaced brackets and quotes, ``= = heading = =``)."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def wikitext_pages(raw: str) -> list[str]:
    """Split raw WikiText (the ``wiki.*.raw`` files) into pages at each top-level heading
    `` = Title = ``, as the document-level data set lm-eval reads is built."""
    pages, cur = [], []
    lines = raw.split("\n")
    for line in lines:
        r = line.replace("= = =", "===").replace("= =", "==").strip()
        if r.startswith("= ") and r.endswith(" ="):
            page = "\n".join(cur)
            if page.strip():
                pages.append(page)
            cur = []
        cur.append(line)
    pages.append("\n".join(cur))
    return pages


def hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_WSC_UPPER = {"A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their"}


def _wsc_option(doc: dict, option: str) -> str:
    if doc["pronoun"].lower() in ("my", "his", "her", "our", "their"):
        option += "'s"
    pronoun = option.split()[0]
    start_of_sentence = doc["text"][doc["pronoun_loc"] - 2] == "."
    if not start_of_sentence and pronoun in _WSC_UPPER:
        return option.replace(pronoun, pronoun.lower())
    return option


def _choices(context: str, choices: list[str], gold: int, delimiter: str = " ") -> ChoiceDoc:
    return ChoiceDoc([(context, delimiter + c) for c in choices], gold, [len(c) for c in choices])


def _partial(contexts: list[str], continuation: str, gold: int) -> ChoiceDoc:
    return ChoiceDoc([(c, " " + continuation) for c in contexts], gold, [len(c) for c in contexts])


def _labelled(rec: dict, choices_key: str = "choices", key: str = "answerKey") -> tuple[list[str], int]:
    ch = rec[choices_key]
    labels, texts = list(ch["label"]), list(ch["text"])
    return texts, labels.index(str(rec[key]).lstrip())


# one builder per layout: (required fields, record -> doc)
def _arc(r):
    texts, gold = _labelled(r)
    return _choices(f"Question: {r['question']}\nAnswer:", texts, gold)


def _obqa(r):
    texts, gold = _labelled(r)
    return _choices(r["question_stem"], texts, gold)


def _piqa(r):
    return _choices(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


def _hellaswag(r):
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize() if "ctx_a" in r else r["ctx"]
    return _choices(hellaswag_preprocess(r["activity_label"] + ": " + ctx),
                    [hellaswag_preprocess(e) for e in r["endings"]], int(r["label"]))


def _winogrande(r):
    i = r["sentence"].index("_")
    return _partial([r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]],
                    r["sentence"][i + 1:].strip(), {"1": 0, "2": 1}[str(r["answer"])])


def _boolq(r):
    return _choices(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["label"]))


def _copa(r):
    connector = {"cause": "because", "effect": "therefore"}[r["question"]]
    lower = lambda c: c[0].lower() + c[1:]  # noqa: E731
    return _choices(r["premise"].strip()[:-1] + f" {connector}", [" " + lower(r["choice1"]), " " + lower(r["choice2"])],
                    int(r["label"]))


def _siqa(r):
    return _choices(f"Q: {r['context']} {r['question']}\nA:", [r["answerA"], r["answerB"], r["answerC"]],
                    int(r["label"]) - 1)


def _csqa(r):
    texts, _ = _labelled(r)
    letters = "ABCDE"[:len(texts)]
    options = "".join(f"\n{letter}. {t}" for letter, t in zip(letters, texts))
    return _choices(f"Question: {r['question'].strip()}{options}\nAnswer:", list(letters),
                    list(r["choices"]["label"]).index(r["answerKey"]))


def _wsc273(r):
    doc = dict(r, text=r["text"].replace("  ", " "))
    opts = [_wsc_option(doc, o) for o in r["options"]]
    head, tail = doc["text"][:doc["pronoun_loc"]], doc["text"][doc["pronoun_loc"] + len(doc["pronoun"]):]
    return ChoiceDoc([(head + o, " " + tail) for o in opts], int(r["label"]), [len(head + o) for o in opts])


def _gauntlet_choice(r):
    return _choices(r["query"], list(r["choices"]), int(r["gold"]))


def _gauntlet_schema(r):
    return _partial(list(r["context_options"]), r["continuation"], int(r["gold"]))


def _lambada(r):
    words = r["text"].split(" ")
    return TargetDoc(" ".join(words[:-1]), " " + words[-1])


def _page(r):
    page = r["page"]
    return PageDoc(wikitext_detokenize(page), len(re.split(r"\s+", page)), len(page.encode("utf-8")))


LAYOUTS = {
    # name: (required fields, builder)
    "arc": (("question", "choices", "answerKey"), _arc),
    "openbookqa": (("question_stem", "choices", "answerKey"), _obqa),
    "piqa": (("goal", "sol1", "sol2", "label"), _piqa),
    "hellaswag": (("endings", "label", "activity_label"), _hellaswag),
    "winogrande": (("sentence", "option1", "option2", "answer"), _winogrande),
    "boolq": (("question", "passage", "label"), _boolq),
    "copa": (("premise", "choice1", "choice2", "question", "label"), _copa),
    "siqa": (("context", "question", "answerA", "answerB", "answerC", "label"), _siqa),
    "commonsense_qa": (("question", "choices", "answerKey"), _csqa),
    "wsc273": (("text", "pronoun", "pronoun_loc", "options", "label"), _wsc273),
    "gauntlet_choice": (("query", "choices", "gold"), _gauntlet_choice),
    "gauntlet_schema": (("context_options", "continuation", "gold"), _gauntlet_schema),
    "lambada": (("text",), _lambada),
    "wikitext_page": (("page",), _page),
}

#: task name -> (kind, metrics, headline metric, layouts it reads, in the order tried)
TASKS = {
    "wikitext": ("rolling", ("word_perplexity", "byte_perplexity", "bits_per_byte"), "word_perplexity",
                 ("wikitext_raw", "wikitext_page")),
    "lambada_openai": ("target", ("acc", "perplexity"), "acc", ("lambada",)),
    "lambada_standard": ("target", ("acc", "perplexity"), "acc", ("lambada",)),
    "piqa": ("choice", ("acc", "acc_norm"), "acc", ("piqa",)),
    "arc_easy": ("choice", ("acc", "acc_norm"), "acc", ("arc",)),
    "arc_challenge": ("choice", ("acc", "acc_norm"), "acc_norm", ("arc",)),
    "hellaswag": ("choice", ("acc", "acc_norm"), "acc_norm", ("hellaswag",)),
    "winogrande": ("choice", ("acc",), "acc", ("winogrande",)),
    "boolq": ("choice", ("acc",), "acc", ("boolq",)),
    "openbookqa": ("choice", ("acc", "acc_norm"), "acc_norm", ("openbookqa",)),
    "copa": ("choice", ("acc",), "acc", ("copa", "gauntlet_choice")),
    "social_iqa": ("choice", ("acc",), "acc", ("siqa", "gauntlet_choice")),
    "commonsense_qa": ("choice", ("acc",), "acc", ("commonsense_qa", "gauntlet_choice")),
    "wsc273": ("choice", ("acc",), "acc", ("wsc273", "gauntlet_schema")),
}


def _fields(layout: str) -> str:
    if layout == "wikitext_raw":
        return "raw WikiText text (.txt)"
    if layout == "lambada":
        return "jsonl 'text' or one passage per line (.txt)"
    return ", ".join(LAYOUTS[layout][0])


def load_task(name: str, path: str | Path, limit: int | None = None) -> Task:
    """Task ``name`` (a key of :data:`TASKS`) with its documents read from ``path``; ``limit``
    keeps the first N documents (lm-eval's ``--limit``)."""
    if name not in TASKS:
        raise TaskFileError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise TaskFileError(f"limit must be >= 1, got {limit}")
    kind, metrics, headline, layouts = TASKS[name]
    path = Path(path).expanduser()
    expected = "; ".join(f"{lay}: {_fields(lay)}" for lay in layouts)
    if path.suffix == ".txt" and kind in ("rolling", "target"):
        text = _read_text(path)
        if kind == "rolling":
            docs, layout = [_page({"page": p}) for p in wikitext_pages(text)], "wikitext_raw"
        else:
            docs, layout = [_lambada({"text": line}) for line in text.splitlines() if line.strip()], "lambada"
    else:
        recs = _records(path)
        if not recs:
            raise TaskFileError(f"task file {path} has no records")
        layout = next((lay for lay in layouts if lay in LAYOUTS and all(f in recs[0] for f in LAYOUTS[lay][0])), None)
        if layout is None:
            raise TaskFileError(f"{path}: unknown layout for task {name!r} (first record's fields: "
                                f"{', '.join(sorted(recs[0]))}); expected {expected}")
        required, build = LAYOUTS[layout]
        docs = []
        for i, rec in enumerate(recs, 1):
            missing = [f for f in required if f not in rec]
            if missing:
                raise TaskFileError(f"{path}: record {i} lacks {', '.join(missing)} (layout {layout}: {expected})")
            try:
                docs.append(build(rec))
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
                raise TaskFileError(f"{path}: record {i} is malformed for layout {layout} "
                                    f"({type(err).__name__}: {err}); expected {expected}") from None
    for i, d in enumerate(docs, 1):
        if isinstance(d, ChoiceDoc) and not 0 <= d.gold < len(d.requests):
            raise TaskFileError(f"{path}: record {i}: gold answer {d.gold} is not one of its {len(d.requests)} choices")
        if isinstance(d, TargetDoc) and not d.context.strip():
            raise TaskFileError(f"{path}: record {i}: a passage needs at least two words")
    if limit is not None:
        docs = docs[:limit]
    return Task(name, kind, metrics, headline, docs, str(path), layout)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def requests_of(task: Task) -> list:
    """The task's requests in document order: ``(context, continuation)`` pairs for choice and
    target tasks, page texts for rolling tasks."""
    if task.kind == "choice":
        return [r for d in task.docs for r in d.requests]
    if task.kind == "target":
        return [(d.context, d.continuation) for d in task.docs]
    return [d.text for d in task.docs]


def metrics_of(task: Task, results: list) -> dict:
    """lm-eval's aggregate metrics from the per-request results (``(ll, is_greedy)`` pairs for
    choice and target tasks, summed log-likelihoods for rolling tasks), plus ``n`` documents."""
    out = {"n": len(task.docs)}
    if task.kind == "choice":
        acc = acc_norm = 0
        k = 0
        for d in task.docs:
            lls = [results[k + j][0] for j in range(len(d.requests))]
            k += len(d.requests)
            acc += int(max(range(len(lls)), key=lls.__getitem__) == d.gold)
            norm = [ll / n for ll, n in zip(lls, d.lengths)]
            acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == d.gold)
        out["acc"] = acc / len(task.docs)
        if "acc_norm" in task.metrics:
            out["acc_norm"] = acc_norm / len(task.docs)
    elif task.kind == "target":
        out["acc"] = sum(int(g) for _, g in results) / len(results)
        out["perplexity"] = math.exp(-sum(ll for ll, _ in results) / len(results))
    else:
        ll = sum(results)
        words = sum(d.words for d in task.docs)
        nbytes = sum(d.bytes for d in task.docs)
        out["word_perplexity"] = math.exp(-ll / words)
        out["byte_perplexity"] = math.exp(-ll / nbytes)
        out["bits_per_byte"] = -ll / nbytes / math.log(2)
    return out
