"""Block layout of one side of a layer and its random permutations.

A side of dimension ``dim`` is cut into ``num_blocks`` blocks of ``block`` coordinates after a
random permutation. When ``block`` does not divide ``dim`` the last block holds
``valid_last < block`` real coordinates and ``block - valid_last`` phantom ones, on which the
rotation is the identity. Index tensors have ``num_blocks * block`` entries: entry ``p`` is the
original coordinate at permuted position ``p``, or ``-1`` for a phantom.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockLayout:
    dim: int
    block: int

    @classmethod
    def for_dim(cls, dim: int, block_size: int) -> BlockLayout:
        if dim < 1:
            raise ValueError(f"dimension must be positive, got {dim}")
        return cls(dim=dim, block=min(block_size, dim))

    @property
    def num_blocks(self) -> int:
        return -(-self.dim // self.block)

    @property
    def padded_dim(self) -> int:
        return self.num_blocks * self.block

    @property
    def valid_last(self) -> int | None:
        """Real coordinates in the last block, or ``None`` when ``block`` divides ``dim``."""
        rem = self.dim % self.block
        return None if rem == 0 else rem

    def padded_index(self, perm: Tensor) -> Tensor:
        """``(dim,)`` permutation -> ``(padded_dim,)`` index with ``-1`` for phantoms."""
        pad = self.padded_dim - self.dim
        if pad == 0:
            return perm
        return torch.cat([perm, perm.new_full((pad,), -1)])


def layer_seed(base_seed: int, name: str, merge_count: int, side: str) -> int:
    """A 63-bit seed that depends only on its arguments (stable across processes and ranks)."""
    digest = hashlib.blake2b(
        f"{base_seed}/{name}/{merge_count}/{side}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_permutation(dim: int, seed: int) -> Tensor:
    """A uniformly random permutation of ``range(dim)`` (int64, CPU) from ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randperm(dim, generator=gen)


def inverse_permutation(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv
