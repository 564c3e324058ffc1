"""The rotation blocks of many layers built in one batched call, with one batched backward.

Each ``POETLinear`` side builds ``(nb, b, b)`` blocks ``R - I`` from its ``(nb, b(b-1)/2)`` skew
parameters. Built side by side that is ~3 small launches per side and direction, each with a
grid too small to fill the GPU; here the sides of a group (e.g. one decoder block) that share
block size, Neumann terms and dtype are concatenated and built by one
``backend.rotation_delta`` call per chunk of consecutive sides (at most :data:`CHUNK_BLOCKS`
blocks unless one side has more), and their gradients go back through one
``backend.rotation_delta_backward`` call per chunk.

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

# Blocks per kernel call, at most (a larger side is a call of its own): 96 blocks of 256 x 256
# are 1536 programs of 64 x 64, enough to fill an H200, while the float32 scratch of the
# backward (six (n, b, b) buffers) stays under ~150 MB at b = 256 however large the group.
CHUNK_BLOCKS = 96


def _chunks(sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive sides packed into calls: ``[(first side, end side), ...]``."""
    out, first, total = [], 0, 0
    for i, nb in enumerate(sizes):
        if i > first and total + nb > CHUNK_BLOCKS:
            out.append((first, i))
            first, total = i, 0
        total += nb
    if sizes:
        out.append((first, len(sizes)))
    return out


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class _GroupBuild(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block: int, terms: int | None, valid_last: int | None,
                out_dtype: torch.dtype, *thetas: Tensor):
        sizes = [t.shape[0] for t in thetas]
        first = thetas[0]
        deltas = first.new_empty((sum(sizes), block, block), dtype=out_dtype)
        chunks = _chunks(sizes)
        start = 0
        for i, (a, b) in enumerate(chunks):
            n = sum(sizes[a:b])
            last = valid_last if i == len(chunks) - 1 else None
            backend.rotation_delta(_cat(thetas[a:b]), block, terms, last, out_dtype,
                                   out=deltas[start:start + n])
            start += n
        ctx.save_for_backward(*thetas)
        ctx.geometry = (block, terms, valid_last, out_dtype)
        ctx.mark_non_differentiable(deltas)
        ctx.set_materialize_grads(False)
        wide = torch.float64 if torch.float64 in (first.dtype, out_dtype) else torch.float32
        anchor = first.new_zeros((), dtype=wide)
        handles = tuple(anchor.expand(n, block, block) for n in sizes)
        return (deltas, *handles)

    @staticmethod
    def backward(ctx, _grad_deltas, *grad_handles):
        thetas = ctx.saved_tensors
        block, terms, valid_last, out_dtype = ctx.geometry
        if all(g is None for g in grad_handles):
            return (None,) * (4 + len(thetas))
        wide = next(g.dtype for g in grad_handles if g is not None)
        sizes = [t.shape[0] for t in thetas]
        chunks = _chunks(sizes)
        out: list[Tensor | None] = []
        for i, (a, b) in enumerate(chunks):
            grad = _cat([g if g is not None else t.new_zeros((t.shape[0], block, block),
                                                             dtype=wide)
                         for g, t in zip(grad_handles[a:b], thetas[a:b], strict=True)])
            last = valid_last if i == len(chunks) - 1 else None
            theta = _cat(thetas[a:b])
            grad_theta = backend.rotation_delta_backward(theta, grad, block, terms, last,
                                                         build_dtype=out_dtype)
            del grad
            out += grad_theta.split(sizes[a:b]) if b - a > 1 else [grad_theta]
        # A side whose layer did not run gets no gradient, as on the per-layer path.
        out = [g if h is not None else None for g, h in zip(out, grad_handles, strict=True)]
        return (None, None, None, None, *out)


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
