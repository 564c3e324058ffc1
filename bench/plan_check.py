"""The memory planner against measured peaks: predicted vs ``max_memory_allocated`` per row.

    python -m bench.plan_check \
        --measured bench/results/model.json,bench/results/model_1206_h100.json,\
bench/results/memory_options.json \
        --largest bench/results/largest.json --scale bench/results/scale.json \
        --out bench/results/plan_check.json

Reads the rows written by ``bench/model.py`` (no GPU needed), predicts each with
``poetx.plan.memory`` and writes a JSON list and a Markdown table (``.md`` beside the JSON) with
the error per row. Rows that ran out of memory are kept, with the prediction.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from poetx.plan.memory import GIB, Setting, plan

# Rows without an ``mlp_frames`` key were measured before the fused SwiGLU frames became the
# default (2026-12-06): each MLP layer gathered and scattered its own activations.
UNRECORDED_MLP_FRAMES = "off"

# bench/model.py method -> planner setting (bench/model.py's METHODS, by name, so that this file
# does not import torch)
BENCH_METHODS: dict[str, dict[str, Any]] = {
    "adamw": {"optimizer": "adamw"},
    "adamw-ckpt": {"optimizer": "adamw", "checkpointing": True},
    "fast": {"mode": "fast"},
    "mem": {"mode": "mem"},
    "mem-ckpt": {"mode": "mem", "checkpointing": True},
    "int8": {"mode": "mem", "w0_format": "int8", "checkpointing": True},
    "fp8": {"mode": "mem", "w0_format": "fp8", "checkpointing": True},
    "int8-kahan": {"mode": "mem", "w0_format": "int8", "checkpointing": True,
                   "dense_optimizer": "adamw-kahan"},
    "int8-master": {"mode": "mem", "w0_format": "int8", "checkpointing": True,
                    "dense_optimizer": "adamw-fp32-master"},
    "int8-8bit": {"mode": "mem", "w0_format": "int8", "checkpointing": True,
                  "dense_optimizer": "adamw8bit"},
    "mem-ckpt-8bit-inbwd": {"mode": "mem", "checkpointing": True, "dense_optimizer": "adamw8bit",
                            "step_in_backward": True},
    "mem-ckpt-lean": {"mode": "mem", "checkpointing": True, "dense_optimizer": "adamw8bit",
                      "step_in_backward": True, "rotation_states": "8bit"},
    "int8-8bit-inbwd": {"mode": "mem", "w0_format": "int8", "checkpointing": True,
                        "dense_optimizer": "adamw8bit", "step_in_backward": True},
    "int8-lean": {"mode": "mem", "w0_format": "int8", "checkpointing": True,
                  "dense_optimizer": "adamw8bit", "step_in_backward": True,
                  "rotation_states": "8bit"},
}


# The loss of rows of bench/step.py, bench/scale.py and bench/largest.py that do not record
# theirs: they were measured before the fused cross-entropy kernels.
RECORDED_LOSS = "vocab-chunked"


def setting_of_row(row: dict[str, Any]) -> Setting:
    """The planner setting of a ``bench/model.py`` row; rows without a ``loss`` key were
    measured before issue 13, with the token-chunked loss (float32 head gradient)."""
    options = dict(BENCH_METHODS[row["method"]])
    options["loss"] = row.get("loss_impl", "token-chunked")
    options["cuda_graphs"] = bool(row.get("cuda_graphs", False))  # eager before issue 10
    options["compile_blocks"] = bool(row.get("compile_blocks", False))  # since stop 11
    options["mlp_frames"] = row.get("mlp_frames") or UNRECORDED_MLP_FRAMES
    if row.get("block_size"):
        options["block_size"] = row["block_size"]
    return Setting(**options)


def step_peak(p) -> tuple[str, float]:
    """``(moment, GiB)``: the largest moment of a plan but the one outside a CUDA graph (merge,
    evaluation), for runs whose measured steps never merged or evaluated."""
    phase, peak = max(((k, sum(v.values())) for k, v in p.moments.items()
                       if not k.startswith("outside")), key=lambda item: item[1])
    return phase, peak / GIB


def _record(row: dict[str, Any], setting: Setting, method: str) -> dict[str, Any]:
    """Measured against predicted GiB of one timed-steps row (a captured row is predicted
    without the moment outside its graph: the benches never merge or evaluate)."""
    p = plan(row["model"], row["seq_len"], row.get("batch", 1), setting)
    phase, predicted = step_peak(p) if setting.cuda_graphs else (p.phase, p.peak_gib)
    measured = row.get("peak_gib") if row.get("status") == "ok" else None
    err = None if measured is None else 100 * (predicted - measured) / measured
    return {
        "model": row["model"], "seq_len": row["seq_len"], "batch": row.get("batch", 1),
        "method": method, "status": row.get("status"), "measured_gib": measured,
        "predicted_gib": predicted, "error_pct": err, "peak_at": phase,
        "measured_on": row.get("device"), "measured_by": row.get("command"),
    }


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per ``bench/model.py`` row: measured and predicted GiB, error in percent."""
    return [_record(row, setting_of_row(row), row["method"]) for row in rows]


def compare_largest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of ``bench/largest.py`` (``poetx train`` of the ``llama-30b`` preset): its peak
    over all steps against the plan of the run's own config (in its start row)."""
    from poetx.plan.fit import setting_of
    from poetx.train.config import TrainConfig

    start = next(r for r in rows if r["kind"] == "start")
    # runs before --compile-blocks existed ran their blocks eager
    config = {"compile_blocks": False, **start["config"]}
    config["poet"] = {"mlp_frames": UNRECORDED_MLP_FRAMES, **config.get("poet", {})}
    cfg = TrainConfig.from_dict(config)
    setting = replace(setting_of(cfg), loss=start.get("loss_impl", RECORDED_LOSS))
    p = plan(cfg.preset, cfg.seq_len, cfg.batch_size, setting, cfg.vocab_size)
    train = [r for r in rows if r["kind"] == "train"]
    measured = max(r["peak_gib"] for r in train)
    return {"model": cfg.preset, "seq_len": cfg.seq_len, "batch": cfg.batch_size,
            "method": p.setting.name, "status": "ok", "measured_gib": measured,
            "predicted_gib": p.peak_gib, "error_pct": 100 * (p.peak_gib - measured) / measured,
            "peak_at": p.phase, "measured_on": start.get("device"),
            "measured_by": start.get("command")}


# Marks the --grad-accum rows of bench/results/scale.json measured with the rotation blocks built
# once per optimizer step (AccumulatedRotations); earlier ones ran the per-micro-batch builds.
STEP_BUILT_BLOCKS = "AccumulatedRotations"


def compare_scale(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The one-GPU runs of the ``accum`` case of ``bench/scale.py`` (``poetx train`` with
    ``--grad-accum K`` and without), K > 1 only where measured with the blocks built once per
    step: the peak of the measured steps against the plan of the run's config. Those runs
    evaluate only after their last train row and never merge, so the prediction is the step's
    peak: the largest moment but the one outside a CUDA graph (merge, evaluation)."""
    from poetx.plan.fit import setting_of
    from poetx.train.config import TrainConfig

    out = []
    for row in rows:
        if (row.get("case") != "accum" or row.get("world") != 1 or row.get("status") != "ok"
                or "--eval-every 0" not in row["command"]
                or (row["grad_accum"] > 1 and STEP_BUILT_BLOCKS not in row.get("note", ""))):
            continue
        cfg = TrainConfig(preset=row["preset"], batch_size=row["batch"], seq_len=row["seq_len"],
                          grad_accum=row["grad_accum"], out="unused",
                          compile_blocks=bool(row.get("compile_blocks", False)),
                          poet={"mlp_frames": row.get("mlp_frames") or UNRECORDED_MLP_FRAMES})
        setting = replace(setting_of(cfg), loss=row.get("loss_impl", RECORDED_LOSS))
        p = plan(cfg.preset, cfg.seq_len, cfg.batch_size, setting, cfg.vocab_size)
        phase, predicted = step_peak(p)
        measured = row["peak_mem_gib"]
        out.append({
            "model": cfg.preset, "seq_len": cfg.seq_len, "batch": cfg.batch_size,
            "method": p.setting.name, "status": "ok", "measured_gib": measured,
            "predicted_gib": predicted, "error_pct": 100 * (predicted - measured) / measured,
            "peak_at": phase, "measured_on": row["device"], "measured_by": row["command"],
        })
    return out


# bench/step.py methods -> planner setting: bf16, fast mode, the captured poetx step (blocks
# compiled unless "nocompile"), eager AdamW; the step bench never merges or evaluates.
STEP_METHODS: dict[str, dict[str, Any]] = {
    "poetx": {"mode": "fast", "cuda_graphs": True, "compile_blocks": True},
    "poetx-unfusedmlp": {"mode": "fast", "cuda_graphs": True, "compile_blocks": True},
    # the name of today's default in the branch that measured it (step_fused_frames_h100.json)
    "poetx-fusedmlp": {"mode": "fast", "cuda_graphs": True, "compile_blocks": True},
    "poetx-nocompile": {"mode": "fast", "cuda_graphs": True},
    "poetx-permsaveall": {"mode": "fast", "cuda_graphs": True, "compile_blocks": True,
                          "permuted_saves": "all"},
    "adamw": {"optimizer": "adamw"},
}


def compare_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``bench/step.py`` whose method the planner knows, as :func:`compare`."""
    out = []
    for row in rows:
        if row["method"] in STEP_METHODS:
            setting = Setting(block_size=row.get("block_size") or 256,
                              mlp_frames=row.get("mlp_frames") or UNRECORDED_MLP_FRAMES,
                              loss=row.get("loss_impl", RECORDED_LOSS),
                              **STEP_METHODS[row["method"]])
            out.append(_record(row, setting, setting.name))
    return out


def markdown(records: list[dict[str, Any]], source: str) -> str:
    devices = sorted({str(r["measured_on"]) for r in records})
    lines = [
        "# Memory planner vs measured peaks",
        "",
        f"measured: `{source}` (torch.cuda.max_memory_allocated on {', '.join(devices)}); "
        "predicted: `poetx.plan.memory` (no GPU).",
        "command: `python -m bench.plan_check --measured " + source + "` (the last row: "
        "`bench/results/largest.json`, the 32.5B-parameter `llama-30b` training run: int8 "
        "W0, checkpointing, CUDA-graph step, vocabulary 32000; after it the `poetx train` "
        "runs of `bench/results/scale.json`, case accum, `--grad-accum K` as `accumK`: the "
        "step's peak, as no merge or evaluation runs in their measured steps; last, the rows "
        "of `bench/results/step.json` (issue 10's table), `step_h100.json`, "
        "`step_fused_frames_h100.json` and `step_sinks_warps_h100.json`, `bench/step.py`: the "
        "captured poetx step with compiled blocks or without, MLP frames fused or not, every "
        "layer's input kept permuted or not (`permsaveall`), eager AdamW, also the step's "
        "peak).",
        "Rows of `model.json` (H100, 2026-12-07) ran the current loss and the step as `poetx "
        "train` runs it (poetx captured with compiled blocks, AdamW eager or captured); rows "
        "of `model_1206_h100.json` (H100, older code) ran eager steps where they record no "
        "`cuda_graphs` and, without a `loss_impl`, the loss before issue 13 (float32 head "
        "gradient, planner setting `loss=token-chunked`); rows of `memory_options.json` "
        "(H200) issue 13's vocabulary-chunked loss, eager.",
        "",
        "| model | batch x seq_len | method | device | measured GiB | predicted GiB | error | "
        "peak at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        meas = "OOM" if r["status"] == "oom" else (
            "" if r["measured_gib"] is None else f"{r['measured_gib']:.2f}")
        err = "" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        device = str(r["measured_on"]).replace("NVIDIA ", "").split(" ")[0]
        lines.append(f"| {r['model']} | {r['batch']} x {r['seq_len']} | {r['method']} | "
                     f"{device} | {meas} | {r['predicted_gib']:.2f} | {err} | {r['peak_at']} |")
    errs = [abs(r["error_pct"]) for r in records if r["error_pct"] is not None]
    if errs:
        lines += ["", f"rows: {len(errs)} measured; mean |error| {sum(errs) / len(errs):.2f}%, "
                  f"max |error| {max(errs):.2f}%"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured",
                        default="bench/results/model.json,bench/results/model_1206_h100.json,"
                        "bench/results/memory_options.json",
                        help="rows of bench/model.py (comma-separated JSON files)")
    parser.add_argument("--largest", default="bench/results/largest.json",
                        help="rows of bench/largest.py ('' to skip)")
    parser.add_argument("--scale", default="bench/results/scale.json",
                        help="rows of bench/scale.py, its accum case ('' to skip)")
    parser.add_argument("--step", default="bench/results/step.json,bench/results/step_h100.json,"
                        "bench/results/step_fused_frames_h100.json,"
                        "bench/results/step_sinks_warps_h100.json",
                        help="rows of bench/step.py (comma-separated JSON files, '' to skip)")
    parser.add_argument("--out", default="bench/results/plan_check.json")
    args = parser.parse_args()
    rows = [r for name in args.measured.split(",") for r in json.loads(Path(name).read_text())]
    records = compare(rows)
    if args.largest:
        records.append(compare_largest(json.loads(Path(args.largest).read_text())))
    if args.scale:
        records += compare_scale(json.loads(Path(args.scale).read_text()))
    if args.step:
        for name in args.step.split(","):
            records += compare_step(json.loads(Path(name).read_text()))
    out = Path(args.out)
    out.write_text(json.dumps(records, indent=1) + "\n")
    text = markdown(records, args.measured)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
