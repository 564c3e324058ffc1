"""Replace a model's ``nn.Linear`` layers by ``POETLinear`` in place, and back."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from poetx.config import POETConfig
from poetx.layers.framed_mlp import (
    MLP_TRIPLE,
    fuse_mlp_frames,
    refresh_mlp_frames,
    unfuse_mlp_frames,
)
from poetx.layers.poet_linear import POETLinear
from poetx.layers.rotation_groups import group_rotations, ungroup_rotations

NEVER_WRAPPED = ("lm_head",)


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def _output_embedding_ids(model: nn.Module) -> set[int]:
    """Modules that are (or share their weight with) embeddings: never reparameterized."""
    ids: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        if out is not None:
            ids.add(id(out))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) in embedding_weights:
            ids.add(id(m))
    return ids


def eligible_linears(model: nn.Module, config: POETConfig) -> Iterator[tuple[str, nn.Linear]]:
    """``(name, layer)`` of every ``nn.Linear`` that ``wrap`` would replace."""
    skip = _output_embedding_ids(model)
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or id(module) in skip:
            continue
        if _excluded(name, NEVER_WRAPPED) or _excluded(name, config.exclude):
            continue
        yield name, module


# A POETLinear made from a transformers ``Conv1D`` (GPT-2 style: ``y = x W + b`` with ``W`` stored
# ``(in, out)``) carries this attribute, so that unwrap and export give the layer back in the
# layout its model class loads.
FROM_CONV1D = "poetx_from_conv1d"


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def eligible_conv1d(model: nn.Module, config: POETConfig) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of every transformers ``Conv1D`` projection that ``wrap`` replaces."""
    for name, module in model.named_modules():
        if _is_hf_conv1d(module) and not _excluded(name, NEVER_WRAPPED) \
                and not _excluded(name, config.exclude):
            yield name, module


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what ``conv`` computes (weight transposed to ``(out, in)``);
    it shares no storage with ``conv``."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def dense_layer(layer: POETLinear) -> nn.Module:
    """The plain layer ``layer`` stands for: ``nn.Linear``, or ``Conv1D`` if it came from one."""
    linear = layer.to_linear()
    if not getattr(layer, FROM_CONV1D, False):
        return linear
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(layer.out_features, layer.in_features).to(linear.weight.device,
                                                            linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()
    return conv


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def shared_mlp_frames(targets: list[tuple[str, nn.Linear]]) -> dict[str, tuple[str, str]]:
    """``{name: (frame_in, frame_out)}`` for the layers of every MLP whose ``gate_proj``,
    ``up_proj`` and ``down_proj`` are all in ``targets`` with one intermediate width: the gate
    and up outputs and the down input share the key ``"<mlp>.intermediate"``
    (``POETConfig.mlp_permutations="shared"``). A width that is not a multiple of the block
    size is fine: the phantom positions of the last block come after the real ones in the
    permuted order, which is where a side without an index puts them too."""
    by_parent: dict[str, dict[str, nn.Linear]] = {}
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        if child in MLP_TRIPLE:
            by_parent.setdefault(parent, {})[child] = linear
    frames: dict[str, tuple[str, str]] = {}
    for parent, found in by_parent.items():
        if len(found) < 3:
            continue
        gate, up, down = (found[c] for c in MLP_TRIPLE)
        width = gate.out_features
        if up.out_features != width or down.in_features != width:
            continue
        key = f"{parent}.intermediate" if parent else "intermediate"
        prefix = f"{parent}." if parent else ""
        frames[prefix + "gate_proj"] = ("", key)
        frames[prefix + "up_proj"] = ("", key)
        frames[prefix + "down_proj"] = (key, "")
    return frames


def check_shared_frames(model: nn.Module) -> None:
    """Raise if layers that share a permutation (``frame_in`` / ``frame_out``) hold different
    ones: they were merged apart (``merge_all_`` merges them together). Reads the devices."""
    held: dict[str, tuple[str, torch.Tensor]] = {}
    for name, layer in poet_layers(model):
        for side in ("in", "out"):
            key = getattr(layer, f"frame_{side}")
            if not key:
                continue
            perm = getattr(layer, f"perm_{side}")
            if key not in held:
                held[key] = (name, perm)
            elif not torch.equal(held[key][1], perm):
                raise RuntimeError(
                    f"{name} and {held[key][0]} share the permutation {key!r} but hold "
                    "different ones: layers sharing a permutation must be merged together "
                    "(poetx merge_all_)")


def wrap(model: nn.Module, config: POETConfig | None = None) -> nn.Module:
    """Replace every eligible ``nn.Linear`` of ``model`` by a ``POETLinear``; returns ``model``.

    Hugging Face ``Conv1D`` projections (GPT-2) are wrapped too and come back as ``Conv1D`` on
    ``unwrap``. ``lm_head``, layers tied to embeddings and names matching ``config.exclude``
    stay dense.
    Each layer's permutations are seeded from ``config.seed`` and its module name (an MLP's
    shared one, with ``config.mlp_permutations="shared"``, from the MLP's name: see
    :func:`shared_mlp_frames`). Every ``ModuleList`` element holding POET layers (a decoder
    block) gets the batched rotation build (``poetx.layers.rotation_groups``; used as
    ``config.batch_rotations`` says).
    """
    config = config or POETConfig()
    targets = list(eligible_linears(model, config))
    convs = list(eligible_conv1d(model, config))
    if not targets and not convs:
        raise ValueError("wrap: the model has no nn.Linear layer to reparameterize")
    frames = shared_mlp_frames(targets) if config.mlp_permutations == "shared" else {}
    for name, linear in targets:
        frame_in, frame_out = frames.get(name, ("", ""))
        _set_submodule(model, name, POETLinear.from_linear(linear, config, name=name,
                                                           frame_in=frame_in,
                                                           frame_out=frame_out))
    for name, conv in convs:
        layer = POETLinear.from_linear(_conv1d_as_linear(conv), config, name=name)
        setattr(layer, FROM_CONV1D, True)
        _set_submodule(model, name, layer)
    group_rotations(model)
    if config.mlp_frames == "fused":
        fuse_mlp_frames(model)
    return model


def poet_layers(model: nn.Module) -> Iterator[tuple[str, POETLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, POETLinear):
            yield name, module


def unwrap(model: nn.Module) -> nn.Module:
    """Merge every ``POETLinear`` and put a plain ``nn.Linear`` (weight ``R W0 P``) back (a
    ``Conv1D`` where ``wrap`` found one)."""
    unfuse_mlp_frames(model)
    for name, layer in list(poet_layers(model)):
        _set_submodule(model, name, dense_layer(layer))
    ungroup_rotations(model)
    return model


def rotation_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The skew parameters of all ``POETLinear`` layers (what the merge schedule resets)."""
    return [p for _, layer in poet_layers(model) for p in (layer.theta_in, layer.theta_out)]


def rotation_norm_max(model: nn.Module) -> Tensor:
    """Largest Frobenius norm ``||Q||_F`` of any block's skew matrix over every ``POETLinear``:
    a 0-dim tensor on the parameters' device, computed without a host sync (one small reduction
    per parameter, one stacked max). ``||Q||_F >= ||Q||_2``, so it bounds the spectral norm that
    governs the truncated Cayley map's error; each off-diagonal entry counts twice."""
    params = rotation_parameters(model)
    if not params:
        return torch.zeros(())
    # A sharded parameter (FSDP2 DTensor) contributes its local rows; one max all-reduce
    # then gives every rank the same value (the merge guard decides on it).
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    per_param = [torch.linalg.vector_norm(p.detach(), dim=1).amax() if p.numel()
                 else p.new_zeros(()) for p in local]
    result = torch.stack([v.to(per_param[0].dtype) for v in per_param]).amax() * 2**0.5
    if len(local) and any(p is not q for p, q in zip(params, local, strict=True)):
        import torch.distributed as dist

        dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return result


def merge_all_(model: nn.Module) -> int:
    """Merge every ``POETLinear`` in place; returns how many were merged."""
    layers = [layer for _, layer in poet_layers(model)]
    for layer in layers:
        layer.merge_()
    check_shared_frames(model)
    refresh_mlp_frames(model)
    return len(layers)
