"""Independent float64 references for tests: dense matrices built straight from the definitions
(explicit loops, no code shared with the fast path)."""

from __future__ import annotations

import torch
from torch import Tensor


def skew_dense(theta_row: Tensor, b: int, valid: int) -> Tensor:
    """One block's skew matrix from its half storage, by explicit loops over the upper triangle."""
    q = torch.zeros(b, b, dtype=torch.float64)
    k = 0
    for i in range(b):
        for j in range(i + 1, b):
            if i < valid and j < valid:
                q[i, j] = theta_row[k]
                q[j, i] = -theta_row[k]
            k += 1
    return q


def cayley_dense(q: Tensor, terms: int | None) -> Tensor:
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    if terms is None:
        return (eye + q) @ torch.linalg.inv(eye - q)
    series = sum(torch.linalg.matrix_power(q, p) for p in range(terms + 1))
    return (eye + q) @ series


def rotation_dense(theta: Tensor, perm: Tensor, block: int, terms: int | None) -> Tensor:
    """``(dim, dim)`` orthogonal matrix of one side in the original coordinates.

    Position ``p`` of the permuted frame holds coordinate ``perm[p]``; block ``k`` acts on
    positions ``k*b .. k*b+b-1`` (the last block may hold fewer real positions)."""
    dim = perm.numel()
    out = torch.zeros(dim, dim, dtype=torch.float64)
    for k in range(theta.shape[0]):
        start = k * block
        valid = min(block, dim - start)
        r = cayley_dense(skew_dense(theta[k].double(), block, valid), terms)
        for a in range(valid):
            for c in range(valid):
                out[perm[start + a], perm[start + c]] = r[a, c]
    return out


def effective_weight_dense(layer, w0_original: Tensor) -> Tensor:
    """``R W0 P`` from the layer's parameters and permutations and the original-frame ``W0``."""
    terms = layer.config.neumann_terms
    r = rotation_dense(layer.theta_out.detach(), layer.perm_out, layer.layout_out.block, terms)
    p = rotation_dense(layer.theta_in.detach(), layer.perm_in, layer.layout_in.block, terms)
    return r @ w0_original.double() @ p



def exact_blocks(theta: Tensor, dim: int, block: int) -> Tensor:
    """``(nb, b, b)`` exact Cayley blocks ``(I + Q)(I - Q)^-1`` (explicit inverse), with the
    phantom rows/columns of the last block's ``Q`` zeroed."""
    nb = theta.shape[0]
    rows, cols = torch.triu_indices(block, block, 1)
    q = torch.zeros(nb, block, block, dtype=torch.float64)
    q[:, rows, cols] = theta.double()
    q = q - q.transpose(1, 2)
    valid_last = dim - (nb - 1) * block
    q[-1, valid_last:, :] = 0
    q[-1, :, valid_last:] = 0
    eye = torch.eye(block, dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def rotate_both_sides(w: Tensor, theta_out: Tensor, perm_out: Tensor, theta_in: Tensor,
                      perm_in: Tensor, block_out: int, block_in: int) -> Tensor:
    """``C_R w C_P`` in the original frame (float64) for wide layers, without dense ``m x m``
    matrices: ``(w P)[:, perm[kb+c]] = sum_a w[:, perm[kb+a]] r_k[a, c]`` and the same on rows.
    Phantom positions read a zero column and are dropped."""

    def right(w: Tensor, theta: Tensor, perm: Tensor, block: int) -> Tensor:
        rows, dim = w.shape
        r = exact_blocks(theta, dim, block)
        nb = r.shape[0]
        idx = torch.cat([perm, perm.new_full((nb * block - dim,), dim)])
        wp = torch.cat([w, w.new_zeros(rows, 1)], dim=1)[:, idx].view(rows, nb, block)
        out = torch.einsum("mka,kac->mkc", wp, r).reshape(rows, nb * block)
        result = w.new_zeros(rows, dim + 1)
        result[:, idx] = out
        return result[:, :dim]

    w = right(w.double(), theta_in, perm_in, block_in)
    # R w = (w^T R^T)^T, and R^T is the exact map of -Q.
    return right(w.t(), -theta_out, perm_out, block_out).t()
