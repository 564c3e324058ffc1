"""Triton kernels of SwiGLU between three permuted frames (semantics, maps and the PyTorch
references in ``frame_swiglu_ref``).

Like ``block_rotate._permute_kernel``, each program takes whole rows: it reads every source
row coalesced, moves values between frames with a 1-D ``tl.gather`` in shared memory, and
writes its output row coalesced. Products in float32, one rounding on the store.

* forward: reads a row of ``gate`` and of ``up``, writes a row of ``h``;
* backward: reads a row of ``grad_h``, ``gate`` and ``up``, writes a row of ``grad_gate`` and
  of ``grad_up``, each in its own frame.

The unfused path costs four passes more per direction: in forward the scatters of gate's and
up's outputs and down's input gather around the elementwise kernel; in backward down's
input-gradient scatter and the gathers of gate's and up's output gradients.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from poetx.kernels.frame_swiglu_ref import (  # noqa: F401  (the references tested against)
    FrameMaps,
    frame_maps,
    swiglu_frames_backward_reference,
    swiglu_frames_reference,
)

# Rows staged per program: three source rows of this many bytes each fit shared memory.
MAX_STAGED_BYTES = 64 * 1024


def _interpreting() -> bool:
    return not isinstance(_swiglu_frames_kernel, triton.runtime.JITFunction)


def _p2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(x: Tensor) -> int:
    T = x.shape[0]
    if _interpreting() or not x.is_cuda:
        return T
    return min(T, 16 * _num_sms(x.device.index or 0))


# Warps per program (``None``: ``POETX_FRAME_SWIGLU=warps=N`` if set, for benchmarks that run
# in processes of their own, else :func:`_warps`'s rule). Set here, it wins over the variable.
OPTIONS: dict[str, int | None] = {"warps": None}


def _warps(width: int) -> int:
    """Warps for rows padded to ``width``: one per 512 positions (16 per thread), 4 to 32.

    A program holds whole rows in registers and runs one row after another, so an SM
    overlaps loads with the shared-memory gathers only across the warps it holds. At Llama-8B's
    14336 (16384 padded) 32 warps took the backward from 525 to 370 us and the forward from
    218 to 190 us against 16 warps (32 positions per thread, registers capped at 128 and
    spilling) on an H100 (``bench/results/frame_swiglu_h100.json``); output chunks and
    prefetching the next row were slower or no faster there (the same file).
    """
    if OPTIONS["warps"]:
        return OPTIONS["warps"]
    spec = os.environ.get("POETX_FRAME_SWIGLU", "")
    if spec:
        key, _, value = spec.partition("=")
        if key != "warps" or not value.isdigit():
            raise ValueError(f"POETX_FRAME_SWIGLU: expected 'warps=N', got {spec!r}")
        return int(value)
    return max(4, min(32, width // 512))


@triton.jit
def _sigmoid(x):
    # spelled out: tl.sigmoid is a library jit function the interpreter copy cannot call
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _read(row, from_ptr, pos, pos_ok):
    """``row[from[pos]]``, zero where ``from`` is ``-1`` or ``pos`` is past the frame."""
    src = tl.load(from_ptr + pos, mask=pos_ok, other=-1).to(tl.int32)
    got = tl.gather(row, tl.where(src >= 0, src, 0), axis=0)
    return tl.where(src >= 0, got.to(tl.float32), 0.0)


@triton.jit
def _row_span(T, rows_per_prog):
    """This program's rows ``[start, end)`` and ``start`` as int64 (for pointer offsets)."""
    start = tl.program_id(0) * rows_per_prog
    return start, tl.minimum(T, start + rows_per_prog), start.to(tl.int64)


@triton.jit
def _load_row(ptr, pos, width, present):
    return tl.load(ptr + pos, mask=(pos < width) & present, other=0.0)


@triton.jit
def _swiglu_frames_kernel(
    gate_ptr, up_ptr, h_ptr, gate_from_h, up_from_h, T, P_gate, P_up, P_h,
    stride_g, stride_u, stride_h, rows_per_prog,
    G_PAD: tl.constexpr, U_PAD: tl.constexpr, H_PAD: tl.constexpr,
):
    r_start, r_end, first = _row_span(T, rows_per_prog)
    g_pos = tl.arange(0, G_PAD)
    u_pos = tl.arange(0, U_PAD)
    h_pos = tl.arange(0, H_PAD)
    h_ok = h_pos < P_h
    gate_ptr += first * stride_g
    up_ptr += first * stride_u
    h_ptr += first * stride_h
    g_row = _load_row(gate_ptr, g_pos, P_gate, r_start < r_end)
    u_row = _load_row(up_ptr, u_pos, P_up, r_start < r_end)
    for r in range(r_start, r_end):
        gate_ptr += stride_g
        up_ptr += stride_u
        g = _read(g_row, gate_from_h, h_pos, h_ok)
        u = _read(u_row, up_from_h, h_pos, h_ok)
        h = g * _sigmoid(g) * u
        tl.store(h_ptr + h_pos, h.to(h_ptr.dtype.element_ty), mask=h_ok)
        h_ptr += stride_h
        g_row = _load_row(gate_ptr, g_pos, P_gate, r + 1 < r_end)
        u_row = _load_row(up_ptr, u_pos, P_up, r + 1 < r_end)


@triton.jit
def _swiglu_frames_backward_kernel(
    grad_h_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr,
    h_from_gate, up_from_gate, h_from_up, gate_from_up, T, P_gate, P_up, P_h,
    stride_gh, stride_g, stride_u, stride_gg, stride_gu, rows_per_prog,
    G_PAD: tl.constexpr, U_PAD: tl.constexpr, H_PAD: tl.constexpr,
):
    r_start, r_end, first = _row_span(T, rows_per_prog)
    g_pos = tl.arange(0, G_PAD)
    u_pos = tl.arange(0, U_PAD)
    h_pos = tl.arange(0, H_PAD)
    grad_h_ptr += first * stride_gh
    gate_ptr += first * stride_g
    up_ptr += first * stride_u
    grad_gate_ptr += first * stride_gg
    grad_up_ptr += first * stride_gu
    gh_row = _load_row(grad_h_ptr, h_pos, P_h, r_start < r_end)
    g_row = _load_row(gate_ptr, g_pos, P_gate, r_start < r_end)
    u_row = _load_row(up_ptr, u_pos, P_up, r_start < r_end)
    for r in range(r_start, r_end):
        # gate's frame: its own values in order, grad_h and up moved in (the masks are formed
        # here, as in the variant timed in bench/results/frame_swiglu_h100.json: same PTX)
        g_ok = g_pos < P_gate
        g = g_row.to(tl.float32)
        sig = _sigmoid(g)
        gh = _read(gh_row, h_from_gate, g_pos, g_ok)
        grad_g = gh * _read(u_row, up_from_gate, g_pos, g_ok) * (sig * (1.0 + g * (1.0 - sig)))
        tl.store(grad_gate_ptr + g_pos, grad_g.to(grad_gate_ptr.dtype.element_ty), mask=g_ok)
        # up's frame: grad_h and gate moved in
        u_ok = u_pos < P_up
        g_u = _read(g_row, gate_from_up, u_pos, u_ok)
        grad_u = _read(gh_row, h_from_up, u_pos, u_ok) * (g_u * _sigmoid(g_u))
        tl.store(grad_up_ptr + u_pos, grad_u.to(grad_up_ptr.dtype.element_ty), mask=u_ok)
        grad_h_ptr += stride_gh
        gate_ptr += stride_g
        up_ptr += stride_u
        grad_gate_ptr += stride_gg
        grad_up_ptr += stride_gu
        gh_row = _load_row(grad_h_ptr, h_pos, P_h, r + 1 < r_end)
        g_row = _load_row(gate_ptr, g_pos, P_gate, r + 1 < r_end)
        u_row = _load_row(up_ptr, u_pos, P_up, r + 1 < r_end)


def _rows(t: Tensor) -> Tensor:
    if t.dim() != 2:
        raise ValueError(f"expected a (T, positions) tensor, got shape {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def _int32(maps: FrameMaps) -> FrameMaps:
    return FrameMaps(*(m.to(torch.int32).contiguous() for m in maps))


def _check_staged(*widths: int, element_size: int) -> None:
    if max(widths) * element_size > MAX_STAGED_BYTES:
        raise ValueError(f"frame_swiglu stages whole rows: {max(widths)} positions of "
                         f"{element_size} bytes exceed {MAX_STAGED_BYTES} bytes; use the "
                         "reference path")


def swiglu_frames(gate: Tensor, up: Tensor, maps: FrameMaps) -> Tensor:
    """Triton version of :func:`swiglu_frames_reference`: ``(T, P_gate), (T, P_up) ->
    (T, P_h)`` in ``gate.dtype``. float64 runs the reference."""
    if gate.dtype == torch.float64:
        return swiglu_frames_reference(gate, up, maps)
    gate, up = _rows(gate), _rows(up.to(gate.dtype))
    T = gate.shape[0]
    P_h = maps.gate_from_h.numel()
    h = torch.empty(T, P_h, dtype=gate.dtype, device=gate.device)
    if T == 0 or P_h == 0:
        return h
    _check_staged(gate.shape[1], up.shape[1], P_h, element_size=gate.element_size())
    m = _int32(maps)
    progs = _programs(gate)
    g_pad, u_pad, h_pad = _p2(gate.shape[1]), _p2(up.shape[1]), _p2(P_h)
    _swiglu_frames_kernel[(progs,)](
        gate, up, h, m.gate_from_h, m.up_from_h, T, gate.shape[1], up.shape[1], P_h,
        gate.stride(0), up.stride(0), h.stride(0), triton.cdiv(T, progs),
        G_PAD=g_pad, U_PAD=u_pad, H_PAD=h_pad, num_warps=_warps(max(g_pad, u_pad, h_pad)),
    )
    return h


def swiglu_frames_backward(grad_h: Tensor, gate: Tensor, up: Tensor,
                           maps: FrameMaps) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`swiglu_frames_backward_reference`: ``(grad_gate (T, P_gate),
    grad_up (T, P_up))`` in ``grad_h.dtype``. float64 runs the reference."""
    if grad_h.dtype == torch.float64:
        return swiglu_frames_backward_reference(grad_h, gate, up, maps)
    grad_h, gate, up = _rows(grad_h), _rows(gate), _rows(up)
    T, P_h = grad_h.shape
    grad_gate = torch.empty(T, gate.shape[1], dtype=grad_h.dtype, device=grad_h.device)
    grad_up = torch.empty(T, up.shape[1], dtype=grad_h.dtype, device=grad_h.device)
    if T == 0:
        return grad_gate, grad_up
    _check_staged(gate.shape[1], up.shape[1], P_h,
                  element_size=max(grad_h.element_size(), gate.element_size()))
    m = _int32(maps)
    progs = _programs(grad_h)
    g_pad, u_pad, h_pad = _p2(gate.shape[1]), _p2(up.shape[1]), _p2(P_h)
    _swiglu_frames_backward_kernel[(progs,)](
        grad_h, gate, up, grad_gate, grad_up, m.h_from_gate, m.up_from_gate, m.h_from_up,
        m.gate_from_up, T, gate.shape[1], up.shape[1], P_h, grad_h.stride(0), gate.stride(0),
        up.stride(0), grad_gate.stride(0), grad_up.stride(0), triton.cdiv(T, progs),
        G_PAD=g_pad, U_PAD=u_pad, H_PAD=h_pad, num_warps=_warps(max(g_pad, u_pad, h_pad)),
    )
    return grad_gate, grad_up
