"""POET-X layer forward+backward latency against a dense ``nn.Linear`` (bf16, cuBLAS).

For each (shape, tokens, block size, mode): the median fwd+bwd time of ``POETLinear`` (Triton
kernels) and of ``nn.Linear`` with the same shape, both timed with ``triton.testing.do_bench``
(CUDA events, median) while rotating among several input sets; and the relative errors
(``||out - ref|| / ||ref||``) of the output and of the gradients (input, both skew parameters)
against the same layer run in float64 on the GPU (the PyTorch reference path) from the same
bf16 inputs and weights.

    PYTHONPATH=. python bench/layer.py                  # full table -> bench/results/layer.json
    PYTHONPATH=. python bench/layer.py --micro          # per-kernel timings first
    PYTHONPATH=. python bench/layer.py --profile        # kernel breakdown of two layers

Flags pick subsets (``--shapes 4096x14336 --tokens 8192 --blocks 256 --modes fast``) and the
kernels' gather strategy (``--gather staged|direct``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from poetx.config import POETConfig  # noqa: E402
from poetx.kernels import block_rotate as br  # noqa: E402
from poetx.kernels import cayley_neumann as cn  # noqa: E402
from poetx.layers.poet_linear import POETLinear  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "4096x14336": (4096, 14336),
          "14336x4096": (14336, 4096), "4096x1024": (4096, 1024)}
DT = torch.bfloat16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def flops_floor(T, n, m, b):
    return 4 * T * m * n + 6 * T * b * (m + n), 6 * T * m * n


def make_poet(n, m, b, mode, theta_scale=0.005):
    cfg = POETConfig(block_size=b, mode=mode)
    layer = POETLinear(n, m, bias=False, config=cfg, name=f"bench{n}x{m}", device="cuda",
                       dtype=DT)
    with torch.no_grad():
        layer.theta_in.normal_(0, theta_scale)
        layer.theta_out.normal_(0, theta_scale)
    return layer


def reference_grads(layer, x, gy):
    """Float64 copy of ``layer`` on the GPU (the PyTorch reference path), same inputs."""
    ref = POETLinear(layer.in_features, layer.out_features, bias=False, config=layer.config,
                     name="ref", device="cuda", dtype=torch.float64)
    # Every buffer, not only the permutations: the layer keeps derived index buffers
    # (padded gather index, inverse) that the kernels read instead of ``perm_*``.
    target = ref.state_dict()
    with torch.no_grad():
        for name, value in layer.state_dict().items():
            if name in target:
                target[name].copy_(value)
    xr = x.detach().double().requires_grad_(True)
    y = ref(xr)
    y.backward(gy.double())
    out = (y.detach(), xr.grad, ref.theta_in.grad, ref.theta_out.grad)
    del ref, xr, y
    return out


def run_fwd_bwd(layer, x, gy):
    layer.theta_in.grad = None
    layer.theta_out.grad = None
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(gy)
    return y.detach(), x.grad, layer.theta_in.grad, layer.theta_out.grad


def time_layer(module, xs, gys, params):
    """Eager fwd+bwd (Python and launch overhead included), median ms."""
    state = {"i": 0}

    def step():
        i = state["i"] % len(xs)
        state["i"] += 1
        y = module(xs[i])
        y.backward(gys[i])

    return do_bench(step, warmup=25, rep=150, grad_to_none=params + list(xs),
                    return_mode="median")


def time_layer_graph(module, xs, gys, params):
    """Fwd+bwd captured in one CUDA graph per input set, replays timed (GPU time), median ms."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            for p in params + list(xs):
                p.grad = None
            module(xs[i % len(xs)]).backward(gys[i % len(xs)])
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    pool = None
    for i in range(len(xs)):
        for p in params + list(xs):
            p.grad = None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            module(xs[i]).backward(gys[i])
        pool = g.pool()
        graphs.append(g)
    state = {"i": 0}

    def replay():
        graphs[state["i"] % len(graphs)].replay()
        state["i"] += 1

    ms = do_bench(replay, warmup=25, rep=150, return_mode="median")
    graphs.clear()
    for p in params + list(xs):
        p.grad = None
    return ms


def bench_table(args, device_name):
    rows = []
    for shape in args.shapes:
        n, m = SHAPES[shape]
        for T in args.tokens:
            xs = [torch.randn(T, n, device="cuda", dtype=DT).requires_grad_(True)
                  for _ in range(args.sets)]
            gys = [torch.randn(T, m, device="cuda", dtype=DT) for _ in range(args.sets)]
            dense = torch.nn.Linear(n, m, bias=False, device="cuda", dtype=DT)
            dense_eager = time_layer(dense, xs, gys, [dense.weight])
            dense_ms = time_layer_graph(dense, xs, gys, [dense.weight])
            w64 = dense.weight.detach().double()
            dense_err = rel(dense(xs[0]).detach(), xs[0].detach().double() @ w64.t())
            del dense, w64
            for b in args.blocks:
                layer = make_poet(n, m, b, args.modes[0])
                ref = None if args.no_ref else reference_grads(layer, xs[0], gys[0])
                for mode in args.modes:
                    layer.config = dataclasses.replace(layer.config, mode=mode)  # frozen config
                    got = run_fwd_bwd(layer, xs[0], gys[0])
                    errs = ([rel(g, r) for g, r in zip(got, ref, strict=True)] if ref
                            else [float("nan")] * 4)
                    del got
                    params = [layer.theta_in, layer.theta_out]
                    eager = time_layer(layer, xs, gys, params)
                    try:
                        ms = time_layer_graph(layer, xs, gys, params)
                    except Exception as e:  # noqa: BLE001
                        print(f"  graph capture failed: {type(e).__name__}: {str(e)[:300]}")
                        ms = float("nan")
                    floor, dense_fl = flops_floor(T, n, m, b)
                    row = dict(
                        in_features=n, out_features=m, tokens=T, block_size=b, mode=mode,
                        gather=br.OPTIONS["gather"] or "staged",
                        dense_ms=round(dense_ms, 4), poetx_ms=round(ms, 4),
                        ratio=round(ms / dense_ms, 3),
                        eager_dense_ms=round(dense_eager, 4), eager_poetx_ms=round(eager, 4),
                        eager_ratio=round(eager / dense_eager, 3),
                        max_rel_err=max(errs), rel_err_y=errs[0], rel_err_dx=errs[1],
                        rel_err_dtheta_in=errs[2], rel_err_dtheta_out=errs[3],
                        dense_rel_err_y=dense_err,
                        flop_floor_ratio=round(floor / dense_fl, 3),
                        device=device_name,
                    )
                    rows.append(row)
                    print(f"{shape:>11} T={T:5d} b={b:3d} {mode:4s} graph: dense {dense_ms:7.3f} "
                          f"poetx {ms:7.3f} ratio {ms / dense_ms:5.2f} | eager: dense "
                          f"{dense_eager:7.3f} poetx {eager:7.3f} ratio "
                          f"{eager / dense_eager:5.2f} | err {max(errs):.2e}", flush=True)
                del layer, ref
                torch.cuda.empty_cache()
            del xs, gys
            torch.cuda.empty_cache()
    return rows


def table_md(rows):
    head = ("| in | out | tokens | b | mode | dense ms | POET-X ms | ratio | eager dense ms | "
            "eager POET-X ms | eager ratio | floor ratio | max rel err | dense y err |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['in_features']} | {r['out_features']} | {r['tokens']} | {r['block_size']} | "
            f"{r['mode']} | {r['dense_ms']:.3f} | {r['poetx_ms']:.3f} | {r['ratio']:.2f} | "
            f"{r['eager_dense_ms']:.3f} | {r['eager_poetx_ms']:.3f} | {r['eager_ratio']:.2f} | "
            f"{r['flop_floor_ratio']:.2f} | {r['max_rel_err']:.2e} | {r['dense_rel_err_y']:.1e} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# per-kernel timings


def _gbps(nbytes, ms):
    return nbytes / ms / 1e6


def micro(args):
    """Per-kernel timings at one Llama-8B shape, to see where the layer's time goes."""
    res = []

    def rec(name, ms, nbytes=None, flops=None):
        extra = ""
        if nbytes:
            extra += f"  {_gbps(nbytes, ms):7.0f} GB/s"
        if flops:
            extra += f"  {flops / ms / 1e9:7.1f} TFLOP/s"
        print(f"  {name:58s} {ms * 1e3:9.1f} us{extra}", flush=True)
        res.append(dict(name=name, us=ms * 1e3, bytes=nbytes, flops=flops))

    def bench(fn):
        return do_bench(fn, warmup=10, rep=50, return_mode="median")

    launch_overhead(rec)
    T = args.micro_tokens
    for dim, b in args.micro_shapes:
        print(f"T={T} dim={dim} b={b}", flush=True)
        _micro_shape(T, dim, b, args, rec, bench)
        torch.cuda.empty_cache()
    return res


def launch_overhead(rec):
    """Host time per call (tiny GPU work, so the host is the bottleneck)."""
    x = torch.randn(16, 4096, device="cuda", dtype=DT)
    d = (0.01 * torch.randn(16, 256, 256, device="cuda")).to(DT)
    perm = torch.randperm(4096, device="cuda")
    theta = 0.005 * torch.randn(16, 256 * 255 // 2, device="cuda")
    g = torch.randn(16, 256, 256, device="cuda")
    layer = make_poet(4096, 4096, 256, "fast")
    xl = torch.randn(16, 4096, device="cuda", dtype=DT, requires_grad=True)
    dense = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=DT)
    cases = {
        "host: torch.empty": lambda: torch.empty(16, 4096, device="cuda"),
        "host: x.clone()": lambda: x.clone(),
        "host: rotate no index (1 launch)": lambda: br.block_rotate(x, d, None, None, 4096),
        "host: rotate in_index (2 launches)": lambda: br.block_rotate(x, d, perm, None, 4096),
        "host: gram no index": lambda: br.block_gram(x, x, None, None, 16, 256),
        "host: cayley fwd (3 launches)": lambda: cn.cayley_neumann_delta(theta, 256, 3, None, DT),
        "host: cayley bwd (3 launches)":
            lambda: cn.cayley_neumann_delta_backward(theta, g, 256, 3, None),
        "host: POET layer fwd+bwd T=16": lambda: layer(xl).sum().backward(),
        "host: dense fwd+bwd T=16": lambda: dense(xl).sum().backward(),
    }
    for name, fn in cases.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        rec(name, (time.perf_counter() - t0) / n * 1e3)


def _micro_shape(T, dim, b, args, rec, bench):
    nb = math.ceil(dim / b)
    xs = [torch.randn(T, dim, device="cuda", dtype=DT) for _ in range(3)]
    vs = [torch.randn(T, dim, device="cuda", dtype=DT) for _ in range(3)]
    d = (0.01 * torch.randn(nb, b, b, device="cuda")).to(DT)
    perm = torch.randperm(dim, device="cuda")
    act = T * dim * 2
    cnt = {"i": 0}

    def nxt(lst):
        cnt["i"] += 1
        return lst[cnt["i"] % len(lst)]

    rec("copy (clone)", bench(lambda: nxt(xs).clone()), 2 * act)
    rec("torch gather x[:, perm]", bench(lambda: nxt(xs)[:, perm]), 2 * act)
    rec("permute_columns (staged gather)",
        bench(lambda: br.permute_columns(nxt(xs), perm, dim)), 2 * act)
    fl = 2 * T * dim * b
    for gather in ("staged", "direct"):
        br.OPTIONS["gather"] = gather
        rec(f"rotate {gather} no index",
            bench(lambda: br.block_rotate(nxt(xs), d, None, None, dim)), 2 * act, fl)
        rec(f"rotate {gather} in_index",
            bench(lambda: br.block_rotate(nxt(xs), d, perm, None, dim)), 2 * act, fl)
        rec(f"rotate {gather} out_index transpose",
            bench(lambda: br.block_rotate(nxt(xs), d, None, perm, dim, True)), 2 * act, fl)
        rec(f"gram {gather} a_index",
            bench(lambda: br.block_gram(nxt(xs), nxt(vs), perm, None, nb, b)), 2 * act, fl)
    br.OPTIONS["gather"] = None
    for cfg in args.rotate_cfgs:
        br.OPTIONS["rotate_cfg"] = cfg
        try:
            rec(f"rotate no index cfg={cfg}",
                bench(lambda: br.block_rotate(nxt(xs), d, None, None, dim)), 2 * act, fl)
        except Exception as e:  # noqa: BLE001
            print(f"  cfg {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
    br.OPTIONS["rotate_cfg"] = None
    for cfg in args.gram_cfgs:
        br.OPTIONS["gram_cfg"] = cfg
        for splits in (None, 1):
            br.OPTIONS["gram_splits"] = splits
            try:
                rec(f"gram no index cfg={cfg} splits={splits}",
                    bench(lambda: br.block_gram(nxt(xs), nxt(vs), None, None, nb, b)),
                    2 * act, fl)
            except Exception as e:  # noqa: BLE001
                print(f"  cfg {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
    br.OPTIONS["gram_cfg"] = None
    br.OPTIONS["gram_splits"] = None
    theta = 0.005 * torch.randn(nb, b * (b - 1) // 2, device="cuda")
    g = torch.randn(nb, b, b, device="cuda")
    cfl = 2 * nb * 2 * b ** 3
    rec("cayley fwd",
        bench(lambda: cn.cayley_neumann_delta(theta, b, 3, None, DT)), None, cfl)
    rec("cayley bwd",
        bench(lambda: cn.cayley_neumann_delta_backward(theta, g, b, 3, None)), None, 2.5 * cfl)
    w = torch.randn(dim, 4096, device="cuda", dtype=DT)
    rec(f"GEMM x({T}x{dim}) @ W({dim}x4096)", bench(lambda: nxt(xs) @ w), None,
        2 * T * dim * 4096)


def profile(args):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    for shape, T, b in (("4096x14336", 8192, 256), ("4096x4096", 2048, 256)):
        n, m = SHAPES[shape]
        layer = make_poet(n, m, b, "fast")
        x = torch.randn(T, n, device="cuda", dtype=DT).requires_grad_(True)
        gy = torch.randn(T, m, device="cuda", dtype=DT)
        for _ in range(3):
            run_fwd_bwd(layer, x, gy)
        torch.cuda.synchronize()
        with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run_fwd_bwd(layer, x, gy)
            torch.cuda.synchronize()
        print(f"--- profile {shape} T={T} b={b} (5 iterations)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                        max_name_column_width=60))
        del layer, x, gy
        torch.cuda.empty_cache()


def parse_cfg(s):
    return tuple(int(v) for v in s.split(","))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--blocks", nargs="+", type=int, default=[256, 512])
    p.add_argument("--modes", nargs="+", default=["fast", "mem"], choices=["fast", "mem"])
    p.add_argument("--sets", type=int, default=3, help="input sets rotated while timing")
    p.add_argument("--gather", choices=["staged", "direct"], default=None)
    p.add_argument("--no-ref", action="store_true", help="skip the float64 reference")
    p.add_argument("--no-table", action="store_true")
    p.add_argument("--micro", action="store_true")
    p.add_argument("--micro-tokens", type=int, default=8192)
    p.add_argument("--micro-shapes", nargs="+", type=parse_cfg,
                   default=[(4096, 256), (14336, 256), (14336, 512)], help="dim,b pairs")
    p.add_argument("--rotate-cfgs", nargs="*", type=parse_cfg, default=[])
    p.add_argument("--gram-cfgs", nargs="*", type=parse_cfg, default=[])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "layer.json"))
    p.add_argument("--md", default=None, help="also write the table as markdown here")
    p.add_argument("--micro-out", default=None, help="per-kernel timings JSON (with --micro)")
    args = p.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench/layer.py needs a CUDA device")
    torch.manual_seed(0)
    br.OPTIONS["gather"] = args.gather
    device_name = torch.cuda.get_device_name()
    command = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = dict(device=device_name, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, command=command,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(json.dumps(meta), flush=True)
    micro_rows = micro(args) if args.micro else []
    if args.profile:
        profile(args)
    rows = [] if args.no_table else bench_table(args, device_name)
    for r in rows:
        r.update(torch=meta["torch"], triton=meta["triton"], command=command)
    if rows:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        md = table_md(rows)
        print(md)
        if args.md:
            with open(args.md, "w") as f:
                f.write(f"# POET-X layer fwd+bwd vs dense nn.Linear\n\n"
                        f"device: {device_name}; torch {meta['torch']}; triton "
                        f"{meta['triton']}; CUDA {meta['cuda']}; {meta['date']}\n\n"
                        f"command: `{command}`\n\n{md}\n")
    if micro_rows and args.micro_out:
        with open(args.micro_out, "w") as f:
            json.dump(dict(meta=meta, micro=micro_rows), f, indent=1)


if __name__ == "__main__":
    main()
