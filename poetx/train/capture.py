"""Whole-training-step CUDA graphs: forward, backward and optimizer step replayed as one graph.

A POET-X step launches a few dozen small kernels per layer; in eager mode the host, not the
GPU, sets the pace. :class:`CapturedStep` records one step of a step function into a CUDA
graph after a few eager warm-up calls and replays it for every later call, so the host cost of
a step is one graph launch and one batch copy.

What the step function must satisfy (all true for :func:`train_step` with a model built by
poetx, ``make_optimizer(..., capturable=True)`` and :class:`~poetx.optim.clip.DeviceGradClip`):

* no host synchronization (``.item()``, ``int(tensor)``, boolean-mask indexing, data-dependent
  shapes), no CPU tensors updated per step;
* every tensor it reads that changes between steps is changed in place (learning rates as
  device tensors, the clipping threshold, merges: ``W0``, permutations, skew parameters and
  optimizer state are all overwritten in place by ``MergeSchedule``);
* inputs other than the batch have fixed shapes; the batch has the shape of ``example_batch``.

Outputs of a replayed step live in the graph's memory and are overwritten by the next call:
read (or clone) them before calling again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from poetx.optim.clip import DeviceGradClip

StepFn = Callable[[Tensor], Any]


class CapturedStep:
    """``step(batch)`` that runs ``step_fn`` eagerly for the first ``warmup`` calls (on a side
    stream, as CUDA graph capture wants: lazy state, workspaces and Triton compilation happen
    there), captures the next call into a CUDA graph and replays the graph from then on.

    Every call is exactly one step of ``step_fn`` on that call's ``batch``; the capturing call
    also runs its step (by replaying the graph right after recording it). ``batch`` is copied
    into a static buffer of ``example_batch``'s shape, dtype and device.
    ``share_batch=True``: ``example_batch`` itself is the static buffer (the caller refills it
    before each call and passes it), so no copy is made.
    ``enabled=False`` (or a CPU batch when ``enabled`` is ``None``) calls ``step_fn`` directly.
    ``release`` (e.g. ``lambda: optimizer.zero_grad(set_to_none=True)``) is called just before
    recording: it should drop what the last eager step left allocated and the recorded step
    allocates anew, the gradients above all. Memory the caching allocator still holds for the
    regular pool cannot serve the graph's private pool, so without it the capture needs the
    gradients' size twice over (15 GiB more for AdamW at Llama-8B, the likely cause of its
    out-of-memory when captured on 80 GB; not yet confirmed on a GPU).
    """

    def __init__(self, step_fn: StepFn, example_batch: Tensor, warmup: int = 3,
                 enabled: bool | None = None, share_batch: bool = False,
                 release: Callable[[], None] | None = None) -> None:
        if warmup < 1:
            raise ValueError(f"warmup: at least one eager step must precede capture, got {warmup}")
        self.step_fn = step_fn
        self.release = release
        self.warmup = warmup
        self.enabled = example_batch.is_cuda if enabled is None else enabled
        if self.enabled and not example_batch.is_cuda:
            raise ValueError("CapturedStep: CUDA graphs need a CUDA batch")
        self.static_batch = None
        if self.enabled:
            self.static_batch = example_batch if share_batch else torch.empty_like(example_batch)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        self.calls = 0
        # One side stream for the warm-up steps and the capture: cuBLAS keeps a workspace per
        # stream it ran on, for the life of the process, so a new stream per warm-up step would
        # leave one more workspace behind each time.
        self.side_stream = torch.cuda.Stream(example_batch.device) if self.enabled else None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def invalidate(self) -> None:
        """Drop the graph; the next call records a new one. Call it after anything replaced
        (rather than overwrote) a tensor the step reads: loading optimizer state from a
        checkpoint, changing parameter groups, moving the model."""
        self.graph = None
        self.outputs = None
        self.calls = max(self.calls, self.warmup)

    def __call__(self, batch: Tensor) -> Any:
        if not self.enabled:
            self.calls += 1
            return self.step_fn(batch)
        if batch.shape != self.static_batch.shape or batch.dtype != self.static_batch.dtype:
            raise ValueError(
                f"CapturedStep: batch {tuple(batch.shape)} {batch.dtype} differs from the "
                f"captured {tuple(self.static_batch.shape)} {self.static_batch.dtype}"
            )
        if batch is not self.static_batch:
            self.static_batch.copy_(batch, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        elif self.calls < self.warmup:
            side = self.side_stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.outputs = self.step_fn(self.static_batch)
            torch.cuda.current_stream().wait_stream(side)
        else:
            self._capture()
        self.calls += 1
        return self.outputs

    def _capture(self) -> None:
        torch.cuda.synchronize()
        self.outputs = None
        if self.release is not None:
            self.release()
        # Blocks cached by the eager warm-up cannot serve the graph's private pool: give them
        # back to the driver, from which the pool allocates.
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a background thread's CUDA calls (a logger, a data thread) do not
        # invalidate the capture; only this thread's are checked.
        with torch.cuda.graph(graph, stream=self.side_stream, capture_error_mode="thread_local"):
            self.outputs = self.step_fn(self.static_batch)
        self.graph = graph
        graph.replay()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[nn.Module, Tensor], Tensor],
    clip: DeviceGradClip | None = None,
) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
    """The plain step ``batch -> (loss, grad_norm)`` (0-d device tensors; ``grad_norm`` is
    ``None`` without ``clip``): zero grads, forward, backward, clip, optimizer step.

    Merges, LR schedules and logging happen between calls. With ``clip`` a non-finite gradient
    skips the update on the device; the caller sees it as a non-finite ``grad_norm``.
    """

    def step(batch: Tensor) -> tuple[Tensor, Tensor | None]:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        norm = clip() if clip is not None else None
        optimizer.step()
        return loss.detach(), norm

    return step
