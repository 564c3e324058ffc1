"""Triton kernels of the Cayley-Neumann map from half-stored skew parameters, and its backward.

The blocks are ``R_k - I = sum_p c_p Q_k^p`` (``p = 1 .. terms+1``, ``c = [2, .., 2, 1]``) of the
skew ``Q_k`` whose strict upper triangle is row ``k`` of ``theta`` (``(nb, b(b-1)/2)``, row-major,
the order of ``torch.triu_indices(b, b, 1)``). ``valid_last < b`` zeroes the rows and columns
``>= valid_last`` of the last block's ``Q``.

Design
------
Fast path (``b`` a multiple of 16, ``terms = 3``, the default; dense tiles through TMA):

* ``_cn_prep_kernel`` reads the half storage once and writes ``P = 2Q`` dense (fp32, one
  launch for all blocks; the backward also writes ``K = G - G^T`` and ``Sy = G + G^T``). Building
  ``Q`` tiles inside the product loops instead (the general path below) was ALU-bound on the
  index arithmetic: 9-16 TFLOP/s on H100.
* Forward, 3 launches: prep; ``S = Q Q``; ``delta = S S + S P + 2S + P``
  (``= 2Q + 2Q^2 + 2Q^3 + Q^4``), two ``b^3`` products per block. Every B operand is read
  K-major at ``[J, kk]`` using ``Q^T = -Q`` and ``S^T = S`` (tf32 wgmma wants K-major).
* Backward, 3 launches, from the closed form (``S = Q^2``, ``U = Sy Q``, ``V = K Q``)::

      W = K - 2U + (2V + V^T) Q - (U - U^T) S,   dtheta = (W - W^T)[upper]

  which equals the reference's ``sum_p c_p sum_{a+b=p-1} (Q^a)^T G (Q^b)^T`` after
  skew-symmetrization: prep; ``S, U, V`` sharing the ``Q`` tile; then ``W[I,J]`` and
  ``W[J,I]`` for each tile pair ``I <= J`` with the skew part packed straight into ``dtheta``.

General path (any ``b >= 2``, any ``terms``): ``_cn_matmul_kernel`` builds ``Q`` tiles from
``theta`` on the fly (upper part loaded along columns, lower part as the transposed tile, both
coalesced) and computes ``A @ B + e_i I + e_q Q``; ``terms = 3`` is ``S = Q Q`` then
``delta = S (S + 2I + 2Q) + 2Q``, other ``terms`` Horner's rule ``H <- c_p I + Q H``. The
general backward (``terms = 3``) uses the same closed form in four launches; other ``terms``
run the PyTorch reference (float32) inside :func:`cayley_neumann_delta_backward`.

Products use tensor cores in tf32 (``"tf32x3"``, about float32 accuracy, when ``delta`` is
float32); ``POETX_CAYLEY_PRECISION`` in ``{tf32, tf32x3, ieee, bf16}`` overrides. tf32 is ample
for a bf16/fp16 ``delta``: the ``2Q`` term is exact and the products are ``O(|Q|^2)``; the
backward defaults to tf32 (relative error ~5e-4 on ``dtheta``). ``bf16`` rounds the product
operands to bf16 (twice tf32's tensor-core rate) while the terms outside products (``2Q``
forward, ``2(G - G^T)`` backward) stay float32, so its extra error is ~2^-9 relative on the
product terms alone (``O(|Q|)`` of the result); it applies to ``terms = 3`` only (the other
forward paths form ``2Q`` inside a product, and run tf32 instead).
"""

from __future__ import annotations

import functools
import os

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
def _cn_prep_kernel(
    theta_ptr, g_ptr, p_ptr, k_ptr, sy_ptr, b, nb, vl_last, npar,
    HAS_G: tl.constexpr, BM: tl.constexpr,
):
    """Dense operands of the fast path: ``P = 2Q`` and, with ``G``, ``K = G - G^T`` and
    ``Sy = G + G^T`` (all ``(nb, b, b)`` fp32), one ``BM x BM`` tile per program."""
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
    q = _q_tile(theta_ptr, k.to(tl.int64) * npar, rows, cols, b, vl)
    tl.store(p_ptr + off, 2.0 * q, mask=mask)
    if HAS_G:
        g = tl.load(g_ptr + off, mask=mask, other=0.0)
        # G^T tile, loaded contiguous along its own rows and transposed in registers
        gt = tl.trans(tl.load(g_ptr + base + cols[:, None] * b + rows[None, :],
                              mask=(cols[:, None] < b) & (rows[None, :] < b), other=0.0))
        tl.store(k_ptr + off, g - gt, mask=mask)
        tl.store(sy_ptr + off, g + gt, mask=mask)


@triton.jit
def _cn_fwd_mm_kernel(
    a_desc, b1_desc, b2_desc, e1_desc, e2_desc, o_desc, b, c1, c2, f1, f2,
    TWO: tl.constexpr, NE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """``out = c1 A X1^T + c2 A X2^T + f1 E1 + f2 E2`` per block with TMA tiles of the
    ``(nb*b, b)`` views. ``X^T`` tiles are read at ``[J, kk]``: for the symmetric ``S`` that is
    ``S``, for the skew ``P`` it is ``-P``; so the operands are K-major as tf32 wants."""
    k, tm, tn = _block_tile(b, BM, BN)
    i0 = tm * BM
    j0 = tn * BN
    kb = k * b
    acc1 = tl.full((BM, BN), 0.0, tl.float32)
    acc2 = tl.full((BM, BN), 0.0, tl.float32)
    for kk in range(0, b, BK):
        a = a_desc.load([kb + i0, kk])
        acc1 = _mma(a, b1_desc.load([kb + j0, kk]).T, acc1, PREC)
        if TWO:
            acc2 = _mma(a, b2_desc.load([kb + j0, kk]).T, acc2, PREC)
    res = c1 * acc1
    if TWO:
        res += c2 * acc2
    if NE >= 1:
        res += f1 * e1_desc.load([kb + i0, j0])
    if NE >= 2:
        res += f2 * e2_desc.load([kb + i0, j0])
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
    s_desc.store([kb + i0, j0], -0.25 * acc_s)
    u_desc.store([kb + i0, j0], -0.5 * acc_u)
    v_desc.store([kb + i0, j0], -0.5 * acc_v)


@triton.jit
def _w_tile(u_desc, ut_desc, v_desc, vt_desc, pt_desc, st_desc, kb, r0, c0, b,
            BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """``(2V + V^T) Q - (U - U^T) S`` on tile ``[r0:, c0:]`` of one block."""
    acc = tl.full((BM, BM), 0.0, tl.float32)
    for kk in range(0, b, BK):
        # A operands combine a tile and a transposed tile; Q, S tiles are read K-major
        a1 = -(v_desc.load([kb + r0, kk]) + 0.5 * vt_desc.load([kb + kk, r0]).T)
        a2 = ut_desc.load([kb + kk, r0]).T - u_desc.load([kb + r0, kk])
        acc = _mma(a1, pt_desc.load([kb + c0, kk]).T, acc, PREC)
        acc = _mma(a2, st_desc.load([kb + c0, kk]).T, acc, PREC)
    return acc


@triton.jit
def _cn_bwd_wpack_kernel(
    u_desc, ut_desc, v_desc, vt_desc, pt_desc, st_desc, kt_desc, ue_desc, pairs_ptr, out_ptr,
    b, nb, vl_last, npar, n_pairs,
    BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """For tile pair ``I <= J``: ``W[I,J]``, ``W[J,I]`` with
    ``W = K - 2U + (2V + V^T) Q - (U - U^T) S`` and
    ``dtheta[idx(i, j)] = W[i, j] - W[j, i]`` (``i < j``, zero on phantom rows/columns)."""
    pid = tl.program_id(0)
    k = pid // n_pairs
    pair = pid % n_pairs
    i0 = tl.load(pairs_ptr + 2 * pair) * BM
    j0 = tl.load(pairs_ptr + 2 * pair + 1) * BM
    kb = k * b
    w_ij = _w_tile(u_desc, ut_desc, v_desc, vt_desc, pt_desc, st_desc, kb, i0, j0, b, BM, BK,
                   PREC)
    w_ji = _w_tile(u_desc, ut_desc, v_desc, vt_desc, pt_desc, st_desc, kb, j0, i0, b, BM, BK,
                   PREC)
    # Z = W[I,J] - W[J,I]^T = 2K[I,J] - 2U[I,J] + 2U[J,I]^T + (products)
    z = (2.0 * kt_desc.load([kb + i0, j0]) - 2.0 * ue_desc.load([kb + i0, j0])
         + 2.0 * ue_desc.load([kb + j0, i0]).T + w_ij - w_ji.T)
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


def _dense_tile(b: int) -> int | None:
    """Tile of the dense (TMA) fast path, or ``None`` when ``b`` needs the general path."""
    if _interpreting():
        return 16 if b % 16 == 0 else None
    for t in (64, 32, 16):
        if b % t == 0:
            return t
    return None


@functools.lru_cache(maxsize=16)
def _pairs(nt: int, device: torch.device) -> Tensor:
    """Upper-triangle tile pairs ``(I, J)``, ``I <= J``, as int32 ``(n, 2)``."""
    pairs = [(i, j) for i in range(nt) for j in range(i, nt)]
    return torch.tensor(pairs, dtype=torch.int32, device=device)


def _desc(t: Tensor, shape: list[int]) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, shape)


def _dense_prep(theta, g, block, nb, vl, npar, tile):
    view = (nb * block, block)
    p = torch.empty(view, dtype=torch.float32, device=theta.device)
    k = sy = p
    if g is not None:
        k = torch.empty_like(p)
        sy = torch.empty_like(p)
    tp = min(tile, 32) if _interpreting() else 64
    grid = (nb * triton.cdiv(block, tp) ** 2,)
    _cn_prep_kernel[grid](theta, p if g is None else g, p, k, sy, block, nb, vl, npar,
                          HAS_G=g is not None, BM=tp, num_warps=4 if _interpreting() else 8)
    return p, k, sy


def _fast_delta(theta, block, nb, vl, npar, tile, prec, out):
    """``terms = 3``: ``P = 2Q``; ``S = Q Q``; ``delta = S S + S P + 2S + P`` (3 launches)."""
    p, _, _ = _dense_prep(theta, None, block, nb, vl, npar, tile)
    s = torch.empty_like(p)
    bk = min(32, tile)
    grid = (nb * (block // tile) ** 2,)
    opts = dict(BM=tile, BN=tile, BK=bk, PREC=prec, num_warps=4, num_stages=3)
    pa, pb = _desc(p, [tile, bk]), _desc(p, [tile, tile])
    _cn_fwd_mm_kernel[grid](pa, pa, pa, pb, pb, _desc(s, [tile, tile]), block,
                            -0.25, 0.0, 0.0, 0.0, TWO=False, NE=0, **opts)
    sa = _desc(s, [tile, bk])
    _cn_fwd_mm_kernel[grid](sa, sa, pa, _desc(s, [tile, tile]), pb,
                            _desc(out.view(nb * block, block), [tile, tile]), block,
                            1.0, -1.0, 2.0, 1.0, TWO=True, NE=2, **opts)
    return out


def _fast_backward(theta, g, block, nb, vl, npar, tile, prec, out):
    """``terms = 3`` backward in 3 launches: prep (``P, K, Sy``), ``S, U, V``, then ``W`` on
    tile pairs with the skew-symmetrization and packing fused."""
    p, kk, sy = _dense_prep(theta, g, block, nb, vl, npar, tile)
    s, u, v = torch.empty_like(p), torch.empty_like(p), torch.empty_like(p)
    bk = min(32, tile)
    nt = block // tile
    opts = dict(BM=tile, BK=bk, PREC=prec, num_warps=4)
    a = [tile, bk]
    _cn_bwd_suv_kernel[(nb * nt * nt,)](
        _desc(p, a), _desc(p, a), _desc(sy, a), _desc(kk, a), _desc(s, [tile, tile]),
        _desc(u, [tile, tile]), _desc(v, [tile, tile]), block, BN=tile, num_stages=3, **opts)
    pairs = _pairs(nt, theta.device)
    bkw = min(16, tile)
    a, at = [tile, bkw], [bkw, tile]
    _cn_bwd_wpack_kernel[(nb * pairs.shape[0],)](
        _desc(u, a), _desc(u, at), _desc(v, a), _desc(v, at), _desc(p, a), _desc(s, a),
        _desc(kk, [tile, tile]), _desc(u, [tile, tile]), pairs, out,
        block, nb, vl, npar, pairs.shape[0],
        BM=tile, BK=bkw, PREC=prec, num_warps=4, num_stages=2)
    return out


def _check_theta(theta: Tensor, block: int) -> tuple[int, int]:
    if theta.dim() != 2:
        raise ValueError(f"theta must be (num_blocks, b(b-1)/2), got shape {tuple(theta.shape)}")
    npar = block * (block - 1) // 2
    if theta.shape[1] != npar:
        raise ValueError(f"theta has {theta.shape[1]} columns, block {block} needs {npar}")
    return theta.shape[0], npar


def cayley_neumann_delta(
    theta: Tensor, block: int, terms: int, valid_last: int | None, out_dtype: torch.dtype,
    *, out: Tensor | None = None,
) -> Tensor:
    """``(nb, b(b-1)/2) -> (nb, b, b)`` blocks ``R_k - I`` in ``out_dtype``, built in fp32.

    Same result as ``rotation_delta_reference(theta, block, terms, valid_last)``; float64 (either
    side) runs the reference. ``out``: optional contiguous result buffer.
    """
    nb, npar = _check_theta(theta, block)
    if torch.float64 in (theta.dtype, out_dtype):
        wide = theta.to(torch.float64)
        result = rotation_delta_reference(wide, block, terms, valid_last).to(out_dtype)
        return result if out is None else out.copy_(result)
    if terms < 1:
        raise ValueError(f"terms must be at least 1, got {terms}")
    theta = theta.contiguous().float()
    if out is None:
        out = torch.empty(nb, block, block, dtype=out_dtype, device=theta.device)
    elif out.shape != (nb, block, block) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous (nb, b, b) tensor of out_dtype")
    if nb == 0:
        return out
    vl = _real_in_last(block, valid_last)
    prec = _precision("tf32x3" if out_dtype == torch.float32 else "tf32")
    if prec.startswith("bf16") and terms != 3:
        prec = "tf32"  # these paths form the first-order term 2Q inside a product
    cfg = _tiles(block, nb)
    c = neumann_coefficients(terms)  # c[p] for p = 0 .. terms+1
    mm = dict(prec=prec, cfg=cfg)
    if terms == 1:  # Q (2I + Q)
        _launch_mm(theta, None, None, out, block, nb, vl, npar, 0, 0, c[1], c[2],
                   a_from_q=True, b_has_q=True, **mm)
        return out
    tile = _dense_tile(block)
    if terms == 3 and tile is not None:
        return _fast_delta(theta, block, nb, vl, npar, tile, prec, out)
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
    theta: Tensor, grad_delta: Tensor, block: int, terms: int, valid_last: int | None,
    *, out: Tensor | None = None,
) -> Tensor:
    """Gradient of ``sum(grad_delta * cayley_neumann_delta(theta))`` w.r.t. ``theta`` (theta's
    dtype). ``terms != 3`` and float64 run the PyTorch reference. ``out``: optional result."""
    nb, npar = _check_theta(theta, block)
    if grad_delta.shape != (nb, block, block):
        raise ValueError(f"grad_delta must be {(nb, block, block)}, got {tuple(grad_delta.shape)}")
    if torch.float64 in (theta.dtype, grad_delta.dtype) or terms != 3:
        wide = torch.float64 if torch.float64 in (theta.dtype, grad_delta.dtype) else torch.float32
        result = rotation_delta_backward_reference(
            theta.to(wide), grad_delta.to(wide), block, terms, valid_last
        ).to(theta.dtype)
        return result if out is None else out.copy_(result)
    out_dtype = theta.dtype
    theta = theta.contiguous().float()
    g = grad_delta.contiguous().float()
    if out is None:
        out = torch.empty(nb, npar, dtype=out_dtype, device=theta.device)
    elif out.shape != (nb, npar) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous (nb, b(b-1)/2) tensor of theta's dtype")
    if nb == 0 or npar == 0:
        return out.zero_()
    vl = _real_in_last(block, valid_last)
    prec = _precision("tf32")
    tile = _dense_tile(block)
    if tile is not None:
        return _fast_backward(theta, g, block, nb, vl, npar, tile, prec, out)
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
