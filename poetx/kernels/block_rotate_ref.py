"""Plain-PyTorch reference of the permuted block-diagonal rotation and its block gradient.

Conventions shared with the Triton kernels in ``block_rotate.py``:

- ``x``: ``(T, cols)``; ``delta``: ``(nb, b, b)`` holding ``R_k - I``.
- ``in_index`` / ``out_index``: ``(nb*b,)`` int64, entry ``p`` is the column of ``x`` (or of the
  output) at rotated position ``p``, ``-1`` a phantom (reads zero, is never written). ``None``
  means the identity: position ``p`` is column ``p`` when ``p < cols``, a phantom otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gather_columns(x: Tensor, index: Tensor | None, positions: int) -> Tensor:
    """``(T, cols) -> (T, positions)``: column ``index[p]`` at position ``p``, zero for phantoms."""
    if index is None:
        pad = positions - x.shape[-1]
        return torch.nn.functional.pad(x, (0, pad)) if pad > 0 else x[:, :positions]
    padded = torch.nn.functional.pad(x, (0, 1))
    safe = torch.where(index < 0, x.shape[-1], index)
    return padded[:, safe]


def scatter_columns(r: Tensor, index: Tensor | None, cols: int) -> Tensor:
    """``(T, positions) -> (T, cols)``: position ``p`` to column ``index[p]``; phantoms dropped.
    A new tensor, as the kernels write (not a view keeping the phantom columns' memory)."""
    if index is None:
        return r[:, :cols].contiguous()
    out = r.new_zeros(r.shape[0], cols)
    valid = index >= 0
    out[:, index[valid]] = r[:, valid]
    return out


def block_rotate_reference(
    x: Tensor,
    delta: Tensor,
    in_index: Tensor | None,
    out_index: Tensor | None,
    out_cols: int,
    transpose: bool = False,
) -> Tensor:
    """``out[:, out_index[kb+i]] = sum_j (I + D_k)[i, j] x[:, in_index[kb+j]]`` (``D_k^T`` if
    ``transpose``), computed as ``x + x D^T`` so a low-precision ``D`` keeps the identity exact.

    Returns ``(T, out_cols)`` in ``x.dtype``.
    """
    nb, b, _ = delta.shape
    xp = gather_columns(x, in_index, nb * b).reshape(-1, nb, b)
    d = delta.to(x.dtype)
    pattern = "tkj,kji->tki" if transpose else "tkj,kij->tki"
    rotated = xp + torch.einsum(pattern, xp, d)
    return scatter_columns(rotated.reshape(-1, nb * b), out_index, out_cols)


def block_gram_reference(
    a: Tensor, b_: Tensor, a_index: Tensor | None, b_index: Tensor | None, nb: int, block: int
) -> Tensor:
    """``G[k, i, j] = sum_t a[t, a_index[kb+i]] * b[t, b_index[kb+j]]``, ``(nb, b, b)`` float32
    (float64 for float64 inputs): the gradient of the blocks of a rotation."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    ap = gather_columns(a, a_index, nb * block).reshape(-1, nb, block).to(acc)
    bp = gather_columns(b_, b_index, nb * block).reshape(-1, nb, block).to(acc)
    return torch.einsum("tki,tkj->kij", ap, bp)


_ATTACHED_INVERSE = "_poetx_inverse"


def attach_inverse(index: Tensor, inverse: Tensor) -> None:
    """Declare ``inverse`` (``(cols,)`` int32, ``inverse[index[p]] = p``) the inverse of the
    padded ``index`` as it is now, for the Triton scatters to read instead of inverting
    ``index`` on every call. It holds until ``index`` is next changed in place (its version
    counter moves); an owner that changes both together attaches again. A CUDA graph captured
    with it reads ``inverse`` at replay, so whoever changes ``index`` in place between replays
    must change ``inverse`` with it (``POETLinear`` does both in one place)."""
    setattr(index, _ATTACHED_INVERSE, (inverse, index._version, index.data_ptr()))


def attached_inverse(index: Tensor, cols: int) -> Tensor | None:
    """The inverse attached to ``index`` if it still holds and has ``cols`` entries."""
    attached = getattr(index, _ATTACHED_INVERSE, None)
    if attached is None:
        return None
    # A copy of the tensor (deepcopy) carries the attribute but not the storage it was for.
    inverse, version, storage = attached
    if (version != index._version or storage != index.data_ptr() or inverse.shape != (cols,)
            or inverse.dtype != torch.int32 or inverse.device != index.device):
        return None
    return inverse


def fan_out_reference(x: Tensor, indices: Tensor, positions: int) -> Tensor:
    """``(T, cols)`` -> ``(K, T, positions)``: ``x`` gathered by each row of ``indices``
    ``(K, >= positions)``, the permuted copies that layers reading the same ``x`` compute on."""
    return torch.stack([gather_columns(x, index[:positions], positions) for index in indices])


def fan_in_reference(grads: list[Tensor | None], indices: Tensor, cols: int) -> Tensor | None:
    """The backward of :func:`fan_out_reference`: ``sum_k scatter_columns(grads[k],
    indices[k], cols)``, added in order in float32 (float64 for float64), in the gradients'
    dtype; ``None`` gradients count as zero, all ``None`` gives ``None``."""
    acc = None
    for index, g in zip(indices, grads, strict=True):
        if g is None:
            continue
        wide = torch.float64 if g.dtype == torch.float64 else torch.float32
        part = scatter_columns(g.to(wide), index[: g.shape[1]], cols)
        acc = part if acc is None else acc + part
        dtype = g.dtype
    return None if acc is None else acc.to(dtype)
