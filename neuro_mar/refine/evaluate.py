"""Evaluation: held-out perplexity, agreement with a teacher, zero-shot multiple choice.

Multiple choice is scored the way lm-evaluation-harness scores it (by the zero-shot suite's
request engine, :mod:`neuro_mar.evaluation`, which has every task; this module keeps the
``--eval-multiple-choice`` files): the log-likelihood of each answer continuation after the question context,
``acc`` = argmax of the sum, ``acc_norm`` = argmax of the sum divided by the continuation's length
in characters. Formats (jsonl, one item per line):

* ARC:       ``question``, ``choices: {text, label}``, ``answerKey``; context ``"Question: {q}\\nAnswer:"``
* PIQA:      ``goal``, ``sol1``, ``sol2``, ``label``; context ``"Question: {goal}\\nAnswer:"``
* HellaSwag: ``ctx`` (or ``ctx_a``/``ctx_b``), ``endings``, ``label`` (optional ``activity_label``)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..evaluation.tasks import hellaswag_preprocess
from ..kernels.sbds_ref import kl as forward_kl  # KL(teacher || student) per position


def _batches(n: int, batch: int, progress: bool | str):
    """Start indices of ``batch``-row slices of ``n`` rows, under a tqdm bar (stderr, shown once
    the loop takes over 2 s) when ``progress`` is true (a string names the bar)."""
    starts = range(0, n, batch)
    if not progress:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc=progress if isinstance(progress, str) else None, unit="batch", leave=False, delay=2.0)


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch: int = 8, progress: bool | str = False) -> float:
    """exp(mean next-token cross-entropy) over ``rows [n, L]``."""
    model.eval()
    total, count = 0.0, 0
    for i in _batches(rows.shape[0], batch, progress):
        ids = rows[i:i + batch].to(model.device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def agreement(student, teacher, rows: torch.Tensor, batch: int = 8, progress: bool | str = False) -> dict:
    """Mean KL(teacher || student) per token and top-1 agreement with the teacher (computed on
    the student's device)."""
    student.eval()
    teacher.eval()
    kl, agree, n = 0.0, 0, 0
    for i in _batches(rows.shape[0], batch, progress):
        ids = rows[i:i + batch]
        s = student(input_ids=ids.to(student.device)).logits.float()
        t = teacher(input_ids=ids.to(teacher.device)).logits.float().to(s.device)
        kl += forward_kl(F.log_softmax(t, -1), F.log_softmax(s, -1)).sum().item()
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        n += ids.numel()
        del s, t
    return {"kl_to_teacher": kl / n, "top1_agreement": agree / n}


# ---------------------------------------------------------------------------------------------
# multiple choice
# ---------------------------------------------------------------------------------------------
def load_multiple_choice(path: str | Path) -> list[dict]:
    """Items ``{"context", "choices", "gold"}`` from a jsonl file in ARC, PIQA or HellaSwag format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice file {path} does not exist")
    items = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        if "question" in d and "choices" in d and "answerKey" in d:  # ARC
            labels = d["choices"]["label"]
            items.append({"context": f"Question: {d['question']}\nAnswer:", "choices": list(d["choices"]["text"]),
                          "gold": labels.index(d["answerKey"])})
        elif "goal" in d and "sol1" in d:  # PIQA
            items.append({"context": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]],
                          "gold": int(d["label"])})
        elif "endings" in d:  # HellaSwag
            ctx = d["ctx"] if "ctx" in d else d["ctx_a"] + " " + d["ctx_b"].capitalize()
            prefix = f"{d['activity_label']}: " if d.get("activity_label") else ""
            items.append({"context": hellaswag_preprocess(prefix + ctx),
                          "choices": [hellaswag_preprocess(e) for e in d["endings"]], "gold": int(d["label"])})
        else:
            raise ValueError(f"{path}:{i}: unknown multiple-choice format (expected ARC question/choices/answerKey, "
                             "PIQA goal/sol1/sol2/label or HellaSwag ctx/endings/label)")
    if not items:
        raise ValueError(f"{path} has no items")
    return items


@torch.no_grad()
def score_multiple_choice(model, tokenizer, items: list[dict], batch: int = 16, max_len: int = 1024,
                          progress: bool = False) -> dict:
    """acc and acc_norm (lm-evaluation-harness definitions) of ``model`` on ``items``, scored by
    :class:`neuro_mar.evaluation.Scorer` (the zero-shot suite's request engine)."""
    from ..evaluation.scorer import Scorer

    scorer = Scorer(model, tokenizer, max_length=max_len, batch_size=batch, progress=progress)
    lls = [ll for ll, _ in scorer.loglikelihood([(it["context"], " " + ch) for it in items for ch in it["choices"]])]
    acc = acc_norm = k = 0
    for it in items:
        scores = lls[k:k + len(it["choices"])]
        k += len(it["choices"])
        norm = [sc / max(1, len(ch)) for sc, ch in zip(scores, it["choices"])]
        acc += int(max(range(len(scores)), key=scores.__getitem__) == it["gold"])
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == it["gold"])
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}
