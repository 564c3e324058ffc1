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

Gradient accumulation builds the blocks once per optimizer step
(:func:`build_rotation_blocks`): the micro-batches before the last hand their block gradients
to the leaves of a :class:`Carry`, where they add up, and the last micro-batch's handles
(:func:`link_rotation_group` with that carry) run the Cayley-Neumann backward once, on the
sum, inside that micro-batch's backward (where FSDP2 has the skew parameters gathered and
reduce-scatters their gradients, and before a data-parallel all-reduce).
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


def _build(thetas: list[Tensor], block: int, terms: int | None, valid_last: int | None,
           out_dtype: torch.dtype) -> Tensor:
    """The blocks of every side, concatenated ``(sum nb_i, b, b)``; no autograd."""
    sizes = [t.shape[0] for t in thetas]
    deltas = thetas[0].new_empty((sum(sizes), block, block), dtype=out_dtype)
    chunks = _chunks(sizes)
    start = 0
    with torch.no_grad():
        for i, (a, b) in enumerate(chunks):
            n = sum(sizes[a:b])
            last = valid_last if i == len(chunks) - 1 else None
            backend.rotation_delta(_cat([t.detach() for t in thetas[a:b]]), block, terms, last,
                                   out_dtype, out=deltas[start:start + n])
            start += n
    return deltas


class Carry:
    """Per side of one build, a zero-stride leaf of the handles' shape and dtype that requires
    grad: the block gradients of the micro-batches that computed with these blocks accumulate
    in its ``.grad`` until a :func:`link_rotation_group` backward (``taken``) or
    :meth:`flush` turns them into skew gradients."""

    def __init__(self, thetas: list[Tensor], block: int, out_dtype: torch.dtype) -> None:
        self.leaves = [h.detach().requires_grad_(True)
                       for h in _zero_handles(thetas, block, out_dtype)]
        self.taken = False

    def grads(self) -> list[Tensor | None]:
        return [leaf.grad for leaf in self.leaves]

    def pending(self) -> bool:
        """Gradients arrived and no backward took them yet."""
        return not self.taken and any(g is not None for g in self.grads())

    def flush(self, thetas: list[Tensor], block: int, terms: int | None,
              valid_last: int | None, out_dtype: torch.dtype) -> None:
        """Turn the pending gradients into the skew gradients of ``thetas`` now, in a backward
        of their own (for sides that no backward of a :func:`link_rotation_group` reached)."""
        handles = link_rotation_group(thetas, block, terms, valid_last, out_dtype)
        pairs = [(h, g) for h, g in zip(handles, self.grads(), strict=True) if g is not None]
        torch.autograd.backward([h for h, _ in pairs], [g for _, g in pairs])
        self.taken = True


def _zero_handles(thetas, block: int, out_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Zero-stride ``(nb_i, b, b)`` tensors, one per side, in the block gradients' dtype
    (float64 when the skews or the blocks are, else float32); never read, only differentiated."""
    wide = torch.float64 if torch.float64 in (thetas[0].dtype, out_dtype) else torch.float32
    anchor = thetas[0].new_zeros((), dtype=wide)
    return tuple(anchor.expand(t.shape[0], block, block) for t in thetas)


class _Link(torch.autograd.Function):
    """Zero-stride gradient handles whose backward turns the block gradients (plus what
    ``carry`` accumulated) into the skew parameters' gradients, one call per chunk."""

    @staticmethod
    def forward(ctx, block: int, terms: int | None, valid_last: int | None,
                out_dtype: torch.dtype, carry: Carry | None, *thetas: Tensor):
        ctx.save_for_backward(*thetas)
        ctx.geometry = (block, terms, valid_last, out_dtype)
        ctx.carry = carry
        ctx.set_materialize_grads(False)
        return _zero_handles(thetas, block, out_dtype)

    @staticmethod
    def backward(ctx, *grad_handles):
        thetas = ctx.saved_tensors
        geometry = ctx.geometry
        if ctx.carry is not None and not ctx.carry.taken:
            # Gradients of the earlier micro-batches, held by the leaves they flowed into
            # (added once, should several links of the same blocks run their backward).
            ctx.carry.taken = True
            grad_handles = tuple(_plus(g, c) for g, c in zip(grad_handles, ctx.carry.grads(),
                                                              strict=True))
        if all(g is None for g in grad_handles):
            return (None,) * (5 + len(thetas))
        return (None,) * 5 + tuple(_theta_grads(thetas, grad_handles, *geometry))


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b


def _theta_grads(thetas: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], block: int,
                 terms: int | None, valid_last: int | None,
                 out_dtype: torch.dtype) -> list[Tensor | None]:
    """Each side's skew gradient ``(nb_i, b(b-1)/2)`` from its block gradient ``(nb_i, b, b)``
    of blocks built in ``out_dtype`` (``None`` in, ``None`` out: a side whose layer did not
    run gets no gradient, as on the per-layer path)."""
    wide = next(g.dtype for g in grads if g is not None)
    sizes = [t.shape[0] for t in thetas]
    chunks = _chunks(sizes)
    out: list[Tensor | None] = []
    for i, (a, b) in enumerate(chunks):
        grad = _cat([g if g is not None else t.new_zeros((t.shape[0], block, block), dtype=wide)
                     for g, t in zip(grads[a:b], thetas[a:b], strict=True)])
        last = valid_last if i == len(chunks) - 1 else None
        grad_theta = backend.rotation_delta_backward(_cat(thetas[a:b]), grad, block, terms, last,
                                                     build_dtype=out_dtype)
        del grad
        out += grad_theta.split(sizes[a:b]) if b - a > 1 else [grad_theta]
    return [g if h is not None else None for g, h in zip(out, grads, strict=True)]


def build_rotation_blocks(thetas: list[Tensor], block: int, terms: int | None,
                          valid_last: int | None, out_dtype: torch.dtype) -> list[Tensor]:
    """Blocks ``R - I`` of every side in ``thetas`` (each ``(nb_i, b(b-1)/2)``, same dtype and
    device), in ``out_dtype``: a list of ``(nb_i, b, b)`` tensors, outside autograd.

    ``valid_last`` applies to the last block of the last side only. ``terms=None``: the exact
    Cayley map. Equal, block for block, to ``backend.rotation_delta`` of each side alone.
    """
    if not thetas:
        return []
    deltas = _build(thetas, block, terms, valid_last, out_dtype)
    return list(deltas.split([t.shape[0] for t in thetas]))


def link_rotation_group(thetas: list[Tensor], block: int, terms: int | None,
                        valid_last: int | None, out_dtype: torch.dtype,
                        carry: Carry | None = None) -> list[Tensor]:
    """Gradient handles ``(nb_i, b, b)`` for blocks built from ``thetas`` (see
    :func:`build_rotation_blocks`, same arguments): gradients reaching them become the skew
    parameters' gradients in one backward call per chunk.

    ``carry``: the :class:`Carry` of the same sides, whose accumulated gradients (read when the
    backward runs) are added first: the Cayley-Neumann backward is linear in the block
    gradient, so blocks used by several micro-batches are differentiated once, for their sum.
    """
    if not thetas:
        return []
    return list(_Link.apply(block, terms, valid_last, out_dtype, carry, *thetas))


def build_rotation_group(
    thetas: list[Tensor], block: int, terms: int | None, valid_last: int | None,
    out_dtype: torch.dtype,
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`build_rotation_blocks` and :func:`link_rotation_group` of the same sides:
    ``(blocks, handles)``, each a list of ``(nb_i, b, b)`` tensors."""
    blocks = build_rotation_blocks(thetas, block, terms, valid_last, out_dtype)
    return blocks, link_rotation_group(thetas, block, terms, valid_last, out_dtype)
