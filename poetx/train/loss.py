"""The training objective, kept in one function so a memory-lean variant can replace it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poetx.model.lm_loss import causal_lm_loss


def compute_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a causal LM on ``batch`` ``(B, L + 1)`` (inputs
    ``batch[:, :-1]``, targets ``batch[:, 1:]``), a float32 scalar.

    Goes through the chunked cross-entropy, which never holds the full float32 logits (0.5 GB
    at 1024 tokens and a 128k vocabulary), for both optimizers alike.
    """
    return causal_lm_loss(model, batch)


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
