"""Replace a model's ``nn.Linear`` layers by ``POETLinear`` in place, and back."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

from torch import nn

from poetx.config import POETConfig
from poetx.layers.poet_linear import POETLinear

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


def _unsupported_projections(model: nn.Module, config: POETConfig) -> list[str]:
    """Names of transformers' ``Conv1D`` projections (GPT-2 style: weight stored ``(in, out)``),
    which ``wrap`` cannot replace and an export could not write back in their layout."""
    return [name for name, m in model.named_modules()
            if type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")
            and not _excluded(name, config.exclude)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap(model: nn.Module, config: POETConfig | None = None) -> nn.Module:
    """Replace every eligible ``nn.Linear`` of ``model`` by a ``POETLinear``; returns ``model``.

    ``lm_head``, layers tied to embeddings and names matching ``config.exclude`` stay dense.
    Each layer's permutations are seeded from ``config.seed`` and its module name.
    """
    config = config or POETConfig()
    unsupported = _unsupported_projections(model, config)
    if unsupported:
        shown = ", ".join(unsupported[:3]) + (", ..." if len(unsupported) > 3 else "")
        raise TypeError(
            f"wrap: {len(unsupported)} projection(s) are transformers Conv1D layers (GPT-2 "
            f"style, weight stored (in, out)), which POET-X does not reparameterize: {shown}. "
            f"Models with nn.Linear projections (Llama, Qwen2, Mistral, ...) are supported; "
            f"POETConfig(exclude=...) keeps named layers dense"
        )
    targets = list(eligible_linears(model, config))
    if not targets:
        raise ValueError("wrap: the model has no nn.Linear layer to reparameterize")
    for name, linear in targets:
        _set_submodule(model, name, POETLinear.from_linear(linear, config, name=name))
    return model


def poet_layers(model: nn.Module) -> Iterator[tuple[str, POETLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, POETLinear):
            yield name, module


def unwrap(model: nn.Module) -> nn.Module:
    """Merge every ``POETLinear`` and put a plain ``nn.Linear`` (weight ``R W0 P``) back."""
    for name, layer in list(poet_layers(model)):
        _set_submodule(model, name, layer.to_linear())
    return model


def rotation_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The skew parameters of all ``POETLinear`` layers (what the merge schedule resets)."""
    return [p for _, layer in poet_layers(model) for p in (layer.theta_in, layer.theta_out)]


def merge_all_(model: nn.Module) -> int:
    """Merge every ``POETLinear`` in place; returns how many were merged."""
    layers = [layer for _, layer in poet_layers(model)]
    for layer in layers:
        layer.merge_()
    return len(layers)
