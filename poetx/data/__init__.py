"""Data layer of ``poetx train``: the bundled corpus, tokenizers and deterministic packed batches.

``build_data(None, seq_len, batch_size, seed)`` gives batches of the bundled Shakespeare corpus;
see :mod:`poetx.data.sources` for the other ``--data`` specs.
"""

from poetx.data.corpus import (
    CorpusUnavailableError,
    bundled_documents,
    ensure_bundled_corpus,
    install_corpus,
)
from poetx.data.dataset import DataBundle, build_data, token_stream, tokenize_documents
from poetx.data.packing import PackedBatches, validation_batches
from poetx.data.sources import Source, TextSource, TokenSource, resolve_source
from poetx.data.tokenizer import (
    EOT,
    get_tokenizer,
    load_tokenizer,
    save_tokenizer,
    to_hf_tokenizer,
    train_tokenizer,
)

__all__ = [
    "EOT",
    "CorpusUnavailableError",
    "DataBundle",
    "PackedBatches",
    "Source",
    "TextSource",
    "TokenSource",
    "build_data",
    "bundled_documents",
    "ensure_bundled_corpus",
    "get_tokenizer",
    "install_corpus",
    "load_tokenizer",
    "resolve_source",
    "save_tokenizer",
    "to_hf_tokenizer",
    "token_stream",
    "tokenize_documents",
    "train_tokenizer",
    "validation_batches",
]
