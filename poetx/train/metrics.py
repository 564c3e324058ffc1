"""Run records: ``metrics.jsonl`` (one JSON object a line), TensorBoard events, progress bar.

Record kinds in ``metrics.jsonl``:
    ``{"type": "train", "step", "loss", "lr", "poet_lr", "grad_norm", "clip", "tokens",
    "tokens_per_s", "peak_mem_gib", "elapsed_s", "merged", "skipped"}``
    ``{"type": "eval", "step", "val_loss", "val_ppl", "tokens"}``
    ``{"type": "event", "step", "event", "message"}`` (start, resume, checkpoint, stop...)

``loss`` is the mean over the global batch (all ranks), ``tokens`` counts global tokens. The
step metrics are read from the device every ``metrics_every`` steps, so ``step_s`` and
``tokens_per_s`` are the mean over the steps read together (no per-step wait to time them).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from poetx.atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a half-written last line from a crash is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    records = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop records after ``step``: a resumed run re-does those steps, so keep one history.

    Rewritten through a temporary file and a rename, so a crash keeps the old file.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def _json_safe(value: Any) -> Any:
    # json writes NaN/Infinity, which strict readers reject; those become null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends records to ``RUN_DIR/metrics.jsonl`` and mirrors scalars to TensorBoard.

    TensorBoard is optional: without the package only the JSON lines are written.
    ``purge_step`` makes TensorBoard drop events past a resumed step.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True,
                 purge_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(run_dir) / TB_DIR), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _json_safe(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is None or record.get("type") not in ("train", "eval"):
            return
        prefix = record["type"]
        for key, value in record.items():
            if key in ("type", "step") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def event(self, step: int, event: str, message: str = "", **extra: Any) -> None:
        self.log({"type": "event", "step": step, "event": event, "message": message, **extra})

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """Progress over the steps with loss, tokens/s, lr and peak memory; silent when disabled.

    On a terminal a tqdm bar. Elsewhere (a log file, a pipe) a bar redraws itself with carriage
    returns, which a file keeps as repeated copies, so plain lines are printed instead: about
    every tenth of the run and the last step, once each.
    """

    LINES = 10

    def __init__(self, total: int, initial: int, enabled: bool, stream: Any = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._lines = False
        self._total = total
        self._initial = self._step = initial
        self._every = max(1, (total - initial) // self.LINES)
        if enabled:
            isatty = getattr(self._stream, "isatty", None)
            if isatty is not None and isatty():
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                                 file=self._stream)
            else:
                self._lines = True

    def update(self, loss: float, tokens_per_s: float, lr: float, mem_gib: float) -> None:
        self._step += 1
        text = f"loss={loss:.4f} tok/s={tokens_per_s:,.0f} lr={lr:.2e} mem={mem_gib:.2f}GiB"
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
        elif self._lines and (self._step == self._total
                              or (self._step - self._initial) % self._every == 0):
            print(f"step {self._step}/{self._total} {text}", file=self._stream, flush=True)

    def write(self, message: str) -> None:
        """Print a line to stdout without breaking the bar (which lives on stderr)."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
