"""Atomic file writes: a temporary file in the target's folder, then a rename, so a crash never
leaves a half-written file under the final name."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_target(path: str | Path, suffix: str = ".tmp"):
    """Yields a temporary path beside ``path`` (ending in ``suffix``, for writers that go by it) to
    write; renamed onto ``path`` when the block finishes, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_target(path) as tmp:
        Path(tmp).write_text(text)


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch

    with atomic_target(path) as tmp:
        torch.save(obj, tmp)


def atomic_savefig(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically."""
    with atomic_target(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def jsonl_objects(lines, path, error: type[Exception] = ValueError):
    """``(line number, object)`` for each non-blank line of a JSON-lines file; a line that is not
    valid JSON or not a JSON object raises ``error`` naming ``path`` and the line."""
    import json

    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{i}: not valid JSON ({err.msg}); expected one JSON object per line") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{i}: a line holds {type(obj).__name__}, not a JSON object")
        yield i, obj


def finite_or_none(obj):
    """``obj`` with every NaN or infinite float (in nested dicts, lists and tuples) replaced by
    ``None``, so ``json.dumps(..., allow_nan=False)`` writes standard JSON."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def non_finite_paths(obj, prefix: str = "") -> list[str]:
    """Dotted paths of the NaN or infinite floats in nested dicts and lists."""
    import math

    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix or "value"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in non_finite_paths(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in non_finite_paths(v, f"{prefix}[{i}]")]
    return []
