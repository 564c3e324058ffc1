"""A finished or stopped run opened from disk: its model restored from a verified checkpoint
(for ``eval``, ``export`` and ``plot``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poetx.train.checkpoint import (
    checkpoint_vocab_size,
    load_model_state,
    read_state,
    resolve_checkpoint,
)
from poetx.train.config import TrainConfig
from poetx.train.device import resolve_device, resolve_dtype
from poetx.train.run_dir import CHECKPOINT_DIR
from poetx.train.run_model import build_run_model


@dataclass
class LoadedRun:
    """A run's model restored from one of its checkpoints."""

    run_dir: Path
    checkpoint: Path
    config: TrainConfig
    state: dict[str, Any]
    model: nn.Module
    device: torch.device


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None,
                    action: str = "load the run") -> Path:
    """``checkpoint`` if given, else the newest checkpoint of ``run_dir``; verified (errors
    name the file and, for a corrupt newest one, the previous checkpoint to use instead)."""
    run_dir = Path(run_dir)
    if checkpoint is None and not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    return resolve_checkpoint(run_dir / CHECKPOINT_DIR, checkpoint, action)


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
             dtype: str | None = None, action: str = "load the run") -> LoadedRun:
    """Build the run's model and load a verified checkpoint into it (eval mode).

    ``dtype`` defaults to the run's own (bf16 for a GPU run, also on CPU) so that the loaded
    weights are exactly the trained ones.
    """
    path = find_checkpoint(run_dir, checkpoint, action)
    state = read_state(path)
    cfg = TrainConfig.from_dict(state["config"], source=f"{path}/state.json config")
    dev = resolve_device(device)
    saved_dtype = state.get("dtype") or cfg.dtype
    torch_dtype = resolve_dtype(dtype or saved_dtype, dev)
    torch.manual_seed(cfg.seed)
    # A continued-pretraining run takes its vocabulary (and architecture) from init_from.
    vocab = 0 if cfg.init_from is not None else checkpoint_vocab_size(path)
    model = build_run_model(cfg, vocab, dev, torch_dtype)
    load_model_state(path, model)
    model.eval()
    return LoadedRun(Path(run_dir), path, cfg, state, model, dev)
