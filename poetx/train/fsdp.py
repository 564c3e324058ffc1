"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``poetx train --parallel fsdp``.

Sharding (every parameter along its first dimension over all ranks of the world):

* each decoder block's ``POETLinear`` layers form ONE group: their frozen ``W0`` (bf16, int8 or
  fp8, plus int8/fp8 scales) and their float32 skew parameters. FSDP2 asks one original dtype
  of the *trainable* parameters of a group: only the float32 skew parameters train there
  (``W0`` is frozen), so the rule holds; the all-gather carries the mixed dtypes as bytes.
* the rest of each block (its norms, in the model's dtype) is the block's own group;
* the root group: embedding, final norm and ``lm_head`` (the module whose forward computes the
  loss, :class:`~poetx.model.causal_lm.CausalLMWithLoss`, is the root, so the chunked loss's
  direct use of ``lm_head`` happens while the root is gathered).

Mixed precision (``MixedPrecisionPolicy``): parameters are not cast (``param_dtype=None``: each
group computes in its stored dtype, as one process does: W0 and norms in the model dtype, skew
parameters float32); gradients are reduce-scattered in float32 (``reduce_dtype``) and kept in
each parameter's dtype. Forward and backward gather one group at a time.

Merges (:func:`merge_sharded_`) gather one ``POETLinear`` at a time (its ``W0``, scales and skew
parameters), merge it exactly as one process would, and each rank keeps its own rows. Buffers
(permutations, merge counters, the host-side rounding residual) are not sharded: every rank
holds them whole and updates them identically.

Checkpoints are sharded (``poetx.train.checkpoint.sharded``, torch.distributed.checkpoint):
each rank writes its own shards, nothing is gathered; they load on any number of processes,
sharded or whole (one process, ``ddp``, ``poetx export``). A one-process checkpoint loads into
the shards too (:func:`shard_like`, :func:`copy_full_into`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from poetx.layers.framed_mlp import refresh_mlp_frames
from poetx.layers.poet_linear import POETLinear
from poetx.model.wrap import check_shared_frames

_SHARDED_NAMES = ("w0", "w0_scale", "theta_in", "theta_out", "bias")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a causal LM: the longest ``nn.ModuleList`` in it."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("fsdp: the model has no nn.ModuleList of decoder blocks to shard")
    return list(max(lists, key=len))


def shard_model(loss_module: nn.Module) -> nn.Module:
    """Shard ``loss_module`` (a ``CausalLMWithLoss``) in place with FSDP2; returns it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for block in decoder_blocks(loss_module):
        poet = [m for m in block.modules() if isinstance(m, POETLinear)]
        if poet:
            fully_shard(poet, mp_policy=policy)
        fully_shard(block, mp_policy=policy)
    fully_shard(loss_module, mp_policy=policy)
    return loss_module


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _own_rows(full: Tensor, sharded: DTensor) -> Tensor:
    """The rows of ``full`` that this rank's shard of ``sharded`` holds (FSDP2 shards dim 0
    in ``torch.chunk`` pieces; trailing ranks may hold none)."""
    local = sharded.to_local()
    chunks = torch.chunk(full, sharded.device_mesh.size(), dim=0)
    rank = sharded.device_mesh.get_local_rank()
    if rank >= len(chunks):
        return full[:0]
    piece = chunks[rank]
    if piece.shape != local.shape:
        raise RuntimeError(f"fsdp: shard of shape {tuple(local.shape)} does not match the rows "
                           f"{tuple(piece.shape)} this rank should hold")
    return piece


def shard_like(full: Tensor, like: DTensor) -> DTensor:
    """A DTensor sharded as ``like`` whose local part is this rank's rows of ``full``."""
    local = _own_rows(full, like).to(device=like.to_local().device).contiguous()
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride())


@torch.no_grad()
def copy_full_into(dest: Tensor, full: Tensor) -> None:
    """``dest.copy_(full)`` where ``dest`` may be a shard (it takes its own rows)."""
    if isinstance(dest, DTensor):
        dest.to_local().copy_(_own_rows(full, dest))
    else:
        dest.copy_(full)


@contextmanager
def gathered(layer: POETLinear) -> Iterator[None]:
    """Within the block, ``layer``'s sharded parameters are whole plain tensors (one layer's
    worth of memory); on exit each rank writes its own rows back into its shards."""
    swapped: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for name in _SHARDED_NAMES:
        p = layer._parameters.get(name)
        if isinstance(p, DTensor):
            full = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
            swapped[name] = (p, full)
            layer._parameters[name] = full
    try:
        yield
    finally:
        with torch.no_grad():
            for name, (sharded, full) in swapped.items():
                layer._parameters[name] = sharded
                sharded.to_local().copy_(_own_rows(full.detach(), sharded))


def merge_sharded_(model: nn.Module) -> int:
    """:func:`poetx.model.wrap.merge_all_` for a sharded model: each ``POETLinear`` is gathered,
    merged and re-sharded in turn. Returns how many layers merged."""
    count = 0
    for layer in model.modules():
        if isinstance(layer, POETLinear):
            with gathered(layer):
                layer.merge_()
            count += 1
    check_shared_frames(model)
    refresh_mlp_frames(model)
    return count
