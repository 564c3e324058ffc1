"""Batched rotation builds per decoder block: the blocks of every ``POETLinear`` inside a module
are built in one call (``poetx.ops.rotation_group``) when the first of them runs, and each layer
computes with its prebuilt blocks (``poetx.ops.rotated_gemm.poet_linear_prebuilt``).

A group is one element of an ``nn.ModuleList`` (a transformer's decoder block): forward hooks
on it mark where its forward starts and ends. Its layers' skew gradients are turned into
parameter gradients together once the block's backward is done, so the extra memory is one
block's float32 block gradients. Activation checkpointing may wrap the module's call or only
its ``forward`` (Hugging Face): the recomputation builds the blocks again, as the forward did.
Not supported: checkpointing inside a group module that runs more than once per forward.

Gradient accumulation (:class:`AccumulatedRotations`, installed by the Trainer for a step of
several micro-batches) takes precedence over the per-forward builds: the blocks of every
layer, batched or not, are built once per optimizer step and differentiated once.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from poetx.layers.poet_linear import POETLinear
from poetx.layers.shared_inputs import SharedInputs
from poetx.ops.rotation_group import (
    Carry,
    build_rotation_blocks,
    build_rotation_group,
    link_rotation_group,
)


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


_Side = tuple[POETLinear, str, int | None]  # layer, "in" or "out", its padded last block


def _calls(layers: list[POETLinear]) -> list[tuple[int, int | None, torch.dtype, list[_Side]]]:
    """The build calls for ``layers`` (both sides): ``(block, terms, out_dtype, sides)``, the
    sides batched by block size, Neumann terms, dtypes and device."""
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for layer in layers:
        terms = layer.config.neumann_terms
        for side in ("in", "out"):
            layout = getattr(layer, f"layout_{side}")
            theta = getattr(layer, f"theta_{side}")
            key = (layout.block, terms, theta.dtype, _out_dtype(layer), theta.device)
            groups[key][layout.valid_last is not None].append((layer, side, layout.valid_last))
    calls = []
    for (block, terms, _, out_dtype, _), (full, padded) in groups.items():
        # The kernels mask only the last block they are given: one padded side per call, last.
        for sides in [full + padded[:1]] + [[p] for p in padded[1:]]:
            calls.append((block, terms, out_dtype, sides))
    return calls


def _thetas(sides: list[_Side]) -> list[torch.Tensor]:
    return [getattr(layer, f"theta_{side}") for layer, side, _ in sides]


def _per_layer(built: dict[tuple[int, str], tuple], layers: list[POETLinear]) -> dict[int, tuple]:
    return {id(layer): (*built[(id(layer), "in")], *built[(id(layer), "out")])
            for layer in layers}


def build_blocks(layers: list[POETLinear]) -> dict[int, tuple]:
    """Build the blocks of ``layers`` (both sides), batched by block size, Neumann terms,
    dtypes and device: ``{id(layer): (d_in, grad_in, d_out, grad_out)}``."""
    built: dict[tuple[int, str], tuple] = {}
    for block, terms, out_dtype, sides in _calls(layers):
        blocks, handles = build_rotation_group(_thetas(sides), block, terms, sides[-1][2],
                                               out_dtype)
        for (layer, side, _), d, h in zip(sides, blocks, handles, strict=True):
            built[(id(layer), side)] = (d, h)
    return _per_layer(built, layers)


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
        self.shared = SharedInputs()

    def begin(self, layers: list[POETLinear]) -> None:
        for layer in self.layers:
            if layer not in layers:
                layer.rotation_group = None
        for layer in layers:
            layer.rotation_group = self
        self.layers = layers
        self.blocks = None
        self.shared.begin()
        self.active = True

    def end(self) -> None:
        self.blocks = None
        self.shared.end()
        self.active = False

    def shared_input(self, layer: POETLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s permuted copy of ``x`` from a fan-out shared with the layers that read
        ``x`` with it (``poetx.layers.shared_inputs``), or ``None``: it gathers ``x`` itself."""
        mode = layer.config.shared_inputs
        if (not self.active or torch.compiler.is_compiling() or mode == "off"
                or (mode == "auto" and not x.is_cuda)):
            return None
        return self.shared.copy_for(layer, x)

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


def poet_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost ``ModuleList`` elements of ``model`` that hold a ``POETLinear`` (a
    transformer's decoder blocks), in module order."""
    found = []
    for child in model.children():
        if not any(isinstance(m, POETLinear) for m in child.modules()):
            continue
        if isinstance(model, nn.ModuleList):
            found.append(child)
        else:
            found += poet_blocks(child)
    return found


def group_rotations(model: nn.Module) -> int:
    """Install the batched build on every block of :func:`poet_blocks` (calling again adds
    nothing). Returns how many groups are installed. Which layers take part is decided per
    forward by their ``config.batch_rotations``."""
    blocks = poet_blocks(model)
    for child in blocks:
        if not _installed(child):
            object.__setattr__(child, _GROUP, RotationGroup())
            child.register_forward_pre_hook(_pre_hook)
            child.register_forward_hook(_post_hook, always_call=True)
    return len(blocks)


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


class _StepBuild:
    """One build call of an :class:`AccumulatedRotations` step: its sides, their blocks, the
    carry of their gradients and, once the last micro-batch asked, the linked handles."""

    def __init__(self, block: int, terms: int | None, out_dtype: torch.dtype,
                 sides: list[_Side]) -> None:
        self.geometry = (block, terms, sides[-1][2], out_dtype)
        self.sides = sides
        thetas = _thetas(sides)
        self.blocks = build_rotation_blocks(thetas, *self.geometry)
        self.carry = Carry(thetas, block, out_dtype)
        self.linked: list[torch.Tensor] | None = None
        self.served: set[int] = set()

    def handle(self, final: bool, i: int) -> torch.Tensor:
        """Side ``i``'s gradient handle: the carry's before the last micro-batch (and
        without grad), else a handle linked to the skew parameters as this forward sees them
        (FSDP2: gathered for it). A side asking again is a new forward of its layer (a
        recomputation under activation checkpointing, which must save what the forward
        saved): it gets a new link; each link's backward takes what the shared sink holds
        when it runs (the Cayley-Neumann backward is linear, so the parts add up)."""
        if not (final and torch.is_grad_enabled()):
            return self.carry.handles[i]
        if self.linked is None or i in self.served:
            self.linked = link_rotation_group(_thetas(self.sides), *self.geometry,
                                              carry=self.carry)
            self.served = set()
        self.served.add(i)
        return self.linked[i]


class AccumulatedRotations:
    """The rotation blocks of one optimizer step of ``micro`` micro-batches, built once.

    The skew parameters change only in the optimizer step, so every micro-batch computes with
    the same blocks: each build call (a decoder block's batched layers, or one layer alone on
    the per-layer path) runs when the first micro-batch first needs it; the micro-batches
    before the last add their block gradients into one float32 buffer per build (``Carry``'s
    sink; the Grams add there, so no separate add runs); the last one's backward adds its own
    and runs the Cayley-Neumann backward once. Costs, against building
    per micro-batch: the blocks of every layer and their float32 gradient sum stay allocated
    for the whole step (about three times the skew parameters' memory).

    Use::

        with AccumulatedRotations(layers, micro) as rotations:
            for k in range(micro):
                rotations.micro_batch(k)
                loss(k).backward()

    ``micro == 1`` installs nothing (the per-forward builds of :class:`RotationGroup`). On
    leaving, gradients no last-micro-batch backward took (a layer that did not run in the
    last micro-batch) are turned into skew gradients in a backward of their own.
    """

    def __init__(self, layers: list[POETLinear], micro: int) -> None:
        self.layers = layers
        self.micro = micro
        self.final = micro == 1
        self.builds: dict[tuple[int, str], tuple[_StepBuild, int]] = {}

    def __enter__(self) -> AccumulatedRotations:
        if self.micro > 1:
            for layer in self.layers:
                layer.step_rotations = self
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                for build in {id(b): b for b, _ in self.builds.values()}.values():
                    if build.carry.pending():
                        build.carry.flush(_thetas(build.sides), *build.geometry)
        finally:
            for layer in self.layers:
                layer.step_rotations = None
            self.builds.clear()

    def micro_batch(self, index: int) -> None:
        """Micro-batch ``index`` (0-based) runs next."""
        self.final = index == self.micro - 1

    def blocks_for(self, layer: POETLinear) -> tuple | None:
        """``(d_in, grad_in, d_out, grad_out)`` for ``layer``, or ``None`` (traced code)."""
        if torch.compiler.is_compiling():
            return None
        if (id(layer), "in") not in self.builds:
            group = layer.rotation_group
            members = (group.layers if group is not None and layer in group.layers
                       and (group.active or _in_backward()) else [layer])
            todo = [m for m in members if (id(m), "in") not in self.builds]
            for call in _calls(todo):
                build = _StepBuild(*call)
                for i, (member, side, _) in enumerate(build.sides):
                    self.builds[(id(member), side)] = (build, i)
        out = []
        for side in ("in", "out"):
            build, i = self.builds[(id(layer), side)]
            out += [build.blocks[i], build.handle(self.final, i)]
        return tuple(out)
