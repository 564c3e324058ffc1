"""The model's tensors in a checkpoint: tied tensors stored once, strict loading by name."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from poetx.train.checkpoint.format import (
    MODEL_FILE,
    CheckpointError,
    aliases_of,
    open_safetensors,
    short_list,
)
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


def load_model_state(path: str | Path, model: nn.Module) -> None:
    """Copy the checkpoint's ``model.safetensors`` into ``model`` (any device, float dtypes
    converted). Missing / unexpected tensors and shape or kind mismatches raise
    ``CheckpointError`` naming the tensor."""
    fpath = Path(path) / MODEL_FILE
    target = model.state_dict()
    with open_safetensors(fpath) as f:
        aliases = aliases_of(f)
        stored = set(f.keys())
        available = stored | set(aliases)
        missing = sorted(set(target) - available)
        unexpected = sorted(available - set(target))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing tensors {short_list(missing)}")
            if unexpected:
                parts.append(f"unexpected tensors {short_list(unexpected)}")
            raise CheckpointError(
                f"{fpath} does not match the model ({'; '.join(parts)}): was it written for "
                f"another preset, optimizer or POET setting?"
            )
        for name, dest in target.items():
            src_name = aliases.get(name, name)
            shape = tuple(f.get_slice(src_name).get_shape())
            if shape != tuple(dest.shape):
                raise CheckpointError(
                    f"{fpath}: tensor {name!r} has shape {shape}, the model expects "
                    f"{tuple(dest.shape)} (another preset, vocabulary or block size?)"
                )
            src = f.get_tensor(src_name)
            if src.dtype.is_floating_point != dest.dtype.is_floating_point:
                raise CheckpointError(
                    f"{fpath}: tensor {name!r} is {src.dtype}, the model expects {dest.dtype} "
                    f"(another w0_format?)"
                )
            copy_full_into(dest, src.to(dest.dtype))  # a sharded (FSDP2) dest takes its rows


def checkpoint_vocab_size(checkpoint: Path) -> int:
    """Rows of the input embedding stored in a checkpoint (the model's vocabulary)."""
    fpath = Path(checkpoint) / MODEL_FILE
    name = "model.embed_tokens.weight"
    with open_safetensors(fpath) as f:
        key = aliases_of(f).get(name, name)
        if key not in set(f.keys()):
            raise CheckpointError(f"{fpath} has no {name!r}: not a Llama checkpoint of poetx")
        return int(f.get_slice(key).get_shape()[0])
