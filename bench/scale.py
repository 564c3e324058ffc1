"""Scaling of ``poetx train``: data parallelism over GPUs and the cost of gradient accumulation.

Every case is a real ``poetx train`` run in its own process group (``torchrun`` for more than
one process), on the bundled corpus; tokens/s is the median of the per-step values that
``metrics.jsonl`` holds after ``--warmup`` steps (global tokens per second), memory the peak of
rank 0. Cases:

* ``accum``: on one process, ``batch x K`` sequences in one step against ``batch`` sequences
  with ``--grad-accum K`` (the same tokens per step); the issue's target is <= 3 % lost.
* ``ddp``: ``batch`` sequences per process on 1 and on N processes; efficiency =
  tokens/s(N) / (N x tokens/s(1)).

Runs unchanged on 1 GPU (only the ``accum`` case and the 1-process ``ddp`` row) or on N
(``--worlds 1,2``); ``--device cpu`` runs the same on CPU (gloo) as a smoke test::

    python -m bench.scale --preset llama-60m --batch 64 --accum 4 --worlds 1,2 \
        --out bench/results/scale.json
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, print_table, write_json
from poetx.train.metrics import read_metrics

COLUMNS = ["case", "optimizer", "preset", "world", "batch", "grad_accum", "global_batch",
           "seq_len", "tokens_per_s", "vs_baseline", "peak_mem_gib", "status"]


def train_command(args: argparse.Namespace, world: int, batch: int, accum: int,
                  optimizer: str, out: Path, toml: Path) -> list[str]:
    poetx = ["-m", "poetx.cli.main", "train", "--preset", args.preset, "--optimizer", optimizer,
             "--batch-size", str(batch), "--grad-accum", str(accum), "--seq-len",
             str(args.seq_len), "--steps", str(args.steps), "--eval-every", "0",
             "--save-every", "0", "--eval-batches", "1", "--no-progress", "--no-tensorboard",
             "--device", args.device, "--config", str(toml), "--out", str(out)]
    if world == 1:
        return [sys.executable, *poetx]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(world), *poetx]


def run_case(args: argparse.Namespace, case: str, world: int, batch: int, accum: int,
             optimizer: str, workdir: Path, toml: Path) -> dict[str, Any]:
    out = workdir / f"{case}-{optimizer}-w{world}-b{batch}-k{accum}"
    cmd = train_command(args, world, batch, accum, optimizer, out, toml)
    row: dict[str, Any] = {
        "case": case, "optimizer": optimizer, "preset": args.preset, "world": world,
        "batch": batch, "grad_accum": accum, "global_batch": batch * accum * world,
        "seq_len": args.seq_len, "command": " ".join(shlex.quote(c) for c in cmd),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return {**row, "status": f"failed ({done.returncode}): {tail[0][:200]}"}
    steps = [r for r in read_metrics(out) if r["type"] == "train" and r["step"] > args.warmup]
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steps)
    row["peak_mem_gib"] = max(r["peak_mem_gib"] for r in steps)
    row["status"] = "ok"
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-60m")
    p.add_argument("--optimizers", default="poetx", help="comma list: poetx,adamw")
    p.add_argument("--batch", type=int, default=64, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=4, help="K of the accumulation case")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the median")
    p.add_argument("--worlds", default=None,
                   help="process counts of the ddp case (default 1 and every visible GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--out", default="bench/results/scale.json")
    args = p.parse_args(argv)
    if args.batch % args.accum:
        p.error(f"--batch {args.batch} must be divisible by --accum {args.accum}")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 1
    worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else sorted({1, gpus})
    env = environment()
    env["bench_command"] = env.pop("command")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="poetx-scale-") as tmp:
        workdir = Path(tmp)
        toml = workdir / "settings.toml"
        toml.write_text("eval_at_start = false\nmetrics_every = 10\n")
        for optimizer in args.optimizers.split(","):
            one = run_case(args, "accum", 1, args.batch, 1, optimizer, workdir, toml)
            split = run_case(args, "accum", 1, args.batch // args.accum, args.accum, optimizer,
                             workdir, toml)
            if one.get("tokens_per_s") and split.get("tokens_per_s"):
                one["vs_baseline"] = 1.0
                split["vs_baseline"] = split["tokens_per_s"] / one["tokens_per_s"]
            rows += [one, split]
            base = None
            for world in worlds:
                row = run_case(args, "ddp", world, args.batch, 1, optimizer, workdir, toml)
                if world == 1:
                    base = row.get("tokens_per_s")
                if base and row.get("tokens_per_s"):
                    row["vs_baseline"] = row["tokens_per_s"] / (world * base)
                rows.append(row)
                print_table(rows[-1:], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    write_json(args.out, rows, env)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
