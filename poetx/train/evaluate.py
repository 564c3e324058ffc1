"""Validation: the same fixed batches and the same loss for every optimizer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poetx.train.loss import mean_loss


def evaluate(model: nn.Module, val_batches: list[Tensor], device: torch.device,
             max_batches: int | None = None) -> dict[str, float]:
    """``{"val_loss", "val_ppl"}`` over ``val_batches`` (each ``(B, L + 1)``).

    The model is put in eval mode and back into the mode it was in. ``max_batches`` keeps the
    first batches only (the set is fixed, so runs stay comparable).
    """
    batches = val_batches if max_batches is None else val_batches[:max_batches]
    was_training = model.training
    model.eval()
    try:
        loss = mean_loss(model, batches, device)
    finally:
        model.train(was_training)
    # exp overflows past ~709; a diverged run reports inf rather than crashing.
    ppl = math.exp(loss) if loss < 700 else math.inf
    return {"val_loss": loss, "val_ppl": ppl}
