"""Evaluation: held-out perplexity, agreement with a teacher, zero-shot multiple choice.

Multiple choice is scored the way lm-evaluation-harness scores it: the log-likelihood of each
answer continuation after the question context (context and continuation tokenised together and
split, no special tokens), ``acc`` = argmax of the sum, ``acc_norm`` = argmax of the sum divided
by the continuation's length in characters. Formats (jsonl, one item per line):

* ARC:       ``question``, ``choices: {text, label}``, ``answerKey``; context ``"Question: {q}\\nAnswer:"``
* PIQA:      ``goal``, ``sol1``, ``sol2``, ``label``; context ``"Question: {goal}\\nAnswer:"``
* HellaSwag: ``ctx`` (or ``ctx_a``/``ctx_b``), ``endings``, ``label`` (optional ``activity_label``)
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels.sbds_ref import kl as forward_kl  # KL(teacher || student) per position


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) over ``rows [n, L]``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch):
        ids = rows[i:i + batch].to(model.device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def agreement(student, teacher, rows: torch.Tensor, batch: int = 8) -> dict:
    """Mean KL(teacher || student) per token and top-1 agreement with the teacher (computed on
    the student's device)."""
    student.eval()
    teacher.eval()
    kl, agree, n = 0.0, 0, 0
    for i in range(0, rows.shape[0], batch):
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
def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


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
            items.append({"context": _hellaswag_preprocess(prefix + ctx),
                          "choices": [_hellaswag_preprocess(e) for e in d["endings"]], "gold": int(d["label"])})
        else:
            raise ValueError(f"{path}:{i}: unknown multiple-choice format (expected ARC question/choices/answerKey, "
                             "PIQA goal/sol1/sol2/label or HellaSwag ctx/endings/label)")
    if not items:
        raise ValueError(f"{path} has no items")
    return items


def _encode_pair(tokenizer, context: str, continuation: str):
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def score_multiple_choice(model, tokenizer, items: list[dict], batch: int = 16, max_len: int = 1024,
                          progress: bool = False) -> dict:
    """acc and acc_norm (lm-evaluation-harness definitions) of ``model`` on ``items``."""
    model.eval()
    reqs = []  # (item index, choice index, context ids, continuation ids)
    for i, it in enumerate(items):
        for j, ch in enumerate(it["choices"]):
            c, k = _encode_pair(tokenizer, it["context"], " " + ch)
            reqs.append((i, j, c, k))
    ll = {}
    order = sorted(range(len(reqs)), key=lambda r: -(len(reqs[r][2]) + len(reqs[r][3])))
    iterator = range(0, len(order), batch)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="scoring", unit="batch")
    for b in iterator:
        chunk = [reqs[r] for r in order[b:b + batch]]
        seqs = [(c + k)[-(max_len + 1):] for _, _, c, k in chunk]
        L = max(len(s) for s in seqs) - 1
        inp = torch.zeros(len(seqs), L, dtype=torch.long)
        for r, s in enumerate(seqs):
            inp[r, :len(s) - 1] = torch.tensor(s[:-1])  # right padding: earlier positions unaffected
        logits = model(input_ids=inp.to(model.device)).logits
        sums = []
        for r, ((i, j, c, k), s) in enumerate(zip(chunk, seqs)):  # log-softmax of the continuation only
            n = len(k)
            logp = F.log_softmax(logits[r, len(s) - 1 - n:len(s) - 1].float(), -1)
            sums.append(logp.gather(1, torch.tensor(s[-n:], device=logp.device)[:, None]).sum())
        for ((i, j, _, _), v) in zip(chunk, torch.stack(sums).tolist()):
            ll[(i, j)] = v
    acc = acc_norm = 0
    for i, it in enumerate(items):
        scores = [ll[(i, j)] for j in range(len(it["choices"]))]
        norm = [sc / max(1, len(ch)) for sc, ch in zip(scores, it["choices"])]
        acc += int(max(range(len(scores)), key=scores.__getitem__) == it["gold"])
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == it["gold"])
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}
