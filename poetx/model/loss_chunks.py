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
LOGITS_BUDGET = 1 << 25  # elements of one chunk's logits (64 MB in bf16)
# Largest logits of a whole batch the loss keeps from forward to backward (model dtype):
# Llama-8B at 4096 tokens holds 1.05 GB. Keeping them saves backward the head GEMM that
# recomputes them (4.3 TFLOP there) and the float32 accumulator of the hidden gradient.
KEEP_LOGITS_BYTES = 3 << 29  # 1.5 GiB


def _whole_tiles(n: int) -> int:
    return n if n < GEMM_TILE else n // GEMM_TILE * GEMM_TILE


def keeps_logits(tokens: int, vocab: int, element_size: int,
                 keep_bytes: int = KEEP_LOGITS_BYTES) -> bool:
    """Whether the loss of ``tokens`` tokens keeps its whole ``(tokens, vocab)`` logits for
    backward (else forward runs in token chunks and backward recomputes vocabulary chunks)."""
    return tokens * vocab * element_size <= keep_bytes


def auto_chunk_tokens(vocab_size: int, budget_elements: int = LOGITS_BUDGET) -> int:
    """Tokens per forward chunk, so that one chunk holds about ``budget_elements`` logits."""
    return _whole_tiles(max(16, budget_elements // max(vocab_size, 1)))


def vocab_chunk(chunk_tokens: int, vocab: int, tokens: int) -> int:
    """Head rows per backward chunk: as many logits as a forward chunk of ``chunk_tokens``
    tokens holds (``chunk_tokens x vocab``), spread over all ``tokens``."""
    rows = max(1, min(vocab, chunk_tokens * vocab // max(tokens, 1)))
    return vocab if rows == vocab else _whole_tiles(rows)
