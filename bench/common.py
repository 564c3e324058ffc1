"""Shared pieces of the benchmarks: environment record, table printing, JSON output."""

from __future__ import annotations

import json
import shlex
import sys
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
