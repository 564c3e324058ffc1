"""Plain-PyTorch reference of SwiGLU between three permuted frames.

In a Llama MLP ``down(silu(gate(x)) * up(x))`` each POET layer computes in its own permuted
frame: ``gate`` and ``up`` produce their outputs at rotated positions and scatter them to
natural columns; ``down`` gathers its input from natural columns. The scatters and the gather
only move values, and SwiGLU is elementwise, so the product can be read straight from the
frames that ``gate`` and ``up`` produce and written straight into the frame that ``down``
reads: one pass instead of four.

Frames are given as padded indices (``block_rotate_ref``'s convention): entry ``p`` is the
natural column at position ``p``, ``-1`` a phantom (padding of the last block). A *map* from
frame ``dst`` to frame ``src`` (:func:`frame_map`) holds, for each position of ``dst``, the
position of ``src`` that holds the same column, ``-1`` where ``dst`` has a phantom.

Forward: ``h[:, p] = silu(gate[:, gate_from_h[p]]) * up[:, up_from_h[p]]`` (zero at phantoms).
Backward, each gradient computed in its own frame, so every output is written in order:

- ``grad_gate[:, p] = grad_h[:, h_from_gate[p]] * up[:, up_from_gate[p]] * silu'(gate[:, p])``
- ``grad_up[:, q] = grad_h[:, h_from_up[q]] * silu(gate[:, gate_from_up[q]])``
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def frame_map(dst_index: Tensor, src_index: Tensor, cols: int) -> Tensor:
    """``(P_dst,)`` int64: the position of ``src`` holding the column at each position of
    ``dst``; ``-1`` where ``dst`` has a phantom. Both indices cover the ``cols`` columns."""
    valid = src_index >= 0
    inverse = torch.full((cols,), -1, dtype=torch.long, device=src_index.device)
    inverse[src_index[valid]] = torch.arange(src_index.numel(), device=src_index.device)[valid]
    return torch.where(dst_index >= 0, inverse[dst_index.clamp_min(0)], -1)


class FrameMaps(NamedTuple):
    """The six maps between the frames of an MLP's gate and up outputs and down's input."""

    gate_from_h: Tensor
    up_from_h: Tensor
    h_from_gate: Tensor
    up_from_gate: Tensor
    h_from_up: Tensor
    gate_from_up: Tensor


def frame_maps(gate_index: Tensor, up_index: Tensor, down_index: Tensor, cols: int) -> FrameMaps:
    """:class:`FrameMaps` from the padded indices of gate's output, up's output and down's
    input (``cols``: the MLP's intermediate width)."""
    return FrameMaps(
        frame_map(down_index, gate_index, cols), frame_map(down_index, up_index, cols),
        frame_map(gate_index, down_index, cols), frame_map(gate_index, up_index, cols),
        frame_map(up_index, down_index, cols), frame_map(up_index, gate_index, cols),
    )


def read_frame(x: Tensor, from_index: Tensor) -> Tensor:
    """``(T, P_src) -> (T, P_dst)``: ``x[:, from_index[p]]``, zero where it is ``-1``."""
    padded = torch.nn.functional.pad(x, (0, 1))
    return padded[:, torch.where(from_index < 0, x.shape[-1], from_index)]


def _wide(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def swiglu_frames_reference(gate: Tensor, up: Tensor, maps: FrameMaps) -> Tensor:
    """``(T, P_gate), (T, P_up) -> (T, P_h)`` in ``gate.dtype``, computed in float32 (float64
    for float64) and rounded once."""
    wide = _wide(gate)
    g = read_frame(gate.to(wide), maps.gate_from_h)
    u = read_frame(up.to(wide), maps.up_from_h)
    return (torch.nn.functional.silu(g) * u).to(gate.dtype)


def swiglu_frames_backward_reference(grad_h: Tensor, gate: Tensor, up: Tensor,
                                     maps: FrameMaps) -> tuple[Tensor, Tensor]:
    """``(grad_gate (T, P_gate), grad_up (T, P_up))`` in ``grad_h.dtype``, zero at the
    phantom positions of each frame."""
    wide = _wide(grad_h)
    gh, g, u = grad_h.to(wide), gate.to(wide), up.to(wide)
    # silu_backward: the rounding autograd's unfused path does, so CPU runs match it bitwise
    grad_gate = torch.ops.aten.silu_backward(
        read_frame(gh, maps.h_from_gate) * read_frame(u, maps.up_from_gate), g)
    grad_gate = torch.where(maps.h_from_gate >= 0, grad_gate, 0)
    g_up = read_frame(g, maps.gate_from_up)
    grad_up = read_frame(gh, maps.h_from_up) * torch.nn.functional.silu(g_up)
    return grad_gate.to(grad_h.dtype), grad_up.to(grad_h.dtype)
