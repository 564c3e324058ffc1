"""Group-wise int8 / fp8 storage of the frozen weight (plain PyTorch).

``W`` ``(m, n)`` is cut along its input dimension into groups of ``group`` columns (the last may be
shorter); each row-group has one float32 scale, ``scale`` ``(m, ceil(n / group))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0

STORAGE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _grouped(w: Tensor, group: int) -> tuple[Tensor, int]:
    m, n = w.shape
    pad = (-n) % group
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    return wp.reshape(m, -1, group), pad


def quantize(w: Tensor, fmt: str, group: int) -> tuple[Tensor, Tensor]:
    """``(m, n)`` float -> (``(m, n)`` int8 or float8_e4m3fn, ``(m, groups)`` float32 scales)."""
    limit = INT8_MAX if fmt == "int8" else FP8_E4M3_MAX
    wg, pad = _grouped(w.float(), group)
    scale = (wg.abs().amax(dim=-1) / limit).clamp_min(1e-12)
    scaled = wg / scale[..., None]
    if fmt == "int8":
        q = scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(w.shape[0], -1)
    return (q[:, : w.shape[1]] if pad else q).contiguous(), scale


def dequantize(q: Tensor, scale: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`quantize` up to rounding: ``(m, n)`` in ``dtype``."""
    qg, pad = _grouped(q.float(), group)
    w = (qg * scale[..., None]).reshape(q.shape[0], -1)
    return (w[:, : q.shape[1]] if pad else w).to(dtype)
