"""Rotation-block build (Cayley-Neumann forward + backward) of one decoder block: layer by layer
against the batched build (``poetx.ops.rotation_group``), GPU time under CUDA-graph replay.

Per decoder block of a Llama preset, the 7 projections give 14 sides (each ``(nb, b(b-1)/2)``
skew parameters). "per-layer" builds each side's blocks and its skew gradient with its own
calls (what each ``POETLinear`` did alone); "batched" runs one build and one backward for all
sides (chunks of ``CHUNK_BLOCKS`` blocks). Times are per decoder block and scaled to the model;
``extra_mib`` is the peak memory of one call above what its inputs and outputs hold.
A third row times only the products, as 7 batched cuBLAS bf16 GEMMs of the decoder block's
blocks: what a build made of cuBLAS calls could not go below.
``--precisions`` sets the product precision (``POETX_CAYLEY_PRECISION``; bf16 stores the dense
operands in bf16) and gives each precision's relative error against float64 on the first side
(blocks and skew gradient); ``--tiles`` caps the kernels' tile (``auto``: the kernels' default).
(``bench/results/rotation_build_fused_h100.json`` also has rows of the row-panel kernels, since
measured slower and removed: ``bench/notes_kernels.md``, runs 7-8.)

    python -m bench.rotation_build --out bench/results/rotation_build.json
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.common import environment, graph_ms, print_table, write_json


def block_sides(preset: str, block: int) -> tuple[list[int], int]:
    """Blocks per side of one decoder block's 7 projections (in, out of each), and the number
    of decoder blocks."""
    from poetx.model.llama import llama_config

    cfg = llama_config(preset)
    h, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    dims = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
    return [-(-d // block) for pair in dims for d in pair], cfg.num_hidden_layers


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def measure(preset: str, block: int, out_dtype: torch.dtype, precision: str,
            tile: int | None = None) -> list[dict]:
    from poetx.kernels import cayley_neumann as cn
    from poetx.ops import backend
    from poetx.ops.rotation_group import build_rotation_group
    from poetx.ortho.cayley import (
        num_skew_params,
        rotation_delta_backward_reference,
        rotation_delta_reference,
    )

    os.environ["POETX_CAYLEY_PRECISION"] = precision
    cn.OPTIONS["tile"] = tile
    sizes, layers = block_sides(preset, block)
    npar = num_skew_params(block)
    # ||Q||_F = 0.5 per block: mid-way to the default merge guard (max_q_norm = 1)
    thetas = [(0.5 / (2 * npar) ** 0.5 * torch.randn(nb, npar, device="cuda")).requires_grad_(True)
              for nb in sizes]
    grads = [torch.randn(nb, block, block, device="cuda") for nb in sizes]

    def per_layer():
        for t, g in zip(thetas, grads, strict=True):
            backend.rotation_delta(t.detach(), block, 3, None, out_dtype)
            backend.rotation_delta_backward(t.detach(), g, block, 3, None,
                                            build_dtype=out_dtype)

    def batched():
        _, handles = build_rotation_group(thetas, block, 3, None, out_dtype)
        torch.autograd.backward(handles, grads)

    # What cuBLAS makes of the same products: the build and its backward are 7 b x b x b
    # products per block (forward S = QQ and S (S + N)^T; backward S, U, V and the two of W),
    # here as 7 batched bf16 GEMMs over the decoder block's blocks (fp32 accumulation), with
    # none of the prep, combinations or packing around them: a floor for a cuBLAS-based build.
    total = sum(sizes)
    operands = [torch.randn(total, block, block, device="cuda", dtype=torch.bfloat16)
                for _ in range(3)]
    product = torch.empty_like(operands[0])

    def cublas_products():
        for i in range(7):
            torch.bmm(operands[i % 3], operands[(i + 1) % 3], out=product)

    rows = []
    for name, fn in (("per-layer", per_layer), ("batched", batched),
                     ("cublas-products-only", cublas_products)):
        ms = graph_ms(fn)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        for t in thetas:
            t.grad = None
        tflops = 14 * total * block ** 3 / (ms * 1e-3) / 1e12
        rows.append({"model": preset, "block": block, "dtype": str(out_dtype).split(".")[-1],
                     "precision": precision, "tile": tile or "auto",
                     "blocks_per_decoder_block": sum(sizes),
                     "path": name, "ms_per_decoder_block": ms, "ms_per_step": ms * layers,
                     "tflops": tflops if name == "cublas-products-only" else None,
                     "extra_mib": extra})
    # the two paths give the same blocks and gradients; both against float64
    ref = [backend.rotation_delta(t.detach(), block, 3, None, out_dtype) for t in thetas]
    got, handles = build_rotation_group(thetas, block, 3, None, out_dtype)
    torch.autograd.backward(handles, grads)
    ref_grads = [backend.rotation_delta_backward(t.detach(), g, block, 3, None,
                                                 build_dtype=out_dtype)
                 for t, g in zip(thetas, grads, strict=True)]
    same = all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)) and all(
        torch.equal(t.grad, r) for t, r in zip(thetas, ref_grads, strict=True))
    theta64 = thetas[0].detach().double()
    err_blocks = _rel(got[0], rotation_delta_reference(theta64, block, 3, None))
    err_grad = _rel(thetas[0].grad, rotation_delta_backward_reference(
        theta64, grads[0].double(), block, 3, None))
    for r in rows[:2]:
        r.update(bitwise_equal=same, rel_err_blocks=err_blocks, rel_err_grad=err_grad)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="llama-8b,llama-130m")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--precisions", default="tf32,bf16")
    parser.add_argument("--tiles", default="auto", help="comma list of tile caps or auto")
    parser.add_argument("--out", default="bench/results/rotation_build.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    env = environment()
    rows = []
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            for tile in args.tiles.split(","):
                cap = None if tile == "auto" else int(tile)
                rows += [{**env, **r} for r in measure(preset, args.block_size, torch.bfloat16,
                                                       precision, cap)]
    print_table(rows, ["model", "precision", "tile", "blocks_per_decoder_block", "path",
                       "ms_per_decoder_block", "ms_per_step", "tflops", "extra_mib",
                       "bitwise_equal", "rel_err_blocks", "rel_err_grad"])
    write_json(args.out, rows, {})


if __name__ == "__main__":
    main()
