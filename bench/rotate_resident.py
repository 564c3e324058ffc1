"""Block rotations with the block's delta resident (loaded once per program) against the tile
kernel: relative error against ``block_rotate_reference``, CUDA-graph timings, JSON to $OUT or
``--out``. Run 17 of ``bench/notes_kernels.md``; the resident kernels lost and were removed.

    python3 -m bench.rotate_resident --out bench/results/rotate_resident_h100.json
"""
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from bench.common import graph_ms
from poetx.kernels import block_rotate as br
from poetx.kernels.block_rotate_ref import block_rotate_reference

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERP else "cuda"
SMS = 4 if INTERP else torch.cuda.get_device_properties(0).multi_processor_count


@triton.jit
def _rotate_resident_kernel(
    x_desc, xi_desc, d_desc, y_desc, T, tiles_per_block, col_tiles, rows_per_prog,
    TRANSPOSE: tl.constexpr, B: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program ``(row group, block k, column tile)``: ``Y^T[n, t] = X^T[n, t] + sum_j M[n, j]
    X^T[j, t]`` with the block's ``M`` (``D`` rows, or ``D^T`` rows when ``TRANSPOSE``) loaded
    once and held in registers as the MMA's left operand while row tiles stream past."""
    pid = tl.program_id(0)
    pid_g = pid // col_tiles
    pid_c = pid % col_tiles
    k = pid_c // tiles_per_block
    n0 = (pid_c % tiles_per_block) * BN
    kb = k * B
    # (BN, B): M[n, j] = D[j, n] when TRANSPOSE, else D[n, j]
    m = d_desc.load([kb, n0]).T if TRANSPOSE else d_desc.load([kb + n0, 0])
    if UPCAST:
        m = m.to(tl.float32)
    r_start = pid_g * rows_per_prog
    r_end = tl.minimum(T, r_start + rows_per_prog)
    for t0 in range(r_start, r_end, BM):
        xt = x_desc.load([t0, kb])  # (BM, B)
        if UPCAST:
            xt = xt.to(tl.float32)
        acc = tl.dot(m, xt.T)  # (BN, BM)
        acc += xi_desc.load([t0, kb + n0]).to(tl.float32).T
        y_desc.store([t0, kb + n0], acc.T.to(y_desc.dtype))


def groups(nb, row_tiles, per_sm=1):
    best = None
    for g in range(1, row_tiles + 1):
        span = math.ceil(nb * g / (SMS * per_sm)) * math.ceil(row_tiles / g)
        if best is None or span < best[0]:
            best = (span, g)
    return best[1]


def rot_block(x, d, transpose, bm=64, warps=4, stages=2, g=None):
    T, cols = x.shape
    nb, b, _ = d.shape
    bn = b // 2
    y = torch.empty_like(x)
    rt = triton.cdiv(T, bm)
    g = g or groups(nb, rt)
    rows = triton.cdiv(rt, g) * bm
    g = triton.cdiv(T, rows)
    br._rotate_block_kernel[(nb * g,)](
        TensorDescriptor.from_tensor(x, [bm, bn]),
        TensorDescriptor.from_tensor(d.view(nb * b, b), [bn, bn]),
        TensorDescriptor.from_tensor(y, [bm, bn]), T, nb, rows,
        TRANSPOSE=transpose, BM=bm, BN=bn, UPCAST=INTERP, num_warps=warps, num_stages=stages)
    return y


def rot_half(x, d, transpose, bm=64, bn=128, warps=8, stages=3, g=None):
    T, cols = x.shape
    nb, b, _ = d.shape
    y = torch.empty_like(x)
    tiles = b // bn
    rt = triton.cdiv(T, bm)
    g = g or groups(nb * tiles, rt)
    rows = triton.cdiv(rt, g) * bm
    g = triton.cdiv(T, rows)
    _rotate_resident_kernel[(nb * tiles * g,)](
        TensorDescriptor.from_tensor(x, [bm, b]), TensorDescriptor.from_tensor(x, [bm, bn]),
        TensorDescriptor.from_tensor(d.view(nb * b, b), [b, bn] if transpose else [bn, b]),
        TensorDescriptor.from_tensor(y, [bm, bn]), T, tiles, nb * tiles, rows,
        TRANSPOSE=transpose, B=b, BM=bm, BN=bn, UPCAST=INTERP, num_warps=warps, num_stages=stages)
    return y


def _variants(x, d, dim, tr):
    def package(kernel):
        def run():
            br.OPTIONS["rotate_kernel"] = kernel
            try:
                return br.block_rotate(x, d, None, None, dim, tr)
            finally:
                br.OPTIONS["rotate_kernel"] = None
        return run

    variants = {"current": package("tiles"), "package resident": package("resident"),
                "block bm64 w4": lambda: rot_block(x, d, tr),
                "block bm64 w8": lambda: rot_block(x, d, tr, warps=8),
                "block bm128 w8": lambda: rot_block(x, d, tr, bm=128, warps=8),
                "half bm64 w8": lambda: rot_half(x, d, tr),
                "half bm64 w4": lambda: rot_half(x, d, tr, warps=4),
                "half bn64 bm64 w4": lambda: rot_half(x, d, tr, bn=64, warps=4)}
    if not INTERP:
        variants["copy"] = x.clone
    return variants


def main():
    torch.manual_seed(0)
    shapes = [(128, 512)] if INTERP else [(4096, 4096), (4096, 14336), (4096, 1024), (8192, 4096)]
    rows = []
    for T, dim in shapes:
        b = 256
        nb = dim // b
        x = torch.randn(T, dim, device=DEV, dtype=torch.bfloat16)
        d = (0.02 * torch.randn(nb, b, b, device=DEV)).to(torch.bfloat16)
        for tr in (False, True):
            ref = block_rotate_reference(x.double(), d.double(), None, None, dim, tr)
            for name, fn in _variants(x, d, dim, tr).items():
                y = fn()
                err = None if name == "copy" else ((y.double() - ref).norm() / ref.norm()).item()
                ms = None if INTERP else graph_ms(fn, calls=10, reps=10)
                gbs = 2 * T * dim * 2 / (ms * 1e-3) / 1e9 if ms else None
                rows.append(dict(T=T, dim=dim, transpose=tr, variant=name,
                                 us=ms and ms * 1e3, gbs=gbs, rel_err=err))
                print(f"T={T} dim={dim} tr={int(tr)} {name:20s} "
                      f"{(ms or 0) * 1e3:8.1f} us {gbs or 0:7.0f} GB/s err={err}", flush=True)
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    if out is None and os.environ.get("OUT"):
        out = os.path.join(os.environ["OUT"], "rotate_resident.json")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
