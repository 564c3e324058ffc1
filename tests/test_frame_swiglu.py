"""SwiGLU between permuted frames (``poetx.kernels.frame_swiglu``): the reference against the
unfused path it replaces (scatter gate's and up's outputs, SwiGLU on natural columns, gather
down's input) in float64, and the Triton kernels against the reference (interpreter on CPU,
compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from poetx.kernels.block_rotate_ref import gather_columns, scatter_columns
from poetx.kernels.frame_swiglu_ref import (
    frame_maps,
    swiglu_frames_backward_reference,
    swiglu_frames_reference,
)
from tests.test_kernels import interpreted_kernels, padded_index, rel_err

# (intermediate width, block): whole blocks, padded last blocks (Llama-60M's 1376 at 256)
SHAPES = [(96, 32), (1376, 256), (150, 64)]


def _frames(cols: int, b: int):
    positions = -(-cols // b) * b
    indices = [padded_index(cols, positions // b, b) for _ in range(3)]
    return positions, indices, frame_maps(*indices, cols)


def _unfused(gate, up, indices, cols, positions):
    gate_index, up_index, down_index = indices
    g = scatter_columns(gate, gate_index, cols)
    u = scatter_columns(up, up_index, cols)
    return gather_columns(torch.nn.functional.silu(g) * u, down_index, positions)


@pytest.mark.parametrize("cols,b", SHAPES)
def test_reference_is_the_unfused_path(cols, b):
    """Forward values and both gradients equal those of scatter -> SwiGLU -> gather in
    float64 (autograd through the unfused path), phantom positions included."""
    torch.manual_seed(0)
    positions, indices, maps = _frames(cols, b)
    gate = torch.randn(7, positions, dtype=torch.float64, requires_grad=True)
    up = torch.randn(7, positions, dtype=torch.float64, requires_grad=True)
    want = _unfused(gate, up, indices, cols, positions)
    got = swiglu_frames_reference(gate, up, maps)
    assert torch.equal(got, want)
    grad_h = torch.randn(7, positions, dtype=torch.float64)  # phantoms too: never read
    want_gate, want_up = torch.autograd.grad(want, (gate, up), grad_h)
    got_gate, got_up = swiglu_frames_backward_reference(grad_h, gate.detach(), up.detach(),
                                                        maps)
    torch.testing.assert_close(got_gate, want_gate, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(got_up, want_up, rtol=1e-13, atol=1e-15)


@pytest.fixture
def interp_fs(monkeypatch):
    """A copy of ``frame_swiglu`` whose kernels run in Triton's interpreter."""
    (frame_swiglu,) = interpreted_kernels(monkeypatch, "frame_swiglu")
    return frame_swiglu


@pytest.mark.interpret
@pytest.mark.parametrize("cols,b", SHAPES)
def test_kernels_interpreted(interp_fs, monkeypatch, cols, b):
    """float32: the kernels' float32 products against the reference's, to float32 rounding;
    the phantom positions of each frame written as zeros. 5 rows over 2 programs, so a
    program walks several rows and one has a row fewer."""
    monkeypatch.setattr(interp_fs, "_programs", lambda x: 2)
    torch.manual_seed(1)
    positions, indices, maps = _frames(cols, b)
    gate, up, grad_h = (torch.randn(5, positions) for _ in range(3))
    h = interp_fs.swiglu_frames(gate, up, maps)
    assert rel_err(h, swiglu_frames_reference(gate.double(), up.double(), maps)) < 1e-6
    assert (h[:, indices[2] < 0] == 0).all()
    grads = interp_fs.swiglu_frames_backward(grad_h, gate, up, maps)
    refs = swiglu_frames_backward_reference(grad_h.double(), gate.double(), up.double(), maps)
    for got, want, index in zip(grads, refs, indices[:2], strict=True):
        assert rel_err(got, want) < 1e-6
        assert (got[:, index < 0] == 0).all()


def test_warps_per_row_width(monkeypatch):
    from poetx.kernels import frame_swiglu

    assert [frame_swiglu._warps(w) for w in (256, 2048, 8192, 16384, 65536)] == [4, 4, 16, 32, 32]
    monkeypatch.setenv("POETX_FRAME_SWIGLU", "warps=8")
    assert frame_swiglu._warps(16384) == 8
    monkeypatch.setenv("POETX_FRAME_SWIGLU", "chunk=4")
    with pytest.raises(ValueError, match="POETX_FRAME_SWIGLU"):
        frame_swiglu._warps(2048)


def test_rows_too_wide_to_stage_name_the_limit():
    from poetx.kernels.frame_swiglu import MAX_STAGED_BYTES, _check_staged

    with pytest.raises(ValueError, match=str(MAX_STAGED_BYTES)):
        _check_staged(40_000, 100, 100, element_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols,b,T", [(14336, 256, 512), (1376, 256, 300), (5632, 256, 64)])
def test_kernels_gpu(dtype, cols, b, T):
    """Compiled, at model widths (Llama-8B's 14336, 60M's padded 1376, 1B's 5632): against
    the float64 reference of the same inputs, within one rounding of the output dtype."""
    from poetx.kernels.frame_swiglu import swiglu_frames, swiglu_frames_backward

    torch.manual_seed(2)
    positions, indices, maps = _frames(cols, b)
    maps = type(maps)(*(m.cuda() for m in maps))
    gate, up, grad_h = (torch.randn(T, positions, device="cuda").to(dtype) for _ in range(3))
    tol = {torch.bfloat16: 2 ** -8, torch.float32: 1e-6}[dtype]
    h = swiglu_frames(gate, up, maps)
    assert rel_err(h, swiglu_frames_reference(gate.double(), up.double(), maps)) < tol
    grads = swiglu_frames_backward(grad_h, gate, up, maps)
    refs = swiglu_frames_backward_reference(grad_h.double(), gate.double(), up.double(), maps)
    for got, want in zip(grads, refs, strict=True):
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("cols,b", SHAPES)
def test_autograd_node_is_the_unfused_path(cols, b):
    """The node (reference path on CPU) in float64: output and gradients equal autograd's
    through scatter -> SwiGLU -> gather, and gradcheck holds."""
    from poetx.ops.frame_swiglu import swiglu_frames

    torch.manual_seed(3)
    positions, indices, maps = _frames(cols, b)
    gate = torch.randn(4, positions, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, positions, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, positions, dtype=torch.float64)
    got = swiglu_frames(gate, up, maps)
    want = _unfused(gate, up, indices, cols, positions)
    assert torch.equal(got, want)
    grads = torch.autograd.grad((got * weight).sum(), (gate, up))
    refs = torch.autograd.grad((want * weight).sum(), (gate, up))
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-15)
    if cols <= 150:
        assert torch.autograd.gradcheck(lambda g, u: swiglu_frames(g, u, maps), (gate, up))


def test_autograd_node_names_mismatched_maps():
    from poetx.ops.frame_swiglu import swiglu_frames

    _, _, maps = _frames(96, 32)
    with pytest.raises(ValueError, match="do not fit"):
        swiglu_frames(torch.randn(3, 64), torch.randn(3, 96), maps)
