"""Triton kernels of the LM head's cross-entropy (semantics and PyTorch references in
``cross_entropy_ref``).

The chunked loss spent about 16 ms of a Llama-8B 2 x 2048 step (H100) in elementwise passes
over float32 copies of 16-bit logits: the upcast, ``logsumexp``'s max, subtract, exp and sum,
the gather of the targets' logits, and in backward ``sub``, ``exp``, ``scatter_add``, ``mul``
and the downcast. Here each direction reads the 16-bit logits once:

* ``logsumexp_pick``: one program per row streams it in ``BLOCK`` columns, keeping a running
  maximum and a rescaled sum per lane (combined across lanes at the end), and loads the
  target's logit;
* ``cross_entropy_grad_``: one pass over 2-D tiles writes ``(exp(x - lse) - onehot) * weight``
  over the logits themselves, in their dtype (what the head's two backward GEMMs read).

Arithmetic in float32 (float64 for float64 logits, which only the interpreter runs here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from poetx.kernels.cross_entropy_ref import (  # noqa: F401  (the references tested against)
    accumulation_dtype,
    cross_entropy_grad_reference,
    logsumexp_pick_reference,
)

# Columns per step of a row's scan: 16 warps hold 8 floats per thread of each running
# statistic, and a 128k-vocabulary row takes 32 steps.
ROW_BLOCK = 4096
ROW_WARPS = 16
# Tiles of the gradient pass: 8 rows share their log-sum-exp, weight and target loads; 512
# columns give each thread of 8 warps 2 contiguous 16-bit values per row.
GRAD_ROWS = 8
GRAD_COLS = 512
GRAD_WARPS = 8
# A lane's starting maximum: finite, so that exp(running - new) stays defined for lanes that
# only ever load the padding's -inf.
_LOWEST = -3.0e38


def _interpreting() -> bool:
    return not isinstance(_logsumexp_pick_kernel, triton.runtime.JITFunction)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _logsumexp_pick_kernel(X, stride_x, TARGETS, LSE, PICKED, V,
                           BLOCK: tl.constexpr, WIDE: tl.constexpr, LOWEST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = X + row * stride_x
    cols = tl.arange(0, BLOCK)
    running_max = tl.full((BLOCK,), LOWEST, WIDE)
    running_sum = tl.full((BLOCK,), 0.0, WIDE)
    for start in range(0, V, BLOCK):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(WIDE)
        new_max = tl.maximum(running_max, x)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(x - new_max)
        running_max = new_max
    top = tl.reduce(running_max, 0, _maximum)
    total = tl.reduce(running_sum * tl.exp(running_max - top), 0, _add)
    tl.store(LSE + row, top + tl.log(total))
    target = tl.load(TARGETS + row)
    inside = (target >= 0) & (target < V)
    picked = tl.load(base + tl.where(inside, target, 0)).to(WIDE)
    tl.store(PICKED + row, tl.where(inside, picked, 0.0))


@triton.jit
def _cross_entropy_grad_kernel(X, stride_x, LSE, TARGETS, WEIGHTS, N, V, offset,
                               BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                               WIDE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0).to(WIDE)
    weight = tl.load(WEIGHTS + rows, mask=row_ok, other=0.0).to(WIDE)
    local = tl.load(TARGETS + rows, mask=row_ok, other=-1) - offset
    ptrs = X + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
    mask = row_ok[:, None] & (cols < V)[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(WIDE)
    grad = tl.exp(x - lse[:, None])
    grad = tl.where(cols[None, :] == local[:, None], grad - 1.0, grad) * weight[:, None]
    tl.store(ptrs, grad.to(X.dtype.element_ty), mask=mask)


def _check(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be (N, V) with contiguous rows, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits "
                         f"{tuple(logits.shape)}")


def logsumexp_pick(logits: Tensor, targets: Tensor,
                   out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(N, V)`` logits and ``(N,)`` int64 targets -> ``(lse, picked)``, each ``(N,)`` in
    :func:`accumulation_dtype` (written into ``out``, two contiguous such tensors, when given);
    ``picked`` is 0 where the target is outside ``[0, V)``."""
    _check(logits, targets)
    n, vocab = logits.shape
    wide = accumulation_dtype(logits.dtype)
    lse, picked = out if out is not None else (
        torch.empty(n, dtype=wide, device=logits.device) for _ in range(2))
    if n:
        block = min(ROW_BLOCK, max(16, triton.next_power_of_2(vocab)))
        _logsumexp_pick_kernel[(n,)](
            logits, logits.stride(0), targets, lse, picked, vocab,
            BLOCK=block, WIDE=_tl_dtype(wide), LOWEST=_LOWEST,
            num_warps=ROW_WARPS if block == ROW_BLOCK else 4)
    return lse, picked


def cross_entropy_grad_(logits: Tensor, lse: Tensor, targets: Tensor, row_weights: Tensor,
                        offset: int = 0) -> Tensor:
    """Writes :func:`cross_entropy_grad_reference` of the ``(N, V)`` logits (vocabulary
    columns ``offset .. offset + V``) over them and returns them. ``lse`` and ``row_weights``
    are ``(N,)`` (``row_weights``: each row's factor, 0 for ignored tokens)."""
    _check(logits, targets)
    n, vocab = logits.shape
    if n and vocab:
        grid = (triton.cdiv(n, GRAD_ROWS), triton.cdiv(vocab, GRAD_COLS))
        _cross_entropy_grad_kernel[grid](
            logits, logits.stride(0), lse, targets, row_weights, n, vocab, offset,
            BLOCK_R=GRAD_ROWS, BLOCK_V=GRAD_COLS,
            WIDE=_tl_dtype(accumulation_dtype(logits.dtype)), num_warps=GRAD_WARPS)
    return logits
