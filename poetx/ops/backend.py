"""Dispatch of the kernels the layers and the loss need: Triton on CUDA, the PyTorch
reference elsewhere.

Signatures match the references in ``poetx.kernels.block_rotate_ref``,
``poetx.kernels.cross_entropy_ref`` and ``poetx.ortho.cayley``; see those for the index and
shape conventions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from poetx.kernels import use_triton
from poetx.kernels.block_rotate_ref import (
    block_gram_reference,
    block_rotate_reference,
    fan_in_reference,
    fan_out_reference,
    gather_columns,
)
from poetx.kernels.cross_entropy_ref import (
    cross_entropy_grad_reference,
    logsumexp_pick_reference,
)
from poetx.kernels.frame_swiglu_ref import (
    FrameMaps,
    swiglu_frames_backward_reference,
    swiglu_frames_reference,
)
from poetx.ortho.cayley import rotation_delta_backward_reference, rotation_delta_reference


def rotate(
    x: Tensor,
    delta: Tensor,
    in_index: Tensor | None,
    out_index: Tensor | None,
    out_cols: int,
    transpose: bool = False,
) -> Tensor:
    if use_triton(x):
        from poetx.kernels.block_rotate import block_rotate

        return block_rotate(x, delta, in_index, out_index, out_cols, transpose)
    return block_rotate_reference(x, delta, in_index, out_index, out_cols, transpose)


def gather(x: Tensor, index: Tensor | None, positions: int) -> tuple[Tensor, Tensor | None]:
    """``(x, index)`` as several products should read ``x``: on the Triton path permuted once
    into ``(T, positions)`` (index ``None``) where the kernels would each permute it, else
    unchanged. Pass the pair on to :func:`rotate` / :func:`gram`."""
    if index is not None and use_triton(x) and x.dtype != torch.float64:
        from poetx.kernels.block_rotate import staged_gather

        return staged_gather(x, index, positions)
    return x, index


def permute(x: Tensor, index: Tensor, positions: int) -> Tensor:
    """``x`` ``(T, cols)`` gathered by ``index`` into ``(T, positions)`` (zero where
    ``index < 0``), on every path: a copy the op keeps, unlike :func:`gather`'s."""
    if use_triton(x) and x.dtype != torch.float64:
        from poetx.kernels.block_rotate import staged_gather

        permuted, left = staged_gather(x, index, positions)
        if left is None:
            return permuted
    return gather_columns(x, index[:positions], positions)


def fan_out(x: Tensor, indices: Tensor | Sequence[Tensor], positions: int) -> Tensor:
    """``(T, cols) -> (K, T, positions)``: ``x`` gathered by each of ``indices`` (the rows of a
    ``(K, >= positions)`` tensor, or ``K`` vectors)."""
    if use_triton(x) and x.dtype != torch.float64:
        from poetx.kernels.block_rotate import fan_out as kernel

        return kernel(x, indices, positions)
    return fan_out_reference(x, indices, positions)


def fan_in(grads: list[Tensor | None], indices: Tensor | Sequence[Tensor], cols: int
           ) -> Tensor | None:
    """The backward of :func:`fan_out`: the gradients scattered back and summed."""
    first = next((g for g in grads if g is not None), None)
    if first is not None and use_triton(first) and first.dtype != torch.float64:
        from poetx.kernels.block_rotate import fan_in as kernel

        return kernel(grads, indices, cols)
    return fan_in_reference(grads, indices, cols)


def gram(
    a: Tensor, b: Tensor, a_index: Tensor | None, b_index: Tensor | None, nb: int, block: int,
    out: Tensor | None = None, accumulate: bool = False,
) -> Tensor:
    """``(nb, b, b)`` float32 (float64 for float64 inputs); ``out``: a contiguous buffer of
    that shape and dtype it is written into (``accumulate``: added to), and returned."""
    if use_triton(a):
        from poetx.kernels.block_rotate import block_gram

        return block_gram(a, b, a_index, b_index, nb, block, out=out, accumulate=accumulate)
    result = block_gram_reference(a, b, a_index, b_index, nb, block)
    if out is None:
        return result
    return out.add_(result) if accumulate else out.copy_(result)


def _into(result: Tensor, out: Tensor | None) -> Tensor:
    return result if out is None else out.copy_(result)


def _stacked(theta: Tensor | list[Tensor]) -> Tensor:
    return theta if isinstance(theta, Tensor) else torch.cat(theta)


def rotation_delta(
    theta: Tensor | list[Tensor], block: int, terms: int | None, valid_last: int | None,
    out_dtype: torch.dtype, out: Tensor | None = None,
) -> Tensor:
    """``(nb, b(b-1)/2) -> (nb, b, b)`` blocks ``R_k - I`` in ``out_dtype`` (written into the
    contiguous ``out`` when given). ``theta`` may be a list of such tensors, stacked along
    blocks (the Triton path reads them in place, the reference concatenates them).

    Built in float32 at least (float64 when either side is float64)."""
    first = theta if isinstance(theta, Tensor) else theta[0]
    if terms is not None and use_triton(first):
        from poetx.kernels.cayley_neumann import cayley_neumann_delta

        return cayley_neumann_delta(theta, block, terms, valid_last, out_dtype, out=out)
    theta = _stacked(theta)
    wide = torch.float64 if torch.float64 in (theta.dtype, out_dtype) else torch.float32
    return _into(rotation_delta_reference(theta.to(wide), block, terms, valid_last).to(out_dtype),
                 out)


def rotation_delta_backward(
    theta: Tensor | list[Tensor], grad_delta: Tensor, block: int, terms: int | None,
    valid_last: int | None, out: Tensor | None = None,
    build_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gradient of ``sum(grad_delta * rotation_delta(theta))`` w.r.t. ``theta`` (theta's dtype;
    written into the contiguous ``out`` when given; for a list, w.r.t. the stacked tensors).
    ``build_dtype``: the ``out_dtype`` the blocks were built in (the kernels match their
    product precision to it)."""
    first = theta if isinstance(theta, Tensor) else theta[0]
    if terms is not None and use_triton(first):
        from poetx.kernels.cayley_neumann import cayley_neumann_delta_backward

        return cayley_neumann_delta_backward(theta, grad_delta, block, terms, valid_last,
                                             out=out, build_dtype=build_dtype)
    theta = _stacked(theta)
    return _into(rotation_delta_backward_reference(theta, grad_delta, block, terms,
                                                   valid_last).to(theta.dtype), out)


def swiglu_frames(gate: Tensor, up: Tensor, maps: FrameMaps) -> Tensor:
    if use_triton(gate) and gate.dtype != torch.float64:
        from poetx.kernels.frame_swiglu import swiglu_frames as kernel

        return kernel(gate, up, maps)
    return swiglu_frames_reference(gate, up, maps)


def swiglu_frames_backward(grad_h: Tensor, gate: Tensor, up: Tensor,
                           maps: FrameMaps) -> tuple[Tensor, Tensor]:
    if use_triton(grad_h) and grad_h.dtype != torch.float64:
        from poetx.kernels.frame_swiglu import swiglu_frames_backward as kernel

        return kernel(grad_h, gate, up, maps)
    return swiglu_frames_backward_reference(grad_h, gate, up, maps)


def logsumexp_pick(logits: Tensor, targets: Tensor,
                   out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(N, V)`` logits -> each row's log-sum-exp and target logit (``(N,)`` float32, float64
    for float64 logits; written into ``out`` when given)."""
    if use_triton(logits) and logits.dtype != torch.float64:
        from poetx.kernels.cross_entropy import logsumexp_pick as kernel

        return kernel(logits, targets, out)
    lse, picked = logsumexp_pick_reference(logits, targets)
    if out is None:
        return lse, picked
    return out[0].copy_(lse), out[1].copy_(picked)


def cross_entropy_grad_(logits: Tensor, lse: Tensor, targets: Tensor, row_weights: Tensor,
                        offset: int = 0) -> Tensor:
    """The logits' cross-entropy gradient, written over them (``cross_entropy_ref``)."""
    if use_triton(logits) and logits.dtype != torch.float64:
        from poetx.kernels.cross_entropy import cross_entropy_grad_ as kernel

        return kernel(logits, lse, targets, row_weights, offset)
    return logits.copy_(cross_entropy_grad_reference(logits, lse, targets, row_weights, offset))
