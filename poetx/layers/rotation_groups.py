"""Batched rotation builds per decoder block: the blocks of every ``POETLinear`` inside a module
are built in one call (``poetx.ops.rotation_group``) when the first of them runs, and each layer
computes with its prebuilt blocks (``poetx.ops.rotated_gemm.poet_linear_prebuilt``).

A group is one element of an ``nn.ModuleList`` (a transformer's decoder block): forward hooks
on it mark where its forward starts and ends. Its layers' skew gradients are turned into
parameter gradients together once the block's backward is done, so the extra memory is one
block's float32 block gradients. Activation checkpointing may wrap the module's call or only
its ``forward`` (Hugging Face): the recomputation builds the blocks again, as the forward did.
Not supported: checkpointing inside a group module that runs more than once per forward.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from poetx.layers.poet_linear import POETLinear
from poetx.ops.rotation_group import build_rotation_group


def batched(layer: POETLinear) -> bool:
    """Whether ``layer``'s config asks for batched builds where it lives now."""
    mode = layer.config.batch_rotations
    if mode == "auto":
        return layer.theta_in.is_cuda and layer.config.mode == "fast"
    return mode == "on"


def _out_dtype(layer: POETLinear) -> torch.dtype:
    device_type = layer.theta_in.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return layer.compute_dtype


def build_blocks(layers: list[POETLinear]) -> dict[int, tuple]:
    """Build the blocks of ``layers`` (both sides), batched by block size, Neumann terms,
    dtypes and device: ``{id(layer): (d_in, grad_in, d_out, grad_out)}``."""
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for layer in layers:
        terms = layer.config.neumann_terms
        for side in ("in", "out"):
            layout = getattr(layer, f"layout_{side}")
            theta = getattr(layer, f"theta_{side}")
            key = (layout.block, terms, theta.dtype, _out_dtype(layer), theta.device)
            groups[key][layout.valid_last is not None].append((layer, side, layout.valid_last))
    built: dict[tuple[int, str], tuple] = {}
    for (block, terms, _, out_dtype, _), (full, padded) in groups.items():
        # The kernels mask only the last block they are given: one padded side per call, last.
        calls = [full + padded[:1]] + [[p] for p in padded[1:]]
        for members in calls:
            thetas = [getattr(layer, f"theta_{side}") for layer, side, _ in members]
            blocks, handles = build_rotation_group(thetas, block, terms, members[-1][2],
                                                   out_dtype)
            for (layer, side, _), d, h in zip(members, blocks, handles, strict=True):
                built[(id(layer), side)] = (d, h)
    return {id(layer): (*built[(id(layer), "in")], *built[(id(layer), "out")])
            for layer in layers}


def _members(module: nn.Module) -> list[POETLinear]:
    return [m for m in module.modules() if isinstance(m, POETLinear) and batched(m)]


def _in_backward() -> bool:
    """Whether autograd is running a backward pass: where activation checkpointing recomputes
    a forward (outside the module's hooks when only ``forward`` is checkpointed)."""
    return torch._C._current_graph_task_id() != -1


class RotationGroup:
    """The batched layers of one module and, while the module's forward (or its recomputation
    under activation checkpointing) runs, their blocks.

    The blocks are built when the first layer asks for them, inside whatever the module's
    forward runs under (checkpointing, autocast, no_grad), so a recomputation repeats the same
    operations. They are dropped when the forward ends, and rebuilt when a skew parameter
    was changed in place or the grad mode differs from the build's.
    """

    def __init__(self) -> None:
        self.layers: list[POETLinear] = []
        self.active = False
        self.blocks: dict[int, tuple] | None = None
        self.stamp: tuple | None = None

    def begin(self, layers: list[POETLinear]) -> None:
        for layer in self.layers:
            if layer not in layers:
                layer.rotation_group = None
        for layer in layers:
            layer.rotation_group = self
        self.layers = layers
        self.blocks = None
        self.active = True

    def end(self) -> None:
        self.blocks = None
        self.active = False

    def _stamp(self) -> tuple:
        return (torch.is_grad_enabled(),
                tuple(t._version for layer in self.layers
                      for t in (layer.theta_in, layer.theta_out)))

    def blocks_for(self, layer: POETLinear) -> tuple | None:
        """``(d_in, grad_in, d_out, grad_out)`` for ``layer``, or ``None`` (per-layer path)."""
        if torch.compiler.is_compiling() or not (self.active or _in_backward()):
            return None
        stamp = self._stamp()
        if self.blocks is None or stamp != self.stamp:
            self.blocks = build_blocks(self.layers)
            self.stamp = stamp
        return self.blocks.get(id(layer))


_GROUP = "_poetx_rotation_group"


def _pre_hook(module: nn.Module, _args) -> None:
    if not torch.compiler.is_compiling():  # traced code takes the per-layer path
        getattr(module, _GROUP).begin(_members(module))


def _post_hook(module: nn.Module, _args, _output) -> None:
    if not torch.compiler.is_compiling():
        getattr(module, _GROUP).end()


def _installed(module: nn.Module) -> bool:
    return any(h is _pre_hook for h in module._forward_pre_hooks.values())


def group_rotations(model: nn.Module) -> int:
    """Install the batched build on every ``ModuleList`` element of ``model`` that holds a
    ``POETLinear`` (the outermost such elements; calling again adds nothing). Returns how many
    groups are installed. Which layers take part is decided per forward by their
    ``config.batch_rotations``."""
    count = 0
    stack = [model]
    while stack:
        module = stack.pop()
        for child in module.children():
            holds = any(isinstance(m, POETLinear) for m in child.modules())
            if isinstance(module, nn.ModuleList) and holds:
                if not _installed(child):
                    object.__setattr__(child, _GROUP, RotationGroup())
                    child.register_forward_pre_hook(_pre_hook)
                    child.register_forward_hook(_post_hook, always_call=True)
                count += 1
            elif holds:
                stack.append(child)
    return count


def ungroup_rotations(model: nn.Module) -> None:
    """Remove what :func:`group_rotations` installed."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _pre_hook:
                del module._forward_pre_hooks[key]
        for key, hook in list(module._forward_hooks.items()):
            if hook is _post_hook:
                del module._forward_hooks[key]
                module._forward_hooks_always_called.pop(key, None)
        group = module.__dict__.pop(_GROUP, None)
        if group is not None:
            for layer in group.layers:
                layer.rotation_group = None
