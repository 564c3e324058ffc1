"""What is alive at a training step's memory peak, by where it was allocated (CUDA only).

    python -m bench.peak_snapshot --model llama-3b --method int8 --seq 2048 --out peak.json

Builds the model as ``bench/model.py`` does, runs ``--warmup`` eager steps, then records the
CUDA caching allocator's history (``torch.cuda.memory._record_memory_history``) over one more
step and replays its trace: the instant the allocated bytes peak, and the blocks alive then,
summed by their innermost poetx / transformers / torch frame. This is what the memory planner
(``poetx.plan.memory``) is checked against when a row of ``bench/plan_check.py`` misses: the
planner names its terms, the snapshot names the tensors.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

import torch

# frames from these files say nothing about which tensor it is
_PLUMBING = ("torch/autograd/", "torch/utils/checkpoint", "torch/_ops.py",
             "torch/nn/modules/module.py", "torch/_library/", "torch/_compile", "torch/_dynamo/",
             "<frozen", "bench/")


def _site(frames: list[dict[str, Any]]) -> str:
    """The innermost frame of poetx, transformers or torch that is not plumbing."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(p in name for p in _PLUMBING):
            continue
        for root in ("poetx/", "transformers/", "torch/"):
            if root in name:
                return f"{root}{name.split(root, 1)[1]}:{frame.get('line')} {frame.get('name')}"
    return "?"


def peak_breakdown(trace: list[dict[str, Any]], start_bytes: int) -> dict[str, Any]:
    """Replay an allocator trace: the peak of allocated bytes (``start_bytes`` already
    allocated before it) and the blocks alive then, summed by allocation site."""
    def replay(stop: int | None) -> tuple[int, int, dict[int, tuple[int, str]]]:
        live: dict[int, tuple[int, str]] = {}
        total = peak = start_bytes
        peak_at = -1
        for i, event in enumerate(trace[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
                total += event["size"]
                if total > peak:
                    peak, peak_at = total, i
            elif event["action"] == "free_requested":
                # a block from before the step counts in start_bytes until it is freed
                total -= live.pop(event["addr"], (event["size"], ""))[0]
        return peak, peak_at, live

    peak, peak_at, _ = replay(None)
    _, _, at_peak = replay(peak_at + 1)
    by_site: dict[str, int] = defaultdict(int)
    for size, site in at_peak.values():
        by_site[site] += size
    sites = sorted(by_site.items(), key=lambda kv: -kv[1])
    return {"start_gib": start_bytes / 2**30, "peak_gib": peak / 2**30,
            "peak_reached_by": _site(trace[peak_at].get("frames", [])) if peak_at >= 0 else None,
            "step_alive_at_peak_gib": sum(s for s, _ in at_peak.values()) / 2**30,
            "sites": [{"site": s, "gib": b / 2**30} for s, b in sites]}


def rounding_at(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes the allocator counts beyond what was asked for, over the active blocks of a
    ``torch.cuda.memory_snapshot()``: 512-byte rounding, and whole blocks kept unsplit when
    the rest of their segment would be too small to serve (the planner's ``block_bytes``
    models a fresh segment only). By requested size: below 1 MiB, 1-10 MiB (blocks cut from
    20 MiB segments), above."""
    classes = {"<1MiB": [0, 0, 0], "1-10MiB": [0, 0, 0], ">10MiB": [0, 0, 0]}
    for segment in segments:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            asked = block.get("requested_size", block["size"])
            key = "<1MiB" if asked < 2**20 else "1-10MiB" if asked < 10 * 2**20 else ">10MiB"
            classes[key][0] += 1
            classes[key][1] += asked
            classes[key][2] += block["size"] - asked
    return {k: {"blocks": n, "requested_gib": r / 2**30, "beyond_gib": x / 2**30}
            for k, (n, r, x) in classes.items()}


def main() -> None:
    from bench.model import METHODS, build, make_train_step
    from poetx.model.compile_blocks import compile_blocks
    from poetx.model.lm_loss import causal_lm_loss
    from poetx.train.capture import train_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3b")
    parser.add_argument("--method", default="int8", choices=sorted(METHODS))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--step", choices=["eager", "compiled", "captured"], default="eager",
                        help="eager; eager with the decoder blocks compiled; the CUDA-graph "
                        "capture of the step as bench/model.py and poetx train run it (blocks "
                        "compiled unless checkpointed; the capture's allocations are the "
                        "replay's)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="peak_snapshot.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("peak_snapshot: the allocator history needs a CUDA device")

    torch.manual_seed(0)
    model, opt = build(args.model, METHODS[args.method], args.block_size, "cuda")
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), device="cuda")
    if args.step == "captured":  # the call after the warm-up captures
        step = make_train_step(model, opt, batch, args.warmup + 1, capture=True,
                               compile_blocks=not METHODS[args.method].checkpointing)
    else:
        if args.step == "compiled":
            compile_blocks(model)
        step = train_step(model, opt, causal_lm_loss)
    for _ in range(args.warmup):
        step(batch)
    torch.cuda.synchronize()
    rounding = rounding_at(torch.cuda.memory_snapshot())
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(context="alloc", max_entries=2_000_000)
    step(batch)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    result = peak_breakdown(snapshot["device_traces"][0], start)
    result.update(model=args.model, method=args.method, seq_len=args.seq, batch=args.batch,
                  step=args.step,
                  device=torch.cuda.get_device_name(),
                  max_memory_allocated_gib=torch.cuda.max_memory_allocated() / 2**30)
    result["sites"] = result["sites"][: args.top]
    result["rounding_before_the_step"] = rounding
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.model} {args.method} {args.step} {args.batch}x{args.seq}: "
          f"peak {result['peak_gib']:.3f} GiB "
          f"(max_memory_allocated {result['max_memory_allocated_gib']:.3f}), before the step "
          f"{result['start_gib']:.3f}, allocated in the step and alive at the peak "
          f"{result['step_alive_at_peak_gib']:.3f}; reached by {result['peak_reached_by']}")
    for size_class, r in rounding.items():
        print(f"  before the step, {size_class}: {r['blocks']} blocks, {r['requested_gib']:.3f} "
              f"GiB asked, {r['beyond_gib']:.4f} GiB counted beyond")
    for s in result["sites"]:
        print(f"  {s['gib']:8.4f} GiB  {s['site']}")


if __name__ == "__main__":
    main()
