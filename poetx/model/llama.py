"""Llama model presets (shapes from the POET / GaLore line of work) and a builder for them.

Every preset becomes a ``transformers.LlamaConfig`` and the model is a plain HF
``LlamaForCausalLM``: POET-X wraps it afterwards (``poetx.wrap``), so an unwrapped model is an
ordinary Llama that ``save_pretrained`` / ``from_pretrained`` understand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class LlamaShape:
    """Architecture of one preset.

    Attributes:
        hidden: model width ``d``.
        intermediate: width of the SwiGLU MLP.
        layers: number of decoder blocks.
        heads: attention heads (``head_dim = hidden / heads``).
        kv_heads: key/value heads (grouped-query attention when below ``heads``).
        vocab: vocabulary of the published configuration (a run uses its tokenizer's instead).
        tie_embeddings: share the input embedding with ``lm_head``.
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    tie_embeddings: bool = False


PRESETS: dict[str, LlamaShape] = {
    # CPU-sized model for tests and demos. 344 is not a multiple of the tiny block size (64), so
    # the identity padding of the last rotation block is exercised; tied embeddings exercise the
    # shared-tensor handling of checkpoints and export.
    "tiny": LlamaShape(128, 344, 2, 4, 4, vocab=512, tie_embeddings=True),
    # Shapes of the authors' configs (see shared/research/poetx.md). 1376 and 2736 are not
    # multiples of 256 either.
    "llama-60m": LlamaShape(512, 1376, 8, 8, 8),
    "llama-130m": LlamaShape(768, 2048, 12, 12, 12),
    "llama-350m": LlamaShape(1024, 2736, 24, 16, 16),
    "llama-1b": LlamaShape(2048, 5461, 24, 32, 32),
    "llama-3b": LlamaShape(2560, 6848, 32, 32, 32),
    "llama-7b": LlamaShape(4096, 11008, 32, 32, 32),
    "llama-8b": LlamaShape(4096, 14336, 32, 32, 8, vocab=128256),
    "llama-13b": LlamaShape(5120, 13824, 40, 40, 40),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_shape(preset: str) -> LlamaShape:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
        ) from None


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
