"""The device and dtype of a run from its settings (``"auto"`` resolved)."""

from __future__ import annotations

import torch

from poetx.model.llama import default_dtype

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available on this machine")
    if (device.type == "cuda" and device.index is not None
            and device.index >= torch.cuda.device_count()):
        raise ValueError(
            f"device: {name!r} requested but only {torch.cuda.device_count()} CUDA "
            f"device(s) exist"
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bf16 on CUDA and float32 elsewhere."""
    return default_dtype(device) if name == "auto" else _DTYPES[name]
