"""Layers of a decoder block that read the same input, given their permuted copies together.

A Llama block calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` on one tensor, then
``gate_proj(h)``, ``up_proj(h)``. Each POET layer computes on its input permuted by its own
``index_in``; gathered layer by layer, the input is read once per layer, and in backward each
layer scatters its input gradient back and autograd adds them up. :class:`SharedInputs` learns
from the group's first forward which layers run one after another on the same tensor (a run
of at least two with the same input width, padding and dtype), and from then on gives them
their copies from one :func:`poetx.ops.fan_out.fan_out`: one read of the input, one summed
scatter of the gradients.

Only consecutive calls form a run, so no copy waits in memory while other layers run. A later
forward that breaks the pattern (another tensor, a member skipped) falls back to the layer's
own gather for what does not match.
"""

from __future__ import annotations

from torch import Tensor

from poetx.ops.fan_out import fan_out


def _shape_key(layer) -> tuple:
    return (layer.in_features, layer.layout_in.padded_dim, layer.compute_dtype)


def sibling_runs(seen: list[tuple[object, int]]) -> list[tuple]:
    """Runs of at least two consecutive ``(layer, input id)`` entries with one input id and
    one :func:`_shape_key`, each layer in at most one run (its first)."""
    runs, current, used = [], [], set()
    for layer, key in [*seen, (None, None)]:
        if (current and key == current[0][1] and layer is not None
                and _shape_key(layer) == _shape_key(current[0][0]) and id(layer) not in used
                and all(m is not layer for m, _ in current)):
            current.append((layer, key))
            continue
        if len(current) >= 2:
            runs.append(tuple(m for m, _ in current))
            used.update(id(m) for m, _ in current)
        current = [] if layer is None or id(layer) in used else [(layer, key)]
    return runs


class SharedInputs:
    """Per decoder block: which of its layers share an input, and this forward's copies."""

    def __init__(self) -> None:
        # Keyed by the layers themselves, not their ids, so that a deep copy of the model
        # (which copies this object with it) maps them to the copy's layers.
        self.runs: dict[object, tuple] | None = None  # layer -> its run; None: still learning
        self.seen: list[tuple[object, int]] = []
        self.pending: dict[object, tuple[Tensor, Tensor]] = {}  # layer -> (input, its copy)

    def begin(self) -> None:
        self.pending.clear()
        self.seen.clear()

    def end(self) -> None:
        self.pending.clear()
        if self.runs is None and self.seen:
            self.runs = {m: run for run in sibling_runs(self.seen) for m in run}
        self.seen.clear()

    def copy_for(self, layer, x: Tensor) -> Tensor | None:
        """``layer``'s input ``x`` gathered by its ``index_in`` and flattened to
        ``(T, padded in)``, or ``None`` when ``layer`` gathers it itself."""
        if self.runs is None:
            self.seen.append((layer, id(x)))
            return None
        hit = self.pending.pop(layer, None)
        if hit is not None:
            return hit[1] if hit[0] is x else None
        run = self.runs.get(layer)
        if run is None or run[0] is not layer:
            return None
        # The layers' own buffers, read in place; each carries its inverse for the backward
        # (no stacked copy, no inversion each step).
        copies = fan_out(x.reshape(-1, x.shape[-1]), [m.index_in for m in run],
                         layer.layout_in.padded_dim)
        for member, copy in zip(run[1:], copies[1:], strict=True):
            self.pending[member] = (x, copy)
        return copies[0]
