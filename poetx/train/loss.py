"""The training objective, kept in one function so a memory-lean variant can replace it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def compute_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a causal LM on ``batch``.

    Args:
        model: an HF causal LM (``model(input_ids=...).logits``).
        batch: ``(B, L + 1)`` token ids; inputs are ``batch[:, :-1]``, targets ``batch[:, 1:]``.

    Returns:
        a scalar float32 tensor, the mean over the ``B * L`` predicted tokens.

    The logits ``(B, L, V)`` are upcast to float32 for the softmax (bf16 log-sum-exp over a 32k+
    vocabulary loses precision). This materializes the full logits; a chunked cross-entropy can
    take its place here without touching the loop.
    """
    inputs = batch[:, :-1]
    targets = batch[:, 1:]
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def batch_tokens(batch: Tensor) -> int:
    """Number of predicted tokens in a ``(B, L + 1)`` batch."""
    return batch.shape[0] * (batch.shape[1] - 1)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Tensor], device: torch.device) -> float:
    """Token-weighted mean of ``compute_loss`` over ``batches`` (model left in eval mode)."""
    total = 0.0
    count = 0
    for batch in batches:
        n = batch_tokens(batch)
        total += float(compute_loss(model, batch.to(device, non_blocking=True))) * n
        count += n
    if count == 0:
        raise ValueError("no validation tokens: the validation set is empty")
    return total / count
