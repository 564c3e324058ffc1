"""Training quality: POET-X against AdamW at equal tokens, and the ablations users ask about.

Every run is one ``poetx train`` process on one GPU, all on the same data (the ``debian-en``
corpus, packed for the GPU machine by ``poetx data pack``), the same data order (seed 0, batch
64 x 256) and the same validation set, for ``STEPS`` steps = 26.2 M tokens, fewer than the
packed training tokens, so no token is seen twice. Cosine schedule with a linear warm-up of
``WARMUP`` steps for both methods.

Subcommands:
    ``run``     run the queue, most important runs first. ``--gpus`` lists one slot per
                concurrent run: ``0,1`` is one run on each of two GPUs, ``0,0,0`` three runs
                sharing GPU 0 (small models leave a GPU partly idle: start-up, graph capture,
                evaluation and host gaps of one run overlap the steps of another). Finished
                runs (a row with status ``done`` in the results) are skipped, a run with a
                checkpoint is resumed, and no run is started that the ``--budget-s`` left would
                not finish, counting the GPU work already committed to its GPU (a run still
                going near the end is interrupted, which saves a checkpoint for the next call).
                Each row records how many runs shared its GPU and its tokens/s while it ran
                alone, since tokens/s under sharing is not a run's own speed;
    ``report``  plots (PNG) and ``docs/results.md`` from the results JSON;
    ``plan``    the queue, its commands and the GPU time it needs, estimated from the measured
                tokens/s in ``bench/results/train60m.json`` and ``step_h200.json``.

Preparing here (network): ``poetx data install debian-en`` (about 20 minutes on 2 cores) and
``poetx data pack debian-en --out .cache/gpu-corpus`` (30 M training tokens + the validation
set, xz-compressed token ids, about 20 MiB). Do not unpack there: the carried folder must stay
small. Stage the code the runs use (the GPU machine gets the staged copy, not the working
tree, so that a study keeps one code version)::

    rm -rf .stage/quality && mkdir -p .stage/quality && git archive HEAD | tar x -C .stage/quality \
        && git rev-parse --short HEAD > .stage/quality/.code-version

and copy ``bench/results/quality.json`` into it. Each row records that commit (``code``).

GPU machine (no network, at most 64 MiB of files a call), from the repository root with
``carry: [".stage/quality", ".cache/gpu-corpus"]``, each call (finished runs are skipped, run
folders under ``runs/`` stay on a warm machine between calls)::

    cd .stage/quality && export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; \
    cp bench/results/quality.json $OUT/ 2>/dev/null; \
    python -m poetx.cli.main data unpack ../../.cache/gpu-corpus && \
    python bench/quality.py run --gpus 0,0,0 --data ../../.cache/gpu-corpus \
        --runs-dir ../../runs/quality --results $OUT/quality.json \
        --budget-s 435 --speed-scale 0.86

(``--results`` under ``$OUT``: each finished run's row is there at once, even if the call is
cut off; ``--speed-scale 0.86``: an H100's speed relative to the H200 measurements, POET-X
60M alone 263 k against 305 k tokens/s, used only to decide which runs fit the budget.) The
first call ran three runs at once on one H100 (``--gpus 0,0,0``): sharing the GPU cost
throughput rather than adding it (see ``docs/results.md``), so ``--gpus 0`` (one run at a
time, each measured alone) is the better choice for these models. Then here: copy
``quality.json`` back to ``bench/results/`` (and into the staged copy before the next call,
so that its finished runs are skipped), and ``python bench/quality.py report``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "quality.json"
PLOTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "results.md"
STEPS = 1600
BATCH = 64
SEQ_LEN = 256
WARMUP = 160
EVAL_EVERY = 100
# Validation batches of each evaluation: the first 32 of the packed validation set (524 k
# tokens, the same for every run); the whole set (126 batches) would add about 45 % to a run.
EVAL_BATCHES = 32
SAVE_EVERY = 400
TOKENS = STEPS * BATCH * SEQ_LEN
SPIKE_WINDOW = 50
SPIKE_FACTOR = 1.5
# Seconds a run spends outside its steps and evaluations (Python start, model build, CUDA
# graph capture, checkpoints, exit): 20-22 s in the first H100 call of this study (13-14 s
# outside the trainer's clock, 5-8 s to the first step; three runs starting at once), 60 s
# in the H200 runs of bench/results/train60m.json (process time minus step time).
OVERHEAD_S = 30.0
# Seconds before the budget's end at which runs still going get SIGINT (a 60M or 130M run
# saves its checkpoint and writes its last records in a few seconds).
INTERRUPT_S = 45.0


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study; ``poet`` holds POET-X flags (``--block-size`` ...)."""

    name: str
    group: str  # "sweep" or "ablation"
    preset: str
    optimizer: str
    lr: float
    poet_lr: float | None = None
    poet: tuple[tuple[str, str], ...] = ()
    steps: int = STEPS

    @property
    def warmup_steps(self) -> int:
        """10 % of the steps (``WARMUP`` for the study's ``STEPS``)."""
        return self.steps // 10

    def command(self, data: Path, runs_dir: Path, resume: bool = False) -> list[str]:
        cmd = [
            sys.executable, "-m", "poetx.cli.main", "train",
            "--preset", self.preset, "--optimizer", self.optimizer,
            "--data", str(data), "--tokenizer", str(data / "tokenizer.json"),
            "--steps", str(self.steps), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN),
            "--lr", f"{self.lr:g}", "--warmup-steps", str(self.warmup_steps),
            "--eval-every", str(EVAL_EVERY), "--eval-batches", str(EVAL_BATCHES),
            "--save-every", str(SAVE_EVERY),
            "--seed", "0", "--no-progress", "--no-tensorboard",
            "--out", str(runs_dir / self.name),
        ]  # fmt: skip
        if self.poet_lr is not None:
            cmd += ["--poet-lr", f"{self.poet_lr:g}"]
        for flag, value in self.poet:
            cmd += [flag, value]
        if resume:
            cmd.append("--resume")
        return cmd


# Learning rates: each method's preset value times 0.5 / 1 / 2. For poetx the ordinary
# parameters' lr and the rotations' poet_lr move together, poet_lr following the preset's
# rotation convention (the authors' poet_lr x 0.5, x 256/b above b = 256).
PRESET_LRS = {  # (adamw lr, poetx lr, poetx poet_lr), from poetx.train.config.PRESET_DEFAULTS
    "llama-60m": (1e-3, 1e-2, 1e-3),
    "llama-130m": (1e-3, 5e-3, 1e-3),
}
LR_SCALES = (0.5, 1.0, 2.0)


def _tag(x: float) -> str:
    return f"{x:g}"


def study() -> list[RunSpec]:
    """All runs, in queue order: the 60M sweep of both methods, the 130M sweep, ablations."""
    runs: list[RunSpec] = []
    for preset in ("llama-60m", "llama-130m"):
        adamw_lr, poet_lr_base, rot_lr = PRESET_LRS[preset]
        size = preset.split("-")[1]
        for scale in (1.0, 0.5, 2.0):  # the centre first: it is also the ablations' reference
            runs.append(RunSpec(f"{size}-poetx-lr{_tag(poet_lr_base * scale)}", "sweep", preset,
                                "poetx", poet_lr_base * scale, rot_lr * scale))
            runs.append(RunSpec(f"{size}-adamw-lr{_tag(adamw_lr * scale)}", "sweep", preset,
                                "adamw", adamw_lr * scale))
    adamw_lr, lr, rot_lr = PRESET_LRS["llama-60m"]
    ablations = [
        ("b128", (("--block-size", "128"),), rot_lr),
        ("b512", (("--block-size", "512"),), rot_lr * 256 / 512),
        ("T50", (("--merge-every", "50"),), rot_lr),
        ("T1000", (("--merge-every", "1000"),), rot_lr),
        ("exact", (("--neumann-terms", "exact"),), rot_lr),
        ("int8", (("--w0-format", "int8"),), rot_lr),
        ("fp8", (("--w0-format", "fp8"),), rot_lr),
        # one permutation for each MLP's gate/up outputs and down input (a sampling variant
        # that spares permutation passes): does it train as well?
        ("sharedmlp", (("--mlp-permutations", "shared"),), rot_lr),
    ]
    for tag, flags, poet_lr in ablations:
        runs.append(RunSpec(f"60m-poetx-{tag}", "ablation", "llama-60m", "poetx", lr, poet_lr,
                            flags))
    return runs


# ---------------------------------------------------------------------------------------------
# Reading a run


def count_loss_spikes(losses: list[float], window: int = SPIKE_WINDOW,
                      factor: float = SPIKE_FACTOR) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the ``window`` steps before it.

    Only steps with a full window before them count; a non-finite loss counts as a spike.
    """
    spikes = 0
    for i in range(window, len(losses)):
        loss = losses[i]
        if not math.isfinite(loss) or loss > factor * statistics.median(losses[i - window : i]):
            spikes += 1
    return spikes


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a half-written last line of a killed run
            continue
    return records


def newest_train_record(run_dir: Path) -> dict[str, Any] | None:
    """The newest ``train`` record of ``run_dir/metrics.jsonl`` (``None`` if none yet).

    Reads the file's last 16 KiB only: the queue calls this for every run at every poll.
    """
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:  # the cut first line, or a half-written last one
            continue
        if isinstance(record, dict) and record.get("type") == "train":
            return record
    return None


# Seconds a run must have stepped alone for its alone tokens/s to be reported.
MIN_ALONE_S = 10.0

# (start, end, steps) of the training steps whose metrics were read together, in seconds.
Segment = tuple[float, float, int]


def step_segments(records: list[dict[str, Any]]) -> list[Segment]:
    """The stepping time of a run on its own clock (``elapsed_s``), from its train records.

    The steps read from the device together share one ``step_s`` (their mean), so each such
    group is one segment ending at its ``elapsed_s``. Only the last process of a resumed run
    counts (its clock restarted).
    """
    train = [r for r in records if r.get("type") == "train" and "step_s" in r]
    for i in range(len(train) - 1, 0, -1):
        if train[i]["elapsed_s"] < train[i - 1]["elapsed_s"]:
            train = train[i:]
            break
    segments: list[Segment] = []
    group: list[dict[str, Any]] = []
    for record in [*train, None]:
        if group and (record is None or record["step_s"] != group[0]["step_s"]):
            end = max(float(r["elapsed_s"]) for r in group)
            segments.append((end - len(group) * float(group[0]["step_s"]), end, len(group)))
            group = []
        if record is not None:
            group.append(record)
    return segments


def sharing_stats(runs: dict[str, tuple[str, float, list[Segment]]], name: str,
                  tokens_per_step: int) -> dict[str, Any]:
    """How run ``name`` shared its GPU.

    ``runs`` maps each run to ``(gpu, origin, segments)``: its GPU, the time (any common
    clock) at which its own clock read 0, and its :func:`step_segments`. Another run on the
    same GPU shares a segment when the span from its first to its last step (evaluations and
    checkpoints between steps included) covers more than half of it. Returns
    ``runs_on_gpu_max`` and ``runs_on_gpu_mean`` (most and time-weighted mean runs on the GPU
    over its segments, itself included), ``alone_s`` (its stepping time alone),
    ``tokens_per_s_alone`` (its speed over that time; ``None`` under ``MIN_ALONE_S``) and
    ``gpu_share_s`` (its stepping time, each segment divided by the runs on the GPU then).
    """
    gpu, origin, own = runs[name]
    spans = [(o + segs[0][0], o + segs[-1][1]) for run, (g, o, segs) in runs.items()
             if run != name and g == gpu and segs]
    most = 0
    stepping_s = weighted = alone_s = alone_steps = share_s = 0.0
    for a, b, steps in own:
        a, b = a + origin, b + origin
        length = b - a
        if length <= 0:
            continue
        sharing = 1 + sum(1 for lo, hi in spans if min(b, hi) - max(a, lo) > length / 2)
        most = max(most, sharing)
        stepping_s += length
        weighted += length * sharing
        share_s += length / sharing
        if sharing == 1:
            alone_s += length
            alone_steps += steps
    return {
        "runs_on_gpu_max": most,
        "runs_on_gpu_mean": weighted / stepping_s if stepping_s else None,
        "alone_s": alone_s,
        "tokens_per_s_alone": (alone_steps * tokens_per_step / alone_s
                               if alone_s >= MIN_ALONE_S else None),
        "gpu_share_s": share_s,
    }


def summarize(records: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Numbers of one run from its ``metrics.jsonl`` records.

    Returns ``tokens_seen``, ``final_val_ppl`` (evaluation at the last step), ``best_val_ppl``,
    ``loss_spikes``, ``tokens_per_s`` (median over the steps after the first 30: CUDA graph
    capture and warm-up excluded), ``peak_gib``, ``wall_s`` (summed over resumed pieces),
    ``curve`` (``[step, tokens, wall_s, val_ppl]`` per evaluation) and ``done``.
    """
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    offset = 0.0
    last_elapsed = 0.0
    wall_at_step: dict[int, float] = {}
    for record in records:
        kind = record.get("type")
        if kind == "train":
            elapsed = float(record.get("elapsed_s", 0.0))
            if elapsed < last_elapsed:  # a resumed process restarts its clock
                offset += last_elapsed
            last_elapsed = elapsed
            train[record["step"]] = record
            wall_at_step[record["step"]] = offset + elapsed
        elif kind == "eval":
            evals[record["step"]] = record
    ordered = [train[s] for s in sorted(train)]
    losses = [float(r["loss"]) for r in ordered]
    speeds = [float(r["tokens_per_s"]) for r in ordered[30:] if r.get("tokens_per_s")]
    curve = []
    for step in sorted(evals):
        wall = wall_at_step.get(step, 0.0 if step == 0 else None)
        curve.append([step, evals[step].get("tokens", step * BATCH * SEQ_LEN), wall,
                      float(evals[step]["val_ppl"])])
    last_step = max(train) if train else 0
    ppls = [c[3] for c in curve if math.isfinite(c[3])]
    return {
        "steps_done": last_step,
        "tokens_seen": int(ordered[-1]["tokens"]) if ordered else 0,
        "final_val_ppl": float(evals[steps]["val_ppl"]) if steps in evals else None,
        "best_val_ppl": min(ppls) if ppls else None,
        "loss_spikes": count_loss_spikes(losses),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_gib": max((float(r.get("peak_mem_gib", 0.0)) for r in ordered), default=None),
        "wall_s": max(wall_at_step.values(), default=0.0),
        "curve": curve,
        "done": steps in evals and last_step >= steps,
    }


# ---------------------------------------------------------------------------------------------
# Results file


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    return {row["name"]: row for row in json.loads(path.read_text())}


def save_results(path: Path, rows: dict[str, dict[str, Any]]) -> None:
    order = {spec.name: i for i, spec in enumerate(study())}
    ordered = sorted(rows.values(), key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(ordered, indent=1) + "\n")
    os.replace(tmp, path)


def shown_command(command: list[str], gpu: str) -> str:
    """``command`` as a person would type it: ``python``, paths relative to the repository."""
    def show(arg: str) -> str:
        if arg == sys.executable:
            return "python"
        path = Path(arg)
        if path.is_absolute() and path.is_relative_to(ROOT):
            return str(path.relative_to(ROOT))
        return arg

    prefix = f"CUDA_VISIBLE_DEVICES={gpu} " if gpu != "cpu" else ""
    return prefix + " ".join(shlex.quote(show(a)) for a in command)


CODE_FILE = ".code-version"  # written when staging a copy without git (see the module notes)


def code_version(root: Path = ROOT) -> str:
    """The commit the runs use: the staged copy's ``CODE_FILE``, else ``git rev-parse --short
    HEAD`` in ``root``, else ``"unknown"``. The file comes first: a copy staged inside a
    checkout (``.stage/quality``) would otherwise report the enclosing checkout's commit."""
    staged = root / CODE_FILE
    if staged.is_file():
        return staged.read_text().strip()
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


def make_row(spec: RunSpec, summary: dict[str, Any], command: list[str], device: str,
             gpu: str, status: str, sharing: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of ``quality.json``; ``sharing`` is :func:`sharing_stats` of the run.

    ``tokens_per_s`` is measured as the run went, so under sharing it is the run's part of the
    GPU, not its own speed: ``tokens_per_s_alone`` and ``runs_on_gpu_*`` say which it is.
    """
    return {
        "name": spec.name, "group": spec.group, "preset": spec.preset,
        "optimizer": spec.optimizer, "lr": spec.lr, "poet_lr": spec.poet_lr,
        "poet_flags": " ".join(f"{k} {v}" for k, v in spec.poet),
        "steps": spec.steps, "batch": BATCH, "seq_len": SEQ_LEN,
        "warmup_steps": spec.warmup_steps,
        **{k: v for k, v in summary.items() if k != "done"},
        **(sharing or {}),
        "status": status,
        "command": shown_command(command, gpu),
        "device": device,
        "code": code_version(),
    }


# ---------------------------------------------------------------------------------------------
# Estimates


def measured_tokens_per_s(results_dir: Path = ROOT / "bench" / "results"
                          ) -> dict[tuple[str, str], float]:
    """Tokens/s of (preset, optimizer) on one H200 from the committed benchmark JSON."""
    speeds: dict[tuple[str, str], float] = {}
    train60 = results_dir / "train60m.json"
    if train60.is_file():
        for row in json.loads(train60.read_text()):
            speeds[("llama-60m", row["optimizer"])] = row["tokens_per_s_median_steps_31_150"]
    step = results_dir / "step_h200.json"
    if step.is_file():
        for row in json.loads(step.read_text()):
            if row.get("model") == "llama-130m" and row.get("method") in ("poetx", "adamw"):
                speeds[("llama-130m", row["method"])] = row["tokens_per_s"]
    return speeds


def gpu_seconds(spec: RunSpec, speeds: dict[tuple[str, str], float],
                speed_scale: float = 1.0) -> float:
    """Predicted GPU-busy time of one run alone: its steps and evaluations at the measured speed.

    ``speed_scale`` is this GPU's speed relative to the measurements (H200). An evaluation
    batch is counted as a third of a training step (forward only). Ablations that change the
    step's cost are scaled by factors: exact Cayley 4.7 (its steps run eagerly, as the batched
    solve cannot be captured: 56 k against 263 k tokens/s alone on an H100), int8/fp8 W0 1.2
    (dequantization in each GEMM; rough).
    """
    speed = speeds.get((spec.preset, spec.optimizer))
    if speed is None:
        speed = 1.5e5
    factor = {"exact": 4.7, "int8": 1.2, "fp8": 1.2}.get(spec.name.rsplit("-", 1)[-1], 1.0)
    eval_steps = (spec.steps // EVAL_EVERY + 1) * EVAL_BATCHES / 3
    return (spec.steps + eval_steps) * BATCH * SEQ_LEN / (speed * speed_scale) * factor


def estimate_seconds(spec: RunSpec, speeds: dict[tuple[str, str], float],
                     speed_scale: float = 1.0) -> float:
    """Predicted wall time of one run alone: :func:`gpu_seconds` plus ``OVERHEAD_S``."""
    return gpu_seconds(spec, speeds, speed_scale) + OVERHEAD_S


def projected_end(gpu_free_at: float, now: float, work_s: float) -> float:
    """When a run started at ``now`` on a GPU should end, the GPU being time-shared.

    The GPU still owes ``gpu_free_at - now`` seconds of work to the runs already on it, and
    the new run's ``OVERHEAD_S`` of start-up (CPU work) overlaps that work; its own ``work_s``
    comes after both. Sharing is assumed to add no throughput (conservative): runs started
    together end together, no sooner than run one after another.
    """
    return max(gpu_free_at, now + OVERHEAD_S) + work_s


# ---------------------------------------------------------------------------------------------
# The queue


@dataclass
class _Running:
    spec: RunSpec
    gpu: str
    proc: subprocess.Popen
    command: list[str]
    started: float
    log: Any = field(repr=False)
    interrupted: bool = False
    started_unix: float = 0.0


def _device_name(gpu: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        name = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        name = ""
    return f"{name or 'unknown GPU'} (GPU {gpu})" if gpu != "cpu" else "cpu"


def run_queue(specs: list[RunSpec], gpus: list[str], data: Path, runs_dir: Path,
              results: Path, budget_s: float | None, extra: list[str] | None = None,
              speeds: dict[tuple[str, str], float] | None = None, poll_s: float = 1.0,
              speed_scale: float = 1.0) -> None:
    """Run ``specs`` in order, one at a time per entry of ``gpus`` (``"cpu"`` runs on the CPU).

    An id listed twice (``["0", "0"]``) runs two processes at once on that GPU. Finished runs
    (status ``done`` in ``results``) are skipped; a run directory with a checkpoint is resumed.
    With ``budget_s``, a run is started only when :func:`projected_end` on its GPU, counting
    the work already committed there, falls ``INTERRUPT_S`` before the end, and runs still
    going then get SIGINT (poetx saves a checkpoint and stops). Every poll reads each run's
    newest record to place its clock, from which its row gets :func:`sharing_stats`.
    """
    speeds = measured_tokens_per_s() if speeds is None else speeds
    start = time.monotonic()
    deadline = None if budget_s is None else start + budget_s
    gpu_free_at: dict[str, float] = {}
    # Each run's clock origin on time.time(): the newest record read at a poll was written
    # before the poll, so poll time - its elapsed_s bounds the origin from above; the least
    # such bound over the polls is the closest.
    origins: dict[str, float] = {}
    finished: dict[str, tuple[str, float, list[Segment]]] = {}
    rows = load_results(results)
    pending = [s for s in specs if rows.get(s.name, {}).get("status") != "done"]
    skipped = len(specs) - len(pending)
    if skipped:
        print(f"quality: {skipped} finished runs skipped", flush=True)
    free = list(gpus)
    running: list[_Running] = []
    runs_dir.mkdir(parents=True, exist_ok=True)
    while pending or running:
        now = time.monotonic()
        left = None if deadline is None else deadline - now
        for gpu in set(gpu_free_at) - {job.gpu for job in running}:
            del gpu_free_at[gpu]  # an idle GPU owes nothing, whatever was projected
        while free and pending:
            gpu = free[0]
            ends = {s.name: projected_end(gpu_free_at.get(gpu, now), now,
                                          gpu_seconds(s, speeds, speed_scale)) for s in pending}
            last_end = math.inf if deadline is None else deadline - INTERRUPT_S
            spec = next((s for s in pending if ends[s.name] <= last_end), None)
            if spec is None:
                break
            pending.remove(spec)
            free.pop(0)
            gpu_free_at[gpu] = ends[spec.name]
            run_dir = runs_dir / spec.name
            resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
            command = spec.command(data, runs_dir, resume=resume) + list(extra or [])
            env = dict(os.environ)
            if gpu != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = gpu
            run_dir.mkdir(parents=True, exist_ok=True)
            log = (run_dir / "log.txt").open("a")
            print(f"quality: start {spec.name} on {gpu}{' (resume)' if resume else ''}", flush=True)
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT)
            running.append(_Running(spec, gpu, proc, command, time.monotonic(), log,
                                    started_unix=time.time()))
        if not running:
            if pending:
                print(f"quality: {len(pending)} runs left for a later call (budget)", flush=True)
            break
        time.sleep(poll_s)
        for job in running:
            newest = newest_train_record(runs_dir / job.spec.name)
            if newest is not None and "elapsed_s" in newest:
                bound = time.time() - float(newest["elapsed_s"])
                origins[job.spec.name] = min(origins.get(job.spec.name, bound), bound)
        for job in list(running):
            if (left is not None and left < INTERRUPT_S and not job.interrupted
                    and job.proc.poll() is None):
                job.proc.send_signal(signal.SIGINT)
                job.interrupted = True
            code = job.proc.poll()
            if code is None:
                continue
            running.remove(job)
            job.log.close()
            free.append(job.gpu)
            summary = summarize(read_records(runs_dir / job.spec.name), job.spec.steps)
            status = "done" if summary["done"] and code == 0 else (
                "partial" if code in (0, 130) else f"failed (exit {code})")
            runs = dict(finished)
            for other in [*running, job]:
                name = other.spec.name
                runs[name] = (other.gpu, origins.get(name, other.started_unix),
                              step_segments(read_records(runs_dir / name)))
            finished[job.spec.name] = runs[job.spec.name]
            sharing = sharing_stats(runs, job.spec.name, BATCH * SEQ_LEN)
            sharing.update(started_unix=round(job.started_unix, 1),
                           ended_unix=round(time.time(), 1))
            rows = load_results(results)
            rows[job.spec.name] = make_row(job.spec, summary, job.command, _device_name(job.gpu),
                                           job.gpu, status, sharing)
            save_results(results, rows)
            took = time.monotonic() - job.started
            print(f"quality: {job.spec.name} {status} in {took:.0f} s, best val ppl "
                  f"{summary['best_val_ppl']}, {summary['loss_spikes']} spikes, "
                  f"{sharing['runs_on_gpu_mean'] or 0:.2f} runs on its GPU on average, "
                  f"tokens/s {summary['tokens_per_s'] or 0:,.0f} shared, "
                  f"{sharing['tokens_per_s_alone'] or 0:,.0f} alone", flush=True)


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:g}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def alone_speed(row: dict[str, Any], rows: list[dict[str, Any]],
                device: str | None = None) -> tuple[float | None, str]:
    """Tokens/s of ``row``'s run alone on a GPU, and where the number comes from.

    ``device`` (default: the run's own) names the GPU the speed is wanted on, so that runs
    made on different GPUs are compared at one GPU's speed. In this order: its own speed
    measured alone, if it ran there (``"alone"``); the median of those of runs of the same
    preset, optimizer and POET flags on that device (``"alike"``); and, on its own device
    only, its tokens/s when it never shared the GPU (``"alone"``) or its tokens over its share
    of the GPU's time, which assumes that sharing neither adds nor loses throughput
    (``"share"``); else ``(None, "")``.
    """
    device = device or row.get("device")
    own = row.get("device") == device
    if own and row.get("tokens_per_s_alone"):
        return float(row["tokens_per_s_alone"]), "alone"
    key = ("preset", "optimizer", "poet_flags")
    alike = [float(r["tokens_per_s_alone"]) for r in rows
             if r.get("tokens_per_s_alone") and r.get("device") == device
             and all(r.get(k) == row.get(k) for k in key)]
    if alike:
        return statistics.median(alike), "alike"
    if not own:
        return None, ""
    if row.get("runs_on_gpu_max", 1) <= 1 and row.get("tokens_per_s"):
        return float(row["tokens_per_s"]), "alone"
    if row.get("gpu_share_s") and row.get("tokens_seen"):
        return row["tokens_seen"] / row["gpu_share_s"], "share"
    return None, ""


def speed_device(rows: list[dict[str, Any]], preset: str) -> str | None:
    """The GPU on which a preset's sweep is compared: the one with the most sweep runs that
    have a speed measured alone, among those where both optimizers have one."""
    measured = [r for r in rows if r.get("preset") == preset and r.get("group") == "sweep"
                and r.get("tokens_per_s_alone")]
    both = [d for d in {r["device"] for r in measured}
            if {r["optimizer"] for r in measured if r["device"] == d} >= {"poetx", "adamw"}]
    if not both:
        return None
    return max(sorted(both), key=lambda d: sum(r["device"] == d for r in measured))


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``quality_ppl_tokens.png`` and ``quality_ppl_wallclock.png`` of the sweep runs.

    Runs that shared a GPU ran slower than alone, so the wall-clock plot does not use the
    shared clock: its time is tokens / :func:`alone_speed` on the preset's
    :func:`speed_device` (training steps only, evaluations left out), so runs made on other
    GPUs are placed at that GPU's speed; a run without such a speed is left out of it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sweep = [r for r in rows if r["group"] == "sweep" and r.get("curve")]
    order = list(PRESET_LRS)
    presets = sorted({r["preset"] for r in sweep},
                     key=lambda p: (order.index(p) if p in order else len(order), p))
    if not presets:
        return written
    wall_label = "time alone on the GPU (s): tokens / tokens/s measured alone"
    for wall, x_label, name in ((False, "training tokens (M)", "quality_ppl_tokens.png"),
                                (True, wall_label, "quality_ppl_wallclock.png")):
        fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4.5), squeeze=False)
        for ax, preset in zip(axes[0], presets, strict=True):
            device = speed_device(rows, preset)
            devices = {device.split(" (")[0]} if wall and device else set()
            for row in sorted((r for r in sweep if r["preset"] == preset),
                              key=lambda r: (r["optimizer"], r["lr"])):
                speed, source = alone_speed(row, rows, device) if wall else (1e6, "")
                if speed is None:
                    continue
                if not wall:
                    devices.add(row["device"].split(" (")[0])
                points = [c for c in row["curve"] if c[0] > 0]
                xs = [c[1] / speed for c in points]
                ys = [c[3] for c in points]
                style = "-" if row["optimizer"] == "poetx" else "--"
                color = "tab:blue" if row["optimizer"] == "poetx" else "tab:orange"
                centre = PRESET_LRS.get(preset, (row["lr"], row["lr"], None))
                scale = row["lr"] / centre[1 if row["optimizer"] == "poetx" else 0]
                alpha = {0.5: 0.45, 1.0: 1.0, 2.0: 0.7}.get(round(scale, 2), 0.6)
                label = f"{row['optimizer']} lr {row['lr']:g}" + (
                    f" / poet_lr {row['poet_lr']:g}" if row.get("poet_lr") else "") + (
                    " (speed from its GPU share)" if source == "share" else "")
                ax.plot(xs, ys, style, color=color, alpha=alpha, label=label)
            ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel("validation perplexity")
            ax.set_title(f"{preset} ({', '.join(sorted(devices))})")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


_COLUMNS = [("name", "run"), ("optimizer", "optimizer"), ("lr", "lr"), ("poet_lr", "poet_lr"),
            ("poet_flags", "POET flags"), ("tokens_seen", "tokens"),
            ("final_val_ppl", "final val ppl"), ("best_val_ppl", "best val ppl"),
            ("loss_spikes", "loss spikes"), ("tokens_per_s", "tokens/s (shared)"),
            ("runs_on_gpu_mean", "runs on GPU"), ("tokens_per_s_alone", "tokens/s alone"),
            ("peak_gib", "peak GiB"), ("status", "status")]


def corpus_section(results_dir: Path) -> list[str]:
    """Lines about the corpus from ``corpus_debian_en.json`` (the build's manifest) and the
    transport measurements ``gpu_corpus.json``, when they exist."""
    manifest_path = results_dir / "corpus_debian_en.json"
    if not manifest_path.is_file():
        return []
    manifest = json.loads(manifest_path.read_text())
    splits = manifest["splits"]
    dedup = manifest["dedup"]
    out = ["## The corpus (`debian-en`, measured)", "",
           f"Built by `poetx data install debian-en` in {manifest['build_seconds'] / 60:.0f} "
           f"minutes on a shared 2-core machine, after the download of the "
           f"{len(manifest['sources'])} packages (2.4 GB); "
           f"{dedup['documents']:,} documents extracted, {dedup['exact']:,} exact and "
           f"{dedup['near']:,} near duplicates removed; tokenizer: byte-level BPE, vocabulary "
           f"{manifest['vocab_size']:,}.", "",
           "| split | documents | characters (M) | tokens (M) |", "|---|---|---|---|"]
    for name, split in splits.items():
        out.append(f"| {name} | {split['documents']:,} | {split['chars'] / 1e6:.1f} | "
                   f"{split['tokens'] / 1e6:.2f} |")
    total = sum(src["chars_kept"] for src in manifest["sources"].values())
    dictionaries = sum(src["chars_kept"] for name, src in manifest["sources"].items()
                       if name.startswith("dict-"))
    out += ["", "Most of the text is software documentation, much of it API reference (Haskell, "
            "Java, C/C++, PETSc, Rust...) beside manuals, user guides and handbooks; the "
            f"dictionaries (GCIDE, WordNet, FOLDOC, Jargon File) are {dictionaries / total:.0%} "
            "of the characters. Perplexities on it are not comparable with C4 numbers."]
    out += ["", "Largest sources after de-duplication (all in `bench/results/"
            "corpus_debian_en.json`, with version, sha256 and licence):", "",
            "| package | licence | documents | characters (M) |", "|---|---|---|---|"]
    top = sorted(manifest["sources"].items(), key=lambda kv: -kv[1]["chars_kept"])[:15]
    for name, src in top:
        out.append(f"| {name} | {src['licence']} | {src['documents_kept']:,} | "
                   f"{src['chars_kept'] / 1e6:.1f} |")
    transport = results_dir / "gpu_corpus.json"
    if transport.is_file():
        out += ["", "Brought to the GPU machine (`poetx data pack`, `bench/transport.py`):", "",
                "| format | train tokens (M) | MiB in all | bytes / token | unpack s (cores) "
                "| train tokens in 49 MiB |", "|---|---|---|---|---|---|"]
        for row in json.loads(transport.read_text()):
            out.append(f"| {row['format']} | {row['train_tokens'] / 1e6:.1f} | "
                       f"{row['total_mib']:.1f} | {row['bytes_per_token']:.2f} | "
                       f"{row['unpack_s']:.1f} ({row['cores']}) | "
                       f"{row['train_tokens_in_call'] / 1e6:.0f} M |")
    return out + [""]


def render_doc(rows: list[dict[str, Any]], plots: list[Path]) -> str:
    """The text of ``docs/results.md`` for ``rows`` (pending sections say so)."""
    specs = study()
    speeds = measured_tokens_per_s()
    estimate = sum(estimate_seconds(s, speeds) for s in specs)
    done = [r for r in rows if r.get("status") == "done"]
    devices = sorted({r["device"] for r in done})
    out = [
        "# Results: POET-X against AdamW at equal tokens",
        "",
        "Generated by `python bench/quality.py report` from `bench/results/quality.json`; do "
        "not edit by hand.",
        "",
        f"**Status: {len(done)} of {len(specs)} runs done.**" + (
            " The numbers are pending a GPU session: nothing below is measured yet."
            if not done else f" Device: {', '.join(devices)}."),
        "",
        "## Setup",
        "",
        "- Data: the `debian-en` corpus (`poetx data install debian-en`: English documentation, "
        "books and dictionaries from pinned Debian 12 packages, de-duplicated, split by "
        "document), packed for the GPU machine with `poetx data pack` (`.cache/gpu-corpus/`).",
        f"- Every run: {STEPS} steps of {BATCH} x {SEQ_LEN} tokens = {TOKENS / 1e6:.1f} M "
        "training tokens, fewer than the packed training stream, so no token is seen twice; "
        "same seed, data order and validation batches for all; cosine schedule to 1 % with a "
        f"linear warm-up of {WARMUP} steps; evaluation every {EVAL_EVERY} steps.",
        "- Learning rates: each method's preset value x 0.5 / 1 / 2. AdamW: 60M and 130M "
        "5e-4 / 1e-3 / 2e-3. POET-X (lr of embeddings, norms, head / poet_lr of rotations, "
        "moved together, poet_lr in the preset's rotation convention): 60M 5e-3/5e-4, "
        "1e-2/1e-3, 2e-2/2e-3; 130M 2.5e-3/5e-4, 5e-3/1e-3, 1e-2/2e-3.",
        "- Ablations on 60M at the centre of the POET-X grid (lr 1e-2, poet_lr 1e-3; b = 512 "
        "with poet_lr 5e-4 by the convention): block 128 / 256 / 512, merge interval 50 / 200 "
        "/ 1000, Neumann terms 3 vs exact, W0 bf16 / int8 / fp8, and one permutation shared "
        "by each MLP's gate/up outputs and down input (`--mlp-permutations shared`).",
        f"- Loss spikes: steps whose training loss exceeds {SPIKE_FACTOR} x the median of the "
        f"{SPIKE_WINDOW} steps before it.",
        f"- Evaluation: the first {EVAL_BATCHES} batches of the validation set "
        f"({EVAL_BATCHES * BATCH * SEQ_LEN / 1e3:.0f} k tokens), the same for every run.",
        f"- GPU time of the whole study, estimated from the measured tokens/s on one H200 "
        f"(`bench/results/train60m.json`, `step_h200.json`) plus {OVERHEAD_S:.0f} s a run: "
        f"{estimate / 60:.0f} GPU-minutes run one after another.",
        "- Several runs may share one GPU (`--gpus 0,0,0`: three processes at once, "
        "time-sliced). Their `tokens/s (shared)` is then their part of the GPU, not their "
        "speed: `runs on GPU` is the mean number of runs on the GPU (from their first to "
        "their last step) while the run stepped, `tokens/s alone` its speed over the time it "
        f"stepped alone (measured when that was at least {MIN_ALONE_S:.0f} s). The wall-clock "
        "plot uses tokens / tokens/s alone, not the shared clock; a run never alone long "
        "enough takes that of an alike run (same preset, optimizer, flags, GPU), else its "
        "tokens over its share of the GPU's time (`gpu_share_s`: each of its stepping "
        "intervals divided by the runs on the GPU then), marked so in the legend.",
        "",
        "Commands (GPU machine; see `bench/quality.py` for the full procedure):",
        "",
        "```bash",
        "poetx data install debian-en && poetx data pack debian-en --out .cache/gpu-corpus",
        "# on the GPU machine, each call (runs already done are skipped):",
        "python -m poetx.cli.main data unpack .cache/gpu-corpus",
        "python bench/quality.py run --gpus 0,0,0 --data .cache/gpu-corpus --budget-s 435 \\",
        "    --speed-scale 0.86   # first call: three at once; --gpus 0 runs one at a time",
        "# back here, with the GPU's bench/results/quality.json:",
        "python bench/quality.py report",
        "```",
        "",
    ]
    out += corpus_section(ROOT / "bench" / "results")
    by_preset = {}
    for row in rows:
        by_preset.setdefault((row["group"], row["preset"]), []).append(row)
    others = sorted({p for g, p in by_preset if g == "sweep"} - set(PRESET_LRS))
    for preset in [*PRESET_LRS, *others]:
        out += [f"## {preset}: learning-rate sweep", ""]
        sweep = by_preset.get(("sweep", preset), [])
        if sweep:
            out += [_table(sweep, _COLUMNS), ""]
            best = {}
            for opt in ("poetx", "adamw"):
                vals = [r["best_val_ppl"] for r in sweep
                        if r["optimizer"] == opt and r.get("best_val_ppl") is not None]
                best[opt] = min(vals) if vals else None
            if best["poetx"] and best["adamw"]:
                out += [f"Best validation perplexity: poetx {best['poetx']:.2f}, AdamW "
                        f"{best['adamw']:.2f}; ratio {best['poetx'] / best['adamw']:.3f} "
                        "(target <= 1.03).", ""]
        else:
            out += ["Pending: no run of this sweep has been made yet.", ""]
    out += ["## llama-60m: ablations (POET-X)", ""]
    ablation = by_preset.get(("ablation", "llama-60m"), [])
    centre = [r for r in by_preset.get(("sweep", "llama-60m"), [])
              if r["optimizer"] == "poetx" and r["lr"] == PRESET_LRS["llama-60m"][1]]
    if ablation:
        out += ["The first row is the reference (block 256, T = 200, 3 Neumann terms, bf16 W0).",
                "", _table(centre + ablation, _COLUMNS), ""]
        out += ablation_summary(centre, ablation)
    else:
        out += ["Pending: no ablation run has been made yet.", ""]
    out += ["## Plots", ""]
    if plots:
        for path in plots:
            rel = os.path.relpath(path, DOC.parent)
            out += [f"![{path.stem}]({rel})", ""]
    else:
        out += ["Pending: validation perplexity against tokens and against wall-clock time "
                "(`bench/results/quality_ppl_tokens.png`, `quality_ppl_wallclock.png`) are "
                "drawn once runs exist.", ""]
    out += sharing_section(rows)
    out += ["## Where POET-X loses", "", *comparison(rows), ""]
    return "\n".join(out)


def ablation_summary(centre: list[dict[str, Any]], ablation: list[dict[str, Any]]) -> list[str]:
    """Each finished ablation's best validation perplexity against the reference run's, and
    the W0 formats against their target (within 2 % of bf16)."""
    ref = next((r for r in centre if r.get("best_val_ppl")), None)
    if ref is None:
        return []
    lines = []
    for row in ablation:
        if row.get("status") == "partial" and row.get("curve"):
            lines += _partial_against_reference(row, ref)
            continue
        if row.get("status") != "done" or not row.get("best_val_ppl"):
            continue
        change = row["best_val_ppl"] / ref["best_val_ppl"] - 1
        line = (f"- `{row['poet_flags']}`: {row['best_val_ppl']:.2f} against "
                f"{ref['best_val_ppl']:.2f} ({change:+.1%})")
        if "--w0-format" in row["poet_flags"]:
            line += (": within 2 % of bf16 W0 (target)" if abs(change) <= 0.02
                     else ": not within 2 % of bf16 W0 (target)")
        lines.append(line + ".")
    return [*lines, ""] if lines else []


def _partial_against_reference(row: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """A run cut short, at its last evaluation against the reference's at the same step (the
    same schedule and data, so the same tokens), since its best is not comparable to a
    finished run's."""
    at_step = {point[0]: point for point in ref.get("curve", [])}
    shared = [point for point in row["curve"] if point[0] in at_step and point[0] > 0]
    if not shared:
        return []
    step, tokens, _, ppl = shared[-1]
    ref_ppl = at_step[step][3]
    return [f"- `{row['poet_flags']}` (cut short at step {row['steps_done']} of "
            f"{row['steps']}: {row['status']}): at step {step} ({tokens / 1e6:.1f} M tokens) "
            f"{ppl:.2f} against the reference's {ref_ppl:.2f} at that step "
            f"({ppl / ref_ppl - 1:+.1%})."]


def share_ratios(rows: list[dict[str, Any]]) -> list[float]:
    """For each run that shared its GPU and has a speed measured alone (its own or an alike
    run's): tokens over its share of the GPU's time, over that speed (1: sharing cost
    nothing)."""
    ratios = []
    for row in rows:
        if (row.get("runs_on_gpu_max") or 1) > 1 and row.get("gpu_share_s"):
            speed, source = alone_speed(row, rows)
            if speed and source != "share":
                ratios.append(row["tokens_seen"] / row["gpu_share_s"] / speed)
    return ratios


def sharing_section(rows: list[dict[str, Any]]) -> list[str]:
    """A table of the runs that shared a GPU: their share of its time against running alone.

    ``tokens / gpu_share_s`` is what a run would do alone if sharing neither added nor lost
    throughput; set against a speed measured alone (its own or an alike run's) it says which.
    """
    shared = [r for r in rows if (r.get("runs_on_gpu_max") or 1) > 1 and r.get("gpu_share_s")]
    if not shared:
        return []
    ratios = share_ratios(rows)
    out = ["## Sharing one GPU (measured)", "",
           "| run | device | most runs at once | mean runs | tokens / GPU share (tokens/s) "
           "| tokens/s alone (source) | share / alone |", "|---|---|---|---|---|---|---|"]
    for row in shared:
        share_speed = row["tokens_seen"] / row["gpu_share_s"]
        speed, source = alone_speed(row, rows)
        if source == "share":
            speed = None
        ratio = share_speed / speed if speed else None
        out.append(f"| {row['name']} | {row['device']} | {row['runs_on_gpu_max']} | "
                   f"{_fmt(row.get('runs_on_gpu_mean'))} | {share_speed:,.0f} | "
                   + (f"{speed:,.0f} ({source}) | {ratio:.2f} |" if speed else "– | – |"))
    out.append("")
    if ratios:
        verdict = ("lost throughput: one run at a time would have been faster"
                   if max(ratios) < 1 else "did not lose throughput everywhere")
        out += [f"Runs sharing the GPU did {min(ratios):.2f}-{max(ratios):.2f} of the work "
                f"per second of their share that a run alone does: sharing {verdict}. "
                "(Without MPS, processes on one GPU are time-sliced: their kernels do not run "
                "at the same time, so sharing can only fill gaps, and switching costs time.)",
                ""]
    return out


def comparison(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements of how POET-X compares with AdamW in the finished sweep runs."""
    lines = []
    for preset in PRESET_LRS:
        done = [r for r in rows if r["preset"] == preset and r["group"] == "sweep"
                and r.get("status") == "done"]
        by_opt = {opt: [r for r in done if r["optimizer"] == opt] for opt in ("poetx", "adamw")}
        missing = [s.name for s in study() if s.preset == preset and s.group == "sweep"
                   and s.name not in {r["name"] for r in done}]
        if not by_opt["poetx"] or not by_opt["adamw"]:
            lines.append(f"- {preset}: no comparison yet (runs not done: "
                         f"{', '.join(missing) or 'none'}).")
            continue
        best = {opt: min(rs, key=lambda r: r["best_val_ppl"]) for opt, rs in by_opt.items()}
        p, a = best["poetx"], best["adamw"]
        ratio = p["best_val_ppl"] / a["best_val_ppl"]
        if missing:
            verdict = ("under the target's 1.03 so far, but the sweep is incomplete, so the "
                       "target is not shown")
        else:
            verdict = "meets the target (<= 1.03)" if ratio <= 1.03 else "misses the target"
        line = (f"- {preset}: best validation perplexity POET-X {p['best_val_ppl']:.2f} "
                f"(lr {p['lr']:g}) against AdamW {a['best_val_ppl']:.2f} (lr {a['lr']:g}), "
                f"ratio {ratio:.3f}: {verdict}; loss spikes {p['loss_spikes']} against "
                f"{a['loss_spikes']}.")
        mid = {opt: {c[0]: c[3] for c in best[opt]["curve"]} for opt in best}
        half = best["adamw"]["steps"] // 2
        if half in mid["poetx"] and half in mid["adamw"]:
            leader = "AdamW" if mid["adamw"][half] < mid["poetx"][half] else "POET-X"
            line += (f" Halfway (step {half}) {leader} leads: AdamW {mid['adamw'][half]:.2f}, "
                     f"POET-X {mid['poetx'][half]:.2f}.")
        device = speed_device(rows, preset)
        speeds = {opt: alone_speed(best[opt], rows, device) for opt in best}
        if device and speeds["poetx"][0] and speeds["adamw"][0]:
            (ps, p_src), (as_, a_src) = speeds["poetx"], speeds["adamw"]
            shared = ""
            if "share" in (p_src, a_src):
                ratios = share_ratios(rows)
                shared = " (from GPU shares, not measured alone" + (
                    f"; in the same study a GPU share gave {min(ratios):.2f}-{max(ratios):.2f}"
                    " of the speed alone" if ratios else "") + ")"
            line += (f" Alone on one {device.split(' (')[0]} POET-X trains at {ps:,.0f} "
                     f"tokens/s, AdamW at {as_:,.0f} ({ps / as_:.2f} x){shared}.")
            # POET-X's perplexity when AdamW's run is over, at the speeds above
            at = a["tokens_seen"] / as_ * ps
            curve = [(c[1], c[3]) for c in p["curve"] if c[0] > 0]
            before = [c for c in curve if c[0] <= at]
            after = [c for c in curve if c[0] >= at]
            if before and after:
                (t0, y0), (t1, y1) = before[-1], after[0]
                y = y0 if t1 == t0 else math.exp(math.log(y0) + (math.log(y1) - math.log(y0))
                                                  * (at - t0) / (t1 - t0))
                side = "behind" if y > a["final_val_ppl"] else "not behind"
                line += (f" In the GPU time AdamW's run takes, POET-X reaches {y:.1f} (AdamW "
                         f"{a['final_val_ppl']:.2f}): per second of GPU, POET-X is {side}.")
        if missing:
            line += (f" Incomplete sweep (not done: {', '.join(missing)}), so an optimum at "
                     "an untried learning rate is not excluded.")
        for opt, label in (("poetx", "POET-X"), ("adamw", "AdamW")):
            grid = sorted({r["lr"] for r in by_opt[opt]})
            if len(grid) > 1 and best[opt]["lr"] in (grid[0], grid[-1]):
                side = "largest" if best[opt]["lr"] == grid[-1] else "smallest"
                line += (f" {label}'s best is at the {side} learning rate of its grid "
                         f"({best[opt]['lr']:g}), so its optimum may lie beyond it.")
        lines.append(line)
    return lines


def report(results: Path, doc: Path, plot_dir: Path) -> None:
    rows = list(load_results(results).values())
    order = {spec.name: i for i, spec in enumerate(study())}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    plots = plot(rows, plot_dir) if rows else []
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_doc(rows, plots))
    print(f"wrote {doc}" + "".join(f", {p}" for p in plots))


def print_plan(specs: list[RunSpec], data: Path, runs_dir: Path, gpus: int,
               speed_scale: float = 1.0) -> None:
    """Each run's estimate alone and the total; ``gpus`` counts distinct GPUs."""
    speeds = measured_tokens_per_s()
    total = 0.0
    for spec in specs:
        seconds = estimate_seconds(spec, speeds, speed_scale)
        total += seconds
        print(f"{seconds / 60:5.1f} min  {spec.name:20s} "
              + shown_command(spec.command(data, runs_dir), "cpu"))
    print(f"total {total / 60:.0f} GPU-minutes, {total / 60 / gpus:.0f} minutes on {gpus} GPUs "
          f"({len(specs)} runs of {TOKENS / 1e6:.1f} M tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "plan"):
        p = sub.add_parser(name)
        p.add_argument("--gpus", default="0",
                       help="comma-separated GPU ids, one per concurrent run ('0,0' runs two "
                       "at once on GPU 0), or 'cpu'")
        p.add_argument("--speed-scale", type=float, default=1.0,
                       help="this GPU's speed relative to the H200 measurements the budget's "
                       "estimates use (e.g. 0.8 for an H100)")
        p.add_argument("--data", default=str(ROOT / ".cache" / "gpu-corpus"),
                       help="folder of train/val token files and tokenizer.json")
        p.add_argument("--runs-dir", default=str(ROOT / "runs" / "quality"))
        p.add_argument("--only", default=None, help="comma-separated run names (default all)")
        p.add_argument("--results", default=str(RESULTS))
        p.add_argument("--budget-s", type=float, default=None,
                       help="start no run that would not end within this many seconds")
        p.add_argument("--steps", type=int, default=STEPS, help="steps per run (tests)")
        p.add_argument("--preset", default=None, help="replace every run's preset (tests)")
        p.add_argument("extra", nargs="*", help="extra `poetx train` flags, after --")
    p = sub.add_parser("report")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--plots", default=str(PLOTS))
    args = parser.parse_args(argv)
    if args.command == "report":
        report(Path(args.results), Path(args.doc), Path(args.plots))
        return 0
    specs = study()
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {s.name for s in specs})
        if unknown:
            parser.error(f"unknown runs: {', '.join(unknown)}")
        specs = [s for s in specs if s.name in names]
    if args.steps != STEPS or args.preset:
        specs = [dataclasses.replace(s, steps=args.steps, preset=args.preset or s.preset)
                 for s in specs]
    gpus = args.gpus.split(",")
    if args.command == "plan":
        print_plan(specs, Path(args.data), Path(args.runs_dir), len(set(gpus)),
                   args.speed_scale)
        return 0
    data = Path(args.data)
    if not (data / "tokenizer.json").is_file():
        parser.error(f"{data} holds no tokenizer.json: run `poetx data unpack {data}` first")
    run_queue(specs, gpus, data, Path(args.runs_dir), Path(args.results), args.budget_s,
              args.extra, speed_scale=args.speed_scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
