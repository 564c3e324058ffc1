"""The orthogonal parameterization: half storage, Cayley-Neumann, layouts."""

from __future__ import annotations

import pytest
import torch

from poetx.ortho.cayley import (
    cayley_exact,
    cayley_neumann,
    half_from_skew,
    num_skew_params,
    orthogonality_bound,
    rotation_delta_backward_reference,
    rotation_delta_reference,
    skew_from_half,
)
from poetx.ortho.layout import BlockLayout, draw_permutation, inverse_permutation, layer_seed
from tests.reference import cayley_dense, skew_dense


def random_skew(nb, b, scale):
    theta = torch.randn(nb, num_skew_params(b), dtype=torch.float64) * scale
    return theta, skew_from_half(theta, b)


def test_half_storage_round_trip_and_layout():
    theta, q = random_skew(3, 6, 1.0)
    torch.testing.assert_close(q, -q.transpose(1, 2))
    torch.testing.assert_close(q[1], skew_dense(theta[1], 6, 6))
    assert torch.equal(half_from_skew(q), theta)


@pytest.mark.parametrize("b", [4, 16, 32])
def test_neumann_approaches_exact_cayley(b):
    _, q = random_skew(2, b, 0.3 / b**0.5)
    exact = cayley_exact(q)
    torch.testing.assert_close(exact[0], cayley_dense(q[0], None))
    errors = [torch.linalg.matrix_norm(cayley_neumann(q, k) - exact, ord=2).max().item()
              for k in range(1, 9)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    # R_k - C = -C Q^(k+1) with C orthogonal: the error is at most ||Q||^(k+1)
    q_norm = torch.linalg.matrix_norm(q, ord=2).max().item()
    for k, err in enumerate(errors, start=1):
        assert err <= q_norm ** (k + 1) * (1 + 1e-9)


@pytest.mark.parametrize("terms", [1, 2, 3, 5])
@pytest.mark.parametrize("scale", [1e-3, 1e-2, 5e-2])
def test_orthogonality_error_within_truncation_bound(terms, scale):
    b = 16
    _, q = random_skew(4, b, scale)
    r = cayley_neumann(q, terms)
    eye = torch.eye(b, dtype=torch.float64)
    for k in range(q.shape[0]):
        err = torch.linalg.matrix_norm(r[k].T @ r[k] - eye, ord=2).item()
        bound = orthogonality_bound(torch.linalg.matrix_norm(q[k], ord=2).item(), terms)
        assert err <= bound * (1 + 1e-9) + 1e-14


def test_exact_cayley_is_orthogonal():
    _, q = random_skew(3, 12, 1.0)
    r = cayley_exact(q)
    eye = torch.eye(12, dtype=torch.float64).expand(3, 12, 12)
    torch.testing.assert_close(r.transpose(1, 2) @ r, eye)


def test_padded_last_block_is_identity_on_phantoms():
    theta, _ = random_skew(2, 8, 0.3)
    delta = rotation_delta_reference(theta, 8, 3, valid_last=5)
    assert delta[1, 5:].abs().sum() == 0 and delta[1, :, 5:].abs().sum() == 0
    assert delta[0].abs().sum() > 0


@pytest.mark.parametrize("terms", [None, 1, 3])
@pytest.mark.parametrize("valid_last", [None, 5])
def test_analytic_backward_matches_autograd(terms, valid_last):
    theta, _ = random_skew(3, 8, 0.2)
    grad = torch.randn(3, 8, 8, dtype=torch.float64)
    leaf = theta.clone().requires_grad_()
    (rotation_delta_reference(leaf, 8, terms, valid_last) * grad).sum().backward()
    torch.testing.assert_close(
        rotation_delta_backward_reference(theta, grad, 8, terms, valid_last), leaf.grad
    )


def test_block_layout():
    lay = BlockLayout.for_dim(2736, 256)
    assert (lay.num_blocks, lay.padded_dim, lay.valid_last) == (11, 2816, 176)
    assert BlockLayout.for_dim(4096, 256).valid_last is None
    assert BlockLayout.for_dim(100, 256).block == 100
    idx = lay.padded_index(draw_permutation(2736, 1))
    assert (idx[2736:] == -1).all() and sorted(idx[:2736].tolist()) == list(range(2736))
    perm = draw_permutation(50, 9)
    assert torch.equal(perm[inverse_permutation(perm)], torch.arange(50))
    assert layer_seed(0, "a", 0, "in") == layer_seed(0, "a", 0, "in") != layer_seed(0, "a", 1, "in")

