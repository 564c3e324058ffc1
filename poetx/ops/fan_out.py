"""One input, several permuted copies: the autograd node in front of layers that read the
same tensor (a Llama block's q/k/v projections, its gate/up pair).

Each POET layer computes on its input permuted by its own ``index_in``. Gathered by each layer
alone, the input is read once per layer, and in backward each layer scatters its input
gradient back and autograd adds them. :func:`fan_out` reads the input once for all of them,
and its backward scatters and sums the gradients in one pass (``poetx.kernels.block_rotate``
``fan_out`` / ``fan_in`` on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from poetx.ops import backend


class _FanOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, indices: Tensor, positions: int):
        # Kept on ctx, not saved: a checkpointed recomputation that gathers layer by layer
        # then saves the same tensors as this forward did.
        ctx.indices = indices
        ctx.cols = x.shape[1]
        ctx.set_materialize_grads(False)
        return tuple(backend.fan_out(x, indices, positions).unbind(0))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        return backend.fan_in(list(grads), ctx.indices, ctx.cols), None, None


def fan_out(x: Tensor, indices: Tensor, positions: int) -> tuple[Tensor, ...]:
    """``x`` ``(T, cols)`` gathered by each row of ``indices`` ``(K, >= positions)`` (padded
    indices, ``-1`` a phantom position reading zero): ``K`` tensors ``(T, positions)``. Their
    gradients flow back to ``x`` summed; an unused copy contributes nothing."""
    if x.dim() != 2 or indices.dim() != 2 or indices.shape[1] < positions:
        raise ValueError(f"fan_out: x must be (T, cols) and indices (K, >= {positions}); got "
                         f"{tuple(x.shape)}, {tuple(indices.shape)}")
    return _FanOut.apply(x, indices, positions)
