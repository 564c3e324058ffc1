"""The POET-X linear map as a custom op with its own backward.

``y = x P^T W0^T R^T`` computed input-centric, never forming ``R W0 P``:

    u = rotate(x, P)     gather x's columns by the input permutation, one batched block product
    v = u @ W0s^T        the only large GEMM; W0s is W0 stored in the permuted frames
    y = rotate(v, R)     batched block product, scattered back by the output permutation

Backward needs one large GEMM (``gu = gv @ W0s``; W0 is frozen, so no weight gradient) and small
block products. ``save_intermediate=True`` ("fast") keeps ``v`` and the rotation blocks for
backward; ``False`` ("mem") recomputes them, so only the input is saved, as in a dense layer.

Being a ``torch.library`` custom op, it is opaque to ``torch.compile`` and safe under
activation checkpointing; on CUDA the kernels behind ``poetx.ops.backend`` are Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from poetx.kernels.quant_ref import dequantize
from poetx.ops import backend
from poetx.ortho.layout import BlockLayout

EXACT_CAYLEY = -1


def _valid_last(dim: int, num_blocks: int, block: int) -> int | None:
    # The layer's BlockLayout is the one definition; here only its sizes reach the op.
    return BlockLayout(dim=dim, block=block).valid_last


def _terms(terms: int) -> int | None:
    return None if terms == EXACT_CAYLEY else terms


def dense_w0(w0: Tensor, w0_scale: Tensor | None, quant_group: int, dtype: torch.dtype) -> Tensor:
    """The frozen weight in ``dtype`` (dequantized with groups of ``quant_group`` columns when
    stored as int8/fp8; ``quant_group`` is ignored for float storage)."""
    if w0_scale is None:
        return w0 if w0.dtype == dtype else w0.to(dtype)
    return dequantize(w0, w0_scale, quant_group, dtype)


def _deltas(x, theta_in, theta_out, n, m, block_in, block_out, terms):
    d_in = backend.rotation_delta(
        theta_in, block_in, _terms(terms), _valid_last(n, theta_in.shape[0], block_in), x.dtype
    )
    d_out = backend.rotation_delta(
        theta_out, block_out, _terms(terms), _valid_last(m, theta_out.shape[0], block_out), x.dtype
    )
    return d_in, d_out


def _forward_rotated_input(x, w0, w0_scale, quant_group, d_in, index_in):
    n = x.shape[1]
    u = backend.rotate(x, d_in, index_in, None, n)
    return u @ dense_w0(w0, w0_scale, quant_group, x.dtype).t()


@torch.library.custom_op("poetx::poet_linear", mutates_args=())
def poet_linear_op(
    x: Tensor,
    w0: Tensor,
    w0_scale: Tensor | None,
    quant_group: int,
    theta_in: Tensor,
    theta_out: Tensor,
    index_in: Tensor,
    index_out: Tensor,
    block_in: int,
    block_out: int,
    terms: int,
    save_intermediate: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x (T, n) -> (y (T, m), v, d_in, d_out)``; ``v`` ``(T, m)`` and the blocks ``R - I``
    are returned for backward when ``save_intermediate``, else empty."""
    m, n = w0.shape
    d_in, d_out = _deltas(x, theta_in, theta_out, n, m, block_in, block_out, terms)
    v = _forward_rotated_input(x, w0, w0_scale, quant_group, d_in, index_in)
    y = backend.rotate(v, d_out, None, index_out, m)
    if not save_intermediate:
        return y, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return y, v, d_in, d_out


@poet_linear_op.register_fake
def _(x, w0, w0_scale, quant_group, theta_in, theta_out, index_in, index_out, block_in, block_out,
      terms, save_intermediate):
    m, n = w0.shape
    y = x.new_empty(x.shape[0], m)
    if not save_intermediate:
        return y, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    d_in = x.new_empty(theta_in.shape[0], block_in, block_in)
    d_out = x.new_empty(theta_out.shape[0], block_out, block_out)
    return y, x.new_empty(x.shape[0], m), d_in, d_out


@torch.library.custom_op("poetx::poet_linear_backward", mutates_args=())
def poet_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    v: Tensor,
    d_in: Tensor,
    d_out: Tensor,
    w0: Tensor,
    w0_scale: Tensor | None,
    quant_group: int,
    theta_in: Tensor,
    theta_out: Tensor,
    index_in: Tensor,
    index_out: Tensor,
    block_in: int,
    block_out: int,
    terms: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dx (T, n), dtheta_in, dtheta_out)``; empty ``v``/blocks are recomputed."""
    m, n = w0.shape
    grad_y = grad_y.contiguous()
    if d_in.numel() == 0:
        d_in, d_out = _deltas(x, theta_in, theta_out, n, m, block_in, block_out, terms)
    weight = dense_w0(w0, w0_scale, quant_group, x.dtype)
    if v.numel() == 0:
        v = backend.rotate(x, d_in, index_in, None, n) @ weight.t()
    nb_in, nb_out = theta_in.shape[0], theta_out.shape[0]
    grad_v = backend.rotate(grad_y, d_out, index_out, None, m, transpose=True)
    grad_d_out = backend.gram(grad_y, v, index_out, None, nb_out, block_out)
    grad_u = grad_v @ weight
    grad_d_in = backend.gram(grad_u, x, None, index_in, nb_in, block_in)
    grad_x = backend.rotate(grad_u, d_in, None, index_in, n, transpose=True)
    t = _terms(terms)
    grad_theta_in = backend.rotation_delta_backward(
        theta_in, grad_d_in, block_in, t, _valid_last(n, nb_in, block_in)
    )
    grad_theta_out = backend.rotation_delta_backward(
        theta_out, grad_d_out, block_out, t, _valid_last(m, nb_out, block_out)
    )
    return grad_x, grad_theta_in, grad_theta_out


@poet_linear_backward_op.register_fake
def _(grad_y, x, v, d_in, d_out, w0, w0_scale, quant_group, theta_in, theta_out, index_in,
      index_out, block_in, block_out, terms):
    return torch.empty_like(x), torch.empty_like(theta_in), torch.empty_like(theta_out)


def _setup_context(ctx, inputs, output):
    (x, w0, w0_scale, quant_group, theta_in, theta_out, index_in, index_out, block_in, block_out,
     terms, _save) = inputs
    _, v, d_in, d_out = output
    ctx.save_for_backward(x, v, d_in, d_out, w0, w0_scale, theta_in, theta_out, index_in,
                          index_out)
    ctx.quant_group = quant_group
    ctx.geometry = (block_in, block_out, terms)
    # The extra outputs only carry saved state: don't zero-fill gradients for them.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, *_unused_grads):
    saved = ctx.saved_tensors
    x = saved[0]
    if grad_y is None:
        grad_y = x.new_zeros(x.shape[0], saved[4].shape[0])
    x, v, d_in, d_out, w0, w0_scale, *rest = saved
    grad_x, grad_theta_in, grad_theta_out = poet_linear_backward_op(
        grad_y, x, v, d_in, d_out, w0, w0_scale, ctx.quant_group, *rest, *ctx.geometry
    )
    return (grad_x, None, None, None, grad_theta_in, grad_theta_out, None, None, None, None, None,
            None)


poet_linear_op.register_autograd(_backward, setup_context=_setup_context)


def poet_linear(
    x: Tensor,
    w0: Tensor,
    w0_scale: Tensor | None,
    quant_group: int,
    theta_in: Tensor,
    theta_out: Tensor,
    index_in: Tensor,
    index_out: Tensor,
    block_in: int,
    block_out: int,
    terms: int | None,
    save_intermediate: bool,
) -> Tensor:
    """Functional POET-X linear map (no bias) for ``x`` of shape ``(..., n)``; returns ``(..., m)``.

    Args:
        w0: ``(m, n)`` frozen weight in the permuted frames (float, int8 or float8_e4m3fn).
        w0_scale: ``(m, groups)`` float32 scales for int8/fp8 ``w0``, else ``None``.
        quant_group: columns per scale group of int8/fp8 ``w0`` (see ``poetx.kernels.quant_ref``).
        theta_in / theta_out: ``(nb, b(b-1)/2)`` skew parameters of ``P`` / ``R``.
        index_in / index_out: padded permutations ``(nb*b,)``, ``-1`` for phantom coordinates.
        terms: Neumann terms, ``None`` for the exact Cayley map.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Mixed precision (Trainer(bf16=True), accelerate): compute as a model stored in the
        # autocast dtype does. Left on inside the op, autocast would give outputs (and so
        # backward's incoming gradients) another dtype than the saved input.
        with torch.autocast(device_type, enabled=False):
            return poet_linear(x.to(torch.get_autocast_dtype(device_type)), w0, w0_scale,
                               quant_group, theta_in, theta_out, index_in, index_out, block_in,
                               block_out, terms, save_intermediate)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = poet_linear_op(
        x2, w0, w0_scale, quant_group, theta_in, theta_out, index_in, index_out, block_in,
        block_out, EXACT_CAYLEY if terms is None else terms, save_intermediate,
    )[0]
    return y.reshape(*lead, w0.shape[0])
