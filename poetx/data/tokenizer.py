"""Byte-level BPE tokenizers: training, caching, loading, saving and export to transformers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from poetx.atomic import write_with
from poetx.data.cache import cache_key, resolve_cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 257  # the 256 byte symbols and EOT
MAX_VOCAB = 2**32 - 1  # token streams are stored as uint32 at most


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose id 0 is ``<|endoftext|>``.

    Every byte is in the initial alphabet, so any string encodes and ``decode(encode(s)) == s``.
    Training is deterministic: the same texts in the same order give the same tokenizer. The
    vocabulary can come out smaller than ``vocab_size`` when the texts have fewer pairs to merge.
    """
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eot_id(tok: Tokenizer) -> int:
    """Id of ``<|endoftext|>``, the document separator; ``ValueError`` if it is missing."""
    token_id = tok.token_to_id(EOT)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {EOT} token, needed to separate documents")
    return token_id


def tokenizer_hash(tok: Tokenizer) -> str:
    """A short content hash of the tokenizer's full JSON (vocabulary, merges, normalisation)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a folder holding one) that has a ``<|endoftext|>`` token.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the file is not a tokenizer, or it lacks ``<|endoftext|>``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path} is not a valid tokenizer.json: {exc}") from exc
    try:
        eot_id(tok)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return tok


def get_tokenizer(
    source_key: str,
    texts_fn: Callable[[], Iterable[str]],
    vocab_size: int,
    cache_dir: Path | None,
    tokenizer_path: Path | None,
) -> Tokenizer:
    """The tokenizer for a data source.

    With ``tokenizer_path``, load that file. Otherwise return the tokenizer cached under
    ``<cache>/tokenizers/`` for ``(source_key, vocab_size)``, training it on ``texts_fn()`` the
    first time. ``source_key`` must change whenever the texts would.
    """
    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path)
    key = cache_key(source_key, str(vocab_size), prefix=f"{source_key}-v{vocab_size}")
    path = resolve_cache_dir(cache_dir) / "tokenizers" / key / TOKENIZER_FILE
    if path.is_file():
        return load_tokenizer(path)
    tok = train_tokenizer(texts_fn(), vocab_size)
    _save_atomic(tok, path)
    return tok


def save_tokenizer(tok: Tokenizer, run_dir: Path) -> Path:
    """Write ``run_dir/tokenizer.json`` (creating ``run_dir``) and return its path."""
    path = Path(run_dir) / TOKENIZER_FILE
    _save_atomic(tok, path)
    return path


def to_hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap ``tok`` as a transformers fast tokenizer with bos = eos = ``<|endoftext|>``."""
    from transformers import PreTrainedTokenizerFast  # heavy import, only needed for export

    eot_id(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT)


def _save_atomic(tok: Tokenizer, path: Path) -> None:
    # Concurrent ranks may save the same tokenizer; a reader must never see half a file.
    write_with(path, lambda tmp: tok.save(str(tmp)))
