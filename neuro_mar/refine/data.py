"""Training data for refinement: local files, tokenised and packed, with a held-out split.

Sources: ``.txt`` files, ``.jsonl`` (a ``text`` field, or ``--text-field``), ``.parquet`` (a
``text`` column, needs pyarrow), or a folder saved with ``datasets.save_to_disk`` (needs
``datasets``). Without data: the embedded default, text the teacher generates from built-in
prompts (sequence-level distillation), generated once and cached.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..io_utils import atomic_torch_save

#: Diverse built-in prompts for the teacher-generated default data.
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "What are the main causes of the French Revolution?",
    "Give three tips for learning a new programming language.",
    "Describe the water cycle in a few sentences.",
    "Write a polite email asking a colleague to review a document.",
    "What is the difference between weather and climate?",
    "Summarise the plot of a detective novel set in Victorian London.",
    "How do vaccines help the immune system?",
    "Write a recipe for a simple vegetable soup.",
    "Why is the sky blue?",
    "Describe a day in the life of a medieval farmer.",
    "What are prime numbers and why are they important?",
    "Give advice to someone preparing for a job interview.",
    "Explain what a black hole is.",
    "Write a poem about the changing seasons.",
    "What should a traveller know before visiting Japan?",
    "How does a bicycle stay upright when it moves?",
    "Explain the rules of chess briefly.",
    "What are the benefits of regular exercise?",
    "Describe how a bill becomes a law.",
    "Write a dialogue between a teacher and a curious student about the moon.",
    "What is machine learning, in simple terms?",
    "How do bees make honey?",
    "Explain supply and demand with an example.",
    "Describe the architecture of a Gothic cathedral.",
    "What happened during the first moon landing?",
    "Give a short history of the printing press.",
    "How can cities reduce air pollution?",
    "Write a thank-you note to a neighbour who helped you move.",
    "Explain how electricity reaches a house.",
    "What is the role of the heart in the human body?",
]


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
        ds = datasets.load_from_disk(str(p))
        if hasattr(ds, "keys"):  # a DatasetDict: take its train split (or the first)
            ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
        if text_field not in ds.column_names:
            raise DataError(f"{p}: no column {text_field!r} (columns: {ds.column_names}); pass --text-field")
        texts = list(ds[text_field])
    elif p.suffix == ".jsonl":
        texts = []
        with open(p) as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{p}:{i}: not valid JSON ({err.msg})") from None
                if text_field not in obj:
                    raise DataError(f"{p}:{i}: no field {text_field!r} (fields: {sorted(obj)}); pass --text-field")
                texts.append(str(obj[text_field]))
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DataError("reading parquet needs `pip install pyarrow`") from err
        table = pq.read_table(p)
        if text_field not in table.column_names:
            raise DataError(f"{p}: no column {text_field!r} (columns: {table.column_names}); pass --text-field")
        texts = [str(t) for t in table.column(text_field).to_pylist()]
    else:
        texts = [p.read_text(errors="replace")]
    if not any(t.strip() for t in texts):
        raise DataError(f"data file {p} is empty")
    return texts


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
def teacher_generated_texts(teacher, tokenizer, n_tokens: int, cache_dir: Path | None = None, max_new: int = 128,
                            batch: int = 16, seed: int = 0, progress: bool = True) -> list[str]:
    """The embedded default data: the teacher answers the built-in prompts (sampled, temperature
    0.8) until about ``n_tokens`` tokens exist. Cached by teacher, size and seed."""
    from ..teachers import cache_root

    key = hashlib.sha256(json.dumps([teacher.config.to_dict().get("_name_or_path", ""), teacher.config.vocab_size,
                                     teacher.config.num_hidden_layers, n_tokens, max_new, seed]).encode()).hexdigest()[:16]
    path = (cache_dir or cache_root() / "generated") / f"teacher-text-{key}.pt"
    if path.is_file():
        return torch.load(path)["texts"]
    g = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    total = 0
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, desc="generating default data with the teacher", unit="tok")
    i = 0
    while total < n_tokens:
        prompts = [PROMPTS[(i + j) % len(PROMPTS)] for j in range(batch)]
        i += batch
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) if tokenizer.chat_template else p
                 for p in prompts]
        enc = tokenizer(chats, return_tensors="pt", padding=True)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        out = teacher.generate(**enc.to(teacher.device), max_new_tokens=max_new, do_sample=True, temperature=0.8,
                               top_p=0.95, pad_token_id=tokenizer.pad_token_id)
        for row_in, row in zip(enc.input_ids, out):
            gen = row[row_in.shape[0]:]
            text = tokenizer.decode(row, skip_special_tokens=True)
            texts.append(text)
            total += int((gen != tokenizer.pad_token_id).sum()) + int((row_in != tokenizer.pad_token_id).sum())
        if bar is not None:
            bar.update(min(bar.total - bar.n, total - bar.n))
    if bar is not None:
        bar.close()
    atomic_torch_save({"texts": texts, "prompts": PROMPTS}, path)
    return texts
