"""From a ``--data`` spec to training and validation batches: :func:`build_data`.

Text is tokenized once per (source, split, tokenizer) into a token stream, each document followed
by ``<|endoftext|>``, cached as ``<cache>/tokens/<key>.npy`` (``uint16`` when the vocabulary
fits, else ``uint32``) and memory-mapped on load. Pre-tokenized sources are memory-mapped as
they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from poetx.atomic import write_with
from poetx.data.cache import cache_key, resolve_cache_dir
from poetx.data.packing import PackedBatches, validation_batches
from poetx.data.sources import (
    Source,
    TextSource,
    TokenSource,
    resolve_source,
)
from poetx.data.tokenizer import (
    eot_id,
    get_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
)

__all__ = [
    "DataBundle",
    "PackedBatches",
    "Source",
    "build_data",
    "resolve_source",
    "token_stream",
    "tokenize_documents",
    "validation_batches",
]

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VAL_BATCHES = 16
TOKENIZER_MAX_CHARS = 100_000_000  # BPE training beyond this costs time and memory, little else
_STREAM_VERSION = "1"  # bump when the layout of cached token streams changes
_MAX_PIECE_CHARS = 1 << 20
_BATCH_CHARS = 8 << 20


def stream_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned dtype that holds ids below ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_documents(docs: Iterable[str], tok: Tokenizer) -> np.ndarray:
    """Encode ``docs`` into one stream ``doc0 EOT doc1 EOT ...``, shape ``(n_tokens,)``.

    Literal ``<|endoftext|>`` inside a document is encoded as plain text, so the separators are
    exactly the ones added here. Documents longer than ``_MAX_PIECE_CHARS`` are encoded in
    pieces cut where a non-space character meets whitespace, which every byte-level BPE
    pre-tokenizer treats as a boundary anyway: the ids equal those of encoding it whole.
    """
    separator = eot_id(tok)
    dtype = stream_dtype(tok.get_vocab_size(with_added_tokens=True))
    # A private copy: the flag below must not change the caller's tokenizer.
    plain = Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    encode = getattr(plain, "encode_batch_fast", plain.encode_batch)  # no offsets: faster
    chunks: list[np.ndarray] = []
    for pieces, ends_doc in _piece_batches(docs):
        for encoding, last in zip(encode(pieces, add_special_tokens=False), ends_doc, strict=True):
            chunks.append(np.asarray(encoding.ids, dtype=dtype))
            if last:
                chunks.append(np.array([separator], dtype=dtype))
    return np.concatenate(chunks) if chunks else np.empty(0, dtype)


def token_stream(
    source: TextSource, split: str, tok: Tokenizer, cache_dir: Path | None = None
) -> np.ndarray:
    """The memory-mapped token stream of ``source``'s ``split``, tokenizing it on first use."""
    key = cache_key(source.key, split, tokenizer_hash(tok), _STREAM_VERSION, prefix=split)
    path = resolve_cache_dir(cache_dir) / "tokens" / f"{key}.npy"
    if not path.is_file():
        ids = tokenize_documents(source.documents(split), tok)
        if len(ids) == 0:
            raise ValueError(f"{source.description}: the {split} split holds no text")
        _save_atomic(ids, path)
    return np.load(path, mmap_mode="r")


@dataclass
class DataBundle:
    """Everything a training run needs from the data layer.

    Attributes:
        tokenizer: the tokenizer; None for pre-tokenized data given without ``tokenizer_path``.
        train: shuffled training batches, ``train.batch(step)`` of shape
            ``(batch_size, seq_len + 1)``.
        val: the fixed validation batches, each ``(batch_size, seq_len + 1)`` (see
            :func:`validation_batches`).
        vocab_size: embedding rows the model needs (every id in the data is below it).
        description: one line for logs.
        train_tokens: tokens in the training stream.
        val_tokens: tokens in the validation stream.
    """

    tokenizer: Tokenizer | None
    train: PackedBatches
    val: list[torch.Tensor]
    vocab_size: int
    description: str
    train_tokens: int
    val_tokens: int


def build_data(
    data: str | None,
    seq_len: int,
    batch_size: int,
    seed: int,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    run_dir: Path | None = None,
    max_val_batches: int = DEFAULT_VAL_BATCHES,
) -> DataBundle:
    """Resolve ``data``, get its tokenizer and token streams, and pack them into batches.

    Args:
        data: a spec for :func:`resolve_source`; None is the bundled corpus.
        seq_len: tokens per input row (rows hold ``seq_len + 1`` for the shifted labels).
        batch_size: rows per batch.
        seed: seed of the training order (see :class:`PackedBatches`).
        vocab_size: size of the BPE vocabulary trained for text data (ignored with
            ``tokenizer_path``); for pre-tokenized data without a tokenizer, a lower bound on
            the reported vocabulary, raised to cover every id in the data.
        cache_dir: cache folder (default ``$POETX_DATA_DIR`` or ``~/.cache/poetx``).
        tokenizer_path: a ``tokenizer.json`` to use instead of training one.
        run_dir: when given, the tokenizer is saved there as ``tokenizer.json``.
        max_val_batches: most validation batches to keep.
    """
    source = resolve_source(data, cache_dir)
    if isinstance(source, TokenSource):
        tokenizer_path = tokenizer_path or source.tokenizer_path
        tok = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
        train_ids, val_ids = source.tokens("train"), source.tokens("val")
        vocab = _token_vocab(train_ids, val_ids, tok, vocab_size, source)
        tok_text = "pre-tokenized"
    else:
        tok = get_tokenizer(
            source.key,
            lambda: _capped(source.documents("train"), TOKENIZER_MAX_CHARS),
            vocab_size,
            cache_dir,
            tokenizer_path,
        )
        train_ids = token_stream(source, "train", tok, cache_dir)
        val_ids = token_stream(source, "val", tok, cache_dir)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        tok_text = f"tokenizer {tokenizer_path}" if tokenizer_path else "byte-level BPE"
    if run_dir is not None and tok is not None:
        save_tokenizer(tok, Path(run_dir))
    try:
        train = PackedBatches(train_ids, seq_len, batch_size, seed)
        val = validation_batches(val_ids, seq_len, batch_size, max_val_batches)
    except ValueError as exc:  # too little data for seq_len: say which data
        raise ValueError(f"{source.description}: {exc}") from None
    description = (
        f"{source.description}; {tok_text}, vocab {vocab}; train {len(train_ids):,} tokens "
        f"({train.num_windows:,} windows of {seq_len + 1}), val {len(val_ids):,} tokens "
        f"({len(val)} batches)"
    )
    return DataBundle(
        tokenizer=tok,
        train=train,
        val=val,
        vocab_size=vocab,
        description=description,
        train_tokens=len(train_ids),
        val_tokens=len(val_ids),
    )


def _token_vocab(
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    tok: Tokenizer | None,
    vocab_size: int,
    source: TokenSource,
) -> int:
    max_id = max(int(train_ids.max()), int(val_ids.max()))
    if tok is None:
        return max(vocab_size, max_id + 1)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if max_id >= vocab:
        raise ValueError(
            f"{source.description} holds id {max_id}, beyond the tokenizer's vocabulary of {vocab}"
        )
    return vocab


def _capped(docs: Iterable[str], max_chars: int) -> Iterator[str]:
    taken = 0
    for doc in docs:
        if taken >= max_chars:
            return
        yield doc
        taken += len(doc)


def _split_piece(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, each cut just before whitespace that
    follows a non-space character (falling back to a hard cut in a run without whitespace)."""
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        while cut > start and text[cut - 1].isspace():
            cut -= 1
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _piece_batches(docs: Iterable[str]) -> Iterator[tuple[list[str], list[bool]]]:
    """Batches of pieces of about ``_BATCH_CHARS``, each piece flagged if it ends its document."""
    pieces: list[str] = []
    ends: list[bool] = []
    size = 0
    for doc in docs:
        parts = _split_piece(doc, _MAX_PIECE_CHARS)
        for i, part in enumerate(parts):
            pieces.append(part)
            ends.append(i == len(parts) - 1)
            size += len(part)
            if size >= _BATCH_CHARS:
                yield pieces, ends
                pieces, ends, size = [], [], 0
    if pieces:
        yield pieces, ends


def _save_atomic(ids: np.ndarray, path: Path) -> None:
    # Concurrent ranks may build the same stream; a reader must never see half a file.
    write_with(path, lambda tmp: np.save(tmp, ids, allow_pickle=False))
