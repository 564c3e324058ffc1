"""Merge-then-reinitialize schedule and the gradient-clipping warm-up that follows a merge."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from poetx.config import POETConfig
from poetx.model.wrap import merge_all_, rotation_parameters
from poetx.optim.state import reset_state_


class MergeSchedule:
    """Call :meth:`step` after every optimizer step.

    Every ``config.merge_every`` steps it merges all ``POETLinear`` layers (``W0 <- R W0 P``,
    new permutations, skew parameters to zero) and zeroes, in place, the optimizer state of exactly
    the rotation parameters, so Adam restarts on them; ordinary parameters keep their state.

    Clip warm-up (as the authors do): :meth:`clip_value` ramps the clipping threshold linearly
    from ``clip_warmup_start * max_norm`` to ``max_norm`` over ``clip_warmup_steps`` steps after
    each merge; ``clip_warmup_steps = 0`` disables it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: POETConfig,
        clip_warmup_steps: int = 0,
        clip_warmup_start: float = 0.1,
    ) -> None:
        if clip_warmup_steps < 0:
            raise ValueError(f"clip_warmup_steps: must be >= 0, got {clip_warmup_steps}")
        if not 0 < clip_warmup_start <= 1:
            raise ValueError(f"clip_warmup_start: must be in (0, 1], got {clip_warmup_start}")
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.clip_warmup_steps = clip_warmup_steps
        self.clip_warmup_start = clip_warmup_start
        self.steps = 0
        self.merges = 0
        self.last_merge_step = 0

    def step(self) -> bool:
        """Count one optimizer step; merge when due. Returns whether a merge happened."""
        self.steps += 1
        if self.steps % self.config.merge_every != 0:
            return False
        self.merge_now()
        return True

    @torch.no_grad()
    def merge_now(self) -> None:
        merge_all_(self.model)
        reset_state_(self.optimizer, rotation_parameters(self.model))
        self.merges += 1
        self.last_merge_step = self.steps

    def clip_value(self, max_norm: float) -> float:
        """The clipping threshold for the coming step (``max_norm`` outside a warm-up)."""
        since = self.steps - self.last_merge_step
        if self.merges == 0 or self.clip_warmup_steps == 0 or since >= self.clip_warmup_steps:
            return max_norm
        ramp = since / self.clip_warmup_steps
        frac = self.clip_warmup_start + (1 - self.clip_warmup_start) * ramp
        return max_norm * frac

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "merges": self.merges, "last_merge_step": self.last_merge_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.merges = int(state["merges"])
        self.last_merge_step = int(state["last_merge_step"])
