"""Skew-symmetric half storage and the Cayley / Cayley-Neumann maps (plain PyTorch).

This is the reference the Triton kernels are tested against, and the CPU path.

Shapes: ``theta`` is ``(num_blocks, b*(b-1)//2)``, the strict upper triangle of each block in
row-major order (the order of ``torch.triu_indices(b, b, 1)``); blocks are ``(num_blocks, b, b)``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def num_skew_params(block: int) -> int:
    return block * (block - 1) // 2


def block_from_num_params(num_params: int) -> int:
    """Inverse of :func:`num_skew_params`."""
    block = int(round((1 + (1 + 8 * num_params) ** 0.5) / 2))
    if num_skew_params(block) != num_params:
        raise ValueError(f"{num_params} is not b*(b-1)/2 for any block size b")
    return block


@functools.lru_cache(maxsize=32)
def _triu_indices(block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows, cols = torch.triu_indices(block, block, offset=1, device=device)
    return rows, cols


def skew_from_half(theta: Tensor, block: int) -> Tensor:
    """``(nb, b(b-1)/2) -> (nb, b, b)`` skew-symmetric ``Q`` with ``Q[i, j] = theta[idx(i, j)]``."""
    rows, cols = _triu_indices(block, theta.device)
    upper = theta.new_zeros(theta.shape[0], block, block)
    upper[:, rows, cols] = theta
    return upper - upper.transpose(1, 2)


def half_from_skew(q: Tensor) -> Tensor:
    """``(nb, b, b) -> (nb, b(b-1)/2)``: the strict upper triangle."""
    rows, cols = _triu_indices(q.shape[-1], q.device)
    return q[:, rows, cols]


def neumann_coefficients(terms: int) -> list[int]:
    """Coefficients ``c_p`` of ``(I + Q)(I + Q + ... + Q^k) = sum_p c_p Q^p``, ``p = 0..k+1``."""
    return [1] + [2] * terms + [1]


def cayley_neumann_delta(q: Tensor, terms: int) -> Tensor:
    """``R - I`` for the truncated Cayley map ``R = (I + Q)(I + Q + ... + Q^terms)``.

    The identity is left out so that the small rotation survives a cast to bf16: layers apply
    ``x + x @ (R - I)^T`` rather than ``x @ R^T``.
    """
    coeffs = neumann_coefficients(terms)
    delta = coeffs[1] * q
    power = q
    for c in coeffs[2:]:
        power = power @ q
        delta = delta + c * power
    return delta


def cayley_neumann(q: Tensor, terms: int) -> Tensor:
    """Truncated Cayley map ``(I + Q)(I + Q + ... + Q^terms)`` of a batch ``(nb, b, b)``."""
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device) + cayley_neumann_delta(q, terms)


def cayley_exact(q: Tensor) -> Tensor:
    """Exact Cayley map ``(I + Q)(I - Q)^-1`` (orthogonal for any skew ``Q``)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    # (I + Q)(I - Q)^-1 = ((I - Q)^-T (I + Q)^T)^T: one solve on the transposes.
    # ``solve_ex`` without its error check: ``linalg.solve`` reads the factorization's status
    # back to the host, a sync in every build. No check is lost: ``I - Q`` is never singular
    # for a skew ``Q`` (its eigenvalues are ``1 - i*lambda``).
    solution, _ = torch.linalg.solve_ex((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2),
                                        check_errors=False)
    return solution.transpose(-1, -2)


def orthogonality_bound(q_norm: float, terms: int) -> float:
    """Bound on ``||R^T R - I||_2`` for the truncated map at spectral norm ``||Q||_2``.

    With ``C`` the exact Cayley map, ``R = C (I - Q^(k+1))`` and ``C`` commutes with ``Q``, so
    ``R^T R = (I - (-Q)^(k+1)) (I - Q^(k+1))`` and the error is at most
    ``2 ||Q||^(k+1) + ||Q||^(2(k+1))``.
    """
    p = q_norm ** (terms + 1)
    return 2 * p + p * p


def rotation_delta_reference(
    theta: Tensor, block: int, terms: int | None, valid_last: int | None = None
) -> Tensor:
    """``R_k - I`` of the orthogonal blocks from half-stored skew parameters (reference path).

    Args:
        theta: ``(nb, b(b-1)/2)``.
        terms: Neumann terms, or ``None`` for the exact Cayley map.
        valid_last: number of real coordinates in the last block when the dimension is padded;
            the padded rows and columns of its ``Q`` are forced to zero, so the block acts as the
            identity on them and as a rotation on the real coordinates.
    Returns:
        ``(nb, b, b)`` blocks ``R_k - I``, in ``theta``'s dtype.
    """
    q = _mask_last(skew_from_half(theta, block), block, valid_last)
    if terms is None:
        return cayley_exact(q) - torch.eye(block, dtype=q.dtype, device=q.device)
    return cayley_neumann_delta(q, terms)


def _mask_last(q: Tensor, block: int, valid_last: int | None) -> Tensor:
    if valid_last is None or valid_last >= block:
        return q
    keep = torch.zeros(block, dtype=q.dtype, device=q.device)
    keep[:valid_last] = 1
    last = q[-1] * keep[:, None] * keep[None, :]
    return torch.cat([q[:-1], last[None]], dim=0)


def rotation_delta_backward_reference(
    theta: Tensor, grad_delta: Tensor, block: int, terms: int | None, valid_last: int | None = None
) -> Tensor:
    """Gradient of ``sum(grad_delta * rotation_delta_reference(theta))`` w.r.t. ``theta``.

    For ``R - I = sum_p c_p Q^p``: ``dL/dQ = sum_p c_p sum_{a+b=p-1} (Q^a)^T G (Q^b)^T``, and
    ``(Q^a)^T = (-Q)^a`` since ``Q`` is skew. For the exact map
    ``dL/dQ = (I + R)^T G (I - Q)^-T``. Then ``dtheta = (dQ - dQ^T)`` on the upper triangle.
    """
    q = _mask_last(skew_from_half(theta, block), block, valid_last)
    g = grad_delta.to(q.dtype)
    eye = torch.eye(block, dtype=q.dtype, device=q.device)
    if terms is None:
        r = cayley_exact(q)
        # inv_ex without its error check, as in ``cayley_exact``: no host sync.
        inverse, _ = torch.linalg.inv_ex(eye - q, check_errors=False)
        grad_q = (eye + r).transpose(-1, -2) @ g @ inverse.transpose(-1, -2)
    else:
        coeffs = neumann_coefficients(terms)
        powers = [eye.expand_as(q)]
        for _ in range(terms):
            powers.append(powers[-1] @ q)
        # (Q^a)^T G (Q^b)^T = (-1)^(a+b) Q^a G Q^b
        grad_q = torch.zeros_like(q)
        for a in range(terms + 1):
            left = powers[a] @ g
            for b_ in range(terms + 1 - a):
                sign = -1.0 if (a + b_) % 2 else 1.0
                grad_q = grad_q + (sign * coeffs[a + b_ + 1]) * (left @ powers[b_])
    grad_q = _mask_last(grad_q, block, valid_last)
    return half_from_skew(grad_q - grad_q.transpose(-1, -2))
