"""Compute kernels (Triton on CUDA) with plain-PyTorch references beside them.

Nothing here knows about autograd or modules: ``poetx.ops`` wraps these in custom ops.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Triton kernels run for CUDA tensors unless ``POETX_DISABLE_TRITON=1``."""
    if os.environ.get("POETX_DISABLE_TRITON", "0") == "1":
        return False
    return t.is_cuda and triton_importable()
