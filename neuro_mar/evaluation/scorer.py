"""Log-likelihood scoring of a causal LM, request for request as lm-evaluation-harness 0.4 does it.

Two request kinds, the two the zero-shot suite needs:

* ``loglikelihood(context, continuation)`` -> ``(log P(continuation | context), is_greedy)``.
  The pair is tokenised as lm-eval's ``HFLM`` does: trailing spaces of the context move to the
  continuation, ``context + continuation`` is encoded whole and split at the length of the encoded
  context (so a word boundary is tokenised as in running text); an empty context becomes the
  prefix token. Special tokens follow the tokenizer's own default (a tokenizer that adds a BOS
  adds it, one that does not adds nothing), skipped for a string that already starts with the
  prefix token's text. The input is left-truncated to ``max_length`` tokens.
* ``loglikelihood_rolling(text)`` -> the log-likelihood of every token of ``text``, in disjoint
  windows of ``max_length`` predicted tokens; the first window is conditioned on the prefix token
  (BOS if the tokenizer has one, else EOS), later windows on the tokens before them in the window.

Requests are batched longest first and right-padded (causal models: padding after a sequence does
not change its logits). Only the continuation's positions go through log-softmax, in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` token windows covering ``tokens`` (lm-eval's rolling
    windows with a context length of 1, made disjoint): each continuation holds up to
    ``max_length`` tokens to predict, its context the tokens before it within one model window."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        window = tokens[end - max_length - 1:end - 1]
        windows.append((window[:len(window) - (n - 1)], tokens[end - n:end]))
        done = end
    return windows


@dataclass
class Scorer:
    """Scores requests with ``model`` (a Hugging Face causal LM returning ``.logits``).

    ``max_length``: model window in tokens (lm-eval's ``max_length``); ``batch_tokens``: the most
    input tokens in one forward; ``context_tokens``: if set, every loglikelihood context is cut to
    its last N tokens (the cut-context probe: how much of a passage a model actually uses)."""

    model: object
    tokenizer: object
    max_length: int = 2048
    batch_size: int = 32
    batch_tokens: int = 16384
    context_tokens: int | None = None
    progress: bool = False
    desc: str = "scoring"

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise ValueError(f"context_tokens must be >= 1, got {self.context_tokens}")
        tok = self.tokenizer
        self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if self.prefix_token_id is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
        self._prefix_text = tok.decode(self.prefix_token_id)

    # -- tokenisation ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:
            if self._prefix_text and text.startswith(self._prefix_text):
                return self.tokenizer.encode(text, add_special_tokens=False)
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # -- requests ------------------------------------------------------------------------------
    def _tokenizing(self, items: list):
        """``items``, under a tqdm bar (stderr, shown after 2 s) when ``progress`` is on: tokenising
        tens of thousands of requests takes seconds before scoring starts."""
        if not self.progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=f"{self.desc} (tokenizing)", unit="req", leave=False, delay=2.0)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(c, k) for c, k in self._tokenizing(requests)]
        if self.context_tokens is not None:
            pairs = [(c[-self.context_tokens:], k) for c, k in pairs]
        return self.score_tokens(pairs)

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        windows, owner = [], []
        for i, text in enumerate(self._tokenizing(texts)):
            for w in rolling_windows(self.encode(text), self.prefix_token_id, self.max_length):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.score_tokens(windows)):
            totals[i] += ll
        return totals

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``[(sum log P(cont | ctx), cont is the greedy continuation)]`` for token-id pairs."""
        for c, k in pairs:
            if not k:
                raise ValueError("a request has an empty continuation")
            if len(k) > self.max_length:
                raise ValueError(f"a continuation of {len(k)} tokens is longer than max_length={self.max_length}")
        model = self.model
        model.eval()
        device = next(model.parameters()).device
        seqs = [(c + k)[-(self.max_length + 1):][:-1] for c, k in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))
        batches, cur = [], []
        for i in order:  # longest first: a batch's width is its first sequence's length
            if cur and (len(cur) >= self.batch_size or len(seqs[cur[0]]) * (len(cur) + 1) > self.batch_tokens):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        out: list = [None] * len(pairs)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pairs), desc=self.desc, unit="req", leave=False)
        for batch in batches:
            width = len(seqs[batch[0]])
            inp = torch.zeros(len(batch), width, dtype=torch.long)
            for r, i in enumerate(batch):
                inp[r, :len(seqs[i])] = torch.tensor(seqs[i])
            logits = model(input_ids=inp.to(device)).logits
            for r, i in enumerate(batch):
                cont = pairs[i][1]
                n, end = len(cont), len(seqs[i])
                logp = F.log_softmax(logits[r, end - n:end].float(), dim=-1)
                target = torch.tensor(cont, device=logp.device)
                ll = logp.gather(1, target[:, None]).sum().item()
                out[i] = (ll, bool((logp.argmax(-1) == target).all()))
            del logits
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return out
