"""``POETAdamW``: the one-object form of ``make_optimizer`` + ``MergeSchedule``.

Existing training scripts (a plain loop, Hugging Face ``Trainer``, ``accelerate``) know one
object, the optimizer. This class *is* a ``torch.optim.AdamW`` (the parameter groups of
``make_optimizer``, so any ``torch.optim.lr_scheduler`` edits them as usual) whose ``step()``
also advances a ``MergeSchedule``: every ``merge_every`` steps it merges the rotations into
``W0`` and clears the rotation parameters' Adam state. Nothing of the grouping or merging is
re-implemented here; the explicit pair stays available for people who want control.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from poetx.config import POETConfig
from poetx.model.wrap import poet_layers
from poetx.optim.merge import MergeSchedule
from poetx.optim.optimizer import make_optimizer

SCHEDULE_KEY = "poetx_merge_schedule"


def model_poet_config(model: nn.Module) -> POETConfig:
    """The ``POETConfig`` that ``wrap`` gave the layers of ``model`` (one for all of them)."""
    configs = [layer.config for _, layer in poet_layers(model)]
    if not configs:
        raise ValueError("POETAdamW: the model has no POETLinear layer; call poetx.wrap(model) "
                         "first (or use torch.optim.AdamW for a dense model)")
    return configs[0]


class POETAdamW(torch.optim.AdamW):
    """AdamW over a wrapped model that merges on schedule inside :meth:`step`.

    Args:
        model: a model wrapped by ``poetx.wrap`` (or built by ``build_poet_model``). Under
            ``Trainer(optimizer_cls_and_kwargs=(POETAdamW, {"model": model, ...}))`` the model
            arrives here too (``Trainer`` passes a ``model`` kwarg in place of its groups).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``, for the ordinary parameters
            (``weight_decay`` applies to matrices only, never to norms and biases); ``betas``
            and ``eps`` left ``None`` take ``make_optimizer``'s defaults.
        poet_lr: learning rate of the rotation (skew) parameters; or ``poet_lr_scale`` times
            ``lr``; neither given: ``lr``.
        poet_weight_decay: decay of the rotation parameters (pulls them to the identity).
        merge_every: merge period ``T``; default the model's ``POETConfig.merge_every``.
        max_grad_norm: when set, :meth:`step` clips the gradient norm of all parameters to it
            first (with the clip warm-up after merges); leave ``None`` when the script clips.
        clip_warmup_steps, clip_warmup_start: the clipping threshold ramps from
            ``clip_warmup_start * max_grad_norm`` back to ``max_grad_norm`` over that many
            steps after each merge (as the authors do); needs ``max_grad_norm``.
        fused: as ``make_optimizer`` (default: fused on CUDA, foreach elsewhere).

    ``state_dict()`` holds the merge schedule next to AdamW's state, so a checkpoint that a
    framework saves through the optimizer (``Trainer``, ``accelerate``) resumes it exactly;
    the layers' permutations and merge counters are buffers of the model's ``state_dict``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float = 0.0,
        *,
        poet_lr: float | None = None,
        poet_lr_scale: float | None = None,
        poet_weight_decay: float = 0.0,
        merge_every: int | None = None,
        max_grad_norm: float | None = None,
        clip_warmup_steps: int = 0,
        clip_warmup_start: float = 0.1,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"POETAdamW: the first argument must be the wrapped model (nn.Module), got "
                f"{type(model).__name__}; with Trainer pass optimizer_cls_and_kwargs="
                f"(POETAdamW, {{'model': model, ...}})"
            )
        if poet_lr is not None and poet_lr_scale is not None:
            raise ValueError("POETAdamW: give poet_lr or poet_lr_scale, not both")
        if poet_lr_scale is not None and not poet_lr_scale > 0:
            raise ValueError(f"poet_lr_scale: must be positive, got {poet_lr_scale}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: must be positive or None, got {max_grad_norm}")
        if clip_warmup_steps and max_grad_norm is None:
            raise ValueError("clip_warmup_steps: needs max_grad_norm (the threshold it ramps)")
        config = model_poet_config(model)
        if merge_every is not None:
            config = dataclasses.replace(config, merge_every=merge_every)
        if poet_lr is None:
            poet_lr = lr * (1.0 if poet_lr_scale is None else poet_lr_scale)
        # The groups and step implementation of make_optimizer, taken from a template that
        # never steps: one place decides which parameter goes where.
        given = {k: v for k, v in (("betas", betas), ("eps", eps)) if v is not None}
        template = make_optimizer(model, lr=lr, poet_lr=poet_lr, weight_decay=weight_decay,
                                  poet_weight_decay=poet_weight_decay, fused=fused, **given)
        defaults = template.defaults
        impl = {k: defaults[k] for k in ("fused", "foreach") if defaults.get(k)}
        super().__init__(template.param_groups, lr=lr, betas=defaults["betas"],
                         eps=defaults["eps"], weight_decay=weight_decay, **impl)
        self.max_grad_norm = max_grad_norm
        self.merge_schedule = MergeSchedule(model, self, config, clip_warmup_steps,
                                            clip_warmup_start)
        if max_grad_norm is not None:
            self.register_step_pre_hook(self._clip_before_step)
        self.register_step_post_hook(self._merge_after_step)

    @property
    def merges(self) -> int:
        """Merges done so far."""
        return self.merge_schedule.merges

    # Clipping and merging run as step hooks of this instance, not in an overridden ``step``:
    # AdamW's own ``step`` is already wrapped by torch's hook machinery, and calling it from an
    # override would run every registered step hook twice.
    @torch.no_grad()
    def _clip_before_step(self, optimizer: torch.optim.Optimizer, args: tuple,
                          kwargs: dict) -> None:
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0]: optimizer
        if closure is not None:
            raise ValueError("POETAdamW: max_grad_norm cannot clip gradients that a closure "
                             "computes inside step(); clip in the closure instead")
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params:
            threshold = self.merge_schedule.clip_value(self.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(params, threshold, foreach=True)

    def _merge_after_step(self, optimizer: torch.optim.Optimizer, args: tuple,
                          kwargs: dict) -> None:
        self.merge_schedule.step()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[SCHEDULE_KEY] = self.merge_schedule.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        schedule = state_dict.pop(SCHEDULE_KEY, None)
        if schedule is None:
            raise ValueError(f"POETAdamW.load_state_dict: no {SCHEDULE_KEY!r} entry; this state "
                             "was not saved by POETAdamW")
        super().load_state_dict(state_dict)
        self.merge_schedule.load_state_dict(schedule)
