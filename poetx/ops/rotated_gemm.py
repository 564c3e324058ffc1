"""The POET-X linear map as a custom op with its own backward.

``y = x P^T W0^T R^T`` computed input-centric, never forming ``R W0 P``:

    u = rotate(x, P)     gather x's columns by the input permutation, one batched block product
    v = u @ W0s^T        the only large GEMM; W0s is W0 stored in the permuted frames
    y = rotate(v, R)     batched block product, scattered back by the output permutation

Backward needs one large GEMM (``gu = gv @ W0s``; W0 is frozen, so no weight gradient) and small
block products. ``save_intermediate=True`` ("fast") keeps ``v`` and the rotation blocks for
backward; ``False`` ("mem") recomputes them, so only the input is saved, as in a dense layer.
``save_permuted`` saves the input as the forward permuted it instead of as given: for a layer
whose input nothing else keeps for backward (an MLP's down projection) it costs no memory and
spares backward the permutation pass its Gram (and in "mem" mode its recomputed ``v``) needs.

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

# Attribute of a gradient handle naming where its block gradient is added up (see
# ``poetx.ops.rotation_group.GradientSlot``).
GRADIENT_SLOT = "_poetx_gradient_slot"


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


def _forward_rotated_input(x, w0, w0_scale, quant_group, d_in, index_in, n=None):
    u = backend.rotate(x, d_in, index_in, None, x.shape[1] if n is None else n)
    return u @ dense_w0(w0, w0_scale, quant_group, x.dtype).t()


def _forward_blocks(x, w0, w0_scale, quant_group, d_in, d_out, index_in, index_out,
                    x_perm=None):
    """``(y, v)`` from ready blocks ``d_in`` / ``d_out`` (``R - I``, x's dtype); ``x_perm``:
    ``x`` already gathered by ``index_in`` (``(T, nb_in * b)``, from ``poetx.ops.fan_out``)."""
    m, n = w0.shape
    if x_perm is None:
        v = _forward_rotated_input(x, w0, w0_scale, quant_group, d_in, index_in)
    else:
        v = _forward_rotated_input(x_perm, w0, w0_scale, quant_group, d_in, None, n)
    return backend.rotate(v, d_out, None, index_out, m), v


def _backward_blocks(grad_y, x, v, d_in, d_out, w0, w0_scale, quant_group, index_in, index_out,
                     permuted_grad=False, x_permuted=False, into_in=None, into_out=None,
                     add_in=False, add_out=False):
    """``(dx (T, n), grad_d_in, grad_d_out)`` (block gradients float32, float64 for float64
    inputs); an empty ``v`` is recomputed from ``x``. ``permuted_grad``: ``dx`` in the
    permuted frame, ``(T, nb_in * b)`` (the gradient of a ``fan_out`` copy). ``x_permuted``:
    ``x`` is already gathered by ``index_in``, ``(T, nb_in * b)``. ``into_in`` / ``into_out``:
    buffers of the block gradients' shape and dtype that they are written into (``add_*``:
    added to), then returned as given."""
    m, n = w0.shape
    grad_y = grad_y.contiguous()
    weight = dense_w0(w0, w0_scale, quant_group, x.dtype)
    # A tensor two products read in the permuted frame is permuted once (the products would
    # each permute it): x in mem mode (the recomputed v, then the Gram), grad_y (its rotation
    # and its Gram). Each (T, m) / (T, n) temporary is dropped after its last use, so fewer of
    # them are alive at once.
    x_in, index_x = x, (None if x_permuted else index_in)
    if v.numel() == 0:
        if not x_permuted:
            x_in, index_x = backend.gather(x, index_in, d_in.shape[0] * d_in.shape[1])
        v = backend.rotate(x_in, d_in, index_x, None, n) @ weight.t()
    grad_y, index_y = backend.gather(grad_y, index_out, d_out.shape[0] * d_out.shape[1])
    grad_v = backend.rotate(grad_y, d_out, index_y, None, m, transpose=True)
    grad_d_out = backend.gram(grad_y, v, index_y, None, d_out.shape[0], d_out.shape[1],
                              into_out, add_out)
    del grad_y, v
    grad_u = grad_v @ weight
    del grad_v
    grad_d_in = backend.gram(grad_u, x_in, None, index_x, d_in.shape[0], d_in.shape[1],
                             into_in, add_in)
    del x_in
    if permuted_grad:
        positions = d_in.shape[0] * d_in.shape[1]
        return (backend.rotate(grad_u, d_in, None, None, positions, transpose=True), grad_d_in,
                grad_d_out)
    grad_x = backend.rotate(grad_u, d_in, None, index_in, n, transpose=True)
    return grad_x, grad_d_in, grad_d_out


@torch.library.custom_op("poetx::poet_linear", mutates_args=())
def poet_linear_op(
    x: Tensor,
    w0: Tensor,
    w0_scale: Tensor | None,
    quant_group: int,
    theta_in: Tensor,
    theta_out: Tensor,
    index_in: Tensor | None,
    index_out: Tensor | None,
    block_in: int,
    block_out: int,
    terms: int,
    save_intermediate: bool,
    save_permuted: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x (T, n) -> (y (T, m), v, d_in, d_out, x_perm)``; ``v`` ``(T, m)`` and the blocks
    ``R - I`` are returned for backward when ``save_intermediate``, ``x_perm`` (``x`` gathered
    by ``index_in``, ``(T, nb_in * b)``) when ``save_permuted``, else empty."""
    m, n = w0.shape
    d_in, d_out = _deltas(x, theta_in, theta_out, n, m, block_in, block_out, terms)
    x_perm = (_permuted_input(x, index_in, d_in) if save_permuted and index_in is not None
              else None)
    y, v = _forward_blocks(x, w0, w0_scale, quant_group, d_in, d_out, index_in, index_out,
                           x_perm)
    kept = x.new_empty(0) if x_perm is None else x_perm
    if not save_intermediate:
        return y, x.new_empty(0), x.new_empty(0), x.new_empty(0), kept
    return y, v, d_in, d_out, kept


@poet_linear_op.register_fake
def _(x, w0, w0_scale, quant_group, theta_in, theta_out, index_in, index_out, block_in, block_out,
      terms, save_intermediate, save_permuted=False):
    m, n = w0.shape
    y = x.new_empty(x.shape[0], m)
    kept = (x.new_empty(x.shape[0], theta_in.shape[0] * block_in)
            if save_permuted and index_in is not None else x.new_empty(0))
    if not save_intermediate:
        return y, x.new_empty(0), x.new_empty(0), x.new_empty(0), kept
    d_in = x.new_empty(theta_in.shape[0], block_in, block_in)
    d_out = x.new_empty(theta_out.shape[0], block_out, block_out)
    return y, x.new_empty(x.shape[0], m), d_in, d_out, kept


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
    index_in: Tensor | None,
    index_out: Tensor | None,
    block_in: int,
    block_out: int,
    terms: int,
    x_permuted: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dx (T, n), dtheta_in, dtheta_out)``; empty ``v``/blocks are recomputed.
    ``x_permuted``: ``x`` is the forward's permuted copy ``(T, nb_in * b)``."""
    m, n = w0.shape
    if d_in.numel() == 0:
        d_in, d_out = _deltas(x, theta_in, theta_out, n, m, block_in, block_out, terms)
    grad_x, grad_d_in, grad_d_out = _backward_blocks(grad_y, x, v, d_in, d_out, w0, w0_scale,
                                                     quant_group, index_in, index_out,
                                                     x_permuted=x_permuted)
    nb_in, nb_out = theta_in.shape[0], theta_out.shape[0]
    t = _terms(terms)
    grad_theta_in = backend.rotation_delta_backward(
        theta_in, grad_d_in, block_in, t, _valid_last(n, nb_in, block_in), build_dtype=x.dtype
    )
    grad_theta_out = backend.rotation_delta_backward(
        theta_out, grad_d_out, block_out, t, _valid_last(m, nb_out, block_out), build_dtype=x.dtype
    )
    return grad_x, grad_theta_in, grad_theta_out


@poet_linear_backward_op.register_fake
def _(grad_y, x, v, d_in, d_out, w0, w0_scale, quant_group, theta_in, theta_out, index_in,
      index_out, block_in, block_out, terms, x_permuted=False):
    dx = x.new_empty(x.shape[0], w0.shape[1])
    return dx, torch.empty_like(theta_in), torch.empty_like(theta_out)


def _setup_context(ctx, inputs, output):
    (x, w0, w0_scale, quant_group, theta_in, theta_out, index_in, index_out, block_in, block_out,
     terms, _save, save_permuted) = inputs
    _, v, d_in, d_out, x_perm = output
    kept = x_perm if save_permuted and index_in is not None else x
    ctx.save_for_backward(kept, v, d_in, d_out, w0, w0_scale, theta_in, theta_out, index_in,
                          index_out)
    ctx.x_permuted = kept is not x
    ctx.quant_group = quant_group
    ctx.geometry = (block_in, block_out, terms)
    # The extra outputs only carry saved state: don't zero-fill gradients for them.
    ctx.set_materialize_grads(False)


def _zero_grad_y(grad_y, x, w0):
    return x.new_zeros(x.shape[0], w0.shape[0]) if grad_y is None else grad_y


def _permuted_input(x: Tensor, index_in: Tensor, d_in: Tensor) -> Tensor:
    return backend.permute(x, index_in, d_in.shape[0] * d_in.shape[1])


def _backward(ctx, grad_y, *_unused_grads):
    x, v, d_in, d_out, w0, w0_scale, *rest = ctx.saved_tensors
    grad_x, grad_theta_in, grad_theta_out = poet_linear_backward_op(
        _zero_grad_y(grad_y, x, w0), x, v, d_in, d_out, w0, w0_scale, ctx.quant_group, *rest,
        *ctx.geometry, ctx.x_permuted
    )
    return (grad_x, None, None, None, grad_theta_in, grad_theta_out, None, None, None, None, None,
            None, None)


poet_linear_op.register_autograd(_backward, setup_context=_setup_context)


# Prebuilt blocks -------------------------------------------------------------------------------
# The same map with ``R - I`` / ``P - I`` built outside (``poetx.ops.rotation_group`` builds the
# blocks of many layers in one launch). Its backward stops at the blocks: it returns their
# float32 gradients through ``grad_in`` / ``grad_out``, float32 tensors of the blocks' shape
# whose values are never read (zero-stride handles): autograd would round a gradient to the
# dtype of the input it belongs to, and the blocks are bf16 in a bf16 model. A handle that
# carries a ``GRADIENT_SLOT`` gets the gradient written into that slot instead (the Gram
# stores or adds there) and only the handle itself back, as a token.


@torch.library.custom_op("poetx::poet_linear_blocks", mutates_args=())
def poet_linear_blocks_op(
    x: Tensor,
    w0: Tensor,
    w0_scale: Tensor | None,
    quant_group: int,
    d_in: Tensor,
    d_out: Tensor,
    grad_in: Tensor,
    grad_out: Tensor,
    index_in: Tensor | None,
    index_out: Tensor | None,
    save_intermediate: bool,
    x_perm: Tensor | None = None,
    save_permuted: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``x (T, n) -> (y (T, m), v, kept)`` with blocks ``d_in`` ``(nb_in, b, b)``, ``d_out``
    ``(nb_out, b, b)`` in x's dtype; ``v`` is empty unless ``save_intermediate``. With
    ``x_perm`` (``x`` gathered by ``index_in``) the forward reads it instead of gathering ``x``,
    and the input gradient goes to ``x_perm``, in the permuted frame. ``save_permuted``:
    backward keeps the permuted input, ``x_perm`` or, without it, the op's own gather, returned
    as ``kept`` ``(T, nb_in * b)`` (else ``kept`` is empty)."""
    own = (_permuted_input(x, index_in, d_in)
           if save_permuted and x_perm is None and index_in is not None else None)
    y, v = _forward_blocks(x, w0, w0_scale, quant_group, d_in, d_out, index_in, index_out,
                           x_perm if own is None else own)
    return (y, (v if save_intermediate else x.new_empty(0)),
            x.new_empty(0) if own is None else own)


@poet_linear_blocks_op.register_fake
def _(x, w0, w0_scale, quant_group, d_in, d_out, grad_in, grad_out, index_in, index_out,
      save_intermediate, x_perm=None, save_permuted=False):
    y = x.new_empty(x.shape[0], w0.shape[0])
    v = x.new_empty(x.shape[0], w0.shape[0]) if save_intermediate else x.new_empty(0)
    own = save_permuted and x_perm is None and index_in is not None
    kept = x.new_empty(x.shape[0], d_in.shape[0] * d_in.shape[1]) if own else x.new_empty(0)
    return y, v, kept


@torch.library.custom_op("poetx::poet_linear_blocks_backward",
                         mutates_args=("into_in", "into_out"))
def poet_linear_blocks_backward_op(
    grad_y: Tensor,
    x: Tensor,
    v: Tensor,
    d_in: Tensor,
    d_out: Tensor,
    w0: Tensor,
    w0_scale: Tensor | None,
    quant_group: int,
    index_in: Tensor | None,
    index_out: Tensor | None,
    permuted_grad: bool,
    x_permuted: bool,
    into_in: Tensor | None,
    into_out: Tensor | None,
    add_in: bool,
    add_out: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx (T, n), grad_d_in, grad_d_out)``, block gradients float32 (float64 for float64);
    ``permuted_grad``: ``dx`` ``(T, nb_in * b)`` in the permuted frame; ``x_permuted``: ``x``
    is the forward's permuted input ``(T, nb_in * b)``. ``into_in`` / ``into_out``: contiguous
    buffers of a block gradient's shape and dtype that it is written into (``add_*``: added
    to); that gradient is then returned empty. No argument has a default: torch 2.11's boxed
    dispatch drops trailing arguments equal to their defaults, and its in-place bookkeeping
    then indexes a mutated argument past the end (IndexError)."""
    grad_x, grad_d_in, grad_d_out = _backward_blocks(
        grad_y, x, v, d_in, d_out, w0, w0_scale, quant_group, index_in, index_out, permuted_grad,
        x_permuted, into_in, into_out, add_in, add_out)
    # A custom op may not return (an alias of) an argument it mutates.
    return (grad_x, x.new_empty(0) if into_in is not None else grad_d_in,
            x.new_empty(0) if into_out is not None else grad_d_out)


@poet_linear_blocks_backward_op.register_fake
def _(grad_y, x, v, d_in, d_out, w0, w0_scale, quant_group, index_in, index_out,
      permuted_grad, x_permuted, into_in, into_out, add_in, add_out):
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = x.new_empty(x.shape[0], d_in.shape[0] * d_in.shape[1] if permuted_grad else w0.shape[1])
    return (dx, x.new_empty(0) if into_in is not None else d_in.new_empty(d_in.shape, dtype=wide),
            x.new_empty(0) if into_out is not None else d_out.new_empty(d_out.shape, dtype=wide))


def _setup_blocks_context(ctx, inputs, output):
    (x, w0, w0_scale, quant_group, d_in, d_out, _gin, _gout, index_in, index_out, _save,
     x_perm, save_permuted) = inputs
    # With x_perm the shared, unpermuted x is what stays saved (the Gram gathers it again), so
    # the layers reading one input keep one saved copy, as without the fan-out.
    if save_permuted and x_perm is not None:
        kept = x_perm
    elif save_permuted and index_in is not None:
        kept = output[2]  # the op's own gather
    else:
        kept = x
    ctx.save_for_backward(kept, output[1], d_in, d_out, w0, w0_scale, index_in, index_out)
    ctx.quant_group = quant_group
    ctx.permuted = x_perm is not None
    ctx.x_permuted = kept is not x
    # Handles of a poetx.ops.rotation_group build name the slot of its gradient buffer that
    # the Grams write into; their own gradient is then only a zero-stride token (the handle).
    ctx.slots = tuple(getattr(h, GRADIENT_SLOT, None) for h in (_gin, _gout))
    ctx.tokens = tuple(h.detach() for h in (_gin, _gout))
    ctx.set_materialize_grads(False)


def _backward_prebuilt(ctx, grad_y, _grad_v, _grad_kept):
    x, v, d_in, d_out, w0, w0_scale, index_in, index_out = ctx.saved_tensors
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Slots of the Grams' dtype take them directly; another dtype's gets the result converted.
    direct = [slot if slot is not None and slot.dtype == wide else None for slot in ctx.slots]
    into, add = zip(*[slot.target() if slot is not None else (None, False) for slot in direct],
                    strict=True)
    grad_x, grad_d_in, grad_d_out = poet_linear_blocks_backward_op(
        _zero_grad_y(grad_y, x, w0), x, v, d_in, d_out, w0, w0_scale, ctx.quant_group, index_in,
        index_out, ctx.permuted, ctx.x_permuted, *into, *add)
    grad_d = []
    for slot, token, target, g in zip(ctx.slots, ctx.tokens, into, (grad_d_in, grad_d_out),
                                      strict=True):
        if slot is not None and target is None:
            slot.sink.receive(slot.i, g.to(slot.dtype))
        grad_d.append(g if slot is None else token)
    grads_x = (None, grad_x) if ctx.permuted else (grad_x, None)
    return (grads_x[0], None, None, None, None, None, grad_d[0], grad_d[1], None, None, None,
            grads_x[1], None)


poet_linear_blocks_op.register_autograd(_backward_prebuilt, setup_context=_setup_blocks_context)


def _flat_input(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def op_dtype(x: Tensor) -> torch.dtype:
    """The dtype the op computes ``x`` in: autocast's when it is on, else ``x``'s."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def poet_linear_prebuilt(
    x: Tensor,
    w0: Tensor,
    w0_scale: Tensor | None,
    quant_group: int,
    d_in: Tensor,
    d_out: Tensor,
    grad_in: Tensor,
    grad_out: Tensor,
    index_in: Tensor | None,
    index_out: Tensor | None,
    save_intermediate: bool,
    x_perm: Tensor | None = None,
    save_permuted: bool = False,
) -> Tensor:
    """:func:`poet_linear` with the blocks ``d_in`` / ``d_out`` (``R - I``, in
    ``op_dtype(x)``) given; their gradients flow to the float32 handles ``grad_in`` /
    ``grad_out`` (same shapes). ``x`` ``(..., n)`` -> ``(..., m)``. ``x_perm``: ``x`` flattened
    to ``(T, n)`` and gathered by ``index_in`` (a ``poetx.ops.fan_out`` copy, in the op's
    dtype); the input gradient then flows to it instead of to ``x``. ``save_permuted``: as in
    :func:`poet_linear`."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return poet_linear_prebuilt(x.to(torch.get_autocast_dtype(device_type)), w0,
                                        w0_scale, quant_group, d_in, d_out, grad_in, grad_out,
                                        index_in, index_out, save_intermediate, x_perm,
                                        save_permuted)
    lead = x.shape[:-1]
    y = poet_linear_blocks_op(_flat_input(x), w0, w0_scale, quant_group, d_in, d_out, grad_in,
                              grad_out, index_in, index_out, save_intermediate, x_perm,
                              save_permuted)[0]
    return y.reshape(*lead, w0.shape[0])


def poet_linear(
    x: Tensor,
    w0: Tensor,
    w0_scale: Tensor | None,
    quant_group: int,
    theta_in: Tensor,
    theta_out: Tensor,
    index_in: Tensor | None,
    index_out: Tensor | None,
    block_in: int,
    block_out: int,
    terms: int | None,
    save_intermediate: bool,
    save_permuted: bool = False,
) -> Tensor:
    """Functional POET-X linear map (no bias) for ``x`` of shape ``(..., n)``; returns ``(..., m)``.

    Args:
        w0: ``(m, n)`` frozen weight in the permuted frames (float, int8 or float8_e4m3fn).
        w0_scale: ``(m, groups)`` float32 scales for int8/fp8 ``w0``, else ``None``.
        quant_group: columns per scale group of int8/fp8 ``w0`` (see ``poetx.kernels.quant_ref``).
        theta_in / theta_out: ``(nb, b(b-1)/2)`` skew parameters of ``P`` / ``R``.
        index_in / index_out: padded permutations ``(nb*b,)``, ``-1`` for phantom coordinates.
        terms: Neumann terms, ``None`` for the exact Cayley map.
        save_intermediate: keep ``v`` and the blocks for backward ("fast" mode).
        save_permuted: backward keeps ``x`` as the forward permuted it, ``(T, nb_in * b)``,
            instead of ``x``; worth it only where nothing else keeps ``x`` alive.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Mixed precision (Trainer(bf16=True), accelerate): compute as a model stored in the
        # autocast dtype does. Left on inside the op, autocast would give outputs (and so
        # backward's incoming gradients) another dtype than the saved input.
        with torch.autocast(device_type, enabled=False):
            return poet_linear(x.to(torch.get_autocast_dtype(device_type)), w0, w0_scale,
                               quant_group, theta_in, theta_out, index_in, index_out, block_in,
                               block_out, terms, save_intermediate, save_permuted)
    lead = x.shape[:-1]
    y = poet_linear_op(
        _flat_input(x), w0, w0_scale, quant_group, theta_in, theta_out, index_in, index_out,
        block_in, block_out, EXACT_CAYLEY if terms is None else terms, save_intermediate,
        save_permuted,
    )[0]
    return y.reshape(*lead, w0.shape[0])
