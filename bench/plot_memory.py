"""Stacked memory parts per setting (the planner), with the measured peaks beside them.

    python -m bench.plot_memory --preset llama-8b --seq-len 1024 \
        --measured bench/results/memory_options.json \
        --out bench/results/memory_llama-8b_1024.png

One bar per setting of ``poetx plan``: the predicted parts at the peak, stacked; a black tick
marks the peak measured by ``bench/model.py`` where a JSON (comma-separated list) has that row
with the current code's loss. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.plan_check import setting_of_row
from poetx.plan.memory import GIB, Setting, plan, standard_settings

GROUPS = [
    ("W0 (+ scales, residual on the device)", ("w0", "w0_residual")),
    ("dense linears: weights, grads, states",
     ("dense_linear_weights", "dense_linear_grads", "dense_linear_states")),
    ("embedding / lm_head / norms: weights", ("embed_head_norm_weights",)),
    ("embedding / lm_head / norms: grads", ("embed_head_norm_grads",)),
    ("embedding / lm_head / norms: optimizer states", ("embed_head_norm_states",)),
    ("rotations: params, grads, states", ("rotation_params", "rotation_grads", "rotation_states")),
    ("activations", ("activations",)),
    ("loss temporaries", ("loss_temporaries",)),
    ("backward / optimizer scratch, buffers, cuBLAS", (
        "backward_temporaries", "optimizer_temporaries", "buffers", "overhead")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-8b")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--measured", default="bench/results/memory_options.json")
    parser.add_argument("--out", default="bench/results/memory_llama-8b_1024.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured: dict[Setting, float] = {}
    devices = set()
    for name in args.measured.split(","):
        path = Path(name)
        if not path.is_file():
            continue
        for row in json.loads(path.read_text()):
            if (row["model"], row["seq_len"], row.get("batch", 1), row.get("status")) == (
                    args.preset, args.seq_len, args.batch_size, "ok"):
                measured[setting_of_row(row)] = row["peak_gib"]
                devices.add(row.get("device", "GPU"))

    settings = standard_settings()
    plans = [plan(args.preset, args.seq_len, args.batch_size, s) for s in settings]
    fig, ax = plt.subplots(figsize=(12, 6))
    x = range(len(plans))
    bottom = [0.0] * len(plans)
    colors = plt.get_cmap("tab10").colors
    for (label, keys), color in zip(GROUPS, colors, strict=False):
        heights = [sum(p.parts[k] for k in keys) / GIB for p in plans]
        if not any(heights):
            continue
        ax.bar(x, heights, bottom=bottom, label=label, color=color, width=0.7)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    marked = False
    for i, s in enumerate(settings):
        if s in measured:
            ax.plot([i - 0.4, i + 0.4], [measured[s]] * 2, color="black", lw=2,
                    label=None if marked else f"measured peak ({', '.join(sorted(devices))})")
            marked = True
    ax.set_xticks(list(x), [s.name.replace("-b256", "") for s in settings], rotation=30,
                  ha="right")
    ax.set_ylabel("GiB (torch.cuda.max_memory_allocated)")
    ax.set_title(f"{args.preset}, batch {args.batch_size} x seq {args.seq_len}: predicted "
                 "peak by part (poetx plan)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    for p in plans:
        meas = measured.get(p.setting)
        print(f"{p.setting.name:40s} predicted {p.peak_gib:6.2f} GiB"
              + ("" if meas is None else f"  measured {meas:6.2f} GiB"))


if __name__ == "__main__":
    main()
