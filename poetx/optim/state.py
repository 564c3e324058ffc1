"""In-place reset of an optimizer's per-parameter state (what a merge needs)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

ADAM_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})


def _holder(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> torch.optim.Optimizer:
    """The optimizer whose ``state`` holds ``p``'s: ``optimizer``, or its inner one
    (``LowBitAdamW.state_holder``)."""
    holder = getattr(optimizer, "state_holder", None)
    return holder(p) if holder is not None else optimizer


def _state_of(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict:
    return _holder(optimizer, p).state.get(p)


def _plain(t: torch.Tensor) -> bool:
    """Not a quantized state (torchao's 8-bit states carry codes, scales and a code table);
    DTensor shards of FSDP2 are plain here."""
    return not (hasattr(t, "codes") and hasattr(t, "qmap"))


def _fill_quantized_(t: torch.Tensor, value: torch.Tensor | float) -> None:
    """Set a quantized state tensor (torchao ``OptimState8bit``) to ``value`` everywhere: it
    supports ``copy_`` from a plain tensor (quantizing it), not ``zero_``."""
    t.copy_(torch.as_tensor(value, dtype=torch.float32, device=t.device).expand(t.shape)
            .contiguous())


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
        state = _state_of(optimizer, p)
        if not state:
            continue
        count += 1
        if set(state) <= ADAM_STATE_KEYS:
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    if _plain(v):
                        tensors.append(v)
                    else:  # 8-bit codes: zero means the code of 0, written by quantizing 0
                        _fill_quantized_(v, 0.0)
        else:  # an optimizer whose zero state may not mean "fresh"
            _holder(optimizer, p).state.pop(p)
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
        state = _state_of(optimizer, p)
        if not state:
            continue
        count += 1
        if not (set(state) <= ADAM_STATE_KEYS and "exp_avg_sq" in state):
            reset_state_(optimizer, [p])
            continue
        sq = state["exp_avg_sq"]
        if _plain(sq):
            firsts.append(state["exp_avg"])
            sq.copy_(sq.mean().expand_as(sq))
        else:  # 8-bit states (torchao): through their dequantized values
            _fill_quantized_(state["exp_avg"], 0.0)
            _fill_quantized_(sq, sq.dequantize().mean())
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
