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


@torch.no_grad()
def rewarm_state_(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> int:
    """Restart Adam on ``params`` gently, in place: zero the first moment, replace each
    tensor's second moment by its mean, keep the step count. The first updates are then
    ``(1 - beta1)`` of a full one and ramp up over about ``1 / (1 - beta1)`` steps, where a
    fresh state would move every entry by ``lr`` at once (``m / sqrt(v) = sign(g)``). The mean
    is the honest estimate of the new parameters' gradient scale after a merge re-permutes the
    coordinates. The learning rate is not touched. State with other keys than Adam's is
    handled as in :func:`reset_state_`. Returns how many parameters had state."""
    count = 0
    firsts = []
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        count += 1
        if not (set(state) <= ADAM_STATE_KEYS and "exp_avg_sq" in state):
            reset_state_(optimizer, [p])
            continue
        firsts.append(state["exp_avg"])
        sq = state["exp_avg_sq"]
        sq.copy_(sq.mean().expand_as(sq))
        if "max_exp_avg_sq" in state:
            state["max_exp_avg_sq"].copy_(sq)
    for device_tensors in _by_device(firsts).values():
        torch._foreach_zero_(device_tensors)
    return count


def _by_device(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups
