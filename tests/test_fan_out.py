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
