"""The training loop shared by ``--optimizer poetx`` and ``--optimizer adamw``.

Both optimizers go through the same code: same data order, same loss function, same
evaluation batches, same clipping and schedule machinery. The only differences are the
``poetx.wrap`` of the model, the POET parameter group and the merge schedule.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poetx import MergeSchedule, make_optimizer
from poetx.atomic import write_json_atomic
from poetx.model.llama import count_parameters
from poetx.train.checkpoint import (
    load_model_state,
    load_optimizer_state,
    read_state,
    restore_rng,
    save_checkpoint,
)
from poetx.train.config import TrainConfig
from poetx.train.device import resolve_device, resolve_dtype
from poetx.train.evaluate import evaluate
from poetx.train.loss import batch_tokens, compute_loss
from poetx.train.metrics import (
    METRICS_FILE,
    MetricsLogger,
    Progress,
    peak_memory_gib,
    truncate_metrics,
)
from poetx.train.run_dir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    TOKENIZER_FILE,
    RunDirError,
    claim_run_dir,
)
from poetx.train.run_model import build_run_model
from poetx.train.schedule import build_scheduler, load_scheduler_state, scheduler_state

# A run whose every step is non-finite is broken, not unlucky: stop even with --skip-nonfinite.
MAX_CONSECUTIVE_SKIPS = 20


class TrainError(Exception):
    """A run stopped for a reason the user has to act on; the message says what and how."""


class NonFiniteError(TrainError):
    """The loss or the gradient norm was NaN/inf at ``step``."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class TrainInterrupted(TrainError):
    """Ctrl-C: the run stopped after saving a checkpoint (``checkpoint`` is None if none was)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class RunResult:
    """What a finished ``train`` call did."""

    run_dir: Path
    step: int
    first_eval: dict[str, float] | None
    last_eval: dict[str, float] | None
    checkpoint: Path | None
    seconds: float


OOM_HINT = (
    "out of GPU memory. Try --mode mem (recompute instead of storing the POET intermediate), "
    "a smaller --batch-size, --w0-format int8 (int8 frozen weights), or --grad-checkpointing"
)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class _StopFlag:
    """Ctrl-C sets a flag that the loop checks between steps, so the model, optimizer and
    schedules are never saved half-updated. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


def _check_run_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """The run directory (see ``poetx.train.run_dir.claim_run_dir``)."""
    try:
        return claim_run_dir(cfg, resuming)
    except RunDirError as e:
        raise TrainError(str(e)) from None


def _build_data(cfg: TrainConfig, run_dir: Path, resuming: bool):
    """The run's data; nothing is written to ``run_dir`` (a bad ``--data`` leaves no trace)."""
    from poetx.data.dataset import DEFAULT_VAL_BATCHES, build_data

    tokenizer = cfg.tokenizer
    if resuming and tokenizer is None and (run_dir / TOKENIZER_FILE).is_file():
        # The run's own copy: the data cache may have been cleared since.
        tokenizer = str(run_dir / TOKENIZER_FILE)
    try:
        return build_data(
            cfg.data, cfg.seq_len, cfg.batch_size, cfg.seed, vocab_size=cfg.vocab_size,
            cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
            tokenizer_path=Path(tokenizer) if tokenizer else None, run_dir=None,
            max_val_batches=cfg.eval_batches or DEFAULT_VAL_BATCHES,
        )
    except (FileNotFoundError, ValueError):
        raise
    except RuntimeError as e:  # corpus download / optional dependency problems
        raise TrainError(f"data: {e}") from e


def _data_fingerprint(data) -> dict[str, int]:
    return {"train_tokens": int(data.train_tokens), "val_tokens": int(data.val_tokens),
            "vocab_size": int(data.vocab_size)}


def _lr_of(optimizer: torch.optim.Optimizer, group_name: str) -> float | None:
    for g in optimizer.param_groups:
        if g.get("name") == group_name:
            return float(g["lr"])
    return None


def train(cfg: TrainConfig, resume_from: Path | None = None) -> RunResult:
    """Run (or continue from ``resume_from``) the training described by ``cfg``.

    Raises:
        TrainError: bad run directory, data problem, CUDA OOM (with hints).
        NonFiniteError: NaN/inf loss or gradient norm (unless ``cfg.skip_nonfinite``).
        TrainInterrupted: Ctrl-C; a checkpoint of the last finished step was saved.
        CheckpointError: a checkpoint could not be written or read.
    """
    try:
        return _train(cfg, resume_from)
    except torch.OutOfMemoryError as e:
        raise TrainError(OOM_HINT) from e


def _save_tokenizer(tokenizer, run_dir: Path) -> None:
    from poetx.data.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, run_dir)


def _train(cfg: TrainConfig, resume_from: Path | None) -> RunResult:
    started = time.perf_counter()
    resuming = resume_from is not None
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    run_dir = _check_run_dir(cfg, resuming)
    ckpt_root = run_dir / CHECKPOINT_DIR

    seed_everything(cfg.seed)
    data = _build_data(cfg, run_dir, resuming)
    run_dir.mkdir(parents=True, exist_ok=True)
    if data.tokenizer is not None:
        _save_tokenizer(data.tokenizer, run_dir)
    model = build_run_model(cfg, data.vocab_size, device, dtype)
    model.train()
    optimizer = make_optimizer(model, lr=cfg.lr, poet_lr=cfg.poet_lr,
                               weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    merge = (MergeSchedule(model, optimizer, cfg.poet, cfg.clip_warmup_steps,
                           cfg.clip_warmup_start) if cfg.optimizer == "poetx" else None)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    start_step = 0
    tokens_seen = 0
    if resume_from is not None:
        state = read_state(resume_from)
        load_model_state(resume_from, model)
        load_optimizer_state(resume_from, optimizer, state)
        load_scheduler_state(scheduler, state["lr_scheduler"])
        if merge is not None:
            merge.load_state_dict(state["merge_schedule"])
        restore_rng(resume_from, state)
        start_step = int(state["step"])
        tokens_seen = int(state.get("tokens", start_step * cfg.tokens_per_step))
        saved_data = state.get("data", {})
        now = _data_fingerprint(data)
        then = {k: saved_data.get(k) for k in now}
        if then != now:
            # Same settings but other tokens (the file changed, another tokenizer): the run goes
            # on, but it is no longer the continuation of one data stream.
            print(f"warning: the data differ from the checkpoint's: {then} now {now}",
                  flush=True)
        if start_step >= cfg.steps:
            print(f"{resume_from} is at step {start_step}, the run has {cfg.steps} steps: "
                  f"nothing to do (raise --steps to continue training)", flush=True)
            return RunResult(run_dir, start_step, None, None, resume_from,
                             time.perf_counter() - started)
        # The steps after the checkpoint are re-done: one history in metrics.jsonl.
        truncate_metrics(run_dir / METRICS_FILE, start_step)

    write_json_atomic(run_dir / CONFIG_FILE, cfg.to_dict())
    logger = MetricsLogger(run_dir, cfg.tensorboard,
                           purge_step=start_step + 1 if resuming else None)
    total, trainable = count_parameters(model)
    dtype_name = str(dtype).removeprefix("torch.")
    header = (
        f"poetx train: {cfg.preset} with {cfg.optimizer} on {device} ({dtype_name}); "
        f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable; "
        f"{cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens\n"
        f"data: {data.description}\nrun dir: {run_dir}"
    )
    print(header, flush=True)
    if resuming:
        print(f"resumed from {resume_from} (step {start_step})", flush=True)
        logger.event(start_step, "resume", str(resume_from))
    else:
        logger.event(0, "start", header, parameters=total, trainable=trainable)

    progress = Progress(cfg.steps, start_step, cfg.progress)
    first_eval: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None
    last_saved: Path | None = resume_from
    last_saved_step = start_step if resuming else -1
    last_eval_step = -1
    step = start_step
    consecutive_skips = 0

    def run_eval(at: int) -> dict[str, float]:
        nonlocal last_eval_step
        result = evaluate(model, data.val, device, cfg.eval_batches)
        logger.log({"type": "eval", "step": at, **result, "tokens": tokens_seen})
        progress.write(f"step {at}: val_loss {result['val_loss']:.4f}  "
                       f"val_ppl {result['val_ppl']:.2f}")
        last_eval_step = at
        return result

    saving = False

    def save(at: int) -> Path:
        nonlocal last_saved, last_saved_step, saving
        state = {
            "config": cfg.to_dict(),
            "dtype": dtype_name,
            "data": {"next_batch": at, "seed": cfg.seed, "description": data.description,
                     **_data_fingerprint(data)},
            "tokens": tokens_seen,
            "lr_scheduler": scheduler_state(scheduler),
            "merge_schedule": merge.state_dict() if merge is not None else None,
        }
        saving = True
        path = save_checkpoint(ckpt_root, at, model, optimizer, state, keep_last=cfg.keep_last)
        saving = False
        logger.event(at, "checkpoint", str(path))
        progress.write(f"step {at}: saved {path}")
        last_saved, last_saved_step = path, at
        return path

    def nonfinite(at: int, what: str, value: float) -> None:
        good = f"the last checkpoint, {last_saved.name}, is intact" if last_saved else \
            "no checkpoint was saved yet"
        message = (f"non-finite {what} ({value}) at step {at}: stopping ({good}; "
                   f"--skip-nonfinite skips such steps instead)")
        logger.event(at, "nonfinite", message)
        raise NonFiniteError(message, at)

    with _StopFlag() as stop:
        # "phase" tells a KeyboardInterrupt raised inside a step (not through the flag) whether
        # the state already changed: only "forward" (nothing updated yet) is safe to save.
        phase = "idle"
        try:
            if not resuming and cfg.eval_at_start:
                first_eval = run_eval(0)
            for step_i in range(start_step + 1, cfg.steps + 1):
                phase = "forward"
                t0 = time.perf_counter()
                batch = data.train.batch(step_i - 1).to(device, non_blocking=True)
                loss = compute_loss(model, batch)
                loss_value = float(loss.detach())
                skipped = False
                grad_norm_value = math.nan
                clip = merge.clip_value(cfg.max_grad_norm) if merge else cfg.max_grad_norm
                if not math.isfinite(loss_value):
                    if not cfg.skip_nonfinite:
                        nonfinite(step_i, "loss", loss_value)
                    skipped = True
                else:
                    loss.backward()
                    if clip > 0:
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
                    else:
                        grad_norm = torch.nn.utils.get_total_norm(
                            [p.grad for p in params if p.grad is not None], foreach=True)
                    grad_norm_value = float(grad_norm)
                    if not math.isfinite(grad_norm_value):
                        if not cfg.skip_nonfinite:
                            nonfinite(step_i, "gradient norm", grad_norm_value)
                        skipped = True
                lr_used = _lr_of(optimizer, "decay") or float(optimizer.param_groups[0]["lr"])
                poet_lr_used = _lr_of(optimizer, "poet")
                phase = "update"
                if not skipped:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # Schedules follow the global step even on a skipped step.
                scheduler.step()
                merged = merge.step() if merge is not None else False
                tokens_seen += batch_tokens(batch)
                step = step_i
                phase = "idle"
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                consecutive_skips = consecutive_skips + 1 if skipped else 0
                mem = peak_memory_gib(device)
                record = {
                    "type": "train", "step": step_i, "loss": loss_value, "lr": lr_used,
                    "grad_norm": grad_norm_value, "clip": clip, "tokens": tokens_seen,
                    "tokens_per_s": batch_tokens(batch) / dt, "peak_mem_gib": mem,
                    "step_s": dt, "elapsed_s": time.perf_counter() - started,
                    "skipped": skipped,
                }
                if merge is not None:
                    record.update(poet_lr=poet_lr_used, merged=merged)
                logger.log(record)
                progress.update(loss_value, record["tokens_per_s"], lr_used, mem)
                if skipped:
                    progress.write(f"step {step_i}: non-finite loss or gradient, step skipped")
                    if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                        nonfinite(step_i, f"values in {consecutive_skips} consecutive steps",
                                  loss_value)
                if cfg.eval_every and step_i % cfg.eval_every == 0:
                    last_eval = run_eval(step_i)
                if cfg.save_every and step_i % cfg.save_every == 0:
                    save(step_i)
                if stop.requested:
                    raise KeyboardInterrupt
            if last_eval_step != step:
                last_eval = run_eval(step)
            if last_saved_step != step:
                save(step)
        except KeyboardInterrupt:
            saved: Path | None = None
            if saving:
                pass  # Ctrl-C during a save means "abort now"; the save cleaned up after itself
            elif phase in ("idle", "forward") and last_saved_step != step:
                # The model holds exactly the state after ``step``: safe to save it.
                optimizer.zero_grad(set_to_none=True)
                saved = save(step)
            elif last_saved_step == step:
                saved = last_saved
            logger.event(step, "interrupted", f"checkpoint {saved}")
            where = (f"checkpoint {saved}" if saved else
                     "no checkpoint (interrupted while updating; the previous one is intact)")
            raise TrainInterrupted(
                f"interrupted after step {step}; {where}; continue with --resume --out {run_dir}",
                step, saved,
            ) from None
        finally:
            progress.close()
            logger.close()

    seconds = time.perf_counter() - started
    summary = f"done: step {step} in {seconds:.1f} s"
    if first_eval and last_eval:
        summary += f"; val_ppl {first_eval['val_ppl']:.2f} -> {last_eval['val_ppl']:.2f}"
    elif last_eval:
        summary += f"; val_ppl {last_eval['val_ppl']:.2f}"
    print(summary + f"; checkpoint {last_saved}", flush=True)
    return RunResult(run_dir, step, first_eval, last_eval, last_saved, seconds)
