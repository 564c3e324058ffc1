"""POET-X stays a rotation: exact merges, W0's spectrum, int8/fp8 storage, in-place merges,
the ||Q|| monitor and guard. References are dense float64 matrices built from the definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import poetx
from poetx import MergeSchedule, POETConfig, POETLinear
from poetx.kernels.quant_ref import dequantize, dequantize_reference, quantize
from poetx.model.wrap import poet_layers, rotation_norm_max
from tests.reference import rotate_both_sides, rotation_dense, skew_dense

PRESET_WIDTHS = [1376, 2736, 5461, 344]  # not multiples of the 256 group / block


def _random_layer(n, m, b, scale, fmt="auto", dtype=torch.float64, residual="host", seed=0):
    cfg = POETConfig(block_size=b, w0_format=fmt, w0_residual=residual)
    layer = POETLinear(n, m, bias=False, config=cfg, name="l", dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.theta_in.normal_(0, scale, generator=gen)
        layer.theta_out.normal_(0, scale, generator=gen)
    return layer, gen


def _exact_merge_reference(layer, w_orig):
    """``C_R W C_P`` (original frame) with the exact Cayley rotations, dense, float64."""
    r = rotation_dense(layer.theta_out.detach(), layer.perm_out, layer.layout_out.block, None)
    p = rotation_dense(layer.theta_in.detach(), layer.perm_in, layer.layout_in.block, None)
    return r @ w_orig @ p


@pytest.mark.parametrize("n,m,b", [(16, 24, 8), (20, 12, 8), (7, 5, 4), (6, 10, 16)])
def test_blockwise_merge_equals_dense_reference_in_place(n, m, b):
    layer, _ = _random_layer(n, m, b, 0.3)
    w_before = layer.effective_weight(torch.float64).clone()
    with torch.no_grad():  # W0 in the original frame
        saved = (layer.theta_in.clone(), layer.theta_out.clone())
        layer.theta_in.zero_()
        layer.theta_out.zero_()
        w0 = layer.effective_weight(torch.float64)
        layer.theta_in.copy_(saved[0])
        layer.theta_out.copy_(saved[1])
    expected = _exact_merge_reference(layer, w0)
    storage = {name: t.data_ptr() for name, t in layer.state_dict(keep_vars=True).items()
               if t is not None}
    layer.merge_()
    assert {name: t.data_ptr() for name, t in layer.state_dict(keep_vars=True).items()
            if t is not None} == storage
    torch.testing.assert_close(layer.effective_weight(torch.float64), expected,
                               rtol=1e-12, atol=1e-12)
    # Indices and inverses follow the new permutations.
    for side in ("in", "out"):
        perm = getattr(layer, f"perm_{side}")
        assert torch.equal(getattr(layer, f"index_{side}")[: perm.numel()], perm)
        assert torch.equal(getattr(layer, f"inv_{side}").long()[perm], torch.arange(perm.numel()))
    assert not torch.allclose(w_before, expected)  # the truncated map was not orthogonal here


def test_quantized_merge_keeps_storage():
    layer, _ = _random_layer(344, 40, 32, 0.01, fmt="int8", dtype=torch.float32)
    ptrs = [layer.w0.data_ptr(), layer.w0_scale.data_ptr(), layer.w0_residual.data_ptr()]
    layer.merge_()
    assert [layer.w0.data_ptr(), layer.w0_scale.data_ptr(),
            layer.w0_residual.data_ptr()] == ptrs
    assert layer.w0.dtype == torch.int8


def test_merge_changes_function_by_the_truncation_only():
    """Folding the exact Cayley map instead of the truncated one changes the output by about
    ``||Q||^4``: bounded by ``2 ||Q||_2^4`` per side (relative), small at small ``Q``."""
    for scale in (0.002, 0.01):
        layer, gen = _random_layer(64, 48, 16, scale)
        x = torch.randn(32, 64, dtype=torch.float64, generator=gen)
        q2 = max(float(torch.linalg.matrix_norm(
            torch.stack([skew_dense(t, lay.block, lay.block) for t in th.detach()]), ord=2).max())
            for th, lay in ((layer.theta_in, layer.layout_in),
                            (layer.theta_out, layer.layout_out)))
        with torch.no_grad():
            before = layer(x)
            layer.merge_()
            rel = float((layer(x) - before).norm() / before.norm())
        assert rel <= 2 * (2 * q2 ** 4 + q2 ** 8)
        assert rel > 0


def test_spectrum_kept_through_training_merges():
    """Train with the default recipe for 6 merges (float64): every effective weight has the
    singular values of its initial W0 after each merge."""
    torch.manual_seed(0)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(40, 24)
            self.up = nn.Linear(24, 40)
            self.down = nn.Linear(40, 24)
            self.head = nn.Linear(24, 40)

        def forward(self, ids):
            h = self.embed(ids)
            return self.head(h + self.down(torch.relu(self.up(h))))

    cfg = POETConfig(block_size=8, merge_every=4)
    model = poetx.wrap(Toy().double(), cfg)
    sv0 = {name: torch.linalg.svdvals(layer.effective_weight()) for name, layer in
           poet_layers(model)}
    opt = poetx.make_optimizer(model, lr=1e-2, poet_lr=2e-2)
    sched = MergeSchedule(model, opt, cfg)
    ids = torch.randint(0, 40, (8, 12))
    moved = 0.0
    for _ in range(6 * cfg.merge_every):
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        moved = max(moved, float(rotation_norm_max(model)))
        if sched.step():
            for name, layer in poet_layers(model):
                w = layer.effective_weight()
                assert w.dtype == torch.float64
                sv = torch.linalg.svdvals(w)
                torch.testing.assert_close(sv, sv0[name], rtol=1e-6, atol=0)
    assert sched.merges == 6 and moved > 0.05  # the rotations did move


def test_effective_weight_defaults_to_layer_dtype_and_unwrap_keeps_float64():
    layer, _ = _random_layer(20, 12, 8, 0.1)
    assert layer.effective_weight().dtype == torch.float64
    bf = POETLinear(16, 8, config=POETConfig(block_size=8), dtype=torch.bfloat16)
    assert bf.effective_weight().dtype == torch.bfloat16
    model = nn.Sequential(nn.Linear(20, 12, dtype=torch.float64))
    poetx.wrap(model, POETConfig(block_size=8, init="keep"))
    with torch.no_grad():
        model[0].theta_in.normal_(0, 0.1)
    x = torch.randn(5, 20, dtype=torch.float64)
    y = model(x)
    poetx.unwrap(model)
    assert model[0].weight.dtype == torch.float64
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", PRESET_WIDTHS)
@pytest.mark.parametrize("fmt,tol", [("int8", 0.01), ("fp8", 0.035)])
def test_quantization_with_a_group_that_does_not_divide(n, fmt, tol):
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(6, n, generator=gen)
    q, scale = quantize(w, fmt, 256)
    assert scale.shape == (6, -(-n // 256))
    deq = dequantize(q, scale, 256, torch.float64)
    torch.testing.assert_close(deq, dequantize_reference(q, scale, 256), rtol=0, atol=0)
    assert float((deq - w.double()).norm() / w.norm()) <= tol
    layer = POETLinear(n, 6, bias=False, config=POETConfig(block_size=256, w0_format=fmt,
                                                           init="keep"), weight=w)
    back = layer.effective_weight(torch.float64)  # rotations are zero: the stored W0
    assert float((back - w.double()).norm() / w.norm()) <= tol
    with pytest.raises(ValueError, match="does not fit"):
        dequantize(q, scale, 128, torch.float32)


@pytest.mark.parametrize("n", PRESET_WIDTHS)
@pytest.mark.parametrize("fmt,tol", [("int8", 0.01), ("fp8", 0.03)])
def test_no_drift_after_50_merges(n, fmt, tol):
    """50 merges of random rotations: the stored W0 stays within ``tol`` of the exactly merged
    float64 weight (each merge feeds back what the previous rounding lost)."""
    m, b = 8, 256
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    cfg = POETConfig(block_size=b, w0_format=fmt, init="keep")
    layer = POETLinear(n, m, bias=False, config=cfg, name="l", weight=w.float())
    exact = w.clone()
    for _ in range(50):
        with torch.no_grad():
            layer.theta_in.normal_(0, 0.02, generator=gen)
            layer.theta_out.normal_(0, 0.02, generator=gen)
        exact = rotate_both_sides(exact, layer.theta_out.detach(), layer.perm_out,
                                  layer.theta_in.detach(), layer.perm_in,
                                  layer.layout_out.block, layer.layout_in.block)
        layer.merge_()
    stored = layer.effective_weight(torch.float64)
    assert float((stored - exact).norm() / exact.norm()) <= tol


def test_rotation_norm_max_matches_dense_and_stays_on_device():
    layer, _ = _random_layer(20, 12, 8, 0.1)
    model = nn.Sequential(layer)
    got = rotation_norm_max(model)
    assert got.dim() == 0 and got.device == layer.theta_in.device
    want = max(float(skew_dense(t, lay.block, lay.block).norm())
               for th, lay in ((layer.theta_in, layer.layout_in),
                               (layer.theta_out, layer.layout_out)) for t in th.detach())
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_guard_merges_early_when_q_grows():
    layer, _ = _random_layer(16, 16, 8, 0.0)
    model = nn.Sequential(layer)
    cfg = POETConfig(block_size=8, merge_every=100, max_q_norm=0.5, q_norm_check_every=2)
    opt = poetx.make_optimizer(model, lr=1e-3, poet_lr=1e-3)
    sched = MergeSchedule(model, opt, cfg)
    assert not sched.step()  # step 1: no check
    with torch.no_grad():
        layer.theta_in[0, 0] = 1.0
    assert sched.step()  # step 2: checked, ||Q||_F = sqrt(2) > 0.5
    assert sched.early_merges == 1 and float(rotation_norm_max(model)) == 0
    assert sched.state_dict()["early_merges"] == 1
