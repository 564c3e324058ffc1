"""Llama model presets (shapes from the POET / GaLore line of work) and a builder for them.

Every preset becomes a ``transformers.LlamaConfig`` and the model is a plain HF
``LlamaForCausalLM``: POET-X wraps it afterwards (``poetx.wrap``), so an unwrapped model is an
ordinary Llama that ``save_pretrained`` / ``from_pretrained`` understand.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from poetx.model.presets import PRESETS, LlamaShape, get_shape, preset_names

__all__ = ["PRESETS", "LlamaShape", "build_model", "count_parameters", "default_dtype",
           "get_shape", "llama_config", "preset_names"]


def llama_config(preset: str, vocab_size: int | None = None,
                 max_position_embeddings: int = 4096) -> LlamaConfig:
    """The ``LlamaConfig`` of ``preset`` with ``vocab_size`` (default: the preset's own).

    ``max_position_embeddings`` only bounds the sequence length (RoPE is computed on the fly).
    """
    shape = get_shape(preset)
    vocab = shape.vocab if vocab_size is None else vocab_size
    if vocab < 2:
        raise ValueError(f"vocab_size: must be at least 2, got {vocab}")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=False,
        tie_word_embeddings=shape.tie_embeddings,
        # Token ids of a tokenizer trained per run are not known here; generation code can set
        # them later. None keeps HF from pointing at arbitrary vocabulary entries.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs (the authors' setting), float32 elsewhere (CPU bf16 matmuls are slow)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_model(
    preset: str,
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    max_position_embeddings: int = 4096,
) -> LlamaForCausalLM:
    """A freshly initialized ``LlamaForCausalLM`` of ``preset``, in ``dtype`` on ``device``.

    The parameters are created directly in ``dtype`` on ``device`` (a 13B float32 copy on the
    host first would not fit), with HF's initialization drawn from the global torch RNG, so
    seeding ``torch.manual_seed`` beforehand makes the model reproducible.
    """
    config = llama_config(preset, vocab_size, max_position_embeddings)
    dtype = dtype or default_dtype(device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # HF reads the dtype from the config when saving; keep it in step with the weights.
    model.config.dtype = dtype
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts; a tied tensor counts once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable
