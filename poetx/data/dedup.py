"""De-duplication of documents: exact (after normalisation) and near-exact (MinHash LSH).

Two documents are *exact* duplicates when they are equal after lower-casing and dropping every
character that is not a letter or digit (so whitespace, punctuation and markup remnants do not
matter). They are *near* duplicates when the Jaccard similarity of their sets of word 5-grams,
estimated from ``NUM_HASHES`` MinHash values, is at least ``threshold``; candidates are found
with locality-sensitive hashing (``BANDS`` bands of ``ROWS`` values each), then checked on the
whole signature. Everything is deterministic: word hashes are CRC-32 and the hash functions
come from a fixed seed, so the same documents in the same order give the same result.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHINGLE_WORDS = 5
BANDS = 8
ROWS = 12
NUM_HASHES = BANDS * ROWS
DEFAULT_THRESHOLD = 0.8

_WORD = re.compile(r"\w+")
_NOT_ALNUM = re.compile(r"[\W_]+")
_rng = np.random.RandomState(20260514)
# Odd multipliers and offsets of multiply-shift hash functions on 64-bit words.
_MULT = (_rng.randint(1, 2**62, NUM_HASHES, dtype=np.int64).astype(np.uint64) << np.uint64(1)) | 1
_ADD = _rng.randint(0, 2**62, NUM_HASHES, dtype=np.int64).astype(np.uint64)
_SHINGLE_MULT = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                          0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD], dtype=np.uint64)


@dataclass(frozen=True)
class DedupStats:
    """How many documents each rule removed."""

    documents: int
    exact: int
    near: int

    @property
    def kept(self) -> int:
        return self.documents - self.exact - self.near


def normalized_digest(text: str) -> bytes:
    """Digest of ``text`` lower-cased with every non-alphanumeric character removed."""
    return hashlib.sha1(_NOT_ALNUM.sub("", text.lower()).encode()).digest()


class _WordHasher:
    def __init__(self) -> None:
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        cache = self.cache
        ids = []
        for word in words:
            value = cache.get(word)
            if value is None:
                value = cache[word] = zlib.crc32(word.encode()) | (len(word) << 32)
            ids.append(value)
        return np.array(ids, dtype=np.uint64)


def minhash_signature(word_ids: np.ndarray) -> np.ndarray:
    """The ``NUM_HASHES`` MinHash values of the word 5-grams of a document, ``(NUM_HASHES,)``.

    ``word_ids``: the document's word hashes in order, shape ``(n_words,)``, uint64. A document
    of fewer than 5 words has one shingle, all of its words.
    """
    n = len(word_ids)
    with np.errstate(over="ignore"):
        if n < SHINGLE_WORDS:
            shingles = np.array([int((word_ids * _SHINGLE_MULT[:n]).sum()) & (2**64 - 1)],
                                dtype=np.uint64)
        else:
            count = n - SHINGLE_WORDS + 1
            shingles = np.zeros(count, dtype=np.uint64)
            for k in range(SHINGLE_WORDS):
                shingles += word_ids[k : k + count] * _SHINGLE_MULT[k]
        shingles = np.unique(shingles)
        out = np.empty(NUM_HASHES, dtype=np.uint64)
        step = max(1, (1 << 22) // NUM_HASHES)  # bound the (shingles x hashes) temporary
        out[:] = np.iinfo(np.uint64).max
        for start in range(0, len(shingles), step):
            block = shingles[start : start + step, None] * _MULT[None, :] + _ADD[None, :]
            np.minimum(out, block.min(axis=0), out=out)
    return out


def deduplicate(texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD
                ) -> tuple[list[int], DedupStats]:
    """Indices of the documents to keep (in order) and counts of what was removed.

    A document is dropped when an earlier kept one is an exact duplicate of it, or a near one
    (estimated Jaccard similarity of word 5-grams >= ``threshold``); the first one is kept.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    seen: set[bytes] = set()
    buckets: dict[tuple[int, bytes], list[int]] = {}
    signatures: list[np.ndarray | None] = []
    hasher = _WordHasher()
    kept: list[int] = []
    exact = near = 0
    for index, text in enumerate(texts):
        digest = normalized_digest(text)
        if digest in seen:
            exact += 1
            signatures.append(None)
            continue
        seen.add(digest)
        signature = minhash_signature(hasher(text))
        keys = [(band, signature[band * ROWS : (band + 1) * ROWS].tobytes())
                for band in range(BANDS)]
        duplicate = False
        for key in keys:
            for other in buckets.get(key, ()):
                other_signature = signatures[other]
                assert other_signature is not None
                if np.mean(other_signature == signature) >= threshold:
                    duplicate = True
                    break
            if duplicate:
                break
        if duplicate:
            near += 1
            signatures.append(None)
            continue
        signatures.append(signature)
        for key in keys:
            buckets.setdefault(key, []).append(index)
        kept.append(index)
    return kept, DedupStats(documents=len(texts), exact=exact, near=near)
