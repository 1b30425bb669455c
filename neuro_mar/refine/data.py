"""Training data for refinement: local files, tokenised and packed, with a held-out split.

Sources: ``.txt`` files, ``.jsonl`` (a ``text`` field, or ``--text-field``), ``.parquet`` (a
``text`` column, needs pyarrow), or a folder saved with ``datasets.save_to_disk`` (needs
``datasets``). Without data: the embedded default, text the teacher generates from built-in
prompts (sequence-level distillation), generated once and cached.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from ..io_utils import atomic_torch_save, jsonl_objects
from .sampler import BatchSampler, cache_positions
from .sampler import supports as sampler_supports

#: KV caches of teacher sampling (``teacher_generated_texts``'s ``cache``; ``auto`` picks one)
GEN_CACHES = ("preallocated", "static", "dynamic")

#: Topics and instruction templates of the built-in prompts (every pair is one prompt).
TOPICS = [
    "a lighthouse keeper", "photosynthesis", "the French Revolution", "learning a programming language",
    "the water cycle", "climate and weather", "a detective in Victorian London", "vaccines", "vegetable soup",
    "the colour of the sky", "a medieval farmer", "prime numbers", "job interviews", "black holes",
    "the changing seasons", "travelling in Japan", "how bicycles stay upright", "the rules of chess",
    "regular exercise", "how a bill becomes a law", "the moon", "machine learning", "honey bees",
    "supply and demand", "Gothic cathedrals", "the first moon landing", "the printing press",
    "air pollution in cities", "moving house", "electricity in a home", "the human heart", "volcanoes",
    "the Roman Empire", "coral reefs", "a small bakery", "the history of jazz", "saving money",
    "a mountain village", "the immune system", "ancient Egypt", "renewable energy", "a lost dog",
    "the invention of the telephone", "gardening in spring", "the stock market", "dinosaurs",
    "a long train journey", "the Industrial Revolution", "friendship", "the ocean tides", "a chess tournament",
    "Shakespeare's plays", "the solar system", "bread making", "the Silk Road", "earthquakes",
    "a school science fair", "the internet", "elections", "rainforests", "a birthday party",
]
TEMPLATES = [
    "Write a short story about {t}.", "Explain {t} to a ten-year-old.", "What are the most important facts about {t}?",
    "Write a paragraph for an encyclopedia article on {t}.", "Give three interesting questions about {t} and answer them.",
    "Describe {t} in a few sentences.", "Write a news report about {t}.", "Summarise what historians or scientists say about {t}.",
    "Write a letter to a friend about {t}.", "List the pros and cons of {t}.", "Write a poem about {t}.",
    "Write a dialogue between two people discussing {t}.",
]


def builtin_prompts() -> list[str]:
    """Every topic with every template: the instructions the teacher answers when no data is given."""
    return [tpl.format(t=topic) for tpl in TEMPLATES for topic in TOPICS]


def continuation_prompts(texts: list[str], n: int, seed: int, min_words: int = 8, max_words: int = 40) -> list[str]:
    """``n`` prompts that are the opening words (``min_words`` to ``max_words``) of paragraphs drawn
    at random from ``texts`` (paragraphs of at least 2 x ``max_words`` words; headings skipped)."""
    import random

    rng = random.Random(seed)
    paras = [p.strip() for t in texts for p in t.split("\n") if len(p.split()) >= 2 * max_words
             and not p.strip().startswith("=")]
    if not paras:
        return []
    out = []
    for _ in range(n):
        words = rng.choice(paras).split()
        out.append(" ".join(words[:rng.randint(min_words, max_words)]))
    return out


class DataError(ValueError):
    """Bad training data: the message names the problem and the fix."""


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Texts of a local file or saved dataset folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {p} does not exist (give a .txt, .jsonl, .parquet file or a saved datasets folder)")
    if p.is_dir():
        try:
            import datasets
        except ImportError as err:
            raise DataError(f"{p} is a folder: reading a saved `datasets` folder needs `pip install datasets`") from err
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as err:  # noqa: BLE001 - FileNotFoundError, ValueError, pyarrow errors...
            first = (str(err).strip().splitlines() or [""])[0]
            raise DataError(f"{p} is a folder but not a saved `datasets` folder ({type(err).__name__}: {first}); give "
                            "a .txt, .jsonl or .parquet file, or a folder written by Dataset.save_to_disk") from None
        if hasattr(ds, "keys"):  # a DatasetDict: take its train split (or the first)
            ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
        if text_field not in ds.column_names:
            raise DataError(f"{p}: no column {text_field!r} (columns: {ds.column_names}); pass --text-field")
        texts = _strings(ds[text_field], f"{p}: column {text_field!r}")
    elif p.suffix == ".jsonl":
        texts = []
        for i, obj in jsonl_objects(_text_lines(p), p, DataError):
            if text_field not in obj:
                raise DataError(f"{p}:{i}: no field {text_field!r} (fields: {sorted(obj)}); pass --text-field")
            v = obj[text_field]
            if not isinstance(v, str):
                raise DataError(f"{p}:{i}: field {text_field!r} holds {type(v).__name__} ({v!r:.40}), not text")
            texts.append(v)
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DataError("reading parquet needs `pip install pyarrow`") from err
        try:
            table = pq.read_table(p)
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"{p}: not a readable parquet file ({type(err).__name__}: {err})") from None
        if text_field not in table.column_names:
            raise DataError(f"{p}: no column {text_field!r} (columns: {table.column_names}); pass --text-field")
        texts = _strings(table.column(text_field).to_pylist(), f"{p}: column {text_field!r}")
    else:
        texts = ["".join(_text_lines(p))]
    if not any(t.strip() for t in texts):
        raise DataError(f"data file {p} is empty")
    return texts


def _text_lines(p: Path):
    """The lines of a UTF-8 text file (a leading byte-order mark dropped); a file that is not UTF-8
    text (binary, another encoding) raises :class:`DataError` naming it, rather than training on
    replacement characters."""
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text (byte {err.start}); give a UTF-8 .txt, .jsonl or .parquet "
                        "file") from None
    if "\x00" in text:
        raise DataError(f"{p}:{text[: text.index(chr(0))].count(chr(10)) + 1}: holds NUL bytes: a binary file, "
                        "not text")
    return text.splitlines(keepends=True)


def _strings(values, where: str) -> list[str]:
    """``values`` if every one is a string; a null, number or other value raises
    :class:`DataError` naming ``where`` (training on ``"None"`` or on digits is never meant)."""
    for j, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"{where}: row {j} holds {type(v).__name__} ({v!r:.40}), not text; fix the data or "
                            "pass --text-field for a text column")
    return list(values)


WIKITEXT_MARKERS = (" @-@ ", " @,@ ", " @.@ ")


def looks_like_wikitext(text: str) -> bool:
    """Whether ``text`` carries WikiText's tokenisation (`` @-@ `` number separators and
    `` = Title = `` headings)."""
    head = text[:200_000]
    return any(m in head for m in WIKITEXT_MARKERS) and "\n = " in head


def clean_documents(texts: list[str], detokenize: str = "auto") -> list[str]:
    """Documents ready to tokenise. ``detokenize``: ``"wikitext"`` splits each text into WikiText
    pages (at `` = Title = `` headings) and undoes WikiText's tokenisation with lm-eval's
    detokenizer, so the model trains on text as it is written (`` @-@ ``, spaces before
    punctuation and inside brackets are artifacts no evaluation text has); ``"auto"`` does so for
    texts that look like WikiText (:func:`looks_like_wikitext`); ``"none"`` keeps texts as they are."""
    from ..evaluation.tasks import wikitext_detokenize, wikitext_pages

    if detokenize not in ("auto", "wikitext", "none"):
        raise DataError(f"detokenize must be auto, wikitext or none, got {detokenize!r}")
    out = []
    for t in texts:
        if detokenize == "wikitext" or (detokenize == "auto" and looks_like_wikitext(t)):
            out += [d for d in (wikitext_detokenize(p).strip() for p in wikitext_pages(t)) if d]
        else:
            out.append(t)
    return out


def tokenize_and_pack(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise texts (EOS between documents) and pack into ``[n, seq_len]`` rows (tail dropped)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the data has {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}; "
                        "give more text or a smaller --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_heldout(rows: torch.Tensor, fraction: float = 0.1, min_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last ``fraction`` of rows (at least ``min_rows``) are held out."""
    if rows.shape[0] < 2:
        raise DataError(f"need at least 2 sequences to keep a held-out split, got {rows.shape[0]}; "
                        "give more text or a smaller --seq-len")
    k = min(rows.shape[0] - 1, max(min_rows, int(round(rows.shape[0] * fraction))))
    return rows[:-k], rows[-k:]


@torch.no_grad()
def teacher_generated_texts(teacher, tokenizer, n_tokens: int, cache_dir: Path | None = None, max_new: int = 256,
                            batch: int = 16, seed: int = 0, progress: bool = True, texts: list[str] | None = None,
                            continuation_share: float = 0.75, temperature: float = 1.0, top_p: float = 0.95,
                            top_k: int = 50, cache: str = "auto", bf16: bool = False) -> list[str]:
    """Text sampled from the teacher until about ``n_tokens`` tokens (prompt + sample) exist.

    Prompts: with ``texts`` (the training data), a ``continuation_share`` of them are the opening
    words of random paragraphs, continued as plain text; the rest (all without ``texts``) are the
    built-in instructions (:func:`builtin_prompts`, shuffled), answered through the chat template.
    Each document is the prompt followed by the teacher's sample as plain text, with no template
    or system-prompt boilerplate. Sampling is batched (left padding) at
    ``temperature`` from the ``top_k`` most probable tokens (50, HF's default) cut to the nucleus
    ``top_p``, seeded per batch, so the corpus is deterministic for a
    seed on one device. Cached by teacher, settings and prompts.

    ``cache``: ``"preallocated"`` samples with :class:`~neuro_mar.refine.sampler.BatchSampler`
    (one KV cache allocated for the whole run, the decode step captured in a CUDA graph on a GPU);
    ``"static"`` and ``"dynamic"`` use HF ``generate`` with that KV cache (a static cache recompiles
    the forward for every batch's prompt length); ``"auto"``: preallocated on a GPU for the
    Llama-family teachers it runs (:func:`~neuro_mar.refine.sampler.supports`), else dynamic. ``bf16``: a bf16
    copy of the teacher samples (default off; the teacher itself is left as it is, it serves as the
    fp32 reference of training)."""
    import random

    from ..teachers import cache_root

    if n_tokens <= 0:
        return []
    rng = random.Random(seed)
    instructions = builtin_prompts()
    rng.shuffle(instructions)
    n_docs = max(1, n_tokens // max(16, max_new // 2) + batch)  # an upper bound; generation stops at n_tokens
    n_cont = int(round(n_docs * continuation_share)) if texts else 0
    conts = continuation_prompts(texts, n_cont, seed) if n_cont else []
    prompts = [("text", p) for p in conts] + [("chat", instructions[i % len(instructions)])
                                              for i in range(n_docs - len(conts))]
    rng.shuffle(prompts)
    device = next(teacher.parameters()).device
    if cache == "auto":  # on a CPU the preallocated cache's full-length attention costs more than it saves
        cache = "preallocated" if device.type == "cuda" and sampler_supports(teacher) else "dynamic"
    if cache not in GEN_CACHES:
        raise ValueError(f"cache must be one of {', '.join(GEN_CACHES)} or 'auto', got {cache!r}")
    bf16 = bool(bf16)
    settings = [n_tokens, max_new, seed, temperature, top_p, batch, prompts]
    if cache != "dynamic" or bf16:  # the keys of the corpora cached before these settings existed stay
        settings += [cache, bf16]
    if top_k != 50:
        settings += [["top_k", top_k]]
    key = hashlib.sha256(json.dumps([teacher.config.to_dict().get("_name_or_path", ""), teacher.config.vocab_size,
                                     teacher.config.num_hidden_layers, *settings]).encode()).hexdigest()[:16]
    path = (Path(cache_dir) if cache_dir is not None else cache_root() / "generated") / f"teacher-text-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)["texts"]
    g = torch.Generator().manual_seed(seed)
    out_texts: list[str] = []
    total = 0
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, desc="sampling teacher text", unit="tok")
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    sampler = copy.deepcopy(teacher).to(torch.bfloat16) if bf16 else teacher
    inputs = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                            add_generation_prompt=True)
              if kind == "chat" and tokenizer.chat_template else p for kind, p in prompts]
    engine = None
    if cache == "preallocated":
        ids = [x or [tokenizer.eos_token_id] for x in tokenizer(inputs, add_special_tokens=False).input_ids]
        engine = BatchSampler(sampler, batch=min(batch, len(prompts)), max_len=cache_positions(
            [len(x) for x in ids], max_new))
    i = 0
    while total < n_tokens and i < len(prompts):
        chunk = prompts[i:i + batch]
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        if engine is not None:
            gen = engine.generate(ids[i:i + batch], max_new, eos_id=tokenizer.eos_token_id,
                                  pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            enc = tokenizer(inputs[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = sampler.generate(**enc, max_new_tokens=max_new, do_sample=True, temperature=temperature,
                                   top_p=top_p, top_k=top_k, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, **extra)
            gen = out[:, enc.input_ids.shape[1]:].cpu()
        i += batch
        samples = [t.strip() for t in tokenizer.batch_decode(gen, skip_special_tokens=True)]
        docs = [(p + " " + t) if kind == "text" else (p + "\n\n" + t) for (kind, p), t in zip(chunk, samples)]
        out_texts += docs
        total += sum(len(x) for x in tokenizer(docs, add_special_tokens=False).input_ids)
        if bar is not None:
            bar.update(min(bar.total - bar.n, total - bar.n))
    if bar is not None:
        bar.close()
    del sampler, engine
    atomic_torch_save({"texts": out_texts, "prompts": [p for _, p in prompts[:i]]}, path)
    return out_texts
