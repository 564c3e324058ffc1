"""Random generator states of a checkpoint: torch CPU / CUDA, numpy, python."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from poetx.train.checkpoint.format import RNG_FILE, read_tensors


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors for rng.safetensors, JSON-safe rest for state.json)`` of every generator."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(n_cuda):
        tensors[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "cuda_devices": n_cuda,
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def restore_rng(path: str | Path, state: dict[str, Any]) -> None:
    """Put back the torch / CUDA / numpy / python generators saved with the checkpoint."""
    tensors = read_tensors(Path(path) / RNG_FILE)
    meta = state["rng"]
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(min(meta["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"torch_cuda_{i}"], i)
    np_meta = meta["numpy"]
    np.random.set_state((np_meta["kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                         np_meta["pos"], np_meta["has_gauss"], np_meta["cached_gaussian"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
