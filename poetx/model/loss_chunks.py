"""Chunk sizes of the chunked cross-entropy (``poetx.model.lm_loss``), kept free of torch so the
memory planner sizes the loss's temporaries with the very same numbers.

Both sizes are rounded down to whole GEMM tiles. A vocabulary chunk whose width is not a
multiple of 8 gives the ``(tokens, rows)`` logits a row pitch cuBLAS cannot load 16 bytes at a
time: on an H100 it then runs Ampere kernels with 2-byte alignment, which took 51 ms of a 432 ms
Llama-8B step at 2 x 2048 (vocabulary chunk 8172, ``bench/notes_kernels.md`` run 10). A token
chunk of 261 rows pays for two 256-row tiles.
"""

from __future__ import annotations

GEMM_TILE = 128
LOGITS_BUDGET = 1 << 25  # elements of one chunk's float32 logits (128 MB)


def _whole_tiles(n: int) -> int:
    return n if n < GEMM_TILE else n // GEMM_TILE * GEMM_TILE


def auto_chunk_tokens(vocab_size: int, budget_elements: int = LOGITS_BUDGET) -> int:
    """Tokens per forward chunk, so that one chunk of float32 logits stays near 128 MB."""
    return _whole_tiles(max(16, budget_elements // max(vocab_size, 1)))


def vocab_chunk(chunk_tokens: int, vocab: int, tokens: int) -> int:
    """Head rows per backward chunk: as many logits as a forward chunk of ``chunk_tokens``
    tokens holds (``chunk_tokens x vocab``), spread over all ``tokens``."""
    rows = max(1, min(vocab, chunk_tokens * vocab // max(tokens, 1)))
    return vocab if rows == vocab else _whole_tiles(rows)
