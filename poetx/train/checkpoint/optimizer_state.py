"""Optimizer state in a checkpoint: tensors in ``optimizer.safetensors``, the rest in JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from poetx.train.checkpoint.format import OPTIMIZER_FILE, CheckpointError, read_tensors
from poetx.train.fsdp import shard_like


def _json_value(value: Any) -> Any:
    # A learning rate kept as a device tensor (for a captured step) is saved as its number.
    if torch.is_tensor(value):
        return value.item()
    return list(value) if isinstance(value, tuple) else value


def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer, sd: dict[str, Any] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors under "state.<param index>.<name>", JSON-safe groups and scalar values)``
    of ``optimizer.state_dict()`` (or of ``sd``, a state dict of it gathered whole)."""
    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, Tensor] = {}
    values: dict[str, Any] = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                values[f"{idx}.{key}"] = value
    groups = [{k: _json_value(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "values": values}


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """Restore ``optimizer`` from ``optimizer.safetensors`` and the groups in ``state``."""
    fpath = Path(path) / OPTIMIZER_FILE
    meta = state["optimizer"]
    groups = meta["param_groups"]
    current = optimizer.param_groups
    if len(groups) != len(current) or any(
        len(g["params"]) != len(c["params"]) or g.get("name") != c.get("name")
        for g, c in zip(groups, current, strict=True)
    ):
        raise CheckpointError(
            f"{fpath}: optimizer parameter groups differ from this run's "
            f"({[(g.get('name'), len(g['params'])) for g in groups]} vs "
            f"{[(c.get('name'), len(c['params'])) for c in current]})"
        )
    params = [p for g in current for p in g["params"]]
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in read_tensors(fpath).items():
        _, idx, name = key.split(".", 2)
        i = int(idx)
        if name in ("exp_avg", "exp_avg_sq") and tuple(tensor.shape) != tuple(params[i].shape):
            raise CheckpointError(
                f"{fpath}: optimizer state {key!r} has shape {tuple(tensor.shape)}, the "
                f"parameter has {tuple(params[i].shape)}"
            )
        if isinstance(params[i], DTensor) and tensor.ndim:  # FSDP2: this rank's rows
            tensor = shard_like(tensor, params[i])
        per_param.setdefault(i, {})[name] = tensor
    for key, value in meta.get("values", {}).items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    restored_groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
                       for g in groups]
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": restored_groups})
    except (ValueError, KeyError, RuntimeError) as e:
        # e.g. an 8-bit state without its codes or scales (LowBitAdamW names which)
        raise CheckpointError(f"{fpath}: {e}") from None
