"""Atomic file writes: a temporary file in the target's folder, then a rename, so a crash never
leaves a half-written file under the final name.

Temporaries are named ``.NAME.PID.RANDOM[SUFFIX]`` after the target and the writing process; a
writer killed before its rename (SIGKILL, power loss) leaves one behind, and the next write of the
same target removes those whose process no longer runs (:func:`remove_stale_temps`)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # another user's process (or a number no process can have)
    return True


def temp_prefix(path: Path) -> str:
    """The name prefix of this process's temporaries for ``path``."""
    return f".{path.name}.{os.getpid()}."


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporaries (files or folders) of ``path`` left by writers that no longer run;
    returns what was removed. Those of running processes, this one included, are kept."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\..+")
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        removed.append(_remove(p))
    return removed


def _remove(p: Path) -> Path:
    """Remove the file or folder ``p`` (a symlink itself, never what it points to); returns it."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
    return p


def remove_own_temps(path: str | Path) -> list[Path]:
    """Remove this process's temporaries (files or folders) of ``path``: the clean-up of a write
    that failed before or at its rename, whoever made the temporary (:func:`make_temp`)."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = temp_prefix(path)
    for p in path.parent.iterdir():
        if p.name.startswith(prefix):
            removed.append(_remove(p))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp(path: str | Path, suffix: str = "", folder: bool = False) -> Path:
    """A new temporary file (or folder) beside ``path`` for a write that ends in a rename onto it;
    stale temporaries of ``path`` are removed first. Its permissions are those of a file any tool
    creates (0666 / 0777 less the umask), not the owner-only ones of :mod:`tempfile`, so results
    are readable by colleagues on a shared machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path), suffix=suffix))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=suffix)
    try:
        os.close(fd)
        os.chmod(name, 0o666 & ~_umask())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


@contextlib.contextmanager
def atomic_target(path: str | Path, suffix: str = ".tmp"):
    """Yields a temporary path beside ``path`` (ending in ``suffix``, for writers that go by it) to
    write; renamed onto ``path`` when the block finishes, removed when the block or the rename
    raises (e.g. ``path`` is a folder)."""
    path = Path(path)
    tmp = str(make_temp(path, suffix))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone after a rename; the temporary after any failure


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
