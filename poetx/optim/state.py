"""In-place reset of an optimizer's per-parameter state (what a merge needs)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

ADAM_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})


@torch.no_grad()
def reset_state_(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Zero every tensor of the optimizer state of ``params`` in place; returns how many
    parameters had state.

    For Adam(W) this zeroes ``exp_avg``, ``exp_avg_sq`` and ``step``, which gives exactly the
    update that deleting the state would (the next step re-creates it as zeros), but keeps the
    tensors where they are: a captured CUDA graph that reads them stays valid, and nothing is
    re-allocated. State with other keys than Adam's is deleted instead (a zero there need not
    mean a fresh state).
    """
    tensors = []
    count = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        count += 1
        if set(state) <= ADAM_STATE_KEYS:
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        else:  # an optimizer whose zero state may not mean "fresh" (e.g. quantized codes)
            optimizer.state.pop(p)
    for device_tensors in _by_device(tensors).values():
        torch._foreach_zero_(device_tensors)
    return count


def _by_device(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups
