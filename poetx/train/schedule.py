"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (``torch`` LambdaLR)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    ``(step + 1) / warmup`` during warm-up, then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi t)) / 2`` with ``t`` going from 0 to 1 over the
    remaining steps (the authors' "cosine to 1%").
    A plain object (not a lambda) so that the schedule's ``state_dict`` is JSON-safe.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float) -> LambdaLR:
    """One shared multiplier for every parameter group (poet and ordinary alike)."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))


def scheduler_state(scheduler: LambdaLR) -> dict[str, Any]:
    """JSON-safe state of the scheduler (the multiplier is rebuilt from the config)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)
    # Learning rates kept as device tensors (a captured step reads them) are saved as numbers.
    state = {k: ([x.item() if torch.is_tensor(x) else x for x in v] if isinstance(v, list) else v)
             for k, v in state.items()}
    return {k: v for k, v in state.items() if isinstance(v, int | float | bool | str | list)}


def load_scheduler_state(scheduler: LambdaLR, state: dict[str, Any]) -> None:
    full = scheduler.state_dict()
    full.update(state)
    # The multiplier's own settings come from the (possibly changed) config, not the file.
    full["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(full)
