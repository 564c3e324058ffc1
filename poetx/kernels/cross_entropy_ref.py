"""Plain-PyTorch references of the cross-entropy kernels (``cross_entropy``).

The loss of a causal LM head reads its logits twice: forward needs each row's log-sum-exp and
the target's logit, backward each logit's gradient
``(softmax(x) - onehot(target)) * weight`` (``weight``: the row's share of the mean loss, 0
for ignored tokens). Logits may be a chunk of the vocabulary: ``offset`` is the vocabulary
index of its first column, and a target outside the chunk contributes no ``-1``.

Statistics accumulate in float32 (float64 for float64 logits).
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logsumexp_pick_reference(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, V)`` logits, ``(N,)`` targets -> ``(lse, picked)``, each ``(N,)`` in the
    accumulation dtype; ``picked`` is the target's logit, 0 where the target lies outside
    ``[0, V)`` (ignored tokens)."""
    wide = logits.to(accumulation_dtype(logits.dtype))
    inside = (targets >= 0) & (targets < logits.shape[1])
    picked = wide.gather(1, targets.clamp(0, logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.logsumexp(wide, dim=1), torch.where(inside, picked, 0)


def cross_entropy_grad_reference(logits: Tensor, lse: Tensor, targets: Tensor,
                                 row_weights: Tensor, offset: int = 0) -> Tensor:
    """``(N, V)`` gradient of ``sum_i row_weights[i] * CE_i`` with respect to ``logits``
    (the columns ``offset .. offset + V`` of the vocabulary), in the logits' dtype."""
    if logits.shape[1] == 0:
        return logits.clone()
    wide = logits.to(accumulation_dtype(logits.dtype))
    grad = (wide - lse.to(wide.dtype).unsqueeze(1)).exp()
    local = targets - offset
    inside = (local >= 0) & (local < logits.shape[1])
    # A masked scatter, not boolean indexing: that would wait for the device to count the
    # selected rows (this path also runs on CUDA for float64 or with Triton disabled).
    grad.scatter_add_(1, local.clamp(0, logits.shape[1] - 1).unsqueeze(1),
                      -inside.to(grad.dtype).unsqueeze(1))
    return (grad * row_weights.to(wide.dtype).unsqueeze(1)).to(logits.dtype)
