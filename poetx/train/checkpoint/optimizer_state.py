"""Optimizer state in a checkpoint: tensors in ``optimizer.safetensors`` (or the sharded
folder of an FSDP2 run), the rest in JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from poetx.train.checkpoint.format import (
    OPTIMIZER_FILE,
    SHARDED_DIR,
    CheckpointError,
    is_sharded,
    read_tensors,
)
from poetx.train.checkpoint.sharded import empty_like_entry, load_sharded, optimizer_entries
from poetx.train.fsdp import shard_like


def _json_value(value: Any) -> Any:
    # A learning rate kept as a device tensor (for a captured step) is saved as its number.
    if torch.is_tensor(value):
        return value.item()
    return list(value) if isinstance(value, tuple) else value


def split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors under "state.<param index>.<name>", JSON-safe groups and scalar values)``
    of an optimizer state dict; the tensors as they are (a sharded run's: its shards)."""
    tensors: dict[str, Tensor] = {}
    values: dict[str, Any] = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach()
            else:
                values[f"{idx}.{key}"] = value
    groups = [{k: _json_value(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "values": values}


def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """:func:`split_optimizer_state` of ``optimizer.state_dict()``, the tensors contiguous on
    the CPU (for ``optimizer.safetensors``)."""
    tensors, meta = split_optimizer_state(optimizer.state_dict())
    return {k: v.to("cpu").contiguous() for k, v in tensors.items()}, meta


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """Restore ``optimizer`` from ``optimizer.safetensors`` (or the sharded tensors) and the
    groups in ``state``. Reading a sharded checkpoint is a collective where a process group
    exists."""
    sharded = is_sharded(path)
    where = Path(path) / (SHARDED_DIR if sharded else OPTIMIZER_FILE)
    meta = state["optimizer"]
    groups = meta["param_groups"]
    current = optimizer.param_groups
    if len(groups) != len(current) or any(
        len(g["params"]) != len(c["params"]) or g.get("name") != c.get("name")
        for g, c in zip(groups, current, strict=True)
    ):
        raise CheckpointError(
            f"{where}: optimizer parameter groups differ from this run's "
            f"({[(g.get('name'), len(g['params'])) for g in groups]} vs "
            f"{[(c.get('name'), len(c['params'])) for c in current]})"
        )
    params = [p for g in current for p in g["params"]]
    tensors = (_read_sharded(Path(path), params) if sharded
               else _read_full(where, params))
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, idx, name = key.split(".", 2)
        per_param.setdefault(int(idx), {})[name] = tensor
    for key, value in meta.get("values", {}).items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    restored_groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
                       for g in groups]
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": restored_groups})
    except (ValueError, KeyError, RuntimeError) as e:
        # e.g. an 8-bit state without its codes or scales (LowBitAdamW names which)
        raise CheckpointError(f"{where}: {e}") from None


def _check_shape(where: Path, key: str, shape: tuple, params: list[Tensor]) -> int:
    """The parameter index of state tensor ``key``; Adam moments must have its shape."""
    _, idx, name = key.split(".", 2)
    i = int(idx)
    if i >= len(params):
        raise CheckpointError(f"{where}: optimizer state {key!r} of parameter {i}, this run "
                              f"has {len(params)}")
    if name in ("exp_avg", "exp_avg_sq") and shape != tuple(params[i].shape):
        raise CheckpointError(
            f"{where}: optimizer state {key!r} has shape {shape}, the parameter has "
            f"{tuple(params[i].shape)}"
        )
    return i


def _read_full(fpath: Path, params: list[Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in read_tensors(fpath).items():
        i = _check_shape(fpath, key, tuple(tensor.shape), params)
        if isinstance(params[i], DTensor) and tensor.ndim:  # FSDP2: this rank's rows
            tensor = shard_like(tensor, params[i])
        out[key] = tensor
    return out


def _read_sharded(path: Path, params: list[Tensor]) -> dict[str, Tensor]:
    where = path / SHARDED_DIR
    dest = {}
    for key, entry in optimizer_entries(path).items():
        i = _check_shape(where, key, tuple(entry.size), params)
        dest[key] = empty_like_entry(entry, params[i])
    load_sharded(path, optimizer=dest)
    return dest
