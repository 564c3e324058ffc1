"""``poetx plan``: predicted peak memory of each setting, its parts, and which fit a GPU."""

from __future__ import annotations

import argparse
import json
from typing import Any

# Columns of the table: (header, parts summed). Parts are those of poetx.plan.memory.PARTS.
_COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("W0", ("w0",)),
    ("linears w+g+s", ("dense_linear_weights", "dense_linear_grads", "dense_linear_states")),
    ("emb/head/norm w", ("embed_head_norm_weights",)),
    ("emb/head/norm g", ("embed_head_norm_grads",)),
    ("emb/head/norm s", ("embed_head_norm_states",)),
    ("rot p+g+s", ("rotation_params", "rotation_grads", "rotation_states")),
    ("activations", ("activations",)),
    ("loss tmp", ("loss_temporaries",)),
    ("bwd+opt tmp", ("backward_temporaries", "optimizer_temporaries")),
    ("accum blocks+grads", ("accumulated_blocks", "block_grads")),
    ("other", ("buffers", "overhead")),
]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _block_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(_positive_int(t) for t in text.split(",") if t.strip())
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"expected block sizes of at least 2, got {text!r}")
    return sizes


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``poetx plan`` (imports nothing heavy)."""
    p = sub.add_parser(
        "plan", help="predicted peak GPU memory of each setting and which fit",
        description="Predict the peak GPU memory (torch.cuda.max_memory_allocated) of one "
        "training step for each setting: AdamW, POET-X fast / mem, activation checkpointing, "
        "bf16 / int8 / fp8 W0, block sizes, and the dense-parameter optimizer options. "
        "A setting fits when its peak plus the CUDA context and an allocator margin is at most "
        "--gpu-mem.",
    )
    p.add_argument("--preset", required=True, help="model shape (see `poetx train --help`)")
    p.add_argument("--seq-len", type=_positive_int, required=True, help="tokens per sequence")
    p.add_argument("--batch-size", type=_positive_int, required=True,
                   help="sequences per step (per micro-batch with --grad-accum)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, metavar="K",
                   help="micro-batches per optimizer step, as `poetx train --grad-accum` "
                   "(the settings that step inside backward are left out for K > 1)")
    p.add_argument("--gpu-mem", type=_positive_float, required=True, metavar="GIB",
                   help="memory of the GPU (or the per-process cap) in GiB")
    p.add_argument("--vocab-size", type=_positive_int,
                   help="vocabulary (default: the preset's)")
    p.add_argument("--block-sizes", type=_block_sizes, default=(256,), metavar="B[,B...]",
                   help="rotation block sizes to compare (default 256)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_plan)


def plan_rows(preset: str, seq_len: int, batch_size: int, gpu_mem_gib: float,
              vocab_size: int | None = None, block_sizes: tuple[int, ...] = (256,),
              grad_accum: int = 1) -> list[dict[str, Any]]:
    """One JSON-ready row per standard setting (with ``grad_accum`` micro-batches per step;
    the Trainer steps inside backward only for one), with ``fits`` for ``gpu_mem_gib``."""
    from dataclasses import replace

    from poetx.plan.memory import GIB, plan, standard_settings

    rows = []
    for setting in standard_settings(block_sizes):
        if grad_accum > 1:
            if setting.step_in_backward:
                continue
            setting = replace(setting, grad_accum=grad_accum)
        p = plan(preset, seq_len, batch_size, setting, vocab_size)
        row = p.to_dict()
        row["gpu_mem_gib"] = gpu_mem_gib
        row["fits"] = p.required_bytes() <= gpu_mem_gib * GIB
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ["setting", "peak GiB", "needs GiB", "fits", *(c for c, _ in _COLUMNS), "peak at"]
    lines = []
    for r in rows:
        parts = r["parts_gib"]
        cells = [r["setting"], f"{r['peak_gib']:.2f}", f"{r['required_gib']:.2f}",
                 "yes" if r["fits"] else "no"]
        cells += [f"{sum(parts[k] for k in keys):.2f}" for _, keys in _COLUMNS]
        cells.append(r["phase"])
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(headers)]
    out = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
           "-|-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    return "\n".join(out)


def run_plan(args: argparse.Namespace) -> int:
    rows = plan_rows(args.preset, args.seq_len, args.batch_size, args.gpu_mem, args.vocab_size,
                     args.block_sizes, args.grad_accum)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    first = rows[0]
    accum = f" x {args.grad_accum} micro-batches" if args.grad_accum > 1 else ""
    print(f"{first['preset']}, batch {args.batch_size} x seq {args.seq_len}{accum}, "
          f"GPU {args.gpu_mem:g} GiB: predicted peak of torch.cuda.max_memory_allocated; "
          "'needs' adds the CUDA context and an allocator margin")
    print(format_table(rows))
    return 0
