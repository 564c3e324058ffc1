"""Triton kernels of the permuted block-diagonal rotation and of its block gradient (Gram).

Semantics, index conventions and the PyTorch references are in ``block_rotate_ref`` (re-exported
here): ``out[:, out_index[kb+i]] = x[:, in_index[kb+i]] + sum_j D_k[i, j] x[:, in_index[kb+j]]``
(``D_k^T`` if ``transpose``) and ``G[k, i, j] = sum_t a[t, a_index[kb+i]] b[t, b_index[kb+j]]``.

Design (measured on H100, see ``bench/notes_kernels.md``)
------
* The rotation is a block-diagonal GEMM: program ``(row tile, block k, column tile)`` computes
  ``X_k D_k^T`` over ``K = b`` with tensor cores (fp32 accumulation; bf16/fp16 operands as given,
  tf32x3 for float32) and adds the identity term ``X_k`` in fp32 in the epilogue, so the identity
  is exact and ``delta`` never holds ``1 + d`` in low precision. Contiguous operands go through
  TMA descriptors (``_rotate_tma_kernel``: 67 us for 8192 x 4096 bf16, b=256, a copy is 50 us);
  anything else (an index, unaligned rows, ``b`` not a multiple of the tile) through the
  pointer kernel ``_rotate_kernel``.
* The Gram is ``A_k^T B_k`` reduced over tokens (``_gram_tma_kernel`` / ``_gram_kernel``),
  split over token ranges when the blocks alone leave SMs idle, partial sums added with TMA
  reduce-adds (no split: plain stores).
* Permutations, two strategies (``OPTIONS["gather"]``):

  - ``"staged"`` (default): ``_permute_kernel`` reads whole rows coalesced, permutes them in
    shared memory (a 1-D ``tl.gather`` per row) and writes them coalesced, at 80-95% of a copy;
    the GEMM kernels then run on contiguous blocks. A scatter (``out_index``) is a gather by
    the inverse index (``_invert_kernel``, remembered per index tensor). Costs one extra
    read+write of the permuted tensor. Rows wider than 64 KB fall back to ``"direct"``.
  - ``"direct"``: the index folded into the GEMM kernels' loads and stores (``x[t, idx[p]]``).
    No extra pass, but every element of a permuted row is its own 32-byte sector: 5-15x slower
    than staged on H100 (0.77 ms vs 0.12 ms for 8192 x 4096 with ``in_index``).

* float64 (any operand) runs the reference. Any ``b >= 1`` runs (masked power-of-two tiles in the
  pointer kernels); the TMA kernels take ``b`` a multiple of their tile (16..128), which
  covers 64/128/256/512.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from poetx.kernels.block_rotate_ref import (  # noqa: F401  (the references tested against)
    attached_inverse,
    block_gram_reference,
    block_rotate_reference,
)

# Tunables (the benchmark flips these; tests exercise both gather strategies).
OPTIONS: dict = {
    "gather": None,  # None = automatic ("staged" unless interpreting), "direct", "staged"
    "rotate_cfg": None,  # (BM, BN, BK, num_warps, num_stages) override for 16-bit inputs
    "gram_cfg": None,  # (BI, BJ, BT, num_warps, num_stages) override for 16-bit inputs
    "gram_splits": None,  # token splits override
    # Rows each program of the row kernels (staged gather, fan-out, fan-in) takes at least;
    # None: as many programs as 16 per SM (2 rows each at 4096 tokens on an H100). At least 8
    # rows measured the same in the 8B step (run 20 of bench/notes_kernels.md).
    "rows_per_program": None,
}

_MAX_STAGED_BYTES = 64 * 1024  # shared memory for one permuted row block


def _interpreting() -> bool:
    """Whether this module's kernels were built by the interpreter (``TRITON_INTERPRET=1`` at
    import): then they run on CPU tensors with small tiles."""
    return not isinstance(_rotate_kernel, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(t: Tensor) -> int:
    return _num_sms(t.device.index or 0) if t.is_cuda else 4


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreting()


def _prec(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _columns(idx_ptr, kb, pos, pos_ok, cols, HAS_IDX: tl.constexpr):
    """Columns of rotated positions ``kb + pos`` and whether they are real (not phantoms):
    read from the index, or the identity bounded by the tensor's ``cols``."""
    if HAS_IDX:
        col = tl.load(idx_ptr + kb + pos, mask=pos_ok, other=-1)
        ok = col >= 0
    else:
        col = kb + pos
        ok = pos_ok & (col < cols)
    return col, ok


@triton.jit
def _rotate_kernel(
    x_ptr, d_ptr, in_idx_ptr, out_idx_ptr, y_ptr,
    T, x_cols, y_cols, b, stride_x, stride_y, tiles_per_block, col_tiles,
    HAS_IN: tl.constexpr, HAS_OUT: tl.constexpr, TRANSPOSE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_t = pid // col_tiles  # row tile (slowest: neighbours share the rows)
    pid_c = pid % col_tiles
    k = pid_c // tiles_per_block
    n0 = (pid_c % tiles_per_block) * BN
    rows = pid_t * BM + tl.arange(0, BM)
    row_ok = rows < T
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    kb = k * b
    oc = n0 + tl.arange(0, BN)  # output coordinates inside the block
    oc_ok = oc < b
    d_base = d_ptr + k.to(tl.int64) * b * b
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for kk in range(0, b, BK):
        j = kk + tl.arange(0, BK)
        j_ok = j < b
        col, c_ok = _columns(in_idx_ptr, kb, j, j_ok, x_cols, HAS_IN)
        a = tl.load(xrow + col[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        if TRANSPOSE:  # noqa: SIM108  (B[j, i] = D[j, i])
            dp = d_base + j[:, None] * b + oc[None, :]
        else:  # B[j, i] = D[i, j]
            dp = d_base + oc[None, :] * b + j[:, None]
        d = tl.load(dp, mask=j_ok[:, None] & oc_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter has no bf16 dot
            a = a.to(tl.float32)
            d = d.to(tl.float32)
        acc = tl.dot(a, d, acc, input_precision=PREC)
    # identity term, exact in fp32
    icol, i_ok = _columns(in_idx_ptr, kb, oc, oc_ok, x_cols, HAS_IN)
    xi = tl.load(xrow + icol[None, :], mask=row_ok[:, None] & i_ok[None, :], other=0.0)
    acc += xi.to(tl.float32)
    ocol, o_ok = _columns(out_idx_ptr, kb, oc, oc_ok, y_cols, HAS_OUT)
    yp = y_ptr + rows.to(tl.int64)[:, None] * stride_y + ocol[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & o_ok[None, :])


@triton.jit
def _rotate_tma_kernel(
    x_desc, xi_desc, d_desc, y_desc, b, tiles_per_block, col_tiles,
    TRANSPOSE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Contiguous blocks through TMA descriptors: ``x`` ``(T, x_cols)`` (blocks ``[BM, BK]``;
    ``xi_desc``: same tensor, ``[BM, BN]``), ``delta`` as ``(nb*b, b)``, ``y`` ``(T, y_cols)``.
    Rows past ``T`` and columns past ``x_cols`` read zero; stores past the ends are dropped.
    Needs ``BK | b`` and ``BN | b``."""
    pid = tl.program_id(0)
    pid_t = pid // col_tiles
    pid_c = pid % col_tiles
    k = pid_c // tiles_per_block
    n0 = (pid_c % tiles_per_block) * BN
    t0 = pid_t * BM
    kb = k * b
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for kk in range(0, b, BK):
        a = x_desc.load([t0, kb + kk])
        if TRANSPOSE:  # noqa: SIM108  (B[j, i] = D[j, i])
            d = d_desc.load([kb + kk, n0])
        else:  # B[j, i] = D[i, j]
            d = d_desc.load([kb + n0, kk]).T
        if UPCAST:
            a = a.to(tl.float32)
            d = d.to(tl.float32)
        acc = tl.dot(a, d, acc, input_precision=PREC)
    acc += xi_desc.load([t0, kb + n0]).to(tl.float32)
    y_desc.store([t0, kb + n0], acc.to(y_desc.dtype))


@triton.jit
def _gram_kernel(
    a_ptr, b_ptr, a_idx_ptr, b_idx_ptr, out_ptr,
    T, a_cols, b_cols, bsz, stride_a, stride_b, t_per_split,
    HAS_AI: tl.constexpr, HAS_BI: tl.constexpr, ATOMIC: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_i = (bsz + BI - 1) // BI
    tiles_j = (bsz + BJ - 1) // BJ
    per_block = tiles_i * tiles_j
    k = pid // per_block
    rem = pid % per_block
    i = (rem % tiles_i) * BI + tl.arange(0, BI)  # i fastest: neighbours share the B panel
    j = (rem // tiles_i) * BJ + tl.arange(0, BJ)
    kb = k * bsz
    acol, a_ok = _columns(a_idx_ptr, kb, i, i < bsz, a_cols, HAS_AI)
    bcol, b_ok = _columns(b_idx_ptr, kb, j, j < bsz, b_cols, HAS_BI)
    t_start = split * t_per_split
    t_end = tl.minimum(T, t_start + t_per_split)
    acc = tl.full((BI, BJ), 0.0, tl.float32)
    for t0 in range(t_start, t_end, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < t_end
        t64 = t.to(tl.int64)[:, None]
        at = tl.load(a_ptr + t64 * stride_a + acol[None, :], mask=t_ok[:, None] & a_ok[None, :],
                     other=0.0)
        bt = tl.load(b_ptr + t64 * stride_b + bcol[None, :], mask=t_ok[:, None] & b_ok[None, :],
                     other=0.0)
        if UPCAST:  # the interpreter has no bf16 dot
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(tl.trans(at), bt, acc, input_precision=PREC)
    op = out_ptr + k.to(tl.int64) * bsz * bsz + i[:, None] * bsz + j[None, :]
    m = (i[:, None] < bsz) & (j[None, :] < bsz)
    if ATOMIC:
        tl.atomic_add(op, acc, mask=m, sem="relaxed")
    else:
        tl.store(op, acc, mask=m)


@triton.jit
def _gram_tma_kernel(
    a_desc, b_desc, o_desc, out_ptr, T, bsz, t_per_split,
    ATOMIC: tl.constexpr, TMA_REDUCE: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Contiguous blocks through TMA descriptors (``a``: ``[BT, BI]``, ``b``: ``[BT, BJ]``,
    ``out`` as ``(nb*b, b)``: ``[BI, BJ]``). ``t_per_split`` is a multiple of ``BT``."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_i = (bsz + BI - 1) // BI
    tiles_j = (bsz + BJ - 1) // BJ
    per_block = tiles_i * tiles_j
    k = pid // per_block
    rem = pid % per_block
    i0 = (rem % tiles_i) * BI
    j0 = (rem // tiles_i) * BJ
    kb = k * bsz
    t_start = split * t_per_split
    t_end = tl.minimum(T, t_start + t_per_split)
    acc = tl.full((BI, BJ), 0.0, tl.float32)
    for t0 in range(t_start, t_end, BT):
        at = a_desc.load([t0, kb + i0])
        bt = b_desc.load([t0, kb + j0])
        if UPCAST:
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(at.T, bt, acc, input_precision=PREC)
    if ATOMIC:
        if TMA_REDUCE:
            o_desc.atomic_add([kb + i0, j0], acc)
        else:
            i = i0 + tl.arange(0, BI)
            j = j0 + tl.arange(0, BJ)
            tl.atomic_add(out_ptr + (kb + i)[:, None] * bsz + j[None, :], acc, sem="relaxed")
    else:
        o_desc.store([kb + i0, j0], acc)


@triton.jit
def _permute_kernel(
    src_ptr, idx_ptr, dst_ptr, T, src_cols, dst_cols, stride_s, stride_d, rows_per_prog,
    SRC_PAD: tl.constexpr, DST_PAD: tl.constexpr,
):
    """``dst[t, p] = src[t, idx[p]]`` (zero where ``idx[p] < 0``) for ``p < dst_cols``; whole rows
    are read and written coalesced, the permutation happens in shared memory (``tl.gather``).
    One row at a time: a 1-D gather compiles quickly and keeps registers low (a 2-D one of the
    same size took minutes to compile)."""
    pid = tl.program_id(0)
    p = tl.arange(0, DST_PAD)
    p_ok = p < dst_cols
    ind = tl.load(idx_ptr + p, mask=p_ok, other=-1).to(tl.int32)
    ok = ind >= 0
    gi = tl.where(ok, ind, 0)
    s = tl.arange(0, SRC_PAD)
    s_ok = s < src_cols
    r_start = pid * rows_per_prog
    r_end = tl.minimum(T, r_start + rows_per_prog)
    src_row = src_ptr + r_start.to(tl.int64) * stride_s
    dst_row = dst_ptr + r_start.to(tl.int64) * stride_d
    xs = tl.load(src_row + s, mask=s_ok & (r_start < r_end), other=0.0)
    for r in range(r_start, r_end):
        # prefetch the next row while this one is permuted and stored
        src_row += stride_s
        nxt = tl.load(src_row + s, mask=s_ok & (r + 1 < r_end), other=0.0)
        g = tl.gather(xs, gi, axis=0)
        g = tl.where(ok, g, 0.0)
        tl.store(dst_row + p, g, mask=p_ok)
        dst_row += stride_d
        xs = nxt


@triton.jit
def _fan_out_kernel(
    src_ptr, idx0_ptr, idx1_ptr, idx2_ptr, dst_ptr, T, src_cols, dst_cols, stride_s, plane,
    rows_per_prog,
    K: tl.constexpr, SRC_PAD: tl.constexpr, DST_PAD: tl.constexpr,
):
    """``dst[k, t, p] = src[t, idx_k[p]]`` for ``k < K`` (at most 3), zero where
    ``idx_k[p] < 0``: the staged gather of :func:`_permute_kernel` for several permutations of
    one tensor, each row read once. ``idx_k``: integer vectors of at least ``dst_cols``
    entries (the layers' own padded indices, read in place); ``dst`` contiguous
    ``(K, T, dst_cols)``, ``plane = T * dst_cols``."""
    pid = tl.program_id(0)
    p = tl.arange(0, DST_PAD)
    p_ok = p < dst_cols
    ind0 = tl.load(idx0_ptr + p, mask=p_ok, other=-1).to(tl.int32)
    ind1 = ind0
    ind2 = ind0
    if K > 1:
        ind1 = tl.load(idx1_ptr + p, mask=p_ok, other=-1).to(tl.int32)
    if K > 2:
        ind2 = tl.load(idx2_ptr + p, mask=p_ok, other=-1).to(tl.int32)
    s = tl.arange(0, SRC_PAD)
    s_ok = s < src_cols
    r_start = pid * rows_per_prog
    r_end = tl.minimum(T, r_start + rows_per_prog)
    src_row = src_ptr + r_start.to(tl.int64) * stride_s
    dst_row = dst_ptr + r_start.to(tl.int64) * dst_cols
    for _ in range(r_start, r_end):
        xs = tl.load(src_row + s, mask=s_ok, other=0.0)
        g = tl.gather(xs, tl.where(ind0 >= 0, ind0, 0), axis=0)
        tl.store(dst_row + p, tl.where(ind0 >= 0, g, 0.0), mask=p_ok)
        if K > 1:
            g = tl.gather(xs, tl.where(ind1 >= 0, ind1, 0), axis=0)
            tl.store(dst_row + plane + p, tl.where(ind1 >= 0, g, 0.0), mask=p_ok)
        if K > 2:
            g = tl.gather(xs, tl.where(ind2 >= 0, ind2, 0), axis=0)
            tl.store(dst_row + 2 * plane + p, tl.where(ind2 >= 0, g, 0.0), mask=p_ok)
        src_row += stride_s
        dst_row += dst_cols


@triton.jit
def _fan_in_kernel(
    g0_ptr, g1_ptr, g2_ptr, inv0_ptr, inv1_ptr, inv2_ptr, out_ptr, T, src_cols, cols, stride_g,
    stride_o, rows_per_prog,
    K: tl.constexpr, ADD: tl.constexpr, SRC_PAD: tl.constexpr, DST_PAD: tl.constexpr,
):
    """``out[t, c] (+)= sum_k g_k[t, inv_k[c]]`` (float32 sum in order, ``K`` at most 3;
    ``ADD``: onto ``out``'s values): the backward of :func:`_fan_out_kernel`, each permuted
    gradient read once and the sum written once. ``inv_k``: ``(cols,)`` int32, every entry a
    real position."""
    pid = tl.program_id(0)
    c = tl.arange(0, DST_PAD)
    c_ok = c < cols
    inv0 = tl.load(inv0_ptr + c, mask=c_ok, other=0)
    inv1 = inv0
    inv2 = inv0
    if K > 1:
        inv1 = tl.load(inv1_ptr + c, mask=c_ok, other=0)
    if K > 2:
        inv2 = tl.load(inv2_ptr + c, mask=c_ok, other=0)
    s = tl.arange(0, SRC_PAD)
    s_ok = s < src_cols
    r_start = pid * rows_per_prog
    r_end = tl.minimum(T, r_start + rows_per_prog)
    off = r_start.to(tl.int64) * stride_g
    out_row = out_ptr + r_start.to(tl.int64) * stride_o
    for _ in range(r_start, r_end):
        acc = tl.gather(tl.load(g0_ptr + off + s, mask=s_ok, other=0.0), inv0, axis=0)
        acc = acc.to(tl.float32)
        if ADD:
            acc = tl.load(out_row + c, mask=c_ok, other=0.0).to(tl.float32) + acc
        if K > 1:
            g = tl.gather(tl.load(g1_ptr + off + s, mask=s_ok, other=0.0), inv1, axis=0)
            acc += g.to(tl.float32)
        if K > 2:
            g = tl.gather(tl.load(g2_ptr + off + s, mask=s_ok, other=0.0), inv2, axis=0)
            acc += g.to(tl.float32)
        tl.store(out_row + c, acc.to(out_ptr.dtype.element_ty), mask=c_ok)
        off += stride_g
        out_row += stride_o


@triton.jit
def _invert_kernel(idx_ptr, inv_ptr, P, BLOCK: tl.constexpr):
    """``inv[idx[p]] = p`` for every ``idx[p] >= 0``."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < P
    c = tl.load(idx_ptr + p, mask=m, other=-1)
    tl.store(inv_ptr + c, p.to(tl.int32), mask=m & (c >= 0))


# ------------------------------------------------------------------------------------------
# launchers


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _rotate_cfg(b: int, dtype: torch.dtype, tma: bool) -> tuple[int, int, int, int, int]:
    """``(BM, BN, BK, num_warps, num_stages)`` of the rotation."""
    if _interpreting():
        return 32, min(_p2(b), 32), min(_p2(b), 32), 4, 1
    if dtype == torch.float32:
        return 64, min(_p2(b), 128), min(_p2(b), 32), 4, 2
    if OPTIONS["rotate_cfg"] is not None and tma:
        return OPTIONS["rotate_cfg"]
    bn = min(_p2(b), 128)
    if tma:  # best of 9 tile shapes measured on H100 (bench/notes_kernels.md)
        if b > 256:
            return 128, bn, 64, 4, 3
        return 128, bn, min(_p2(b), 32), 4, 4
    return 64, bn, min(_p2(b), 32), 4, 2  # pointer path: per-element addresses


def _gram_cfg(b: int, dtype: torch.dtype, tma: bool) -> tuple[int, int, int, int, int]:
    """``(BI, BJ, BT, num_warps, num_stages)`` of the Gram."""
    if _interpreting():
        return min(_p2(b), 32), min(_p2(b), 32), 16, 4, 1
    if dtype == torch.float32:
        return min(_p2(b), 64), min(_p2(b), 64), 32, 4, 2
    if OPTIONS["gram_cfg"] is not None and tma:
        return OPTIONS["gram_cfg"]
    if tma:  # best measured on H100 for b = 256 and 512 (bench/notes_kernels.md)
        return min(_p2(b), 128), min(_p2(b), 256), 32, 8, 4
    return min(_p2(b), 64), min(_p2(b), 64), 32, 4, 2


def _stage_fits(x: Tensor, *widths: int) -> bool:
    return all(_p2(w) * x.element_size() <= _MAX_STAGED_BYTES for w in widths)


def _gather_mode(x: Tensor, *widths: int) -> str:
    mode = OPTIONS["gather"] or "staged"
    return "direct" if mode == "staged" and not _stage_fits(x, *widths) else mode


def staged_gather(x: Tensor, index: Tensor | None, positions: int) -> tuple[Tensor, Tensor | None]:
    """``(x, index)`` for products that read ``x`` through ``index``, as ``(x permuted into
    (T, positions), None)`` where the staged strategy applies to them, else unchanged: one
    permutation pass shared by several products instead of one each."""
    if index is None or _gather_mode(x, x.shape[1], positions) != "staged":
        return x, index
    return permute_columns(x.contiguous(), index, positions), None


def _tma_ok(t: Tensor) -> bool:
    """2-D, unit inner stride, 16-byte aligned base and rows (what a TMA descriptor needs)."""
    es = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * es) % 16 == 0 and t.shape[0] > 0 and t.shape[1] > 0)


def permute_columns(x: Tensor, index: Tensor, out_cols: int, out: Tensor | None = None) -> Tensor:
    """``(T, cols) -> (T, out_cols)``: column ``index[p]`` of ``x`` at column ``p``, zero where
    ``index[p] < 0`` (``index`` has at least ``out_cols`` entries). The staged gather."""
    T, cols = x.shape
    if out is None:
        out = torch.empty(T, out_cols, dtype=x.dtype, device=x.device)
    if T == 0 or out_cols == 0:
        return out
    src_pad, dst_pad = _p2(cols, 2), _p2(out_cols, 2)
    per_row = max(src_pad, dst_pad)
    progs = _row_programs(T, x)
    rows_per_prog = triton.cdiv(T, progs)
    warps = max(4, min(16, per_row // 1024))
    _permute_kernel[(progs,)](
        x, index, out, T, cols, out_cols, x.stride(0), out.stride(0), rows_per_prog,
        SRC_PAD=src_pad, DST_PAD=dst_pad, num_warps=warps,
    )
    return out


FAN_MAX = 3  # permutations per fan-out launch (the kernels' K)


def _row_programs(T: int, x: Tensor) -> int:
    progs = T if _interpreting() else min(T, 16 * _sms(x))
    rows = OPTIONS["rows_per_program"]
    if rows:
        progs = min(progs, triton.cdiv(T, rows))
    return triton.cdiv(T, triton.cdiv(T, progs))


def _fan_warps(k: int, src_pad: int, dst_pad: int) -> int:
    # Each index vector lives in registers: with 3 of 4096 entries, 4 warps need 232 registers
    # a thread (sm_90 compile, no spills), 8 warps 126.
    return max(8 if k > 1 else 4, min(16, max(src_pad, dst_pad) // 1024))


def _index_rows(indices: Tensor | Sequence[Tensor], positions: int) -> list[Tensor]:
    rows = list(indices)
    for row in rows:
        if row.dim() != 1 or row.numel() < positions or row.is_floating_point():
            raise ValueError(f"indices: each must be an integer vector of at least {positions} "
                             f"entries; got {row.dtype} {tuple(row.shape)}")
    return [row if row.is_contiguous() else row.contiguous() for row in rows]


def fan_out(x: Tensor, indices: Tensor | Sequence[Tensor], positions: int) -> Tensor:
    """``(T, cols)`` -> ``(K, T, positions)``: ``out[k] = gather_columns(x, indices[k],
    positions)`` for the ``K`` padded indices (a ``(K, >= positions)`` tensor or ``K``
    vectors, read in place), ``x`` read once per ``FAN_MAX`` of them. Several layers reading
    the same input get their permuted copies in one pass."""
    rows = _index_rows(indices, positions)
    K = len(rows)
    x = x.contiguous()
    T, cols = x.shape
    out = torch.empty(K, T, positions, dtype=x.dtype, device=x.device)
    if T == 0 or positions == 0 or K == 0:
        return out
    src_pad, dst_pad = _p2(cols, 2), _p2(positions, 2)
    progs = _row_programs(T, x)
    rows_per_prog = triton.cdiv(T, progs)
    for k0 in range(0, K, FAN_MAX):
        chunk = rows[k0:k0 + FAN_MAX]
        k = len(chunk)
        _fan_out_kernel[(progs,)](
            x, chunk[0], chunk[1 % k], chunk[2 % k], out[k0:], T, cols, positions, x.stride(0),
            T * positions, rows_per_prog,
            K=k, SRC_PAD=src_pad, DST_PAD=dst_pad, num_warps=_fan_warps(k, src_pad, dst_pad),
        )
    return out


def fan_in(grads: list[Tensor | None], indices: Tensor | Sequence[Tensor], cols: int
           ) -> Tensor | None:
    """``sum_k scatter_columns(grads[k], indices[k], cols)`` in float32, returned in the
    gradients' dtype: the backward of :func:`fan_out`. ``None`` entries (a layer that did not
    run) count as zero; all ``None`` gives ``None``. Each index is inverted by
    :func:`inverse_index` (the layers' indices carry their inverses)."""
    present = [(g.contiguous(), inverse_index(indices[k], cols))
               for k, g in enumerate(grads) if g is not None]
    if not present:
        return None
    g0 = present[0][0]
    T, positions = g0.shape
    out = torch.empty(T, cols, dtype=g0.dtype, device=g0.device)
    if T == 0 or cols == 0:
        return out.zero_()
    src_pad, dst_pad = _p2(positions, 2), _p2(cols, 2)
    progs = _row_programs(T, g0)
    rows_per_prog = triton.cdiv(T, progs)
    # more than FAN_MAX gradients: later launches add onto the first's sum (rounded to the
    # gradients' dtype in between)
    for k0 in range(0, len(present), FAN_MAX):
        chunk = present[k0:k0 + FAN_MAX]
        if any(g.shape != (T, positions) for g, _ in chunk):
            raise ValueError("fan_in: the gradients must share one (T, positions) shape")
        k = len(chunk)
        (g_0, i_0), (g_1, i_1), (g_2, i_2) = chunk[0], chunk[1 % k], chunk[2 % k]
        _fan_in_kernel[(progs,)](
            g_0, g_1, g_2, i_0, i_1, i_2, out, T, positions, cols,
            g0.stride(0), out.stride(0), rows_per_prog,
            K=k, ADD=k0 > 0, SRC_PAD=src_pad, DST_PAD=dst_pad,
            num_warps=_fan_warps(k, src_pad, dst_pad),
        )
    return out


_INVERSE_CACHE: dict = {}
# Two indices per layer: 256 entries thrashed on an 8B model (224 layers), relaunching the
# inversion on every call. Each entry is only ``4 * cols`` bytes.
_INVERSE_CACHE_SIZE = 4096


def inverse_index(index: Tensor, cols: int) -> Tensor:
    """``(P,)`` padded index -> ``(cols,)`` int32 with ``inv[index[p]] = p``: the inverse
    attached to ``index`` (``block_rotate_ref.attach_inverse``) while it holds, else computed.

    Remembered for the last few index tensors (keyed by identity, storage and version counter,
    checked through a weak reference), so a layer's permutation buffer is inverted once per
    change instead of once per call. While a CUDA graph is being captured the inversion is
    always recorded: the graph must see the index's contents at replay, which a merge changes
    in place, not the ones at capture time."""
    attached = attached_inverse(index, cols)
    if attached is not None:
        return attached
    capturing = index.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (id(index), index.data_ptr(), index._version, cols)
    hit = None if capturing else _INVERSE_CACHE.get(key)
    if hit is not None and hit[0]() is index:
        return hit[1]
    inv = torch.empty(cols, dtype=torch.int32, device=index.device)
    n = index.numel()
    _invert_kernel[(triton.cdiv(n, 1024),)](index, inv, n, BLOCK=1024)
    if capturing:
        return inv
    if len(_INVERSE_CACHE) >= _INVERSE_CACHE_SIZE:
        _INVERSE_CACHE.pop(next(iter(_INVERSE_CACHE)))
    _INVERSE_CACHE[key] = (weakref.ref(index), inv)
    return inv


def _launch_rotate(x, d, in_index, out_index, y, b, nb, transpose):
    T, x_cols = x.shape
    use_tma = in_index is None and out_index is None and _tma_ok(x) and _tma_ok(y)
    bm, bn, bk, warps, stages = _rotate_cfg(b, x.dtype, use_tma)
    use_tma = use_tma and b % bk == 0 and b % bn == 0
    if not use_tma:
        bm, bn, bk, warps, stages = _rotate_cfg(b, x.dtype, False)
    tiles = triton.cdiv(b, bn)
    grid = (triton.cdiv(T, bm) * nb * tiles,)
    common = dict(BM=bm, BN=bn, BK=bk, PREC=_prec(x.dtype), UPCAST=_upcast(x.dtype),
                  num_warps=warps, num_stages=stages)
    if use_tma:
        d2 = d.view(nb * b, b)
        _rotate_tma_kernel[grid](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(x, [bm, bn]),
            TensorDescriptor.from_tensor(d2, [bk, bn] if transpose else [bn, bk]),
            TensorDescriptor.from_tensor(y, [bm, bn]), b, tiles, nb * tiles,
            TRANSPOSE=bool(transpose), **common,
        )
        return
    _rotate_kernel[grid](
        x, d, x if in_index is None else in_index, x if out_index is None else out_index, y,
        T, x_cols, y.shape[1], b, x.stride(0), y.stride(0), tiles, nb * tiles,
        HAS_IN=in_index is not None, HAS_OUT=out_index is not None, TRANSPOSE=bool(transpose),
        **common,
    )


def block_rotate(
    x: Tensor,
    delta: Tensor,
    in_index: Tensor | None,
    out_index: Tensor | None,
    out_cols: int,
    transpose: bool = False,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Triton version of :func:`block_rotate_reference`: ``(T, cols) -> (T, out_cols)`` in
    ``x.dtype``, fp32 accumulation, computed as ``x + x D^T``. ``out``: optional contiguous
    ``(T, out_cols)`` result buffer (tests poison it to catch unwritten elements)."""
    if x.dim() != 2 or delta.dim() != 3 or delta.shape[1] != delta.shape[2]:
        raise ValueError(f"x must be (T, cols) and delta (nb, b, b); got {tuple(x.shape)}, "
                         f"{tuple(delta.shape)}")
    if x.dtype == torch.float64 or delta.dtype == torch.float64:
        return block_rotate_reference(x, delta, in_index, out_index, out_cols, transpose)
    nb, b, _ = delta.shape
    x = x.contiguous()
    d = delta.to(x.dtype).contiguous()
    T = x.shape[0]
    if out is None:
        y = torch.empty(T, out_cols, dtype=x.dtype, device=x.device)
    else:
        if out.shape != (T, out_cols) or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError("out must be a contiguous (T, out_cols) tensor of x's dtype")
        y = out
    if T == 0 or out_cols == 0 or nb == 0:
        return y
    positions = nb * b
    mode = _gather_mode(x, x.shape[1], positions, out_cols)
    if mode == "direct" or (in_index is None and out_index is None):
        _launch_rotate(x, d, in_index, out_index, y, b, nb, transpose)
        return y
    if in_index is not None:
        x = permute_columns(x, in_index, positions)
    if out_index is None:
        _launch_rotate(x, d, None, None, y, b, nb, transpose)
        return y
    rotated = torch.empty(T, positions, dtype=x.dtype, device=x.device)
    _launch_rotate(x, d, None, None, rotated, b, nb, transpose)
    return permute_columns(rotated, inverse_index(out_index, out_cols), out_cols, out=y)


def block_gram(
    a: Tensor, b: Tensor, a_index: Tensor | None, b_index: Tensor | None, nb: int, block: int,
    *, out: Tensor | None = None, accumulate: bool = False,
) -> Tensor:
    """Triton version of :func:`block_gram_reference`: ``(nb, b, b)`` float32. ``out``: optional
    contiguous float32 result buffer (zeroed here when the token reduction is split);
    ``accumulate``: add the Gram into ``out`` instead (the tiles' stores become atomic adds,
    so nothing is zeroed and no separate add runs)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must be (T, cols) with equal T; got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    if accumulate and out is None:
        raise ValueError("accumulate needs out")
    if torch.float64 in (a.dtype, b.dtype):
        gram = block_gram_reference(a, b, a_index, b_index, nb, block)
        return gram if out is None else (out.add_(gram) if accumulate else out.copy_(gram))
    if a.dtype != b.dtype:
        wide = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(wide), b.to(wide)
    a = a.contiguous()
    b = b.contiguous()
    T = a.shape[0]
    if out is not None and (out.shape != (nb, block, block) or out.dtype != torch.float32
                            or not out.is_contiguous()):
        raise ValueError("out must be a contiguous (nb, b, b) float32 tensor")
    if T == 0 or nb == 0:
        if out is None:
            return torch.zeros(nb, block, block, dtype=torch.float32, device=a.device)
        return out if accumulate else out.zero_()
    positions = nb * block
    if _gather_mode(a, a.shape[1], b.shape[1], positions) == "staged":
        if a_index is not None:
            a, a_index = permute_columns(a, a_index, positions), None
        if b_index is not None:
            b, b_index = permute_columns(b, b_index, positions), None
    use_tma = a_index is None and b_index is None and _tma_ok(a) and _tma_ok(b)
    bi, bj, bt, warps, stages = _gram_cfg(block, a.dtype, use_tma)
    use_tma = use_tma and block % bi == 0 and block % bj == 0
    if not use_tma:
        bi, bj, bt, warps, stages = _gram_cfg(block, a.dtype, False)
    tiles = nb * triton.cdiv(block, bi) * triton.cdiv(block, bj)
    splits = OPTIONS["gram_splits"]
    if splits is None:
        splits = 1 if _interpreting() else max(1, _sms(a) // tiles)
    splits = max(1, min(splits, triton.cdiv(T, 4 * bt)))
    t_per = triton.cdiv(triton.cdiv(T, splits), bt) * bt
    splits = triton.cdiv(T, t_per)
    atomic = splits > 1 or accumulate
    if out is None:
        out = (torch.zeros if atomic else torch.empty)(
            nb, block, block, dtype=torch.float32, device=a.device)
    elif atomic and not accumulate:
        out.zero_()
    common = dict(ATOMIC=atomic, BI=bi, BJ=bj, BT=bt, PREC=_prec(a.dtype),
                  UPCAST=_upcast(a.dtype), num_warps=warps, num_stages=stages)
    if use_tma:
        _gram_tma_kernel[(tiles, splits)](
            TensorDescriptor.from_tensor(a, [bt, bi]), TensorDescriptor.from_tensor(b, [bt, bj]),
            TensorDescriptor.from_tensor(out.view(nb * block, block), [bi, bj]), out,
            T, block, t_per, TMA_REDUCE=not _interpreting(), **common,
        )
        return out
    _gram_kernel[(tiles, splits)](
        a, b, a if a_index is None else a_index, b if b_index is None else b_index, out,
        T, a.shape[1], b.shape[1], block, a.stride(0), b.stride(0), t_per,
        HAS_AI=a_index is not None, HAS_BI=b_index is not None, **common,
    )
    return out
