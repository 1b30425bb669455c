"""Which checkpoints of a run folder can go, and removing them (``neuro-mar clean``).

A run keeps ``checkpoints/<stage>.pt`` (weights and optimizer state, about 12 bytes per parameter)
so that ``--resume`` continues a stage exactly. What a resume still needs:

- Stage 1's checkpoints (``stage1a/b/c``) are not needed once ``stage1/`` is saved: a resume loads it;
- Stage 2's (``stage2``, ``stage2-<neuron>`` of ablations) are needed while the run is unfinished;
  once ``student/`` and ``report.json`` are written the run is complete and they only let a
  ``--resume`` rebuild the report without training again.
"""
from __future__ import annotations

from pathlib import Path

from ..io_utils import remove_stale_temps

STAGE1_CHECKPOINTS = ("stage1a", "stage1b", "stage1c")


def run_is_complete(out: Path) -> bool:
    """``student/`` and ``report.json`` are written: nothing is left to train."""
    return (out / "student" / "config.json").is_file() and (out / "report.json").is_file()


def removable_checkpoints(out: str | Path, finished_too: bool = True) -> list[Path]:
    """The checkpoint files of run folder ``out`` that a ``--resume`` does not need to continue
    training: Stage 1's once ``stage1/`` is saved and, with ``finished_too``, every one of a
    complete run (:func:`run_is_complete`)."""
    out = Path(out)
    ckpts = out / "checkpoints"
    if not ckpts.is_dir():
        return []
    files = sorted(p for p in ckpts.iterdir() if p.suffix == ".pt" and p.is_file())
    if finished_too and run_is_complete(out):
        return files
    if (out / "stage1" / "config.json").is_file():
        return [p for p in files if p.stem in STAGE1_CHECKPOINTS]
    return []


def clean_run(out: str | Path, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove the checkpoints of ``out`` that :func:`removable_checkpoints` names, and the
    temporaries of writers that were killed; returns ``[(path, bytes)]`` of what was (or, with
    ``dry_run``, would be) removed. The caller holds the run's lock."""
    out = Path(out)
    gone = [(p, p.stat().st_size) for p in removable_checkpoints(out)]
    if not dry_run:
        for p, _ in gone:
            p.unlink(missing_ok=True)
            remove_stale_temps(p)
        ckpts = out / "checkpoints"
        if ckpts.is_dir() and not any(ckpts.iterdir()):
            ckpts.rmdir()
    return gone
