"""The training objective, kept in one function so a memory-lean variant can replace it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poetx.model.causal_lm import CausalLMWithLoss


def compute_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy on ``batch`` ``(B, L + 1)`` (inputs ``batch[:, :-1]``,
    targets ``batch[:, 1:]``), a float32 scalar that stays on the device.

    ``model`` is a :class:`CausalLMWithLoss` or a wrapper of one (DDP): the loss is computed in
    its forward, through the chunked cross-entropy that never holds the full float32 logits
    (0.5 GB at 1024 tokens and a 128k vocabulary), for both optimizers alike.
    """
    return model(batch[:, :-1], batch[:, 1:])


def batch_tokens(batch: Tensor) -> int:
    """Number of predicted tokens in a ``(..., L + 1)`` batch (every leading dim counts)."""
    return batch[..., 1:].numel()


@torch.no_grad()
def loss_sum(model: nn.Module, batches: list[Tensor], device: torch.device,
             micro_batch: int | None = None) -> tuple[Tensor, int]:
    """``(sum of loss x tokens, tokens)`` over ``batches`` of a causal LM ``model``.

    The sum stays on the device (one read at the end, and ranks can all-reduce it); each
    batch runs in pieces of at most ``micro_batch`` rows.
    """
    # An FSDP2-sharded CausalLMWithLoss must be called itself (its hooks gather the root).
    scored = model if isinstance(model, CausalLMWithLoss) else CausalLMWithLoss(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for batch in batches:
        pieces = batch.split(micro_batch) if micro_batch else (batch,)
        for piece in pieces:
            n = batch_tokens(piece)
            total += compute_loss(scored, piece.to(device, non_blocking=True)).double() * n
            count += n
    return total, count


def mean_loss(model: nn.Module, batches: list[Tensor], device: torch.device) -> float:
    """Token-weighted mean of ``compute_loss`` over ``batches`` of a causal LM ``model``."""
    total, count = loss_sum(model, batches, device)
    if count == 0:
        raise ValueError("no validation tokens: the validation set is empty")
    return float(total) / count
