"""The run directory: its layout, which settings and checkpoint a (resumed) run uses, and
claiming the directory for a run.

A run directory holds ``config.json``, ``tokenizer.json``, ``metrics.jsonl``, ``tensorboard/``
and ``checkpoints/step_XXXXXXXX/``. A run killed before its first checkpoint (OOM, power loss,
``kill -9``) leaves a directory without a finished checkpoint: starting again, with or without
``--resume``, starts that run afresh instead of refusing both ways, unless the process that
started it (the ``pid`` of its start event in ``metrics.jsonl``) is still running.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from poetx.train.checkpoint import (
    clean_stale,
    list_checkpoints,
    read_state,
    resolve_resume,
)
from poetx.train.checkpoint.store import pid_alive
from poetx.train.config import (
    TrainConfig,
    build_config,
    load_toml,
    merge_settings,
    resume_config,
)
from poetx.train.metrics import METRICS_FILE, TB_DIR, read_metrics

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.json"


class RunDirError(Exception):
    """The run directory cannot be used; the message says why and what to do."""


def _never_saved(run_dir: Path) -> bool:
    """A run was started here but stopped before its first finished checkpoint."""
    return (run_dir / CONFIG_FILE).is_file() and not list_checkpoints(run_dir / CHECKPOINT_DIR)


def live_owner(run_dir: Path) -> int | None:
    """The pid of another process still training in ``run_dir`` (from the ``pid`` of the last
    start/resume event in its metrics), or None."""
    try:
        records = read_metrics(run_dir / METRICS_FILE)
    except FileNotFoundError:
        return None
    starts = [r for r in records if r.get("type") == "event"
              and r.get("event") in ("start", "resume") and isinstance(r.get("pid"), int)]
    if not starts:
        return None
    pid = starts[-1]["pid"]
    return pid if pid != os.getpid() and pid_alive(pid) else None


def config_from_sources(config_file: str | None, overrides: dict[str, Any],
                        resume: bool | str | None = None) -> tuple[TrainConfig, Path | None]:
    """The run's config and, when resuming, the checkpoint to resume from.

    Fresh run: preset defaults < TOML < flags. Resumed run (``resume`` True for the newest
    checkpoint of ``--out``, or a checkpoint path): the checkpoint's config < TOML < flags. A
    ``--resume`` of a run that never finished a checkpoint restarts it from step 0 with its
    saved ``config.json`` (< TOML < flags).
    """
    if not resume:
        return build_config(config_file, overrides), None
    settings = dict(overrides)
    if config_file is not None:
        settings = merge_settings(load_toml(config_file), overrides)
    requested = resume if isinstance(resume, str) else None
    if requested is None:
        out = settings.get("out") or (
            f"runs/{settings.get('preset', 'tiny')}-{settings.get('optimizer', 'poetx')}"
        )
        settings["out"] = out
        run_dir = Path(out)
        if _never_saved(run_dir):
            saved = json.loads((run_dir / CONFIG_FILE).read_text())
            print(f"note: {run_dir} has no finished checkpoint (the run stopped before its "
                  f"first save): starting it again from step 0", flush=True)
            return resume_config(saved, settings), None
        root = run_dir / CHECKPOINT_DIR
    else:
        root = Path(requested).parent
    ckpt = resolve_resume(root, requested)
    saved = read_state(ckpt)["config"]
    if requested is not None and "out" not in settings:
        settings["out"] = str(Path(requested).parent.parent)
    return resume_config(saved, settings), ckpt


def claim_run_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """The run directory of ``cfg``, refused if it holds another run's checkpoints.

    Temporary folders of saves whose process died are removed first. A directory whose run
    never finished a checkpoint is taken over: its metrics and TensorBoard logs (steps that
    no checkpoint holds) are removed, so the new run has one history. Nothing is created here.
    """
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} exists and is not a directory")
    clean_stale(run_dir / CHECKPOINT_DIR)
    if resuming:
        return run_dir
    finished = [p for _, p in list_checkpoints(run_dir / CHECKPOINT_DIR)]
    if finished:
        raise RunDirError(
            f"{run_dir} already holds a run ({finished[-1].name}); pass --resume to continue "
            f"it, or choose another --out"
        )
    if _never_saved(run_dir):
        owner = live_owner(run_dir)
        if owner is not None:
            raise RunDirError(
                f"{run_dir} is in use by a run that has not saved a checkpoint yet (process "
                f"{owner} is still running); wait for it, stop it, or choose another --out"
            )
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
    return run_dir
