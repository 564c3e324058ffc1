"""Which checkpoint a resumed run, ``eval`` or ``export`` uses, verified before use.

A corrupt newest checkpoint is an error, never silently skipped (it may hide a disk problem,
and falling back silently repeats work); the error says how to use the previous one instead.
"""

from __future__ import annotations

from pathlib import Path

from poetx.train.checkpoint.format import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)


def _verified(path: Path, root: Path, requested: bool, how_to_pick: str, action: str) -> Path:
    """``path`` after ``verify_checkpoint``; the error names an older checkpoint to use."""
    what = "checkpoint" if requested else "newest checkpoint"
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        older = [p for _, p in list_checkpoints(root) if p != path]
        hint = ""
        if older and not requested:
            hint = f"; {how_to_pick.format(name=older[-1].name, path=older[-1])}"
        raise CheckpointError(f"cannot {action}: {what} {path} is unusable: {e}{hint}") from None
    return path


def resolve_resume(root: str | Path, requested: str | Path | None = None) -> Path:
    """The checkpoint folder to resume from: ``requested``, else the newest under ``root``."""
    root = Path(root)
    path = Path(requested) if requested is not None else latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"no checkpoint to resume from in {root}")
    return _verified(path, root, requested is not None,
                     "move it aside to resume from {name}, or pass --resume {path}", "resume")


def resolve_checkpoint(root: str | Path, requested: str | Path | None = None,
                       action: str = "load the run") -> Path:
    """The checkpoint ``eval`` / ``export`` read: ``requested``, else the newest under
    ``root``; a corrupt newest one names the previous one to pass as ``--checkpoint``."""
    root = Path(root)
    path = Path(requested) if requested is not None else latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"no checkpoint in {root}")
    return _verified(path, root, requested is not None,
                     "pass --checkpoint {path} to use the previous one", action)
