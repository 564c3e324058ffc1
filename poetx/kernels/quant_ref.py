"""Group-wise int8 / fp8 storage of the frozen weight ``W0`` (plain PyTorch): the one home of the
format, used by the layer (storing), the op (``dense_w0``) and the merge (re-storing).

Format: ``W`` ``(m, n)`` is cut along its input dimension into groups of ``group`` columns, the
last one shorter when ``group`` does not divide ``n``; each row-group has one float32 scale,
``scale`` ``(m, ceil(n / group))``. The group size cannot be recovered from the shapes
(``n = 1376`` with 6 scale columns fits every group size from 230 to 275), so every function
takes it explicitly and the layer passes its configured ``quant_group_size`` everywhere.

Rounding is to nearest. Re-quantizing at every merge would add a fresh rounding error each time
(a random walk: about 0.7 % per merge for int8, 2.6 % for fp8); ``POETLinear`` keeps what the
rounding lost and feeds it back at the next merge.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0

STORAGE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def num_groups(n: int, group: int) -> int:
    """Scale columns of an ``(m, n)`` weight with groups of ``group`` columns."""
    return -(-n // group)


def _grouped(w: Tensor, group: int) -> tuple[Tensor, int]:
    m, n = w.shape
    pad = (-n) % group
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    return wp.reshape(m, -1, group), pad


def quantize(w: Tensor, fmt: str, group: int) -> tuple[Tensor, Tensor]:
    """``(m, n)`` float -> (``(m, n)`` int8 or float8_e4m3fn, ``(m, ceil(n/group))`` float32)."""
    if fmt not in STORAGE_DTYPES:
        raise ValueError(f"quantize: format must be one of {sorted(STORAGE_DTYPES)}, got {fmt!r}")
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
    if scale.shape != (q.shape[0], num_groups(q.shape[1], group)):
        raise ValueError(
            f"dequantize: scale {tuple(scale.shape)} does not fit a {tuple(q.shape)} weight with "
            f"groups of {group} columns (expected {(q.shape[0], num_groups(q.shape[1], group))})"
        )
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    qg, pad = _grouped(q.to(wide), group)
    w = (qg * scale.to(wide)[..., None]).reshape(q.shape[0], -1)
    return (w[:, : q.shape[1]] if pad else w).to(dtype)


def dequantize_reference(q: Tensor, scale: Tensor, group: int) -> Tensor:
    """Column-by-column float64 dequantization (independent of the grouped reshape above)."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for j in range(q.shape[1]):
        out[:, j] = q[:, j].double() * scale[:, j // group].double()
    return out

