"""Optimizer step fused into backward for chosen parameters (embedding, lm_head).

A Llama-8B lm_head gradient is 1 GiB in bf16 and so is the embedding's; stepped at the end, both
coexist with every other gradient. :class:`StepInBackward` registers a post-accumulate-grad hook
on each chosen parameter: as soon as autograd has written its gradient, the optimizer steps that
parameter alone and the gradient is freed. The lm_head gradient is gone before the first decoder
layer's backward starts; the embedding's, which comes last, never meets the head's.

The step is the same optimizer object that steps everything else (same groups, learning rates,
state and checkpoint): the hook hides every other gradient for the duration of its
``optimizer.step()``, so only the hooked parameter moves.

Clipping and the non-finite skip, per tensor: a global gradient norm needs every gradient before
the first update, which is what this avoids. Each hooked parameter is clipped on its own to the
same ``max_norm`` (factor ``max(1, (||g|| + 1e-6) / max_norm)``) and skipped when its gradient
or the loss is not finite. The remaining parameters are clipped together by their own norm
(:class:`~poetx.optim.clip.DeviceGradClip`); the reported gradient norm is over all of them.
Everything stays on the device (the fused AdamW reads ``grad_scale`` and ``found_inf``), so the
hooks are recorded with the rest of a captured CUDA-graph step.

Needs one backward per optimizer step (no gradient accumulation over micro-batches, no DDP: each
hook would step on a partial or not yet reduced gradient).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


class StepInBackward:
    """Step ``params`` of ``optimizer`` inside backward, one at a time, clipped per tensor.

    Args:
        optimizer: the run's optimizer (every param of ``params`` in one of its groups).
        params: the parameters to step in backward (e.g. embedding and lm_head weights).
        max_norm: per-tensor clipping threshold (``<= 0``: none), a float or a 0-d tensor
            shared with the run's :class:`~poetx.optim.clip.DeviceGradClip` (``max_norm``), so
            a threshold changed in place applies to both.

    Call :meth:`begin` with the step's loss before ``backward`` (a non-finite loss skips the
    hooked updates), and read :attr:`sq_norm` (sum of the hooked gradients' squared norms,
    a 0-d float32 device tensor) afterwards. :meth:`remove` detaches the hooks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
                 max_norm: float | Tensor) -> None:
        self.optimizer = optimizer
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("StepInBackward: no trainable parameter to step in backward")
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(p) not in owned for p in self.params):
            raise ValueError("StepInBackward: every parameter must be in the optimizer")
        self._hooked = {id(p) for p in self.params}
        device = self.params[0].device
        self.max_norm = (max_norm if torch.is_tensor(max_norm) else
                         torch.tensor(float(max_norm), dtype=torch.float32, device=device))
        self.grad_scale = torch.ones((), dtype=torch.float32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.sq_norm = torch.zeros((), dtype=torch.float32, device=device)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def begin(self, loss: Tensor | None = None) -> None:
        """Before ``backward``: reset :attr:`sq_norm` and note whether ``loss`` is finite."""
        self.sq_norm.zero_()
        if loss is None:
            self.loss_bad.zero_()
        else:
            self.loss_bad.copy_(~torch.isfinite(loss.detach()).all())

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        grad = p.grad
        wide = torch.float32 if grad.dtype in (torch.bfloat16, torch.float16) else None
        norm = torch.linalg.vector_norm(grad, dtype=wide)
        self.sq_norm.add_(norm.square())
        self.found_inf.copy_((self.loss_bad | ~torch.isfinite(norm)).float())
        factor = torch.clamp((norm + _EPS) / self.max_norm, min=1.0)
        self.grad_scale.copy_(torch.where(self.max_norm > 0, factor, 1.0))
        opt = self.optimizer
        # Only p moves: every other gradient is hidden from this step.
        hidden = [q for g in opt.param_groups for q in g["params"]
                  if q is not p and q.grad is not None]
        saved = {q: q.grad for q in hidden}
        before = (getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None))
        try:
            for q in hidden:
                q.grad = None
            opt.grad_scale, opt.found_inf = self.grad_scale, self.found_inf
            opt.step()
        finally:
            for q, g in saved.items():
                q.grad = g
            _restore(opt, "grad_scale", before[0])
            _restore(opt, "found_inf", before[1])
        p.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _restore(obj: object, name: str, value: object) -> None:
    if value is None:
        if hasattr(obj, name):
            delattr(obj, name)
    else:
        setattr(obj, name, value)


def embedding_and_head(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding and output head weights of a Hugging Face causal LM (one parameter
    when they are tied)."""
    out: list[nn.Parameter] = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        weight = getattr(module, "weight", None) if module is not None else None
        if isinstance(weight, nn.Parameter) and all(weight is not w for w in out):
            out.append(weight)
    if not out:
        raise ValueError("step in backward: the model has no input embedding or output head")
    return out
