"""The largest Llama-style model that trains on one GPU: ``poetx train`` itself, under a cap.

The run is the ordinary ``poetx train`` (the Trainer, its CUDA-graph step, merges, evaluation)
of the ``llama-30b`` preset (LLaMA-1 "33B" shape, 32.5 B parameters) with int8 W0 and
activation checkpointing, on the bundled corpus, in a process whose CUDA allocator is capped at
``--cap-gib`` (``torch.cuda.set_per_process_memory_fraction``), so an H200 answers for an
80 GB card. Flags after ``--`` are added to (and override) the recipe below::

    python -m bench.largest --cap-gib 80 --run-dir /tmp/largest --out bench/results/largest.json
    python -m bench.largest --report /tmp/largest/metrics.jsonl --out bench/results/largest.json

``--report`` turns a run's ``metrics.jsonl`` into the JSON rows (one per logged step, the
evaluations and merges) and a loss-curve PNG beside the JSON, without a GPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

# Loss falls clearly at these rates (a 10-step sweep without warm-up diverged at lr 3e-3 and
# wobbled at 1e-4, bench/results/largest_lr_sweep.json: an Adam step moves each logit by about
# lr * width, 0.67 at lr 1e-4 and width 6656), hence the warm-up. Three merges in 300 steps.
RECIPE = [
    "--preset", "llama-30b", "--optimizer", "poetx", "--w0-format", "int8",
    "--grad-checkpointing", "--block-size", "256", "--batch-size", "2", "--seq-len", "256",
    "--steps", "300", "--merge-every", "100", "--warmup-steps", "30", "--lr", "5e-5",
    "--poet-lr", "2.5e-4", "--eval-every", "100", "--eval-batches", "4", "--save-every", "0",
    "--metrics-every", "10", "--no-progress", "--no-tensorboard",
]


def cap_allocator(cap_gib: float) -> float:
    """Cap this process's CUDA allocations at ``cap_gib`` GiB; returns the fraction set."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, cap_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


def rows_from_metrics(records: list[dict[str, Any]], command: str, env: dict[str, Any],
                      config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per logged record of interest (the start, train steps, evaluations); the
    start row carries the run's ``config.json`` (``config``), which the planner check reads."""
    from poetx.model.lm_loss import PLANNER_LOSS

    rows = []
    for r in records:
        if r.get("type") == "train":
            rows.append({"kind": "train", "step": r["step"], "loss": r["loss"],
                         "tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"],
                         "peak_gib": r["peak_mem_gib"], "lr": r["lr"],
                         "poet_lr": r.get("poet_lr"), "merged": r.get("merged"),
                         "q_norm_max": r.get("q_norm_max"), "grad_norm": r.get("grad_norm")})
        elif r.get("type") == "eval":
            rows.append({"kind": "eval", "step": r["step"], "val_loss": r["val_loss"],
                         "val_ppl": r["val_ppl"], "tokens": r["tokens"]})
        elif r.get("type") == "event" and r.get("event") == "start":
            rows.append({"kind": "start", "step": r["step"], "message": r["message"],
                         "parameters": r.get("parameters"), "trainable": r.get("trainable"),
                         "config": config, "loss_impl": PLANNER_LOSS})
    return [{**env, "command": command, **row} for row in rows]


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    for r in train:
        if r.get("merged"):
            ax.axvline(r["step"], color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step (dotted: merges)")
    ax.set_ylabel("loss")
    ax.set_title(f"llama-30b int8 W0, {train[-1]['peak_gib']:.1f} GiB peak, "
                 f"{rows[0].get('device', '')}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(metrics: Path, out: Path, command: str, env: dict[str, Any]) -> list[dict[str, Any]]:
    from bench.common import print_table
    from poetx.train.metrics import read_metrics

    config_file = metrics.parent / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else None
    rows = rows_from_metrics(read_metrics(metrics), command, env, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table([r for r in rows if r["kind"] != "start"],
                ["kind", "step", "loss", "val_loss", "tokens_per_s", "peak_gib", "merged"])
    try:
        plot_loss(rows, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap-gib", type=float, default=80.0)
    parser.add_argument("--run-dir", default="/tmp/largest")
    parser.add_argument("--out", default="bench/results/largest.json")
    parser.add_argument("--report", metavar="METRICS_JSONL",
                        help="only convert a finished run's metrics.jsonl (with its command "
                        "and device from --command / --device)")
    parser.add_argument("--command", default="", help="with --report: the command of the run")
    parser.add_argument("--device", default="", help="with --report: the GPU of the run")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.report:
        env = {"device": args.device}
        report(Path(args.report), Path(args.out), args.command, env)
        return

    from bench.common import environment
    from poetx.cli.main import main as poetx_main

    fraction = cap_allocator(args.cap_gib)
    argv = ["train", *RECIPE, *extra, "--out", args.run_dir]
    command = "python -m bench.largest " + shlex.join(sys.argv[1:])
    print(f"allocator capped at {args.cap_gib:g} GiB ({fraction:.3f} of the device); "
          f"poetx {shlex.join(argv)}", flush=True)
    code = poetx_main(argv)
    env = {**environment(), "cap_gib": args.cap_gib, "exit_code": code}
    report(Path(args.run_dir) / "metrics.jsonl", Path(args.out), command, env)


if __name__ == "__main__":
    main()
