"""Writing checkpoints: atomic folders, keep-last-k pruning, clean-up of dead saves.

A save goes to ``step_X.tmp-<pid>/``; every file is written through :mod:`poetx.atomic`
(fsynced, ordinary umask permissions), the manifest last, then the folder is renamed into
place, so a crash leaves either the old set of checkpoints or the new one, never a half-written
``step_X``. A failed save removes its temporary folder and touches no other checkpoint; one
killed outright leaves a temporary folder that :func:`clean_stale` removes later.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from poetx.atomic import fsync_dir, write_json_atomic, write_with
from poetx.train.checkpoint.format import (
    FORMAT,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    VERSION,
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    manifest_of,
)
from poetx.train.checkpoint.model_state import dedup_tensors
from poetx.train.checkpoint.optimizer_state import optimizer_to_tensors, split_optimizer_state
from poetx.train.checkpoint.rng import capture_rng
from poetx.train.checkpoint.sharded import save_sharded_tensors
from poetx.train.parallel import DistContext

TMP_RE = re.compile(r"^step_\d{8,}\.(tmp|old)-(\d+)$")


def _write_tensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write the checkpoint of ``step`` under ``root`` atomically; returns its folder.

    ``state`` holds the JSON-safe rest (config, data position, schedules). With ``keep_last``,
    older checkpoints beyond the newest ``keep_last`` are deleted, only after this one is in
    place. On any failure the temporary folder is removed and ``CheckpointError`` raised (a
    ``KeyboardInterrupt`` is re-raised after the clean-up).
    """
    final, tmp = _folders(root, step, os.getpid())
    with _cleaned_on_failure(tmp, final):
        _fresh(tmp)
        model_tensors, aliases = dedup_tensors(model.state_dict())
        _write_tensors(tmp / MODEL_FILE, model_tensors,
                       {"format": FORMAT, "aliases": json.dumps(aliases)})
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        _write_tensors(tmp / OPTIMIZER_FILE, opt_tensors, {"format": FORMAT})
        _finish(tmp, final, step, state, opt_meta)
    if keep_last is not None:
        prune_checkpoints(final.parent, keep_last)
    return final


def save_sharded_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    ctx: DistContext,
    keep_last: int | None = None,
) -> Path:
    """:func:`save_checkpoint` for an FSDP2 run, every process calling it: each writes its own
    shards of the model and optimizer tensors (torch.distributed.checkpoint,
    :mod:`poetx.train.checkpoint.sharded`) into the one temporary folder; rank 0 then writes
    the RNG, state and manifest (listing every shard) and moves the folder into place.
    Returns the folder on every rank once it is in place."""
    final, tmp = _folders(root, step, ctx.broadcast(os.getpid()))
    with _cleaned_on_failure(tmp if ctx.is_main else None, final):
        if ctx.is_main:
            _fresh(tmp)
        ctx.barrier()
        opt_tensors, opt_meta = split_optimizer_state(optimizer.state_dict())
        save_sharded_tensors(tmp, model, opt_tensors)
        ctx.barrier()
        if ctx.is_main:
            _finish(tmp, final, step, state, opt_meta)
            if keep_last is not None:
                prune_checkpoints(final.parent, keep_last)
    ctx.barrier()
    return final


def _folders(root: str | Path, step: int, pid: int) -> tuple[Path, Path]:
    """``(final folder, temporary folder of process pid)`` of the checkpoint of ``step``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    return final, root / f"{final.name}.tmp-{pid}"


def _fresh(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


@contextlib.contextmanager
def _cleaned_on_failure(tmp: Path | None, final: Path) -> Iterator[None]:
    """Remove ``tmp`` (when given) if the block fails; errors become ``CheckpointError``."""
    try:
        yield
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, CheckpointError):
            raise CheckpointError(
                f"saving checkpoint {final} failed ({type(e).__name__}: {e}); "
                f"earlier checkpoints are untouched"
            ) from e
        raise


def _finish(tmp: Path, final: Path, step: int, state: dict[str, Any],
            opt_meta: dict[str, Any]) -> None:
    """Write the RNG, state and manifest files into ``tmp`` (the tensors are there), then
    move it to ``final`` (swapping out an existing one)."""
    rng_tensors, rng_meta = capture_rng()
    _write_tensors(tmp / RNG_FILE, rng_tensors, {"format": FORMAT})
    full_state = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        **state,
        "optimizer": opt_meta,
        "rng": rng_meta,
        "versions": {"torch": torch.__version__},
    }
    write_json_atomic(tmp / STATE_FILE, full_state, indent=1)
    write_json_atomic(tmp / MANIFEST_FILE, manifest_of(tmp, step), indent=1)
    root = final.parent
    if final.exists():
        # Re-saving a step (e.g. interrupted again right after resuming): swap, then drop.
        old = root / f"{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoint folders; returns the deleted ones."""
    if keep_last < 1:
        raise ValueError(f"keep_last: must be at least 1, got {keep_last}")
    found = list_checkpoints(root)
    doomed = [p for _, p in found[:-keep_last]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(root: str | Path) -> list[Path]:
    """Remove temporary folders left by saves of processes that no longer run.

    A ``.old-<pid>`` folder whose final name is missing is put back (the swap was interrupted
    between its two renames).
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = TMP_RE.match(p.name)
        if not m:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and pid_alive(pid):
            continue
        final = root / p.name.split(".", 1)[0]
        if m.group(1) == "old" and not final.exists():
            os.rename(p, final)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
