"""The model's tensors in a checkpoint: tied tensors stored once, strict loading by name
(from ``model.safetensors`` or a sharded checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from poetx.layers.framed_mlp import refresh_mlp_frames
from poetx.train.checkpoint.format import (
    MODEL_FILE,
    SHARDED_DIR,
    CheckpointError,
    aliases_of,
    is_sharded,
    open_safetensors,
    read_tensors,
    short_list,
)
from poetx.train.checkpoint.sharded import load_sharded, model_entries
from poetx.train.fsdp import copy_full_into


def dedup_tensors(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Split ``state`` into tensors to store and ``alias -> stored name`` for shared ones.

    safetensors refuses two names on one storage (tied embeddings). Names that are the very
    same view of a storage become aliases of the first name; a partial overlap is copied.
    """
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} is on the meta device and cannot be saved")
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in views:
            aliases[name] = views[key]
            continue
        if t.numel() > 0:
            views[key] = name
            if ptr in storages:
                t = t.clone()  # another view of a stored storage: store this one separately
            storages.add(ptr)
        stored[name] = t.detach().to("cpu").contiguous()
    return stored, aliases


def _check_names(where: Path, target: dict[str, Tensor], available: set[str]) -> None:
    """Raise unless ``available`` holds every tensor of ``target`` and nothing else."""
    missing = sorted(set(target) - available)
    unexpected = sorted(available - set(target))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {short_list(unexpected)}")
        raise CheckpointError(
            f"{where} does not match the model ({'; '.join(parts)}): was it written for "
            f"another preset, optimizer or POET setting?"
        )


def _check_tensor(where: Path, name: str, shape: tuple, dtype: torch.dtype, dest: Tensor) -> None:
    if shape != tuple(dest.shape):
        raise CheckpointError(
            f"{where}: tensor {name!r} has shape {shape}, the model expects "
            f"{tuple(dest.shape)} (another preset, vocabulary or block size?)"
        )
    if dtype.is_floating_point != dest.dtype.is_floating_point:
        raise CheckpointError(
            f"{where}: tensor {name!r} is {dtype}, the model expects {dest.dtype} "
            f"(another w0_format?)"
        )


def load_model_state(path: str | Path, model: nn.Module) -> None:
    """Copy the checkpoint's model tensors into ``model`` (any device, float dtypes
    converted; a sharded (FSDP2) ``model`` takes its own rows). Missing / unexpected tensors
    and shape or kind mismatches raise ``CheckpointError`` naming the tensor. A sharded
    checkpoint (``sharded/``) is read through torch.distributed.checkpoint: a collective
    where a process group exists."""
    if is_sharded(path):
        _load_sharded_model(Path(path), model)
    else:
        _load_model_file(Path(path) / MODEL_FILE, model)
    # tensors derived from the loaded permutations (not in checkpoints)
    refresh_mlp_frames(model)


def _load_model_file(fpath: Path, model: nn.Module) -> None:
    target = model.state_dict()
    with open_safetensors(fpath) as f:
        aliases = aliases_of(f)
        available = set(f.keys()) | set(aliases)
        _check_names(fpath, target, available)
        for name, dest in target.items():
            src_name = aliases.get(name, name)
            shape = tuple(f.get_slice(src_name).get_shape())
            src = f.get_tensor(src_name)
            _check_tensor(fpath, name, shape, src.dtype, dest)
            copy_full_into(dest, src.to(dest.dtype))  # a sharded (FSDP2) dest takes its rows


def _load_sharded_model(path: Path, model: nn.Module) -> None:
    where = path / SHARDED_DIR
    entries = model_entries(path)
    target = model.state_dict()
    _check_names(where, target, set(entries))
    for name, dest in target.items():
        entry = entries[name]
        _check_tensor(where, name, tuple(entry.size), entry.properties.dtype, dest)
    # The state dict's tensors are the model's own (views of parameters and buffers, FSDP2
    # shards included): DCP copies into them in place.
    load_sharded(path, model=target)


def checkpoint_vocab_size(checkpoint: Path) -> int:
    """Rows of the input embedding stored in a checkpoint (the model's vocabulary)."""
    name = "model.embed_tokens.weight"
    if is_sharded(checkpoint):
        entry = model_entries(Path(checkpoint)).get(name)
        if entry is None:
            raise CheckpointError(f"{Path(checkpoint) / SHARDED_DIR} has no {name!r}: not a "
                                  f"Llama checkpoint of poetx")
        return int(entry.size[0])
    fpath = Path(checkpoint) / MODEL_FILE
    with open_safetensors(fpath) as f:
        key = aliases_of(f).get(name, name)
        if key not in set(f.keys()):
            raise CheckpointError(f"{fpath} has no {name!r}: not a Llama checkpoint of poetx")
        return int(f.get_slice(key).get_shape()[0])


def model_tensor_names(checkpoint: Path) -> list[str]:
    """Names of the model tensors stored in a checkpoint (either layout; no aliases)."""
    if is_sharded(checkpoint):
        return list(model_entries(Path(checkpoint)))
    with open_safetensors(Path(checkpoint) / MODEL_FILE) as f:
        return list(f.keys())


def read_model_tensors(checkpoint: Path, names: list[str]) -> dict[str, Tensor]:
    """The whole model tensors ``names`` of a checkpoint (either layout), on the CPU; a
    sharded checkpoint is read without a process group (only the pieces of these tensors)."""
    if not is_sharded(checkpoint):
        return read_tensors(Path(checkpoint) / MODEL_FILE, names)
    entries = model_entries(Path(checkpoint))
    absent = [n for n in names if n not in entries]
    if absent:
        raise CheckpointError(f"{Path(checkpoint) / SHARDED_DIR} has no tensor "
                              f"{short_list(absent)}")
    dest = {n: torch.empty(tuple(entries[n].size), dtype=entries[n].properties.dtype)
            for n in names}
    load_sharded(Path(checkpoint), model=dest)
    return dest
