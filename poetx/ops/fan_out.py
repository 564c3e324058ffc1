"""One input, several permuted copies: the autograd node in front of layers that read the
same tensor (a Llama block's q/k/v projections, its gate/up pair).

Each POET layer computes on its input permuted by its own ``index_in``. Gathered by each layer
alone, the input is read once per layer, and in backward each layer scatters its input
gradient back and autograd adds them. :func:`fan_out` reads the input once for all of them,
and its backward scatters and sums the gradients in one pass (``poetx.kernels.block_rotate``
``fan_out`` / ``fan_in`` on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from poetx.ops import backend


class _FanOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, indices: tuple[Tensor, ...], positions: int):
        # Kept on ctx, not saved: a checkpointed recomputation that gathers layer by layer
        # then saves the same tensors as this forward did.
        ctx.indices = indices
        ctx.cols = x.shape[1]
        ctx.set_materialize_grads(False)
        return tuple(backend.fan_out(x, indices, positions).unbind(0))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        return backend.fan_in(list(grads), ctx.indices, ctx.cols), None, None


def fan_out(x: Tensor, indices: Tensor | Sequence[Tensor], positions: int
            ) -> tuple[Tensor, ...]:
    """``x`` ``(T, cols)`` gathered by each of ``indices`` (the rows of a ``(K, >= positions)``
    tensor, or ``K`` vectors of at least ``positions`` entries; padded indices, ``-1`` a
    phantom position reading zero): ``K`` tensors ``(T, positions)``. Their gradients flow
    back to ``x`` summed; an unused copy contributes nothing. Backward reads the inverse
    attached to each index (``block_rotate_ref.attach_inverse``: the layers' ``inv_in``)
    where it holds, else inverts the index."""
    rows = tuple(indices)
    if x.dim() != 2 or any(r.dim() != 1 or r.shape[0] < positions for r in rows):
        raise ValueError(f"fan_out: x must be (T, cols) and each index a vector of at least "
                         f"{positions} entries; got {tuple(x.shape)}, "
                         f"{[tuple(r.shape) for r in rows]}")
    return _FanOut.apply(x, rows, positions)
