"""SwiGLU between permuted frames (``poetx.kernels.frame_swiglu``): GPU time of the forward and
backward kernels for several warps per program (``OPTIONS["warps"]``; 0 is the default rule),
at a Llama MLP's width, against a copy of the same bytes.

Each variant is checked against the float64 reference before it is timed (bf16: within one
rounding of the output). Times are medians of CUDA-graph replays of 10 calls.
``--best-out FILE`` writes the fastest correct variant as a ``POETX_FRAME_SWIGLU`` value
(forward and backward summed), for a step benchmark run after this one.
(``bench/results/frame_swiglu_h100.json`` also has rows of two walks since removed, output
chunks and a prefetch of the next row: slower or no faster.)

    python -m bench.frame_swiglu --out bench/results/frame_swiglu.json
"""

from __future__ import annotations

import argparse

import torch

from bench.common import environment, graph_ms, print_table, write_json


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=14336)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--warps", default="0,8,16,32", help="0: the kernels' default rule")
    parser.add_argument("--out", default="bench/results/frame_swiglu.json")
    parser.add_argument("--best-out")
    args = parser.parse_args()

    from poetx.kernels import frame_swiglu as fs
    from poetx.kernels.frame_swiglu_ref import (
        frame_maps,
        swiglu_frames_backward_reference,
        swiglu_frames_reference,
    )
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nb = -(-args.cols // args.block)
    positions = nb * args.block
    # each frame: a random order of the columns, phantoms (-1) last where the block pads
    indices = [torch.cat([torch.randperm(args.cols),
                          torch.full((positions - args.cols,), -1)]).to(dev) for _ in range(3)]
    maps = frame_maps(*indices, args.cols)
    T = args.tokens
    gate, up, grad_h = (torch.randn(T, positions, device=dev, dtype=torch.bfloat16)
                        for _ in range(3))
    # the reference on a slice of rows (float64 of every row would not fit comfortably)
    rows = slice(0, min(T, 256))
    h_ref = swiglu_frames_reference(gate[rows].double(), up[rows].double(), maps)
    g_refs = swiglu_frames_backward_reference(grad_h[rows].double(), gate[rows].double(),
                                              up[rows].double(), maps)
    tol = 2 ** -8
    env = environment()
    copy_src = torch.empty(3, T, positions, device=dev, dtype=torch.bfloat16)
    copy_dst = torch.empty_like(copy_src)
    # 3 rows read, 3 written
    copy_us = 1e3 * graph_ms(lambda: copy_dst.copy_(copy_src), calls=10, reps=15)
    results = []
    for warps in [int(w) for w in args.warps.split(",")]:
        fs.OPTIONS.update(warps=warps or None)
        spec = f"warps={warps or fs._warps(1 << (positions - 1).bit_length())}"
        row = {"variant": spec, "tokens": T, "cols": args.cols, "block": args.block}
        try:
            h = fs.swiglu_frames(gate, up, maps)
            grads = fs.swiglu_frames_backward(grad_h, gate, up, maps)
            errs = [rel_err(h[rows], h_ref)]
            errs += [rel_err(g[rows], r) for g, r in zip(grads, g_refs, strict=True)]
            row["max_rel_err"] = max(errs)
            row["correct"] = row["max_rel_err"] < tol
            row["fwd_us"] = 1e3 * graph_ms(lambda: fs.swiglu_frames(gate, up, maps), calls=10,
                                            reps=15)
            row["bwd_us"] = 1e3 * graph_ms(
                lambda: fs.swiglu_frames_backward(grad_h, gate, up, maps), calls=10, reps=15)
            # forward moves 3 rows (2 read, 1 written), backward 5 (3 read, 2 written)
            row["fwd_vs_copy"] = row["fwd_us"] / (copy_us * 3 / 6)
            row["bwd_vs_copy"] = row["bwd_us"] / (copy_us * 5 / 6)
            row["status"] = "ok"
        except Exception as exc:  # a variant that does not compile or launch is a result
            row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        results.append(row)
        print(row, flush=True)
    fs.OPTIONS.update(warps=None)
    for r in results:
        r["copy_us_6_rows"] = copy_us
    print_table(results, ["variant", "status", "fwd_us", "bwd_us", "fwd_vs_copy",
                         "bwd_vs_copy", "max_rel_err"])
    write_json(args.out, results, env)
    good = [r for r in results if r.get("status") == "ok" and r["correct"]]
    if args.best_out and good:
        best = min(good, key=lambda r: r["fwd_us"] + r["bwd_us"])
        with open(args.best_out, "w") as f:
            f.write(best["variant"] + "\n")
        print("best:", best["variant"])


if __name__ == "__main__":
    main()
