"""Whole training step, side by side: tokens/s and peak memory of AdamW (eager and compiled),
poetx (eager, and captured as one CUDA graph with its decoder blocks compiled around the POET
layers: ``poetx train``'s default on CUDA) and the authors' poet_torch.

Every (model, method) runs in its own process; inside it the cases of that model run in
order on the same model and optimizer. Same random batch, bf16, b = 256, POET-X fast mode, no
gradient clipping, the chunked cross-entropy (``poetx.model.lm_loss``) for every method.
A step is zero_grad + forward + backward + optimizer step; tokens/s is the median over
``--rounds`` rounds of ``--steps`` back-to-back steps (one device sync per round, as in
training), after ``--warmup`` steps. Peak GiB is ``max_memory_allocated`` over warm-up and
timing.

    python -m bench.step --out bench/results/step.json
    python -m bench.step --cases llama-130m:16x512 --methods adamw,poetx --launches

``--launches`` also profiles one step (torch.profiler) and records the GPU kernels per step
and the kernel/graph launches the host makes per step, each also per POET layer, and where the
step's GPU time goes: milliseconds per kernel family (``gpu_ms_by_kind``: GEMM, Cayley-Neumann,
block rotation, optimizer, copies...) and of the 15 costliest kernels.
``--ops`` profiles one eager step (a captured method's step function run without its graph)
by op: the 40 ops with the most device time, with input shapes and the calling frames
(``top_ops_ms``), to find which copies, adds and fills a step runs and where from.
``poet_torch`` is imported from ``--authors-path`` (a git-ignored checkout, never copied here).
``--append`` merges into an existing ``--out`` (for a table split over several device calls).
``--train-metrics`` instead summarizes ``poetx train`` runs from their metrics.jsonl files.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, print_table, write_json
from bench.model import METHODS, build, make_train_step
from poetx.config import POETConfig as PoetxConfig
from poetx.model.lm_loss import PLANNER_LOSS

DEFAULT_CASES = "llama-130m:16x512,llama-8b:1x1024,llama-8b:2x2048"
DEFAULT_METHODS = "adamw,adamw-compile,poetx-eager,poetx,authors"
# poetx-perlayer: poetx captured with each layer building its own rotation blocks
# (batch_rotations="off", the code before the batched build), for a before/after row;
# poetx-nocompile: captured, blocks not compiled (poetx train --no-compile-blocks).
# poetx-noshared: as poetx, but every layer gathers its own input (shared_inputs="off");
# poetx-nopermsave: as poetx, but down_proj keeps its input as given (permuted_saves="off");
# poetx-permsaveall: as poetx, with every layer keeping its input permuted (permuted_saves="all");
# poetx-sharedmlp: as poetx, with one permutation for an MLP's gate/up outputs and down input
# (mlp_permutations="shared", chosen when the model is built); poetx-unfusedmlp: as poetx, but
# each MLP layer gathers and scatters its own activations (mlp_frames="off", the default
# before the fused SwiGLU frames; same permutations and values).
VARIANTS = {"poetx-perlayer": {"batch_rotations": "off"},
            "poetx-noshared": {"shared_inputs": "off"},
            "poetx-nopermsave": {"permuted_saves": "off"},
            "poetx-permsaveall": {"permuted_saves": "all"}}
STEP_METHODS = ("adamw", "adamw-compile", "poetx-eager", "poetx", "poetx-perlayer",
                "poetx-nocompile", "poetx-noshared", "poetx-nopermsave", "poetx-permsaveall",
                "poetx-sharedmlp", "poetx-unfusedmlp", "authors")
BUILT = {"poetx-sharedmlp": {"mlp_permutations": "shared"},
         "poetx-unfusedmlp": {"mlp_frames": "off"}}
CAPTURED = ("poetx", "poetx-perlayer", "poetx-nocompile", "poetx-noshared", "poetx-nopermsave",
            "poetx-permsaveall", "poetx-sharedmlp", "poetx-unfusedmlp")


def mlp_frames_of(method: str) -> str | None:
    """How a method's MLPs hand activations over (``POETConfig.mlp_frames``), for the planner
    check; ``None`` where poetx does not build the model."""
    if method.startswith("adamw") or method == "authors":
        return None
    return BUILT.get(method, {}).get("mlp_frames", PoetxConfig().mlp_frames)


def parse_cases(text: str) -> dict[str, list[tuple[int, int]]]:
    """``"llama-8b:1x1024,llama-8b:2x2048"`` -> ``{"llama-8b": [(1, 1024), (2, 2048)]}``."""
    cases: dict[str, list[tuple[int, int]]] = {}
    for item in text.split(","):
        preset, _, shape = item.partition(":")
        batch, _, seq = shape.partition("x")
        cases.setdefault(preset, []).append((int(batch), int(seq)))
    return cases


def build_authors(preset: str, block_size: int, authors_path: str):
    """The same HF Llama, reparameterized by the authors' ``poet_torch`` (fast mode)."""
    if authors_path not in sys.path:
        sys.path.insert(0, authors_path)
    from poet_torch import POETConfig, POETModel, get_poet_optimizer

    from poetx.model.llama import build_model

    dense = build_model(preset, dtype=torch.bfloat16, device="cuda")
    config = POETConfig(block_size=block_size, mem_efficient_mode=False, base_lr=1e-4,
                        poet_lr=1e-4)
    wrapped = POETModel(dense, config)
    opt = get_poet_optimizer(wrapped, config)
    wrapped.train()
    return wrapped.base_model, opt


def build_method(preset: str, method: str, block_size: int, authors_path: str):
    """``(model, optimizer)`` for one method; the model is what ``causal_lm_loss`` takes."""
    if method == "authors":
        return build_authors(preset, block_size, authors_path)
    if method in ("adamw", "adamw-compile"):
        model, opt = build(preset, METHODS["adamw"], block_size, "cuda")
        if method == "adamw-compile":
            # causal_lm_loss calls the base model and the chunked loss on lm_head's weight.
            model.model = torch.compile(model.model)
        return model, opt
    model, opt = build(preset, replace(METHODS["fast"], **BUILT.get(method, {})), block_size,
                       "cuda")
    changed = VARIANTS.get(method)
    if changed:
        from poetx.model.wrap import poet_layers

        for _, layer in poet_layers(model):
            layer.config = replace(layer.config, **changed)
    if method in CAPTURED:
        import poetx

        opt = poetx.make_optimizer(model, lr=1e-4, poet_lr=1e-4, capturable=True)
    return model, opt


def make_step(model, opt, method: str, batch: torch.Tensor, warmup: int):
    return make_train_step(model, opt, batch, warmup, capture=method in CAPTURED,
                           compile_blocks=method in ("poetx", *VARIANTS, *BUILT))


# Kernel families of a training step, by name (first match wins): where a step's GPU time goes.
KERNEL_KINDS = (
    ("cayley-neumann", ("_cn_",)),
    ("block rotation / gram / permutation", ("_rotate", "_gram", "_permute", "_invert")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma", "matmul", "sm90_")),
    ("attention", ("flash", "attention", "fmha", "sdpa")),
    # inductor's fused kernels of the compiled blocks (their names list ops like "_to_copy")
    ("compiled blocks (inductor)", ("triton_poi_", "triton_red_", "triton_per_")),
    ("loss", ("cross_entropy", "log_softmax", "softmax", "nll")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "cat", "index", "gather", "scatter")),
    ("reduction", ("reduce", "norm", "sum")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton_")),
)


def kernel_kind(name: str) -> str:
    """The family of a GPU kernel by its name (``other`` where none matches)."""
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def count_launches(step, batch: torch.Tensor) -> dict[str, Any]:
    """GPU kernels run and host launches made by one call of ``step`` (torch.profiler), and
    the GPU time by kernel family and of the costliest kernels (milliseconds)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batch)
        torch.cuda.synchronize()
    kernels = host_kernel = host_graph = memops = 0
    by_kind: Counter[str] = Counter()
    by_name: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if "memcpy" in name.lower() or "memset" in name.lower():
                memops += 1
            else:
                kernels += 1
            ms = e.time_range.elapsed_us() / 1e3
            by_kind[kernel_kind(name)] += ms
            by_name[name[:120]] += ms
            calls[name[:120]] += 1
        elif name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                      "cudaLaunchKernelExC"):
            host_kernel += 1
        elif name in ("cudaGraphLaunch", "cuGraphLaunch"):
            host_graph += 1
    return {"gpu_kernels": kernels, "gpu_memops": memops, "host_kernel_launches": host_kernel,
            "host_graph_launches": host_graph,
            "gpu_ms_by_kind": {k: round(v, 3) for k, v in by_kind.most_common()},
            "gpu_ms_sum": round(sum(by_kind.values()), 3),
            "top_kernels_ms": [[n, round(v, 3)] for n, v in by_name.most_common(40)],
            "top_kernels_calls": [[n, calls[n]] for n, _ in by_name.most_common(40)]}


def top_ops(step, batch: torch.Tensor, count: int = 40, frames: int = 4) -> list[dict]:
    """The ops of one call of ``step`` that cost the most device time (CPU time without CUDA),
    grouped by op, input shapes and the ``frames`` innermost Python frames that called it:
    which copies, adds and fills a step runs, and from where (torch.profiler).

    An eager step only: a CUDA-graph replay shows no ops. Each row: ``op``, ``shapes``,
    ``calls``, ``ms`` (self time, all calls), ``stack`` (innermost frame first)."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    cuda = batch.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        step(batch)
        sync()
    totals: dict[tuple, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if not e.name.startswith(("aten::", "poetx::")):
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us <= 0:
            continue
        # the callers are profiler ancestors: Python frames ("file.py(12): fn") and, in
        # backward, the autograd node ("autograd::engine::evaluate_function: MulBackward0")
        stack, parent = [], e.cpu_parent
        while parent is not None and len(stack) < frames:
            name = parent.name
            if ("): " in name and not name.startswith("<built-in")) or name.startswith(
                    "autograd::engine::evaluate_function"):
                stack.append(name)
            parent = parent.cpu_parent
        key = (e.name, str(e.input_shapes)[:200], tuple(stack))
        totals[key][0] += 1
        totals[key][1] += us
    rows = [{"op": op, "shapes": shapes, "calls": n, "ms": round(us / 1e3, 3),
             "stack": list(stack)} for (op, shapes, stack), (n, us) in totals.items()]
    rows.sort(key=lambda r: -r["ms"])
    return rows[:count]


def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model, opt = build_method(args.preset, args.method, args.block_size, args.authors_path)
    vocab = model.config.vocab_size
    n_poet = sum(1 for m in model.modules() if type(m).__name__ == "POETLinear")
    for batch_size, seq in parse_cases(args.cases)[args.preset]:
        row = {"model": args.preset, "batch": batch_size, "seq_len": seq, "method": args.method,
               "block_size": None if args.method.startswith("adamw") else args.block_size,
               "mlp_frames": mlp_frames_of(args.method), "loss_impl": PLANNER_LOSS}
        step = None
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            batch = torch.randint(0, vocab, (batch_size, seq + 1), device="cuda")
            step = make_step(model, opt, args.method, batch, args.warmup)
            for _ in range(args.warmup):
                loss, _ = step(batch)
            torch.cuda.synchronize()
            rounds = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                for _ in range(args.steps):
                    loss, _ = step(batch)
                torch.cuda.synchronize()
                rounds.append((time.perf_counter() - start) / args.steps)
            step_s = statistics.median(rounds)
            row.update(status="ok", tokens_per_s=batch_size * seq / step_s, step_s=step_s,
                       step_s_rounds=rounds, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                       loss=float(loss), poet_layers=n_poet)
            if args.launches:
                counts = count_launches(step, batch)
                row.update(counts)
                if n_poet:
                    row["gpu_kernels_per_poet_layer"] = counts["gpu_kernels"] / n_poet
                    row["host_launches_per_poet_layer"] = (
                        counts["host_kernel_launches"] + counts["host_graph_launches"]) / n_poet
            if args.ops:
                # a CUDA-graph replay hides its ops: profile the same step run eagerly, with
                # the captured one dropped first (its graph's memory pool would stay beside
                # the eager step's and run an 8B step out of memory)
                eager = step
                if args.method in CAPTURED:
                    step = eager = None
                    gc.collect()
                    torch.cuda.empty_cache()
                    eager = make_train_step(model, opt, batch, 0, capture=False)
                eager(batch)
                row["top_ops_ms"] = top_ops(eager, batch)
        except torch.OutOfMemoryError:
            row.update(status="oom")
        except Exception as exc:  # recorded in the row; the next case still runs
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[-600:])
        del step
        opt.zero_grad(set_to_none=True)
        print("ROW " + json.dumps(row), flush=True)


def add_ratios(rows: list[dict]) -> None:
    """poetx / AdamW (eager), poetx / AdamW (compiled), poetx / authors, per case."""
    def tps(r):
        return r.get("tokens_per_s") if r.get("status") == "ok" else None

    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["model"], r["batch"], r["seq_len"]), {})[r["method"]] = r
    for methods in by_case.values():
        base = {k: tps(methods[k]) if k in methods else None
                for k in ("adamw", "adamw-compile", "authors")}
        for r in methods.values():
            own = tps(r)
            for key, ref in (("vs_adamw", base["adamw"]), ("vs_adamw_compile",
                             base["adamw-compile"]), ("vs_authors", base["authors"])):
                r[key] = own / ref if own and ref else None


def _earlier_rows(args: argparse.Namespace, cases: dict) -> list[dict]:
    """With ``--append``: the rows already in ``--out`` except those this run redoes."""
    path = Path(args.out)
    if not args.append or not path.exists():
        return []
    redo = {(p, b, s, m) for p, shapes in cases.items() for b, s in shapes
            for m in args.methods.split(",")}
    return [r for r in json.loads(path.read_text())
            if (r["model"], r["batch"], r["seq_len"], r["method"]) not in redo]


def run_table(args: argparse.Namespace) -> None:
    env = environment()
    cases = parse_cases(args.cases)
    rows: list[dict] = _earlier_rows(args, cases)
    for preset in cases:
        for method in args.methods.split(","):
            if method not in STEP_METHODS:
                raise SystemExit(f"unknown method {method!r}; choose from {STEP_METHODS}")
            cmd = [sys.executable, "-m", "bench.step", "--worker", "--preset", preset,
                   "--method", method, "--cases", args.cases, "--block-size",
                   str(args.block_size), "--warmup", str(args.warmup), "--steps",
                   str(args.steps), "--rounds", str(args.rounds), "--authors-path",
                   args.authors_path] + (["--launches"] if args.launches else []) + (
                       ["--ops"] if args.ops else [])
            t0 = time.time()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                out, err = proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as exc:
                out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
                err = "timeout"
            got = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
            seen = {(r["batch"], r["seq_len"]) for r in got}
            for batch_size, seq in cases[preset]:
                if (batch_size, seq) not in seen:
                    status = "oom" if "OutOfMemoryError" in err else "error"
                    got.append({"model": preset, "batch": batch_size, "seq_len": seq,
                                "method": method, "status": status, "error": err[-600:]})
            for r in got:
                r["process_s"] = round(time.time() - t0, 1)
                print(f"{preset} {method} {r['batch']}x{r['seq_len']} {r['status']} "
                      f"tok/s={r.get('tokens_per_s')} peak={r.get('peak_gib')} "
                      f"{r.get('error', '')[-300:]}", flush=True)
            rows.extend({**env, **r} for r in got)
            add_ratios(rows)
            write_json(args.out, rows, {})
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}")
    cols = ["model", "batch", "seq_len", "method", "status", "tokens_per_s", "peak_gib",
            "vs_adamw", "vs_adamw_compile", "vs_authors"]
    if args.launches:
        cols += ["gpu_kernels_per_poet_layer", "host_launches_per_poet_layer"]
    print_table(rows, cols)


def train_metrics(paths: list[str]) -> list[dict]:
    """Tokens/s of ``poetx train`` runs from metrics.jsonl (median of the logged train rows
    after the first, which includes compilation and capture)."""
    rows = []
    for path in paths:
        tps = []
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            value = rec.get("tokens_per_s", rec.get("tok_per_s"))
            if value is not None:
                tps.append(float(value))
        rows.append({"metrics": path, "logged_rows": len(tps),
                     "tokens_per_s": statistics.median(tps[1:] or tps) if tps else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help="preset:BATCHxSEQ items, comma separated")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--launches", action="store_true")
    parser.add_argument("--ops", action="store_true",
                        help="also profile one eager step by op (top_ops_ms in each row)")
    parser.add_argument("--authors-path", default="third_party")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per process")
    parser.add_argument("--out", default="bench/results/step.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --out that this run does not redo "
                             "(each row keeps its own command and device)")
    parser.add_argument("--train-metrics", nargs="+", metavar="METRICS_JSONL")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.train_metrics:
        rows = train_metrics(args.train_metrics)
        print_table(rows, ["metrics", "logged_rows", "tokens_per_s"])
        return
    args.authors_path = str(Path(args.authors_path).resolve())
    run_table(args)


if __name__ == "__main__":
    main()
