"""Registers, spills and shared memory of the row-panel (fused) Cayley-Neumann kernels, compiled
for sm_90 on a machine without a GPU (``triton.compile`` + ``cuobjdump -res-usage``).

A kernel that spills (``STACK > 0``) or asks for more than 227 KB of shared memory is not worth
a GPU call. The launch shapes are those :func:`poetx.kernels.cayley_neumann._fused_config`
picks (``--fused-bn`` caps the column chunk, as ``OPTIONS["fused_bn"]``); arguments get the
specialisation the JIT gives them at these sizes (16-byte aligned pointers, ``b`` and
``b(b-1)/2`` multiples of 16).

    python -m bench.kernel_resources --blocks 64,128,192,256
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from poetx.kernels import cayley_neumann as cn

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                          "cuobjdump")
_TYPES = {"bf16": "bf16", "tf32": "fp32"}  # storage of the dense operands per product precision


def resources(fn, signature: dict[str, str], constexprs: dict, warps: int, stages: int) -> dict:
    """``{"regs", "stack", "shared"}`` (bytes) of ``fn`` compiled for sm_90."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
             if ty.startswith("*") or name in ("b", "npar")}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                      attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"regs": int(m[1]), "stack": int(m[2]), "shared": kernel.metadata.shared}


def fused_signatures(st: str, cfg) -> dict[str, dict[str, str]]:
    """Signatures of the two fused kernels for storage type ``st`` and launch shapes ``cfg``."""
    a = f"tensordesc<{st}[{cfg.tile}, {cfg.bk}]>"
    bt = f"tensordesc<{st}[{cfg.bn}, {cfg.bk}]>"
    geo = {"b": "i32", "nb": "i32", "vl_last": "i32", "npar": "i32"}
    const = {k: "constexpr" for k in ("BM", "BN", "BK", "PREC")}
    fwd = {"n_desc": a, "nt_desc": bt, "n_ptr": f"*{st}", "theta_ptr": "*fp32",
           "x2_ptr": f"*{st}", "a3_ptr": f"*{st}", "out_ptr": "*bf16", **geo, **const}
    bwd = {"p_desc": a, "pt_desc": bt, "sy_desc": a, "syt_desc": bt, "k_desc": a, "kt_desc": bt,
           "g_ptr": "*fp32", "d_ptr": f"*{st}", "x_ptr": f"*{st}", "out_ptr": "*fp32", **geo,
           **const}
    return {"_cn_fused_fwd_kernel": fwd, "_cn_fused_bwd_kernel": bwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="64,128,192,256")
    parser.add_argument("--precisions", default="bf16,tf32")
    parser.add_argument("--fused-bn", type=int, default=None)
    args = parser.parse_args()
    cn.OPTIONS.update(fused=1, fused_bn=args.fused_bn)
    print("kernel                 prec  b    BM  BN   BK  warps stages  regs stack shared")
    for prec in args.precisions.split(","):
        for b in map(int, args.blocks.split(",")):
            cfg = cn._fused_config(b, prec)
            consts = {"BM": cfg.tile, "BN": cfg.bn, "BK": cfg.bk, "PREC": prec}
            for name, sig in fused_signatures(_TYPES[prec], cfg).items():
                r = resources(getattr(cn, name), sig, consts, cfg.warps, cfg.stages)
                print(f"{name:22s} {prec:5s} {b:<4d} {cfg.tile:<3d} {cfg.bn:<4d} {cfg.bk:<3d} "
                      f"{cfg.warps:<5d} {cfg.stages:<6d}  {r['regs']:<4d} {r['stack']:<5d} "
                      f"{r['shared']}", flush=True)


if __name__ == "__main__":
    main()
