"""The block rotation's kernels side by side at the Llama-8B step's shapes.

    python3 -m bench.rotate --out bench/results/rotate_kernels.json

For each width (the step's rotated activations at 4096 tokens, b = 256, bf16) and direction,
times under CUDA-graph replay: a backward side (the transposed rotation and the Gram of one
gradient) as two kernels and as one pass (``OPTIONS["rotate_gram"]``); then ``block_rotate``
with no index (what the step runs after its staged permutations) for the tile kernel (one
program per output tile) and the persistent kernels (``OPTIONS["rotate_kernel"]``) at several
programs per SM and tile shapes, against a copy of the same bytes. Each variant's output is
checked against the first's (``max_err``: largest difference over the largest value). Prints
a table, writes JSON.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import environment, graph_ms, print_table, write_json
from poetx.kernels import block_rotate as br

# (kernel, programs per SM, (BM, BN, BK, warps, stages) or None for the default)
VARIANTS = [
    ("tile", None, None),
    ("persistent", 1, (128, 128, 32, 4, 3)),
    ("persistent", 2, (128, 128, 32, 4, 2)),
    ("persistent-mma", 2, (128, 128, 32, 4, 3)),
    ("persistent-mma", 2, (128, 128, 32, 8, 3)),
    ("persistent-mma", 3, (64, 128, 32, 4, 3)),
]


def _set(kernel, ctas, cfg):
    br.OPTIONS["rotate_kernel"] = kernel
    br.OPTIONS["persistent_ctas"] = ctas or 2
    br.OPTIONS["rotate_cfg"] = cfg


def _width_rows(tokens: int, width: int, b: int, calls: int) -> list[dict]:
    nb = width // b
    xs = [torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    d = (0.02 * torch.randn(nb, b, b, device="cuda")).to(torch.bfloat16)
    nbytes = 2 * tokens * width * 2
    copy_ms = graph_ms(lambda: [x.clone() for x in xs]) / len(xs)
    rows = [dict(width=width, transpose=None, kernel="copy", ctas=None, cfg=None,
                 us=copy_ms * 1e3, tb_s=nbytes / copy_ms / 1e9, max_err=None)]
    for transpose in (False, True):
        _set("tile", None, None)
        want = [br.block_rotate(x, d, None, None, width, transpose) for x in xs]

        def rotations(t=transpose):
            return [br.block_rotate(xs[i % 3], d, None, None, width, t) for i in range(calls)]

        for kernel, ctas, cfg in VARIANTS:
            _set(kernel, ctas, cfg)
            try:
                got = [br.block_rotate(x, d, None, None, width, transpose) for x in xs]
                err = max(((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
                          for g, w in zip(got, want, strict=True))
                ms = graph_ms(rotations) / calls
            except Exception as e:  # noqa: BLE001  (a shape that does not compile)
                print(f"{kernel} {ctas} {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            finally:
                _set("tile", None, None)
            rows.append(dict(width=width, transpose=transpose, kernel=kernel, ctas=ctas,
                             cfg=cfg and "x".join(map(str, cfg)), us=ms * 1e3,
                             tb_s=nbytes / ms / 1e9, max_err=err))
            print(f"{width} {transpose} {kernel} {ctas} {cfg}: {ms * 1e3:.1f} us "
                  f"err {err:.2e}", flush=True)
    return rows


def _backward_side_rows(tokens: int, width: int, b: int, calls: int) -> list[dict]:
    """A layer's backward side: the transposed rotation and the Gram of one gradient, as two
    kernels and as one pass (``POETX_ROTATE_GRAM``), into a gradient buffer."""
    nb = width // b
    gs = [torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    act = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    d = (0.02 * torch.randn(nb, b, b, device="cuda")).to(torch.bfloat16)
    sink = torch.empty(nb, b, b, device="cuda")
    rows, want = [], None
    for choice in ("separate", "fused"):
        br.OPTIONS["rotate_gram"] = choice
        try:
            got = br.block_rotate_gram(gs[0], d, act, width, out=sink)
            got = (got[0].clone(), got[1].clone())
            want = want or got
            err = max(((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
                      for g, w in zip(got, want, strict=True))
            ms = graph_ms(lambda: [br.block_rotate_gram(gs[i % 3], d, act, width, out=sink)
                                   for i in range(calls)]) / calls
        finally:
            br.OPTIONS["rotate_gram"] = None
        # the rotation reads G and writes Y, the Gram reads G and A: what the two kernels move
        nbytes = 4 * tokens * width * 2
        rows.append(dict(width=width, transpose=True, kernel=f"rotation+gram {choice}",
                         ctas=None, cfg=None, us=ms * 1e3, tb_s=nbytes / ms / 1e9, max_err=err))
        print(f"{width} rotation+gram {choice}: {ms * 1e3:.1f} us err {err:.2e}", flush=True)
    return rows


def run(tokens: int, widths: list[int], b: int, calls: int) -> list[dict]:
    rows = []
    for width in widths:
        rows += _backward_side_rows(tokens, width, b, calls)
        rows += _width_rows(tokens, width, b, calls)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 14336, 1024])
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--out", default="bench/results/rotate_kernels.json")
    args = p.parse_args()
    rows = run(args.tokens, args.widths, args.block, args.calls)
    print(f"{environment()['device']}, {args.tokens} tokens, b = {args.block}, bf16")
    print_table(rows, ["width", "transpose", "kernel", "ctas", "cfg", "us", "tb_s", "max_err"])
    write_json(args.out, rows, environment())


if __name__ == "__main__":
    main()
