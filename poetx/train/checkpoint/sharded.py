"""Sharded checkpoints of an FSDP2 run through ``torch.distributed.checkpoint`` (DCP).

Every process writes its own shards of the model and optimizer tensors (``sharded/__<rank>_0
.distcp``; tensors every rank holds whole, such as permutations, are written once) and rank 0
the index (``sharded/.metadata``), so no process ever holds the whole state. Names inside
the DCP folder: ``model.<state_dict name>`` and ``optimizer.state.<param index>.<name>``; the
optimizer's groups and non-tensor values go to ``state.json`` as in the one-process format.

Loading reads whatever pieces the destination needs, so a sharded checkpoint resumes on any
number of processes, sharded (the destinations are this rank's shards) or not (whole
tensors: one process, ``ddp``, ``eval``, ``export``), without a process group if there is none.
The folder holds the files of every process: one host, or a filesystem all of them share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from poetx.train.checkpoint.format import SHARDED_DIR, CheckpointError

_MODEL = "model."
_OPTIMIZER = "optimizer."


def save_sharded_tensors(folder: Path, model: nn.Module,
                         optimizer_tensors: dict[str, Tensor]) -> None:
    """Write ``model``'s state dict and ``optimizer_tensors`` (``state.<index>.<name>``, this
    rank's shards) into ``folder/sharded``. A collective: every process calls it."""
    state = {"model": model.state_dict(), "optimizer": optimizer_tensors}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder / SHARDED_DIR))


def sharded_metadata(path: Path) -> dict[str, Any]:
    """``{name: TensorStorageMetadata}`` (``.size``, ``.properties.dtype``) of the sharded
    tensors of checkpoint ``path``; an unreadable index raises ``CheckpointError``."""
    where = Path(path) / SHARDED_DIR
    try:
        return dict(dcp.FileSystemReader(where).read_metadata().state_dict_metadata)
    except Exception as e:  # noqa: BLE001  (DCP raises whatever unpickling or IO raised)
        raise CheckpointError(f"{where}/.metadata cannot be read: {type(e).__name__}: {e}") \
            from None


def model_entries(path: Path) -> dict[str, Any]:
    """The model tensors of a sharded checkpoint: ``{state_dict name: metadata}``."""
    return {k[len(_MODEL):]: v for k, v in sharded_metadata(path).items()
            if k.startswith(_MODEL)}


def optimizer_entries(path: Path) -> dict[str, Any]:
    """The optimizer tensors of a sharded checkpoint: ``{"state.<i>.<name>": metadata}``."""
    return {k[len(_OPTIMIZER):]: v for k, v in sharded_metadata(path).items()
            if k.startswith(_OPTIMIZER)}


def empty_like_entry(entry: Any, like: Tensor) -> Tensor:
    """A destination for one stored tensor: sharded as ``like`` when ``like`` is a DTensor of
    the stored shape (this rank's rows only), else a whole tensor on ``like``'s device."""
    dtype = entry.properties.dtype
    if isinstance(like, DTensor) and tuple(like.shape) == tuple(entry.size):
        local = torch.empty_like(like.to_local(), dtype=dtype)
        return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                                  stride=like.stride())
    device = like.to_local().device if isinstance(like, DTensor) else like.device
    return torch.empty(tuple(entry.size), dtype=dtype, device=device)


def load_sharded(path: Path, model: dict[str, Tensor] | None = None,
                 optimizer: dict[str, Tensor] | None = None) -> None:
    """Fill the destination tensors (``model``: state dict names, ``optimizer``:
    ``state.<i>.<name>``) in place from checkpoint ``path``. A collective when a process
    group exists (every process calls it with its own destinations)."""
    state: dict[str, Any] = {}
    if model:
        state["model"] = model
    if optimizer:
        state["optimizer"] = optimizer
    where = Path(path) / SHARDED_DIR
    try:
        # Without a process group (eval, export, one process) this process reads alone.
        alone = not (dist.is_available() and dist.is_initialized())
        dcp.load(state, storage_reader=dcp.FileSystemReader(where), no_dist=alone)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (DCP wraps per-rank failures in its own types)
        raise CheckpointError(f"{where}: reading the sharded tensors failed: "
                              f"{type(e).__name__}: {e}") from None
