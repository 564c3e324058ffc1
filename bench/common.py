"""Shared pieces of the benchmarks: environment record, table printing, JSON output."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Device name and library versions, recorded with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def graph_ms(fn, calls: int = 1, reps: int = 20) -> float:
    """Median GPU time of one call of ``fn`` in ms: ``calls`` calls captured in one CUDA graph
    (after 3 warm-up calls on a side stream), replayed ``reps`` times. Without CUDA (a smoke
    run under ``TRITON_INTERPRET=1``): the wall time of one call."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Print ``rows`` as a Markdown table of ``columns``; returns the text."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path, rows: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """Write rows (each also carrying the environment) as a JSON list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{**env, **r} for r in rows], indent=1) + "\n")
