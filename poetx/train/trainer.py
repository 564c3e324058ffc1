"""The ``Trainer``: a capturable training step, and between steps everything else.

``train_step(batch)`` is one function of static-shaped device tensors: forward and backward of
every micro-batch, gradient norm and clipping, the NaN/inf decision and the optimizer update,
with no host synchronization (no ``.item()``, no branch on a device value). A step with a
non-finite loss or gradient norm is skipped on the device: the fused AdamW reads
``optimizer.found_inf`` and neither moves a parameter nor counts the step. That makes the step
something CUDA graphs or ``torch.compile`` can wrap from outside (``self.step_fn``; on CUDA
it is replayed as a CUDA graph, ``cfg.cuda_graphs``, also under ``ddp``, where the one gradient
all-reduce of the step is part of the graph; not under ``fsdp``).

Between steps, in :meth:`Trainer.fit`: the learning-rate schedule (written in place into device
tensors), the merge schedule, evaluation, checkpoints, and reading the step metrics, which
happens every ``cfg.metrics_every`` steps (one wait for the device for that many steps). A
non-finite step seen there still stops the run naming that step (or is logged as skipped with
``--skip-nonfinite``); nothing is saved before the metrics of every earlier step were read.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from poetx import MergeSchedule, make_optimizer
from poetx.layers.rotation_groups import AccumulatedRotations
from poetx.model.causal_lm import CausalLMWithLoss
from poetx.model.compile_blocks import compile_blocks
from poetx.model.wrap import merge_all_, poet_layers, rotation_norm_max
from poetx.optim.clip import DeviceGradClip
from poetx.optim.in_backward import StepInBackward, embedding_and_head
from poetx.optim.optimizer import DECAY_GROUP, POET_GROUP
from poetx.train.capture import CapturedStep
from poetx.train.checkpoint import (
    checkpoint_name,
    load_model_state,
    load_optimizer_state,
    read_state,
    restore_rng,
    save_checkpoint,
    save_sharded_checkpoint,
)
from poetx.train.config import TrainConfig
from poetx.train.errors import NonFiniteError, TrainError, TrainInterrupted
from poetx.train.evaluate import evaluate
from poetx.train.fsdp import merge_sharded_
from poetx.train.loss import batch_tokens, compute_loss
from poetx.train.metrics import MetricsLogger, Progress, peak_memory_gib
from poetx.train.parallel import DistContext, GradientAllReduce, check_ranks_agree, parallelize
from poetx.train.run_dir import CHECKPOINT_DIR
from poetx.train.schedule import build_scheduler, load_scheduler_state, scheduler_state

# A run whose every step is non-finite is broken, not unlucky: stop even with --skip-nonfinite.
MAX_CONSECUTIVE_SKIPS = 20


@dataclass
class RunResult:
    """What a finished ``train`` call did."""

    run_dir: Path
    step: int
    first_eval: dict[str, float] | None
    last_eval: dict[str, float] | None
    checkpoint: Path | None
    seconds: float


@dataclass
class _Pending:
    """A finished step whose device metrics were not read yet."""

    step: int
    values: Tensor  # (4,) float32 on the device: loss, grad_norm, nonfinite, q_norm_max
    lr: float
    poet_lr: float | None
    clip: float
    merged: bool
    tokens: int


class _NullLogger:
    """What ranks other than 0 log: nothing."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def event(self, step: int, event: str, message: str = "", **extra: Any) -> None:
        pass

    def close(self) -> None:
        pass


class StopFlag:
    """Ctrl-C sets a flag that the loop checks between steps, so the model, optimizer and
    schedules are never saved half-updated. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopFlag:
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


class Trainer:
    """One run's model, optimizer, schedules and step; :meth:`fit` runs the steps.

    Args:
        cfg: the run's settings; ``cfg.batch_size`` rows per micro-batch, ``cfg.grad_accum``
            micro-batches per step and rank.
        model: the causal LM (already wrapped by ``poetx.wrap`` for a poetx run) on ``device``.
        data: a ``DataBundle`` whose ``train`` batches hold the *global* batch
            (``batch_size x grad_accum x world`` rows); each rank takes its contiguous share.
        ctx: this process's place in the data-parallel world; scheme: ``none``, ``ddp``
            (replicas, one gradient all-reduce per step) or ``fsdp`` (FSDP2 shards).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, data, device: torch.device,
                 ctx: DistContext | None = None, scheme: str = "none") -> None:
        self.cfg = cfg
        self.model = model
        self.data = data
        self.device = device
        self.ctx = ctx or DistContext()
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.ctx.world
        if data.train.batch_size != self.global_batch:
            raise ValueError(f"data: batches of {data.train.batch_size} rows, the global batch "
                             f"is {self.global_batch}")
        self.tokens_per_step = self.global_batch * cfg.seq_len
        # The loss lives in the wrapped module's forward, so DDP sees the whole computation.
        self.scheme = scheme
        self.loss_module = CausalLMWithLoss(model)
        self.train_module = parallelize(self.loss_module, scheme, self.ctx)
        if scheme == "fsdp" and device.type == "cuda":
            # Each rank built the whole model before sharding it: count the peak from here.
            torch.cuda.reset_peak_memory_stats(device)
        # Fused AdamW: one kernel per device and dtype, a device-side skip (found_inf), an lr
        # tensor; it runs on CPU too, so the CPU suite tests the same update as the GPU runs.
        # One CUDA graph per step where it applies: one process, or replicas (the gradient
        # all-reduce is recorded in the graph); FSDP2's hooks are not captured. Only torch's
        # fused AdamW (bf16 dense states, float32 rotation states) is capturable; the other
        # dense optimizers run eager steps.
        capturable_optimizer = cfg.dense_optimizer == "adamw" and cfg.rotation_states == "fp32"
        # The exact Cayley map solves batched linear systems, and at 256-blocks cuSOLVER's
        # batched LU is not capturable ("operation not permitted when stream is capturing",
        # H100, torch 2.11): those runs step eagerly.
        self.exact_cayley = cfg.optimizer == "poetx" and cfg.poet.neumann_terms is None
        self.graphs = (cfg.cuda_graphs and device.type == "cuda" and scheme != "fsdp"
                       and capturable_optimizer and not self.exact_cayley)
        # Not under activation checkpointing: torch.utils.checkpoint disables dynamo for the
        # blocks it runs, so they would stay eager anyway (tests/test_compile_blocks.py).
        self.compiled_blocks = (compile_blocks(model) if self.graphs and cfg.compile_blocks
                                and cfg.optimizer == "poetx" and not cfg.grad_checkpointing
                                else 0)
        # Eager CUDA steps use the capturable kernel too: its update rounds differently from
        # the non-capturable one (lr and bias correction as float32 device values), so with
        # it --no-cuda-graphs replays the captured run's numbers (measured: bitwise equal over
        # the first steps, bench/results/capture_diff.md) instead of drifting apart from step 2.
        capturable = self.graphs or (device.type == "cuda" and scheme != "fsdp"
                                     and capturable_optimizer)
        self.optimizer = make_optimizer(model, lr=cfg.lr, poet_lr=cfg.poet_lr,
                                        weight_decay=cfg.weight_decay, fused=True,
                                        capturable=capturable,
                                        dense_optimizer=cfg.dense_optimizer,
                                        rotation_8bit=cfg.rotation_states == "8bit")
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.steps,
                                         cfg.min_lr_ratio)
        # Sharded layers merge one at a time, gathered (poetx.train.fsdp).
        merge_fn = merge_sharded_ if scheme == "fsdp" else merge_all_
        self.merge = (MergeSchedule(model, self.optimizer, cfg.poet, cfg.clip_warmup_steps,
                                    cfg.clip_warmup_start, merge=merge_fn)
                      if cfg.optimizer == "poetx" else None)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.poet_layers = [layer for _, layer in poet_layers(model)]
        self.grad_sync = GradientAllReduce(self.params, self.ctx) if scheme == "ddp" else None
        self._group_index = {g.get("name"): i for i, g in enumerate(self.optimizer.param_groups)}
        # Learning rates as device tensors, updated in place by the scheduler (a captured step
        # keeps reading the same memory).
        self._lr_tensors = [torch.zeros((), dtype=torch.float32, device=device)
                            for _ in self.optimizer.param_groups]
        self._install_lr_tensors()
        # Clipping and the skip are applied by the fused AdamW kernel (grad_scale, found_inf).
        self.clip = DeviceGradClip(self.optimizer, self.params, cfg.max_grad_norm)
        self._max_norm_value = cfg.max_grad_norm
        # Embedding and lm_head stepped inside backward, clipped per tensor at the same
        # (shared, in place) threshold.
        self.in_backward: StepInBackward | None = None
        if cfg.step_in_backward:
            if cfg.grad_accum != 1 or self.ctx.distributed:
                raise TrainError(
                    f"step_in_backward: needs one backward per step in one process (a hook "
                    f"would step on a partial or unreduced gradient); this run has grad accum "
                    f"{cfg.grad_accum} and {self.ctx.world} processes; pass "
                    f"--no-step-in-backward")
            self.in_backward = StepInBackward(self.optimizer, embedding_and_head(model),
                                              self.clip.max_norm)
        shape = (cfg.grad_accum, cfg.batch_size, cfg.seq_len + 1)
        self.batch = torch.zeros(shape, dtype=torch.int64, device=device)
        on_cuda = device.type == "cuda"
        self._host_batch = torch.zeros(shape, dtype=torch.int64, pin_memory=True) \
            if on_cuda else self.batch
        self._copied = torch.cuda.Event() if on_cuda else None
        self.step = 0
        self.tokens = 0
        # "forward" while nothing of the current step is applied, "update" once the optimizer
        # may have changed the state: a KeyboardInterrupt in the step saves only in "forward".
        self.phase = "idle"
        # The function the loop calls each step: train_step, or its CUDA-graph replay on the
        # static self.batch (recorded at the 4th call; merges and schedules change tensors in
        # place, so the graph stays valid).
        self.step_fn = self.train_step
        self.captured: CapturedStep | None = None
        if self.graphs:
            self.captured = CapturedStep(self.train_step, self.batch, warmup=3,
                                         share_batch=True, release=self._release_grads)
            self.step_fn = self._replay_step

    def describe_step(self) -> str:
        """How the step runs, for the run's header."""
        if not self.graphs:
            if self.exact_cayley and self.cfg.cuda_graphs and self.device.type == "cuda":
                return "eager (the exact Cayley map's batched solve cannot be captured)"
            return "eager"
        text = f"one CUDA graph, recorded after {self.captured.warmup} eager steps"
        if self.compiled_blocks:
            text += (f"; {self.compiled_blocks} decoder blocks compiled around their POET layers "
                     "(the first step compiles them)")
        return text

    def _release_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _replay_step(self, batch: Tensor) -> dict[str, Tensor]:
        metrics = self.captured(batch)
        self.phase = "update"  # set inside train_step, which a replay does not run
        return metrics

    # the step ------------------------------------------------------------------------------
    def train_step(self, batch: Tensor) -> dict[str, Tensor]:
        """One optimizer step on ``batch`` ``(grad_accum, batch_size, seq_len + 1)``.

        Returns 0-dim device tensors ``loss`` (mean over the global batch), ``grad_norm``
        (before clipping) and ``nonfinite`` (bool: the update was skipped). No host sync.
        """
        self.optimizer.zero_grad(set_to_none=True)
        micro = batch.shape[0]
        total: Tensor | None = None
        # The rotation blocks are built once for all micro-batches and differentiated once, in
        # the last micro-batch's backward (so before the all-reduce, and inside FSDP2's hooks).
        with AccumulatedRotations(self.poet_layers, micro) as rotations:
            for k in range(micro):
                rotations.micro_batch(k)
                loss = compute_loss(self.train_module, batch[k])
                if self.in_backward is not None:
                    self.in_backward.begin(loss)
                (loss / micro if micro > 1 else loss).backward()
                total = loss.detach() if total is None else total + loss.detach()
        loss = total / micro if micro > 1 else total
        # Gradients accumulate locally over the micro-batches and cross once, here.
        if self.grad_sync is not None:
            loss = self.grad_sync(loss)
        elif self.ctx.distributed:  # fsdp: gradients were reduce-scattered in the backward
            loss = self.ctx.all_reduce_sum(loss.clone()) / self.ctx.world
        grad_norm = self.clip(self.in_backward.sq_norm if self.in_backward is not None else None)
        # Same on every rank: the loss is all-reduced and the gradients are. A NaN loss with
        # finite gradients (possible with ignored tokens only) skips the step too.
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.clip.found_inf.copy_(nonfinite)
        self.phase = "update"
        with self._optimizer_context():
            self.optimizer.step()
        return {"loss": loss, "grad_norm": grad_norm, "nonfinite": nonfinite}

    def _optimizer_context(self) -> contextlib.AbstractContextManager:
        # Sharded (DTensor) parameters meet plain 0-d tensors in the fused step (lr,
        # grad_scale, found_inf, step counts): they are the same on every rank, i.e. replicated.
        if self.scheme == "fsdp":
            from torch.distributed.tensor.experimental import implicit_replication

            return implicit_replication()
        return contextlib.nullcontext()

    def load_batch(self, step: int) -> Tensor:
        """Copy this rank's rows of global batch ``step`` (0-based) into ``self.batch``."""
        per_rank = self.cfg.batch_size * self.cfg.grad_accum
        rows = slice(self.ctx.rank * per_rank, (self.ctx.rank + 1) * per_rank)
        host = self.data.train.batch(step, rows).view(self.batch.shape)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy out of the pinned buffer is done
        self._host_batch.copy_(host)
        if self._copied is not None:
            self.batch.copy_(self._host_batch, non_blocking=True)
            self._copied.record()
        return self.batch

    # between steps --------------------------------------------------------------------------
    def _install_lr_tensors(self) -> None:
        """Make every group's ``lr`` its device tensor (after a load put a float there)."""
        for group, tensor in zip(self.optimizer.param_groups, self._lr_tensors, strict=True):
            if group["lr"] is not tensor:
                tensor.fill_(float(group["lr"]))
                group["lr"] = tensor

    def lr_of(self, group: str) -> float | None:
        """The host value of a group's current learning rate (no device read): what the
        scheduler last wrote, ``base_lr x multiplier(last_epoch)``."""
        i = self._group_index.get(group)
        if i is None:
            return None
        return float(self.scheduler.base_lrs[i]) * self.scheduler.lr_lambdas[i](
            self.scheduler.last_epoch)

    def _clip_for_next_step(self) -> float:
        clip = self.merge.clip_value(self.cfg.max_grad_norm) if self.merge else \
            self.cfg.max_grad_norm
        if clip != self._max_norm_value:
            self.clip.set_max_norm(clip)
            self._max_norm_value = clip
        return clip

    def _advance_schedules(self, step: int) -> bool:
        """LR and merge schedules after ``step`` (also after a skipped step: they follow the
        global step). Returns whether the layers merged; ranks are checked to agree."""
        self.scheduler.step()
        merged = self.merge.step() if self.merge is not None else False
        if merged:
            check_ranks_agree(self.model, self.ctx, step)
        return merged

    def checkpoint_state(self, dtype_name: str) -> dict[str, Any]:
        data = self.data
        return {
            "config": self.cfg.to_dict(),
            "dtype": dtype_name,
            "data": {"next_batch": self.step, "seed": self.cfg.seed,
                     "description": data.description, "global_batch": self.global_batch,
                     **data_fingerprint(data)},
            "tokens": self.tokens,
            "lr_scheduler": scheduler_state(self.scheduler),
            "merge_schedule": self.merge.state_dict() if self.merge is not None else None,
        }

    def restore(self, path: Path) -> dict[str, Any]:
        """Load model, optimizer, schedules and RNG from checkpoint ``path``; returns its state.

        The global batch must be the saved one (the data order is defined per global batch);
        the number of processes and the accumulation may differ.
        """
        state = read_state(path)
        saved_global = int(state.get("data", {}).get(
            "global_batch", state["config"]["batch_size"]))
        if saved_global != self.global_batch:
            raise TrainError(
                f"{path} was trained with a global batch of {saved_global} sequences, this run "
                f"has {self.global_batch} (batch size {self.cfg.batch_size} x grad accum "
                f"{self.cfg.grad_accum} x {self.ctx.world} processes); choose --batch-size and "
                f"--grad-accum so that the product matches"
            )
        load_model_state(path, self.model)
        load_optimizer_state(path, self.optimizer, state)
        self._install_lr_tensors()
        if self.captured is not None:  # the loaded state is new tensors
            self.captured.invalidate()
        load_scheduler_state(self.scheduler, state["lr_scheduler"])
        if self.merge is not None:
            self.merge.load_state_dict(state["merge_schedule"])
        restore_rng(path, state)
        self.step = int(state["step"])
        self.tokens = int(state.get("tokens", self.step * self.tokens_per_step))
        return state

    # the loop ------------------------------------------------------------------------------
    def fit(self, run_dir: Path, logger: MetricsLogger | None, resumed_from: Path | None,
            dtype_name: str, started: float) -> RunResult:
        """Train from ``self.step`` to ``cfg.steps`` with evaluation, checkpoints and metrics.

        ``logger`` is None on ranks other than 0 (they neither log nor write).
        """
        return _Fit(self, run_dir, logger, resumed_from, dtype_name, started).run()


def data_fingerprint(data) -> dict[str, int]:
    return {"train_tokens": int(data.train_tokens), "val_tokens": int(data.val_tokens),
            "vocab_size": int(data.vocab_size)}


class _Fit:
    """The state of one :meth:`Trainer.fit` call: metrics not read yet, last save and eval."""

    def __init__(self, trainer: Trainer, run_dir: Path, logger: MetricsLogger | None,
                 resumed_from: Path | None, dtype_name: str, started: float) -> None:
        self.t = trainer
        self.cfg = trainer.cfg
        self.run_dir = run_dir
        self.ckpt_root = run_dir / CHECKPOINT_DIR
        self.main = trainer.ctx.is_main
        self.logger = logger if logger is not None else _NullLogger()
        self.dtype_name = dtype_name
        self.started = started
        self.resumed_from = resumed_from
        self.progress = Progress(self.cfg.steps, trainer.step, self.cfg.progress and self.main)
        self.pending: list[_Pending] = []
        self.window_start = time.perf_counter()
        self.consecutive_skips = 0
        self.last_saved = resumed_from
        self.last_saved_step = trainer.step if resumed_from is not None else -1
        self.last_eval_step = -1
        self.saving = False

    # metrics ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Read the pending steps' metrics (one wait for the device) and write their rows."""
        if not self.pending:
            return
        values = torch.stack([p.values for p in self.pending]).cpu().tolist()
        seconds = time.perf_counter() - self.window_start
        mem = peak_memory_gib(self.t.device)
        pending, self.pending = self.pending, []
        # Steps read together share their mean time (no per-step sync to time them apart).
        step_s = seconds / len(pending)
        for p, (loss, grad_norm, nonfinite, q_norm) in zip(pending, values, strict=True):
            skipped = bool(nonfinite)
            if skipped and not self.cfg.skip_nonfinite:
                what = "loss" if not _finite(loss) else "gradient norm"
                self.nonfinite(p.step, what, loss if what == "loss" else grad_norm)
            self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
            record = self.train_record(p, loss, grad_norm, skipped, step_s, mem, q_norm)
            self.logger.log(record)
            self.progress.update(loss, record["tokens_per_s"], p.lr, mem)
            if skipped:
                self.progress.write(f"step {p.step}: non-finite loss or gradient, step skipped")
                if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    self.nonfinite(p.step, f"values in {self.consecutive_skips} consecutive "
                                   f"steps", loss)
        self.window_start = time.perf_counter()

    def train_record(self, p: _Pending, loss: float, grad_norm: float, skipped: bool,
                     step_s: float, mem: float, q_norm: float = 0.0) -> dict[str, Any]:
        """The one place where a "train" row of metrics.jsonl is built."""
        record = {
            "type": "train", "step": p.step, "loss": loss, "lr": p.lr,
            "grad_norm": grad_norm, "clip": p.clip, "tokens": p.tokens,
            "tokens_per_s": self.t.tokens_per_step / step_s, "peak_mem_gib": mem,
            "step_s": step_s, "elapsed_s": time.perf_counter() - self.started,
            "skipped": skipped,
        }
        if self.t.merge is not None:
            record.update(poet_lr=p.poet_lr, merged=p.merged, q_norm_max=q_norm)
        return record

    def nonfinite(self, at: int, what: str, value: float) -> None:
        good = f"the last checkpoint, {self.last_saved.name}, is intact" if self.last_saved \
            else "no checkpoint was saved yet"
        message = (f"non-finite {what} ({value}) at step {at}: stopping ({good}; "
                   f"--skip-nonfinite skips such steps instead)")
        self.logger.event(at, "nonfinite", message)
        raise NonFiniteError(message, at)

    # between steps --------------------------------------------------------------------------
    def run_eval(self, at: int) -> dict[str, float]:
        result = evaluate(self.t.loss_module, self.t.data.val, self.t.device, self.cfg.eval_batches,
                          ctx=self.t.ctx, micro_batch=self.cfg.batch_size)
        self.logger.log({"type": "eval", "step": at, **result, "tokens": self.t.tokens})
        if self.main:
            self.progress.write(f"step {at}: val_loss {result['val_loss']:.4f}  "
                                f"val_ppl {result['val_ppl']:.2f}")
        self.last_eval_step = at
        return result

    def save(self, at: int) -> Path | None:
        """Write the checkpoint of step ``at``; every rank waits for it. A sharded (fsdp) run
        saves sharded, every rank writing its own shards; otherwise rank 0 writes it."""
        path = None
        t = self.t
        self.saving = True
        if t.scheme == "fsdp":
            path = save_sharded_checkpoint(self.ckpt_root, at, t.model, t.optimizer,
                                           t.checkpoint_state(self.dtype_name), t.ctx,
                                           keep_last=self.cfg.keep_last)
        elif self.main:
            path = save_checkpoint(self.ckpt_root, at, t.model, t.optimizer,
                                   t.checkpoint_state(self.dtype_name),
                                   keep_last=self.cfg.keep_last)
        self.saving = False
        if self.main:
            self.logger.event(at, "checkpoint", str(path))
            self.progress.write(f"step {at}: saved {path}")
        t.ctx.barrier()
        self.last_saved, self.last_saved_step = path or self.ckpt_root / checkpoint_name(at), at
        return self.last_saved

    def run(self) -> RunResult:
        t, cfg = self.t, self.cfg
        first_eval = last_eval = None
        with StopFlag() as stop:
            try:
                try:
                    if self.resumed_from is None and cfg.eval_at_start:
                        first_eval = self.run_eval(0)
                    self.window_start = time.perf_counter()
                    for step_i in range(t.step + 1, cfg.steps + 1):
                        t.phase = "forward"
                        clip = t._clip_for_next_step()
                        lr = t.lr_of(DECAY_GROUP) or t.lr_of(t.optimizer.param_groups[0]["name"])
                        poet_lr = t.lr_of(POET_GROUP)
                        batch = t.load_batch(step_i - 1)
                        metrics = t.step_fn(batch)
                        # Largest block ||Q||_F, read before a merge zeroes Q (on device).
                        q_norm = (rotation_norm_max(t.model).to(metrics["loss"].device)
                                  if t.merge is not None else metrics["loss"].new_zeros(()))
                        values = torch.stack([metrics["loss"].float(),
                                              metrics["grad_norm"].float(),
                                              metrics["nonfinite"].float(), q_norm.float()])
                        merged = t._advance_schedules(step_i)
                        t.tokens += batch_tokens(batch) * t.ctx.world
                        t.step = step_i
                        t.phase = "idle"
                        self.pending.append(_Pending(step_i, values, lr, poet_lr, clip, merged,
                                                     t.tokens))
                        eval_due = bool(cfg.eval_every) and step_i % cfg.eval_every == 0
                        save_due = bool(cfg.save_every) and step_i % cfg.save_every == 0
                        boundary = (eval_due or save_due or step_i == cfg.steps
                                    or len(self.pending) >= cfg.metrics_every)
                        if boundary:
                            self.flush()
                        if eval_due:
                            last_eval = self.run_eval(step_i)
                        if save_due:
                            self.save(step_i)
                        if eval_due or save_due:
                            self.window_start = time.perf_counter()
                        # Ranks must stop after the same step: they agree at metric boundaries
                        # (a collective); one process stops at once.
                        if t.ctx.distributed:
                            stop_now = boundary and t.ctx.any(stop.requested)
                        else:
                            stop_now = stop.requested
                        if stop_now:
                            raise KeyboardInterrupt
                    if self.last_eval_step != t.step:
                        last_eval = self.run_eval(t.step)
                    if self.last_saved_step != t.step:
                        self.save(t.step)
                except KeyboardInterrupt:
                    self.interrupted()
            finally:
                self.progress.close()
                self.logger.close()
        return RunResult(self.run_dir, t.step, first_eval, last_eval, self.last_saved,
                         time.perf_counter() - self.started)

    def interrupted(self) -> None:
        t = self.t
        saved: Path | None = None
        if self.saving:
            pass  # Ctrl-C during a save means "abort now"; the save cleaned up after itself
        elif t.phase in ("idle", "forward") and self.last_saved_step != t.step:
            # The model holds exactly the state after ``t.step``: safe to save it, once the
            # metrics of the steps before it are written (and known to be finite).
            self.flush()
            t.optimizer.zero_grad(set_to_none=True)
            saved = self.save(t.step)
        elif self.last_saved_step == t.step:
            saved = self.last_saved
        self.logger.event(t.step, "interrupted", f"checkpoint {saved}")
        where = (f"checkpoint {saved}" if saved else
                 "no checkpoint (interrupted while updating; the previous one is intact)")
        raise TrainInterrupted(
            f"interrupted after step {t.step}; {where}; continue with --resume --out "
            f"{self.run_dir}", t.step, saved,
        ) from None


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))
