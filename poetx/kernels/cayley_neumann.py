"""Triton kernels of the Cayley-Neumann map from half-stored skew parameters, and its backward.

The blocks are ``R_k - I = sum_p c_p Q_k^p`` (``p = 1 .. terms+1``, ``c = [2, .., 2, 1]``) of the
skew ``Q_k`` whose strict upper triangle is row ``k`` of ``theta`` (``(nb, b(b-1)/2)``, row-major,
the order of ``torch.triu_indices(b, b, 1)``). ``valid_last < b`` zeroes the rows and columns
``>= valid_last`` of the last block's ``Q``.

Design
------
Fast path (``b`` a multiple of 16, ``terms = 3``, the default; dense tiles through TMA):

* ``_cn_prep_kernel`` reads the half storage once and writes ``P = +-2Q`` dense (one launch for
  all blocks; the backward also writes ``K = G - G^T`` and ``Sy = G + G^T``). Building ``Q``
  tiles inside the product loops instead (the general path below) was ALU-bound on the index
  arithmetic: 9-16 TFLOP/s on H100.
* Several skew tensors (the sides of a batched build, ``poetx.ops.rotation_group``) are read in
  place: the prep kernel and the forward epilogue find block ``k``'s parameters at
  ``theta + rows[k]`` (:func:`_theta_rows`, an int64 table remembered per pointers and sizes so
  a captured step replays one made in its warm-up), instead of a concatenated copy.
* Forward, 3 launches: prep (``N = -2Q``); ``S = Q Q``; ``delta = S (S + N)^T + 2S + 2Q``
  (``= 2Q + 2Q^2 + 2Q^3 + Q^4``) in one accumulator, two ``b^3`` products per block. Every B
  operand is read K-major at ``[J, kk]`` using ``S^T = S`` and ``N^T = -N`` (tf32 wgmma wants
  K-major).
* Backward, 3 launches, from the closed form (``S = Q^2``, ``U = Sy Q``, ``V = K Q``)::

      W = K - 2U + (2V + V^T) Q - (U - U^T) S,   dtheta = (W - W^T)[upper]

  which equals the reference's ``sum_p c_p sum_{a+b=p-1} (Q^a)^T G (Q^b)^T`` after
  skew-symmetrization: prep; ``S, U, V`` sharing the ``Q`` tile; then ``W[I,J]`` and
  ``W[J,I]`` for each tile pair ``I <= J`` (one product for ``I = J``) with the skew part
  packed straight into ``dtheta``.
* Shapes (:func:`_fast_config`): 64 x 64 tiles (32, 16 where 64 does not divide ``b``).
  128-row tiles (``OPTIONS["tile"] = 128``: 128 x 128 forward, 128 x 64 S/U/V with its three
  accumulators; the W pairs hold two tiles and stay at most 64 x 64 unless ``"tile_w"``
  says otherwise) were measured 4% slower at Llama-8B's b = 256 on H100 (fewer, longer
  programs for 132 SMs; 247 registers in the forward epilogue), so they are opt-in.
  With bf16 products the dense operands are *stored* in bf16 (half the bytes; the tensor
  cores read them straight from shared memory): 1.5x faster than tf32 on H100, where bf16
  products of fp32 buffers converted in registers had measured no faster than tf32 (the
  converted B operand goes back through shared memory). The first-order terms stay exact
  either way: ``2Q`` is rebuilt from ``theta`` in the last forward epilogue, ``2K`` from the
  fp32 ``G`` in the W epilogue.

A row-panel variant (one program per block and 64-row panel running all of the block's
products, 2 launches per direction instead of 3) was built and measured 1.3-1.8x slower on
H100 (``bench/notes_kernels.md``, runs 7-8; its last version is at commit 5a03a3e), so the
3-launch path stays.

General path (any ``b >= 2``, any ``terms``): ``_cn_matmul_kernel`` builds ``Q`` tiles from
``theta`` on the fly (upper part loaded along columns, lower part as the transposed tile, both
coalesced) and computes ``A @ B + e_i I + e_q Q``; ``terms = 3`` is ``S = Q Q`` then
``delta = S (S + 2I + 2Q) + 2Q``, other ``terms`` Horner's rule ``H <- c_p I + Q H``. The
general backward (``terms = 3``) uses the same closed form in four launches; other ``terms``
run the PyTorch reference (float32) inside :func:`cayley_neumann_delta_backward`.

Products use tensor cores with fp32 accumulation. Defaults: a bfloat16 build (and the backward
of one, ``build_dtype``) uses bf16 products on the fast path; a float16 build tf32; a float32
build ``"tf32x3"`` (about float32 accuracy) forward and tf32 backward. ``POETX_CAYLEY_PRECISION``
in ``{tf32, tf32x3, ieee, bf16}`` overrides both. bf16 products suit a bf16 build: the blocks are
rounded to bf16 (2^-9 relative) anyway, the first-order terms (``2Q`` forward,
``2(G - G^T)`` backward) stay float32, and the product terms are ``O(|Q|)`` of the result, so
bf16's extra error (2^-9 per operand) is a fraction ``O(|Q|)`` of the bf16 rounding of the
blocks; on ``dtheta`` it is ~1e-4 relative (3e-5 with tf32) at ``||Q||_F = 0.5``. bf16 applies
to ``terms = 3`` only (the other forward paths form ``2Q`` inside a product, and run tf32).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from poetx.ortho.cayley import (  # noqa: F401  (references the kernels are tested against)
    neumann_coefficients,
    rotation_delta_backward_reference,
    rotation_delta_reference,
)

_PRECISIONS = ("tf32", "tf32x3", "ieee", "bf16")


def _interpreting() -> bool:
    """Whether this module's kernels were built by the interpreter (``TRITON_INTERPRET=1``)."""
    return not isinstance(_cn_matmul_kernel, triton.runtime.JITFunction)


def _precision(default: str) -> str:
    p = os.environ.get("POETX_CAYLEY_PRECISION", default)
    if p not in _PRECISIONS:
        raise ValueError(f"POETX_CAYLEY_PRECISION must be one of {_PRECISIONS}, got {p!r}")
    if p == "bf16" and _interpreting():
        # Triton 3.6's interpreter returns garbage for bf16 dots; products of bf16-rounded
        # operands accumulated in float32 are what the tensor cores compute.
        return "bf16-emulated"
    return p


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` on tensor cores: fp32 operands as ``PREC`` (tf32 flavours, ieee), or
    rounded to bf16 (``"bf16"``, twice tf32's rate)."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PREC == "bf16-emulated":  # the same numbers where bf16 dots are unavailable
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                      input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _block_tile(b, BM: tl.constexpr, BN: tl.constexpr):
    """This program's ``(block k, tile row, tile column)``: each ``b x b`` block is cut into
    ``ceil(b/BM) x ceil(b/BN)`` output tiles, launched block after block."""
    pid = tl.program_id(0)
    tiles_n = (b + BN - 1) // BN
    per_block = ((b + BM - 1) // BM) * tiles_n
    rem = pid % per_block
    return pid // per_block, rem // tiles_n, rem % tiles_n


@triton.jit
def _q_tile(theta_ptr, row_off, rows, cols, b, vl):
    """Tile ``Q[rows, cols]`` (fp32) of one block, half storage at ``theta_ptr + row_off``."""
    r = rows[:, None]
    c = cols[None, :]
    # upper part, r < c: theta[idx(r, c)], contiguous along c
    up_mask = (r < c) & (c < vl)
    up = tl.load(theta_ptr + row_off + (r * (2 * b - r - 1)) // 2 + (c - r - 1), mask=up_mask,
                 other=0.0)
    # lower part, r > c: -theta[idx(c, r)]; loaded as the transposed tile (contiguous along r)
    ct = cols[:, None]
    rt = rows[None, :]
    lo_mask = (ct < rt) & (rt < vl)
    lo = tl.load(theta_ptr + row_off + (ct * (2 * b - ct - 1)) // 2 + (rt - ct - 1), mask=lo_mask,
                 other=0.0)
    return up - tl.trans(lo)


@triton.jit
def _cn_matmul_kernel(
    theta_ptr, a_ptr, b_ptr, out_ptr,
    b, nb, vl_last, npar,
    e_i, e_q, b_i, b_q,
    A_FROM_Q: tl.constexpr, B_SCRATCH: tl.constexpr, B_HAS_Q: tl.constexpr,
    E_HAS_Q: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``out[k] = A_k @ (B_scratch_k + b_i I + b_q Q_k) + e_i I + e_q Q_k`` for tile
    ``(rows, cols)`` of block ``k``; ``A_k`` is ``Q_k`` or ``a_ptr[k]`` (fp32 ``(nb, b, b)``)."""
    k, tm, tn = _block_tile(b, BM, BN)
    rows = tm * BM + tl.arange(0, BM)
    cols = tn * BN + tl.arange(0, BN)
    vl = tl.where(k == nb - 1, vl_last, b)
    row_off = k.to(tl.int64) * npar
    base = k.to(tl.int64) * b * b
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for kk in range(0, b, BK):
        ks = kk + tl.arange(0, BK)
        if A_FROM_Q:
            a = _q_tile(theta_ptr, row_off, rows, ks, b, vl)
        else:
            a = tl.load(a_ptr + base + rows[:, None] * b + ks[None, :],
                        mask=(rows[:, None] < b) & (ks[None, :] < b), other=0.0)
        bt = tl.where((ks[:, None] == cols[None, :]) & (cols[None, :] < b), b_i, 0.0)
        if B_HAS_Q:
            bt += b_q * _q_tile(theta_ptr, row_off, ks, cols, b, vl)
        if B_SCRATCH:
            bt += tl.load(b_ptr + base + ks[:, None] * b + cols[None, :],
                          mask=(ks[:, None] < b) & (cols[None, :] < b), other=0.0)
        acc = _mma(a, bt, acc, PREC)
    acc += tl.where(rows[:, None] == cols[None, :], e_i, 0.0)
    if E_HAS_Q:
        acc += e_q * _q_tile(theta_ptr, row_off, rows, cols, b, vl)
    mask = (rows[:, None] < b) & (cols[None, :] < b)
    tl.store(out_ptr + base + rows[:, None] * b + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cn_bwd_uv_kernel(
    theta_ptr, g_ptr, u_ptr, v_ptr, b, nb, vl_last, npar,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``P1 = G Q``, ``P2 = G^T Q``; ``U = P1 + P2 (= (G + G^T) Q)``, ``V = P1 - P2``."""
    k, tm, tn = _block_tile(b, BM, BN)
    rows = tm * BM + tl.arange(0, BM)
    cols = tn * BN + tl.arange(0, BN)
    vl = tl.where(k == nb - 1, vl_last, b)
    row_off = k.to(tl.int64) * npar
    base = k.to(tl.int64) * b * b
    acc1 = tl.full((BM, BN), 0.0, tl.float32)
    acc2 = tl.full((BM, BN), 0.0, tl.float32)
    for kk in range(0, b, BK):
        ks = kk + tl.arange(0, BK)
        m_rk = (rows[:, None] < b) & (ks[None, :] < b)
        g = tl.load(g_ptr + base + rows[:, None] * b + ks[None, :], mask=m_rk, other=0.0)
        gt = tl.load(g_ptr + base + ks[:, None] * b + rows[None, :],
                     mask=(ks[:, None] < b) & (rows[None, :] < b), other=0.0)
        q = _q_tile(theta_ptr, row_off, ks, cols, b, vl)
        acc1 = _mma(g, q, acc1, PREC)
        acc2 = _mma(tl.trans(gt), q, acc2, PREC)
    mask = (rows[:, None] < b) & (cols[None, :] < b)
    off = base + rows[:, None] * b + cols[None, :]
    tl.store(u_ptr + off, acc1 + acc2, mask=mask)
    tl.store(v_ptr + off, acc1 - acc2, mask=mask)


@triton.jit
def _cn_bwd_w_kernel(
    theta_ptr, g_ptr, u_ptr, v_ptr, s_ptr, w_ptr, b, nb, vl_last, npar,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``W = (G - G^T) - 2U + (2V + V^T) Q - (U - U^T) S``."""
    k, tm, tn = _block_tile(b, BM, BN)
    rows = tm * BM + tl.arange(0, BM)
    cols = tn * BN + tl.arange(0, BN)
    vl = tl.where(k == nb - 1, vl_last, b)
    row_off = k.to(tl.int64) * npar
    base = k.to(tl.int64) * b * b
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for kk in range(0, b, BK):
        ks = kk + tl.arange(0, BK)
        m_rk = (rows[:, None] < b) & (ks[None, :] < b)
        m_kr = (ks[:, None] < b) & (rows[None, :] < b)
        m_kc = (ks[:, None] < b) & (cols[None, :] < b)
        v = tl.load(v_ptr + base + rows[:, None] * b + ks[None, :], mask=m_rk, other=0.0)
        vt = tl.load(v_ptr + base + ks[:, None] * b + rows[None, :], mask=m_kr, other=0.0)
        u = tl.load(u_ptr + base + rows[:, None] * b + ks[None, :], mask=m_rk, other=0.0)
        ut = tl.load(u_ptr + base + ks[:, None] * b + rows[None, :], mask=m_kr, other=0.0)
        q = _q_tile(theta_ptr, row_off, ks, cols, b, vl)
        s = tl.load(s_ptr + base + ks[:, None] * b + cols[None, :], mask=m_kc, other=0.0)
        acc = _mma(2.0 * v + tl.trans(vt), q, acc, PREC)
        acc = _mma(tl.trans(ut) - u, s, acc, PREC)
    mask = (rows[:, None] < b) & (cols[None, :] < b)
    off = base + rows[:, None] * b + cols[None, :]
    g = tl.load(g_ptr + off, mask=mask, other=0.0)
    gt = tl.load(g_ptr + base + cols[None, :] * b + rows[:, None], mask=mask, other=0.0)
    u = tl.load(u_ptr + off, mask=mask, other=0.0)
    tl.store(w_ptr + off, acc + g - gt - 2.0 * u, mask=mask)


@triton.jit
def _cn_pack_kernel(w_ptr, out_ptr, b, nb, vl_last, npar, BM: tl.constexpr, BN: tl.constexpr):
    """``out[k, idx(i, j)] = W[i, j] - W[j, i]`` for ``i < j``, zero on phantom rows/columns."""
    k, tm, tn = _block_tile(b, BM, BN)
    if tm * BM < (tn + 1) * BN:  # the tile meets the strict upper triangle
        rows = tm * BM + tl.arange(0, BM)
        cols = tn * BN + tl.arange(0, BN)
        vl = tl.where(k == nb - 1, vl_last, b)
        base = k.to(tl.int64) * b * b
        r = rows[:, None]
        c = cols[None, :]
        upper = (r < c) & (c < b)
        w = tl.load(w_ptr + base + r * b + c, mask=upper, other=0.0)
        wt = tl.load(w_ptr + base + c * b + r, mask=upper, other=0.0)
        val = tl.where(c < vl, w - wt, 0.0)
        tl.store(out_ptr + k.to(tl.int64) * npar + (r * (2 * b - r - 1)) // 2 + (c - r - 1),
                 val.to(out_ptr.dtype.element_ty), mask=upper)


@triton.jit
def _theta_row(rows_ptr, k, npar, ROWS: tl.constexpr):
    """Offset of block ``k``'s skew parameters from ``theta_ptr`` (elements)."""
    if ROWS:
        return tl.load(rows_ptr + k)
    return k.to(tl.int64) * npar


@triton.jit
def _cn_prep_kernel(
    theta_ptr, rows_ptr, g_ptr, p_ptr, k_ptr, sy_ptr, b, nb, vl_last, npar, scale,
    HAS_G: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr,
):
    """Dense operands of the fast path: ``P = scale Q`` and, with ``G``, ``K = G - G^T`` and
    ``Sy = G + G^T`` (all ``(nb, b, b)`` in the pointers' dtype), one ``BM x BM`` tile per
    program. ``ROWS``: block ``k``'s skew parameters start at ``theta_ptr + rows[k]`` (the
    sides of a batched build, each its own tensor), else at ``theta_ptr + k * npar``."""
    pid = tl.program_id(0)
    tiles = (b + BM - 1) // BM
    per_block = tiles * tiles
    k = pid // per_block
    rem = pid % per_block
    rows = (rem // tiles) * BM + tl.arange(0, BM)
    cols = (rem % tiles) * BM + tl.arange(0, BM)
    vl = tl.where(k == nb - 1, vl_last, b)
    base = k.to(tl.int64) * b * b
    mask = (rows[:, None] < b) & (cols[None, :] < b)
    off = base + rows[:, None] * b + cols[None, :]
    q = _q_tile(theta_ptr, _theta_row(rows_ptr, k, npar, ROWS), rows, cols, b, vl)
    tl.store(p_ptr + off, scale * q, mask=mask)
    if HAS_G:
        g = tl.load(g_ptr + off, mask=mask, other=0.0)
        # G^T tile, loaded contiguous along its own rows and transposed in registers
        gt = tl.trans(tl.load(g_ptr + base + cols[:, None] * b + rows[None, :],
                              mask=(cols[:, None] < b) & (rows[None, :] < b), other=0.0))
        tl.store(k_ptr + off, g - gt, mask=mask)
        tl.store(sy_ptr + off, g + gt, mask=mask)


@triton.jit
def _cn_fwd_mm_kernel(
    a_desc, b1_desc, b2_desc, e_desc, eq_desc, o_desc, theta_ptr, rows_ptr, b, nb, vl_last,
    npar, c, f_s, f_q,
    TWO: tl.constexpr, E_S: tl.constexpr, E_Q: tl.constexpr, ROWS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``out = c A (X1 + X2)^T + f_s E + f_q F`` per block (``X2`` when ``TWO``) with TMA tiles
    of the ``(nb*b, b)`` views; ``E`` is ``e_desc``'s tile when ``E_S``; ``F`` is
    ``eq_desc``'s tile (``E_Q == "desc"``, an fp32 buffer) or ``Q`` built from ``theta``
    (``E_Q == "theta"``, for bf16 buffers): the first-order term stays exact.
    ``X^T`` tiles are read at ``[J, kk]``, K-major as tf32 wants: for the symmetric ``S`` that
    is ``S``, for the skew ``N = -2Q`` it is ``N^T = 2Q``. One accumulator: a second one and
    the ``Q`` epilogue of a 128 x 128 tile spilled registers."""
    k, tm, tn = _block_tile(b, BM, BN)
    i0 = tm * BM
    j0 = tn * BN
    kb = k * b
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for kk in range(0, b, BK):
        a = a_desc.load([kb + i0, kk])
        acc = _mma(a, b1_desc.load([kb + j0, kk]).T, acc, PREC)
        if TWO:
            acc = _mma(a, b2_desc.load([kb + j0, kk]).T, acc, PREC)
    res = c * acc
    if E_S:
        res += f_s * e_desc.load([kb + i0, j0]).to(tl.float32)
    if E_Q == "desc":
        res += f_q * eq_desc.load([kb + i0, j0])
    elif E_Q == "theta":
        vl = tl.where(k == nb - 1, vl_last, b)
        res += f_q * _q_tile(theta_ptr, _theta_row(rows_ptr, k, npar, ROWS),
                             i0 + tl.arange(0, BM), j0 + tl.arange(0, BN), b, vl)
    o_desc.store([kb + i0, j0], res.to(o_desc.dtype))


@triton.jit
def _cn_bwd_suv_kernel(
    p_desc, pt_desc, sy_desc, k_desc, s_desc, u_desc, v_desc, b,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``S = Q Q``, ``U = Sy Q``, ``V = K Q`` sharing the ``Q`` tile (read as ``-P^T / 2``)."""
    k, tm, tn = _block_tile(b, BM, BN)
    i0 = tm * BM
    j0 = tn * BN
    kb = k * b
    acc_s = tl.full((BM, BN), 0.0, tl.float32)
    acc_u = tl.full((BM, BN), 0.0, tl.float32)
    acc_v = tl.full((BM, BN), 0.0, tl.float32)
    for kk in range(0, b, BK):
        bt = pt_desc.load([kb + j0, kk]).T  # = -2 Q[kk, J]
        acc_s = _mma(p_desc.load([kb + i0, kk]), bt, acc_s, PREC)
        acc_u = _mma(sy_desc.load([kb + i0, kk]), bt, acc_u, PREC)
        acc_v = _mma(k_desc.load([kb + i0, kk]), bt, acc_v, PREC)
    s_desc.store([kb + i0, j0], (-0.25 * acc_s).to(s_desc.dtype))
    u_desc.store([kb + i0, j0], (-0.5 * acc_u).to(u_desc.dtype))
    v_desc.store([kb + i0, j0], (-0.5 * acc_v).to(v_desc.dtype))


@triton.jit
def _w_tile(u_desc, ut_desc, v_desc, vt_desc, pt_desc, st_desc, kb, r0, c0, b,
            BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """``(2V + V^T) Q - (U - U^T) S`` on tile ``[r0:, c0:]`` of one block."""
    acc = tl.full((BM, BM), 0.0, tl.float32)
    for kk in range(0, b, BK):
        # A operands combine a tile and a transposed tile; Q, S tiles are read K-major
        # combined in fp32 (bf16 storage: one rounding, in _mma)
        a1 = -(v_desc.load([kb + r0, kk]).to(tl.float32)
               + 0.5 * vt_desc.load([kb + kk, r0]).T.to(tl.float32))
        a2 = (ut_desc.load([kb + kk, r0]).T.to(tl.float32)
              - u_desc.load([kb + r0, kk]).to(tl.float32))
        acc = _mma(a1, pt_desc.load([kb + c0, kk]).T, acc, PREC)
        acc = _mma(a2, st_desc.load([kb + c0, kk]).T, acc, PREC)
    return acc


@triton.jit
def _cn_bwd_wpack_kernel(
    u_desc, ut_desc, v_desc, vt_desc, pt_desc, st_desc, g_desc, ue_desc, pairs_ptr, out_ptr,
    b, nb, vl_last, npar, n_pairs,
    BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """For tile pair ``I <= J``: ``W[I,J]``, ``W[J,I]`` with
    ``W = K - 2U + (2V + V^T) Q - (U - U^T) S`` and
    ``dtheta[idx(i, j)] = W[i, j] - W[j, i]`` (``i < j``, zero on phantom rows/columns).
    ``K = G - G^T`` comes from the float32 ``G`` (``g_desc``), exact whatever the storage of
    the product operands."""
    pid = tl.program_id(0)
    k = pid // n_pairs
    pair = pid % n_pairs
    i0 = tl.load(pairs_ptr + 2 * pair) * BM
    j0 = tl.load(pairs_ptr + 2 * pair + 1) * BM
    kb = k * b
    w_ij = _w_tile(u_desc, ut_desc, v_desc, vt_desc, pt_desc, st_desc, kb, i0, j0, b, BM, BK,
                   PREC)
    if i0 == j0:  # a diagonal tile is its own partner: one product instead of two
        w_ji = w_ij
    else:
        w_ji = _w_tile(u_desc, ut_desc, v_desc, vt_desc, pt_desc, st_desc, kb, j0, i0, b, BM,
                       BK, PREC)
    # Z = W[I,J] - W[J,I]^T = 2K[I,J] - 2U[I,J] + 2U[J,I]^T + (products)
    z = (2.0 * (g_desc.load([kb + i0, j0]) - g_desc.load([kb + j0, i0]).T)
         - 2.0 * ue_desc.load([kb + i0, j0]).to(tl.float32)
         + 2.0 * ue_desc.load([kb + j0, i0]).T.to(tl.float32) + w_ij - w_ji.T)
    r = i0 + tl.arange(0, BM)[:, None]
    c = j0 + tl.arange(0, BM)[None, :]
    vl = tl.where(k == nb - 1, vl_last, b)
    z = tl.where(c < vl, z, 0.0)
    tl.store(out_ptr + k.to(tl.int64) * npar + (r * (2 * b - r - 1)) // 2 + (c - r - 1),
             z.to(out_ptr.dtype.element_ty), mask=r < c)


def _tiles(b: int, nb: int) -> tuple[int, int, int, int]:
    """``(BM, BN, BK, num_warps)`` for a ``b x b`` fp32 product over ``nb`` blocks."""
    p2 = max(16, triton.next_power_of_2(b))
    if _interpreting():
        t = min(p2, 32)
        return t, t, min(p2, 32), 4
    if p2 <= 64:
        return p2, p2, min(p2, 32), 4
    # 64x64 tiles while 128x128 would leave most SMs idle.
    t = 128 if nb * (p2 // 128) ** 2 >= 132 else 64
    return t, t, 32, 4 if t == 64 else 8


def _real_in_last(block: int, valid_last: int | None) -> int:
    """The kernels' form of ``BlockLayout.valid_last``: ``None`` (no padding) becomes ``block``."""
    return block if valid_last is None or valid_last >= block else int(valid_last)


def _launch_mm(theta, a, bscr, out, block, nb, vl, npar, e_i, e_q, b_i, b_q, *, a_from_q,
               b_has_q, prec, cfg):
    bm, bn, bk, warps = cfg
    grid = (nb * triton.cdiv(block, bm) * triton.cdiv(block, bn),)
    _cn_matmul_kernel[grid](
        theta, theta if a is None else a, theta if bscr is None else bscr, out,
        block, nb, vl, npar, float(e_i), float(e_q), float(b_i), float(b_q),
        A_FROM_Q=a_from_q, B_SCRATCH=bscr is not None, B_HAS_Q=b_has_q, E_HAS_Q=e_q != 0,
        BM=bm, BN=bn, BK=bk, PREC=prec, num_warps=warps, num_stages=2,
    )


class _Fast(NamedTuple):
    """Launch shapes of the dense (TMA) fast path for one block size and precision."""

    tile: int  # square output tile of the forward products and the S/U/V rows
    suv_bn: int  # S/U/V column tile (three accumulators live at once)
    tile_w: int  # square tile of the W pairs (two tiles live at once)
    bk: int  # K step of the forward and S/U/V products
    bk_w: int  # K step of the W products
    warps: int
    stages: int
    storage: torch.dtype  # of the dense operands: bf16 for bf16 products (half the bytes)


# Benchmarks and tests: "tile" caps the fast path's tile (None: 64 compiled, 16 interpreted),
# "tile_w" the W-pair tile (None: as "tile" but at most 64).
OPTIONS: dict[str, int | None] = {"tile": None, "tile_w": None}


def _largest_divisor_tile(b: int, cap: int) -> int | None:
    return next((t for t in (128, 64, 32, 16) if t <= cap and b % t == 0), None)


def _fast_config(b: int, prec: str) -> _Fast | None:
    """Shapes of the fast path, or ``None`` when ``b`` (not a multiple of 16) needs the general
    path. A ``b x b`` block is cut into the largest tile in 128/64/32/16 that divides ``b``
    and is at most ``OPTIONS["tile"]`` (64 by default: see the module notes)."""
    cap = OPTIONS["tile"] or (16 if _interpreting() else 64)
    tile = _largest_divisor_tile(b, cap)
    if tile is None:
        return None
    tile_w = _largest_divisor_tile(b, OPTIONS["tile_w"] or min(tile, 64))
    half = prec.startswith("bf16")
    wide = tile >= 128 and not _interpreting()
    return _Fast(tile=tile, suv_bn=min(tile, 64), tile_w=tile_w,
                 bk=min(tile, 64 if half else 32), bk_w=min(tile_w, 32 if half else 16),
                 warps=8 if wide else 4, stages=3,
                 storage=torch.bfloat16 if half else torch.float32)


@functools.lru_cache(maxsize=16)
def _pairs(nt: int, device: torch.device) -> Tensor:
    """Upper-triangle tile pairs ``(I, J)``, ``I <= J``, as int32 ``(n, 2)``."""
    pairs = [(i, j) for i in range(nt) for j in range(i, nt)]
    return torch.tensor(pairs, dtype=torch.int32, device=device)


def _desc(t: Tensor, shape: list[int]) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, shape)


def _dense_prep(theta, rows, g, block, nb, vl, npar, storage, scale=2.0):
    """``P = scale Q`` and, with ``g``, ``K = G - G^T`` and ``Sy = G + G^T``: ``(nb*b, b)``
    ``storage`` tensors (``K``, ``Sy`` alias ``P`` without ``g``). ``rows``: the row table of
    :func:`_theta_rows`, or ``None`` (``theta`` holds every block)."""
    p = torch.empty((nb * block, block), dtype=storage, device=theta.device)
    k = sy = p
    if g is not None:
        k = torch.empty_like(p)
        sy = torch.empty_like(p)
    tp = min(32, _largest_divisor_tile(block, 32) or 16) if _interpreting() else 64
    grid = (nb * triton.cdiv(block, tp) ** 2,)
    _cn_prep_kernel[grid](theta, theta if rows is None else rows, p if g is None else g, p, k,
                          sy, block, nb, vl, npar, scale, HAS_G=g is not None,
                          ROWS=rows is not None, BM=tp, num_warps=4 if _interpreting() else 8)
    return p, k, sy


def _fast_delta(theta, rows, block, nb, vl, npar, cfg: _Fast, prec, out):
    """``terms = 3``: ``N = -2Q``; ``S = Q Q = -N N^T / 4``;
    ``delta = S S + S P + 2S + 2Q = S (S + N)^T + 2S + 2Q`` (3 launches; ``2Q`` from
    ``theta``, exact)."""
    n, _, _ = _dense_prep(theta, rows, None, block, nb, vl, npar, cfg.storage, scale=-2.0)
    s = torch.empty_like(n)
    t, bk = cfg.tile, cfg.bk
    grid = (nb * (block // t) ** 2,)
    opts = dict(BM=t, BN=t, BK=bk, PREC=prec, num_warps=cfg.warps, num_stages=cfg.stages)
    geo = (theta, theta if rows is None else rows, block, nb, vl, npar)
    na, st = _desc(n, [t, bk]), _desc(s, [t, t])
    nt = _desc(n, [t, t])
    _cn_fwd_mm_kernel[grid](na, na, na, st, nt, st, *geo, -0.25, 0.0, 0.0,
                            TWO=False, E_S=False, E_Q="", ROWS=rows is not None, **opts)
    sa = _desc(s, [t, bk])
    # 2Q = -N: read from N where N is fp32; rebuilt from theta where N was rounded to bf16
    exact = cfg.storage == torch.float32
    _cn_fwd_mm_kernel[grid](sa, sa, na, st, nt, _desc(out.view(nb * block, block), [t, t]),
                            *geo, 1.0, 2.0, -1.0 if exact else 2.0, TWO=True, E_S=True,
                            E_Q="desc" if exact else "theta", ROWS=rows is not None, **opts)
    return out


def _fast_backward(theta, rows, g, block, nb, vl, npar, cfg: _Fast, prec, out):
    """``terms = 3`` backward in 3 launches: prep (``P, K, Sy``), ``S, U, V``, then ``W`` on
    tile pairs with the skew-symmetrization and packing fused."""
    p, kk, sy = _dense_prep(theta, rows, g, block, nb, vl, npar, cfg.storage)
    s, u, v = torch.empty_like(p), torch.empty_like(p), torch.empty_like(p)
    t, bn, bk = cfg.tile, cfg.suv_bn, cfg.bk
    a, o = [t, bk], [t, bn]
    _cn_bwd_suv_kernel[(nb * (block // t) * (block // bn),)](
        _desc(p, a), _desc(p, [bn, bk]), _desc(sy, a), _desc(kk, a), _desc(s, o), _desc(u, o),
        _desc(v, o), block, BM=t, BN=bn, BK=bk, PREC=prec, num_warps=cfg.warps,
        num_stages=cfg.stages)
    tw, bkw = cfg.tile_w, cfg.bk_w
    pairs = _pairs(block // tw, theta.device)
    a, at = [tw, bkw], [bkw, tw]
    _cn_bwd_wpack_kernel[(nb * pairs.shape[0],)](
        _desc(u, a), _desc(u, at), _desc(v, a), _desc(v, at), _desc(p, a), _desc(s, a),
        _desc(g.view(nb * block, block), [tw, tw]), _desc(u, [tw, tw]), pairs, out,
        block, nb, vl, npar, pairs.shape[0],
        BM=tw, BK=bkw, PREC=prec, num_warps=8 if tw >= 128 else 4, num_stages=2)
    return out


def _check_theta(theta: Tensor, block: int) -> tuple[int, int]:
    if theta.dim() != 2:
        raise ValueError(f"theta must be (num_blocks, b(b-1)/2), got shape {tuple(theta.shape)}")
    npar = block * (block - 1) // 2
    if theta.shape[1] != npar:
        raise ValueError(f"theta has {theta.shape[1]} columns, block {block} needs {npar}")
    return theta.shape[0], npar


Thetas = Tensor | list[Tensor] | tuple[Tensor, ...]

_ROW_TABLES: dict = {}
_ROW_TABLES_SIZE = 1024  # one per build call of a step (an 8B model makes ~130)


def _theta_rows(parts: list[Tensor], npar: int) -> Tensor:
    """``(sum nb_i,)`` int64: where block ``k`` of the stacked ``parts`` (float32, contiguous)
    starts, in elements from ``parts[0]``'s first. The kernels read the sides of a batched
    build through it instead of a concatenated copy (two copies of every skew parameter per
    step). Remembered per (pointers, sizes), so a CUDA graph captured after a warm-up step
    replays a table made outside the capture; one made during a capture is not kept."""
    key = (parts[0].device, npar, *((t.data_ptr(), t.shape[0]) for t in parts))
    hit = _ROW_TABLES.get(key)
    if hit is not None:
        return hit
    base = parts[0].data_ptr()
    table = torch.cat([torch.arange(t.shape[0], dtype=torch.int64, device=t.device) * npar
                       + (t.data_ptr() - base) // t.element_size() for t in parts])
    if not (table.is_cuda and torch.cuda.is_current_stream_capturing()):
        if len(_ROW_TABLES) >= _ROW_TABLES_SIZE:
            _ROW_TABLES.pop(next(iter(_ROW_TABLES)))
        _ROW_TABLES[key] = table
    return table


def _parts(theta: Thetas, block: int) -> tuple[list[Tensor], int, int]:
    """``(parts, nb, npar)``: the sides stacked along blocks, each checked."""
    parts = [theta] if isinstance(theta, Tensor) else list(theta)
    if not parts:
        raise ValueError("theta: no tensors given")
    npar = 0
    for t in parts:
        npar = _check_theta(t, block)[1]
        if t.dtype != parts[0].dtype or t.device != parts[0].device:
            raise ValueError("theta: the stacked tensors must share dtype and device")
    return parts, sum(t.shape[0] for t in parts), npar


def _joined(parts: list[Tensor]) -> Tensor:
    """The stacked sides as one contiguous float32 tensor (a copy where there are several)."""
    theta = parts[0] if len(parts) == 1 else torch.cat(parts)
    return theta.contiguous().float()


def _fast_theta(parts: list[Tensor], npar: int) -> tuple[Tensor, Tensor | None]:
    """``(theta, rows)`` for the fast kernels: several float32 contiguous sides are read in
    place through a row table, anything else as :func:`_joined`'s copy."""
    if len(parts) > 1 and all(t.dtype == torch.float32 and t.is_contiguous() for t in parts):
        return parts[0], _theta_rows(parts, npar)
    return _joined(parts), None


def cayley_neumann_delta(
    theta: Thetas, block: int, terms: int, valid_last: int | None, out_dtype: torch.dtype,
    *, out: Tensor | None = None,
) -> Tensor:
    """``(nb, b(b-1)/2) -> (nb, b, b)`` blocks ``R_k - I`` in ``out_dtype``, built in fp32.

    Same result as ``rotation_delta_reference(theta, block, terms, valid_last)``; float64 (either
    side) runs the reference. ``theta`` may be several ``(nb_i, b(b-1)/2)`` tensors, stacked
    along blocks (the sides of a batched build; ``valid_last`` is the last block's). ``out``:
    optional contiguous result buffer.
    """
    parts, nb, npar = _parts(theta, block)
    theta = parts[0]
    if torch.float64 in (theta.dtype, out_dtype):
        theta = parts[0] if len(parts) == 1 else torch.cat(parts)
        wide = theta.to(torch.float64)
        result = rotation_delta_reference(wide, block, terms, valid_last).to(out_dtype)
        return result if out is None else out.copy_(result)
    if terms < 1:
        raise ValueError(f"terms must be at least 1, got {terms}")
    if out is None:
        out = torch.empty(nb, block, block, dtype=out_dtype, device=theta.device)
    elif out.shape != (nb, block, block) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous (nb, b, b) tensor of out_dtype")
    if nb == 0:
        return out
    vl = _real_in_last(block, valid_last)
    fast = terms == 3 and block % 16 == 0
    prec = _precision("bf16" if fast and out_dtype == torch.bfloat16
                      else "tf32x3" if out_dtype == torch.float32 else "tf32")
    if prec.startswith("bf16") and terms != 3:
        prec = "tf32"  # these paths form the first-order term 2Q inside a product
    cfg = _tiles(block, nb)
    c = neumann_coefficients(terms)  # c[p] for p = 0 .. terms+1
    mm = dict(prec=prec, cfg=cfg)
    if terms == 1:  # Q (2I + Q)
        theta = _joined(parts)
        _launch_mm(theta, None, None, out, block, nb, vl, npar, 0, 0, c[1], c[2],
                   a_from_q=True, b_has_q=True, **mm)
        return out
    fast_cfg = _fast_config(block, prec) if fast else None
    if fast_cfg is not None:
        return _fast_delta(*_fast_theta(parts, npar), block, nb, vl, npar, fast_cfg, prec, out)
    theta = _joined(parts)
    scratch = torch.empty(nb, block, block, dtype=torch.float32, device=theta.device)
    if terms == 3:  # S = Q Q; delta = S (S + 2I + 2Q) + 2Q
        _launch_mm(theta, None, None, scratch, block, nb, vl, npar, 0, 0, 0, 1,
                   a_from_q=True, b_has_q=True, **mm)
        _launch_mm(theta, scratch, scratch, out, block, nb, vl, npar, 0, c[1], c[2], c[3],
                   a_from_q=False, b_has_q=True, **mm)
        return out
    # Horner: H_k = c_k I + c_{k+1} Q; H_p = c_p I + Q H_{p+1}; delta = Q H_1.
    other = torch.empty_like(scratch)
    _launch_mm(theta, None, None, scratch, block, nb, vl, npar, c[terms - 1], 0,
               c[terms], c[terms + 1], a_from_q=True, b_has_q=True, **mm)
    for p in range(terms - 2, 0, -1):
        _launch_mm(theta, None, scratch, other, block, nb, vl, npar, c[p], 0, 0, 0,
                   a_from_q=True, b_has_q=False, **mm)
        scratch, other = other, scratch
    _launch_mm(theta, None, scratch, out, block, nb, vl, npar, 0, 0, 0, 0,
               a_from_q=True, b_has_q=False, **mm)
    return out


def cayley_neumann_delta_backward(
    theta: Thetas, grad_delta: Tensor, block: int, terms: int, valid_last: int | None,
    *, out: Tensor | None = None, build_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gradient of ``sum(grad_delta * cayley_neumann_delta(theta))`` w.r.t. ``theta`` (theta's
    dtype; for several stacked tensors, ``(sum nb_i, b(b-1)/2)``). ``terms != 3`` and float64
    run the PyTorch reference. ``out``: optional result. ``build_dtype``: the dtype the blocks
    were built in; a bfloat16 build gets bf16 products here too (see the module notes), others
    tf32."""
    parts, nb, npar = _parts(theta, block)
    theta = parts[0]
    if grad_delta.shape != (nb, block, block):
        raise ValueError(f"grad_delta must be {(nb, block, block)}, got {tuple(grad_delta.shape)}")
    if torch.float64 in (theta.dtype, grad_delta.dtype) or terms != 3:
        wide = torch.float64 if torch.float64 in (theta.dtype, grad_delta.dtype) else torch.float32
        result = rotation_delta_backward_reference(
            _joined(parts).to(wide), grad_delta.to(wide), block, terms, valid_last
        ).to(theta.dtype)
        return result if out is None else out.copy_(result)
    out_dtype = theta.dtype
    g = grad_delta.contiguous().float()
    if out is None:
        out = torch.empty(nb, npar, dtype=out_dtype, device=theta.device)
    elif out.shape != (nb, npar) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous (nb, b(b-1)/2) tensor of theta's dtype")
    if nb == 0 or npar == 0:
        return out.zero_()
    vl = _real_in_last(block, valid_last)
    fast = block % 16 == 0
    prec = _precision("bf16" if fast and build_dtype == torch.bfloat16 else "tf32")
    fast_cfg = _fast_config(block, prec) if fast else None
    if fast_cfg is not None:
        return _fast_backward(*_fast_theta(parts, npar), g, block, nb, vl, npar, fast_cfg, prec,
                              out)
    theta = _joined(parts)
    cfg = _tiles(block, nb)
    bm, bn, bk, warps = cfg
    grid = (nb * triton.cdiv(block, bm) * triton.cdiv(block, bn),)
    s = torch.empty(nb, block, block, dtype=torch.float32, device=theta.device)
    u = torch.empty_like(s)
    v = torch.empty_like(s)
    _launch_mm(theta, None, None, s, block, nb, vl, npar, 0, 0, 0, 1,
               a_from_q=True, b_has_q=True, prec=prec, cfg=cfg)
    _cn_bwd_uv_kernel[grid](theta, g, u, v, block, nb, vl, npar, BM=bm, BN=bn, BK=bk, PREC=prec,
                            num_warps=warps, num_stages=2)
    w = torch.empty_like(s)
    _cn_bwd_w_kernel[grid](theta, g, u, v, s, w, block, nb, vl, npar, BM=bm, BN=bn, BK=bk,
                           PREC=prec, num_warps=warps, num_stages=2)
    pm = min(64, max(16, triton.next_power_of_2(block)))
    pgrid = (nb * triton.cdiv(block, pm) ** 2,)
    _cn_pack_kernel[pgrid](w, out, block, nb, vl, npar, BM=pm, BN=pm, num_warps=4)
    return out
