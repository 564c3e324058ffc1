"""The rotation blocks of many layers built in one batched call, with one batched backward.

Each ``POETLinear`` side builds ``(nb, b, b)`` blocks ``R - I`` from its ``(nb, b(b-1)/2)`` skew
parameters. Built side by side that is ~3 small launches per side and direction, each with a
grid too small to fill the GPU; here the sides of a group (e.g. one decoder block) that share
block size, Neumann terms and dtype are built by one ``backend.rotation_delta`` call per chunk
of consecutive sides (at most :data:`CHUNK_BLOCKS` blocks unless one side has more; given as
a list, which the kernels read in place), and their gradients go back through one
``backend.rotation_delta_backward`` call per chunk.

Only the last side of a group may have a padded last block (``valid_last``): the kernels
mask the last block of what they are given.

:func:`build_rotation_group` returns, per side, the blocks (no autograd; what
``poetx.ops.rotated_gemm.poet_linear_prebuilt`` computes with) and a float32 *gradient
handle* of the same shape: a zero-stride tensor whose values are never read. Each handle
names its part of the build's :class:`GradientSink`, one buffer for all sides, where the op's
backward writes the float32 block gradient (its Gram); once every side of the group has run
its backward, the sink is turned into the skew parameters' gradients at once.

Gradient accumulation builds the blocks once per optimizer step
(:func:`build_rotation_blocks`): the Grams of the micro-batches before the last add into the
sink of a :class:`Carry`, and the last micro-batch's handles (:func:`link_rotation_group` with
that carry) run the Cayley-Neumann backward once, on the sum, inside that micro-batch's
backward (where FSDP2 has the skew parameters gathered and reduce-scatters their gradients,
and before a data-parallel all-reduce).
"""

from __future__ import annotations

import torch
from torch import Tensor

from poetx.ops import backend
from poetx.ops.rotated_gemm import GRADIENT_SLOT

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


def _stack(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor | list[Tensor]:
    """What ``backend.rotation_delta`` takes for consecutive sides: the tensor itself, or the
    list (the kernels read the sides in place; no concatenated copy)."""
    return tensors[0] if len(tensors) == 1 else list(tensors)


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
            backend.rotation_delta(_stack([t.detach() for t in thetas[a:b]]), block, terms,
                                   last, out_dtype, out=deltas[start:start + n])
            start += n
    return deltas


class GradientSink:
    """The block gradients of one build's sides in one contiguous buffer ``(sum nb_i, b, b)``,
    side after side (float32, float64 when the skews or the blocks are).

    The Grams of the layers' backward write there (``GradientSlot``): the first gradient of a
    side is stored, later ones (the next micro-batches, a layer called twice) are added. So
    there is no per-side gradient tensor, no concatenation per Cayley-Neumann chunk and, under
    gradient accumulation, no separate add per micro-batch. The buffer is allocated (not
    zeroed) when the first gradient arrives, so a per-forward build holds it only during its
    group's backward; :meth:`take` hands it to the Cayley-Neumann backward and starts over."""

    def __init__(self, thetas: list[Tensor] | tuple[Tensor, ...], block: int,
                 out_dtype: torch.dtype) -> None:
        self.sizes = [t.shape[0] for t in thetas]
        self.starts = [0]
        for nb in self.sizes:
            self.starts.append(self.starts[-1] + nb)
        self.block = block
        self.dtype = _wide(thetas[0].dtype, out_dtype)
        self.device = thetas[0].device
        self.data: Tensor | None = None
        self.filled = [False] * len(self.sizes)

    def view(self, i: int) -> tuple[Tensor, bool]:
        """Side ``i``'s ``(nb_i, b, b)`` part and whether a gradient is to be added to it
        (else stored: nothing arrived yet); marks it filled."""
        if self.data is None:
            self.data = torch.empty((self.starts[-1], self.block, self.block), dtype=self.dtype,
                                    device=self.device)
        add = self.filled[i]
        self.filled[i] = True
        return self.data[self.starts[i]:self.starts[i + 1]], add

    def receive(self, i: int, grad: Tensor) -> None:
        """Store or add ``grad`` ``(nb_i, b, b)`` as side ``i``'s gradient."""
        part, add = self.view(i)
        part.add_(grad) if add else part.copy_(grad)

    def pending(self) -> bool:
        return any(self.filled)

    def take(self) -> tuple[Tensor | None, list[bool]]:
        """The buffer and which sides reached it (the others' parts zeroed, where any side
        did); the sink is empty afterwards."""
        data, filled = self.data, self.filled
        self.data, self.filled = None, [False] * len(self.sizes)
        if data is not None:
            for i, f in enumerate(filled):
                if not f:  # a layer that did not run: its part was never written
                    data[self.starts[i]:self.starts[i + 1]].zero_()
        return data, filled


class GradientSlot:
    """Side ``i`` of a :class:`GradientSink`: what a gradient handle carries (as the attribute
    ``poetx.ops.rotated_gemm.GRADIENT_SLOT``) so the op writes the side's gradient there."""

    def __init__(self, sink: GradientSink, i: int) -> None:
        self.sink = sink
        self.i = i
        self.dtype = sink.dtype

    def target(self) -> tuple[Tensor, bool]:
        """``(part, add)``: where the side's gradient goes, and whether it is added there."""
        return self.sink.view(self.i)


def _tag(handles: tuple[Tensor, ...] | list[Tensor], sink: GradientSink) -> list[Tensor]:
    for i, h in enumerate(handles):
        setattr(h, GRADIENT_SLOT, GradientSlot(sink, i))
    return list(handles)


class Carry:
    """The gradient sink of one build shared by the micro-batches of an optimizer step, and
    the handles of the micro-batches before the last (zero-stride, no autograd: their Grams
    add into the sink and nothing else flows). The last micro-batch's
    :func:`link_rotation_group` handles (``carry=``) take what the sink holds in their
    backward; :meth:`flush` takes what no such backward took."""

    def __init__(self, thetas: list[Tensor], block: int, out_dtype: torch.dtype) -> None:
        self.sink = GradientSink(thetas, block, out_dtype)
        # A leaf that requires grad, so the layers' ops differentiate for the handles (and so
        # add into the sink) even where nothing else they read does; nothing reaches it.
        self.root = thetas[0].new_zeros((), dtype=self.sink.dtype).requires_grad_(True)
        self.handles = _tag(_Hold.apply(self.root, block, *self.sink.sizes), self.sink)

    def pending(self) -> bool:
        """Gradients arrived and no backward took them yet."""
        return self.sink.pending()

    def flush(self, thetas: list[Tensor], block: int, terms: int | None,
              valid_last: int | None, out_dtype: torch.dtype) -> None:
        """Turn the pending gradients into the skew gradients of ``thetas`` now, in a backward
        of their own (for sides that no backward of a :func:`link_rotation_group` reached)."""
        handles = link_rotation_group(thetas, block, terms, valid_last, out_dtype, carry=self)
        first = self.sink.filled.index(True)
        # The handle itself as its gradient: a zero-stride token, the values are in the sink.
        torch.autograd.backward([handles[first]], [handles[first].detach()])


def _wide(theta_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (theta_dtype, out_dtype) else torch.float32


def _zero_handles(thetas, block: int, out_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Zero-stride ``(nb_i, b, b)`` tensors, one per side, in the block gradients' dtype
    (float64 when the skews or the blocks are, else float32); never read, only differentiated."""
    anchor = thetas[0].new_zeros((), dtype=_wide(thetas[0].dtype, out_dtype))
    return tuple(anchor.expand(t.shape[0], block, block) for t in thetas)


class _Hold(torch.autograd.Function):
    """Zero-stride handles ``(nb_i, b, b)``, one per size, in ``root``'s dtype, hanging from
    ``root``: their ops add the gradients into a sink, nothing flows on."""

    @staticmethod
    def forward(ctx, root: Tensor, block: int, *sizes: int):
        ctx.set_materialize_grads(False)
        anchor = root.new_zeros(())
        return tuple(anchor.expand(nb, block, block) for nb in sizes)

    @staticmethod
    def backward(ctx, *grad_handles):
        return (None,) * (2 + len(grad_handles))


class _Link(torch.autograd.Function):
    """Zero-stride gradient handles whose backward turns the block gradients gathered in
    ``sink`` into the skew parameters' gradients, one Cayley-Neumann backward per chunk."""

    @staticmethod
    def forward(ctx, block: int, terms: int | None, valid_last: int | None,
                out_dtype: torch.dtype, sink: GradientSink, *thetas: Tensor):
        ctx.save_for_backward(*thetas)
        ctx.geometry = (block, terms, valid_last, out_dtype)
        ctx.sink = sink
        ctx.set_materialize_grads(False)
        handles = _zero_handles(thetas, block, out_dtype)
        ctx.token = handles[0].data_ptr()
        return handles

    @staticmethod
    def backward(ctx, *grad_handles):
        thetas = ctx.saved_tensors
        sink = ctx.sink
        for i, g in enumerate(grad_handles):
            # The op's gradient is a token, the handle itself (its values went into the sink);
            # anything else (a caller's gradient, autograd's sum of two tokens) is added.
            if g is not None and not (g.data_ptr() == ctx.token and not any(g.stride())):
                sink.receive(i, g)
        data, filled = sink.take()
        if data is None:
            return (None,) * (5 + len(thetas))
        return (None,) * 5 + tuple(_theta_grads(thetas, data, filled, *ctx.geometry))


def _theta_grads(thetas: tuple[Tensor, ...], data: Tensor, filled: list[bool], block: int,
                 terms: int | None, valid_last: int | None,
                 out_dtype: torch.dtype) -> list[Tensor | None]:
    """Each side's skew gradient ``(nb_i, b(b-1)/2)`` from the block gradients ``data``
    ``(sum nb_i, b, b)`` of blocks built in ``out_dtype``; ``None`` for a side not ``filled``
    (its layer did not run: no gradient, as on the per-layer path). Each chunk of consecutive
    sides is a contiguous part of ``data``."""
    sizes = [t.shape[0] for t in thetas]
    chunks = _chunks(sizes)
    out: list[Tensor | None] = []
    start = 0
    for i, (a, b) in enumerate(chunks):
        n = sum(sizes[a:b])
        last = valid_last if i == len(chunks) - 1 else None
        grad_theta = backend.rotation_delta_backward(_stack(thetas[a:b]),
                                                     data[start:start + n], block, terms, last,
                                                     build_dtype=out_dtype)
        start += n
        out += grad_theta.split(sizes[a:b]) if b - a > 1 else [grad_theta]
    return [g if f else None for g, f in zip(out, filled, strict=True)]


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

    Each handle carries a :class:`GradientSlot` of one :class:`GradientSink` (the layers'
    Grams add there); ``carry``: the :class:`Carry` of the same sides, whose sink, holding the
    earlier micro-batches' gradients, the handles share: the Cayley-Neumann backward is linear
    in the block gradient, so blocks used by several micro-batches are differentiated once,
    for their sum.
    """
    if not thetas:
        return []
    sink = carry.sink if carry is not None else GradientSink(thetas, block, out_dtype)
    return _tag(_Link.apply(block, terms, valid_last, out_dtype, sink, *thetas), sink)


def build_rotation_group(
    thetas: list[Tensor], block: int, terms: int | None, valid_last: int | None,
    out_dtype: torch.dtype,
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`build_rotation_blocks` and :func:`link_rotation_group` of the same sides:
    ``(blocks, handles)``, each a list of ``(nb_i, b, b)`` tensors."""
    blocks = build_rotation_blocks(thetas, block, terms, valid_last, out_dtype)
    return blocks, link_rotation_group(thetas, block, terms, valid_last, out_dtype)
