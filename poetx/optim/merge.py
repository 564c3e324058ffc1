"""Merge-then-reinitialize schedule, its ``||Q||`` guard, the optimizer-state restart of the
rotation parameters and the gradient-clipping warm-up that follows a merge."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from poetx.config import POETConfig
from poetx.model.wrap import merge_all_, rotation_norm_max, rotation_parameters
from poetx.optim.state import reset_state_, rewarm_state_

log = logging.getLogger("poetx")


class MergeSchedule:
    """Call :meth:`step` after every optimizer step (and after the LR scheduler's step).

    Every ``config.merge_every`` steps it merges all ``POETLinear`` layers (``W0 <- R W0 P``
    with the exact Cayley rotations, new permutations, skew parameters to zero) and restarts the
    optimizer state of exactly the rotation parameters, in place (state tensors keep their
    storage, so a captured optimizer step stays valid); ordinary parameters keep their state.

    Restart (``config.adam_restart``): ``"rewarm"`` zeroes Adam's first moment, replaces each
    tensor's second moment by its mean and keeps the step count, so the first updates after a
    merge are about ``(1 - beta1)`` of a full one and ramp up over ``~1/(1 - beta1)`` steps;
    the learning rate is not touched, so any LR scheduler (and a tensor ``lr``) composes with
    it. ``"reset"`` zeroes the whole state (what the authors do: Adam's first update then
    moves every skew entry by ``lr``).

    Guard: every ``config.q_norm_check_every`` steps it reads :func:`rotation_norm_max` (one
    device-to-host copy) and merges at once when it exceeds ``config.max_q_norm`` (logged on
    the ``"poetx"`` logger and counted in ``early_merges``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: POETConfig,
        clip_warmup_steps: int = 0,
        clip_warmup_start: float = 0.1,
        merge: Callable[[nn.Module], int] = merge_all_,
    ) -> None:
        if clip_warmup_steps < 0:
            raise ValueError(f"clip_warmup_steps: must be >= 0, got {clip_warmup_steps}")
        if not 0 < clip_warmup_start <= 1:
            raise ValueError(f"clip_warmup_start: must be in (0, 1], got {clip_warmup_start}")
        self.model = model
        self.merge = merge  # merge_all_, or a sharded model's merge (poetx.train.fsdp)
        self.optimizer = optimizer
        self.config = config
        self.clip_warmup_steps = clip_warmup_steps
        self.clip_warmup_start = clip_warmup_start
        self.steps = 0
        self.merges = 0
        self.early_merges = 0
        self.last_merge_step = 0
        self.last_q_norm: float | None = None

    def step(self) -> bool:
        """Count one optimizer step; merge when due (or when the guard fires). Returns whether
        a merge happened."""
        self.steps += 1
        if self.steps % self.config.merge_every == 0:
            self.merge_now()
            return True
        cfg = self.config
        if cfg.max_q_norm > 0 and self.steps % cfg.q_norm_check_every == 0:
            self.last_q_norm = float(rotation_norm_max(self.model))
            if self.last_q_norm > cfg.max_q_norm:
                log.warning("step %d: max block ||Q||_F %.3f > max_q_norm %.3f: merging early",
                            self.steps, self.last_q_norm, cfg.max_q_norm)
                self.early_merges += 1
                self.merge_now()
                return True
        return False

    @torch.no_grad()
    def merge_now(self) -> None:
        self.merge(self.model)
        restart = rewarm_state_ if self.config.adam_restart == "rewarm" else reset_state_
        restart(self.optimizer, rotation_parameters(self.model))
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
        return {"steps": self.steps, "merges": self.merges, "last_merge_step": self.last_merge_step,
                "early_merges": self.early_merges}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.merges = int(state["merges"])
        self.last_merge_step = int(state["last_merge_step"])
        self.early_merges = int(state.get("early_merges", 0))
