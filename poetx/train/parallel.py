"""Data parallelism for ``poetx train`` under ``torchrun``: one process group, one wrap.

``torchrun --nproc-per-node N -m poetx.cli.main train ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`init_distributed` reads them (a plain ``python -m`` run is world 1 and
touches nothing of ``torch.distributed``). :func:`parallelize` is the one place where the
training module is wrapped; the Trainer applies it and knows nothing else about DDP.

What DDP synchronizes here: only the trainable parameters' gradients (skew parameters, norms,
embeddings, ``lm_head``). The frozen ``W0`` (``requires_grad=False``) and every buffer
(permutations, merge counters) are excluded from DDP's start-up broadcast and its per-forward
buffer broadcast: every rank builds them from the same seeds and merges on the same step with
the same seeded permutations, and :func:`check_ranks_agree` verifies that after each merge.
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


def resolve_parallel(parallel: str, ctx: DistContext) -> str:
    """The data-parallel scheme for ``--parallel`` in this world.

    ``auto``: ``none`` in one process, else ``ddp`` (the model is replicated; FSDP2 sharding
    is not implemented yet, so ``auto`` never picks it). ``ddp`` in one process is ``none``.
    """
    if parallel == "fsdp":
        raise ValueError("parallel: fsdp (FSDP2 sharding) is not implemented yet; use ddp")
    if not ctx.distributed:
        return "none"
    return "ddp"


def rank_local_state_names(module: nn.Module) -> list[str]:
    """Names DDP must leave alone: parameters that never train (``W0``, its quantization
    scales) and every buffer (permutations, merge counters, rotary tables)."""
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    return frozen + [name for name, _ in module.named_buffers()]


def parallelize(module: nn.Module, scheme: str, device: torch.device) -> nn.Module:
    """The training module for ``scheme``: ``module`` itself (``none``) or a DDP wrapper.

    ``module`` computes the loss in its forward (``CausalLMWithLoss``), so DDP's reducer sees
    every trainable parameter's gradient. Frozen parameters and all buffers are excluded from
    DDP (no start-up broadcast, no per-forward buffer broadcast, the effect of
    ``broadcast_buffers=False`` without its deprecation): nothing of ``W0`` ever crosses.
    """
    if scheme == "none":
        return module
    if scheme != "ddp":
        raise ValueError(f"parallelize: unknown scheme {scheme!r}")
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, rank_local_state_names(module)
    )
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def no_sync(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` on every micro-batch but the ``last`` (gradients accumulate locally
    and are all-reduced once); a plain context elsewhere."""
    if last or not isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


@torch.no_grad()
def frozen_fingerprint(model: nn.Module, rows: int = 2) -> str:
    """A hash of the first ``rows`` rows of each POET layer's ``W0`` and its permutations.

    Cheap (a few KiB per layer leave the device) and sensitive to any difference a merge could
    make: wrong permutations or a diverged ``W0`` change the bytes.
    """
    digest = hashlib.sha256()
    for name, layer in poet_layers(model):
        digest.update(name.encode())
        for t in (layer.w0[:rows], layer.perm_in, layer.perm_out, layer.merge_count):
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
