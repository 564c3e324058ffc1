"""Llama model presets: the shapes of the POET / GaLore line of work, torch-free.

Kept apart from :mod:`poetx.model.llama` so that settings and the command line can list and
check presets without importing torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    # LLaMA-1 "33B" (32.5 B parameters): the largest class that trains on one 80 GB GPU, with
    # int8 W0 (bench/largest.py).
    "llama-30b": LlamaShape(6656, 17920, 60, 52, 52),
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
