"""Initialization of the frozen weight ``W0``."""

from __future__ import annotations

import torch
from torch import Tensor


def normalized_gaussian(
    out_features: int,
    in_features: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``(out, in)`` float32 Gaussian matrix whose rows (neurons) have unit Euclidean norm.

    POET's recommended "normalized Gaussian" initialization: each neuron lies on the unit sphere,
    and since training only rotates, the spectrum of this matrix is kept for the whole run.
    """
    w = torch.randn(out_features, in_features, generator=generator, device=device)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
