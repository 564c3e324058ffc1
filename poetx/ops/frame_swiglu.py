"""SwiGLU between the permuted frames of an MLP's three POET layers, as an autograd node.

``gate`` and ``up`` hand over their outputs in their own rotated frames (no scatter), and
``down`` takes ``h`` already in its input frame (no gather): the node moves the values between
frames while it computes ``silu(gate) * up``, in one pass each way
(``poetx.kernels.frame_swiglu``). Each layer keeps its own permutation, so the method's
sampling is unchanged: the values equal those of the unfused path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from poetx.kernels.frame_swiglu_ref import FrameMaps
from poetx.ops import backend


class _SwigluFrames(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, maps: FrameMaps):
        ctx.save_for_backward(gate, up)
        ctx.maps = maps
        return backend.swiglu_frames(gate, up, maps)

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = backend.swiglu_frames_backward(grad_h.contiguous(), gate, up,
                                                            ctx.maps)
        return grad_gate, grad_up, None


def swiglu_frames(gate: Tensor, up: Tensor, maps: FrameMaps) -> Tensor:
    """``silu(gate) * up`` moved between frames: ``gate`` ``(T, P_gate)`` and ``up``
    ``(T, P_up)`` in their layers' output frames, the result ``(T, P_h)`` in down's input frame
    (``maps`` from ``poetx.kernels.frame_swiglu_ref.frame_maps``); zero at down's phantom
    positions, and no gradient reaches gate's or up's."""
    if gate.dim() != 2 or up.dim() != 2 or gate.shape[0] != up.shape[0]:
        raise ValueError(f"swiglu_frames: gate and up must be (T, positions) with one T; got "
                         f"{tuple(gate.shape)}, {tuple(up.shape)}")
    if (maps.gate_from_h.numel() != maps.up_from_h.numel()
            or maps.h_from_gate.numel() != gate.shape[1] or maps.h_from_up.numel() != up.shape[1]):
        raise ValueError(f"swiglu_frames: maps of {maps.h_from_gate.numel()} gate and "
                         f"{maps.h_from_up.numel()} up positions do not fit gate "
                         f"{tuple(gate.shape)} and up {tuple(up.shape)}")
    return _SwigluFrames.apply(gate, up, maps)
