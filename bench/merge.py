"""Time a merge of every POET layer of Llama-8B and of the 30B-class model.

One ``POETLinear`` of each distinct shape is built on the device with random rotations and
merged (exact Cayley blocks, batched block products, in place, residual fed back); the time of
one merge times the number of layers of that shape gives the model's merge time.

    python -m bench.merge                      # GPU: bf16 and int8 W0, both models
    python -m bench.merge --small              # CPU check: shapes divided by 16

Prints a table and writes ``bench/results/merge.json`` (command and device on every row).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.common import environment, print_table, write_json
from poetx import POETConfig, POETLinear

RESULTS = Path(__file__).parent / "results" / "merge.json"

# (hidden, intermediate, layers, heads, kv_heads): Llama-8B as poetx.model.llama, the 30B-class
# shape as bench/largest.py (LLaMA-1 30B).
MODELS = {
    "llama-8b": (4096, 14336, 32, 32, 8),
    "llama-30b": (6656, 17920, 60, 52, 52),
}


def layer_shapes(hidden: int, inter: int, layers: int, heads: int, kv: int,
                 divide: int = 1) -> dict[tuple[int, int], int]:
    """``(out, in) -> count`` of the POET layers (q, k, v, o, gate, up, down) of the model."""
    h, i = hidden // divide, inter // divide
    kv_dim = h * kv // heads
    counts: dict[tuple[int, int], int] = {}
    for shape in ((h, h), (kv_dim, h), (kv_dim, h), (h, h), (i, h), (i, h), (h, i)):
        counts[shape] = counts.get(shape, 0) + layers
    return counts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_merge(shape: tuple[int, int], cfg: POETConfig, dtype: torch.dtype,
               device: torch.device, repeats: int) -> tuple[float, float]:
    out_f, in_f = shape
    layer = POETLinear(in_f, out_f, bias=False, config=cfg, name="bench", device=device,
                       dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        with torch.no_grad():
            layer.theta_in.normal_(0, 1e-3)
            layer.theta_out.normal_(0, 1e-3)
        sync(device)
        t0 = time.perf_counter()
        layer.merge_()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del layer
    return statistics.median(times[1:]), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-8b,llama-30b")
    ap.add_argument("--w0-formats", default="auto,int8")
    ap.add_argument("--residual", default="host", choices=("host", "device", "off"))
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="CPU check: shapes divided by 16")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    divide = 16 if args.small else 1
    block = max(8, args.block_size // divide)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment()
    rows = []
    for model in args.models.split(","):
        counts = layer_shapes(*MODELS[model], divide=divide)
        for fmt in args.w0_formats.split(","):
            cfg = POETConfig(block_size=block, w0_format=fmt, w0_residual=args.residual)
            total = 0.0
            for shape, count in counts.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds, peak = time_merge(shape, cfg, dtype, device, args.repeats)
                total += seconds * count
                rows.append({"model": model, "w0": "bf16" if fmt == "auto" and
                             dtype == torch.bfloat16 else fmt, "residual": args.residual,
                             "block": block, "shape": f"{shape[0]}x{shape[1]}",
                             "layers": count, "ms_per_layer": seconds * 1e3,
                             "peak_gib": peak, "seconds": seconds * count})
            rows.append({"model": model, "w0": rows[-1]["w0"], "residual": args.residual,
                         "block": block, "shape": "all", "layers": sum(counts.values()),
                         "seconds": total})
    print_table(rows, ["model", "w0", "residual", "block", "shape", "layers", "ms_per_layer",
                       "peak_gib", "seconds"])
    write_json(args.out, rows, {**env, "small": args.small})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
