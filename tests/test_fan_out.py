"""The fan-out node: copies and gradients against gathering and scattering per copy."""

from __future__ import annotations

import pytest
import torch

from poetx.kernels.block_rotate_ref import gather_columns
from poetx.ops.fan_out import fan_out


@pytest.mark.parametrize("dim,positions", [(12, 12), (13, 16)])
def test_fan_out_matches_separate_gathers_and_their_gradients(dim, positions):
    torch.manual_seed(0)
    T, k = 7, 3
    x = torch.randn(T, dim, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.cat([torch.randperm(dim),
                                      torch.full((positions - dim,), -1)]) for _ in range(k)])
    weights = [torch.randn(T, positions, dtype=torch.float64) for _ in range(k)]
    copies = fan_out(x, indices, positions)
    assert len(copies) == k
    loss = sum((c * w).sum() for c, w in zip(copies, weights, strict=True))
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)

    x2 = x.detach().clone().requires_grad_(True)
    separate = [gather_columns(x2, index, positions) for index in indices]
    for c, s in zip(copies, separate, strict=True):
        assert torch.equal(c, s)
    (ref,) = torch.autograd.grad(sum((s * w).sum() for s, w in zip(separate, weights,
                                                                     strict=True)), x2)
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-12)
    # a copy nobody used gives no gradient; the others still flow
    (partial,) = torch.autograd.grad((copies[0] * weights[0]).sum(), x)
    (ref0,) = torch.autograd.grad((gather_columns(x2, indices[0], positions)
                                   * weights[0]).sum(), x2)
    torch.testing.assert_close(partial, ref0, rtol=0, atol=1e-12)


def test_fan_out_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.cat([torch.randperm(6), torch.full((2,), -1)])
                           for _ in range(2)])
    assert torch.autograd.gradcheck(lambda t: fan_out(t, indices, 8), (x,))


def test_fan_out_names_bad_shapes():
    with pytest.raises(ValueError, match="fan_out"):
        fan_out(torch.randn(3, 4), torch.zeros(2, 3, dtype=torch.long), 4)


@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_layers_on_fan_out_copies_match_their_own_gathers(mode):
    """Three layers reading one input (q/k/v-like) computing on fan-out copies: the outputs,
    the input gradient and the block gradients equal the usual path's (each layer gathering
    and scattering on its own), in float64."""
    from poetx.config import POETConfig
    from poetx.layers.poet_linear import POETLinear
    from poetx.ops.rotated_gemm import poet_linear_prebuilt
    from poetx.ops.rotation_group import build_rotation_blocks

    torch.manual_seed(2)
    dim, outs, b, T = 40, (40, 24, 24), 16, 9
    cfg = POETConfig(block_size=b, mode=mode)
    layers = [POETLinear(dim, m, bias=False, config=cfg, name=f"l{i}", dtype=torch.float64)
              for i, m in enumerate(outs)]
    for layer in layers:
        with torch.no_grad():
            layer.theta_in.normal_(0, 0.05)
            layer.theta_out.normal_(0, 0.05)
    blocks = []
    for layer in layers:
        d_in, d_out = (build_rotation_blocks([getattr(layer, f"theta_{s}")],
                                             getattr(layer, f"layout_{s}").block, 3,
                                             getattr(layer, f"layout_{s}").valid_last,
                                             torch.float64)[0] for s in ("in", "out"))
        blocks.append((d_in.detach(), d_out.detach()))
    positions = layers[0].layout_in.padded_dim
    weights = [torch.randn(T, m, dtype=torch.float64) for m in outs]

    def run(use_fan_out):
        x = torch.randn(T, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        x.requires_grad_(True)
        handles = [(torch.zeros(d_in.shape, dtype=torch.float64, requires_grad=True),
                    torch.zeros(d_out.shape, dtype=torch.float64, requires_grad=True))
                   for d_in, d_out in blocks]
        copies = (fan_out(x, torch.stack([layer.index_in for layer in layers]), positions)
                  if use_fan_out else [None] * len(layers))
        ys = []
        for layer, (d_in, d_out), (g_in, g_out), copy in zip(layers, blocks, handles, copies,
                                                             strict=True):
            ys.append(poet_linear_prebuilt(x, layer.w0, None, cfg.quant_group_size, d_in, d_out,
                                           g_in, g_out, layer.index_in, layer.index_out,
                                           mode == "fast", copy))
        loss = sum((y * w).sum() for y, w in zip(ys, weights, strict=True))
        grads = torch.autograd.grad(loss, [x, *[h for pair in handles for h in pair]])
        return [y.detach() for y in ys], grads

    ys_fan, grads_fan = run(True)
    ys_own, grads_own = run(False)
    for a, b_ in zip(ys_fan + list(grads_fan), ys_own + list(grads_own), strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)
