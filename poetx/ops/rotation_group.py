"""The rotation blocks of many layers built in one batched call, with one batched backward.

Each ``POETLinear`` side builds ``(nb, b, b)`` blocks ``R - I`` from its ``(nb, b(b-1)/2)`` skew
parameters. Built side by side that is ~3 small launches per side and direction, each with a
grid too small to fill the GPU; here the sides of a group (e.g. one decoder block) that share
block size, Neumann terms and dtype are concatenated and built by one
``backend.rotation_delta`` call per chunk of :data:`CHUNK_BLOCKS` blocks, and their gradients
go back through one ``backend.rotation_delta_backward`` call per chunk.

Only the last side of a group may have a padded last block (``valid_last``): the kernels
mask the last block of what they are given.

:func:`build_rotation_group` returns, per side, the blocks (no autograd; what
``poetx.ops.rotated_gemm.poet_linear_prebuilt`` computes with) and a float32 *gradient
handle* of the same shape: a zero-stride tensor whose values are never read, through which
the op's backward hands the float32 block gradient back here (see ``rotated_gemm``). The
handles' gradients are held until every side of the group has run its backward, then turned
into the skew parameters' gradients at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from poetx.ops import backend

# Blocks per kernel call: enough tiles to fill an H200 (128 blocks of 256 x 256 are 2048
# programs of 64 x 64), while the float32 scratch of the backward (six (n, b, b) buffers)
# stays ~200 MB at b = 256 however large the group.
CHUNK_BLOCKS = 128


def _chunks(total: int) -> list[tuple[int, int]]:
    return [(s, min(s + CHUNK_BLOCKS, total)) for s in range(0, total, CHUNK_BLOCKS)]


class _GroupBuild(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block: int, terms: int | None, valid_last: int | None,
                out_dtype: torch.dtype, *thetas: Tensor):
        theta = torch.cat(thetas) if len(thetas) > 1 else thetas[0]
        total = theta.shape[0]
        deltas = theta.new_empty((total, block, block), dtype=out_dtype)
        for s, e in _chunks(total):
            last = valid_last if e == total else None
            backend.rotation_delta(theta[s:e], block, terms, last, out_dtype, out=deltas[s:e])
        ctx.save_for_backward(*thetas)
        ctx.geometry = (block, terms, valid_last)
        ctx.mark_non_differentiable(deltas)
        ctx.set_materialize_grads(False)
        wide = torch.float64 if torch.float64 in (theta.dtype, out_dtype) else torch.float32
        anchor = theta.new_zeros((), dtype=wide)
        handles = tuple(anchor.expand(t.shape[0], block, block) for t in thetas)
        return (deltas, *handles)

    @staticmethod
    def backward(ctx, _grad_deltas, *grad_handles):
        thetas = ctx.saved_tensors
        block, terms, valid_last = ctx.geometry
        if all(g is None for g in grad_handles):
            return (None,) * (4 + len(thetas))
        wide = next(g.dtype for g in grad_handles if g is not None)
        grads = [g if g is not None else t.new_zeros((t.shape[0], block, block), dtype=wide)
                 for g, t in zip(grad_handles, thetas, strict=True)]
        grad = torch.cat(grads) if len(grads) > 1 else grads[0]
        del grads
        theta = torch.cat(thetas) if len(thetas) > 1 else thetas[0]
        total = theta.shape[0]
        out = torch.empty_like(theta)
        for s, e in _chunks(total):
            last = valid_last if e == total else None
            backend.rotation_delta_backward(theta[s:e], grad[s:e], block, terms, last,
                                            out=out[s:e])
        sizes = [t.shape[0] for t in thetas]
        # A side whose layer did not run gets no gradient, as on the per-layer path.
        grads = [g if h is not None else None
                 for g, h in zip(out.split(sizes), grad_handles, strict=True)]
        return (None, None, None, None, *grads)


def build_rotation_group(
    thetas: list[Tensor], block: int, terms: int | None, valid_last: int | None,
    out_dtype: torch.dtype,
) -> tuple[list[Tensor], list[Tensor]]:
    """Blocks ``R - I`` of every side in ``thetas`` (each ``(nb_i, b(b-1)/2)``, same dtype and
    device), in ``out_dtype``: ``(blocks, handles)``, each a list of ``(nb_i, b, b)`` tensors.

    ``valid_last`` applies to the last block of the last side only. ``terms=None``: the exact
    Cayley map. Equal, block for block, to ``backend.rotation_delta`` of each side alone.
    """
    if not thetas:
        return [], []
    deltas, *handles = _GroupBuild.apply(block, terms, valid_last, out_dtype, *thetas)
    sizes = [t.shape[0] for t in thetas]
    return list(deltas.split(sizes)), handles
