"""Scaling of ``poetx train``: data parallelism over GPUs, FSDP2 memory, gradient accumulation.

Every case is a real ``poetx train`` run in its own process group (``torchrun`` for more than
one process) on the bundled corpus; tokens/s is the median of the per-step values that
``metrics.jsonl`` holds after ``--warmup`` steps (global tokens per second), memory the peak
of rank 0 (``max_memory_allocated``). Cases (``--cases``, comma list, run in this order):

* ``accum``: one GPU, ``batch`` sequences in one step against ``batch / K`` with
  ``--grad-accum K`` (the same tokens per step); the target is <= 3 % lost. ``accum-adamw``:
  the same two runs with AdamW, the reference for what smaller passes cost without POET.
  ``--repeats N`` runs the pair N times, alternating (one batch, accumulated, one batch,
  ...), and compares the medians over the repeats: one process's median can sit several
  percent from another's of the same configuration on the same GPU (6.5 % once at 130M on
  an H200), more than the effect measured.
* ``ddp-<preset>-<optimizer>``: ``batch`` sequences per GPU on 1 and on 2 GPUs (``--parallel
  ddp``); efficiency = tokens/s(2) / (2 x tokens/s(1)); target >= 0.95 for poetx.
* ``fsdp-mem-<preset>``: peak memory per GPU of 2 GPUs with ``--parallel fsdp`` against one
  GPU, same per-GPU batch; target <= 0.6.
* ``fsdp-<preset>``: 2 GPUs with ``--parallel fsdp``: does it train, at what tokens/s.
* ``match-fsdp``: the same comparison for ``--parallel fsdp``, ``--check-steps`` steps.
* ``match``: ``--match-preset`` (``llama-130m``) for ``--match-steps`` steps with merges on
  1 GPU (batch B) and on 2 (B/2 each, the same global batch): largest loss difference,
  final validation losses. A 2-GPU run that finishes had its ranks checked identical after
  every merge (``check_ranks_agree`` raises otherwise).

One-GPU runs run first, two at a time (``CUDA_VISIBLE_DEVICES=0`` and ``=1``) when two GPUs
are visible, then the 2-GPU runs; the JSON is rewritten after each, so a time limit keeps the
rows so far. A run is stopped once its measurements are in ``metrics.jsonl`` (its final
checkpoint is not measured).
``--device cpu`` runs the same on CPU (gloo) as a smoke test::

    python -m bench.scale --cases accum,ddp-llama-1b-poetx,fsdp-mem-llama-8b,match \
        --out bench/results/scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, print_table, write_json
from poetx.model.lm_loss import PLANNER_LOSS
from poetx.train.metrics import read_metrics

COLUMNS = ["case", "optimizer", "preset", "world", "parallel", "batch", "grad_accum",
           "global_batch", "seq_len", "tokens_per_s", "ratio", "peak_mem_gib", "status"]

# Per-GPU batch and sequence length of each preset in the scaling cases (fit one H200 with
# room: poetx fast mode bf16 W0; AdamW where the planner says it fits).
SHAPES = {"llama-60m": (64, 256), "llama-130m": (32, 256), "llama-1b": (8, 1024),
          "llama-8b": (2, 1024), "llama-13b": (1, 2048)}


# The memory case: the smallest batch, where the weights (what FSDP2 shards) weigh most
# against the activations (which it does not).
MEM_SHAPES = {"llama-8b": (1, 1024)}

# Flags of the largest presets' runs: no host copy of W0's bf16 rounding residual (it is only
# read at merges, which these 20-step timing runs never reach; pinning 16-26 GB of host memory
# per process would cost more start-up time than the measured steps take).
PRESET_FLAGS = {"llama-8b": ["--w0-residual", "off"], "llama-13b": ["--w0-residual", "off"]}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``), children before their parents' parents."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_tree(proc: subprocess.Popen, wait_s: float = 60.0) -> None:
    """SIGKILL a run and everything it started, and wait until all of it is gone.

    torchrun starts its workers in sessions of their own: killing torchrun's process group
    leaves them running (they then go on to their final checkpoint, one rank spinning in a
    barrier on its GPU, and hold GPU memory), which spoils every later measurement."""
    pids = _descendants(proc.pid)
    for pid in [*pids, proc.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.perf_counter() + wait_s
    while any(_alive(pid) for pid in pids) and time.perf_counter() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the driver frees a dead process's GPU memory shortly after


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.toml = workdir / "settings.toml"
        self.toml.write_text("eval_at_start = false\nmetrics_every = 5\n")
        self.gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        self.count = 0
        self.active: set[subprocess.Popen] = set()
        # Runs live in their own sessions: on SIGTERM (a time limit) stop them with us.
        signal.signal(signal.SIGTERM, self._stop_all)

    def _stop_all(self, signum: int, frame: Any) -> None:
        for proc in list(self.active):
            kill_tree(proc)
        raise SystemExit(f"stopped by signal {signum}")

    def command(self, spec: dict[str, Any], out: Path) -> list[str]:
        a = self.args
        batch, seq = spec["batch"], spec["seq_len"]
        poetx = ["-m", "poetx.cli.main", "train", "--preset", spec["preset"], "--optimizer",
                 spec["optimizer"], "--batch-size", str(batch), "--grad-accum",
                 str(spec.get("grad_accum", 1)), "--seq-len", str(seq), "--steps",
                 str(spec.get("steps", a.steps)), "--eval-every",
                 str(spec.get("eval_every", 0)), "--save-every", "0", "--eval-batches",
                 str(spec.get("eval_batches", 1)), "--no-progress", "--no-tensorboard",
                 "--device", a.device, "--config", str(self.toml), "--out", str(out),
                 "--parallel", spec.get("parallel", "auto"), *spec.get("extra", []),
                 *PRESET_FLAGS.get(spec["preset"], [])]
        if spec["world"] == 1:
            return [sys.executable, *poetx]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(spec["world"]), *poetx]

    def start(self, spec: dict[str, Any], gpu: int | None) -> tuple[Any, ...]:
        self.count += 1
        out = self.workdir / f"run{self.count}"
        cmd = self.command(spec, out)
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        log = open(self.workdir / f"run{self.count}.log", "w")  # noqa: SIM115
        # Own session: the run (torchrun and its workers) is stopped as one group.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True,
                                start_new_session=True)
        self.active.add(proc)
        return proc, out, cmd, log, time.perf_counter(), gpu

    def _measured(self, spec: dict[str, Any], out: Path) -> bool:
        """All rows the case needs are in ``metrics.jsonl`` (the last step's, and the eval of
        the last step where the case compares validation losses)."""
        path = out / "metrics.jsonl"
        if not path.exists():
            return False
        steps = spec.get("steps", self.args.steps)
        try:
            records = read_metrics(out)
        except (ValueError, OSError):
            return False
        kinds = {r["type"] for r in records if r.get("step") == steps}
        return "train" in kinds and ("eval" in kinds or not spec.get("keep_losses"))

    def finish(self, spec: dict[str, Any], started: tuple[Any, ...]) -> dict[str, Any]:
        """Wait for the run, and stop it once its measurements are written: the final
        checkpoint of an 8B or 13B model is not what is measured and takes minutes."""
        proc, out, cmd, log, t0, gpu = started
        limit = spec.get("timeout", self.args.timeout)
        rc: Any = None
        while rc is None:
            rc = proc.poll()
            if rc is not None:
                break
            if self._measured(spec, out):
                time.sleep(0.5)
                kill_tree(proc)
                rc = 0
            elif time.perf_counter() - t0 > limit:
                kill_tree(proc)
                rc = "timeout"
            else:
                time.sleep(0.5)
        self.active.discard(proc)
        log.close()
        shown = " ".join(shlex.quote(c) for c in cmd)
        if gpu is not None:
            shown = f"CUDA_VISIBLE_DEVICES={gpu} {shown}"
        row = {k: spec[k] for k in ("case", "optimizer", "preset", "world", "batch",
                                    "seq_len")}
        row.update(parallel=spec.get("parallel", "auto"), grad_accum=spec.get("grad_accum", 1),
                   global_batch=spec["batch"] * spec.get("grad_accum", 1) * spec["world"],
                   command=shown, wall_s=round(time.perf_counter() - t0, 1),
                   loss_impl=PLANNER_LOSS)
        if "repeat" in spec:
            row["repeat"] = spec["repeat"]
        config = out / "config.json"
        if config.exists():  # what the run decided (the planner check reads it)
            decided = json.loads(config.read_text())
            row["compile_blocks"] = bool(decided.get("compile_blocks"))
            row["mlp_frames"] = decided.get("poet", {}).get("mlp_frames")
        records = read_metrics(out) if (out / "metrics.jsonl").exists() else []
        steps = [r for r in records if r["type"] == "train"]
        row["losses"] = [r["loss"] for r in steps] if spec.get("keep_losses") else None
        row["val_losses"] = [r["val_loss"] for r in records if r["type"] == "eval"]
        row["steps_done"] = len(steps)
        timed = [r for r in steps if r["step"] > self.args.warmup]
        if timed:
            row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
            row["peak_mem_gib"] = max(r["peak_mem_gib"] for r in timed)
        if rc != 0:
            tail = (self.workdir / log.name).read_text().strip().splitlines()[-3:]
            row["status"] = f"failed ({rc}): {' | '.join(tail)[-400:]}"
        else:
            row["status"] = "ok"
        print(f"{row['case']} world {row['world']}: {row.get('tokens_per_s')} tokens/s, "
              f"peak {row.get('peak_mem_gib')} GiB, {row['wall_s']} s, {row['status']}",
              flush=True)
        return row

    def run_all(self, cases: list[list[dict[str, Any]]], done: Callable[[], None]) -> None:
        """Fill ``spec["row"]`` for every spec of every case, two cases at a time: their
        one-process runs two at a time on separate GPUs (where two are visible), then their
        multi-process runs one after the other; ``done()`` after each step. A time limit thus
        leaves whole cases, in the given order."""
        width = 2 if self.gpus >= 2 else 1
        for c in range(0, len(cases), 2):
            chunk = [s for case in cases[c:c + 2] for s in case]
            singles = [s for s in chunk if s["world"] == 1]
            for i in range(0, len(singles), width):
                group = singles[i:i + width]
                started = [(s, self.start(s, gpu if width > 1 else None))
                           for gpu, s in enumerate(group)]
                for s, st in started:
                    s["row"] = self.finish(s, st)
                done()
                self.append_logs()
            for s in chunk:
                if s["world"] > 1:
                    s["row"] = self.finish(s, self.start(s, None))
                    done()
                    self.append_logs()

    def append_logs(self) -> None:
        """The last lines of every run's output so far, into ``--run-logs`` (if given)."""
        if not self.args.run_logs:
            return
        with open(self.args.run_logs, "w") as out:
            for i in range(1, self.count + 1):
                path = self.workdir / f"run{i}.log"
                if path.exists():
                    lines = path.read_text(errors="replace").splitlines()[-self.args.log_lines:]
                    out.write(f"==== run{i} ====\n" + "\n".join(lines) + "\n")


def ratio(a: dict[str, Any], b: dict[str, Any], key: str, scale: float = 1.0) -> float | None:
    if a.get(key) and b.get(key):
        return a[key] / (scale * b[key])
    return None


def case_specs(case: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    if case in ("accum", "accum-adamw"):
        # accum-adamw: the same two runs with AdamW, whose fixed cost per forward and backward
        # pass says what accumulation costs any model at these micro-batch shapes.
        batch, seq = SHAPES[args.accum_preset]
        optimizer = "adamw" if case == "accum-adamw" else "poetx"
        base = dict(case=case, preset=args.accum_preset, optimizer=optimizer, world=1,
                    seq_len=seq)
        pair = [dict(base, batch=batch), dict(base, batch=batch // args.accum,
                                              grad_accum=args.accum)]
        return [dict(spec, repeat=r) for r in range(args.repeats) for spec in pair]
    if case.startswith("ddp-"):
        preset, optimizer = case[4:].rsplit("-", 1)
        batch, seq = SHAPES[preset]
        base = dict(case=case, preset=preset, optimizer=optimizer, batch=batch, seq_len=seq)
        return [dict(base, world=1), dict(base, world=2, parallel="ddp")]
    if case.startswith("fsdp-mem-"):
        preset = case[len("fsdp-mem-"):]
        batch, seq = MEM_SHAPES.get(preset, SHAPES[preset])
        base = dict(case=case, preset=preset, optimizer="poetx", batch=batch, seq_len=seq)
        return [dict(base, world=1), dict(base, world=2, parallel="fsdp")]
    if case.startswith("fsdp-"):
        preset = case[len("fsdp-"):]
        batch, seq = SHAPES[preset]
        return [dict(case=case, preset=preset, optimizer="poetx", batch=batch, seq_len=seq,
                     world=2, parallel="fsdp")]
    if case in ("match", "match-fsdp"):
        # match: the long run (ddp); match-fsdp: a short check of the sharded step.
        steps, every = ((args.match_steps, args.match_merge_every) if case == "match"
                        else (args.check_steps, args.check_merge_every))
        batch, seq = SHAPES[args.match_preset]
        base = dict(case=case, preset=args.match_preset, optimizer="poetx", seq_len=seq,
                    steps=steps, eval_every=steps // 5, eval_batches=4,
                    keep_losses=True, timeout=args.match_timeout,
                    # Merges on the same steps in both runs: the ||Q|| guard's early merges
                    # depend on bf16-rounded values and would fire on different steps.
                    extra=["--merge-every", str(every), "--max-q-norm", "0"])
        return [dict(base, world=1, batch=batch),
                dict(base, world=2, batch=batch // 2,
                     parallel="ddp" if case == "match" else "fsdp")]
    raise SystemExit(f"unknown case {case!r}")


def summarize(case: str, rows: list[dict[str, Any]]) -> None:
    """Fill each case's ``ratio`` (and the match case's loss comparison)."""
    if case in ("accum", "accum-adamw"):
        # rows alternate: one batch, accumulated, one batch, ... (one pair per repeat)
        one, accumulated = rows[0::2], rows[1::2]
        runs = {name: [r["tokens_per_s"] for r in group if r.get("tokens_per_s")]
                for name, group in (("one", one), ("accum", accumulated))}
        last = rows[-1]
        if runs["one"] and runs["accum"]:
            last["ratio"] = statistics.median(runs["accum"]) / statistics.median(runs["one"])
        last["ratio_is"] = "tokens/s with --grad-accum / tokens/s in one batch"
        if len(one) > 1:
            last["ratio_is"] += f" (medians over {len(one)} alternating repeats)"
            last["tokens_per_s_repeats"] = runs
    elif case.startswith("ddp-"):
        rows[1]["ratio"] = ratio(rows[1], rows[0], "tokens_per_s", 2.0)
        rows[1]["ratio_is"] = "scaling efficiency: tokens/s(2 GPUs) / (2 x tokens/s(1 GPU))"
    elif case.startswith("fsdp-mem-"):
        rows[1]["ratio"] = ratio(rows[1], rows[0], "peak_mem_gib")
        rows[1]["ratio_is"] = "peak memory per GPU, fsdp on 2 GPUs / 1 GPU"
    elif case in ("match", "match-fsdp"):
        one, two = rows
        if one.get("losses") and two.get("losses") and len(one["losses"]) == len(
                two["losses"]):
            diffs = [abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)]
            two["max_abs_loss_diff"] = max(diffs)
            two["mean_abs_loss_diff"] = sum(diffs) / len(diffs)
            two["final_val_loss_1gpu"] = one["val_losses"][-1] if one["val_losses"] else None
            two["final_val_loss_2gpu"] = two["val_losses"][-1] if two["val_losses"] else None
            two["ranks_identical_after_every_merge"] = two["status"] == "ok"
        for r in rows:  # keep the JSON short: every 25th loss
            if r.get("losses"):
                r["losses_every_25"] = r.pop("losses")[::25]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="accum,ddp-llama-1b-poetx,ddp-llama-1b-adamw,"
                   "ddp-llama-8b-poetx,fsdp-mem-llama-8b,fsdp-llama-13b,match")
    p.add_argument("--accum-preset", default="llama-130m")
    p.add_argument("--accum", type=int, default=4, help="K of the accumulation case")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each accumulation pair, alternating; medians compared")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    p.add_argument("--match-preset", default="llama-130m")
    p.add_argument("--match-steps", type=int, default=500)
    p.add_argument("--match-merge-every", type=int, default=200)
    p.add_argument("--match-timeout", type=int, default=300)
    p.add_argument("--check-steps", type=int, default=30, help="steps of match-fsdp")
    p.add_argument("--check-merge-every", type=int, default=10)
    p.add_argument("--shape", action="append", default=[],
                   help="PRESET=BATCHxSEQ: per-GPU batch and sequence length of a preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=int, default=240, help="seconds per run")
    p.add_argument("--out", default="bench/results/scale.json")
    p.add_argument("--run-logs", default=None, help="file for the end of every run's output")
    p.add_argument("--log-lines", type=int, default=25)
    args = p.parse_args(argv)
    for s in args.shape:
        preset, shape = s.split("=")
        b, L = shape.split("x")
        SHAPES[preset] = (int(b), int(L))
    env = environment()
    env["bench_command"] = env.pop("command")
    cases = args.cases.split(",")
    specs = {case: case_specs(case, args) for case in cases}
    rows: list[dict[str, Any]] = []

    def done() -> None:
        rows.clear()
        for case in cases:
            case_rows = [s["row"] for s in specs[case] if "row" in s]
            if len(case_rows) == len(specs[case]):
                summarize(case, case_rows)
            rows.extend(case_rows)
        write_json(args.out, rows, env)

    with tempfile.TemporaryDirectory(prefix="poetx-scale-") as tmp:
        runner = Runner(args, Path(tmp))
        runner.run_all([specs[case] for case in cases], done)
    print()
    print_table(rows, COLUMNS)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
