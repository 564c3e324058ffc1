"""The training loop shared by ``--optimizer poetx`` and ``--optimizer adamw``.

Both optimizers go through the same code: same data order, same loss function, same
evaluation batches, same clipping and schedule machinery. The only differences are the
``poetx.wrap`` of the model, the POET parameter group and the merge schedule.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poetx.model.llama import count_parameters
from poetx.train.checkpoint import (
    clean_stale,
    list_checkpoints,
    read_state,
    resolve_resume,
)
from poetx.train.config import (
    TrainConfig,
    build_config,
    load_toml,
    merge_settings,
    resume_config,
)
from poetx.train.errors import NonFiniteError, TrainError, TrainInterrupted
from poetx.train.metrics import METRICS_FILE, MetricsLogger, truncate_metrics
from poetx.train.parallel import (
    DistContext,
    check_ranks_agree,
    init_distributed,
    resolve_parallel,
    shutdown_distributed,
)
from poetx.train.runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    TOKENIZER_FILE,
    build_run_model,
    resolve_device,
    resolve_dtype,
    write_json_atomic,
)
from poetx.train.trainer import RunResult, Trainer, data_fingerprint

__all__ = ["NonFiniteError", "RunResult", "TrainError", "TrainInterrupted", "Trainer",
           "config_from_sources", "train"]

OOM_HINT = (
    "out of GPU memory. Try --mode mem (recompute instead of storing the POET intermediate), "
    "a smaller --batch-size (with --grad-accum to keep the global batch), --w0-format int8 "
    "(int8 frozen weights), or --grad-checkpointing"
)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def config_from_sources(config_file: str | None, overrides: dict[str, Any],
                        resume: bool | str | None = None) -> tuple[TrainConfig, Path | None]:
    """The run's config and, when resuming, the checkpoint to resume from.

    Fresh run: preset defaults < TOML < flags. Resumed run (``resume`` True for the newest
    checkpoint of ``--out``, or a checkpoint path): the checkpoint's config < TOML < flags.
    """
    if not resume:
        return build_config(config_file, overrides), None
    settings = dict(overrides)
    if config_file is not None:
        settings = merge_settings(load_toml(config_file), overrides)
    requested = resume if isinstance(resume, str) else None
    if requested is None:
        out = settings.get("out") or (
            f"runs/{settings.get('preset', 'tiny')}-{settings.get('optimizer', 'poetx')}"
        )
        settings["out"] = out
        root = Path(out) / CHECKPOINT_DIR
    else:
        root = Path(requested).parent
    ckpt = resolve_resume(root, requested)
    saved = read_state(ckpt)["config"]
    if requested is not None and "out" not in settings:
        settings["out"] = str(Path(requested).parent.parent)
    return resume_config(saved, settings), ckpt


def _check_run_dir(cfg: TrainConfig, resuming: bool) -> Path:
    """The run directory, refused if it already holds another run (created later)."""
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"--out {run_dir} exists and is not a directory")
    if not resuming:
        taken = [run_dir / CONFIG_FILE] + [p for _, p in list_checkpoints(run_dir / CHECKPOINT_DIR)]
        existing = [p for p in taken if p.exists()]
        if existing:
            raise TrainError(
                f"{run_dir} already holds a run ({existing[0].name}); pass --resume to continue "
                f"it, or choose another --out"
            )
    return run_dir


def _build_data(cfg: TrainConfig, run_dir: Path, resuming: bool, global_batch: int):
    """The run's data in batches of ``global_batch`` rows (every rank's rows of a step), so the
    data order does not depend on the number of processes; nothing is written to ``run_dir``
    (a bad ``--data`` leaves no trace)."""
    from poetx.data.dataset import DEFAULT_VAL_BATCHES, build_data

    tokenizer = cfg.tokenizer
    if resuming and tokenizer is None and (run_dir / TOKENIZER_FILE).is_file():
        # The run's own copy: the data cache may have been cleared since.
        tokenizer = str(run_dir / TOKENIZER_FILE)
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
    scheme = resolve_parallel(cfg.parallel, ctx)
    run_dir = _check_run_dir(cfg, resuming)
    ctx.barrier()  # every rank has looked at the run dir before rank 0 writes into it
    global_batch = cfg.batch_size * cfg.grad_accum * ctx.world

    seed_everything(cfg.seed)
    with ctx.main_first():  # tokenizer training and cache writes happen once, on rank 0
        data = _build_data(cfg, run_dir, resuming, global_batch)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(run_dir / CHECKPOINT_DIR)
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
            f"data: {data.description}\nrun dir: {run_dir}"
        )
        print(header, flush=True)
        if resuming:
            print(f"resumed from {resume_from} (step {trainer.step})", flush=True)
            logger.event(trainer.step, "resume", str(resume_from))
        else:
            logger.event(0, "start", header, parameters=total, trainable=trainable,
                         global_batch=global_batch, world_size=ctx.world)

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
