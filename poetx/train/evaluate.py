"""Validation: the same fixed batches and the same loss for every optimizer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poetx.train.loss import loss_sum
from poetx.train.parallel import DistContext


def evaluate(model: nn.Module, val_batches: list[Tensor], device: torch.device,
             max_batches: int | None = None, ctx: DistContext | None = None,
             micro_batch: int | None = None) -> dict[str, float]:
    """``{"val_loss", "val_ppl"}`` over ``val_batches`` (each ``(B, L + 1)``).

    The model is put in eval mode and back into the mode it was in. ``max_batches`` keeps the
    first batches only (the set is fixed, so runs stay comparable). Under data parallelism each
    rank scores a contiguous share of every batch's rows and the sums are all-reduced, so the
    result is the same token-weighted mean over the same rows (up to summation order);
    ``micro_batch`` caps the rows scored at once.
    """
    ctx = ctx or DistContext()
    batches = val_batches if max_batches is None else val_batches[:max_batches]
    if ctx.distributed:
        batches = [b.tensor_split(ctx.world)[ctx.rank] for b in batches]
        batches = [b for b in batches if len(b)]
    was_training = model.training
    model.eval()
    try:
        total, count = loss_sum(model, batches, device, micro_batch)
    finally:
        model.train(was_training)
    if ctx.distributed:
        both = torch.stack([total.cpu(), torch.tensor(float(count), dtype=torch.float64)])
        both = ctx.all_reduce_sum(both.to(total.device))
        total, count = both[0], int(both[1])
    if count == 0:
        raise ValueError("no validation tokens: the validation set is empty")
    loss = float(total) / count
    # exp overflows past ~709; a diverged run reports inf rather than crashing.
    ppl = math.exp(loss) if loss < 700 else math.inf
    return {"val_loss": loss, "val_ppl": ppl}
