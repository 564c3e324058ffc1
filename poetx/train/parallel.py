"""Data parallelism for ``poetx train`` under ``torchrun``: one process group, one scheme.

``torchrun --nproc-per-node N -m poetx.cli.main train ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`init_distributed` reads them (a plain ``python -m`` run is world 1 and
touches nothing of ``torch.distributed``). The Trainer asks :func:`parallelize` for its module
and, for ``ddp``, calls a :class:`GradientAllReduce` after the backward; it knows nothing else.

``ddp`` (replicated data parallelism) is ours, not torch's ``DistributedDataParallel``: after
the last micro-batch's backward, every trainable gradient and the loss are averaged in ONE
all-reduce of one flat buffer. POET-X's trainable state (skew parameters, norms, embeddings,
``lm_head``) is small, so overlapping buckets with the backward gains little, while a step
without autograd hooks can be recorded whole, all-reduce included, as one CUDA graph (NCCL
collectives are capturable after one eager call; DDP's reducer is not), which is what makes
the step fast. The frozen ``W0`` and every buffer (permutations, merge counters) never cross:
every rank builds them from the same seeds and merges on the same step with the same seeded
permutations, and :func:`check_ranks_agree` verifies that after each merge.

``fsdp`` shards parameters with FSDP2 (:mod:`poetx.train.fsdp`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from poetx.model.wrap import poet_layers


class RankDisagreement(RuntimeError):
    """Ranks hold different frozen weights or permutations: the run is no longer one model."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world`` processes (``local_rank`` on its host).

    World 1 is an ordinary single-process run; every collective below is then a no-op.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module initialized the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks in place (AVG is NCCL-only; SUM works on gloo too)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (a picklable object, e.g. a folder name)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on one (e.g. a Ctrl-C seen by one rank)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. training a tokenizer, writing a cache), the other
        ranks after it, when they find its results."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device_name: str) -> tuple[DistContext, str]:
    """Join the process group that ``torchrun`` describes in the environment.

    Returns the context and the device to use: ``cuda:LOCAL_RANK`` when ``device_name`` is
    ``auto``/``cuda`` and CUDA exists, else ``device_name``. Backend NCCL on CUDA, gloo on CPU.
    Without ``WORLD_SIZE`` (or with 1) nothing is initialized.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device_name
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name.startswith("cuda:"):
        raise ValueError(
            f"device: {device_name!r} under torchrun; pass --device cuda (each rank takes "
            f"cuda:LOCAL_RANK)"
        )
    if use_cuda:
        device_name = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif device_name == "auto":
        device_name = "cpu"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError("torch.distributed was initialized with another world than torchrun's")
    return DistContext(rank, world, local_rank, owns), device_name


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def resolve_parallel(parallel: str, ctx: DistContext, fits_replicated: bool | None = None) -> str:
    """The data-parallel scheme for ``--parallel`` in this world.

    One process: always ``none``. ``auto`` with several: ``ddp`` (replicas, fastest) unless
    ``fits_replicated`` is False (the planner's estimate of one replica's training memory
    exceeds the device), then ``fsdp``; ``None`` (not known, e.g. on CPU) means ``ddp``.
    """
    if not ctx.distributed:
        return "none"
    if parallel in ("ddp", "fsdp"):
        return parallel
    if parallel == "none":
        raise ValueError("parallel: none with several processes would train unsynchronized "
                         "replicas; use ddp or fsdp")
    return "fsdp" if fits_replicated is False else "ddp"


def parallelize(module: nn.Module, scheme: str, ctx: DistContext) -> nn.Module:
    """The training module for ``scheme``: ``module`` itself (``none``, ``ddp``: replicas whose
    gradients :class:`GradientAllReduce` averages) or its FSDP2-sharded self (``fsdp``).

    ``ddp`` starts every replica from rank 0's trainable parameters (they are built from the
    same seeds already; the broadcast makes that a guarantee, as DDP's start-up broadcast).
    """
    if scheme == "none":
        return module
    if scheme == "ddp":
        if ctx.distributed:
            with torch.no_grad():
                for p in module.parameters():
                    if p.requires_grad:
                        dist.broadcast(p.data, src=0)
        return module
    if scheme == "fsdp":
        from poetx.train.fsdp import shard_model

        return shard_model(module)
    raise ValueError(f"parallelize: unknown scheme {scheme!r}")


class GradientAllReduce:
    """Average the gradients of ``params`` and a loss over the ranks: one all-reduce.

    Call after the backward of the step's last micro-batch; returns the mean loss (0-d). No
    host synchronization and fixed shapes, so it can be recorded in a CUDA graph with the
    rest of the step. The flat buffer is float32 (float64 when a parameter is float64):
    bf16 gradients are summed in float32 and rounded once, as a float32 ``reduce_dtype``.
    A parameter without a gradient on this step contributes zeros (every rank sends the same
    layout). World 1: returns ``loss`` and touches nothing.
    """

    def __init__(self, params: list[nn.Parameter], ctx: DistContext) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.ctx = ctx
        self.reduce_dtype = (torch.float64 if any(p.dtype == torch.float64 for p in self.params)
                             else torch.float32)
        self.numels = [p.numel() for p in self.params]

    @torch.no_grad()
    def __call__(self, loss: Tensor) -> Tensor:
        if not self.ctx.distributed:
            return loss
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1).to(self.reduce_dtype) for g in grads]
                         + [loss.detach().reshape(1).to(self.reduce_dtype)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.ctx.world)
        pieces = [piece.view_as(g) for piece, g in zip(flat[:-1].split(self.numels), grads,
                                                       strict=True)]
        same = [i for i, g in enumerate(grads) if g.dtype == self.reduce_dtype]
        if same:
            torch._foreach_copy_([grads[i] for i in same], [pieces[i] for i in same])
        for i, g in enumerate(grads):
            if g.dtype != self.reduce_dtype:  # bf16 gradients: rounded once, here
                g.copy_(pieces[i])
        return flat[-1].to(loss.dtype)


@torch.no_grad()
def frozen_fingerprint(model: nn.Module, rows: int = 2) -> str:
    """A hash of the first ``rows`` rows of each POET layer's ``W0`` (unless sharded) and its
    permutations.

    Cheap (a few KiB per layer leave the device) and sensitive to any difference a merge could
    make: wrong permutations or a diverged ``W0`` change the bytes.
    """
    digest = hashlib.sha256()
    for name, layer in poet_layers(model):
        digest.update(name.encode())
        # A sharded W0 (fsdp) is one copy split over the ranks, not replicas: only the
        # permutations and counters, which every rank holds whole, must agree.
        w0 = [] if hasattr(layer.w0, "to_local") else [layer.w0[:rows]]
        for t in (*w0, layer.perm_in, layer.perm_out, layer.merge_count):
            digest.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(model: nn.Module, ctx: DistContext, step: int) -> None:
    """Raise :class:`RankDisagreement` unless every rank holds the same frozen state."""
    if not ctx.distributed:
        return
    mine = frozen_fingerprint(model)
    every: list[str | None] = [None] * ctx.world
    dist.all_gather_object(every, mine)
    if len(set(every)) != 1:
        differing = [r for r, h in enumerate(every) if h != every[0]]
        raise RankDisagreement(
            f"after the merge at step {step}, rank(s) {differing} hold other W0/permutations "
            f"than rank 0: the replicas diverged (nondeterministic merge or different seeds)"
        )
