"""Gradient clipping and the non-finite-gradient skip, decided on the device.

``torch.nn.utils.clip_grad_norm_`` followed by a Python check of the norm syncs the host with
the device every step, which also makes the step impossible to record as a CUDA graph. Here the
norm, the clipping factor and the skip flag stay device tensors and the fused AdamW kernel
applies them: it divides every gradient by ``optimizer.grad_scale`` and leaves parameters,
moments and step counts untouched when ``optimizer.found_inf`` is 1 (torch's own mechanism
for AMP loss scaling, reused here).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


class DeviceGradClip:
    """Clip to ``max_norm`` (``<= 0``: no clipping) and skip non-finite steps, sync-free.

    Attaches ``grad_scale`` and ``found_inf`` (0-d float32 device tensors) to ``optimizer``,
    which must be fused (``make_optimizer(..., capturable=True)`` or ``fused=True``). Call the
    instance after ``backward`` and before ``optimizer.step()``; it returns the total gradient
    norm (a 0-d float32 device tensor, before clipping, non-finite when the step is skipped).
    The effect on the update equals ``clip_grad_norm_(params, max_norm)`` up to float32
    rounding (a division by ``1 / factor`` instead of a multiplication by ``factor``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
                 max_norm: float) -> None:
        if not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("DeviceGradClip needs a fused optimizer (fused=True): only the "
                             "fused AdamW step applies grad_scale and found_inf")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("DeviceGradClip: no trainable parameter")
        device = self.params[0].device
        # FSDP2 shards (DTensors, every one split along dim 0): the norm is the root of the
        # all-reduced sum of each rank's local squared norms (one collective).
        self.sharded = any(hasattr(p, "to_local") for p in self.params)
        self.max_norm = torch.tensor(float(max_norm), dtype=torch.float32, device=device)
        self.grad_scale = torch.ones((), dtype=torch.float32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        optimizer.grad_scale = self.grad_scale
        optimizer.found_inf = self.found_inf

    def set_max_norm(self, max_norm: float) -> None:
        """Change the threshold between steps (in place: a captured step sees it)."""
        self.max_norm.fill_(float(max_norm))

    @torch.no_grad()
    def __call__(self, extra_sq: Tensor | None = None) -> Tensor:
        """Clip the gradients present now; ``extra_sq``: squared norm of gradients already
        applied and freed (``StepInBackward.sq_norm``), counted in the returned norm and the
        skip, not in the clipping factor (those were clipped per tensor)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:  # every gradient was applied in backward (StepInBackward)
            norm = self.max_norm.new_zeros(())
        elif self.sharded:
            import torch.distributed as dist

            local = [g.to_local() for g in grads]
            squares = torch.nn.utils.get_total_norm(local, foreach=True).float().square()
            dist.all_reduce(squares, op=dist.ReduceOp.SUM)
            norm = squares.sqrt()
        else:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True).float()
        total = norm if extra_sq is None else torch.sqrt(norm.square() + extra_sq)
        self.found_inf.copy_(torch.logical_not(torch.isfinite(total)).float())
        factor = torch.clamp((norm + _EPS) / self.max_norm, min=1.0)
        self.grad_scale.copy_(torch.where(self.max_norm > 0, factor, 1.0))
        return total
