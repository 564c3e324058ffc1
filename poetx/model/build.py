"""Build a POET-X model without ever materializing its dense linear weights.

``wrap`` needs the dense model in memory first (twice the size of bf16 ``W0`` for a moment is
fine for 8B, not for 30B on one GPU). Here the model is constructed on the meta device, every
eligible ``nn.Linear`` becomes a ``POETLinear`` drawn directly on the target device with the
normalized init, and the remaining parameters (embeddings, norms, lm_head) are materialized
and initialized there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from poetx.config import POETConfig
from poetx.layers.framed_mlp import fuse_mlp_frames
from poetx.layers.poet_linear import POETLinear
from poetx.layers.rotation_groups import group_rotations
from poetx.model.wrap import _set_submodule, eligible_linears, shared_mlp_frames


def _materialize_leftovers(model: nn.Module, device: torch.device, dtype: torch.dtype,
                           init_std: float) -> None:
    for module in model.modules():
        if isinstance(module, POETLinear):
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            fresh = torch.empty(p.shape, device=device, dtype=dtype)
            if isinstance(module, (nn.Embedding, nn.Linear)) and name == "weight":
                nn.init.normal_(fresh, 0.0, init_std)
            elif name == "bias":
                nn.init.zeros_(fresh)
            else:  # norm scales
                nn.init.ones_(fresh)
            setattr(module, name, nn.Parameter(fresh, requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:
                raise RuntimeError(
                    f"build_poet_model: buffer {type(module).__name__}.{name} was created on the "
                    "meta device and cannot be recomputed here; pass rebuild_buffers"
                )


def build_poet_model(
    make_model: Callable[[], nn.Module],
    config: POETConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    init_std: float = 0.02,
    rebuild_buffers: Callable[[nn.Module, torch.device], None] | None = None,
) -> nn.Module:
    """``make_model()`` constructed on meta, reparameterized and materialized on ``device``.

    Needs ``config.init == "normalized"`` (there is no dense weight to keep). ``rebuild_buffers``
    recreates non-parameter state computed at construction (e.g. rotary frequencies). Tied
    weights are re-tied through ``model.tie_weights()`` when the model has it.
    """
    if config.init != "normalized":
        raise ValueError("build_poet_model: init must be 'normalized' (no dense weight exists)")
    device = torch.device(device)
    with torch.device("meta"):
        model = make_model()
    targets = list(eligible_linears(model, config))
    frames = shared_mlp_frames(targets) if config.mlp_permutations == "shared" else {}
    for name, linear in targets:
        frame_in, frame_out = frames.get(name, ("", ""))
        layer = POETLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           config=config, name=name, device=device, dtype=dtype,
                           frame_in=frame_in, frame_out=frame_out)
        _set_submodule(model, name, layer)
    if rebuild_buffers is not None:
        rebuild_buffers(model, device)
    _materialize_leftovers(model, device, dtype, init_std)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    group_rotations(model)
    if config.mlp_frames == "fused":
        fuse_mlp_frames(model)
    return model


def rebuild_hf_rotary(model: nn.Module, device: torch.device) -> None:
    """Recreate Hugging Face rotary-embedding modules (their ``inv_freq`` is computed at init)."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            _set_submodule(model, name, type(module)(config=model.config).to(device))
