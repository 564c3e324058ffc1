"""``train``: set a run up (process group, run directory, data, model) and hand it to the
``Trainer``.

Both optimizers go through the same code: same data order, same loss function, same
evaluation batches, same clipping and schedule machinery. The only differences are the
``poetx.wrap`` of the model, the POET parameter group and the merge schedule. Under
``torchrun`` every rank runs this function; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from poetx.atomic import write_json_atomic
from poetx.model.llama import count_parameters
from poetx.plan.fit import fits_replicated
from poetx.train.config import TrainConfig
from poetx.train.device import resolve_device, resolve_dtype
from poetx.train.errors import NonFiniteError, TrainError, TrainInterrupted
from poetx.train.metrics import METRICS_FILE, MetricsLogger, truncate_metrics
from poetx.train.parallel import (
    DistContext,
    check_ranks_agree,
    init_distributed,
    resolve_parallel,
    shutdown_distributed,
)
from poetx.train.run_dir import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    RunDirError,
    claim_run_dir,
)
from poetx.train.run_model import build_run_model, check_pretrained_dir
from poetx.train.trainer import RunResult, Trainer, data_fingerprint

__all__ = ["NonFiniteError", "RunResult", "TrainError", "TrainInterrupted", "Trainer", "train"]

OOM_HINT = (
    "out of GPU memory. Try --mode mem (recompute instead of storing the POET intermediate), "
    "a smaller --batch-size (with --grad-accum to keep the global batch), --w0-format int8 "
    "(int8 frozen weights), or --grad-checkpointing"
)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _check_run_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """The run directory (see ``poetx.train.run_dir.claim_run_dir``)."""
    try:
        return claim_run_dir(cfg, resuming)
    except RunDirError as e:
        raise TrainError(str(e)) from None


def _build_data(cfg: TrainConfig, run_dir: Path, resuming: bool, global_batch: int):
    """The run's data in batches of ``global_batch`` rows (every rank's rows of a step), so the
    data order does not depend on the number of processes; nothing is written to ``run_dir``
    (a bad ``--data`` leaves no trace)."""
    from poetx.data.dataset import DEFAULT_VAL_BATCHES, build_data

    tokenizer = cfg.tokenizer
    if resuming and tokenizer is None and (run_dir / TOKENIZER_FILE).is_file():
        # The run's own copy: the data cache may have been cleared since.
        tokenizer = str(run_dir / TOKENIZER_FILE)
    if cfg.init_from is not None:
        check_pretrained_dir(cfg.init_from)  # before any data work
        if tokenizer is None:
            tokenizer = cfg.init_from  # the checkpoint's tokenizer.json
    try:
        return build_data(
            cfg.data, cfg.seq_len, global_batch, cfg.seed, vocab_size=cfg.vocab_size,
            cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
            tokenizer_path=Path(tokenizer) if tokenizer else None, run_dir=None,
            max_val_batches=cfg.eval_batches or DEFAULT_VAL_BATCHES,
        )
    except (FileNotFoundError, ValueError):
        raise
    except RuntimeError as e:  # corpus download / optional dependency problems
        raise TrainError(f"data: {e}") from e


def train(cfg: TrainConfig, resume_from: Path | None = None) -> RunResult:
    """Run (or continue from ``resume_from``) the training described by ``cfg``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process calls this; the process group is
    created here and torn down at the end.

    Raises:
        TrainError: bad run directory, data problem, CUDA OOM (with hints).
        NonFiniteError: NaN/inf loss or gradient norm (unless ``cfg.skip_nonfinite``).
        TrainInterrupted: Ctrl-C; a checkpoint of the last finished step was saved.
        CheckpointError: a checkpoint could not be written or read.
    """
    ctx, device_name = init_distributed(cfg.device)
    try:
        return _train(cfg, resume_from, ctx, device_name)
    except torch.OutOfMemoryError as e:
        raise TrainError(OOM_HINT) from e
    finally:
        shutdown_distributed(ctx)


def _check_fits(cfg: TrainConfig, device: torch.device, distributed: bool) -> None:
    """Refuse, before anything is allocated, a run the planner predicts will not fit."""
    from poetx.plan.fit import check_fits
    from poetx.plan.memory import GIB

    budget = None if cfg.gpu_mem is None else int(cfg.gpu_mem * GIB)
    try:
        check_fits(cfg, device, budget, distributed)
    except ValueError as e:
        raise TrainError(f"{e} (--no-fit-check runs it anyway)") from None


def _save_tokenizer(tokenizer, run_dir: Path) -> None:
    from poetx.data.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, run_dir)


def _train(cfg: TrainConfig, resume_from: Path | None, ctx: DistContext,
           device_name: str) -> RunResult:
    started = time.perf_counter()
    resuming = resume_from is not None
    device = resolve_device(device_name)
    dtype = resolve_dtype(cfg.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    # auto: replicas (ddp) when one replica fits the device by the planner's estimate, else
    # FSDP2 shards (fsdp).
    fits = fits_replicated(cfg, device) if ctx.distributed and cfg.parallel == "auto" else None
    scheme = resolve_parallel(cfg.parallel, ctx, fits)
    if cfg.fit_check and scheme != "fsdp":  # the planner predicts one replica, not a shard
        _check_fits(cfg, device, ctx.distributed)
    with ctx.main_first():  # rank 0 cleans up the directory; the others then find it clean
        run_dir = _check_run_dir(cfg, resuming)
    global_batch = cfg.batch_size * cfg.grad_accum * ctx.world

    seed_everything(cfg.seed)
    with ctx.main_first():  # tokenizer training and cache writes happen once, on rank 0
        data = _build_data(cfg, run_dir, resuming, global_batch)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if data.tokenizer is not None:
            _save_tokenizer(data.tokenizer, run_dir)
    model = build_run_model(cfg, data.vocab_size, device, dtype)
    model.train()
    trainer = Trainer(cfg, model, data, device, ctx, scheme)
    check_ranks_agree(model, ctx, 0)

    if resume_from is not None:
        state = trainer.restore(resume_from)
        saved_data = state.get("data", {})
        now = data_fingerprint(data)
        then = {k: saved_data.get(k) for k in now}
        if then != now and ctx.is_main:
            # Same settings but other tokens (the file changed, another tokenizer): the run goes
            # on, but it is no longer the continuation of one data stream.
            print(f"warning: the data differ from the checkpoint's: {then} now {now}",
                  flush=True)
        if trainer.step >= cfg.steps:
            if ctx.is_main:
                print(f"{resume_from} is at step {trainer.step}, the run has {cfg.steps} steps: "
                      f"nothing to do (raise --steps to continue training)", flush=True)
            return RunResult(run_dir, trainer.step, None, None, resume_from,
                             time.perf_counter() - started)
        if ctx.is_main:
            # The steps after the checkpoint are re-done: one history in metrics.jsonl.
            truncate_metrics(run_dir / METRICS_FILE, trainer.step)

    logger = None
    if ctx.is_main:
        derived = {"world_size": ctx.world, "global_batch": global_batch, "parallel": scheme,
                   "tokens_per_step": global_batch * cfg.seq_len}
        write_json_atomic(run_dir / CONFIG_FILE, {**cfg.to_dict(), "derived": derived})
        logger = MetricsLogger(run_dir, cfg.tensorboard,
                               purge_step=trainer.step + 1 if resuming else None)
        total, trainable = count_parameters(model)
        where = f"{device}" if ctx.world == 1 else f"{ctx.world} x {device.type} ({scheme})"
        header = (
            f"poetx train: {cfg.preset} with {cfg.optimizer} on {where} ({dtype_name}); "
            f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable; "
            f"{cfg.steps} steps x {global_batch} x {cfg.seq_len} tokens (global batch "
            f"{global_batch} = batch {cfg.batch_size} x grad accum {cfg.grad_accum} x "
            f"{ctx.world} processes)\n"
            f"data: {data.description}\nstep: {trainer.describe_step()}\nrun dir: {run_dir}"
        )
        print(header, flush=True)
        if resuming:
            print(f"resumed from {resume_from} (step {trainer.step})", flush=True)
            logger.event(trainer.step, "resume", str(resume_from), pid=os.getpid())
        else:
            logger.event(0, "start", header, parameters=total, trainable=trainable,
                         global_batch=global_batch, world_size=ctx.world,
                         pid=os.getpid())

    result = trainer.fit(run_dir, logger, resume_from, dtype_name, started)
    if ctx.is_main:
        summary = f"done: step {result.step} in {result.seconds:.1f} s"
        if result.first_eval and result.last_eval:
            summary += (f"; val_ppl {result.first_eval['val_ppl']:.2f} -> "
                        f"{result.last_eval['val_ppl']:.2f}")
        elif result.last_eval:
            summary += f"; val_ppl {result.last_eval['val_ppl']:.2f}"
        print(summary + f"; checkpoint {result.checkpoint}", flush=True)
    return result
